//! What a doc pushed whole to a peer is made of (`DocAccess::doc_bytes`):
//! its stored save as it is, when it has one and nothing since, or a save
//! of the doc in memory; and the signatures of all its changes.

use super::sigs::SigBook;
use super::state::Inner;
use crate::doc::DocId;
use crate::doc::cache::Loaded;

/// A doc to push as it is stored, with no Automerge load or save: one not
/// in memory (else memory may be ahead of the store, with changes of this
/// round), stored as a save with no tail, whose every change has its
/// signature stored (the meta's `signed`). `None` for any other, which goes
/// the long way.
///
/// The signatures go as stored. One left by a crash between a change's
/// signature and the change has no change in the save; the receiver takes
/// the signatures of the changes it gets and passes over the rest.
pub(super) fn stored_save(inner: &Inner, doc: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    use crate::trust::{SIG_ENTRY_LEN, TOMBSTONE_HASH, push_entry};
    let id = DocId::new(doc).ok()?;
    if inner.cache.is_loaded(&id) {
        return None;
    }
    let meta = inner.store.doc_meta(doc).ok()??;
    if !meta.signed
        || meta.deleted_at_ms.is_some()
        || meta.tail_changes != 0
        || meta.snapshot_bytes == 0
    {
        return None;
    }
    // No tail (checked above): the snapshot alone (`doc_data` checks the
    // meta's count against what is stored).
    let data = inner.store.doc_data(doc, &meta).ok()?;
    if data.snapshot.is_empty() {
        return None;
    }
    let stored = inner.store.sigs(doc).ok()?;
    let mut sigs = Vec::with_capacity(stored.len() * SIG_ENTRY_LEN);
    for (hash, sig) in stored.iter().filter(|(h, _)| **h != TOMBSTONE_HASH) {
        push_entry(&mut sigs, hash, sig);
    }
    Some((data.snapshot, sigs))
}

/// A compact save of the doc as it is in memory and its change hashes, or
/// `None` if it does not exist or was deleted. A doc stored as a snapshot
/// and a tail of changes would go as that, and a change sent alone costs
/// several times its share of a save (a catch-up of 10,000 small docs is
/// mostly such tails).
pub(super) fn save_of(loaded: &Loaded) -> Option<(Vec<u8>, Vec<[u8; 32]>)> {
    let live = loaded
        .meta
        .as_ref()
        .is_some_and(|m| m.deleted_at_ms.is_none());
    live.then(|| {
        let hashes = loaded
            .doc
            .get_changes_meta(&[])
            .iter()
            .map(|c| c.hash.0)
            .collect();
        (loaded.doc.save(), hashes)
    })
}

/// The signatures of `doc`'s changes `hashes`, as a push carries them: one
/// scan of the stored ones, and `sig_of` only for those missing.
pub(super) fn sigs_of(
    inner: &Inner,
    book: &mut SigBook,
    doc: &str,
    hashes: &[[u8; 32]],
) -> Option<Vec<u8>> {
    let stored = inner.store.sigs(doc).ok()?;
    let mut sigs = Vec::with_capacity(hashes.len() * crate::trust::SIG_ENTRY_LEN);
    for h in hashes {
        let sig = match stored.get(h) {
            Some(s) => Some(s.clone()),
            None => book.sig_of(inner, doc, h),
        };
        if let Some(sig) = sig {
            crate::trust::push_entry(&mut sigs, h, &sig);
        }
    }
    Some(sigs)
}
