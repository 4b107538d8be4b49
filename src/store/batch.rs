//! [`WriteBatch`]: document writes applied together, ordered for crash safety.

use std::ops::Range;

use super::keys::{change_key, encode_meta, meta_key, sig_key, snapshot_key};
use super::records::DocMeta;

/// Document writes to apply together with [`Store::apply`].
///
/// A document's change tail is always the contiguous sequence range
/// `next_seq - tail_changes .. next_seq`, and only that range is read
/// ([`Store::doc_data`]), so compaction and deletion name the keys to remove
/// without reading the tree, and a removal also cancels an insert of the same
/// key earlier in the batch.
///
/// # Crash safety without a sled batch per round
///
/// An appended change is two plain inserts: the change under `next_seq`, then
/// the meta that counts it (several changes of one doc appended together are
/// one atomic batch instead, since their meta names the heads after all).
/// sled recovers a prefix of its log, so after a crash a doc has either both
/// (the change is there) or at most the change without the meta: a key at the old `next_seq` that nothing reads and the
/// next append overwrites. Compaction and deletion, which replace several keys
/// at once, are atomic sled batches. (sled's `apply_batch` writes and syncs
/// its log buffer twice on every call, flush or not, through its I/O thread
/// pool; for a small append that was most of the CPU a receiving node spent.)
#[derive(Default)]
pub struct WriteBatch {
    pub(super) ops: Vec<BatchOp>,
    keys: usize,
}

pub(super) enum BatchOp {
    /// One plain insert (a change's signature, before the change).
    Insert((Vec<u8>, Vec<u8>)),
    /// Insert the change, then the meta.
    Append {
        change: (Vec<u8>, Vec<u8>),
        meta: (Vec<u8>, Vec<u8>),
    },
    /// Applied as one sled batch.
    Atomic(sled::Batch),
}

impl WriteBatch {
    /// Appends change `seq` of doc `id` and its new meta.
    pub fn append_change(&mut self, id: &str, seq: u64, change: &[u8], meta: &DocMeta) {
        self.append_changes(id, seq, &[change], meta);
    }

    /// Appends `changes` to doc `id` as sequence numbers `first..` and its
    /// meta after all of them. One change is two plain inserts (see above);
    /// several are one atomic batch, because the meta's heads are those
    /// after the last: a meta that counted only some of them would name
    /// heads its tail cannot produce.
    pub fn append_changes(&mut self, id: &str, first: u64, changes: &[&[u8]], meta: &DocMeta) {
        match changes {
            [] => {}
            [change] => {
                self.ops.push(BatchOp::Append {
                    change: (change_key(id, first), change.to_vec()),
                    meta: (meta_key(id), encode_meta(meta)),
                });
                self.keys += 2;
            }
            _ => {
                let b = self.atomic();
                for (seq, change) in (first..).zip(changes) {
                    b.insert(change_key(id, seq), *change);
                }
                b.insert(meta_key(id), encode_meta(meta));
                self.keys += changes.len() + 1;
            }
        }
    }

    /// Stores the signature of change `hash` of doc `id`. Added before the
    /// change's append, it is in the store whenever the change is.
    pub fn put_sig(&mut self, id: &str, hash: &[u8; 32], sig: &[u8]) {
        self.ops
            .push(BatchOp::Insert((sig_key(id, hash), sig.to_vec())));
        self.keys += 1;
    }

    /// Removes the signature of change `hash` of doc `id`.
    pub fn remove_sig(&mut self, id: &str, hash: &[u8; 32]) {
        self.atomic().remove(sig_key(id, hash));
        self.keys += 1;
    }

    /// An atomic batch at the end of the ops, to add to.
    fn atomic(&mut self) -> &mut sled::Batch {
        if !matches!(self.ops.last(), Some(BatchOp::Atomic(_))) {
            self.ops.push(BatchOp::Atomic(sled::Batch::default()));
        }
        match self.ops.last_mut() {
            Some(BatchOp::Atomic(b)) => b,
            _ => unreachable!("an atomic batch was just pushed"),
        }
    }

    /// Replaces doc `id`'s snapshot (which must include every change in `tail`)
    /// and removes the changes in `tail` (and a change left at `tail.end` by
    /// a crash during an append, which no later append would overwrite once
    /// `meta` moves `next_seq` past it), atomically.
    pub fn compact(&mut self, id: &str, snapshot: &[u8], meta: &DocMeta, tail: Range<u64>) {
        self.compact_covered(id, snapshot, meta, tail.start..tail.end + 1);
    }

    /// Replaces doc `id`'s snapshot with one that includes every change in
    /// `covered` and removes those changes, atomically; the changes after
    /// them stay, as the tail `meta` counts (a save made off the writer
    /// thread, while more changes came).
    pub fn compact_covered(
        &mut self,
        id: &str,
        snapshot: &[u8],
        meta: &DocMeta,
        covered: Range<u64>,
    ) {
        let n = covered.end - covered.start;
        let b = self.atomic();
        for seq in covered {
            b.remove(change_key(id, seq));
        }
        b.insert(snapshot_key(id), snapshot);
        b.insert(meta_key(id), encode_meta(meta));
        self.keys += n as usize + 2;
    }

    /// Removes doc `id`'s snapshot and the changes in `tail` (and a change left
    /// at `tail.end` by a crash during an append), leaving `meta` (with
    /// `deleted_at_ms` set) as its tombstone, atomically.
    pub fn tombstone(&mut self, id: &str, meta: &DocMeta, tail: Range<u64>) {
        let n = tail.end - tail.start + 1;
        let b = self.atomic();
        for seq in tail.start..=tail.end {
            b.remove(change_key(id, seq));
        }
        b.remove(snapshot_key(id));
        b.insert(meta_key(id), encode_meta(meta));
        self.keys += n as usize + 2;
    }

    /// True if nothing was added.
    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }

    /// Number of keys inserted or removed so far.
    pub fn len(&self) -> usize {
        self.keys
    }
}
