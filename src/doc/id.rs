//! Document ids: `[A-Za-z0-9._:/-]{1,200}`, chosen by the writer or generated.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::DocError;
pub use crate::id::MAX_ID_LEN;
use crate::id::{doc_id_problem, preview};

/// Prefix of the node's system docs (workflow definitions, membership,
/// effect markers): written by the node only, hidden from listings unless
/// asked for.
pub const SYSTEM_PREFIX: &str = "_mergeflow/";

/// True for a system doc (under [`SYSTEM_PREFIX`]).
pub fn is_system(id: &str) -> bool {
    id.starts_with(SYSTEM_PREFIX)
}

/// Refuses a user's write (through the HTTP API or an embedder's
/// [`crate::DocHandle`]) to a system doc, saying what the doc is and who
/// writes it. The node's own parts (workflow engine, membership, effect
/// markers) write them through the document service (`crate::runtime::Docs`)
/// directly.
///
/// # Errors
/// [`DocError::Reserved`] for an id under [`SYSTEM_PREFIX`].
pub fn user_writable(id: &DocId) -> Result<(), DocError> {
    let Some(rest) = id.as_str().strip_prefix(SYSTEM_PREFIX) else {
        return Ok(());
    };
    let what = match rest.split_once('/').map_or(rest, |(kind, _)| kind) {
        "workflows" => "holds a workflow definition; change it with /v1/workflows",
        "nodes" => "is a node's membership doc, which only that node writes",
        "effects" => "holds workflow effect markers, which only the nodes write",
        _ => "is a system doc, which only the nodes write",
    };
    Err(DocError::Reserved {
        id: id.to_string(),
        what,
    })
}

/// A validated document id such as `sensors/greenhouse-3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocId(String);

impl DocId {
    /// Validates `s` as a doc id.
    ///
    /// # Errors
    /// [`DocError::InvalidId`] naming the first offending character or the length.
    pub fn new(s: impl Into<String>) -> Result<DocId, DocError> {
        let s = s.into();
        match doc_id_problem(&s) {
            Some(reason) => Err(DocError::InvalidId {
                id: preview(&s),
                reason,
            }),
            None => Ok(DocId(s)),
        }
    }

    /// A fresh random id: 26 lowercase base32 characters (128 bits).
    pub fn generate() -> DocId {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
        let bits: u128 = rand::random();
        let s = (0..26)
            .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
            .collect();
        DocId(s)
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for DocId {
    type Error = DocError;
    fn try_from(s: String) -> Result<Self, DocError> {
        DocId::new(s)
    }
}

impl From<DocId> for String {
    fn from(id: DocId) -> String {
        id.0
    }
}

impl std::str::FromStr for DocId {
    type Err = DocError;
    fn from_str(s: &str) -> Result<Self, DocError> {
        DocId::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documented_examples() {
        for ok in ["sensors/greenhouse-3", "a", "x:y.z_1-2", &"a".repeat(200)] {
            assert_eq!(DocId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_bad_ids_with_reason() {
        let err = DocId::new("").unwrap_err().to_string();
        assert!(err.contains("length"), "{err}");
        let err = DocId::new("a".repeat(201)).unwrap_err().to_string();
        assert!(err.contains("length"), "{err}");
        let err = DocId::new("a b").unwrap_err().to_string();
        assert!(err.contains("' ' at byte 1"), "{err}");
        assert!(DocId::new("a\0b").is_err());
        assert!(DocId::new("é").is_err());
        assert!(DocId::new(".").is_err() && DocId::new("..").is_err());
        assert!(DocId::new("...").is_ok() && DocId::new("a/..").is_ok());
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = DocId::generate();
        let b = DocId::generate();
        assert_ne!(a, b);
        assert_eq!(DocId::new(a.as_str()).unwrap(), a);
        assert_eq!(a.as_str().len(), 26);
    }
}
