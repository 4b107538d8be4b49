//! The runner: the engine's one task. It follows the change feed, feeds
//! the trigger coalescer ([`super::trigger`]), starts and resumes runs up
//! to the concurrency limit, fires schedules, reloads the catalog, and
//! carries out retry and skip (and follows those decided on other nodes).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::catalog::{Applied, applied_doc, read_applied};
use super::effect::{Marker, SYSTEM_PREFIX};
use super::error::WorkflowError;
use super::lifecycle::{reopen, resume, start, start_scheduled};
use super::ownership::{announce, candidates, mark};
use super::plan::Plan;
use super::run::{Run, RunStatus, StepState, run_key};
use super::shared::{Shared, off_executor};
use super::trigger::{Action, Coalescer, Event, Key};
use crate::doc::{DocId, now_ms};
use crate::feed::{DocGlob, Feed, FeedItem};

/// How often the workflow directory is checked for changed files.
const DIR_POLL: Duration = Duration::from_secs(1);

/// Runs created between two prunings of the run log.
const PRUNE_EVERY: u64 = 1000;

pub(super) enum Command {
    Retry(u64, oneshot::Sender<Result<Run, WorkflowError>>),
    Skip(u64, oneshot::Sender<Result<Run, WorkflowError>>),
}

/// The engine's task: owns the queue of pending runs and those in flight.
pub(super) struct Runner {
    shared: Arc<Shared>,
    feed: Arc<Feed>,
    events: Option<Pin<Box<dyn Stream<Item = FeedItem> + Send>>>,
    /// Pending runs and the keys in flight.
    triggers: Coalescer,
    /// Runs to resume (after a restart, or a retry), waiting for their key.
    resumes: VecDeque<Run>,
    tasks: JoinSet<Key>,
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
    pub(super) fn new(shared: Arc<Shared>, feed: Arc<Feed>) -> Runner {
        Runner {
            shared,
            feed,
            events: None,
            triggers: Coalescer::default(),
            resumes: VecDeque::new(),
            tasks: JoinSet::new(),
            created_at_last_prune: 0,
            ticks: BTreeMap::new(),
            applied: BTreeMap::new(),
            applied_dirty: true,
            loaded: false,
        }
    }

    pub(super) async fn run(
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
            let next_due = self.triggers.next_due();
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
                        Ok(key) => self.handle(Event::Finished(key)).await,
                        Err(e) => tracing::error!(err = %e, "a workflow run task failed"),
                    }
                }
                _ = sleep_until(next_due), if next_due.is_some() => self.handle(Event::Tick).await,
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
        let first = !self.loaded;
        self.loaded = true;
        if !changed {
            if first && !self.shared.labels.is_empty() {
                // A node with no workflows still publishes its labels:
                // grants by label (crate::grants) read them.
                announce(&self.shared).await;
            }
            return;
        }
        announce(&self.shared).await;
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
            let candidates = candidates(&self.shared, &name).await;
            if super::effect::owner(&key, &candidates) != Some(&self.shared.local) {
                continue;
            }
            let slot = (name.clone(), String::new());
            if !self.triggers.claim(&slot) {
                tracing::warn!(workflow = %name, "scheduled run skipped: the previous one is still running");
                continue;
            }
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
        let mut wanted: Vec<(Key, Vec<u8>)> = Vec::new();
        for plan in plans {
            let Some((_, glob)) = &plan.def.trigger.doc else {
                continue;
            };
            let user = |d: &&crate::runtime::DocInfo| !d.id.starts_with(SYSTEM_PREFIX);
            for d in docs.iter().filter(user).filter(|d| glob.matches(&d.id)) {
                let heads = serde_json::to_vec(&d.heads).expect("heads serialize");
                wanted.push(((plan.name().to_string(), d.id.clone()), heads));
            }
        }
        // The cursors are read off the executor, in that order; a read
        // that fails ends the rescan there.
        let store = self.shared.store.clone();
        let (stale, failed) = off_executor(move || {
            let mut stale = Vec::new();
            for (key, heads) in wanted {
                match store.cursor(&key.0, &key.1) {
                    Ok(Some(c)) if c == heads => continue,
                    Ok(_) => stale.push(key),
                    Err(e) => return (stale, Some(e)),
                }
            }
            (stale, None)
        })
        .await;
        for key in stale {
            self.handle(Event::Trigger {
                key,
                depth: 1,
                changed: &[],
                trigger,
                delay: Duration::ZERO,
                origin: None,
            })
            .await;
        }
        if let Some(e) = failed {
            tracing::error!(err = %e, "cannot read a workflow cursor");
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
                self.handle(Event::State {
                    key,
                    heads: &e.heads,
                    deleted: e.deleted,
                })
                .await;
                continue;
            }
            let depth = e.cause.as_ref().map_or(1, |c| c.depth.saturating_add(1));
            let delay = if e.local {
                Duration::ZERO
            } else {
                Duration::from_millis(self.shared.cfg.remote_delay_ms)
            };
            self.handle(Event::Trigger {
                key,
                depth,
                changed: &e.paths,
                trigger: "change",
                delay,
                origin: Some(&e.origin),
            })
            .await;
        }
    }

    /// Hands `event` to the coalescer, and carries out what it says.
    async fn handle(&mut self, event: Event<'_>) {
        for action in self.triggers.handle(Instant::now(), event) {
            match action {
                Action::Take(key, heads) => take(&self.shared, &key, &heads).await,
                Action::Coalesced => {
                    self.shared
                        .counters
                        .coalesced
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
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
            if !self.triggers.claim(&key) {
                waiting.push_back(run);
                continue;
            }
            let plan = self.shared.catalog().plans.get(&run.workflow).cloned();
            let shared = self.shared.clone();
            self.tasks.spawn(guarded(key, async move {
                resume(&shared, plan, run).await;
            }));
        }
        waiting.extend(self.resumes.drain(..));
        self.resumes = waiting;
        while self.tasks.len() < max
            && let Some((key, p)) = self.triggers.next_ready()
        {
            let Some(plan) = self.shared.catalog().plans.get(&key.0).cloned() else {
                continue; // Unloaded since.
            };
            self.triggers.claim(&key);
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
        let shared = self.shared.clone();
        let result = off_executor(move || {
            let mut run = shared.log.get(id)?;
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
            shared.put_run_blocking(&run, None)?;
            Ok((run, decided))
        })
        .await;
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
        let (shared, wf, marker) = (self.shared.clone(), workflow.to_string(), id.to_string());
        let dead = off_executor(move || {
            let mine = |doc: &str| !doc.is_empty() && super::effect::marker_doc(&wf, doc) == marker;
            shared.log.dead_of(&wf, mine)
        })
        .await;
        let dead = match dead {
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
                    if let Err(e) = self.shared.put_run(&run, None).await {
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
                    if let Err(e) = self.shared.put_run(&run, None).await {
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

/// Moves the cursor of `key` to `heads` with no run.
async fn take(shared: &Shared, key: &Key, heads: &[String]) {
    let heads = serde_json::to_vec(heads).expect("heads serialize");
    if let Err(err) = shared.put_cursor(&key.0, &key.1, heads).await {
        tracing::warn!(err = %err, "cannot move a workflow cursor");
    }
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
