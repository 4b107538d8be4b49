//! The engine: the handle the node and the API hold ([`Engine`]): it lists,
//! checks, applies and deletes definitions, lists runs, and hands retry and
//! skip to the runner. The work is done in the other files of this folder:
//!
//! - `catalog.rs`: loading and checking definitions (files, applied);
//! - `trigger.rs`: coalescing triggers into pending runs (pure, no I/O);
//! - `runner.rs`: the engine's task, from change events to runs;
//! - `lifecycle.rs`: starting, resuming and reopening one run;
//! - `step.rs`: executing a run's steps (data steps, effects, retries);
//! - `ownership.rs`: which node runs an effect, the markers, membership;
//! - `effect.rs`: running one effect (http, exec), marker and owner rules;
//! - `shared.rs`: what these share, and `off_executor` for store calls;
//! - `log.rs`, `run.rs`: the run log and its records;
//! - `def.rs`, `plan.rs`, `expr.rs`, `error.rs`: the definition format,
//!   its checked plan, expressions, errors.
//!
//! # How a merge becomes a run
//!
//! 1. Every change event (a local write or a merge from a peer, see
//!    [`crate::feed`]) is matched against each workflow's trigger: doc glob,
//!    origin, changed-path glob. A match marks (workflow, doc) pending. Events
//!    for a pending (workflow, doc) coalesce: triggers fire on state, so one
//!    run takes the newest state. Merges from peers wait
//!    `workflow.remote_delay_ms` first, so that the peer's own derived writes,
//!    usually right behind, arrive before the run looks.
//! 2. A run reads the doc and its heads together. If the workflow's trigger
//!    cursor for that doc already holds those heads, the state was taken
//!    before and nothing happens: no state runs twice on one node. Otherwise
//!    the `[on] when` condition is tested (false: only the cursor moves), and
//!    the run record is written with the cursor in one sled batch.
//! 3. Steps execute in order; `derive` and `write` compute their values and
//!    write only what differs, as one change whose message names the
//!    workflow and the chain depth (see [`crate::feed::Cause`]). A change a
//!    workflow wrote does not trigger that workflow again; changes it
//!    triggers elsewhere are one level deeper, and a run deeper than
//!    `workflow.max_depth` is dead-lettered instead of run.
//! 4. A step that fails retries with its backoff (expression errors are
//!    final at once: they would fail the same way again); after the last
//!    attempt the run is dead with its error, and waits for `retry` or
//!    `skip`. A dead effect is one decision for the cluster: recorded in
//!    the effect's marker (see [`super::effect::Marker`]), followed by the
//!    other nodes' runs of that key, and so are `retry` and `skip`.
//!
//! Runs of one (workflow, doc) never overlap. After a restart, open runs
//! resume (steps already done are not repeated), and every doc whose heads
//! differ from its cursor gets a run, so states merged while the node was
//! down, or while no definition was loaded, are taken too.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use super::catalog::{Applied, applied_doc};
use super::catalog::{Catalog, runs_commands};
use super::def::DefError;
use super::error::WorkflowError;
use super::expr::Sandbox;
use super::log::RunLog;
use super::plan::{Plan, kind_name};
use super::run::{Run, RunStatus};
use super::runner::{Command, Runner};
pub use super::shared::LivePeers;
use super::shared::{Counters, Shared};
use crate::config::WorkflowConfig;
use crate::doc::{DocError, DocId, Pointer};
use crate::feed::Feed;
use crate::runtime::{Change, Docs};
use crate::store::Store;

/// Why `apply` refuses a definition that runs commands, and `validate`
/// warns about it.
pub const APPLY_EXEC_REFUSED: &str = "it runs commands (exec): apply refuses it on this node \
    unless workflow.allow_applied_exec = true; as a file in the workflow dir it runs";

/// A workflow as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowInfo {
    /// Its name (for an invalid file: the file name).
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// False if the file does not load; `error` says why.
    pub valid: bool,
    /// `active` (runs here), `disabled`, `not for this node (labels)`, or
    /// `invalid`.
    pub state: &'static str,
    /// Why it does not load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The trigger's doc glob.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
    /// The trigger's path glob.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Step ids and kinds, in execution order.
    pub steps: Vec<StepInfo>,
    /// What a valid definition will not do here (e.g. be applied through
    /// the API): from `validate`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What `DELETE /v1/workflows/{name}` did.
#[derive(Debug, Clone, Serialize)]
pub struct Deleted {
    /// The workflow.
    pub name: String,
    /// True: its applied definition is gone (on every node, as its system
    /// doc syncs).
    pub deleted: bool,
    /// A file in this node's workflow dir that still defines a workflow of
    /// that name here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// A step as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct StepInfo {
    /// Its id.
    pub id: String,
    /// Its kind.
    pub kind: &'static str,
    /// Steps it needs.
    pub needs: Vec<String>,
}

impl WorkflowInfo {
    fn of(plan: &Plan, state: &'static str) -> WorkflowInfo {
        WorkflowInfo {
            name: plan.name().to_string(),
            file: plan.source_name.clone(),
            valid: true,
            state,
            error: None,
            doc: plan.def.trigger.doc.as_ref().map(|(p, _)| p.clone()),
            path: plan.def.trigger.path.clone(),
            steps: plan
                .def
                .steps
                .iter()
                .map(|s| StepInfo {
                    id: s.id.clone(),
                    kind: kind_name(&s.action),
                    needs: s.needs.clone(),
                })
                .collect(),
            warnings: vec![],
        }
    }
}

/// Counters since start.
#[derive(Debug, Default, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EngineStats {
    /// Workflows loaded and valid.
    pub workflows: u64,
    /// Definition files that do not load.
    pub invalid: u64,
    /// Runs created.
    pub runs: u64,
    /// Runs finished with every step done or skipped.
    pub done: u64,
    /// Runs dead-lettered.
    pub dead: u64,
    /// Dead runs in the log now, waiting for retry or skip (since start or
    /// before).
    pub dead_waiting: u64,
    /// Runs whose steps wrote nothing (the values were already there).
    pub unchanged: u64,
    /// Triggers folded into a pending run of the same (workflow, doc).
    pub coalesced: u64,
}

/// The workflow engine of one node. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    cmds: mpsc::Sender<Command>,
}

impl Engine {
    /// Starts the engine: loads the definitions in `cfg.dir` (resolved by
    /// the caller: not empty), resumes open runs, and follows `feed` until
    /// `cancel` (with `run` given; without it nothing runs). `node` is this node's peer id and labels (`node.labels`).
    pub fn start(
        docs: Docs,
        store: Store,
        feed: Arc<Feed>,
        node: (String, BTreeMap<String, String>),
        cfg: WorkflowConfig,
        run: Option<(CancellationToken, &tokio_util::task::TaskTracker)>,
    ) -> Engine {
        let (local, labels) = node;
        let (log, open) = RunLog::open(store.clone());
        // Validated with the config.
        let http_allow = crate::http_allow::HttpAllow::new(&cfg.http_allow).unwrap_or_default();
        // Validated with the config too; a file gone since is logged.
        let roots = match cfg.tls_ca.as_os_str().is_empty() {
            true => vec![],
            false => crate::http_allow::read_ca(&cfg.tls_ca).unwrap_or_else(|e| {
                tracing::error!(err = %e, "workflow.tls_ca: https steps trust the system's CAs only");
                vec![]
            }),
        };
        let shared = Arc::new(Shared {
            sandbox: Sandbox::new(),
            docs,
            feed: feed.clone(),
            store,
            log,
            local,
            live: RwLock::new(None),
            http: crate::http_allow::client_builder(&roots)
                .build()
                .expect("reqwest client builds"),
            http_applied: http_allow.clone().client(&roots),
            http_allow,
            labels,
            dir: cfg.dir.clone(),
            cfg,
            catalog: RwLock::new(Catalog::default()),
            counters: Counters::default(),
            run_latency: crate::latency::histogram(),
        });
        let (tx, rx) = mpsc::channel(64);
        let engine = Engine {
            shared: shared.clone(),
            cmds: tx,
        };
        // Without a runner nothing runs; commands fail as if it had stopped.
        if let Some((cancel, tasks)) = run {
            tasks.spawn(Runner::new(shared, feed).run(rx, open, cancel));
        }
        engine
    }

    /// Tells the engine how to list the connected peers, among which effects
    /// find their owner. Until then this node owns every effect.
    pub fn set_live_peers(&self, live: LivePeers) {
        *self.shared.live.write().unwrap_or_else(|p| p.into_inner()) = Some(live);
    }

    /// Every workflow: the valid ones by name, then the files that do not load.
    pub fn list(&self) -> Vec<WorkflowInfo> {
        let catalog = self.shared.catalog();
        let mut out: Vec<WorkflowInfo> = catalog
            .plans
            .values()
            .map(|p| WorkflowInfo::of(p, "active"))
            .chain(
                catalog
                    .inactive
                    .values()
                    .map(|(p, why)| WorkflowInfo::of(p, why)),
            )
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(catalog.invalid.iter().map(|(file, error)| {
            let stem = file
                .strip_prefix("applied:")
                .map(str::to_string)
                .unwrap_or_else(|| {
                    Path::new(file)
                        .file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_default()
                });
            WorkflowInfo {
                name: stem,
                file: file.clone(),
                valid: false,
                state: "invalid",
                error: Some(error.clone()),
                doc: None,
                path: None,
                steps: vec![],
                warnings: vec![],
            }
        }));
        out
    }

    /// One workflow by name.
    ///
    /// # Errors
    /// [`WorkflowError::NoWorkflow`].
    pub fn get(&self, name: &str) -> Result<WorkflowInfo, WorkflowError> {
        self.list()
            .into_iter()
            .find(|w| w.name == name)
            .ok_or_else(|| WorkflowError::NoWorkflow(name.to_string()))
    }

    /// Checks a definition without loading it.
    ///
    /// # Errors
    /// What is wrong with it.
    pub fn validate(&self, source_name: &str, text: &str) -> Result<WorkflowInfo, WorkflowError> {
        let plan = Plan::load(&self.shared.sandbox, source_name, text)?;
        let mut info = WorkflowInfo::of(&plan, "valid");
        if runs_commands(&plan) && !self.shared.cfg.allow_applied_exec {
            info.warnings.push(APPLY_EXEC_REFUSED.into());
        }
        if let Some(why) = plan.refused_url(&self.shared.http_allow) {
            info.warnings
                .push(format!("apply refuses it on this node: {why}"));
        }
        Ok(info)
    }

    /// Stores a definition in its system doc (`_mergeflow/workflows/<name>`),
    /// which syncs to every node; each runs it where its labels match. A
    /// file of the same name on a node wins there.
    ///
    /// # Errors
    /// What is wrong with the definition; store errors.
    pub async fn apply(&self, text: &str) -> Result<WorkflowInfo, WorkflowError> {
        let plan = Plan::load(&self.shared.sandbox, "request body", text)?;
        if runs_commands(&plan) && !self.shared.cfg.allow_applied_exec {
            return Err(WorkflowError::Def(DefError {
                source_name: "request body".into(),
                what: "exec steps cannot be applied through the API unless \
                       workflow.allow_applied_exec = true; put the file in the workflow dir"
                    .into(),
            }));
        }
        if let Some(why) = plan.refused_url(&self.shared.http_allow) {
            return Err(WorkflowError::Def(DefError {
                source_name: "request body".into(),
                what: format!("{why}; or put the file in the workflow dir"),
            }));
        }
        let values = [
            ("/text", Json::String(text.to_string())),
            ("/enabled", Json::Bool(true)),
        ];
        self.write_applied(plan.name(), &values).await?;
        Ok(WorkflowInfo::of(&plan, "applied"))
    }

    /// Sets `values` (JSON Pointer, value) in workflow `name`'s system doc.
    async fn write_applied(
        &self,
        name: &str,
        values: &[(&str, Json)],
    ) -> Result<(), WorkflowError> {
        let failed = |e: DocError| WorkflowError::Write(e.to_string());
        let id = DocId::new(applied_doc(name)).map_err(failed)?;
        let values = values
            .iter()
            .map(|(p, v)| Ok((Pointer::parse(p)?, v.clone())))
            .collect::<Result<Vec<_>, DocError>>()
            .map_err(failed)?;
        self.shared
            .docs
            .write(id, Change::SetIfDifferent(values))
            .await
            .map_err(failed)?;
        Ok(())
    }

    /// Removes the definition of workflow `name` applied through the API,
    /// on every node: its system doc keeps no text (a tombstone would stop
    /// the name from being applied again), which syncs, and each node
    /// unloads it. Runs in flight finish; pending ones do not start. A file
    /// of that name in a node's workflow dir is not touched and keeps
    /// defining the workflow on that node.
    ///
    /// # Errors
    /// [`WorkflowError::DefinedByFile`] when only a file defines it here,
    /// [`WorkflowError::NoWorkflow`] when nothing does; write errors.
    pub async fn delete(&self, name: &str) -> Result<Deleted, WorkflowError> {
        let text = self.applied_text(name).await?.is_some();
        let file = self
            .list()
            .into_iter()
            .find(|w| w.name == name && !w.file.starts_with("applied:"))
            .map(|w| w.file);
        if !text {
            return Err(match file {
                Some(file) => WorkflowError::DefinedByFile {
                    name: name.to_string(),
                    file,
                },
                None => WorkflowError::NoWorkflow(name.to_string()),
            });
        }
        self.write_applied(name, &[("/text", Json::Null)]).await?;
        Ok(Deleted {
            name: name.to_string(),
            deleted: true,
            file,
        })
    }

    /// Enables or disables workflow `name` on every node (through its system
    /// doc, which syncs), whether a file or `apply` defined it.
    ///
    /// # Errors
    /// [`WorkflowError::NoWorkflow`] for a name this node does not know.
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<WorkflowInfo, WorkflowError> {
        // A definition just applied may not be loaded yet (the runner
        // reloads from the feed): its stored text names it too.
        let mut info = match self.get(name) {
            Ok(info) => info,
            Err(WorkflowError::NoWorkflow(_)) => self.applied_info(name).await?,
            Err(e) => return Err(e),
        };
        self.write_applied(name, &[("/enabled", Json::Bool(enabled))])
            .await?;
        info.state = if enabled { "enabled" } else { "disabled" };
        Ok(info)
    }

    /// The stored text of workflow `name`'s applied definition (None when
    /// none was applied, or it was deleted).
    async fn applied_text(&self, name: &str) -> Result<Option<String>, WorkflowError> {
        let Ok(id) = DocId::new(applied_doc(name)) else {
            return Err(WorkflowError::NoWorkflow(name.to_string()));
        };
        match self.shared.docs.get(id, None).await {
            Ok(j) => Ok(j["text"].as_str().map(str::to_string)),
            Err(DocError::NotFound(_) | DocError::Deleted(_)) => Ok(None),
            Err(e) => Err(WorkflowError::Write(e.to_string())),
        }
    }

    /// Workflow `name` as its applied definition (stored, maybe not loaded
    /// yet) describes it.
    async fn applied_info(&self, name: &str) -> Result<WorkflowInfo, WorkflowError> {
        let Some(text) = self.applied_text(name).await? else {
            return Err(WorkflowError::NoWorkflow(name.to_string()));
        };
        let plan = Plan::load(&self.shared.sandbox, &format!("applied:{name}"), &text)?;
        Ok(WorkflowInfo::of(&plan, "applied"))
    }

    /// Runs, newest first: of `workflow` and in `status` if given, at most `limit`.
    ///
    /// # Errors
    /// Run log errors.
    pub fn runs(
        &self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<Run>, WorkflowError> {
        self.shared.log.list_before(workflow, status, None, limit)
    }

    /// As [`runs`](Self::runs), only runs with an id below `before` (the
    /// last id of the previous page): the next page, newest first.
    ///
    /// # Errors
    /// Run log errors.
    pub fn runs_before(
        &self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Run>, WorkflowError> {
        self.shared
            .log
            .list_before(workflow, status, Some(before), limit)
    }

    /// One run.
    ///
    /// # Errors
    /// [`WorkflowError::NoRun`], run log errors.
    pub fn run(&self, id: u64) -> Result<Run, WorkflowError> {
        self.shared.log.get(id)
    }

    /// Runs a dead run again from its failed step, on the doc's current state.
    ///
    /// # Errors
    /// [`WorkflowError::NoRun`], [`WorkflowError::WrongState`] unless dead.
    pub async fn retry(&self, id: u64) -> Result<Run, WorkflowError> {
        self.command(|tx| Command::Retry(id, tx)).await
    }

    /// Marks a dead run skipped: nothing more is attempted.
    ///
    /// # Errors
    /// [`WorkflowError::NoRun`], [`WorkflowError::WrongState`] unless dead.
    pub async fn skip(&self, id: u64) -> Result<Run, WorkflowError> {
        self.command(|tx| Command::Skip(id, tx)).await
    }

    async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Run, WorkflowError>>) -> Command,
    ) -> Result<Run, WorkflowError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(make(tx))
            .await
            .map_err(|_| WorkflowError::Stopped)?;
        rx.await.map_err(|_| WorkflowError::Stopped)?
    }

    /// Runs executed so far: how long each spent running its steps.
    pub fn run_latency(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.shared.run_latency.clone()
    }

    /// Counters since start.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        let catalog = self.shared.catalog();
        EngineStats {
            workflows: catalog.plans.len() as u64,
            invalid: catalog.invalid.len() as u64,
            runs: c.runs.load(Ordering::Relaxed),
            done: c.done.load(Ordering::Relaxed),
            dead: c.dead.load(Ordering::Relaxed),
            dead_waiting: self.shared.log.dead(),
            unchanged: c.unchanged.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
        }
    }
}
