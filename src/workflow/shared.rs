//! What the engine's parts share: the node's docs, store, run log, feed and
//! config, the catalog, the counters; and [`off_executor`], which every
//! store (sled) call made from async code goes through.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use super::catalog::{Applied, Catalog};
use super::expr::Sandbox;
use super::log::RunLog;
use super::plan::Plan;
use super::run::Run;
use crate::config::WorkflowConfig;
use crate::feed::Feed;
use crate::runtime::Docs;
use crate::store::{Store, StoreError};

#[derive(Default)]
pub(super) struct Counters {
    pub(super) runs: AtomicU64,
    pub(super) done: AtomicU64,
    pub(super) dead: AtomicU64,
    pub(super) unchanged: AtomicU64,
    pub(super) coalesced: AtomicU64,
}

/// The peer ids of the connected peers (set by the node once its network runs).
pub type LivePeers = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

pub(super) struct Shared {
    pub(super) sandbox: Sandbox,
    pub(super) docs: Docs,
    pub(super) feed: Arc<Feed>,
    pub(super) store: Store,
    pub(super) log: RunLog,
    /// This node's peer id.
    pub(super) local: String,
    pub(super) live: RwLock<Option<LivePeers>>,
    pub(super) http: reqwest::Client,
    /// For `http` steps of applied definitions: dials only what
    /// `workflow.http_allow` allows.
    pub(super) http_applied: reqwest::Client,
    /// The parsed `workflow.http_allow`.
    pub(super) http_allow: crate::http_allow::HttpAllow,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) cfg: WorkflowConfig,
    pub(super) dir: PathBuf,
    pub(super) catalog: RwLock<Catalog>,
    pub(super) counters: Counters,
    /// Time runs spent executing their steps.
    pub(super) run_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Shared {
    pub(super) fn catalog(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a run record (with the cursor it moves, if given) and
    /// announces the update on the feed's run events. Blocks on the store:
    /// from async code, [`put_run`](Self::put_run).
    pub(super) fn put_run_blocking(
        &self,
        run: &Run,
        cursor: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.log.put(run, cursor)?;
        self.feed.publish_run(crate::feed::RunEvent {
            run: run.id,
            workflow: run.workflow.clone(),
            doc: run.doc.clone(),
            status: format!("{:?}", run.status).to_lowercase(),
            error: run.error.clone(),
            at_ms: run.updated_ms,
        });
        Ok(())
    }

    /// Rebuilds the catalog (see [`super::catalog::reload`]).
    pub(super) fn reload(&self, applied: &BTreeMap<String, Applied>) -> (Vec<Arc<Plan>>, bool) {
        super::catalog::reload(
            &self.catalog,
            &self.dir,
            &self.sandbox,
            &self.labels,
            self.cfg.allow_applied_exec,
            &self.http_allow,
            applied,
        )
    }

    /// [`put_run_blocking`](Self::put_run_blocking) off the executor,
    /// awaited: the record is written (and announced) when this returns,
    /// so records of one run keep their order.
    pub(super) async fn put_run(
        self: &Arc<Self>,
        run: &Run,
        cursor: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let (shared, run, cursor) = (self.clone(), run.clone(), cursor.map(<[u8]>::to_vec));
        off_executor(move || shared.put_run_blocking(&run, cursor.as_deref())).await
    }

    /// The trigger cursor of (`workflow`, `doc`), read off the executor.
    pub(super) async fn cursor(
        &self,
        workflow: &str,
        doc: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (store, workflow, doc) = (self.store.clone(), workflow.to_string(), doc.to_string());
        off_executor(move || store.cursor(&workflow, &doc)).await
    }

    /// Moves the trigger cursor of (`workflow`, `doc`) to `heads`, off the
    /// executor (awaited).
    pub(super) async fn put_cursor(
        &self,
        workflow: &str,
        doc: &str,
        heads: Vec<u8>,
    ) -> Result<(), StoreError> {
        let (store, workflow, doc) = (self.store.clone(), workflow.to_string(), doc.to_string());
        off_executor(move || store.put_cursor(&workflow, &doc, &heads)).await
    }

    /// A new run id, off the executor.
    pub(super) async fn next_run_id(&self) -> Result<u64, StoreError> {
        let store = self.store.clone();
        off_executor(move || store.next_run_id()).await
    }
}

/// Runs `f` (store calls: sled blocks) on the blocking pool and waits for
/// it, so that the async executor's threads never wait on the disk. A
/// panic in `f` goes on in the caller, as it would have had `f` run there.
pub(super) async fn off_executor<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("a blocking store call did not finish: {e}"),
        },
    }
}
