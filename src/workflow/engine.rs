//! The engine: loads definitions from the workflow directory, turns change
//! events into runs, executes their steps, and keeps the run log.
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::def::{Action, Backoff, DefError, Origin, Policy, Retry};
use super::effect::{Failure, Marker, SYSTEM_PREFIX};
use super::error::WorkflowError;
use super::expr::{Bound, Input, Sandbox};
use super::log::RunLog;
use super::plan::{Plan, kind_name};
use super::run::{Run, RunStatus, StepRun, StepState, run_key};
use crate::config::WorkflowConfig;
use crate::doc::{DocError, DocId, Op, Pointer, now_ms};
use crate::feed::{Cause, DocGlob, Feed, FeedItem};
use crate::runtime::{Change, Docs};
use crate::store::{Store, StoreError};

/// How often the workflow directory is checked for changed files.
const DIR_POLL: Duration = Duration::from_secs(1);
/// Most paths kept for `changed` while events coalesce.
const MAX_CHANGED: usize = 256;
/// Runs created between two prunings of the run log.
const PRUNE_EVERY: u64 = 1000;

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

#[derive(Default)]
struct Counters {
    runs: AtomicU64,
    done: AtomicU64,
    dead: AtomicU64,
    unchanged: AtomicU64,
    coalesced: AtomicU64,
}

/// A definition applied through the API, as its system doc holds it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    /// The TOML text (absent when only the enabled flag was set, e.g. to
    /// disable a workflow defined by a file).
    pub text: Option<String>,
    /// False: the workflow does not run, wherever it is defined.
    pub enabled: bool,
}

/// The system doc of an applied definition.
pub fn applied_doc(name: &str) -> String {
    format!("{SYSTEM_PREFIX}workflows/{name}")
}

#[derive(Default)]
struct Catalog {
    /// Workflows running here, by name.
    plans: BTreeMap<String, Arc<Plan>>,
    /// Valid workflows not running here, with why.
    inactive: BTreeMap<String, (Arc<Plan>, &'static str)>,
    /// The applied definitions the catalog was built with.
    applied: BTreeMap<String, Applied>,
    /// Files that do not load: (file, error).
    invalid: Vec<(String, String)>,
    /// (file, modified, length) of every file read, to notice changes.
    seen: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

/// The peer ids of the connected peers (set by the node once its network runs).
pub type LivePeers = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

struct Shared {
    sandbox: Sandbox,
    docs: Docs,
    feed: Arc<Feed>,
    store: Store,
    log: RunLog,
    /// This node's peer id.
    local: String,
    live: RwLock<Option<LivePeers>>,
    http: reqwest::Client,
    labels: BTreeMap<String, String>,
    cfg: WorkflowConfig,
    dir: PathBuf,
    catalog: RwLock<Catalog>,
    counters: Counters,
    /// Time runs spent executing their steps.
    run_latency: prometheus_client::metrics::histogram::Histogram,
}

enum Command {
    Retry(u64, oneshot::Sender<Result<Run, WorkflowError>>),
    Skip(u64, oneshot::Sender<Result<Run, WorkflowError>>),
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
        let shared = Arc::new(Shared {
            sandbox: Sandbox::new(),
            docs,
            feed: feed.clone(),
            store,
            log,
            local,
            live: RwLock::new(None),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("reqwest client builds"),
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
        let text = match DocId::new(applied_doc(name)) {
            Ok(id) => match self.shared.docs.get(id, None).await {
                Ok(j) => j["text"].is_string(),
                Err(DocError::NotFound(_) | DocError::Deleted(_)) => false,
                Err(e) => return Err(WorkflowError::Write(e.to_string())),
            },
            Err(_) => return Err(WorkflowError::NoWorkflow(name.to_string())),
        };
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
        let mut info = self.get(name)?;
        self.write_applied(name, &[("/enabled", Json::Bool(enabled))])
            .await?;
        info.state = if enabled { "enabled" } else { "disabled" };
        Ok(info)
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

/// True if the workflow runs commands (an exec step or exec on_failure).
fn runs_commands(plan: &Plan) -> bool {
    plan.runs_commands()
}

impl Shared {
    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a run record (with the cursor it moves, if given) and
    /// announces the update on the feed's run events.
    fn put_run(&self, run: &Run, cursor: Option<&[u8]>) -> Result<(), StoreError> {
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

    /// Rebuilds the catalog from the workflow directory and the applied
    /// definitions, if a file changed since the last read or `applied`
    /// differs from what the catalog holds. Returns the workflows that are
    /// newly active here or whose text changed, and whether anything changed.
    fn reload(&self, applied: &BTreeMap<String, Applied>) -> (Vec<Arc<Plan>>, bool) {
        let mut files: Vec<(PathBuf, Option<SystemTime>, u64)> = match std::fs::read_dir(&self.dir)
        {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .map(|p| {
                    let m = std::fs::metadata(&p).ok();
                    let modified = m.as_ref().and_then(|m| m.modified().ok());
                    (p, modified, m.map_or(0, |m| m.len()))
                })
                .collect(),
            Err(_) => vec![], // No directory: no workflows.
        };
        files.sort();
        {
            let catalog = self.catalog();
            if files == catalog.seen && *applied == catalog.applied {
                return (vec![], false);
            }
        }
        let mut sources: Vec<(String, Result<String, String>)> = files
            .iter()
            .map(|(path, _, _)| {
                let name = path.display().to_string();
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("cannot read {name}: {e}"));
                (name, text)
            })
            .collect();
        sources.extend(applied.iter().filter_map(|(name, a)| {
            let text = a.text.clone()?;
            Some((format!("applied:{name}"), Ok(text)))
        }));
        let mut plans = BTreeMap::new();
        let mut invalid = Vec::new();
        let mut inactive = BTreeMap::new();
        let mut origin: HashMap<String, String> = HashMap::new();
        for (source, text) in sources {
            let loaded = text.and_then(|text| {
                Plan::load(&self.sandbox, &source, &text).map_err(|e| e.to_string())
            });
            let plan = match loaded {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::error!(source = %source, err = %e, "workflow definition does not load; other workflows keep running");
                    invalid.push((source, e));
                    continue;
                }
            };
            let name = plan.name().to_string();
            if source.starts_with("applied:")
                && runs_commands(&plan)
                && !self.cfg.allow_applied_exec
            {
                invalid.push((
                    source.clone(),
                    format!(
                        "workflow {source}: exec steps in applied definitions are off on this node \
                         (workflow.allow_applied_exec); put the file in the workflow dir instead"
                    ),
                ));
                continue;
            }
            if let Some(first) = origin.get(&name) {
                invalid.push((
                    source.clone(),
                    format!("workflow {source}: name {name:?} is already used by {first}"),
                ));
                continue;
            }
            origin.insert(name.clone(), source);
            let enabled = applied.get(&name).is_none_or(|a| a.enabled);
            let here = plan
                .def
                .nodes
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v));
            if !enabled {
                inactive.insert(name, (plan, "disabled"));
            } else if !here {
                inactive.insert(name, (plan, "not for this node (labels)"));
            } else {
                plans.insert(name, plan);
            }
        }
        let mut catalog = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        let fresh: Vec<Arc<Plan>> = plans
            .values()
            .filter(|p| {
                catalog
                    .plans
                    .get(p.name())
                    .is_none_or(|old| old.text != p.text)
            })
            .cloned()
            .collect();
        for p in &fresh {
            tracing::info!(workflow = %p.name(), source = %p.source_name, "workflow loaded");
        }
        for name in catalog.plans.keys().filter(|n| !plans.contains_key(*n)) {
            tracing::info!(workflow = %name, "workflow unloaded");
        }
        catalog.plans = plans;
        catalog.inactive = inactive;
        catalog.invalid = invalid;
        catalog.seen = files;
        catalog.applied = applied.clone();
        (fresh, true)
    }

    /// Writes this node's membership doc: the workflows it runs, so that
    /// peers count it among the owners of their effects.
    async fn announce(&self) {
        let names: serde_json::Map<String, Json> = self
            .catalog()
            .plans
            .keys()
            .map(|n| (n.clone(), Json::Bool(true)))
            .collect();
        let Ok(id) = DocId::new(super::effect::member_doc(&self.local)) else {
            return;
        };
        let values = vec![
            (
                Pointer::parse("/workflows").expect("valid"),
                Json::Object(names),
            ),
            (
                Pointer::parse("/labels").expect("valid"),
                serde_json::to_value(&self.labels).expect("labels serialize"),
            ),
            // New with every boot, so every boot's actor is in this doc's
            // history: peers tell which node wrote a change by it.
            (
                Pointer::parse("/actor").expect("valid"),
                Json::String(self.docs.actor().to_hex_string()),
            ),
        ];
        if let Err(e) = self.docs.write(id, Change::SetIfDifferent(values)).await {
            tracing::warn!(err = %e, "cannot write this node's workflow membership doc");
        }
    }

    /// The actors (hex) that `peer`'s boots wrote with, as far as its
    /// membership doc's history tells (each boot writes its actor there).
    async fn boots_of(&self, peer: &str) -> Vec<String> {
        match DocId::new(super::effect::member_doc(peer)) {
            Ok(id) => self.docs.actors(id, None).await.unwrap_or_default(),
            Err(_) => vec![],
        }
    }

    /// The nodes an effect of `workflow` may run on: this one, and each
    /// connected peer whose membership doc lists the workflow.
    async fn candidates(&self, workflow: &str) -> Vec<String> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = vec![self.local.clone()];
        for peer in live.map(|f| f()).unwrap_or_default() {
            let Ok(id) = DocId::new(super::effect::member_doc(&peer)) else {
                continue;
            };
            let ptr = Pointer::parse(&format!("/workflows/{workflow}")).expect("a valid pointer");
            if self.docs.get(id, Some(ptr)).await.ok() == Some(Json::Bool(true)) {
                out.push(peer);
            }
        }
        out
    }
}

type Key = (String, String);

/// A (workflow, doc) waiting for a run.
struct Pending {
    depth: u32,
    changed: BTreeSet<String>,
    trigger: &'static str,
    due: Instant,
}

/// The engine's task: owns the queue of pending runs and those in flight.
struct Runner {
    shared: Arc<Shared>,
    feed: Arc<Feed>,
    events: Option<Pin<Box<dyn Stream<Item = FeedItem> + Send>>>,
    pending: HashMap<Key, Pending>,
    /// Keys whose pending run is due, in order.
    ready: VecDeque<Key>,
    /// Keys whose pending run waits, by due time.
    delayed: BTreeMap<(Instant, u64), Key>,
    /// Keys in `ready` or `delayed`.
    queued: HashSet<Key>,
    /// Runs to resume (after a restart, or a retry), waiting for their key.
    resumes: VecDeque<Run>,
    in_flight: HashSet<Key>,
    /// Heads to move the cursor of an in-flight key to when its run ends
    /// with nothing pending (the run's own writes, or states that trigger
    /// nothing).
    take_after: HashMap<Key, Vec<String>>,
    tasks: JoinSet<Key>,
    seq: u64,
    created_at_last_prune: u64,
    /// Next scheduled time (Unix ms) of each scheduled workflow running here.
    ticks: BTreeMap<String, u64>,
    /// Definitions applied through the API, as last read.
    applied: BTreeMap<String, Applied>,
    /// Their docs changed since.
    applied_dirty: bool,
    /// Definitions have been loaded once (at start): later loads label the
    /// runs they start `definition`, not `startup`.
    loaded: bool,
}

impl Runner {
    fn new(shared: Arc<Shared>, feed: Arc<Feed>) -> Runner {
        Runner {
            shared,
            feed,
            events: None,
            pending: HashMap::new(),
            ready: VecDeque::new(),
            delayed: BTreeMap::new(),
            queued: HashSet::new(),
            resumes: VecDeque::new(),
            in_flight: HashSet::new(),
            take_after: HashMap::new(),
            tasks: JoinSet::new(),
            seq: 0,
            created_at_last_prune: 0,
            ticks: BTreeMap::new(),
            applied: BTreeMap::new(),
            applied_dirty: true,
            loaded: false,
        }
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        open: Vec<Run>,
        cancel: CancellationToken,
    ) {
        // Followed from the start, quietly (no changed paths until a
        // workflow runs here): applied definitions may arrive from peers.
        let glob = DocGlob::new("**").expect("a valid glob");
        self.events = Some(Box::pin(self.feed.subscribe_quiet(glob)));
        self.reload().await;
        self.resumes.extend(open);
        // Decisions (retry, skip) taken elsewhere while this node was down.
        self.follow_all_decisions().await;
        let mut poll = tokio::time::interval(DIR_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_runs();
            let next_due = self.delayed.first_key_value().map(|((t, _), _)| *t);
            let next_tick = self
                .ticks
                .values()
                .min()
                .map(|t| Instant::now() + Duration::from_millis(t.saturating_sub(now_ms())));
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(item) = next_event(&mut self.events) => self.on_event(item).await,
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    match done {
                        Ok(key) => self.finished(key),
                        Err(e) => tracing::error!(err = %e, "a workflow run task failed"),
                    }
                }
                _ = sleep_until(next_due), if next_due.is_some() => self.promote(),
                _ = sleep_until(next_tick), if next_tick.is_some() => self.fire_schedules().await,
                _ = poll.tick() => self.reload().await,
                Some(cmd) = cmds.recv() => self.command(cmd).await,
            }
        }
        // Dropping the JoinSet aborts runs in flight; their records stay
        // open and resume after restart.
    }

    /// Reloads definitions (the applied ones too when their docs changed);
    /// asks the feed for changed paths once any workflow runs here (not
    /// before: recording them costs every change), and takes the doc states
    /// new workflows have not seen.
    async fn reload(&mut self) {
        if self.applied_dirty {
            self.applied_dirty = false;
            match read_applied(&self.shared.docs).await {
                Ok(a) => self.applied = a,
                Err(e) => tracing::error!(err = %e, "cannot read applied workflow definitions"),
            }
        }
        let shared = self.shared.clone();
        let applied = self.applied.clone();
        let (fresh, changed) = tokio::task::spawn_blocking(move || shared.reload(&applied))
            .await
            .unwrap_or_default();
        // At start, doc states the node took no run of (written while it
        // was down, or before the workflow existed) are `startup` runs;
        // once running, those a newly loaded or changed definition finds
        // are `definition` runs.
        let trigger = if self.loaded { "definition" } else { "startup" };
        self.loaded = true;
        if !changed {
            return;
        }
        self.shared.announce().await;
        if !self.shared.catalog().plans.is_empty() {
            self.feed.record_paths();
        }
        let now = now_ms();
        let scheduled: Vec<(String, Option<u64>)> = self
            .shared
            .catalog()
            .plans
            .values()
            .map(|p| (p.name().to_string(), next_fire(&p.def.trigger, now)))
            .collect();
        self.ticks = scheduled
            .into_iter()
            .filter_map(|(name, next)| {
                // A workflow that kept its schedule keeps its next time.
                let next = self.ticks.get(&name).copied().or(next)?;
                Some((name, next))
            })
            .collect();
        self.rescan(&fresh, trigger).await;
    }

    /// Starts the scheduled runs that are due, each on its owner only: the
    /// first in rendezvous order, for the tick's key, among the live nodes
    /// that run the workflow. A tick missed while this node was down, or
    /// while the previous scheduled run was still going, is skipped.
    async fn fire_schedules(&mut self) {
        let now = now_ms();
        let due: Vec<(String, u64)> = self
            .ticks
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, t)| (n.clone(), *t))
            .collect();
        for (name, at) in due {
            let Some(plan) = self.shared.catalog().plans.get(&name).cloned() else {
                self.ticks.remove(&name);
                continue;
            };
            match next_fire(&plan.def.trigger, now) {
                Some(next) => self.ticks.insert(name.clone(), next),
                None => self.ticks.remove(&name),
            };
            let heads = vec![format!("schedule:{at}")];
            let key = run_key(&name, "", &heads);
            let candidates = self.shared.candidates(&name).await;
            if super::effect::owner(&key, &candidates) != Some(&self.shared.local) {
                continue;
            }
            let slot = (name.clone(), String::new());
            if self.in_flight.contains(&slot) {
                tracing::warn!(workflow = %name, "scheduled run skipped: the previous one is still running");
                continue;
            }
            self.in_flight.insert(slot.clone());
            let shared = self.shared.clone();
            self.tasks.spawn(guarded(slot, async move {
                start_scheduled(&shared, plan, key, heads).await;
            }));
        }
    }

    /// Queues a run (labelled `trigger`) for every doc of `plans` whose
    /// heads differ from its cursor.
    async fn rescan(&mut self, plans: &[Arc<Plan>], trigger: &'static str) {
        let docs = match self.shared.docs.list().await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(err = %e, "cannot list docs for workflow triggers");
                return;
            }
        };
        for plan in plans {
            let Some((_, glob)) = &plan.def.trigger.doc else {
                continue;
            };
            let user = |d: &&crate::runtime::DocInfo| !d.id.starts_with(SYSTEM_PREFIX);
            for d in docs.iter().filter(user).filter(|d| glob.matches(&d.id)) {
                let heads = serde_json::to_vec(&d.heads).expect("heads serialize");
                match self.shared.store.cursor(plan.name(), &d.id) {
                    Ok(Some(c)) if c == heads => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(err = %e, "cannot read a workflow cursor");
                        return;
                    }
                }
                let key = (plan.name().to_string(), d.id.clone());
                self.add(key, 1, &[], trigger, Duration::ZERO);
            }
        }
    }

    async fn on_event(&mut self, item: FeedItem) {
        let e = match item {
            FeedItem::Change(e) => e,
            FeedItem::Missed { count } => {
                tracing::warn!(
                    ?count,
                    "workflow engine fell behind the change feed; rescanning docs"
                );
                let plans: Vec<Arc<Plan>> = self.shared.catalog().plans.values().cloned().collect();
                // Changes the engine learnt of late.
                self.rescan(&plans, "change").await;
                self.follow_all_decisions().await;
                return;
            }
        };
        if e.doc.starts_with(SYSTEM_PREFIX) {
            if e.doc.starts_with(&applied_doc("")) {
                self.applied_dirty = true;
                self.reload().await;
            } else if super::effect::marker_workflow(&e.doc).is_some() {
                self.follow_decisions(&e.doc).await;
            }
            return;
        }
        let plans: Vec<Arc<Plan>> = self
            .shared
            .catalog()
            .plans
            .values()
            .filter(|p| {
                p.def
                    .trigger
                    .doc
                    .as_ref()
                    .is_some_and(|(_, g)| g.matches(&e.doc))
            })
            .cloned()
            .collect();
        for plan in plans {
            let key = (plan.name().to_string(), e.doc.clone());
            let own = e.cause.as_ref().is_some_and(|c| c.workflow == plan.name());
            if own || !plan.matches(&e) {
                // Not a trigger: the state is taken as it is, unless a run
                // of this (workflow, doc) is coming anyway.
                if e.deleted || self.pending.contains_key(&key) {
                    continue;
                }
                if self.in_flight.contains(&key) {
                    self.take_after.insert(key, e.heads.clone());
                } else {
                    self.take(&key, &e.heads);
                }
                continue;
            }
            self.take_after.remove(&key);
            let depth = e.cause.as_ref().map_or(1, |c| c.depth.saturating_add(1));
            let delay = if e.local {
                Duration::ZERO
            } else {
                Duration::from_millis(self.shared.cfg.remote_delay_ms)
            };
            self.add(key, depth, &e.paths, "change", delay);
        }
    }

    /// Marks `key` pending, or folds the trigger into its pending run.
    fn add(
        &mut self,
        key: Key,
        depth: u32,
        changed: &[String],
        trigger: &'static str,
        delay: Duration,
    ) {
        let due = Instant::now() + delay;
        match self.pending.get_mut(&key) {
            Some(p) => {
                p.depth = p.depth.max(depth);
                for c in changed {
                    if p.changed.len() < MAX_CHANGED {
                        p.changed.insert(c.clone());
                    }
                }
                self.shared
                    .counters
                    .coalesced
                    .fetch_add(1, Ordering::Relaxed);
                // An earlier due time (a local write after a remote one)
                // is taken when the run is queued next; a queued run keeps
                // its place.
                if !self.queued.contains(&key) && !self.in_flight.contains(&key) {
                    p.due = p.due.min(due);
                    self.schedule(key);
                }
            }
            None => {
                self.pending.insert(
                    key.clone(),
                    Pending {
                        depth,
                        changed: changed.iter().take(MAX_CHANGED).cloned().collect(),
                        trigger,
                        due,
                    },
                );
                if !self.in_flight.contains(&key) {
                    self.schedule(key);
                }
            }
        }
    }

    fn schedule(&mut self, key: Key) {
        let due = self.pending[&key].due;
        self.queued.insert(key.clone());
        if due <= Instant::now() {
            self.ready.push_back(key);
        } else {
            self.seq += 1;
            self.delayed.insert((due, self.seq), key);
        }
    }

    /// Moves the delayed keys that are due to `ready`.
    fn promote(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.ready.push_back(key);
        }
    }

    /// Starts due runs up to the concurrency limit, resumes first.
    fn start_runs(&mut self) {
        let max = self.shared.cfg.concurrency;
        let mut waiting = VecDeque::new();
        while self.tasks.len() < max
            && let Some(run) = self.resumes.pop_front()
        {
            let key = (run.workflow.clone(), run.doc.clone());
            if self.in_flight.contains(&key) {
                waiting.push_back(run);
                continue;
            }
            let plan = self.shared.catalog().plans.get(&run.workflow).cloned();
            self.in_flight.insert(key.clone());
            let shared = self.shared.clone();
            self.tasks.spawn(guarded(key, async move {
                resume(&shared, plan, run).await;
            }));
        }
        waiting.extend(self.resumes.drain(..));
        self.resumes = waiting;
        while self.tasks.len() < max
            && let Some(key) = self.ready.pop_front()
        {
            self.queued.remove(&key);
            if self.in_flight.contains(&key) {
                continue; // stays pending; finished() queues it again
            }
            let Some(p) = self.pending.remove(&key) else {
                continue;
            };
            let Some(plan) = self.shared.catalog().plans.get(&key.0).cloned() else {
                continue; // Unloaded since.
            };
            self.in_flight.insert(key.clone());
            let shared = self.shared.clone();
            let created = self.shared.counters.runs.load(Ordering::Relaxed);
            let every = PRUNE_EVERY.min(self.shared.cfg.keep_runs.max(1));
            if created >= self.created_at_last_prune + every {
                self.created_at_last_prune = created;
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || prune(&shared));
            }
            let doc = key.1.clone();
            self.tasks.spawn(guarded(key, async move {
                start(&shared, plan, &doc, p).await;
            }));
        }
    }

    /// Moves the cursor of `key` to `heads` with no run.
    fn take(&self, key: &Key, heads: &[String]) {
        let heads = serde_json::to_vec(heads).expect("heads serialize");
        if let Err(err) = self.shared.store.put_cursor(&key.0, &key.1, &heads) {
            tracing::warn!(err = %err, "cannot move a workflow cursor");
        }
    }

    fn finished(&mut self, key: Key) {
        self.in_flight.remove(&key);
        if let Some(heads) = self.take_after.remove(&key)
            && !self.pending.contains_key(&key)
        {
            self.take(&key, &heads);
        }
        if self.pending.contains_key(&key) && !self.queued.contains(&key) {
            self.schedule(key);
        }
    }

    /// Retries or skips a dead run. When an effect step killed it, the
    /// decision goes into the effect's marker too, so that every node
    /// follows it for that key (see [`Runner::follow_decisions`]): a retry
    /// is attempted by this node while the others wait for it, a skip
    /// skips their runs of that key too.
    async fn command(&mut self, cmd: Command) {
        let (id, reply, retry) = match cmd {
            Command::Retry(id, reply) => (id, reply, true),
            Command::Skip(id, reply) => (id, reply, false),
        };
        let result = (|| {
            let mut run = self.shared.log.get(id)?;
            if run.status != RunStatus::Dead {
                return Err(WorkflowError::WrongState {
                    id,
                    status: run.status,
                    what: "only a dead run can be retried or skipped",
                });
            }
            // The effect whose failure killed the run, and the marker key
            // its decision lives under: its own key, or, for a run that
            // followed another node's decision, that decision's key.
            let decided = dead_effect(&run).map(|(i, followed)| {
                let own = super::effect::effect_key(&run.key, &run.steps[i].id);
                if retry { own } else { followed.unwrap_or(own) }
            });
            run.updated_ms = now_ms();
            if retry {
                reopen(&mut run);
                run.trigger = "retry".into();
            } else {
                run.status = RunStatus::Skipped;
            }
            self.shared.put_run(&run, None)?;
            Ok((run, decided))
        })();
        let result = match result {
            Ok((run, decided)) => {
                if let Some(key) = decided {
                    let by = self.shared.local.clone();
                    let what = if retry {
                        Marker::Trying { by }
                    } else {
                        Marker::Skipped { by }
                    };
                    mark(&self.shared, &run, &key, what).await;
                }
                if retry {
                    self.resumes.push_back(run.clone());
                }
                Ok(run)
            }
            Err(e) => Err(e),
        };
        let _ = reply.send(result);
    }

    /// Follows the decisions recorded in marker doc `id` for this node's
    /// dead runs of that (workflow, doc): a run whose effect another node
    /// now tries again (a `runs retry` there) or has delivered is reopened
    /// and waits for that delivery; one skipped elsewhere is skipped here.
    async fn follow_decisions(&mut self, id: &str) {
        let Some(workflow) = super::effect::marker_workflow(id) else {
            return;
        };
        let mine = |doc: &str| !doc.is_empty() && super::effect::marker_doc(workflow, doc) == id;
        let dead = match self.shared.log.dead_of(workflow, mine) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(err = %e, "cannot read dead runs");
                return;
            }
        };
        if dead.is_empty() {
            return;
        }
        let Ok(doc) = DocId::new(id) else { return };
        let Ok(Json::Object(markers)) = self.shared.docs.get(doc, None).await else {
            return;
        };
        for mut run in dead {
            let Some((i, followed)) = dead_effect(&run) else {
                continue;
            };
            let key =
                followed.unwrap_or_else(|| super::effect::effect_key(&run.key, &run.steps[i].id));
            let Some(marker) = markers.get(&key).and_then(Marker::parse) else {
                continue;
            };
            run.updated_ms = now_ms();
            match marker {
                Marker::Dead { .. } => continue,
                Marker::Skipped { by } => {
                    tracing::info!(run = run.id, key, by, "dead run skipped on another node");
                    run.status = RunStatus::Skipped;
                    run.steps[i].error = Some(format!(
                        "{}; then skipped by {by}",
                        run.steps[i].error.as_deref().unwrap_or("failed")
                    ));
                    if let Err(e) = self.shared.put_run(&run, None) {
                        tracing::warn!(err = %e, "cannot write the run log");
                    }
                }
                Marker::Trying { .. } | Marker::Handled { .. } => {
                    tracing::info!(
                        run = run.id,
                        key,
                        "dead run retried on another node; following it"
                    );
                    reopen(&mut run);
                    if let Err(e) = self.shared.put_run(&run, None) {
                        tracing::warn!(err = %e, "cannot write the run log");
                        continue;
                    }
                    self.resumes.push_back(run);
                }
            }
        }
    }

    /// [`Runner::follow_decisions`] for every marker doc this node's dead
    /// runs depend on.
    async fn follow_all_decisions(&mut self) {
        let ids: BTreeSet<String> = self
            .shared
            .log
            .dead_pairs()
            .iter()
            .map(|(w, d)| super::effect::marker_doc(w, d))
            .collect();
        for id in ids {
            self.follow_decisions(&id).await;
        }
    }
}

/// The effect step whose failure killed `run` (the first failed one), and
/// the marker key it followed if it was dead-lettered by another node.
fn dead_effect(run: &Run) -> Option<(usize, Option<String>)> {
    let i = run
        .steps
        .iter()
        .position(|s| s.state == StepState::Failed && matches!(s.kind.as_str(), "http" | "exec"))?;
    let followed = run.steps[i]
        .output
        .as_ref()
        .and_then(|o| o["marker"].as_str())
        .map(str::to_string);
    Some((i, followed))
}

/// Opens a dead run again: its failed, cancelled or interrupted steps are
/// pending with no attempts.
fn reopen(run: &mut Run) {
    run.status = RunStatus::Queued;
    run.error = None;
    run.updated_ms = now_ms();
    for s in &mut run.steps {
        if matches!(
            s.state,
            StepState::Failed | StepState::Cancelled | StepState::Running
        ) {
            s.state = StepState::Pending;
            s.attempts = 0;
            s.error = None;
            s.output = None;
            s.finished_ms = None;
        }
    }
}

/// The applied definitions, from their system docs.
async fn read_applied(docs: &Docs) -> Result<BTreeMap<String, Applied>, DocError> {
    let prefix = applied_doc("");
    let mut out = BTreeMap::new();
    for d in docs
        .list()
        .await?
        .into_iter()
        .filter(|d| d.id.starts_with(&prefix))
    {
        let name = d.id[prefix.len()..].to_string();
        let Ok(id) = DocId::new(d.id.as_str()) else {
            continue;
        };
        let Ok(j) = docs.get(id, None).await else {
            continue;
        };
        out.insert(
            name,
            Applied {
                text: j["text"].as_str().map(str::to_string),
                enabled: j["enabled"].as_bool().unwrap_or(true),
            },
        );
    }
    Ok(out)
}

/// Runs `run` and hands back `key` even if it panics (a panic in a run is
/// logged and costs that run; its (workflow, doc) stays usable).
async fn guarded(key: Key, run: impl std::future::Future<Output = ()>) -> Key {
    use futures_util::FutureExt;
    if std::panic::AssertUnwindSafe(run)
        .catch_unwind()
        .await
        .is_err()
    {
        tracing::error!(workflow = %key.0, doc = %key.1, "a workflow run panicked");
    }
    key
}

async fn next_event(
    events: &mut Option<Pin<Box<dyn Stream<Item = FeedItem> + Send>>>,
) -> Option<FeedItem> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Removes the oldest finished runs beyond `workflow.keep_runs`, and the
/// oldest dead runs beyond as many again (dead runs wait for retry or skip,
/// but not without bound).
fn prune(shared: &Shared) {
    if let Err(e) = shared.log.prune(shared.cfg.keep_runs as usize) {
        tracing::warn!(err = %e, "cannot prune the run log");
    }
}

/// Starts a run of `plan` on the current state of `doc`, if that state was
/// not taken before.
async fn start(shared: &Shared, plan: Arc<Plan>, doc: &str, p: Pending) {
    let Ok(id) = DocId::new(doc) else { return };
    let taken: Vec<String> = match shared.store.cursor(plan.name(), doc) {
        Ok(c) => c
            .and_then(|c| serde_json::from_slice(&c).ok())
            .unwrap_or_default(),
        Err(e) => {
            tracing::error!(err = %e, "cannot read a workflow cursor");
            return;
        }
    };
    let snap = match shared
        .docs
        .snapshot(id, taken.clone(), Some(plan.name().to_string()))
        .await
    {
        Ok(s) => s,
        Err(DocError::NotFound(_) | DocError::Deleted(_)) => return,
        Err(e) => {
            tracing::warn!(workflow = %plan.name(), doc, err = %e, "cannot read the triggering doc");
            return;
        }
    };
    let (json, heads, trigger_heads) = (snap.json, snap.heads, snap.trigger_heads);
    let cursor = serde_json::to_vec(&heads).expect("heads serialize");
    if heads == taken {
        return; // taken before
    }
    // Only this workflow's own writes since the state it took last: nothing
    // new to react to (its writes never trigger it).
    let own_only = !taken.is_empty()
        && snap.messages_since.is_some_and(|m| {
            m.iter().all(|m| {
                m.as_deref()
                    .and_then(Cause::from_message)
                    .is_some_and(|c| c.workflow == plan.name())
            })
        });
    if own_only {
        if let Err(e) = shared.store.put_cursor(plan.name(), doc, &cursor) {
            tracing::warn!(err = %e, "cannot move a workflow cursor");
        }
        return;
    }
    let changed: Vec<String> = p.changed.into_iter().collect();
    let bound = match shared.sandbox.bind(&Input {
        doc: &json,
        id: doc,
        changed: &changed,
        node: &shared.labels,
    }) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(workflow = %plan.name(), doc, err = %e, "doc not readable by expressions");
            return;
        }
    };
    let mut dead = None;
    if p.depth > shared.cfg.max_depth {
        let e = format!(
            "chain of triggered runs is {} deep, over workflow.max_depth = {}: a workflow loop? \
             (retry runs it anyway)",
            p.depth, shared.cfg.max_depth
        );
        tracing::error!(workflow = %plan.name(), doc, "{e}");
        dead = Some(e);
    } else if let Some(when) = &plan.when {
        match shared.sandbox.test(when, &bound) {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = shared.store.put_cursor(plan.name(), doc, &cursor) {
                    tracing::warn!(err = %e, "cannot move a workflow cursor");
                }
                return;
            }
            Err(e) => dead = Some(format!("[on] when: {e}")),
        }
    }
    let run_id = match shared.store.next_run_id() {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(err = %e, "cannot number a workflow run");
            return;
        }
    };
    let key = run_key(plan.name(), doc, &trigger_heads);
    let mut run = new_run(&plan, run_id, key, doc, trigger_heads, p.depth, p.trigger);
    shared.counters.runs.fetch_add(1, Ordering::Relaxed);
    if let Some(e) = dead {
        run.status = RunStatus::Dead;
        run.error = Some(e);
        shared.counters.dead.fetch_add(1, Ordering::Relaxed);
    }
    // A run of data steps only (derive, write, resolve) is recorded when it
    // finishes, with the cursor it moves: if the node dies before, the
    // cursor has not moved, so the doc's state runs again after restart, and
    // data steps write only what differs. A run with effects is recorded
    // before any effect starts, so an attempt is never forgotten.
    let data_only = !plan.def.steps.iter().any(|s| s.action.is_effect());
    if run.status == RunStatus::Running && data_only {
        execute(shared, &plan, run, json, Some(bound), Some(cursor)).await;
        return;
    }
    if let Err(e) = shared.put_run(&run, Some(&cursor)) {
        tracing::error!(err = %e, "cannot write the run log; the run does not start");
        return;
    }
    if run.status == RunStatus::Running {
        execute(shared, &plan, run, json, Some(bound), None).await;
    } else {
        alert_failure(shared, &plan, &run, false).await;
    }
}

/// When a scheduled workflow fires next after `after` (Unix ms): interval
/// schedules at multiples of the interval (so every node agrees on the
/// tick), cron schedules at the expression's next time in UTC.
fn next_fire(trigger: &super::def::Trigger, after: u64) -> Option<u64> {
    if let Some(every) = trigger.every {
        let ms = (every.as_millis() as u64).max(1);
        return Some((after / ms + 1) * ms);
    }
    let cron = trigger.cron.as_ref()?;
    let start = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(after as i64)?;
    let next = cron.find_next_occurrence(&start, false).ok()?;
    Some(next.timestamp_millis() as u64)
}

/// Runs a scheduled workflow once: no triggering doc (`doc` is `{}` to its
/// expressions, `id` is empty); its effects run here, the owner of the tick.
async fn start_scheduled(shared: &Shared, plan: Arc<Plan>, key: String, heads: Vec<String>) {
    let json = Json::Object(Default::default());
    let bound = match shared.sandbox.bind(&Input {
        doc: &json,
        id: "",
        changed: &[],
        node: &shared.labels,
    }) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(workflow = %plan.name(), err = %e, "scheduled run not started");
            return;
        }
    };
    if let Some(when) = &plan.when
        && !shared.sandbox.test(when, &bound).unwrap_or(false)
    {
        return;
    }
    let Ok(id) = shared.store.next_run_id() else {
        tracing::error!("cannot number a workflow run");
        return;
    };
    let run = new_run(&plan, id, key, "", heads, 1, "schedule");
    shared.counters.runs.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = shared.put_run(&run, None) {
        tracing::error!(err = %e, "cannot write the run log; the run does not start");
        return;
    }
    execute(shared, &plan, run, json, Some(bound), None).await;
}

/// A new running run of `plan`, every step pending.
fn new_run(
    plan: &Plan,
    id: u64,
    key: String,
    doc: &str,
    heads: Vec<String>,
    depth: u32,
    trigger: &str,
) -> Run {
    let now = now_ms();
    let steps = plan
        .def
        .steps
        .iter()
        .map(|s| StepRun {
            id: s.id.clone(),
            kind: kind_name(&s.action).to_string(),
            state: StepState::Pending,
            attempts: 0,
            started_ms: None,
            finished_ms: None,
            output: None,
            error: None,
        })
        .collect();
    Run {
        id,
        key,
        workflow: plan.name().to_string(),
        doc: doc.to_string(),
        heads,
        depth,
        trigger: trigger.to_string(),
        status: RunStatus::Running,
        created_ms: now,
        updated_ms: now,
        error: None,
        steps,
    }
}

/// Resumes an open run (after a restart, or a retry) on the doc's current state.
async fn resume(shared: &Shared, plan: Option<Arc<Plan>>, mut run: Run) {
    let Some(plan) = plan.filter(|p| same_steps(p, &run)) else {
        run.status = RunStatus::Dead;
        run.error = Some(format!(
            "workflow {:?} is no longer loaded, or its steps changed; the run cannot resume",
            run.workflow
        ));
        run.updated_ms = now_ms();
        shared.counters.dead.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = shared.put_run(&run, None) {
            tracing::error!(err = %e, "cannot write the run log");
        }
        return;
    };
    let json = match DocId::new(run.doc.as_str()) {
        _ if run.doc.is_empty() => Ok(Json::Object(Default::default())), // scheduled
        Ok(id) => shared.docs.get(id, None).await,
        Err(e) => Err(e),
    };
    let json = match json {
        Ok(j) => j,
        Err(e) => {
            run.status = RunStatus::Dead;
            run.error = Some(format!("cannot read doc {:?}: {e}", run.doc));
            run.updated_ms = now_ms();
            shared.counters.dead.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = shared.put_run(&run, None) {
                tracing::error!(err = %e, "cannot write the run log");
            }
            return;
        }
    };
    tracing::info!(run = run.id, workflow = %run.workflow, doc = %run.doc, "resuming workflow run");
    run.status = RunStatus::Running;
    execute(shared, &plan, run, json, None, None).await;
}

fn same_steps(plan: &Plan, run: &Run) -> bool {
    plan.def.steps.len() == run.steps.len()
        && plan
            .def
            .steps
            .iter()
            .zip(&run.steps)
            .all(|(a, b)| a.id == b.id)
}

/// Why a step failed: `Final` failures would fail the same way again.
enum StepError {
    Final(String),
    Retry(String),
}

/// Executes the steps of `run` that are not done yet, in order, writing the
/// record as steps finish. `cursor`, if given, is the trigger cursor to move
/// with the run's first record.
async fn execute(
    shared: &Shared,
    plan: &Plan,
    mut run: Run,
    mut json: Json,
    mut bound: Option<Bound>,
    mut cursor: Option<Vec<u8>>,
) {
    // Writes the record, with the cursor until that has been written once.
    let mut record = |run: &Run| -> Result<(), StoreError> {
        shared.put_run(run, cursor.as_deref())?;
        cursor = None;
        Ok(())
    };
    let cause = Cause {
        workflow: run.workflow.clone(),
        depth: run.depth,
    };
    let mut wrote_any = false;
    // Effect steps that failed on this node (it decides they are dead), and
    // who skipped the dead effect this run followed, if someone did.
    let mut failed_here: Vec<usize> = Vec::new();
    let mut skipped_by: Option<String> = None;
    let started = Instant::now();
    let origin = plan.def.trigger.origin;
    let last = plan.def.steps.len().saturating_sub(1);
    for (i, (step, sp)) in plan.def.steps.iter().zip(&plan.steps).enumerate() {
        if matches!(run.steps[i].state, StepState::Done | StepState::Skipped) {
            continue;
        }
        let state_of = |id: &str| run.steps.iter().find(|s| s.id == id).map(|s| s.state);
        let failed = step
            .needs
            .iter()
            .find(|n| matches!(state_of(n), Some(StepState::Failed | StepState::Cancelled)));
        let skipped = step
            .needs
            .iter()
            .find(|n| state_of(n) == Some(StepState::Skipped));
        let s = &mut run.steps[i];
        if let Some(n) = failed {
            s.state = StepState::Cancelled;
            s.error = Some(format!("needs {n:?}, which failed"));
            continue;
        }
        if let Some(n) = skipped {
            s.state = StepState::Skipped;
            s.error = Some(format!("needs {n:?}, which was skipped"));
            continue;
        }
        if bound.is_none() {
            let input = Input {
                doc: &json,
                id: &run.doc,
                changed: &[],
                node: &shared.labels,
            };
            match shared.sandbox.bind(&input) {
                Ok(b) => bound = Some(b),
                Err(e) => {
                    s.state = StepState::Failed;
                    s.error = Some(e);
                    continue;
                }
            }
        }
        let b = bound.as_ref().expect("bound above");
        if let Some(when) = &sp.when {
            match shared.sandbox.test(when, b) {
                Ok(true) => {}
                Ok(false) => {
                    s.state = StepState::Skipped;
                    s.error = Some("when is false".into());
                    if step.action.is_effect() && owns_effects(shared, origin, &run, None).await.0 {
                        let key = super::effect::effect_key(&run.key, &step.id);
                        let by = shared.local.clone();
                        let what = Marker::Handled {
                            by,
                            when_false: true,
                        };
                        mark(shared, &run, &key, what).await;
                    }
                    continue;
                }
                Err(e) => {
                    s.state = StepState::Failed;
                    s.error = Some(format!("when: {e}"));
                    continue;
                }
            }
        }
        s.state = StepState::Running;
        s.started_ms.get_or_insert_with(now_ms);
        let effect = step.action.is_effect();
        let effect_key = super::effect::effect_key(&run.key, &step.id);
        // A scheduled run (no doc) was started by the tick's owner: its
        // effects are this node's.
        let owned = run.doc.is_empty();
        if effect && !owned {
            let seen = match await_turn(shared, origin, &mut run, i, &effect_key).await {
                Turn::Mine => None,
                Turn::Seen(seen) => Some(seen),
            };
            let s = &mut run.steps[i];
            match seen {
                None => {}
                Some(Seen::Handled(by)) => {
                    s.state = StepState::Done;
                    s.output = Some(
                        serde_json::json!({ "delivered_by": by, "idempotency_key": effect_key }),
                    );
                    s.error = None;
                    s.finished_ms = Some(now_ms());
                    continue;
                }
                // Another node decided: the run ends as it did there.
                Some(Seen::Dead { by, error, marker }) => {
                    s.state = StepState::Failed;
                    s.error = Some(format!("dead-lettered by {by}: {error}"));
                    s.output = Some(serde_json::json!({ "dead_by": by, "marker": marker }));
                    s.finished_ms = Some(now_ms());
                    continue;
                }
                Some(Seen::Skipped { by, marker }) => {
                    s.state = StepState::Failed;
                    s.error = Some(format!("dead-lettered, then skipped by {by}"));
                    s.output = Some(serde_json::json!({ "skipped_by": by, "marker": marker }));
                    s.finished_ms = Some(now_ms());
                    skipped_by = Some(by);
                    continue;
                }
            }
        }
        // Set once this node has told the others it is retrying this effect.
        let mut claimed = false;
        let input = effect.then(|| effect_input(shared, &run, &step.id, &effect_key, &json));
        loop {
            run.steps[i].attempts += 1;
            if effect {
                // Effects take time: the log shows the attempt while it runs
                // (and counts it if the node dies in it).
                run.updated_ms = now_ms();
                if let Err(e) = record(&run) {
                    tracing::warn!(err = %e, "cannot write the run log");
                }
            }
            let outcome = match &step.action {
                Action::Derive { .. } => derive(shared, sp, b, &run.doc, &json, &cause).await,
                Action::Write { .. } => write(shared, sp, b, &cause).await,
                Action::Http { .. } | Action::Exec { .. } => {
                    let input = input.as_ref().expect("effects have input");
                    let out =
                        run_effect(shared, &step.action, &run, &step.id, &effect_key, input).await;
                    delivered(shared, &run, &effect_key, out).await
                }
                Action::Resolve { policy, .. } => {
                    resolve(shared, sp, &run.doc, *policy, &cause).await
                }
            };
            let s = &mut run.steps[i];
            match outcome {
                Ok((output, wrote)) => {
                    if !wrote.is_empty() {
                        wrote_any = true;
                        if matches!(step.action, Action::Derive { .. } | Action::Resolve { .. }) {
                            for (ptr, v) in wrote {
                                set_pointer(&mut json, ptr.as_str(), v);
                            }
                            bound = None; // later steps see the derived values
                        }
                    }
                    s.state = StepState::Done;
                    s.output = Some(output);
                    s.error = None;
                    break;
                }
                Err(StepError::Final(e)) => {
                    s.state = StepState::Failed;
                    s.error = Some(e);
                    if effect {
                        failed_here.push(i);
                    }
                    break;
                }
                Err(StepError::Retry(e)) => {
                    if s.attempts >= step.retry.attempts {
                        s.state = StepState::Failed;
                        s.error = Some(e);
                        if effect {
                            failed_here.push(i);
                        }
                        break;
                    }
                    let claim = effect && !claimed;
                    let wait = backoff(&step.retry, s.attempts);
                    s.error = Some(format!(
                        "{e} (attempt {} of {}; next in {wait:?})",
                        s.attempts, step.retry.attempts
                    ));
                    run.updated_ms = now_ms();
                    if let Err(e) = record(&run) {
                        tracing::warn!(err = %e, "cannot write the run log");
                    }
                    if claim {
                        // The others wait for this node while it retries,
                        // instead of taking the effect over after
                        // `workflow.effect_wait_ms`.
                        let by = shared.local.clone();
                        mark(shared, &run, &effect_key, Marker::Trying { by }).await;
                        claimed = true;
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
        run.steps[i].finished_ms = Some(now_ms());
        if i < last {
            run.updated_ms = now_ms();
            if let Err(e) = record(&run) {
                tracing::warn!(err = %e, "cannot write the run log");
            }
        }
    }
    let failed = run.steps.iter().find(|s| s.state == StepState::Failed);
    run.updated_ms = now_ms();
    shared.run_latency.observe(started.elapsed().as_secs_f64());
    if let Some(f) = failed {
        run.error = Some(format!(
            "step {:?}: {}",
            f.id,
            f.error.as_deref().unwrap_or("failed")
        ));
        if skipped_by.is_some() {
            // Dead-lettered and skipped elsewhere: the same here.
            run.status = RunStatus::Skipped;
            if let Err(e) = record(&run) {
                tracing::error!(err = %e, "cannot write the run log");
            }
            return;
        }
        run.status = RunStatus::Dead;
        shared.counters.dead.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(run = run.id, workflow = %run.workflow, doc = %run.doc, err = %run.error.as_deref().unwrap_or(""), "workflow run dead-lettered");
        if let Err(e) = record(&run) {
            tracing::error!(err = %e, "cannot write the run log");
        }
        // A dead effect is a decision: recorded in its marker, so that no
        // other node takes it over and every node shows it dead.
        for &i in &failed_here {
            let key = super::effect::effect_key(&run.key, &run.steps[i].id);
            let by = shared.local.clone();
            let error = run.steps[i].error.clone().unwrap_or_default();
            mark(shared, &run, &key, Marker::Dead { by, error }).await;
        }
        // Followed another node's decision: that node alerts.
        let followed = run.steps.iter().any(|s| {
            s.output
                .as_ref()
                .is_some_and(|o| o.get("dead_by").is_some())
        });
        if !failed_here.is_empty() || !followed {
            alert_failure(shared, plan, &run, !failed_here.is_empty()).await;
        }
        return;
    } else {
        run.status = RunStatus::Done;
        shared.counters.done.fetch_add(1, Ordering::Relaxed);
        if !wrote_any {
            shared.counters.unchanged.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Err(e) = record(&run) {
        tracing::error!(err = %e, "cannot write the run log");
    }
}

/// Runs the workflow's `on_failure` effect for a dead run, on one node: the
/// rendezvous owner of `<run key>-on_failure` among the live nodes running
/// the workflow. Its input is `{"run": <the run record>, "node": <peer id>}`;
/// it is retried with its backoff, then given up with an error in the log.
async fn alert_failure(shared: &Shared, plan: &Plan, run: &Run, here: bool) {
    let Some(step) = &plan.def.on_failure else {
        return;
    };
    // One alert per dead state: from the node whose effect failed (`here`),
    // or else the node that owns the run's effects (would have run them).
    if !here
        && !owns_effects(shared, plan.def.trigger.origin, run, None)
            .await
            .0
    {
        return;
    }
    let key = format!("{}-on_failure", run.key);
    let input = serde_json::json!({ "run": run, "node": shared.local });
    for attempt in 1..=step.retry.attempts {
        match run_effect(shared, &step.action, run, &step.id, &key, &input).await {
            Ok(_) => return,
            Err(Failure::Final(e)) => {
                tracing::error!(run = run.id, err = %e, "on_failure effect failed");
                return;
            }
            Err(Failure::Retry(e)) if attempt == step.retry.attempts => {
                tracing::error!(run = run.id, err = %e, "on_failure effect failed after its last attempt");
            }
            Err(Failure::Retry(_)) => tokio::time::sleep(backoff(&step.retry, attempt)).await,
        }
    }
}

/// Executes effect `action` (http or exec) of `run`'s step `step` once,
/// with `input` as its JSON and `key` as its idempotency key.
async fn run_effect(
    shared: &Shared,
    action: &Action,
    run: &Run,
    step: &str,
    key: &str,
    input: &Json,
) -> Result<Json, Failure> {
    match action {
        Action::Http { url, timeout } => {
            super::effect::http(&shared.http, url, *timeout, input, key).await
        }
        Action::Exec { command, timeout } => {
            let env: BTreeMap<&str, String> = [
                ("MERGEFLOW_RUN_KEY", run.key.clone()),
                ("MERGEFLOW_IDEMPOTENCY_KEY", key.to_string()),
                ("MERGEFLOW_WORKFLOW", run.workflow.clone()),
                ("MERGEFLOW_DOC", run.doc.clone()),
                ("MERGEFLOW_STEP", step.to_string()),
            ]
            .into();
            // In the node's data dir, whatever the process's directory.
            let data_dir = shared.store.path().parent().unwrap_or(shared.store.path());
            super::effect::exec(command, *timeout, input, &env, data_dir).await
        }
        other => Err(Failure::Final(format!(
            "kind {} is not an effect",
            kind_name(other)
        ))),
    }
}

/// How often a node that does not own an effect checks for its delivery
/// and for its owner's liveness.
const TURN_POLL: Duration = Duration::from_millis(200);

/// What a node waiting for an effect's owner learnt.
enum Turn {
    /// This node executes the effect.
    Mine,
    /// Another node handled it or decided about it.
    Seen(Seen),
}

/// A marker that ends the wait for an effect (see [`Marker`]).
enum Seen {
    /// Delivered (or skipped, its `when` false) by this node (text).
    Handled(String),
    /// Dead-lettered by `by` with `error`, under marker key `marker`.
    Dead {
        by: String,
        error: String,
        marker: String,
    },
    /// Dead-lettered, then skipped by a user on `by`.
    Skipped { by: String, marker: String },
}

/// Waits until this node owns the effect `key` of step `i` or another node
/// recorded what became of it. A node that waited
/// `workflow.effect_wait_ms` for a live owner takes the effect over (the
/// owner may have coalesced this trigger into a later state and never run
/// this key; at-least-once: the receiver sees the key twice at worst),
/// unless the owner's marker says it is retrying it: then it waits as long
/// as that node is connected.
async fn await_turn(shared: &Shared, origin: Origin, run: &mut Run, i: usize, key: &str) -> Turn {
    let started = Instant::now();
    let wait = Duration::from_millis(shared.cfg.effect_wait_ms);
    let mut shown: Option<String> = None;
    let step = run.steps[i].id.clone();
    loop {
        let (seen, trying) = look(shared, run, &step, key).await;
        if let Some(seen) = seen {
            return Turn::Seen(seen);
        }
        let (mine, owner, claimed) = owns_effects(shared, origin, run, trying.as_deref()).await;
        if mine {
            return Turn::Mine;
        }
        if !claimed && started.elapsed() >= wait {
            tracing::warn!(run = run.id, key, owner = ?owner, "effect not delivered by its owner in time; taking it over");
            return Turn::Mine;
        }
        if shown != owner {
            run.steps[i].output = Some(serde_json::json!({ "waiting_for": owner }));
            run.updated_ms = now_ms();
            if let Err(e) = shared.put_run(run, None) {
                tracing::warn!(err = %e, "cannot write the run log");
            }
            shown = owner;
        }
        tokio::time::sleep(TURN_POLL).await;
    }
}

/// The markers of `run`'s (workflow, doc), by effect key.
async fn markers(shared: &Shared, run: &Run) -> serde_json::Map<String, Json> {
    let Ok(id) = DocId::new(super::effect::marker_doc(&run.workflow, &run.doc)) else {
        return Default::default();
    };
    match shared.docs.get(id, None).await {
        Ok(Json::Object(m)) => m,
        _ => Default::default(),
    }
}

/// What the markers say about effect `key` of `run`'s step `step`: handled
/// or decided (dead, skipped) by a node, for this state or for a later
/// state of the doc (one whose history holds this run's state: another
/// node coalesced this trigger into that one, and triggers fire on state,
/// so what became of it stands for this one too). Also the node retrying
/// this key, if its marker says one is.
async fn look(shared: &Shared, run: &Run, step: &str, key: &str) -> (Option<Seen>, Option<String>) {
    let markers = markers(shared, run).await;
    let seen = |m: Marker, marker: &str, later: bool| -> Option<Seen> {
        let tail = if later { " for a later state" } else { "" };
        match m {
            Marker::Handled { by, when_false } => Some(Seen::Handled(if when_false {
                format!("{by} (skipped: its when was false){tail}")
            } else {
                format!("{by}{tail}")
            })),
            Marker::Trying { .. } => None,
            Marker::Dead { by, error } => Some(Seen::Dead {
                by: format!("{by}{tail}"),
                error,
                marker: marker.to_string(),
            }),
            Marker::Skipped { by } => Some(Seen::Skipped {
                by: format!("{by}{tail}"),
                marker: marker.to_string(),
            }),
        }
    };
    let mut trying = None;
    if let Some(m) = markers.get(key).and_then(Marker::parse) {
        if let Marker::Trying { by } = &m {
            trying = Some(by.clone());
        } else {
            return (seen(m, key, false), None);
        }
    }
    let Ok(doc) = DocId::new(run.doc.as_str()) else {
        return (None, trying);
    };
    for (k, m) in markers.iter().filter(|(_, m)| m["step"] == step) {
        let Some(heads) = m["heads"].as_array() else {
            continue;
        };
        let heads: Vec<String> = heads
            .iter()
            .filter_map(|h| h.as_str().map(str::to_string))
            .collect();
        if heads != run.heads
            && let Some(m) = Marker::parse(m)
            && matches!(
                shared
                    .docs
                    .covers(doc.clone(), run.heads.clone(), heads)
                    .await,
                Ok(true)
            )
        {
            match m {
                // Someone retries the later state: wait for it like for
                // this one.
                Marker::Trying { by } => {
                    trying.get_or_insert(by);
                }
                m => return (seen(m, k, true), trying),
            }
        }
    }
    (None, trying)
}

/// The JSON an effect gets: the run's metadata and the doc.
fn effect_input(shared: &Shared, run: &Run, step: &str, key: &str, doc: &Json) -> Json {
    serde_json::json!({
        "run": {
            "id": run.id,
            "key": run.key,
            "idempotency_key": key,
            "workflow": run.workflow,
            "doc": run.doc,
            "heads": run.heads,
            "step": step,
            "node": shared.local,
            "depth": run.depth,
        },
        "doc": doc,
    })
}

/// After an effect: on success, records the delivery in the marker doc (so
/// the nodes that did not own it stop waiting).
async fn delivered(
    shared: &Shared,
    run: &Run,
    key: &str,
    out: Result<Json, Failure>,
) -> Result<(Json, Wrote), StepError> {
    let out = out.map_err(|f| match f {
        Failure::Final(e) => StepError::Final(e),
        Failure::Retry(e) => StepError::Retry(e),
    })?;
    let by = shared.local.clone();
    let what = Marker::Handled {
        by,
        when_false: false,
    };
    mark(shared, run, key, what).await;
    let mut out = out;
    out["idempotency_key"] = Json::String(key.to_string());
    Ok((out, vec![]))
}

/// Records `what` this node did or decided about effect `key` of `run` in
/// the marker doc (see [`Marker`]), so the other nodes follow it. A marker
/// already there keeps its `step` and `heads` (a decision about the key of
/// a later state). Keeps the newest [`super::effect::MAX_MARKERS`].
async fn mark(shared: &Shared, run: &Run, key: &str, what: Marker) {
    if run.doc.is_empty() {
        return; // scheduled: nobody waits
    }
    let marker = super::effect::marker_doc(&run.workflow, &run.doc);
    if let Ok(id) = DocId::new(marker) {
        let old = match shared.docs.get(id.clone(), None).await {
            Ok(Json::Object(old)) => old,
            _ => Default::default(),
        };
        let mut value = serde_json::json!({
            "by": shared.local,
            "at": now_ms(),
            "step": key.split_once('-').map_or("", |(_, s)| s),
            "heads": run.heads,
        });
        if let Some(was) = old.get(key) {
            for k in ["step", "heads"] {
                if let Some(v) = was.get(k) {
                    value[k] = v.clone();
                }
            }
        }
        for (k, v) in what.fields() {
            value[k.as_str()] = v;
        }
        let mut ops = vec![Op::Set {
            path: format!("/{key}"),
            value,
            kind: None,
        }];
        if !old.contains_key(key) && old.len() >= super::effect::MAX_MARKERS {
            let mut by_age: Vec<(u64, &String)> = old
                .iter()
                .map(|(k, v)| (v["at"].as_u64().unwrap_or(0), k))
                .collect();
            by_age.sort();
            let excess = old.len() + 1 - super::effect::MAX_MARKERS;
            for (_, k) in by_age.into_iter().take(excess) {
                ops.push(Op::Delete {
                    path: format!("/{k}"),
                });
            }
        }
        if let Err(e) = shared.docs.write(id, Change::Ops(ops)).await {
            tracing::warn!(err = %e, key, "effect handled, but its marker was not written; other nodes may deliver it again");
        }
    }
}

/// True if this node owns the effects of `run`'s (workflow, doc): the
/// rendezvous winner of that pair among the live nodes running the
/// workflow. Per doc, not per state: nodes may fold states differently
/// (triggers fire on state), and the owner's handling of a later state
/// stands for the earlier ones.
///
/// `trying` is the node a marker says retries the effect: while it is
/// connected it is the owner, and the third value is true (nobody takes
/// over from it).
async fn owns_effects(
    shared: &Shared,
    origin: Origin,
    run: &Run,
    trying: Option<&str>,
) -> (bool, Option<String>, bool) {
    // Only this node runs it: a scheduled run (started by the tick's owner),
    // a state written here that only local writes trigger.
    if run.doc.is_empty() || origin == Origin::Local {
        return (true, None, false);
    }
    let mut candidates = shared.candidates(&run.workflow).await;
    if let Some(by) = trying
        && candidates.iter().any(|c| c == by)
    {
        return (by == shared.local, Some(by.to_string()), true);
    }
    // A retry asked for here (its marker not written, or its node gone).
    if run.trigger == "retry" {
        return (true, None, false);
    }
    if origin == Origin::Remote {
        // The nodes that wrote the state are not triggered by it.
        let wrote = match DocId::new(run.doc.as_str()) {
            Ok(id) => shared.docs.actors(id, Some(run.heads.clone())).await,
            Err(e) => Err(e),
        };
        let wrote = wrote.unwrap_or_default();
        let mut writers = Vec::new();
        for c in &candidates {
            if shared.boots_of(c).await.iter().any(|a| wrote.contains(a)) {
                writers.push(c.clone());
            }
        }
        candidates.retain(|c| !writers.contains(c));
    }
    let owner = super::effect::owner(&effect_owner_key(run), &candidates).cloned();
    (
        owner.is_none() || owner.as_deref() == Some(shared.local.as_str()),
        owner,
        false,
    )
}

fn effect_owner_key(run: &Run) -> String {
    format!("{}\0{}", run.workflow, run.doc)
}

/// The wait before attempt `attempts + 1`.
fn backoff(retry: &Retry, attempts: u32) -> Duration {
    match retry.backoff {
        Backoff::Fixed => retry.initial,
        Backoff::Exponential => {
            let factor = 1u32
                .checked_shl(attempts.saturating_sub(1))
                .unwrap_or(u32::MAX);
            retry.initial.saturating_mul(factor).min(retry.max)
        }
    }
}

type Wrote = Vec<(Pointer, Json)>;

/// The values of `sp.set` that differ from what `current` holds.
fn changes(
    shared: &Shared,
    sp: &super::plan::StepPlan,
    bound: &Bound,
    current: &Json,
) -> Result<Wrote, StepError> {
    let mut wrote = Vec::new();
    for (ptr, expr) in &sp.set {
        let value = shared
            .sandbox
            .eval(expr, bound)
            .map_err(|e| StepError::Final(format!("set {:?}: {e}", ptr.as_str())))?;
        let Some(value) = value else { continue }; // () leaves the path as it is
        if current.pointer(ptr.as_str()) == Some(&value) {
            continue;
        }
        wrote.push((ptr.clone(), value));
    }
    Ok(wrote)
}

fn write_error(e: DocError) -> StepError {
    match e {
        DocError::Store(_) | DocError::Internal(_) => StepError::Retry(e.to_string()),
        e => StepError::Final(e.to_string()),
    }
}

/// A `derive` step: values written into the triggering doc where they differ.
async fn derive(
    shared: &Shared,
    sp: &super::plan::StepPlan,
    bound: &Bound,
    doc: &str,
    json: &Json,
    cause: &Cause,
) -> Result<(Json, Wrote), StepError> {
    let wrote = changes(shared, sp, bound, json)?;
    write_values(shared, doc, wrote, cause).await
}

/// A `resolve` step: at each conflicted place its glob names, the value the
/// policy picks is written, unless reads already return it.
async fn resolve(
    shared: &Shared,
    sp: &super::plan::StepPlan,
    doc: &str,
    policy: Policy,
    cause: &Cause,
) -> Result<(Json, Wrote), StepError> {
    let glob = sp.glob.clone().expect("resolve steps have a glob");
    let id = DocId::new(doc).map_err(|e| StepError::Final(e.to_string()))?;
    let conflicts = shared
        .docs
        .conflicts(id, Box::new(move |p| glob.is_match(p)))
        .await
        .map_err(write_error)?;
    let mut report = Vec::new();
    let mut wrote = Vec::new();
    for c in conflicts {
        let Some(winner) = policy.pick(&c.values) else {
            continue;
        };
        report.push(serde_json::json!({
            "path": c.path,
            "values": c.values.len(),
            "winner": winner.value,
        }));
        if winner.value != c.visible {
            let ptr = Pointer::parse(&c.path).map_err(|e| StepError::Final(e.to_string()))?;
            wrote.push((ptr, winner.value.clone()));
        }
    }
    let (mut output, wrote) = write_values(shared, doc, wrote, cause).await?;
    output["conflicts"] = Json::Array(report);
    Ok((output, wrote))
}

/// A `write` step: values written into the target doc where they differ.
async fn write(
    shared: &Shared,
    sp: &super::plan::StepPlan,
    bound: &Bound,
    cause: &Cause,
) -> Result<(Json, Wrote), StepError> {
    let target = sp.target.clone().expect("write steps have a target");
    let current = match shared.docs.get(target.clone(), None).await {
        Ok(j) => j,
        Err(DocError::NotFound(_)) => Json::Object(Default::default()),
        Err(e) => return Err(write_error(e)),
    };
    let wrote = changes(shared, sp, bound, &current)?;
    write_values(shared, target.as_str(), wrote, cause).await
}

/// Writes `wrote` into `doc` as one change, each value only where the doc
/// (as the writer sees it, not as the run read it) holds another.
async fn write_values(
    shared: &Shared,
    doc: &str,
    wrote: Wrote,
    cause: &Cause,
) -> Result<(Json, Wrote), StepError> {
    let nothing = || serde_json::json!({ "doc": doc, "wrote": [] });
    if wrote.is_empty() {
        return Ok((nothing(), wrote));
    }
    let id = DocId::new(doc).map_err(|e| StepError::Final(e.to_string()))?;
    let result = shared
        .docs
        .write_caused(id, Change::SetIfDifferent(wrote.clone()), cause.clone())
        .await
        .map_err(write_error)?;
    if !result.changed {
        return Ok((nothing(), vec![]));
    }
    let paths: Vec<&str> = wrote.iter().map(|(p, _)| p.as_str()).collect();
    let output = serde_json::json!({ "doc": doc, "wrote": paths, "heads": result.heads });
    Ok((output, wrote))
}

/// Sets `value` at JSON Pointer `ptr` in `json`, creating missing maps.
fn set_pointer(json: &mut Json, ptr: &str, value: Json) {
    let tokens: Vec<String> = ptr
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let mut at = json;
    for (i, t) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        match at {
            Json::Object(m) => {
                if last {
                    m.insert(t.clone(), value);
                    return;
                }
                at = m
                    .entry(t.clone())
                    .or_insert_with(|| Json::Object(Default::default()));
            }
            Json::Array(a) => {
                let Some(slot) = t.parse::<usize>().ok().and_then(|i| a.get_mut(i)) else {
                    return;
                };
                if last {
                    *slot = value;
                    return;
                }
                at = slot;
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let r = Retry {
            attempts: 10,
            backoff: Backoff::Exponential,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let waits: Vec<u64> = (1..=6).map(|a| backoff(&r, a).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(&r, 200), Duration::from_secs(1));
        let fixed = Retry {
            backoff: Backoff::Fixed,
            ..r
        };
        assert_eq!(backoff(&fixed, 5), Duration::from_millis(100));
    }

    #[test]
    fn set_pointer_creates_maps_and_unescapes() {
        let mut j = serde_json::json!({"a": [1, 2]});
        set_pointer(&mut j, "/b/c~1d", Json::from(3));
        set_pointer(&mut j, "/a/1", Json::from(5));
        assert_eq!(j, serde_json::json!({"a": [1, 5], "b": {"c/d": 3}}));
    }
}
