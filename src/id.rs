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

/// The name prefix of docs created by automerge-repo clients: `am/<their
/// document id>`.
pub const CLIENT_PREFIX: &str = "am/";

/// The 16 bytes behind a doc's automerge URL (`automerge:<bs58check of
/// them>`): for a doc a client created (`am/<id>`), the bytes of its id;
/// for any other name, the first 16 bytes of SHA-256 over a fixed label and
/// the name, so every node derives the same URL with no coordination,
/// shaped as a name-based UUID (version 5 and RFC 4122 variant bits):
/// automerge-repo 1.x (the npm sync server 0.2.8 runs it) refuses a
/// document id that is not a valid UUID.
pub fn url_key(name: &str) -> [u8; 16] {
    if let Some(bytes) = name.strip_prefix(CLIENT_PREFIX).and_then(client_id_bytes) {
        return bytes;
    }
    use sha2::{Digest as _, Sha256};
    let hash = Sha256::new()
        .chain_update(b"mergeflow automerge-repo document id\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

/// The 16 bytes of an automerge-repo document id (bs58check), if it is one.
pub fn client_id_bytes(id: &str) -> Option<[u8; 16]> {
    let bytes = bs58::decode(id).with_check(None).into_vec().ok()?;
    bytes.as_slice().try_into().ok()
}
