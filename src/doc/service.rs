//! The document service: loads documents on demand into a bounded cache, reads
//! them on blocking threads, and hands every write to one writer thread
//! (`writer.rs`) that applies writes in batches.
//!
//! # When is a write durable?
//!
//! 1. The writer thread takes every queued write (up to `perf.write_batch`),
//!    applies each to its in-memory doc under the doc's lock and adds the
//!    change and the doc's new meta to one [`crate::store::WriteBatch`]. Readers may see a
//!    change from here on.
//! 2. The batch is applied to sled (after a crash each doc is at one of the
//!    states the batch passed through), then handed to the group-commit
//!    flush thread, which acknowledges every write whose flush has returned.
//! 3. Only then does [`Docs`] return `Ok`: the change survives a process kill.
//!
//! If a write fails before step 2, its doc is rolled back in memory; if the
//! batch fails, every doc it touched is reloaded from the store, so memory never
//! holds a change the store lacks (other than between steps 1 and 2).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::transaction::Transaction;
use automerge::{
    ActorId, Automerge, AutomergeError, Change as AmChange, ChangeHash, LoadOptions, ObjType, ROOT,
    ReadDoc, TextEncoding,
};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};

use super::json::{StringMode, to_json, value_to_json};
use super::ops::Op;
use super::path::{Pointer, prop_for, resolve_obj};
pub use super::writer::PeerSyncView;
use super::writer::{SyncRuntime, WriteOp, WriteReq, WriteTags, WriterMsg};
use super::{DocError, DocId};
use crate::feed::Feed;
use crate::store::{DocMeta, GroupCommit, Store};
use crate::sync::{Core, DocState, Input, Output, SyncConfig};

/// Limits and choices of the document service.
#[derive(Debug, Clone)]
pub struct DocsConfig {
    /// How JSON strings are stored.
    pub strings: StringMode,
    /// Largest encoded change accepted, in bytes.
    pub max_change_bytes: u64,
    /// Largest stored document (snapshot plus tail), in bytes.
    pub max_doc_bytes: u64,
    /// Deepest nesting of objects and lists (the root is 0, `/a` is 1).
    pub max_depth: usize,
    /// Compact a document when its tail reaches this many changes.
    pub compact_after_changes: u64,
    /// Documents kept loaded in memory; colder ones are evicted.
    pub cache_docs: usize,
    /// Stored bytes of the documents kept in memory; past it colder ones are
    /// evicted. (A loaded doc takes a few times its stored size.)
    pub cache_doc_bytes: u64,
    /// Writes queued for the writer thread; more wait for room.
    pub write_queue: usize,
    /// Most writes the writer thread applies in one sled batch.
    pub write_batch: usize,
    /// This node's priority, stamped on its changes (see [`super::stamp`]).
    pub priority: i64,
}

impl Default for DocsConfig {
    fn default() -> Self {
        DocsConfig {
            strings: StringMode::Scalar,
            max_change_bytes: 1 << 20,
            max_doc_bytes: 64 << 20,
            max_depth: 64,
            compact_after_changes: 256,
            cache_docs: 1024,
            cache_doc_bytes: 256 << 20,
            write_queue: 4096,
            write_batch: 256,
            priority: 0,
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

/// A document read with its heads (see [`Docs::snapshot`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The document.
    pub json: Json,
    /// Its heads (hex).
    pub heads: Vec<String>,
    /// Messages of the changes since the heads asked about.
    pub messages_since: Option<Vec<Option<String>>>,
    /// The heads with the asking workflow's own changes peeled off (each
    /// replaced by what it was written on), sorted: the state that triggered
    /// it, the same on every node whether or not it has the derived writes.
    pub trigger_heads: Vec<String>,
}

/// `doc`'s heads, with every head that workflow `own` wrote replaced by its
/// deps until none is (at most 1,000 steps; a long chain stops there).
fn peel(doc: &Automerge, own: &str) -> Vec<String> {
    let mut heads: std::collections::BTreeSet<ChangeHash> = doc.get_heads().into_iter().collect();
    for _ in 0..1000 {
        let mine = heads.iter().copied().find(|h| {
            doc.get_change_meta_by_hash(h)
                .and_then(|c| {
                    c.message
                        .as_deref()
                        .and_then(crate::feed::Cause::from_message)
                })
                .is_some_and(|c| c.workflow == own)
        });
        let Some(h) = mine else { break };
        heads.remove(&h);
        if let Some(c) = doc.get_change_meta_by_hash(&h) {
            heads.extend(c.deps.iter().copied());
        }
    }
    heads.iter().map(|h| h.to_string()).collect()
}

/// True if every change in `older` is in the history of state `newer` (the
/// state included): none is among the changes `newer` lacks. False if a
/// hash of `newer` is not in `doc` (then nobody can tell).
pub(super) fn in_history(doc: &Automerge, older: &[ChangeHash], newer: &[ChangeHash]) -> bool {
    if newer
        .iter()
        .any(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        return false;
    }
    let outside: std::collections::HashSet<ChangeHash> =
        doc.get_changes_meta(newer).iter().map(|c| c.hash).collect();
    older.iter().all(|h| !outside.contains(h))
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

/// Which docs a listing page holds (see [`Docs::list_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only ids that start with this.
    pub prefix: String,
    /// Only ids after this one (the last id of the previous page).
    pub after: Option<String>,
    /// At most this many.
    pub limit: usize,
    /// Include the node's system docs (`_mergeflow/...`). A prefix inside
    /// them includes them anyway.
    pub system: bool,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct DocPage {
    /// Live docs, in id order.
    pub docs: Vec<DocInfo>,
    /// More docs follow: ask again with `after` = the last id of `docs`.
    pub more: bool,
}

impl DocInfo {
    /// The listing entry of a stored doc.
    fn from_meta((id, m): (String, crate::store::DocMeta)) -> DocInfo {
        DocInfo {
            id,
            heads: m.heads,
            size_bytes: m.size_bytes,
            updated_at: m.updated_at_ms,
        }
    }
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
    /// A container's genesis: the change, the same on every node, that made
    /// a container a write created implicitly (see the README's Guarantees).
    #[serde(default)]
    pub genesis: bool,
}

/// The JSON value at `ptr` (not the root) in `doc`.
///
/// # Errors
/// [`DocError::PathNotFound`] when nothing is there.
pub(super) fn json_at<R: ReadDoc>(doc: &R, ptr: &Pointer) -> Result<Json, DocError> {
    let (parents, last) = ptr.split_last().ok_or_else(|| ptr.not_found())?;
    let (obj, ty) = resolve_obj(doc, ptr, parents)?;
    let prop = prop_for(ptr, ty, doc.length(&obj), last, false).map_err(|_| ptr.not_found())?;
    match doc.get(&obj, prop)? {
        Some((v, vid)) => value_to_json(doc, v, &vid),
        None => Err(ptr.not_found()),
    }
}

/// A library user's change: a closure over the Automerge transaction.
pub type ChangeFn = Box<dyn FnOnce(&mut Transaction<'_>) -> Result<(), AutomergeError> + Send>;

/// What a write does inside its transaction.
pub enum Change {
    /// An RFC 7396 merge patch.
    Patch(Json),
    /// Explicit ops, all or nothing.
    Ops(Vec<Op>),
    /// A closure over the Automerge transaction (library users).
    Closure(ChangeFn),
    /// Values put at JSON Pointers, each only where the doc holds a
    /// different value when the change is made (derived values: writing one
    /// that is already there would be a needless change).
    SetIfDifferent(Vec<(Pointer, Json)>),
}

/// The document service. Cheap to clone.
#[derive(Clone)]
pub struct Docs {
    inner: Arc<Inner>,
    writer: mpsc::Sender<WriterMsg>,
}

/// Automerge changes stored since start, by where they were made.
#[derive(Default)]
pub(super) struct ChangeCounts {
    /// Made on this node (writes, workflow writes).
    pub(super) local: std::sync::atomic::AtomicU64,
    /// Merged from peers (fast path, sync, pushed docs) or from a restore.
    pub(super) remote: std::sync::atomic::AtomicU64,
}

pub(super) struct Inner {
    /// Local writes, from the call to the answer.
    write_latency: prometheus_client::metrics::histogram::Histogram,
    /// Automerge changes stored: made here, and merged from peers.
    pub(super) changes: ChangeCounts,
    pub(super) store: Store,
    pub(super) commit: GroupCommit,
    pub(super) actor: ActorId,
    pub(super) cfg: DocsConfig,
    cache: Mutex<Cache>,
    pub(super) live_docs: AtomicI64,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    pub(super) sync_view: Mutex<std::collections::BTreeMap<String, PeerSyncView>>,
    /// The sync digest's fingerprint after the writer's last round.
    pub(super) sync_fingerprint: Mutex<Option<String>>,
    /// The sync core's counters, as of the writer's last round.
    pub(super) sync_stats: Mutex<Option<crate::sync::SyncStats>>,
    /// Where merged changes are announced.
    pub(super) feed: Arc<Feed>,
    /// This node's peer id: the origin of local writes in the feed.
    pub(super) origin: String,
    /// What peers confirmed they store; writers waiting for replicas.
    pub(super) replicas: super::replicas::Replicas,
    /// This node's hybrid logical clock, stamped on its changes.
    pub(super) clock: super::stamp::Clock,
}

pub(super) type SlotRef = Arc<Mutex<Option<Loaded>>>;

/// Loaded documents, bounded by count and by stored bytes. Only entries nobody
/// holds are evicted, least recently used first; an evicted doc is reloaded
/// from the store on next use.
#[derive(Default)]
struct Cache {
    map: HashMap<DocId, CacheEntry>,
    tick: u64,
    bytes: u64,
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
        if self.map.len() <= max_docs && self.bytes <= max_bytes {
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
    }
}

/// A document in memory. `meta` is `None` when the document does not exist.
pub(super) struct Loaded {
    pub(super) doc: Automerge,
    pub(super) meta: Option<DocMeta>,
}

impl Docs {
    /// Fault injection for tests: while `on`, the store fails as sled does
    /// after an I/O error (see [`crate::store::Store::fail`]).
    #[doc(hidden)]
    pub fn fail_store(&self, on: bool) {
        self.inner.store.fail(on);
    }

    /// Starts the service over `store`, writing with `actor`, and its writer
    /// thread. With `sync`, the writer also runs the sync core, whose outputs go
    /// to the given channel (the network shell's).
    ///
    /// # Errors
    /// Store errors while reading document metadata.
    pub fn new(
        store: Store,
        commit: GroupCommit,
        actor: ActorId,
        cfg: DocsConfig,
        sync: Option<(SyncConfig, mpsc::Sender<Output>)>,
        feed: Arc<Feed>,
        origin: String,
    ) -> Result<Docs, DocError> {
        let metas = store.list_docs()?;
        let live = metas
            .iter()
            .filter(|(_, m)| m.deleted_at_ms.is_none())
            .count() as i64;
        let sync = sync.map(|(sync_cfg, out)| {
            let states = metas.into_iter().map(|(id, m)| {
                let s = stored_state(&m);
                (id, s)
            });
            SyncRuntime {
                core: Core::new(sync_cfg, states),
                out,
                rng: rand::make_rng(),
                started: std::time::Instant::now(),
                dropped_outputs: 0,
            }
        });
        let (tx, rx) = mpsc::channel(cfg.write_queue.max(1));
        let inner = Arc::new(Inner {
            store,
            commit,
            actor,
            cfg,
            cache: Mutex::new(Cache::default()),
            live_docs: AtomicI64::new(live),
            writer_thread: Mutex::new(None),
            sync_view: Mutex::new(Default::default()),
            sync_fingerprint: Mutex::new(None),
            sync_stats: Mutex::new(None),
            feed,
            origin,
            replicas: Default::default(),
            clock: Default::default(),
            write_latency: crate::latency::histogram(),
            changes: ChangeCounts::default(),
        });
        let thread_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("mergeflow-writer".into())
            .spawn(move || super::writer::run(thread_inner, rx, sync))
            .map_err(|e| DocError::Internal(format!("cannot start the writer thread: {e}")))?;
        *inner.writer_thread.lock().expect("not poisoned") = Some(handle);
        Ok(Docs { inner, writer: tx })
    }

    /// Number of live (not deleted) documents.
    pub fn count(&self) -> u64 {
        self.inner.live_docs.load(Ordering::Relaxed).max(0) as u64
    }

    /// Documents loaded in memory and their stored bytes.
    pub fn cache_usage(&self) -> (usize, u64) {
        self.inner.cache_usage()
    }

    /// This boot's Automerge actor id.
    pub fn actor(&self) -> &ActorId {
        &self.inner.actor
    }

    /// Creates a document with `value` (a JSON object) as its content. A `None` id
    /// is generated. Returns once the write is durable.
    ///
    /// # Errors
    /// [`DocError::AlreadyExists`], [`DocError::Deleted`] if the id has a
    /// tombstone, [`DocError::BadValue`] if `value` is not an object, size caps,
    /// store errors.
    pub async fn create(&self, id: Option<DocId>, value: Json) -> Result<WriteResult, DocError> {
        self.create_with(id, value, false).await
    }

    /// As [`create`](Self::create); with `ack`, the peers that get the change
    /// confirm once they stored it (see [`wait_replicas`](Self::wait_replicas)).
    ///
    /// # Errors
    /// As [`create`](Self::create).
    pub async fn create_with(
        &self,
        id: Option<DocId>,
        value: Json,
        ack: bool,
    ) -> Result<WriteResult, DocError> {
        let id = id.unwrap_or_else(DocId::generate);
        let Json::Object(map) = value else {
            return Err(DocError::BadValue(
                "\"value\" must be a JSON object: the document root is an object".into(),
            ));
        };
        self.submit(id, WriteOp::Create(map), ack, WriteTags::default())
            .await
    }

    /// Applies `change` to document `id` as one Automerge change, creating the
    /// document if it does not exist, and returns once it is durable.
    ///
    /// # Errors
    /// [`DocError::Deleted`], the change's own errors (nothing is stored then),
    /// size caps, store errors.
    pub async fn write(&self, id: DocId, change: Change) -> Result<WriteResult, DocError> {
        self.write_with(id, change, false).await
    }

    /// As [`write`](Self::write); with `ack`, the peers that get the change
    /// confirm once they stored it (see [`wait_replicas`](Self::wait_replicas)).
    /// Without it they do not, which saves a message per peer and write.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub async fn write_with(
        &self,
        id: DocId,
        change: Change,
        ack: bool,
    ) -> Result<WriteResult, DocError> {
        self.submit(id, WriteOp::Change(change), ack, WriteTags::default())
            .await
    }

    /// As [`write_with`](Self::write_with), applied at most once per
    /// idempotency `key` and doc: if a change with that key is already in
    /// the doc's history (made here, or merged from a peer), nothing is
    /// applied and the result says `changed: false`. A patch or ops list is
    /// fingerprinted and the fingerprint kept with the change, so the same
    /// key with a different patch or ops list is refused rather than
    /// silently dropped.
    ///
    /// # Errors
    /// [`DocError::BadValue`] for a malformed key;
    /// [`DocError::IdempotencyKeyReused`] for a key used before with a
    /// different request; as [`write`](Self::write).
    pub async fn write_idempotent(
        &self,
        id: DocId,
        change: Change,
        ack: bool,
        key: String,
    ) -> Result<WriteResult, DocError> {
        super::stamp::check_idempotency_key(&key).map_err(DocError::BadValue)?;
        let req = match &change {
            Change::Patch(p) => serde_json::to_vec(p).ok().map(|b| ("patch", b)),
            Change::Ops(ops) => serde_json::to_vec(ops).ok().map(|b| ("ops", b)),
            Change::Closure(_) | Change::SetIfDifferent(_) => None,
        }
        .map(|(kind, body)| super::stamp::fingerprint(kind, &body));
        let tags = WriteTags {
            cause: None,
            idem: Some(key),
            req,
            lazy: false,
        };
        self.submit(id, WriteOp::Change(change), ack, tags).await
    }

    /// As [`write`](Self::write), for a workflow run: the change carries
    /// `cause` (as its message, and in the feed). Returns before the change
    /// is durable: the next flush (within `store.remote_flush_ms`) covers
    /// it. A run records that it finished after this returns, and sled
    /// recovers a prefix of its log after a crash, so a crash that loses the
    /// change loses the record too, and the run resumes and writes again.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub async fn write_caused(
        &self,
        id: DocId,
        change: Change,
        cause: crate::feed::Cause,
    ) -> Result<WriteResult, DocError> {
        let tags = WriteTags {
            cause: Some(cause),
            idem: None,
            req: None,
            lazy: true,
        };
        self.submit(id, WriteOp::Change(change), false, tags).await
    }

    /// Deletes document `id`, leaving a tombstone, and returns once it is durable.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], store errors.
    pub async fn delete(&self, id: DocId) -> Result<WriteResult, DocError> {
        self.submit(id, WriteOp::Delete, false, WriteTags::default())
            .await
    }

    /// Merges Automerge `data` (a save, or changes) into document `id`,
    /// creating it if absent, and returns once it is durable: a restore or an
    /// import. Merging only adds changes, so nothing the doc holds is lost;
    /// `changed` is false if it held them all already. Peers get the merged
    /// changes by sync.
    ///
    /// # Errors
    /// [`DocError::Deleted`] (a deleted doc takes no merge),
    /// [`DocError::BadValue`] for data that does not load, size caps, store
    /// errors.
    pub async fn merge(&self, id: DocId, data: Vec<u8>) -> Result<WriteResult, DocError> {
        self.submit(id, WriteOp::Merge(data), false, WriteTags::default())
            .await
    }

    /// Document `id` as one Automerge save (what `Automerge::load` reads),
    /// or `None` if it does not exist or was deleted. Blocking: reads the
    /// store.
    ///
    /// # Errors
    /// Store errors, or a doc that does not load.
    pub fn saved(&self, id: &DocId) -> Result<Option<Vec<u8>>, DocError> {
        self.inner.saved_bytes(id)
    }

    /// Every doc's id and whether it was deleted, in id order. Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn ids(&self) -> Result<Vec<(String, bool)>, DocError> {
        Ok(self
            .inner
            .store
            .list_docs()?
            .into_iter()
            .map(|(id, m)| (id, m.deleted_at_ms.is_some()))
            .collect())
    }

    /// Hands input to the sync core. Remote input must not wait behind a full
    /// queue (it would stall the network loop), so it is dropped instead, and
    /// anti-entropy repairs what that loses. Returns `false` if it was dropped
    /// (queue full or node stopping).
    pub fn sync_input(&self, input: Input) -> bool {
        self.sync_inputs(vec![input])
    }

    /// Queues several inputs for the sync core as one writer message (so a
    /// frame of many messages takes one queue slot); false if the queue is full.
    pub fn sync_inputs(&self, inputs: Vec<Input>) -> bool {
        self.writer.try_send(WriterMsg::Sync(inputs)).is_ok()
    }

    /// Sync progress per connected peer (refreshed every tick).
    pub fn sync_view(&self) -> std::collections::BTreeMap<String, PeerSyncView> {
        self.inner
            .sync_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The sync core's counters as of the writer's last round; `None`
    /// without sync, or before the first round.
    pub fn sync_stats(&self) -> Option<crate::sync::SyncStats> {
        self.inner
            .sync_stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A hash of every doc id and its heads (the sync digest's
    /// [`fingerprint`](crate::sync::Digest::fingerprint)) as of the writer's
    /// last round: two nodes with equal fingerprints hold the same docs at the
    /// same heads. `None` without sync, or before the first round.
    pub fn sync_fingerprint(&self) -> Option<String> {
        self.inner
            .sync_fingerprint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `want` peers have confirmed they store `heads` of `id`
    /// (see [`Held`](super::Held)), for at most `timeout`. Returns the peers
    /// that confirmed: `Ok` with at least `want`, `Err` with fewer on timeout.
    pub async fn wait_replicas(
        &self,
        id: &DocId,
        heads: &[String],
        want: usize,
        timeout: std::time::Duration,
    ) -> Result<Vec<String>, Vec<String>> {
        let hashes: Vec<ChangeHash> = heads.iter().filter_map(|h| h.parse().ok()).collect();
        let (now, rx) = self.inner.replicas.wait(id.as_str(), hashes.clone(), want);
        let Some(rx) = rx else {
            return Ok(now.into_iter().collect());
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(peers)) => Ok(peers.into_iter().collect()),
            _ => Err(self
                .inner
                .replicas
                .give_up(id.as_str(), &hashes)
                .into_iter()
                .collect()),
        }
    }

    /// Records a peer's [`Message::Have`](crate::sync::Message::Have): it
    /// stores `doc` at `heads`. The network task calls this directly, so
    /// confirmations never queue behind writes.
    pub fn confirm_held(&self, peer: &str, doc: &str, heads: Vec<ChangeHash>) {
        super::writer::confirm(&self.inner, peer, doc, heads);
    }

    /// What each peer last confirmed it stores of `id` (since it connected).
    pub fn held(&self, id: &DocId) -> std::collections::BTreeMap<String, super::Held> {
        self.inner.replicas.held(id.as_str())
    }

    /// True while the writer thread runs (it stops only at shutdown).
    pub fn writer_alive(&self) -> bool {
        !self.writer.is_closed()
    }

    /// Queues a write for the writer thread and waits for its durable result.
    /// Cancel safe in the sense that dropping the future does not undo the write.
    async fn submit(
        &self,
        id: DocId,
        op: WriteOp,
        ack: bool,
        tags: WriteTags,
    ) -> Result<WriteResult, DocError> {
        let started = std::time::Instant::now();
        let result = self.submit_inner(id, op, ack, tags).await;
        if result.is_ok() {
            self.inner
                .write_latency
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// Automerge changes stored since start: (made here, merged from peers
    /// or a restore).
    pub fn changes_stored(&self) -> (u64, u64) {
        (
            self.inner.changes.local.load(Ordering::Relaxed),
            self.inner.changes.remote.load(Ordering::Relaxed),
        )
    }

    /// Local writes so far: how long each took, from the call to the answer.
    pub fn write_latency(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.write_latency.clone()
    }

    async fn submit_inner(
        &self,
        id: DocId,
        op: WriteOp,
        ack: bool,
        tags: WriteTags,
    ) -> Result<WriteResult, DocError> {
        // Load a cold doc here, on a blocking thread, so the writer thread (shared
        // by all docs) does not stall on it. Eviction may race this; then the
        // writer loads it itself.
        if !self.inner.is_loaded(&id) {
            self.with_doc(id.clone(), |_, _, _| Ok(())).await?;
        }
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Write(WriteReq {
                id,
                op,
                ack,
                tags,
                reply,
            }))
            .await
            .map_err(|_| DocError::Store(crate::store::StoreError::Closed))?;
        rx.await
            .map_err(|_| DocError::Store(crate::store::StoreError::Closed))?
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
            json_at(doc, &ptr)
        })
        .await
    }

    /// Document `id` and its heads, read together, with the messages of the
    /// changes made since `since` (hex heads; `None` if one is not in the doc).
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn snapshot(
        &self,
        id: DocId,
        since: Vec<String>,
        own: Option<String>,
    ) -> Result<Snapshot, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            let heads = live_meta(id, loaded)?.heads.clone();
            let since: Option<Vec<ChangeHash>> = since.iter().map(|h| h.parse().ok()).collect();
            let messages = since
                .filter(|s| {
                    s.iter()
                        .all(|h| loaded.doc.get_change_meta_by_hash(h).is_some())
                })
                .map(|s| {
                    loaded
                        .doc
                        .get_changes_meta(&s)
                        .into_iter()
                        .map(|c| c.message.map(|m| m.into_owned()))
                        .collect()
                });
            let trigger_heads = match &own {
                Some(w) => peel(&loaded.doc, w),
                None => heads.clone(),
            };
            Ok(Snapshot {
                json: to_json(&loaded.doc, &ROOT, ObjType::Map)?,
                heads,
                messages_since: messages,
                trigger_heads,
            })
        })
        .await
    }

    /// The conflicted places of document `id` whose JSON Pointer `wanted`
    /// accepts (see [`super::conflict`]).
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn conflicts(
        &self,
        id: DocId,
        wanted: Box<dyn Fn(&str) -> bool + Send>,
    ) -> Result<Vec<super::conflict::Conflict>, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            super::conflict::conflicts(&loaded.doc, &*wanted)
        })
        .await
    }

    /// True if every change in `older` (hex hashes) is in the history of
    /// the state `newer` (the state itself included); false if a hash is
    /// not in the doc.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn covers(
        &self,
        id: DocId,
        older: Vec<String>,
        newer: Vec<String>,
    ) -> Result<bool, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            let parse = |v: &[String]| -> Option<Vec<ChangeHash>> {
                v.iter().map(|h| h.parse().ok()).collect()
            };
            let (Some(older), Some(newer)) = (parse(&older), parse(&newer)) else {
                return Ok(false);
            };
            let doc = &loaded.doc;
            let known = older
                .iter()
                .all(|h| doc.get_change_meta_by_hash(h).is_some());
            Ok(known && in_history(doc, &older, &newer))
        })
        .await
    }

    /// The Automerge actors (hex) that wrote changes `heads` (hex hashes;
    /// one not in the doc is left out) of document `id`, or with `None`
    /// every change in its history; sorted, without repeats.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn actors(
        &self,
        id: DocId,
        heads: Option<Vec<String>>,
    ) -> Result<Vec<String>, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            let doc = &loaded.doc;
            let metas = match heads {
                Some(heads) => heads
                    .iter()
                    .filter_map(|h| h.parse::<ChangeHash>().ok())
                    .filter_map(|h| doc.get_change_meta_by_hash(&h))
                    .collect(),
                None => doc.get_changes_meta(&[]),
            };
            let mut out: Vec<String> = metas.iter().map(|c| c.actor.to_hex_string()).collect();
            out.sort();
            out.dedup();
            Ok(out)
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
            for c in loaded.doc.get_changes_meta(&[]) {
                let actor = c.actor.into_owned();
                let peer_id = match peers.get(&actor) {
                    Some(p) => p.clone(),
                    None => {
                        let p = inner.store.actor(&actor)?.map(|r| r.peer_id);
                        peers.insert(actor.clone(), p.clone());
                        p
                    }
                };
                // Geneses carry no message and no time (`doc::container`).
                let genesis =
                    c.message.is_none() && c.timestamp == 0 && c.seq == 1 && peer_id.is_none();
                out.push(HistoryEntry {
                    genesis,
                    hash: c.hash.to_string(),
                    actor: actor.to_hex_string(),
                    peer_id,
                    seq: c.seq,
                    time: c.timestamp,
                    message: c.message.map(|m| m.into_owned()),
                    deps: c.deps.iter().map(|h| h.to_string()).collect(),
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
                .map(DocInfo::from_meta)
                .collect())
        })
        .await
    }

    /// One page of live documents, in id order (see [`ListQuery`]).
    ///
    /// # Errors
    /// Store errors.
    pub async fn list_page(&self, q: ListQuery) -> Result<DocPage, DocError> {
        let store = self.inner.store.clone();
        blocking(move || {
            let system = q.system || q.prefix.starts_with(super::SYSTEM_PREFIX);
            let keep = |id: &str, m: &crate::store::DocMeta| {
                m.deleted_at_ms.is_none() && (system || !id.starts_with(super::SYSTEM_PREFIX))
            };
            let (docs, more) =
                store.list_docs_page(&q.prefix, q.after.as_deref(), q.limit, keep)?;
            let docs = docs.into_iter().map(DocInfo::from_meta).collect();
            Ok(DocPage { docs, more })
        })
        .await
    }

    /// Waits for a flush covering everything acknowledged so far.
    ///
    /// # Errors
    /// Store errors.
    pub async fn flush(&self) -> Result<(), DocError> {
        Ok(self.inner.commit.flush().await?)
    }

    /// Stops the writer thread after it has handed every queued write to the
    /// flush thread. Later writes fail with `shutting_down`. Idempotent.
    pub async fn close(&self) {
        let _ = self.writer.send(WriterMsg::Stop).await;
        let handle = self
            .inner
            .writer_thread
            .lock()
            .expect("not poisoned")
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
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
            let mut guard = lock_slot(&slot);
            let loaded = inner.ensure_loaded(&id, &mut guard)?;
            let result = f(&inner, &id, loaded);
            inner.note_size(&id, loaded);
            result
        })
        .await
    }
}

/// Locks a cache slot. After a panic while it was locked, the doc's memory state
/// is suspect: it is dropped and reloaded from the store.
pub(super) fn lock_slot(slot: &SlotRef) -> MutexGuard<'_, Option<Loaded>> {
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

impl Inner {
    /// The cache slot of `id`, evicting cold unused documents past the cap.
    pub(super) fn entry(&self, id: &DocId) -> SlotRef {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
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
        cache.evict(self.cfg.cache_docs, self.cfg.cache_doc_bytes);
        slot
    }

    /// The cache slot of `id`, if it has one (without creating one).
    pub(super) fn cached(&self, id: &DocId) -> Option<SlotRef> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
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
    pub(super) fn saved_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, DocError> {
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
    pub(super) fn note_size(&self, id: &DocId, loaded: &Loaded) {
        let bytes = loaded.meta.as_ref().map_or(0, |m| m.size_bytes);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = cache.map.get_mut(id) else {
            return;
        };
        let old = std::mem::replace(&mut e.bytes, bytes);
        cache.bytes = cache.bytes - old + bytes;
        cache.evict(self.cfg.cache_docs, self.cfg.cache_doc_bytes);
    }

    /// Docs in the cache and their stored bytes.
    pub(super) fn cache_usage(&self) -> (usize, u64) {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        (cache.map.len(), cache.bytes)
    }

    /// True if `id` is in the cache and loaded (a slot being used counts as loaded).
    fn is_loaded(&self, id: &DocId) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .map
            .get(id)
            .is_some_and(|e| e.slot.try_lock().map_or(true, |g| g.is_some()))
    }

    /// The loaded doc in `slot`, loading it from the store first if needed.
    pub(super) fn ensure_loaded<'a>(
        &self,
        id: &DocId,
        slot: &'a mut Option<Loaded>,
    ) -> Result<&'a mut Loaded, DocError> {
        if slot.is_none() {
            *slot = Some(self.load(id)?);
        }
        Ok(slot.as_mut().expect("loaded above"))
    }

    pub(super) fn load(&self, id: &DocId) -> Result<Loaded, DocError> {
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
        })
    }
}

pub(super) fn live_meta<'a>(id: &DocId, loaded: &'a Loaded) -> Result<&'a DocMeta, DocError> {
    match &loaded.meta {
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

pub(super) fn new_doc(actor: &ActorId) -> Automerge {
    Automerge::new_with_encoding(TextEncoding::UnicodeCodePoint).with_actor(actor.clone())
}

/// A doc's digest state as its stored metadata records it.
pub(super) fn stored_state(meta: &DocMeta) -> DocState {
    if meta.deleted_at_ms.is_some() {
        DocState::Deleted
    } else {
        DocState::Live(meta.heads.iter().filter_map(|h| h.parse().ok()).collect())
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
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
