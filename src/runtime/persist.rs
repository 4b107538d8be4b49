//! What local writes and remote changes share on their way to the store:
//! appending changes to the round's batch, rolling a doc back, compaction,
//! and the changed paths a patch log shows.

use std::panic::AssertUnwindSafe;

use automerge::{Automerge, ChangeHash, PatchLog};

use super::state::Inner;
use crate::doc::DocId;
use crate::doc::cache::Loaded;
use crate::doc::path::push_prop;
use crate::store::{DocMeta, WriteBatch};

/// Drops the sync states kept for a doc being deleted, and has `batch`
/// (which holds its tombstone) remove the signatures of its changes, which
/// go with it. An error is logged, not returned: what is left costs space,
/// nothing else.
pub(super) fn forget_side_data(inner: &Inner, batch: &mut WriteBatch, id: &DocId) {
    let removed = inner.store.remove_sync_states(id.as_str()).and_then(|()| {
        for hash in inner.store.sigs(id.as_str())?.into_keys() {
            batch.remove_sig(id.as_str(), &hash);
        }
        Ok(())
    });
    if let Err(e) = removed {
        tracing::debug!(doc = %id.as_str(), err = %e, "side data of a deleted doc not removed");
    }
}

/// A patch log for one change: active (Automerge records what the change
/// does, at a cost proportional to the change) only while someone is
/// subscribed to the feed, since only subscribers read changed paths.
pub(super) fn patch_log(inner: &Inner) -> PatchLog {
    PatchLog::new(inner.feed.has_subscribed())
}

/// JSON Pointers of what the changes recorded in `log` changed in `doc` (at
/// most [`crate::feed::MAX_PATHS`]; the flag says the list may be incomplete).
/// Nothing, flagged, for an inactive log (it records nothing). Computed right after the changes
/// applied, while the doc is still at the state the log describes.
pub(super) fn changed_paths(doc: &Automerge, log: &mut PatchLog) -> (Vec<String>, bool) {
    let patches = std::panic::catch_unwind(AssertUnwindSafe(|| doc.make_patches(log)));
    let Ok(patches) = patches else {
        return (vec![], true);
    };
    let mut paths = std::collections::BTreeSet::new();
    let mut truncated = false;
    for patch in patches {
        let mut pointer = String::new();
        for (_, prop) in &patch.path {
            push_prop(&mut pointer, prop);
        }
        if let Some(prop) = patch_prop(&patch.action) {
            push_prop(&mut pointer, &prop);
        }
        if paths.len() == crate::feed::MAX_PATHS && !paths.contains(&pointer) {
            truncated = true;
            break;
        }
        paths.insert(pointer);
    }
    // No paths at all: the log was inactive (nobody followed the feed when
    // the change was made; a subscriber may have arrived since) or the change
    // shows nothing. Either way the list cannot be trusted to be complete.
    let truncated = truncated || paths.is_empty();
    (paths.into_iter().collect(), truncated)
}

/// The map key or list index a patch acts on, when it names one.
pub(super) fn patch_prop(action: &automerge::PatchAction) -> Option<automerge::Prop> {
    use automerge::{PatchAction as A, Prop};
    match action {
        A::PutMap { key, .. } | A::DeleteMap { key } => Some(Prop::Map(key.clone())),
        A::PutSeq { index, .. } | A::Insert { index, .. } | A::DeleteSeq { index, .. } => {
            Some(Prop::Seq(*index))
        }
        A::Increment { prop, .. } | A::Conflict { prop } => Some(prop.clone()),
        // Text splices and marks: the path of the text is what changed.
        _ => None,
    }
}

/// Stores `changes`, just applied to the doc in memory, in `batch`: as the
/// doc's next tail entries with its meta (new heads, update time, sequence,
/// tail and size) alongside, or, when they make a compaction due (see
/// [`compaction_due`]), as the doc's compact save in their place. The
/// changes then never reach sled: a pushed 10-change doc is one snapshot
/// write, not ten inserts and ten removes. `signed`: every one of them has
/// its signature in `batch` ahead of it (the meta's `signed` stays true
/// only while that holds for every change the doc ever stored).
#[allow(clippy::too_many_arguments)]
pub(super) fn store_changes<'a>(
    inner: &Inner,
    batch: &mut WriteBatch,
    id: &DocId,
    meta: &mut DocMeta,
    loaded: &Loaded,
    now: u64,
    changes: impl IntoIterator<Item = &'a [u8]>,
    signed: bool,
) {
    meta.signed &= signed;
    meta.heads = loaded
        .doc
        .get_heads()
        .iter()
        .map(|h| h.to_string())
        .collect();
    meta.updated_at_ms = now;
    let stored_tail = meta.tail_range();
    let first = meta.next_seq;
    let changes: Vec<&[u8]> = changes.into_iter().collect();
    for bytes in &changes {
        meta.next_seq += 1;
        meta.tail_changes += 1;
        meta.size_bytes += bytes.len() as u64;
    }
    let many = changes.len() as u64 >= inner.cfg.compact_after_changes;
    if compaction_due(inner, meta) && (many || !compacts_later(inner, id, meta, loaded)) {
        let snapshot = super::compact::compact_save(&loaded.doc);
        meta.size_bytes = snapshot.len() as u64;
        meta.snapshot_bytes = meta.size_bytes;
        meta.tail_changes = 0;
        // Only what is stored goes: the new changes were never written.
        batch.compact(id.as_str(), &snapshot, meta, stored_tail);
    } else {
        // The meta carries the heads after all of them, so they are stored
        // together (see `WriteBatch::append_changes`).
        batch.append_changes(id.as_str(), first, &changes, meta);
    }
}

/// Whether a compaction due now is left to the helper thread (see
/// `compact.rs`), which is asked for it here: for a doc that is not small,
/// and whose raw changes stay within `doc.max_doc_bytes`. (The changes are
/// then appended as usual.) Not when the changes being stored are many at
/// once (a pushed or merged doc, `store.compact_after_changes` or more):
/// those go into the save in the round and are never written raw.
fn compacts_later(inner: &Inner, id: &DocId, meta: &DocMeta, loaded: &Loaded) -> bool {
    !is_small(meta)
        && meta.size_bytes <= inner.cfg.max_doc_bytes
        && inner.compactor.request(&inner.cache, id, &loaded.doc, meta)
}

/// Whether the small-doc compaction rule applies (see [`SMALL_DOC_BYTES`]).
fn is_small(meta: &DocMeta) -> bool {
    meta.size_bytes <= SMALL_DOC_BYTES && meta.next_seq <= SMALL_DOC_CHANGES
}

/// Docs stored in at most this many bytes (snapshot and tail), with at
/// most this many changes, count as small for compaction. The change bound
/// keeps the extra saves cheap and few: a save costs by the doc's ops, not
/// its bytes (a list of 2,000 small readings saves in under 16 KiB), and a
/// busy doc past it compacts by the usual rule.
const SMALL_DOC_BYTES: u64 = 16 << 10;
const SMALL_DOC_CHANGES: u64 = 256;
/// A small doc compacts once its tail holds this many changes and a
/// quarter of all its changes (or `store.compact_after_changes`, if lower):
/// at 8, 16, 24, 32, 42, 55, 73, 97, 129, 171 and 227 changes, 11 saves
/// in its first 256 (32 with the tail of 8 alone).
const SMALL_DOC_TAIL: u64 = 8;

/// Whether a doc with `meta` (counting the changes being stored) should be
/// re-saved compactly now.
///
/// A compaction rewrites the whole doc, so a doc waits until its tail is a
/// quarter of its snapshot (amortised O(1) per change; a 100,000-change doc
/// compacted every 256 changes wrote 290 MiB for 220 KiB), but never past
/// 16x `store.compact_after_changes`, which bounds load time. The tail must
/// also hold `store.compact_after_changes` changes, except in a small doc
/// (see [`SMALL_DOC_BYTES`] and [`SMALL_DOC_TAIL`]): there a save costs
/// microseconds, while ten raw one-key changes take six times the bytes
/// of the doc's save (930 against 152) and three times as long to load,
/// both for a read and for a push to a peer. Also due when the raw
/// changes alone would put the doc over its cap (a big merge from a
/// peer): what is stored then is the compact save.
fn compaction_due(inner: &Inner, meta: &DocMeta) -> bool {
    let n = inner.cfg.compact_after_changes;
    let min_tail = if is_small(meta) {
        n.min(SMALL_DOC_TAIL.max(meta.next_seq / 4))
    } else {
        n
    };
    let tail_bytes = meta.size_bytes.saturating_sub(meta.snapshot_bytes);
    let due = meta.tail_changes >= min_tail
        && (tail_bytes.saturating_mul(4) >= meta.snapshot_bytes
            || meta.tail_changes >= n.saturating_mul(16));
    due || meta.size_bytes > inner.cfg.max_doc_bytes
}

/// Undoes in memory every change after `before`: for a change refused after
/// Automerge applied it. (fork_at replays the history: slow for big docs, but
/// only on this error path.)
pub(super) fn roll_back(
    inner: &Inner,
    loaded: &mut Loaded,
    before: &[ChangeHash],
) -> Result<(), automerge::AutomergeError> {
    let mut doc = loaded.doc.fork_at(before)?;
    doc.set_actor(inner.actor.clone());
    loaded.doc = doc;
    Ok(())
}
