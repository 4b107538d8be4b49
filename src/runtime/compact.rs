//! Compaction of big docs off the writer thread.
//!
//! A compaction saves the whole doc, and for a doc with a long history
//! that takes milliseconds (most of it DEFLATE). On the writer thread every
//! write queued behind it waited: a hot doc of 10,000 changes compacted
//! every 256, on both nodes, and that was half of a stream's p99 lag
//! (BENCHMARKS.md, issue 23 at its close). Now the writer hands a clone of
//! such a doc to a helper thread, which saves it, and a later round stores
//! the save with the removal of the changes it covers, in one atomic batch,
//! keeping those that came after.
//!
//! Small docs (see `persist::compaction_due`) still compact in the round:
//! their save costs microseconds, and the changes that made it due are
//! stored only in the save. So does a doc whose raw changes would put it
//! over `doc.max_doc_bytes`.
//!
//! The doc stays in memory while its save is made (the request holds its
//! slot). The save is stored only if it still fits: the doc is loaded (its
//! meta there is the store's), live, its tail starts where it did, and it
//! holds every change the save does. Anything else (a delete, a compaction
//! in between, a failed store write, which unloads the doc) drops it, and
//! the doc compacts again when it is next due.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, mpsc};

use automerge::{Automerge, ChangeHash};

use crate::doc::DocId;
use crate::doc::cache::{DocCache, SlotRef, lock_slot};
use crate::store::{DocMeta, WriteBatch};

/// Most docs with a save asked for and not yet stored. Past it a doc
/// compacts in the round, as before: each request holds a clone of its doc,
/// and a catch-up of many big docs would otherwise queue a clone of each
/// faster than one thread saves them.
const MAX_IN_FLIGHT: usize = 4;

/// What the writer wakes itself with (see `Inner::wake`).
type Wake = Arc<dyn Fn() + Send + Sync>;

/// A doc to save: a clone as it was after change `covers - 1`, and its
/// slot, held so that the doc stays in memory until the save is stored
/// (a reload would lose Automerge's queue of changes whose dependencies
/// are missing, and with it what the save may be checked against).
struct Request {
    id: DocId,
    slot: SlotRef,
    doc: Automerge,
    at: Place,
}

/// Where in a doc's stored sequence a save was taken.
#[derive(Clone, Copy)]
struct Place {
    /// First sequence number of the tail when the save was asked for.
    tail_start: u64,
    /// The save holds every change below this sequence number.
    covers: u64,
    /// Bytes of the tail changes `tail_start..covers`.
    tail_bytes: u64,
}

/// A save made by the helper (`None` if Automerge panicked).
pub(super) struct Done {
    id: DocId,
    slot: SlotRef,
    save: Option<(Vec<u8>, Vec<ChangeHash>)>,
    at: Place,
}

/// The helper thread and what goes to and from it. Every method but the
/// helper's own loop is called on the writer thread.
#[derive(Default)]
pub(super) struct Compactor {
    /// Asked for in the round in progress: sent once its batch is stored
    /// (a save must not hold changes the store may yet refuse).
    pending: Mutex<Vec<Request>>,
    /// Docs asked for and not yet stored or dropped: one save at a time.
    busy: Mutex<HashSet<DocId>>,
    /// Saves made, for the next round.
    done: Arc<Mutex<Vec<Done>>>,
    /// To the helper; started on the first request.
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    /// The helper could not be started: compactions stay in the round.
    unavailable: std::sync::atomic::AtomicBool,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Compactor {
    /// Asks for a save of `doc` (just changed, `meta` counting those
    /// changes). False if the round must compact it itself (the helper
    /// cannot run, or has [`MAX_IN_FLIGHT`] docs already); true if the save
    /// is asked for, or one already is.
    pub(super) fn request(
        &self,
        cache: &DocCache,
        id: &DocId,
        doc: &Automerge,
        meta: &DocMeta,
    ) -> bool {
        use std::sync::atomic::Ordering;
        if self.unavailable.load(Ordering::Relaxed) {
            return false;
        }
        let Some(slot) = cache.cached(id) else {
            return false;
        };
        let mut busy = locked(&self.busy);
        if busy.contains(id) {
            return true;
        }
        if busy.len() >= MAX_IN_FLIGHT {
            return false;
        }
        busy.insert(id.clone());
        drop(busy);
        let at = Place {
            tail_start: meta.tail_range().start,
            covers: meta.next_seq,
            tail_bytes: meta.size_bytes.saturating_sub(meta.snapshot_bytes),
        };
        locked(&self.pending).push(Request {
            id: id.clone(),
            slot,
            doc: doc.clone(),
            at,
        });
        true
    }

    /// The round's batch is stored: its requests go to the helper, which
    /// wakes the writer with `wake` when a save is ready.
    pub(super) fn submit(&self, wake: Option<Wake>) {
        let pending = std::mem::take(&mut *locked(&self.pending));
        if pending.is_empty() {
            return;
        }
        let mut tx = locked(&self.tx);
        if tx.is_none() {
            *tx = self.start(wake);
        }
        let Some(sender) = tx.as_ref() else {
            // (Logged by `start`.) Their docs compact in the round from now on.
            self.release(pending.iter().map(|r| &r.id));
            return;
        };
        for r in pending {
            let id = r.id.clone();
            if sender.send(r).is_err() {
                self.release([&id]);
            }
        }
    }

    /// The round's batch was not stored: its requests are dropped.
    pub(super) fn discard(&self) {
        let pending = std::mem::take(&mut *locked(&self.pending));
        self.release(pending.iter().map(|r| &r.id));
    }

    /// The saves the helper made since the last call. Each is done with as
    /// far as this compactor goes: the doc may be asked for again.
    pub(super) fn take_done(&self) -> Vec<Done> {
        let done = std::mem::take(&mut *locked(&self.done));
        self.release(done.iter().map(|d| &d.id));
        done
    }

    /// `ids` may be asked for again.
    fn release<'a>(&self, ids: impl IntoIterator<Item = &'a DocId>) {
        let mut busy = locked(&self.busy);
        for id in ids {
            busy.remove(id);
        }
    }

    fn start(&self, wake: Option<Wake>) -> Option<mpsc::Sender<Request>> {
        let (tx, rx) = mpsc::channel::<Request>();
        let done = self.done.clone();
        let started = std::thread::Builder::new()
            .name("mergeflow-compact".into())
            .spawn(move || {
                for r in rx {
                    let doc = std::panic::AssertUnwindSafe(&r.doc);
                    let save =
                        std::panic::catch_unwind(|| (compact_save(&doc), doc.get_heads())).ok();
                    locked(&done).push(Done {
                        id: r.id,
                        slot: r.slot,
                        save,
                        at: r.at,
                    });
                    if let Some(wake) = &wake {
                        wake();
                    }
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(err = %e, "cannot start the compaction thread; docs compact on the writer thread");
                self.unavailable
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
        }
    }
}

/// A doc's save for the store: without the changes Automerge holds back
/// until their dependencies arrive (kept by default). Those were never
/// stored as changes either; a save holding one would, once the missing
/// dependency came, load with heads its meta does not name. Sync brings
/// them again.
pub(super) fn compact_save(doc: &Automerge) -> Vec<u8> {
    doc.save_with_options(automerge::SaveOptions {
        retain_orphans: false,
        ..Default::default()
    })
}

impl Done {
    /// Adds this save to `batch`, with the removal of the tail changes it
    /// covers, if it still fits (see the module docs). Returns the doc's
    /// slot, to be kept until `batch` is stored, as every slot a round
    /// changes (a reload in between would read the old meta).
    pub(super) fn store(self, batch: &mut WriteBatch, cache: &DocCache) -> Option<SlotRef> {
        let (save, heads) = self.save?;
        let slot = self.slot;
        let mut guard = lock_slot(&slot);
        let loaded = guard.as_mut()?;
        let meta = loaded.meta.as_mut()?;
        let fits = meta.deleted_at_ms.is_none()
            && meta.tail_range().start == self.at.tail_start
            && meta.next_seq >= self.at.covers
            && heads
                .iter()
                .all(|h| loaded.doc.get_change_meta_by_hash(h).is_some());
        if !fits {
            return None;
        }
        let tail_bytes = meta.size_bytes.saturating_sub(meta.snapshot_bytes);
        let kept_bytes = tail_bytes.saturating_sub(self.at.tail_bytes);
        meta.snapshot_bytes = save.len() as u64;
        meta.size_bytes = meta.snapshot_bytes + kept_bytes;
        meta.tail_changes = meta.next_seq - self.at.covers;
        let covered = self.at.tail_start..self.at.covers;
        batch.compact_covered(self.id.as_str(), &save, meta, covered);
        cache.note_size(&self.id, loaded);
        drop(guard);
        Some(slot)
    }
}
