//! The syntax of a document id, `[A-Za-z0-9._:/-]{1,200}`: shared by the
//! document model ([`crate::DocId`]) and the wire codec (`sync/codec.rs`),
//! which refuses a message naming an invalid id before the sync core sees
//! it. A leaf: it imports nothing from the crate.

/// Longest doc id, in bytes.
pub const MAX_ID_LEN: usize = 200;

/// What is wrong with `s` as a doc id, or `None` if it is a valid one.
pub fn doc_id_problem(s: &str) -> Option<String> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Some(format!(
            "length must be 1 to {MAX_ID_LEN} bytes, got {}",
            s.len()
        ));
    }
    if s == "." || s == ".." {
        // URL normalisation turns /v1/docs/. into /v1/docs: unreachable over HTTP.
        return Some("\".\" and \"..\" are not allowed".into());
    }
    let (i, c) = s.char_indices().find(|(_, c)| !valid_char(*c))?;
    Some(format!(
        "character {c:?} at byte {i} is not one of A-Z a-z 0-9 . _ : / -"
    ))
}

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')
}

/// The first 60 characters of `s`, with an ellipsis if it is longer: how an
/// error shows an id that may be long or hostile.
pub fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(60).collect();
    if p.len() < s.len() {
        p.push('…');
    }
    p
}
