//! The node: opens the store, starts the document service and (optionally) the
//! HTTP API, and shuts them down in order.
//!
//! Shutdown order: stop accepting API requests and wait for in-flight ones (their
//! writes are acknowledged only after their flush), stop the writer thread once
//! it has handed off its queue, flush the store once more, stop the flush thread.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use libp2p::PeerId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod backup;
pub(crate) mod grants;

use crate::Error;
use crate::config::Config;
use crate::doc::{DocError, DocId, Pointer};
use crate::feed::{DocGlob, Feed, FeedItem};
use crate::runtime::{Change, Docs, HistoryEntry, WriteResult};
use crate::status::Status;
use crate::store::{GroupCommit, Store};
use crate::sync::{Input, Output};
use tokio::sync::mpsc;

/// A running mergeflow node. Cheap to clone; all clones share the node.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) docs: Docs,
    pub(crate) workflows: crate::workflow::Engine,
    pub(crate) feed: Arc<Feed>,
    pub(crate) store: Store,
    pub(crate) commit: GroupCommit,
    pub(crate) flush_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) peer_id: PeerId,
    pub(crate) boot: u64,
    pub(crate) started: Instant,
    pub(crate) config: Config,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) api_addr: Mutex<Option<SocketAddr>>,
    pub(crate) sync_out: Mutex<Option<mpsc::Receiver<Output>>>,
    pub(crate) net: Mutex<Option<crate::net::NetHandle>>,
    pub(crate) progress: Arc<crate::progress::Tasks>,
    /// The `[[automerge.servers]]` links' states.
    pub(crate) server_links: crate::status::ServerLinks,
    /// The `[[mqtt]]` bridges.
    pub(crate) mqtt: crate::mqtt::Bridges,
    /// Who may write what (see [`crate::grants`]).
    pub(crate) policy: Arc<crate::grants::PolicySlot>,
    /// Declared last so it drops after the store: seals the data dir once sled
    /// has closed, if the node was shut down cleanly.
    pub(crate) seal: SealOnDrop,
}

/// Writes the clean-shutdown seal (see `store::seal`) when dropped, if armed.
pub(crate) struct SealOnDrop {
    pub(crate) data_dir: PathBuf,
    pub(crate) armed: std::sync::atomic::AtomicBool,
}

impl Drop for SealOnDrop {
    fn drop(&mut self) {
        if !self.armed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        match crate::store::seal(&self.data_dir) {
            Ok(true) => tracing::debug!("data dir sealed"),
            Ok(false) => tracing::info!("data dir not sealed: the store is still open elsewhere"),
            Err(e) => tracing::warn!(err = %e, "could not seal the data dir"),
        }
    }
}

impl Node {
    /// A handle to document `id` (which need not exist yet).
    ///
    /// # Errors
    /// [`Error::Doc`] with [`DocError::InvalidId`] for a malformed id.
    pub fn doc(&self, id: &str) -> Result<DocHandle, Error> {
        Ok(DocHandle {
            docs: self.inner.docs.clone(),
            id: DocId::new(id)?,
        })
    }

    /// Hands input to the sync core (see [`NodeBuilder::sync`](crate::NodeBuilder::sync)); `false` if it
    /// was dropped because the queue is full or the node does not sync.
    /// (Test machinery: the sync core's types are not public.)
    #[doc(hidden)]
    pub fn sync_input(&self, input: Input) -> bool {
        self.inner.docs.inbox().send(input)
    }

    /// Hands the sync core what one network frame carried, as one queue
    /// message (fast-path changes of one doc in it are applied together).
    /// False if the queue is full. (Test machinery.)
    #[doc(hidden)]
    pub fn sync_inputs(&self, inputs: Vec<Input>) -> bool {
        self.inner.docs.inbox().send_all(inputs)
    }

    /// The sync core's outputs, once (the network shell takes them).
    /// (Test machinery.)
    #[doc(hidden)]
    pub fn take_sync_outputs(&self) -> Option<mpsc::Receiver<Output>> {
        self.inner.sync_out.lock().expect("not poisoned").take()
    }

    /// Takes the node off the network (`false`: every peer is disconnected
    /// and none is dialled or accepted) or back on (`true`, the default:
    /// peers are dialled again, and sync brings both sides up to date). The
    /// node keeps working locally while offline: an offline-first app's
    /// "airplane mode". No effect without the network.
    pub fn set_online(&self, online: bool) {
        if let Some(net) = &*self.inner.net.lock().expect("not poisoned") {
            net.online.send_replace(online);
        }
    }

    /// False while [`set_online(false)`](Self::set_online) holds, or without
    /// the network.
    pub fn is_online(&self) -> bool {
        self.inner
            .net
            .lock()
            .expect("not poisoned")
            .as_ref()
            .is_some_and(|n| *n.online.borrow())
    }

    /// Long operations in progress.
    pub fn tasks(&self) -> &Arc<crate::progress::Tasks> {
        &self.inner.progress
    }

    /// The Prometheus text exposition served at `/metrics`.
    pub async fn metrics(&self) -> String {
        let status = self.status().await;
        let (sync, peers) = (self.inner.docs.sync_stats(), self.peers());
        let net = self.inner.net.lock().expect("not poisoned").clone();
        let counts = net.as_ref().map(|net| {
            let st = net.state.lock().expect("not poisoned");
            crate::status::NetCounts {
                sent: st.sent.clone(),
                received: st.received.clone(),
            }
        });
        let families = crate::status::families(&crate::status::Scrape {
            status: &status,
            sync: sync.as_ref(),
            peers: &peers,
            net: counts.as_ref(),
        });
        self.inner.metrics.render(families)
    }

    /// Known peers (empty without network).
    pub fn peers(&self) -> Vec<crate::net::PeerInfo> {
        match &*self.inner.net.lock().expect("not poisoned") {
            Some(net) => {
                let view = self.inner.docs.sync_view();
                let mut state = net.state.lock().expect("not poisoned");
                for p in state.peers.values_mut() {
                    p.docs_syncing = 0;
                    if let Some(s) = view.get(&p.peer_id) {
                        p.docs_syncing = s.docs_syncing;
                        // Kept after the peer goes: when it was last in sync
                        // is worth knowing most while it is away.
                        p.last_in_sync_at = s.last_in_sync_at.or(p.last_in_sync_at);
                    }
                }
                let mut v: Vec<_> = state.peers.values().cloned().collect();
                drop(state);
                v.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                v
            }
            None => vec![],
        }
    }

    /// The workflow engine: definitions, runs, retry and skip.
    pub fn workflows(&self) -> &crate::workflow::Engine {
        &self.inner.workflows
    }

    /// The document service (the HTTP API's and the tests' way in; an
    /// embedder uses [`Node::doc`]).
    #[doc(hidden)]
    pub fn docs(&self) -> &Docs {
        &self.inner.docs
    }

    /// Every durable change (local write, merge from a peer, delete) of docs
    /// whose id matches `glob` (`*` within a `/` segment, `**` across), from
    /// now on. See [`crate::feed`].
    ///
    /// # Errors
    /// [`Error::BadRequest`] for an invalid glob.
    pub fn subscribe(
        &self,
        glob: &str,
    ) -> Result<impl Stream<Item = FeedItem> + Send + use<>, Error> {
        self.subscribe_after(glob, None)
    }

    /// As [`subscribe`](Self::subscribe), first replaying the events after
    /// event id `after` that the feed still holds (or a [`FeedItem::Missed`]).
    ///
    /// # Errors
    /// [`Error::BadRequest`] for an invalid glob.
    pub fn subscribe_after(
        &self,
        glob: &str,
        after: Option<&str>,
    ) -> Result<impl Stream<Item = FeedItem> + Send + use<>, Error> {
        let glob = DocGlob::new(glob).map_err(Error::BadRequest)?;
        Ok(self.inner.feed.subscribe(glob, after))
    }

    /// Workflow run updates from now on, of runs on docs matching `glob`
    /// (the `run` events of `/v1/events`).
    ///
    /// # Errors
    /// [`Error::BadRequest`] for an invalid glob.
    pub fn subscribe_runs(
        &self,
        glob: &str,
    ) -> Result<impl Stream<Item = Arc<crate::feed::RunEvent>> + Send + use<>, Error> {
        let glob = DocGlob::new(glob).map_err(Error::BadRequest)?;
        Ok(self.inner.feed.subscribe_runs(glob))
    }

    /// The node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The address the HTTP API listens on, if it is served.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        *self.inner.api_addr.lock().expect("not poisoned")
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.config.node.data_dir
    }

    /// Why the store failed, if it has: sled refuses every operation after
    /// an I/O error (a full disk), so the node must be restarted on its data
    /// dir (shut down, drop it, build it again). `mergeflow start` does so by
    /// itself; `/healthz` answers 503 meanwhile.
    pub fn store_failure(&self) -> Option<String> {
        self.inner.store.failure()
    }

    /// Current status.
    pub async fn status(&self) -> Status {
        let store = self.inner.store.clone();
        let store_bytes = tokio::task::spawn_blocking(move || store.size_on_disk().unwrap_or(0))
            .await
            .unwrap_or(0);
        let stats = self.inner.commit.stats();
        let (changes_local, changes_remote) = self.inner.docs.changes_stored();
        let (listen_addrs, peers) = match &*self.inner.net.lock().expect("not poisoned") {
            Some(net) => {
                let net = net.state.lock().expect("not poisoned");
                let connected = net.peers.values().filter(|p| p.connected).count();
                (net.listen_addrs.clone(), connected)
            }
            None => (vec![], 0),
        };
        Status {
            listen_addrs,
            peers,
            digest: self.inner.docs.sync_fingerprint(),
            store_error: self.store_failure(),
            peer_id: self.inner.peer_id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            docs: self.inner.docs.count(),
            uptime_s: self.inner.started.elapsed().as_secs(),
            data_dir: self.inner.config.node.data_dir.display().to_string(),
            actor: self.inner.docs.actor().to_hex_string(),
            boot: self.inner.boot,
            api: self.api_addr().map(|a| format!("http://{a}")),
            store_bytes,
            flushes: stats.flushes.load(std::sync::atomic::Ordering::Relaxed),
            flushed_writes: stats.writes.load(std::sync::atomic::Ordering::Relaxed),
            lazy_rounds: stats.lazy.load(std::sync::atomic::Ordering::Relaxed),
            workflows: self.inner.workflows.stats(),
            changes_local,
            changes_remote,
            tasks: self.inner.progress.list(),
            docs_lacking: self.inner.docs.sync_stats().map(|s| s.docs_lacking),
            docs_cached: self.inner.docs.cache_usage().0 as u64,
            docs_cached_peak: self.inner.docs.cache_peak_docs() as u64,
            light: self.inner.config.node.light,
            config: Some(self.inner.config.redacted()),
            automerge_servers: self
                .inner
                .server_links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            mqtt: self.inner.mqtt.info(),
        }
    }

    /// The `[[mqtt]]` bridges' numbers.
    pub fn mqtt_bridges(&self) -> Vec<crate::mqtt::BridgeInfo> {
        self.inner.mqtt.info()
    }

    /// The MQTT bridges' dead letters, newest first, with ids below
    /// `before`, and how many are kept. Reads sled: call it off the async
    /// executor.
    ///
    /// # Errors
    /// The store's.
    pub fn dead_letters(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<(Vec<serde_json::Value>, usize), Error> {
        let letters = self.inner.store.dead_letters(limit, before)?;
        let count = self.inner.store.dead_letter_count()?;
        let letters = letters
            .into_iter()
            .map(|(id, bytes)| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                if let Some(m) = v.as_object_mut() {
                    m.insert("id".into(), id.into());
                }
                v
            })
            .collect();
        Ok((letters, count))
    }

    /// Removes a dead letter once handled; false if there was none.
    ///
    /// # Errors
    /// The store's.
    pub fn remove_dead_letter(&self, id: u64) -> Result<bool, Error> {
        Ok(self.inner.store.remove_dead_letter(id)?)
    }

    /// A token cancelled when the node shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// The tracker of the node's tasks: shutdown waits for them (and they
    /// drop their clones of the node) before it returns.
    pub(crate) fn task_tracker(&self) -> TaskTracker {
        self.inner.tasks.clone()
    }

    /// Stops the node: the API stops accepting and finishes in-flight requests
    /// (bounded by `perf.shutdown_timeout_ms`), the store is flushed, the flush
    /// thread exits. Idempotent. When the last clone of the node (and every
    /// [`DocHandle`]) is dropped afterwards, the data dir is sealed so the next
    /// start can detect files damaged in between.
    ///
    /// # Errors
    /// A failed final flush.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let timeout = Duration::from_millis(self.inner.config.perf.shutdown_timeout_ms);
        let net = self.inner.net.lock().expect("not poisoned").clone();
        if let Some(net) = net
            && tokio::time::timeout(timeout, net.shutdown()).await.is_err()
        {
            tracing::warn!(
                ?timeout,
                "the network did not stop before the shutdown timeout"
            );
        }
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(timeout, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "in-flight requests did not finish before the shutdown timeout"
            );
        }
        self.inner.docs.close().await;
        let flushed = self.inner.docs.flush().await;
        self.inner.commit.stop().await;
        let thread = self.inner.flush_thread.lock().expect("not poisoned").take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        match flushed {
            Ok(()) | Err(DocError::Store(crate::store::StoreError::Closed)) => {}
            Err(e) => return Err(e.into()),
        }
        // Seal the data dir when the last handle to the store is dropped.
        self.inner
            .seal
            .armed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!("node stopped");
        Ok(())
    }
}

/// A handle to one document.
#[derive(Clone)]
pub struct DocHandle {
    docs: Docs,
    id: DocId,
}

impl DocHandle {
    /// The document id.
    pub fn id(&self) -> &DocId {
        &self.id
    }

    /// The whole document as JSON.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn get(&self) -> Result<serde_json::Value, Error> {
        Ok(self.docs.get(self.id.clone(), None).await?)
    }

    /// The value at a JSON Pointer.
    ///
    /// # Errors
    /// As [`DocHandle::get`], plus [`DocError::BadPath`] and [`DocError::PathNotFound`].
    pub async fn get_path(&self, path: &str) -> Result<serde_json::Value, Error> {
        let ptr = Pointer::parse(path)?;
        Ok(self.docs.get(self.id.clone(), Some(ptr)).await?)
    }

    /// Applies a JSON merge patch (creating the document if absent); returns once
    /// it is durable.
    ///
    /// # Errors
    /// [`DocError::Deleted`], the change's own errors (nothing is stored then),
    /// size caps, store errors; [`DocError::Reserved`] for a system doc (`_mergeflow/...`)
    pub async fn patch(&self, patch: serde_json::Value) -> Result<WriteResult, Error> {
        crate::doc::user_writable(&self.id)?;
        Ok(self
            .docs
            .write(self.id.clone(), Change::Patch(patch))
            .await?)
    }

    /// Applies explicit ops as one change, all or nothing; returns once durable.
    ///
    /// # Errors
    /// [`DocError::Deleted`], the change's own errors (nothing is stored then),
    /// size caps, store errors; [`DocError::Reserved`] for a system doc (`_mergeflow/...`)
    pub async fn ops(&self, ops: Vec<crate::doc::Op>) -> Result<WriteResult, Error> {
        crate::doc::user_writable(&self.id)?;
        Ok(self.docs.write(self.id.clone(), Change::Ops(ops)).await?)
    }

    /// Runs `f` over an Automerge transaction as one change; returns once durable.
    /// If `f` fails, nothing is stored.
    ///
    /// # Errors
    /// `f`'s error, size caps, store errors.; [`DocError::Reserved`] for a system doc (`_mergeflow/...`)
    pub async fn change<F>(&self, f: F) -> Result<WriteResult, Error>
    where
        F: FnOnce(
                &mut automerge::transaction::Transaction<'_>,
            ) -> Result<(), automerge::AutomergeError>
            + Send
            + 'static,
    {
        crate::doc::user_writable(&self.id)?;
        Ok(self
            .docs
            .write(self.id.clone(), Change::Closure(Box::new(f)))
            .await?)
    }

    /// Current heads.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn heads(&self) -> Result<Vec<String>, Error> {
        Ok(self.docs.heads(self.id.clone()).await?)
    }

    /// The document's changes.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn history(&self) -> Result<Vec<HistoryEntry>, Error> {
        Ok(self.docs.history(self.id.clone()).await?)
    }

    /// Deletes the document, leaving a tombstone.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].; [`DocError::Reserved`] for a system doc (`_mergeflow/...`)
    pub async fn delete(&self) -> Result<WriteResult, Error> {
        crate::doc::user_writable(&self.id)?;
        Ok(self.docs.delete(self.id.clone()).await?)
    }
}
