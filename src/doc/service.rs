//! The document service: loads documents on demand into a bounded cache, applies
//! writes as Automerge changes, appends them to the store and acknowledges them
//! after a group-commit flush.
//!
//! # When is a write durable?
//!
//! 1. Under the document's lock (on a blocking thread): the change is applied to
//!    the in-memory doc and appended to sled with the doc's new meta in one atomic
//!    batch. Readers may see it from here on.
//! 2. The lock is released and the writer waits for a [`GroupCommit::flush`]
//!    that starts after step 1. Concurrent writers (to any docs) share flushes.
//! 3. Only then does [`Docs`] return `Ok`: the change survives a process kill.
//!
//! If a step fails before the append, the in-memory doc is thrown away and
//! reloaded from the store on next use, so memory never holds a change the store
//! lacks (other than between steps 1 and 2).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    ActorId, Automerge, AutomergeError, Change as AmChange, LoadOptions, ObjType, ROOT, ReadDoc,
    TextEncoding,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::json::{Slot, StringMode, to_json, value_to_json, write_json};
use super::ops::{Op, apply_ops};
use super::patch::apply_merge_patch;
use super::path::{Pointer, prop_for, resolve_obj};
use super::{DocError, DocId};
use crate::store::{DocMeta, GroupCommit, Store};

/// Limits and choices of the document service.
#[derive(Debug, Clone)]
pub struct DocsConfig {
    /// How JSON strings are stored.
    pub strings: StringMode,
    /// Largest encoded change accepted, in bytes.
    pub max_change_bytes: u64,
    /// Largest stored document (snapshot plus tail), in bytes.
    pub max_doc_bytes: u64,
    /// Compact a document when its tail reaches this many changes.
    pub compact_after_changes: u64,
    /// Documents kept loaded in memory; colder ones are evicted.
    pub cache_docs: usize,
}

impl Default for DocsConfig {
    fn default() -> Self {
        DocsConfig {
            strings: StringMode::Scalar,
            max_change_bytes: 1 << 20,
            max_doc_bytes: 64 << 20,
            compact_after_changes: 256,
            cache_docs: 1024,
        }
    }
}

/// The outcome of a durable write.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WriteResult {
    /// The document.
    pub id: DocId,
    /// Heads after the write (hex change hashes).
    pub heads: Vec<String>,
    /// False when the write changed nothing (e.g. a patch equal to the state).
    pub changed: bool,
}

/// A document in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DocInfo {
    /// The document.
    pub id: String,
    /// Current heads.
    pub heads: Vec<String>,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Unix milliseconds of the last change.
    pub updated_at: u64,
}

/// One change in a document's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    /// Change hash (hex).
    pub hash: String,
    /// Automerge actor id (hex).
    pub actor: String,
    /// Peer id of the node whose boot used that actor, if this node knows it.
    pub peer_id: Option<String>,
    /// Sequence number of the change for its actor.
    pub seq: u64,
    /// Unix seconds, as stamped by the writer.
    pub time: i64,
    /// Commit message.
    pub message: Option<String>,
    /// Hashes of the changes this one depends on.
    pub deps: Vec<String>,
}

/// What a write does inside its transaction.
pub enum Change {
    /// An RFC 7396 merge patch.
    Patch(Json),
    /// Explicit ops, all or nothing.
    Ops(Vec<Op>),
    /// A closure over the Automerge transaction (library users).
    Closure(Box<dyn FnOnce(&mut Transaction<'_>) -> Result<(), AutomergeError> + Send>),
}

/// The document service. Cheap to clone.
#[derive(Clone)]
pub struct Docs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    commit: GroupCommit,
    actor: ActorId,
    cfg: DocsConfig,
    cache: Mutex<Cache>,
    live_docs: AtomicI64,
}

#[derive(Default)]
struct Cache {
    map: HashMap<DocId, (Arc<Mutex<Option<Loaded>>>, u64)>,
    tick: u64,
}

/// A document in memory. `meta` is `None` when the document does not exist.
struct Loaded {
    doc: Automerge,
    meta: Option<DocMeta>,
}

impl Docs {
    /// Starts the service over `store`, writing with `actor`.
    ///
    /// # Errors
    /// Store errors while counting documents.
    pub fn new(
        store: Store,
        commit: GroupCommit,
        actor: ActorId,
        cfg: DocsConfig,
    ) -> Result<Docs, DocError> {
        let live = store.count_docs()? as i64;
        Ok(Docs {
            inner: Arc::new(Inner {
                store,
                commit,
                actor,
                cfg,
                cache: Mutex::new(Cache::default()),
                live_docs: AtomicI64::new(live),
            }),
        })
    }

    /// Number of live (not deleted) documents.
    pub fn count(&self) -> u64 {
        self.inner.live_docs.load(Ordering::Relaxed).max(0) as u64
    }

    /// This boot's Automerge actor id.
    pub fn actor(&self) -> &ActorId {
        &self.inner.actor
    }

    /// Creates a document with `value` (a JSON object) as its content. A `None` id
    /// is generated.
    ///
    /// # Errors
    /// [`DocError::AlreadyExists`], [`DocError::Deleted`] if the id has a
    /// tombstone, [`DocError::BadValue`] if `value` is not an object, size caps,
    /// store errors.
    pub async fn create(&self, id: Option<DocId>, value: Json) -> Result<WriteResult, DocError> {
        let id = id.unwrap_or_else(DocId::generate);
        let Json::Object(map) = value else {
            return Err(DocError::BadValue(
                "\"value\" must be a JSON object: the document root is an object".into(),
            ));
        };
        let strings = self.inner.cfg.strings;
        let result = self
            .with_doc(id.clone(), move |inner, id, loaded| {
                match &loaded.meta {
                    Some(m) if m.deleted_at_ms.is_some() => {
                        return Err(DocError::Deleted(id.to_string()));
                    }
                    Some(_) => return Err(DocError::AlreadyExists(id.to_string())),
                    None => {}
                }
                inner.commit_change(id, loaded, "create", true, |tx| {
                    for (k, v) in &map {
                        write_json(tx, &ROOT, k.as_str().into(), Slot::Put, v, strings)?;
                    }
                    Ok(())
                })
            })
            .await?;
        self.durable(result).await
    }

    /// Applies `change` to document `id` as one Automerge change, creating the
    /// document if it does not exist, and returns once it is durable.
    ///
    /// # Errors
    /// [`DocError::Deleted`], the change's own errors (nothing is stored then),
    /// size caps, store errors.
    pub async fn write(&self, id: DocId, change: Change) -> Result<WriteResult, DocError> {
        let strings = self.inner.cfg.strings;
        let result = self
            .with_doc(id, move |inner, id, loaded| {
                if let Some(m) = &loaded.meta
                    && m.deleted_at_ms.is_some()
                {
                    return Err(DocError::Deleted(id.to_string()));
                }
                let (message, f): (_, Box<dyn FnOnce(&mut Transaction<'_>) -> _>) = match change {
                    Change::Patch(p) => (
                        "patch",
                        Box::new(move |tx| apply_merge_patch(tx, &p, strings)),
                    ),
                    Change::Ops(ops) => ("ops", Box::new(move |tx| apply_ops(tx, &ops, strings))),
                    Change::Closure(f) => ("change", Box::new(move |tx| Ok(f(tx)?))),
                };
                inner.commit_change(id, loaded, message, false, f)
            })
            .await?;
        self.durable(result).await
    }

    /// Deletes document `id`, leaving a tombstone, and returns once it is durable.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], store errors.
    pub async fn delete(&self, id: DocId) -> Result<WriteResult, DocError> {
        let result = self
            .with_doc(id, |inner, id, loaded| {
                let meta = live_meta(id, loaded)?;
                let mut meta = meta.clone();
                meta.deleted_at_ms = Some(now_ms());
                meta.size_bytes = 0;
                meta.tail_changes = 0;
                inner.store.tombstone(id.as_str(), &meta)?;
                loaded.doc = new_doc(&inner.actor);
                loaded.meta = Some(meta.clone());
                inner.live_docs.fetch_sub(1, Ordering::Relaxed);
                Ok(WriteResult {
                    id: id.clone(),
                    heads: meta.heads,
                    changed: true,
                })
            })
            .await?;
        self.durable(result).await
    }

    /// Reads document `id`, or the subtree at `path` (a JSON Pointer).
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], [`DocError::PathNotFound`].
    pub async fn get(&self, id: DocId, path: Option<Pointer>) -> Result<Json, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            let doc = &loaded.doc;
            let Some(ptr) = path.filter(|p| !p.is_root()) else {
                return to_json(doc, &ROOT, ObjType::Map);
            };
            let (parents, last) = ptr.split_last().expect("not root");
            let (obj, ty) = resolve_obj(doc, &ptr, parents)?;
            let prop =
                prop_for(&ptr, ty, doc.length(&obj), last, false).map_err(|_| ptr.not_found())?;
            match doc.get(&obj, prop)? {
                Some((v, vid)) => value_to_json(doc, v, &vid),
                None => Err(ptr.not_found()),
            }
        })
        .await
    }

    /// Current heads of document `id`.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn heads(&self, id: DocId) -> Result<Vec<String>, DocError> {
        self.with_doc(id, |_, id, loaded| Ok(live_meta(id, loaded)?.heads.clone()))
            .await
    }

    /// Every change of document `id`, in causal order.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], store errors.
    pub async fn history(&self, id: DocId) -> Result<Vec<HistoryEntry>, DocError> {
        self.with_doc(id, |inner, id, loaded| {
            live_meta(id, loaded)?;
            let mut peers: HashMap<ActorId, Option<String>> = HashMap::new();
            let mut out = Vec::new();
            for c in loaded.doc.get_changes(&[]) {
                let actor = c.actor_id().clone();
                let peer_id = match peers.get(&actor) {
                    Some(p) => p.clone(),
                    None => {
                        let p = inner.store.actor(&actor)?.map(|r| r.peer_id);
                        peers.insert(actor.clone(), p.clone());
                        p
                    }
                };
                out.push(HistoryEntry {
                    hash: c.hash().to_string(),
                    actor: actor.to_hex_string(),
                    peer_id,
                    seq: c.seq(),
                    time: c.timestamp(),
                    message: c.message().map(str::to_string),
                    deps: c.deps().iter().map(|h| h.to_string()).collect(),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Lists live documents in id order.
    ///
    /// # Errors
    /// Store errors.
    pub async fn list(&self) -> Result<Vec<DocInfo>, DocError> {
        let store = self.inner.store.clone();
        blocking(move || {
            Ok(store
                .list_docs()?
                .into_iter()
                .filter(|(_, m)| m.deleted_at_ms.is_none())
                .map(|(id, m)| DocInfo {
                    id,
                    heads: m.heads,
                    size_bytes: m.size_bytes,
                    updated_at: m.updated_at_ms,
                })
                .collect())
        })
        .await
    }

    /// Waits for a flush covering everything written so far.
    ///
    /// # Errors
    /// Store errors.
    pub async fn flush(&self) -> Result<(), DocError> {
        Ok(self.inner.commit.flush().await?)
    }

    async fn durable(&self, result: WriteResult) -> Result<WriteResult, DocError> {
        // Always flush, even for a no-op: the heads we return may include a
        // concurrent writer's change whose flush has not finished yet.
        self.inner.commit.flush().await?;
        Ok(result)
    }

    /// Runs `f` on a blocking thread with document `id` loaded and locked.
    async fn with_doc<R, F>(&self, id: DocId, f: F) -> Result<R, DocError>
    where
        R: Send + 'static,
        F: FnOnce(&Inner, &DocId, &mut Loaded) -> Result<R, DocError> + Send + 'static,
    {
        let inner = self.inner.clone();
        blocking(move || {
            let slot = inner.entry(&id);
            let mut guard = match slot.lock() {
                Ok(g) => g,
                // A panic while the doc was locked: its memory state is suspect.
                Err(poisoned) => {
                    slot.clear_poison();
                    let mut g = poisoned.into_inner();
                    *g = None;
                    g
                }
            };
            if guard.is_none() {
                *guard = Some(inner.load(&id)?);
            }
            let loaded = guard.as_mut().expect("loaded above");
            let result = f(&inner, &id, loaded);
            if matches!(result, Err(DocError::Internal(_))) {
                *guard = None;
            }
            result
        })
        .await
    }
}

impl Inner {
    /// The cache slot of `id`, evicting cold unused documents past the cap.
    fn entry(&self, id: &DocId) -> Arc<Mutex<Option<Loaded>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.tick += 1;
        let tick = cache.tick;
        if let Some((slot, used)) = cache.map.get_mut(id) {
            *used = tick;
            return slot.clone();
        }
        if cache.map.len() >= self.cfg.cache_docs {
            evict(&mut cache.map, self.cfg.cache_docs.saturating_sub(1));
        }
        let slot = Arc::new(Mutex::new(None));
        cache.map.insert(id.clone(), (slot.clone(), tick));
        slot
    }

    fn load(&self, id: &DocId) -> Result<Loaded, DocError> {
        let Some(meta) = self.store.doc_meta(id.as_str())? else {
            return Ok(Loaded {
                doc: new_doc(&self.actor),
                meta: None,
            });
        };
        if meta.deleted_at_ms.is_some() {
            return Ok(Loaded {
                doc: new_doc(&self.actor),
                meta: Some(meta),
            });
        }
        let data = self.store.doc_data(id.as_str())?;
        let corrupt = |reason: String| DocError::Corrupt {
            id: id.to_string(),
            reason,
        };
        // Stored bytes are ours, but a damaged disk makes them outside input:
        // Automerge may panic on them, so contain that to this document.
        let doc = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Automerge, String> {
            let mut doc = if data.snapshot.is_empty() {
                new_doc(&self.actor)
            } else {
                let opts = LoadOptions::new().text_encoding(TextEncoding::UnicodeCodePoint);
                Automerge::load_with_options(&data.snapshot, opts)
                    .map_err(|e| format!("snapshot: {e}"))?
            };
            let changes = data
                .changes
                .into_iter()
                .map(AmChange::from_bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("change: {e}"))?;
            doc.apply_changes(changes)
                .map_err(|e| format!("applying changes: {e}"))?;
            Ok(doc.with_actor(self.actor.clone()))
        }))
        .map_err(|_| corrupt("automerge panicked while loading".into()))?
        .map_err(corrupt)?;
        Ok(Loaded {
            doc,
            meta: Some(meta),
        })
    }

    /// Runs `f` in a transaction; on success appends the change durably-to-be and
    /// compacts when due. On any error nothing is stored.
    fn commit_change<F>(
        &self,
        id: &DocId,
        loaded: &mut Loaded,
        message: &str,
        create: bool,
        f: F,
    ) -> Result<WriteResult, DocError>
    where
        F: FnOnce(&mut Transaction<'_>) -> Result<(), DocError>,
    {
        let mut tx = loaded.doc.transaction();
        if let Err(e) = f(&mut tx) {
            tx.rollback();
            return Err(e);
        }
        if tx.pending_ops() == 0 && !create && loaded.meta.is_some() {
            tx.rollback();
            let heads = loaded
                .meta
                .as_ref()
                .map(|m| m.heads.clone())
                .unwrap_or_default();
            return Ok(WriteResult {
                id: id.clone(),
                heads,
                changed: false,
            });
        }
        let now = now_ms();
        let opts = || {
            CommitOptions::default()
                .with_message(message)
                .with_time((now / 1000) as i64)
        };
        let hash = match tx.commit_with(opts()) {
            (Some(h), _) => h,
            (None, _) => loaded.doc.empty_commit(opts()),
        };
        let change = loaded
            .doc
            .get_change_by_hash(&hash)
            .ok_or_else(|| DocError::Internal("committed change is missing".into()))?;
        let bytes = change.raw_bytes();
        let size = bytes.len() as u64;
        let prev = loaded.meta.clone();
        let mut meta = prev.clone().unwrap_or(DocMeta {
            heads: vec![],
            size_bytes: 0,
            tail_changes: 0,
            next_seq: 0,
            created_at_ms: now,
            updated_at_ms: now,
            deleted_at_ms: None,
        });
        let cfg = &self.cfg;
        let cap_error = if size > cfg.max_change_bytes {
            Some(DocError::ChangeTooLarge {
                size,
                cap: cfg.max_change_bytes,
            })
        } else if meta.size_bytes + size > cfg.max_doc_bytes {
            Some(DocError::DocTooLarge {
                size: meta.size_bytes + size,
                cap: cfg.max_doc_bytes,
            })
        } else {
            None
        };
        if let Some(e) = cap_error {
            // The change is in memory only: reload the doc from the store.
            *loaded = self.load(id)?;
            return Err(e);
        }
        let seq = meta.next_seq;
        meta.next_seq += 1;
        meta.tail_changes += 1;
        meta.size_bytes += size;
        meta.updated_at_ms = now;
        meta.heads = loaded
            .doc
            .get_heads()
            .iter()
            .map(|h| h.to_string())
            .collect();
        if let Err(e) = self.store.append_change(id.as_str(), seq, bytes, &meta) {
            *loaded = self.load(id).unwrap_or(Loaded {
                doc: new_doc(&self.actor),
                meta: prev,
            });
            return Err(e.into());
        }
        if loaded.meta.is_none() {
            self.live_docs.fetch_add(1, Ordering::Relaxed);
        }
        if meta.tail_changes >= cfg.compact_after_changes {
            let snapshot = loaded.doc.save();
            meta.size_bytes = snapshot.len() as u64;
            meta.tail_changes = 0;
            if let Err(e) = self.store.compact(id.as_str(), &snapshot, &meta) {
                // The change itself is stored; compaction is retried next time.
                tracing::warn!(doc = %id, err = %e, "compaction failed");
                meta.size_bytes = loaded.meta.as_ref().map_or(0, |m| m.size_bytes) + size;
                meta.tail_changes = cfg.compact_after_changes;
            }
        }
        let heads = meta.heads.clone();
        loaded.meta = Some(meta);
        Ok(WriteResult {
            id: id.clone(),
            heads,
            changed: true,
        })
    }
}

/// Evicts least recently used entries nobody holds until `keep` remain (or only
/// held entries are left).
fn evict(map: &mut HashMap<DocId, (Arc<Mutex<Option<Loaded>>>, u64)>, keep: usize) {
    let mut idle: Vec<(u64, DocId)> = map
        .iter()
        .filter(|(_, (slot, _))| Arc::strong_count(slot) == 1)
        .map(|(id, (_, used))| (*used, id.clone()))
        .collect();
    idle.sort_unstable();
    let excess = map.len().saturating_sub(keep);
    for (_, id) in idle.into_iter().take(excess) {
        map.remove(&id);
    }
}

fn live_meta<'a>(id: &DocId, loaded: &'a Loaded) -> Result<&'a DocMeta, DocError> {
    match &loaded.meta {
        None => Err(DocError::NotFound(id.to_string())),
        Some(m) if m.deleted_at_ms.is_some() => Err(DocError::Deleted(id.to_string())),
        Some(m) => Ok(m),
    }
}

fn new_doc(actor: &ActorId) -> Automerge {
    Automerge::new_with_encoding(TextEncoding::UnicodeCodePoint).with_actor(actor.clone())
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, DocError> + Send + 'static,
) -> Result<R, DocError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DocError::Internal(format!("blocking task failed: {e}")))?
}
