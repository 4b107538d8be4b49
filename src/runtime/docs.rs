//! [`Docs`], the runtime's front door: starts the writer thread and queues
//! local writes for it, hands out the sync [`Inbox`](super::Inbox), and
//! answers for the sync core's view and replica confirmations. Reads are in
//! `read.rs`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use automerge::{ActorId, ChangeHash};
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};

use super::host::SyncRuntime;
use super::inbox::Inbox;
use super::state::{
    Change, ChangeCounts, DocsConfig, Inner, Parts, PeerSyncView, WriteOp, WriteOpts, WriteReq,
    WriteResult, WriteTags, blocking, stored_state,
};
use super::writer::WriterMsg;
use crate::doc::cache::{DocCache, Loaded, lock_slot};
use crate::doc::{DocError, DocId};
use crate::sync::{Core, Output, SyncConfig};

/// The document service. Cheap to clone.
#[derive(Clone)]
pub struct Docs {
    pub(super) inner: Arc<Inner>,
    writer: mpsc::Sender<WriterMsg>,
}

impl Docs {
    /// Fault injection for tests: while `on`, the store fails as sled does
    /// after an I/O error (see [`crate::store::Store::fail`]).
    #[doc(hidden)]
    #[cfg(feature = "test-utils")]
    pub fn fail_store(&self, on: bool) {
        self.inner.store.fail(on);
    }

    /// Fault injection for tests: while `on`, flushes wait (see
    /// [`crate::store::Store::pause_flushes`]).
    #[doc(hidden)]
    #[cfg(feature = "test-utils")]
    pub fn pause_flushes(&self, on: bool) {
        self.inner.store.pause_flushes(on);
    }

    /// Starts the service over `parts.store`, writing with `parts.actor`, and
    /// its writer thread. With `sync`, the writer also runs the sync core,
    /// whose outputs go to the given channel (the network shell's).
    ///
    /// # Errors
    /// Store errors while reading document metadata.
    pub fn new(
        parts: Parts,
        cfg: DocsConfig,
        sync: Option<(SyncConfig, mpsc::Sender<Output>)>,
    ) -> Result<Docs, DocError> {
        let Parts {
            store,
            commit,
            actor,
            feed,
            origin,
            queues,
            signer,
            policy,
        } = parts;
        let metas = store.list_docs()?;
        let live = metas
            .iter()
            .filter(|(_, m)| m.deleted_at_ms.is_none())
            .count() as i64;
        let urls = super::state::UrlIndex::default();
        let ids: Vec<DocId> = metas
            .iter()
            .filter_map(|(id, _)| DocId::new(id.as_str()).ok())
            .collect();
        urls.add(&ids);
        drop(ids);
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
                policy_seen: None,
                leftover_sigs: Default::default(),
            }
        });
        let (tx, rx) = queues.channel("writer", cfg.write_queue);
        let cache = DocCache::new(
            store.clone(),
            actor.clone(),
            cfg.cache_docs,
            cfg.cache_doc_bytes,
        );
        let inner = Arc::new(Inner {
            store,
            commit,
            actor,
            cfg,
            cache,
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
            urls,
            signer,
            policy,
            flushed: Default::default(),
            wake: std::sync::OnceLock::new(),
            compactor: Default::default(),
        });
        let weak = tx.downgrade();
        let _ = inner.wake.set(Arc::new(move || {
            // A full queue means the writer runs another round soon anyway.
            if let Some(tx) = weak.upgrade() {
                let _ = tx.try_send(WriterMsg::Sync(Vec::new()));
            }
        }));
        let thread_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("mergeflow-writer".into())
            .spawn(move || super::writer::run(thread_inner, rx, sync))
            .map_err(|e| DocError::Internal(format!("cannot start the writer thread: {e}")))?;
        *inner.writer_thread.lock().expect("not poisoned") = Some(handle);
        Ok(Docs { inner, writer: tx })
    }

    /// The doc whose automerge URL has these 16 bytes
    /// ([`crate::id::url_key`]), if this node has heard of one; never a
    /// system doc.
    pub fn doc_for_url(&self, key: &[u8; 16]) -> Option<DocId> {
        self.inner.urls.get(key)
    }

    /// Number of live (not deleted) documents.
    pub fn count(&self) -> u64 {
        self.inner.live_docs.load(Ordering::Relaxed).max(0) as u64
    }

    /// Documents loaded in memory and their stored bytes.
    pub fn cache_usage(&self) -> (usize, u64) {
        self.inner.cache.usage()
    }

    /// The most documents held in memory at once since start (`store.cache_docs`
    /// bounds it, plus those a writer round or a reader is using).
    pub fn cache_peak_docs(&self) -> usize {
        self.inner.cache.peak_docs()
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
        self.create_by(id.unwrap_or_else(DocId::generate), value, ack, None)
            .await
    }

    /// As [`create_with`](Self::create_with), made by the scoped API token
    /// named `by` when there is one (recorded in the change).
    ///
    /// # Errors
    /// As [`create`](Self::create).
    pub async fn create_by(
        &self,
        id: DocId,
        value: Json,
        ack: bool,
        by: Option<String>,
    ) -> Result<WriteResult, DocError> {
        let Json::Object(map) = value else {
            return Err(DocError::BadValue(
                "\"value\" must be a JSON object: the document root is an object".into(),
            ));
        };
        let tags = WriteTags {
            by,
            ..WriteTags::default()
        };
        self.submit(id, WriteOp::Create(map), ack, tags).await
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
        self.write_opts(
            id,
            change,
            WriteOpts {
                ack,
                idem: Some(key),
                ..WriteOpts::default()
            },
        )
        .await
    }

    /// A write with every option: `ack` as for [`write_with`](Self::write_with),
    /// `idem` as for [`write_idempotent`](Self::write_idempotent), and `by`,
    /// the scoped API token making it, recorded in the change (`by=<name>`,
    /// `/history` → `by`).
    ///
    /// # Errors
    /// As [`write_idempotent`](Self::write_idempotent).
    pub async fn write_opts(
        &self,
        id: DocId,
        change: Change,
        opts: WriteOpts,
    ) -> Result<WriteResult, DocError> {
        if let Some(key) = &opts.idem {
            crate::doc::stamp::check_idempotency_key(key).map_err(DocError::BadValue)?;
        }
        // The request's fingerprint, for a write with a key only.
        let coalesce = opts.coalesce && opts.idem.is_some() && !opts.ack;
        let body = match &change {
            _ if opts.idem.is_none() || coalesce => None,
            Change::Patch(p) => serde_json::to_vec(p).ok().map(|b| ("patch", b)),
            Change::Ops(ops) => serde_json::to_vec(ops).ok().map(|b| ("ops", b)),
            Change::Closure(_) | Change::SetIfDifferent(_) => None,
        };
        let req = body.map(|(kind, body)| crate::doc::stamp::fingerprint(kind, &body));
        let tags = WriteTags {
            cause: None,
            idem: opts.idem,
            req,
            lazy: false,
            by: opts.by,
            coalesce,
        };
        self.submit(id, WriteOp::Change(change), opts.ack, tags)
            .await
    }

    /// As [`write`](Self::write), for a workflow run: the change carries
    /// `cause` (as its message, and in the feed). Returns before the change
    /// is durable: the next flush (within `store.remote_flush_ms`) covers
    /// it. A run records that it finished after this returns, and sled
    /// recovers a prefix of its log after a crash, so a crash that loses the
    /// change loses the record too, and the run resumes and writes again.
    ///
    /// With `idem`, applied at most once per key and doc, as for
    /// [`write_idempotent`](Self::write_idempotent).
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub async fn write_caused(
        &self,
        id: DocId,
        change: Change,
        cause: crate::feed::Cause,
        idem: Option<String>,
    ) -> Result<WriteResult, DocError> {
        let tags = WriteTags {
            cause: Some(cause),
            idem,
            lazy: true,
            ..WriteTags::default()
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
        self.merge_signed(id, data, Vec::new()).await
    }

    /// As [`merge`](Self::merge), with the signatures of the changes (as a
    /// backup carries them): a change keeps its signature where it verifies
    /// and its signer may write the doc; this node signs the rest.
    ///
    /// # Errors
    /// As [`merge`](Self::merge).
    pub async fn merge_signed(
        &self,
        id: DocId,
        data: Vec<u8>,
        sigs: Vec<u8>,
    ) -> Result<WriteResult, DocError> {
        self.submit(
            id,
            WriteOp::Merge { data, sigs },
            false,
            WriteTags::default(),
        )
        .await
    }

    /// The stored signatures of document `id`'s changes, as a backup
    /// carries them (a change hash and its signature, each). Blocking.
    ///
    /// # Errors
    /// Store errors.
    pub fn signatures(&self, id: &DocId) -> Result<Vec<u8>, DocError> {
        let mut out = Vec::new();
        for (hash, sig) in self.inner.store.sigs(id.as_str())? {
            // A deleted doc's tombstone signature is not a change's.
            if hash != crate::trust::TOMBSTONE_HASH {
                crate::trust::push_entry(&mut out, &hash, &sig);
            }
        }
        Ok(out)
    }

    /// Document `id` as one Automerge save (what `Automerge::load` reads),
    /// or `None` if it does not exist or was deleted. Blocking: reads the
    /// store.
    ///
    /// # Errors
    /// Store errors, or a doc that does not load.
    pub fn saved(&self, id: &DocId) -> Result<Option<Vec<u8>>, DocError> {
        self.inner.cache.saved_bytes(id)
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

    /// What each peer last confirmed it stores of `id` (since it connected).
    pub fn held(&self, id: &DocId) -> std::collections::BTreeMap<String, super::Held> {
        self.inner.replicas.held(id.as_str())
    }

    /// The runtime's sync inbox, for a transport to hand it peers' input.
    pub fn inbox(&self) -> Inbox {
        Inbox {
            inner: self.inner.clone(),
            writer: self.writer.clone(),
        }
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

    /// Messages waiting for the writer thread: local writes and peers'
    /// input not yet taken into a round.
    pub fn queued(&self) -> usize {
        self.writer.max_capacity() - self.writer.capacity()
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
        if !self.inner.cache.is_loaded(&id) {
            self.with_doc(id.clone(), |_, _, _| Ok(())).await?;
        }
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Write(WriteReq {
                carried: 0,
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
    pub(super) async fn with_doc<R, F>(&self, id: DocId, f: F) -> Result<R, DocError>
    where
        R: Send + 'static,
        F: FnOnce(&Inner, &DocId, &mut Loaded) -> Result<R, DocError> + Send + 'static,
    {
        let inner = self.inner.clone();
        blocking(move || {
            let slot = inner.cache.entry(&id);
            let mut guard = lock_slot(&slot);
            let loaded = inner.cache.ensure_loaded(&id, &mut guard)?;
            let result = f(&inner, &id, loaded);
            inner.cache.note_size(&id, loaded);
            result
        })
        .await
    }
}
