//! JSON Pointer (RFC 6901) paths into Automerge documents.

use automerge::{ObjId, ObjType, Prop, ROOT, ReadDoc, Value};

use super::DocError;

/// A parsed JSON Pointer: `""` is the whole document, `/a/0/b~1c` is
/// `["a", "0", "b/c"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    raw: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// Parses an RFC 6901 pointer.
    ///
    /// # Errors
    /// [`DocError::BadPath`] if it does not start with `/` or has a bad `~` escape.
    pub fn parse(raw: &str) -> Result<Pointer, DocError> {
        let bad = |reason: &str| DocError::BadPath {
            path: raw.to_string(),
            reason: reason.to_string(),
        };
        if raw.is_empty() {
            return Ok(Pointer {
                raw: String::new(),
                tokens: vec![],
            });
        }
        let rest = raw
            .strip_prefix('/')
            .ok_or_else(|| bad("a JSON Pointer is empty or starts with '/'"))?;
        let mut tokens = Vec::new();
        for part in rest.split('/') {
            let mut token = String::with_capacity(part.len());
            let mut chars = part.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => return Err(bad("'~' must be followed by '0' or '1'")),
                    }
                } else {
                    token.push(c);
                }
            }
            tokens.push(token);
        }
        Ok(Pointer {
            raw: raw.to_string(),
            tokens,
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The unescaped reference tokens.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// True for `""`, the whole document.
    pub fn is_root(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The parent pointer's tokens and the last token. `None` for the root.
    pub fn split_last(&self) -> Option<(&[String], &str)> {
        let (last, parent) = self.tokens.split_last()?;
        Some((parent, last.as_str()))
    }

    pub(crate) fn not_found(&self) -> DocError {
        DocError::PathNotFound(self.raw.clone())
    }
}

/// Appends `prop` to `pointer` as one reference token, escaped the way
/// [`Pointer::parse`] unescapes it (`~` as `~0`, `/` as `~1`).
pub(crate) fn push_prop(pointer: &mut String, prop: &Prop) {
    pointer.push('/');
    match prop {
        Prop::Map(k) => pointer.push_str(&k.replace('~', "~0").replace('/', "~1")),
        Prop::Seq(i) => pointer.push_str(&i.to_string()),
    }
}

/// Turns `token` into a property of an object of type `ty`: a key for maps, an
/// index (`< len`, or `<= len` when `allow_end`) for lists and text.
/// `"-"` means the end of a list when `allow_end`.
pub(crate) fn prop_for(
    ptr: &Pointer,
    ty: ObjType,
    len: usize,
    token: &str,
    allow_end: bool,
) -> Result<Prop, DocError> {
    match ty {
        ObjType::Map | ObjType::Table => Ok(Prop::Map(token.to_string())),
        ObjType::List | ObjType::Text => {
            if token == "-" && allow_end {
                return Ok(Prop::Seq(len));
            }
            let index = parse_index(token).ok_or_else(|| DocError::BadPath {
                path: ptr.as_str().to_string(),
                reason: format!("{token:?} is not a list index"),
            })?;
            let max = if allow_end {
                len
            } else {
                len.saturating_sub(1)
            };
            if index > max || (!allow_end && len == 0) {
                return Err(DocError::BadPath {
                    path: ptr.as_str().to_string(),
                    reason: format!("index {index} is out of range for a list of length {len}"),
                });
            }
            Ok(Prop::Seq(index))
        }
    }
}

/// RFC 6901 array index: `0` or digits without a leading zero.
fn parse_index(token: &str) -> Option<usize> {
    if token.is_empty()
        || !token.bytes().all(|b| b.is_ascii_digit())
        || (token.len() > 1 && token.starts_with('0'))
    {
        return None;
    }
    token.parse().ok()
}

/// Walks `tokens` from the root and returns the object they name.
///
/// # Errors
/// [`DocError::PathNotFound`] if a step is missing, [`DocError::TypeMismatch`]
/// if it passes through a scalar.
pub(crate) fn resolve_obj<R: ReadDoc>(
    doc: &R,
    ptr: &Pointer,
    tokens: &[String],
) -> Result<(ObjId, ObjType), DocError> {
    let mut obj = ROOT;
    let mut ty = ObjType::Map;
    for token in tokens {
        let prop =
            prop_for(ptr, ty, doc.length(&obj), token, false).map_err(|_| ptr.not_found())?;
        match doc.get(&obj, prop)? {
            Some((Value::Object(t), id)) => {
                obj = id;
                ty = t;
            }
            Some((Value::Scalar(_), _)) => {
                return Err(DocError::TypeMismatch {
                    path: ptr.as_str().to_string(),
                    op: "a path step",
                    expected: "an object or list",
                    found: "a scalar".into(),
                });
            }
            None => return Err(ptr.not_found()),
        }
    }
    Ok((obj, ty))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_tokens_parse_back() {
        let mut p = String::new();
        for prop in [
            Prop::Map("a/b".into()),
            Prop::Map("~c".into()),
            Prop::Seq(0),
        ] {
            push_prop(&mut p, &prop);
        }
        assert_eq!(p, "/a~1b/~0c/0");
        assert_eq!(Pointer::parse(&p).unwrap().tokens(), ["a/b", "~c", "0"]);
    }

    #[test]
    fn parses_rfc6901_examples() {
        assert!(Pointer::parse("").unwrap().is_root());
        assert_eq!(Pointer::parse("/").unwrap().tokens(), [""]);
        assert_eq!(
            Pointer::parse("/a~1b/~0c/0").unwrap().tokens(),
            ["a/b", "~c", "0"]
        );
        assert_eq!(Pointer::parse("/m~0n").unwrap().tokens(), ["m~n"]);
    }

    #[test]
    fn rejects_bad_pointers() {
        assert!(matches!(Pointer::parse("a"), Err(DocError::BadPath { .. })));
        assert!(matches!(
            Pointer::parse("/a~2"),
            Err(DocError::BadPath { .. })
        ));
        assert!(matches!(
            Pointer::parse("/a~"),
            Err(DocError::BadPath { .. })
        ));
    }

    #[test]
    fn list_indexes_follow_the_rfc() {
        assert_eq!(parse_index("0"), Some(0));
        assert_eq!(parse_index("12"), Some(12));
        assert_eq!(parse_index("01"), None);
        assert_eq!(parse_index("-1"), None);
        assert_eq!(parse_index(""), None);
        let p = Pointer::parse("/x").unwrap();
        assert_eq!(
            prop_for(&p, ObjType::List, 2, "-", true).unwrap(),
            Prop::Seq(2)
        );
        assert!(prop_for(&p, ObjType::List, 2, "2", false).is_err());
        assert!(prop_for(&p, ObjType::List, 2, "-", false).is_err());
        assert!(prop_for(&p, ObjType::List, 0, "0", false).is_err());
    }
}
