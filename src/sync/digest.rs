//! Anti-entropy digests: a fixed number of buckets, each the XOR of
//! `h(doc id, heads)` over the docs that hash into it.
//!
//! Two nodes holding the same docs at the same heads have equal bucket arrays,
//! so in-sync peers exchange only `buckets * 8` bytes; a difference narrows the
//! search to the differing buckets, then to the differing docs. XOR makes the
//! digest order-free and lets a heads change update it in O(1).

use std::collections::BTreeMap;

use automerge::ChangeHash;
use sha2::{Digest as _, Sha256};

/// What a doc contributes to the digest: its live heads, or its tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocState {
    /// A live doc at these heads.
    Live(Vec<ChangeHash>),
    /// A deleted doc. Tombstones sync too, so they are in the digest.
    Deleted,
}

/// A stable 64-bit hash of a doc's id and state, the same on every node.
pub fn entry_hash(doc: &str, state: &DocState) -> u64 {
    let mut h = Sha256::new();
    h.update(doc.as_bytes());
    h.update([0u8]);
    match state {
        DocState::Live(heads) => {
            let mut heads = heads.clone();
            heads.sort();
            for head in heads {
                h.update(head.0);
            }
        }
        DocState::Deleted => h.update(b"\xffdeleted"),
    }
    let out = h.finalize();
    u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
}

/// The bucket a doc id falls in.
pub fn bucket_of(doc: &str, buckets: u32) -> u32 {
    let out = Sha256::digest(doc.as_bytes());
    (u32::from_le_bytes(out[..4].try_into().expect("4 bytes"))) % buckets.max(1)
}

/// A node's digest, kept up to date as docs change.
#[derive(Debug, Clone)]
pub struct Digest {
    buckets: Vec<u64>,
    /// Entry hashes by bucket, then by doc id: answering a bucket costs only
    /// that bucket's docs.
    entries: Vec<BTreeMap<String, u64>>,
    len: usize,
}

impl Digest {
    /// An empty digest with `buckets` buckets.
    pub fn new(buckets: u32) -> Digest {
        let n = buckets.max(1) as usize;
        Digest {
            buckets: vec![0; n],
            entries: vec![BTreeMap::new(); n],
            len: 0,
        }
    }

    /// Records `doc`'s current state; returns false if it was already recorded so.
    pub fn set(&mut self, doc: &str, state: &DocState) -> bool {
        let new = entry_hash(doc, state);
        let bucket = bucket_of(doc, self.buckets.len() as u32) as usize;
        match self.entries[bucket].get_mut(doc) {
            Some(old) if *old == new => false,
            Some(old) => {
                self.buckets[bucket] ^= *old ^ new;
                *old = new;
                true
            }
            None => {
                self.entries[bucket].insert(doc.to_string(), new);
                self.buckets[bucket] ^= new;
                self.len += 1;
                true
            }
        }
    }

    /// The bucket hashes.
    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }

    /// The bucket hashes over the docs `keep` accepts only (a digest
    /// compared with a peer that holds some docs only).
    pub fn buckets_where(&self, keep: impl Fn(&str) -> bool) -> Vec<u64> {
        self.entries
            .iter()
            .map(|bucket| {
                bucket
                    .iter()
                    .filter(|(doc, _)| keep(doc))
                    .fold(0, |acc, (_, h)| acc ^ h)
            })
            .collect()
    }

    /// Indexes of buckets that differ from `theirs` (all, if the sizes differ).
    pub fn differing(&self, theirs: &[u64]) -> Vec<u32> {
        differing(&self.buckets, theirs)
    }

    /// The docs in `bucket` with their entry hashes, sorted by id.
    pub fn bucket_entries(&self, bucket: u32) -> Vec<(String, u64)> {
        self.entries
            .get(bucket as usize)
            .map(|e| e.iter().map(|(d, h)| (d.clone(), *h)).collect())
            .unwrap_or_default()
    }

    /// The entry hash recorded for `doc`.
    pub fn entry(&self, doc: &str) -> Option<u64> {
        let bucket = bucket_of(doc, self.buckets.len() as u32) as usize;
        self.entries[bucket].get(doc).copied()
    }

    /// Number of docs recorded.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no doc is recorded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One hash of the whole digest, hex: equal on two nodes exactly when
    /// their buckets are (for practical purposes, when they hold the same docs
    /// at the same heads). Scripts compare it to tell convergence.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for b in &self.buckets {
            h.update(b.to_le_bytes());
        }
        let out = h.finalize();
        out[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Indexes of the buckets where `ours` and `theirs` differ (all, if their
/// sizes do).
pub fn differing(ours: &[u64], theirs: &[u64]) -> Vec<u32> {
    if theirs.len() != ours.len() {
        return (0..ours.len() as u32).collect();
    }
    (0..ours.len())
        .filter(|&i| ours[i] != theirs[i])
        .map(|i| i as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> ChangeHash {
        ChangeHash([b; 32])
    }

    #[test]
    fn equal_sets_have_equal_digests_in_any_order() {
        let mut a = Digest::new(16);
        let mut b = Digest::new(16);
        for i in 0..100u8 {
            a.set(&format!("doc/{i}"), &DocState::Live(vec![h(i), h(i + 1)]));
        }
        for i in (0..100u8).rev() {
            b.set(&format!("doc/{i}"), &DocState::Live(vec![h(i + 1), h(i)]));
        }
        assert_eq!(a.buckets(), b.buckets());
        assert!(a.differing(b.buckets()).is_empty());
    }

    #[test]
    fn one_change_shows_in_exactly_one_bucket() {
        let mut a = Digest::new(16);
        for i in 0..50u8 {
            a.set(&format!("d{i}"), &DocState::Live(vec![h(i)]));
        }
        let before = a.buckets().to_vec();
        assert!(a.set("d7", &DocState::Live(vec![h(200)])));
        assert!(!a.set("d7", &DocState::Live(vec![h(200)])));
        let diff = a.differing(&before);
        assert_eq!(diff, vec![bucket_of("d7", 16)]);
        let entries = a.bucket_entries(diff[0]);
        assert!(entries.iter().any(|(d, _)| d == "d7"));
        // Back to the old state: the digest is back too.
        a.set("d7", &DocState::Live(vec![h(7)]));
        assert_eq!(a.buckets(), &before[..]);
    }

    #[test]
    fn tombstones_differ_from_live_docs() {
        assert_ne!(
            entry_hash("a", &DocState::Deleted),
            entry_hash("a", &DocState::Live(vec![]))
        );
    }
}
