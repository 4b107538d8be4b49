//! Step execution: a run's steps in order, with retries and backoff, the
//! data steps (derive, write, resolve), effects (http, exec) once this node
//! owns them, and the `on_failure` alert of a dead run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::def::{Action, Backoff, Policy, Retry};
use super::effect::{Failure, Marker};
use super::expr::{Bound, Input};
use super::ownership::{Seen, Turn, await_turn, mark, owns_effects};
use super::plan::{Plan, kind_name};
use super::run::{Run, RunStatus, StepState};
use super::shared::Shared;
use crate::doc::{DocError, DocId, Pointer, now_ms};
use crate::feed::Cause;
use crate::runtime::Change;
use crate::store::StoreError;

/// Why a step failed: `Final` failures would fail the same way again.
enum StepError {
    Final(String),
    Retry(String),
}

/// Executes the steps of `run` that are not done yet, in order, writing the
/// record as steps finish. `cursor`, if given, is the trigger cursor to move
/// with the run's first record.
pub(super) async fn execute(
    shared: &Arc<Shared>,
    plan: &Plan,
    mut run: Run,
    mut json: Json,
    mut bound: Option<Bound>,
    mut cursor: Option<Vec<u8>>,
) {
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
    let applied = plan.source_name.starts_with("applied:");
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
                if let Err(e) = record(shared, &run, &mut cursor).await {
                    tracing::warn!(err = %e, "cannot write the run log");
                }
            }
            let outcome = match &step.action {
                Action::Derive { .. } => derive(shared, sp, b, &run.doc, &json, &cause).await,
                Action::Write { .. } => write(shared, sp, b, &cause).await,
                Action::Http { .. } | Action::Exec { .. } => {
                    let input = input.as_ref().expect("effects have input");
                    let out = run_effect(
                        shared,
                        applied,
                        &step.action,
                        &run,
                        &step.id,
                        &effect_key,
                        input,
                    )
                    .await;
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
                    if let Err(e) = record(shared, &run, &mut cursor).await {
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
            if let Err(e) = record(shared, &run, &mut cursor).await {
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
            if let Err(e) = record(shared, &run, &mut cursor).await {
                tracing::error!(err = %e, "cannot write the run log");
            }
            return;
        }
        run.status = RunStatus::Dead;
        shared.counters.dead.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(run = run.id, workflow = %run.workflow, doc = %run.doc, err = %run.error.as_deref().unwrap_or(""), "workflow run dead-lettered");
        if let Err(e) = record(shared, &run, &mut cursor).await {
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
    if let Err(e) = record(shared, &run, &mut cursor).await {
        tracing::error!(err = %e, "cannot write the run log");
    }
}

/// Writes `run`'s record, with `cursor` until that has been written once.
async fn record(
    shared: &Arc<Shared>,
    run: &Run,
    cursor: &mut Option<Vec<u8>>,
) -> Result<(), StoreError> {
    shared.put_run(run, cursor.as_deref()).await?;
    *cursor = None;
    Ok(())
}

/// Runs the workflow's `on_failure` effect for a dead run, on one node: the
/// rendezvous owner of `<run key>-on_failure` among the live nodes running
/// the workflow. Its input is `{"run": <the run record>, "node": <peer id>}`;
/// it is retried with its backoff, then given up with an error in the log.
pub(super) async fn alert_failure(shared: &Arc<Shared>, plan: &Plan, run: &Run, here: bool) {
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
        let applied = plan.source_name.starts_with("applied:");
        match run_effect(shared, applied, &step.action, run, &step.id, &key, &input).await {
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
    shared: &Arc<Shared>,
    applied: bool,
    action: &Action,
    run: &Run,
    step: &str,
    key: &str,
    input: &Json,
) -> Result<Json, Failure> {
    match action {
        Action::Http { url, timeout } if applied => {
            // The catalog checked the URL; check again in case the allow
            // list is stricter than when it loaded.
            shared.http_allow.check_url(url).map_err(Failure::Final)?;
            super::effect::http(&shared.http_applied, url, *timeout, input, key).await
        }
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

/// The JSON an effect gets: the run's metadata and the doc.
fn effect_input(shared: &Arc<Shared>, run: &Run, step: &str, key: &str, doc: &Json) -> Json {
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
    shared: &Arc<Shared>,
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
    shared: &Arc<Shared>,
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
    shared: &Arc<Shared>,
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
    shared: &Arc<Shared>,
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
    shared: &Arc<Shared>,
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
    shared: &Arc<Shared>,
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
