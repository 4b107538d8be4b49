//! Key encoding of the trees (see the layout in `store/mod.rs`) and the
//! meta tree's fixed keys.

use super::records::DocMeta;

pub(super) const META_SCHEMA: &[u8] = b"schema_version";
pub(super) const META_IDENTITY: &[u8] = b"identity";
pub(super) const META_BOOTS: &[u8] = b"boots";

pub(super) fn encode_meta(meta: &DocMeta) -> Vec<u8> {
    serde_json::to_vec(meta).expect("DocMeta serializes")
}

pub(super) fn decode_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

pub(super) fn meta_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(b'm');
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn snapshot_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 2);
    k.push(b's');
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

pub(super) fn change_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 10);
    k.push(b'c');
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

/// Prefix of doc `id`'s change signatures.
pub(super) fn sig_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 34);
    k.push(b'g');
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

/// Key of the signature of change `hash` of doc `id`.
pub(super) fn sig_key(id: &str, hash: &[u8; 32]) -> Vec<u8> {
    let mut k = sig_prefix(id);
    k.extend_from_slice(hash);
    k
}

/// Key of the sync state we share with `peer` for doc `id`.
pub(super) fn sync_state_key(id: &str, peer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + peer.len() + 2);
    k.push(b'p');
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k.extend_from_slice(peer.as_bytes());
    k
}

pub(super) fn change_key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = change_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
