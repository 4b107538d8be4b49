//! A run's life outside its steps: starting one on a doc's state (the
//! trigger cursor, `[on] when`, the depth limit, the first record), starting
//! a scheduled one, resuming an open one, and reopening a dead one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value as Json;

use super::expr::Input;
use super::plan::{Plan, kind_name};
use super::run::{Run, RunStatus, StepRun, StepState, run_key};
use super::shared::Shared;
use super::step::{alert_failure, execute};
use super::trigger::Pending;
use crate::doc::{DocError, DocId, now_ms};
use crate::feed::Cause;

/// Starts a run of `plan` on the current state of `doc`, if that state was
/// not taken before.
pub(super) async fn start(shared: &Arc<Shared>, plan: Arc<Plan>, doc: &str, p: Pending) {
    let Ok(id) = DocId::new(doc) else { return };
    let taken: Vec<String> = match shared.cursor(plan.name(), doc).await {
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
        && snap.messages_since.as_ref().is_some_and(|m| {
            m.iter().all(|m| {
                m.as_deref()
                    .and_then(Cause::from_message)
                    .is_some_and(|c| c.workflow == plan.name())
            })
        });
    if own_only {
        if let Err(e) = shared.put_cursor(plan.name(), doc, cursor.clone()).await {
            tracing::warn!(err = %e, "cannot move a workflow cursor");
        }
        return;
    }
    // The run reacts to every change since the state taken last, so its
    // depth is at least one more than theirs: a trigger event that arrives
    // late (after another run took its state, e.g. the startup scan) must not
    // restart a loop's count on the changes of a deeper run.
    let depth = snap
        .messages_since
        .iter()
        .flatten()
        .filter_map(|m| m.as_deref().and_then(Cause::from_message))
        // Its own writes never trigger it (see `own_only`).
        .filter(|c| c.workflow != plan.name())
        .map(|c| c.depth.saturating_add(1))
        .fold(p.depth, u32::max);
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
    if depth > shared.cfg.max_depth {
        let e = format!(
            "chain of triggered runs is {} deep, over workflow.max_depth = {}: a workflow loop? \
             (retry runs it anyway)",
            depth, shared.cfg.max_depth
        );
        tracing::error!(workflow = %plan.name(), doc, "{e}");
        dead = Some(e);
    } else if let Some(when) = &plan.when {
        match shared.sandbox.test(when, &bound) {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = shared.put_cursor(plan.name(), doc, cursor.clone()).await {
                    tracing::warn!(err = %e, "cannot move a workflow cursor");
                }
                return;
            }
            Err(e) => dead = Some(format!("[on] when: {e}")),
        }
    }
    let run_id = match shared.next_run_id().await {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(err = %e, "cannot number a workflow run");
            return;
        }
    };
    let key = run_key(plan.name(), doc, &trigger_heads);
    let mut run = new_run(&plan, run_id, key, doc, trigger_heads, depth, p.trigger);
    run.origin = p.origin;
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
    if let Err(e) = shared.put_run(&run, Some(&cursor)).await {
        tracing::error!(err = %e, "cannot write the run log; the run does not start");
        return;
    }
    if run.status == RunStatus::Running {
        execute(shared, &plan, run, json, Some(bound), None).await;
    } else {
        alert_failure(shared, &plan, &run, false).await;
    }
}

/// Runs a scheduled workflow once: no triggering doc (`doc` is `{}` to its
/// expressions, `id` is empty); its effects run here, the owner of the tick.
pub(super) async fn start_scheduled(
    shared: &Arc<Shared>,
    plan: Arc<Plan>,
    key: String,
    heads: Vec<String>,
) {
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
    let Ok(id) = shared.next_run_id().await else {
        tracing::error!("cannot number a workflow run");
        return;
    };
    let run = new_run(&plan, id, key, "", heads, 1, "schedule");
    shared.counters.runs.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = shared.put_run(&run, None).await {
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
        origin: None,
    }
}

/// Resumes an open run (after a restart, or a retry) on the doc's current state.
pub(super) async fn resume(shared: &Arc<Shared>, plan: Option<Arc<Plan>>, mut run: Run) {
    let Some(plan) = plan.filter(|p| same_steps(p, &run)) else {
        run.status = RunStatus::Dead;
        run.error = Some(format!(
            "workflow {:?} is no longer loaded, or its steps changed; the run cannot resume",
            run.workflow
        ));
        run.updated_ms = now_ms();
        shared.counters.dead.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = shared.put_run(&run, None).await {
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
            if let Err(e) = shared.put_run(&run, None).await {
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

/// Opens a dead run again: its failed, cancelled or interrupted steps are
/// pending with no attempts.
pub(super) fn reopen(run: &mut Run) {
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
