//! Document identity between mergeflow's named docs and automerge-repo's
//! URLs (`automerge:<document id>`, the id being the bs58check encoding of
//! 16 bytes).
//!
//! A named doc (`sensors/greenhouse-3`) gets its 16 bytes from a hash of its
//! name, so every node derives the same URL with no coordination. A doc a
//! JS client creates has random bytes; it is stored under the name
//! `am/<document id>`, which maps back to the same bytes.

/// The URL scheme.
pub const SCHEME: &str = "automerge:";

pub use crate::id::CLIENT_PREFIX;

/// Why a string is not a document id or URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not base58 with a valid checksum.
    #[error("document id {0:?} is not bs58check")]
    NotBs58Check(String),
    /// A payload that is not 16 bytes.
    #[error("document id {id:?} holds {len} bytes; automerge-repo ids hold 16")]
    Length {
        /// The id.
        id: String,
        /// Its payload's length.
        len: usize,
    },
}

/// The document id (bs58check) of 16 bytes.
pub fn encode_id(bytes: &[u8; 16]) -> String {
    bs58::encode(bytes).with_check().into_string()
}

/// The 16 bytes of a document id.
///
/// # Errors
/// [`UrlError`] naming what is wrong.
pub fn decode_id(id: &str) -> Result<[u8; 16], UrlError> {
    let bytes = bs58::decode(id)
        .with_check(None)
        .into_vec()
        .map_err(|_| UrlError::NotBs58Check(crate::id::preview(id)))?;
    bytes.as_slice().try_into().map_err(|_| UrlError::Length {
        id: crate::id::preview(id),
        len: bytes.len(),
    })
}

/// The document id of the doc named `name` (see [`crate::id::url_key`]).
pub fn id_of(name: &str) -> String {
    encode_id(&crate::id::url_key(name))
}

/// The automerge URL of the doc named `name`.
pub fn url_of(name: &str) -> String {
    format!("{SCHEME}{}", id_of(name))
}

/// The name a doc created by a client under `id` is stored as.
pub fn client_doc_name(id: &str) -> String {
    format!("{CLIENT_PREFIX}{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_url_everywhere_and_a_client_doc_maps_back() {
        let url = url_of("sensors/greenhouse-3");
        assert_eq!(url, url_of("sensors/greenhouse-3"), "derived, not random");
        assert_ne!(url, url_of("sensors/greenhouse-4"));
        let id = url.strip_prefix(SCHEME).unwrap();
        assert_eq!(decode_id(id).unwrap().len(), 16);
        // A client's doc: random bytes, stored as am/<id>, same URL back.
        let bytes = [7u8; 16];
        let client = encode_id(&bytes);
        let name = client_doc_name(&client);
        assert!(crate::doc::DocId::new(name.as_str()).is_ok(), "{name}");
        assert_eq!(url_of(&name), format!("automerge:{client}"));
        assert_eq!(decode_id(&client).unwrap(), bytes);
    }

    #[test]
    fn bad_ids_and_urls_say_what_is_wrong() {
        let good = encode_id(&[1u8; 16]);
        let mut flipped = good.clone().into_bytes();
        flipped[3] = if flipped[3] == b'2' { b'3' } else { b'2' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert!(matches!(
            decode_id(&flipped),
            Err(UrlError::NotBs58Check(_))
        ));
        let short = bs58::encode([1u8; 8]).with_check().into_string();
        assert!(matches!(
            decode_id(&short),
            Err(UrlError::Length { len: 8, .. })
        ));
        // A name that only looks like a client doc is hashed like any other.
        assert_ne!(id_of("am/not-an-id"), "not-an-id");
    }

    #[test]
    fn derived_ids_are_name_based_uuids_as_automerge_repo_1_requires() {
        for name in ["notes/a", "sensors/greenhouse-3", "x", "am/not-an-id"] {
            let b = decode_id(&id_of(name)).unwrap();
            assert_eq!(b[6] >> 4, 5, "{name}: version 5");
            assert_eq!(b[8] >> 6, 0b10, "{name}: RFC 4122 variant");
        }
    }
}
