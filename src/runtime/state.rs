//! What the runtime's parts share: the state behind [`Docs`](super::Docs)
//! and the writer thread ([`Inner`]), the runtime's config, and the shapes of
//! a write and its result.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use automerge::transaction::Transaction;
use automerge::{ActorId, AutomergeError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tokio::sync::oneshot;

use crate::doc::cache::DocCache;
use crate::doc::{DocError, DocId, Op, Pointer, StringMode};
use crate::feed::Feed;
use crate::store::{DocMeta, GroupCommit, Store};
use crate::sync::DocState;

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
    /// This node's priority, stamped on its changes (see [`crate::doc::stamp`]).
    pub priority: i64,
    /// The docs this node holds (`node.replicate`): local writes outside
    /// them are refused, since no peer would repair them.
    pub replicate: crate::sync::Replicate,
}

impl Default for DocsConfig {
    fn default() -> Self {
        DocsConfig {
            strings: StringMode::Text,
            max_change_bytes: 1 << 20,
            max_doc_bytes: 64 << 20,
            max_depth: 64,
            compact_after_changes: 256,
            cache_docs: 1024,
            cache_doc_bytes: 256 << 20,
            write_queue: 4096,
            write_batch: 256,
            priority: 0,
            replicate: crate::sync::Replicate::All,
        }
    }
}

/// What the API shows about one peer's sync, published by the writer thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSyncView {
    /// Unix ms when a digest from the peer last matched ours.
    pub last_in_sync_at: Option<u64>,
    /// Docs with a sync session open to the peer.
    pub docs_syncing: usize,
}

/// What the runtime starts over.
pub struct Parts {
    /// The store.
    pub store: Store,
    /// Its group commit (the flush thread).
    pub commit: GroupCommit,
    /// This boot's Automerge actor id.
    pub actor: ActorId,
    /// Where stored changes are announced.
    pub feed: Arc<Feed>,
    /// This node's peer id: the origin of local writes in the feed.
    pub origin: String,
    /// Where the writer's queue shows its depth.
    pub queues: crate::metrics::Queues,
    /// Signs the changes this node makes (its identity); None leaves them
    /// unsigned (a document service without a node, in tests).
    pub signer: Option<crate::trust::Signer>,
    /// Who may write what; the node replaces it as grants change.
    pub policy: Arc<crate::grants::PolicySlot>,
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
    pub(super) write_latency: prometheus_client::metrics::histogram::Histogram,
    /// Automerge changes stored: made here, and merged from peers.
    pub(super) changes: ChangeCounts,
    pub(super) store: Store,
    pub(super) commit: GroupCommit,
    pub(super) actor: ActorId,
    pub(super) cfg: DocsConfig,
    pub(super) cache: DocCache,
    pub(super) live_docs: AtomicI64,
    pub(super) writer_thread: Mutex<Option<JoinHandle<()>>>,
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
    pub(super) clock: crate::doc::stamp::Clock,
    /// Docs by their automerge URL.
    pub(super) urls: UrlIndex,
    /// Signs the changes made here.
    pub(super) signer: Option<crate::trust::Signer>,
    /// Who may write what (`net.admins` and the applied grants).
    pub(super) policy: Arc<crate::grants::PolicySlot>,
    /// Keyed writes' changes, durable now, for the writer to send to peers
    /// (see [`crate::sync::Input::Broadcast`]).
    pub(super) flushed: Arc<Mutex<Vec<crate::sync::Input>>>,
    /// Wakes the writer for them (holding its queue weakly: the queue
    /// closes when the last `Docs` handle goes).
    pub(super) wake: std::sync::OnceLock<Arc<dyn Fn() + Send + Sync>>,
    /// Saves big docs for compaction off the writer thread.
    pub(super) compactor: super::compact::Compactor,
}

impl Inner {
    /// Refuses a write to a doc this node does not hold (outside
    /// `node.replicate`, or outside its read grants): no peer would send it the
    /// doc's other changes, nor take this one in a repair.
    pub(super) fn check_holds(&self, id: &DocId) -> Result<(), DocError> {
        if !self.cfg.replicate.covers(id.as_str()) {
            return Err(DocError::Forbidden(format!(
                "doc {:?} is outside this node's node.replicate; it holds only what those globs cover",
                id.as_str()
            )));
        }
        if !self.policy.get().may_read(&self.origin, id.as_str()) {
            return Err(DocError::Forbidden(format!(
                "doc {:?} is outside this node's read grants; a node holds only docs it may read",
                id.as_str()
            )));
        }
        Ok(())
    }
}

/// User docs by the 16 bytes of their automerge URL
/// ([`crate::id::url_key`]): how a client's document id finds a named doc.
/// Filled from the store at start and by every change a round makes,
/// while the doc's slot is still locked: a read that sees a doc (it locks
/// the slot) can then always find it by its URL, as an automerge-repo
/// client asks right after it learns of the doc. An entry for a doc whose
/// batch then fails is harmless (a name with no doc is answered as
/// unknown). System docs are never in it, so no client reaches them.
#[derive(Default)]
pub(super) struct UrlIndex(Mutex<std::collections::HashMap<[u8; 16], DocId>>);

impl UrlIndex {
    /// Adds `docs` (those already known cost a hash each).
    pub(super) fn add<'a>(&self, docs: impl IntoIterator<Item = &'a DocId>) {
        let mut docs = docs
            .into_iter()
            .filter(|d| !d.as_str().starts_with(crate::doc::SYSTEM_PREFIX))
            .peekable();
        if docs.peek().is_none() {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for doc in docs {
            map.entry(crate::id::url_key(doc.as_str()))
                .or_insert_with(|| doc.clone());
        }
    }

    /// The doc whose URL has these bytes, if this node has heard of one.
    pub(super) fn get(&self, key: &[u8; 16]) -> Option<DocId> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }
}

/// A doc's digest state as its stored metadata records it.
pub(super) fn stored_state(meta: &DocMeta) -> DocState {
    if meta.deleted_at_ms.is_some() {
        DocState::Deleted
    } else {
        DocState::Live(meta.heads.iter().filter_map(|h| h.parse().ok()).collect())
    }
}

pub(super) async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, DocError> + Send + 'static,
) -> Result<R, DocError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DocError::Internal(format!("blocking task failed: {e}")))?
}

/// One write and where to send its result.
pub(super) struct WriteReq {
    pub(super) id: DocId,
    pub(super) op: WriteOp,
    /// Peers that get the change confirm once they stored it.
    pub(super) ack: bool,
    /// Who wrote it and its idempotency key.
    pub(super) tags: WriteTags,
    pub(super) reply: oneshot::Sender<Result<WriteResult, DocError>>,
    /// Rounds this write has waited for its doc to be reloaded.
    pub(super) carried: u32,
}

/// What a write says about itself beyond its content.
#[derive(Default)]
pub(super) struct WriteTags {
    /// The workflow run writing it, if one is.
    pub(super) cause: Option<crate::feed::Cause>,
    /// Apply at most once per doc with this key.
    pub(super) idem: Option<String>,
    /// The fingerprint of the request that carries `idem`, when it has one
    /// (see [`crate::doc::stamp::fingerprint`]).
    pub(super) req: Option<String>,
    /// Answer without waiting for a flush (the next flush, within
    /// `store.remote_flush_ms`, covers it): for writes whose writer can
    /// redo them after a crash, like a workflow run's.
    pub(super) lazy: bool,
    /// The scoped API token making the write (recorded in the change).
    pub(super) by: Option<String>,
    /// May share one change with other such writes to the doc in the same
    /// writer round (see [`WriteOpts::coalesce`]).
    pub(super) coalesce: bool,
}

/// What a write does.
pub(super) enum WriteOp {
    /// Create a new document with these root keys.
    Create(Map<String, Json>),
    /// Change a document, creating it if absent.
    Change(Change),
    /// Delete a document, leaving a tombstone.
    Delete,
    /// Merge an Automerge save (or changes) into a document, creating it if
    /// absent: a restore or an import. A deleted document refuses it.
    Merge {
        /// An Automerge save or changes.
        data: Vec<u8>,
        /// Signatures of its changes (see [`crate::backup`]): kept where
        /// they verify, else this node signs.
        sigs: Vec<u8>,
    },
}

/// Options of [`Docs::write_opts`](super::Docs::write_opts).
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    /// Peers that get the change confirm once they stored it.
    pub ack: bool,
    /// Apply at most once per doc with this idempotency key.
    pub idem: Option<String>,
    /// The scoped API token making the write.
    pub by: Option<String>,
    /// With `idem`: the write may share one Automerge change with other
    /// coalescing writes to the same doc that wait in the same writer round,
    /// each keeping its own key and its own answer. Many small writes to one
    /// doc (sensor readings) then cost one change, one signature and one
    /// apply on every peer instead of one each. A write that fails together
    /// with others is tried again alone, so it fails (or succeeds) on its
    /// own. The key is not tied to the request's content (no
    /// `IdempotencyKeyReused`): use keys derived from it.
    pub coalesce: bool,
}
