//! The document cache: documents loaded from the store on demand, each in a
//! slot with its own lock, bounded by count and stored bytes (least recently
//! used idle docs are evicted), and loading stored bytes with Automerge's
//! panics contained to the document.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::{ActorId, Automerge, Change as AmChange, LoadOptions, TextEncoding};

use super::{DocError, DocId};
use crate::store::{DocMeta, Store};

pub type SlotRef = Arc<Mutex<Option<Loaded>>>;

/// Loaded documents, bounded by count and by stored bytes. Only entries nobody
/// holds are evicted, least recently used first; an evicted doc is reloaded
/// from the store on next use.
#[derive(Default)]
struct Cache {
    map: HashMap<DocId, CacheEntry>,
    tick: u64,
    bytes: u64,
    /// How far over its low-water mark the last eviction left the cache,
    /// because slots in use (a writer round's docs) cannot go: the next
    /// scan waits for that much more on top of the bound.
    stuck_docs: usize,
    stuck_bytes: u64,
    /// The most docs the cache has held at once.
    peak_docs: usize,
}

struct CacheEntry {
    slot: SlotRef,
    used: u64,
    bytes: u64,
}

impl Cache {
    /// Once over a bound, evicts down to 90% of it: the scan and sort of
    /// every entry then happen once per tenth of the cache's misses, not on
    /// each (a node reading 10,000 docs through a 1,024-doc cache spent a
    /// third of its CPU here).
    fn evict(&mut self, max_docs: usize, max_bytes: u64) {
        if self.map.len() <= max_docs + self.stuck_docs
            && self.bytes <= max_bytes.saturating_add(self.stuck_bytes)
        {
            return;
        }
        let (low_docs, low_bytes) = (max_docs - max_docs / 10, max_bytes - max_bytes / 10);
        let mut idle: Vec<(u64, DocId)> = self
            .map
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.slot) == 1)
            .map(|(id, e)| (e.used, id.clone()))
            .collect();
        idle.sort_unstable();
        for (_, id) in idle {
            if self.map.len() <= low_docs && self.bytes <= low_bytes {
                break;
            }
            if let Some(e) = self.map.remove(&id) {
                self.bytes -= e.bytes;
            }
        }
        // Slots in use kept it over the mark: without this, every miss
        // until they are released would scan and sort the whole cache.
        self.stuck_docs = self.map.len().saturating_sub(low_docs);
        self.stuck_bytes = self.bytes.saturating_sub(low_bytes);
    }
}

/// A document in memory. `meta` is `None` when the document does not exist.
pub struct Loaded {
    pub doc: Automerge,
    pub meta: Option<DocMeta>,
    /// The idempotency keys in the doc's history, read on demand.
    pub idem: super::stamp::IdemIndex,
}

/// Locks a cache slot. After a panic while it was locked, the doc's memory state
/// is suspect: it is dropped and reloaded from the store.
pub fn lock_slot(slot: &SlotRef) -> MutexGuard<'_, Option<Loaded>> {
    match slot.lock() {
        Ok(g) => g,
        Err(poisoned) => {
            slot.clear_poison();
            let mut g = poisoned.into_inner();
            *g = None;
            g
        }
    }
}

/// The documents in memory, loaded on demand from the store and bounded by
/// count and by stored bytes. Each doc has a slot with its own lock; the
/// writer thread and readers take a doc's slot, load it if needed, and work
/// under its lock.
pub struct DocCache {
    store: Store,
    actor: ActorId,
    max_docs: usize,
    max_bytes: u64,
    map: Mutex<Cache>,
}

impl DocCache {
    /// An empty cache over `store`, loading docs to write with `actor`, holding
    /// at most `max_docs` docs and `max_bytes` stored bytes (idle docs are
    /// evicted past either).
    pub fn new(store: Store, actor: ActorId, max_docs: usize, max_bytes: u64) -> DocCache {
        DocCache {
            store,
            actor,
            max_docs,
            max_bytes,
            map: Mutex::new(Cache::default()),
        }
    }

    /// The cache slot of `id`, evicting cold unused documents past the cap.
    pub fn entry(&self, id: &DocId) -> SlotRef {
        let mut cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        cache.tick += 1;
        let tick = cache.tick;
        if let Some(e) = cache.map.get_mut(id) {
            e.used = tick;
            return e.slot.clone();
        }
        let slot = Arc::new(Mutex::new(None));
        let entry = CacheEntry {
            slot: slot.clone(),
            used: tick,
            bytes: 0,
        };
        cache.map.insert(id.clone(), entry);
        cache.peak_docs = cache.peak_docs.max(cache.map.len());
        cache.evict(self.max_docs, self.max_bytes);
        slot
    }

    /// The cache slot of `id`, if it has one (without creating one).
    pub fn cached(&self, id: &DocId) -> Option<SlotRef> {
        let cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        cache.map.get(id).map(|e| e.slot.clone())
    }

    /// Doc `id` as one Automerge save: what a peer or a backup loads.
    /// `None` if it does not exist or was deleted.
    ///
    /// A doc in memory may be ahead of the store (changes of a round not yet
    /// stored): it is saved from memory. Otherwise its stored snapshot and
    /// change tail are already a save, and no Automerge work is done. If the
    /// writer compacts the doc between the reads of its meta and its data,
    /// the store reports the tail as inconsistent: the doc is then loaded
    /// and saved under its lock.
    pub fn saved_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, DocError> {
        let from_memory = |slot: &SlotRef| -> Result<Option<Option<Vec<u8>>>, DocError> {
            let guard = lock_slot(slot);
            let Some(loaded) = guard.as_ref() else {
                return Ok(None);
            };
            if loaded
                .meta
                .as_ref()
                .is_none_or(|m| m.deleted_at_ms.is_some())
            {
                return Ok(Some(None));
            }
            std::panic::catch_unwind(AssertUnwindSafe(|| loaded.doc.save()))
                .map(|save| Some(Some(save)))
                .map_err(|_| DocError::Internal(format!("automerge panicked saving {id:?}")))
        };
        if let Some(slot) = self.cached(id)
            && let Some(save) = from_memory(&slot)?
        {
            return Ok(save);
        }
        let Some(meta) = self.store.doc_meta(id.as_str())? else {
            return Ok(None);
        };
        if meta.deleted_at_ms.is_some() {
            return Ok(None);
        }
        if let Ok(data) = self.store.doc_data(id.as_str(), &meta) {
            let mut out = data.snapshot;
            for change in data.changes {
                out.extend_from_slice(&change);
            }
            return Ok(Some(out));
        }
        let slot = self.entry(id);
        let mut guard = lock_slot(&slot);
        self.ensure_loaded(id, &mut guard)?;
        drop(guard);
        Ok(from_memory(&slot)?.flatten())
    }

    /// Records the stored size of a loaded doc, for the cache's byte bound.
    pub fn note_size(&self, id: &DocId, loaded: &Loaded) {
        let bytes = loaded.meta.as_ref().map_or(0, |m| m.size_bytes);
        let mut cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = cache.map.get_mut(id) else {
            return;
        };
        let old = std::mem::replace(&mut e.bytes, bytes);
        cache.bytes = cache.bytes - old + bytes;
        cache.evict(self.max_docs, self.max_bytes);
    }

    /// Evicts idle docs down to the bounds now, however far over them slots
    /// in use had left the cache: the writer calls it after each round, once
    /// the round's docs are released.
    pub fn trim(&self) {
        let mut cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        cache.stuck_docs = 0;
        cache.stuck_bytes = 0;
        cache.evict(self.max_docs, self.max_bytes);
    }

    /// Docs in the cache and their stored bytes.
    pub fn usage(&self) -> (usize, u64) {
        let cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        (cache.map.len(), cache.bytes)
    }

    /// The most docs the cache has held at once since it was made (slots
    /// in use can hold it over its bound).
    pub fn peak_docs(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).peak_docs
    }

    /// True if `id` is in the cache and loaded (a slot being used counts as loaded).
    pub fn is_loaded(&self, id: &DocId) -> bool {
        let cache = self.map.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .map
            .get(id)
            .is_some_and(|e| e.slot.try_lock().map_or(true, |g| g.is_some()))
    }

    /// The loaded doc in `slot`, loading it from the store first if needed.
    pub fn ensure_loaded<'a>(
        &self,
        id: &DocId,
        slot: &'a mut Option<Loaded>,
    ) -> Result<&'a mut Loaded, DocError> {
        if slot.is_none() {
            *slot = Some(self.load(id)?);
        }
        Ok(slot.as_mut().expect("loaded above"))
    }

    pub fn load(&self, id: &DocId) -> Result<Loaded, DocError> {
        let Some(meta) = self.store.doc_meta(id.as_str())? else {
            return Ok(Loaded {
                doc: new_doc(&self.actor),
                meta: None,
                idem: Default::default(),
            });
        };
        if meta.deleted_at_ms.is_some() {
            return Ok(Loaded {
                doc: new_doc(&self.actor),
                meta: Some(meta),
                idem: Default::default(),
            });
        }
        let data = self.store.doc_data(id.as_str(), &meta)?;
        let corrupt = |reason: String| DocError::Corrupt {
            id: id.to_string(),
            reason,
        };
        // Stored bytes are ours, but a damaged disk makes them outside input:
        // Automerge may panic on them, so contain that to this document.
        let doc = load_stored_contained(&data.snapshot, data.changes, &meta.heads)
            .map(|doc| doc.with_actor(self.actor.clone()))
            .map_err(corrupt)?;
        Ok(Loaded {
            doc,
            meta: Some(meta),
            idem: Default::default(),
        })
    }
}

pub fn live_meta<'a>(id: &DocId, loaded: &'a Loaded) -> Result<&'a DocMeta, DocError> {
    live(id, loaded.meta.as_ref())
}

/// `meta` if it is a live doc's: [`DocError::NotFound`] for none,
/// [`DocError::Deleted`] for a tombstone.
pub fn live<'a>(id: &DocId, meta: Option<&'a DocMeta>) -> Result<&'a DocMeta, DocError> {
    match meta {
        None => Err(DocError::NotFound(id.to_string())),
        Some(m) if m.deleted_at_ms.is_some() => Err(DocError::Deleted(id.to_string())),
        Some(m) => Ok(m),
    }
}

/// Loads a stored document: its snapshot (empty: none) and the changes
/// stored after it, which must lead to `heads` (hex; the doc's metadata).
/// The caller contains panics (a damaged disk makes these bytes outside
/// input); `crate::fuzzing::stored_doc` feeds it anything.
///
/// # Errors
/// What does not load or apply, or heads that differ from `heads`.
pub fn load_stored(
    snapshot: &[u8],
    changes: Vec<Vec<u8>>,
    heads: &[String],
) -> Result<Automerge, String> {
    let mut doc = if snapshot.is_empty() {
        Automerge::new_with_encoding(TextEncoding::UnicodeCodePoint)
    } else {
        let opts = LoadOptions::new().text_encoding(TextEncoding::UnicodeCodePoint);
        Automerge::load_with_options(snapshot, opts).map_err(|e| format!("snapshot: {e}"))?
    };
    let changes = changes
        .into_iter()
        .map(AmChange::from_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("change: {e}"))?;
    doc.apply_changes(changes)
        .map_err(|e| format!("applying changes: {e}"))?;
    // Automerge quietly holds back changes whose dependencies are missing;
    // the recorded heads tell whether everything applied.
    let mut got: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
    let mut want = heads.to_vec();
    got.sort();
    want.sort();
    if got != want {
        return Err(format!(
            "the stored changes lead to heads {got:?}, but the doc's metadata records {want:?}"
        ));
    }
    Ok(doc)
}

/// [`load_stored`] with a panic in Automerge turned into an error: what the
/// store's loader runs, so damaged bytes cost their document, not the node.
///
/// # Errors
/// As [`load_stored`], and "automerge panicked while loading".
pub fn load_stored_contained(
    snapshot: &[u8],
    changes: Vec<Vec<u8>>,
    heads: &[String],
) -> Result<Automerge, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| load_stored(snapshot, changes, heads)))
        .map_err(|_| "automerge panicked while loading".to_string())?
}

pub fn new_doc(actor: &ActorId) -> Automerge {
    Automerge::new_with_encoding(TextEncoding::UnicodeCodePoint).with_actor(actor.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots in use hold the cache over its bound; it then scans again only
    /// once a tenth more has come on top, and gets back under the bound once
    /// they are released.
    #[test]
    fn slots_in_use_do_not_make_every_miss_scan() {
        let mut cache = Cache::default();
        let mut held = Vec::new();
        let add = |cache: &mut Cache, i: usize| {
            cache.tick += 1;
            let slot: SlotRef = Arc::new(Mutex::new(None));
            let entry = CacheEntry {
                slot: slot.clone(),
                used: cache.tick,
                bytes: 0,
            };
            cache
                .map
                .insert(DocId::new(format!("d/{i}")).unwrap(), entry);
            cache.evict(10, u64::MAX);
            slot
        };
        for i in 0..12 {
            held.push(add(&mut cache, i));
        }
        // All in use: none could go (9 is the low-water mark). The scan at
        // the 11th left it 2 over; the 12th did not scan again (a scan
        // would have said 3).
        assert_eq!((cache.map.len(), cache.stuck_docs), (12, 2));
        held.clear();
        // Released: the next miss past 10 + 2 scans, and gets under.
        drop(add(&mut cache, 12));
        assert_eq!((cache.map.len(), cache.stuck_docs), (9, 0));
    }

    /// Once the slots a round held are released, `trim` brings the cache
    /// under its bound at once: without it, a node that went idle after a
    /// catch-up kept every doc its last rounds had held, since only a miss
    /// evicts.
    #[test]
    fn trim_brings_the_cache_back_under_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let cache = DocCache::new(store, ActorId::random(), 10, u64::MAX);
        let held: Vec<SlotRef> = (0..100)
            .map(|i| cache.entry(&DocId::new(format!("d/{i}")).unwrap()))
            .collect();
        assert_eq!(cache.usage().0, 100, "all in use: none evicted");
        drop(held);
        assert_eq!(cache.usage().0, 100, "released, but no miss since");
        cache.trim();
        assert_eq!(cache.usage().0, 9, "down to the low-water mark");
        cache.trim();
        assert_eq!(cache.usage().0, 9, "under the bound: nothing to do");
        assert_eq!(cache.peak_docs(), 100);
    }
}
