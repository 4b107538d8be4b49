//! Step execution: a run's steps in order, with retries and backoff, the
//! data steps (derive, write, resolve), effects (http, exec) once this node
//! owns them, and the `on_failure` alert of a dead run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::data_steps::{StepError, WriteAs, derive, resolve, set_pointer, write};
use super::def::{Action, Backoff, Retry};
use super::effect::{Failure, Marker};
use super::effect_run::{Payload, delivered, effect_body, effect_input, effect_query, run_effect};
use super::expr::{Bound, Input};
use super::ownership::{Seen, Turn, await_turn, mark, owns_effects};
use super::plan::{Plan, StepPlan};
use super::run::{Run, RunStatus, StepRun, StepState};
use super::shared::Shared;
use crate::doc::now_ms;
use crate::feed::Cause;
use crate::store::StoreError;

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
        // A step after an effect runs where the effect ran: it may use the
        // effect's answer, which only that node has.
        if let Some(by) = sp
            .after_effects
            .iter()
            .find_map(|&j| ran_elsewhere(&run.steps[j]))
        {
            let s = &mut run.steps[i];
            s.state = StepState::Done;
            s.output = Some(serde_json::json!({ "ran_on": by }));
            s.error = None;
            s.finished_ms = Some(now_ms());
            continue;
        }
        let s = &mut run.steps[i];
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
        let with_steps;
        let b = match bound.as_ref().expect("bound above") {
            b if sp.upstream.is_empty() => b,
            b => match shared.sandbox.with_steps(b, &outputs(&run.steps, sp)) {
                Ok(w) => {
                    with_steps = w;
                    &with_steps
                }
                Err(e) => {
                    let s = &mut run.steps[i];
                    s.state = StepState::Failed;
                    s.error = Some(format!("steps: {e}"));
                    continue;
                }
            },
        };
        let s = &mut run.steps[i];
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
        let prepared = effect_query(shared, sp, b)
            .and_then(|q| Ok((q, effect_body(shared, sp, &step.action, b)?)));
        let (query, input) = match prepared {
            Ok((q, Some(body))) => (q, Some(body)),
            Ok((q, None)) => {
                let input =
                    effect.then(|| effect_input(shared, &run, &step.id, &effect_key, &json));
                (q, input)
            }
            Err(e) => {
                let s = &mut run.steps[i];
                s.state = StepState::Failed;
                s.error = Some(e);
                failed_here.push(i);
                continue;
            }
        };
        // Writes after an effect carry a key of their own, the same on
        // every node: one that takes the run over cannot apply them twice.
        let how = WriteAs {
            cause: &cause,
            idem: (!sp.after_effects.is_empty()).then(|| effect_key.clone()),
        };
        // An effect that later steps build on is marked handled once they
        // are done (see `mark_chains`): a node taking over runs them all.
        let has_dependents = plan.steps.iter().any(|p| p.after_effects.contains(&i));
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
                Action::Derive { .. } => derive(shared, sp, b, &run.doc, &json, &how).await,
                Action::Write { .. } => write(shared, sp, b, &how).await,
                Action::Http { .. } | Action::Exec { .. } => {
                    let out = run_effect(
                        shared,
                        applied,
                        &step.action,
                        &run,
                        &step.id,
                        &effect_key,
                        Payload {
                            input: input.as_ref(),
                            query: &query,
                        },
                    )
                    .await;
                    delivered(shared, &run, &effect_key, out, !has_dependents).await
                }
                Action::Resolve { policy, .. } => {
                    resolve(shared, sp, &run.doc, *policy, &how).await
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
                    note_failure(s, sp, plan, i, &mut failed_here);
                    break;
                }
                Err(StepError::Retry(e)) => {
                    if s.attempts >= step.retry.attempts {
                        s.state = StepState::Failed;
                        s.error = Some(e);
                        note_failure(s, sp, plan, i, &mut failed_here);
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
            mark_chains(shared, plan, &run, &failed_here).await;
            if let Err(e) = record(shared, &run, &mut cursor).await {
                tracing::error!(err = %e, "cannot write the run log");
            }
            return;
        }
        run.status = RunStatus::Dead;
        shared.counters.dead.fetch_add(1, Ordering::Relaxed);
        // Chains that finished before another step failed were handled.
        mark_chains(shared, plan, &run, &failed_here).await;
        tracing::warn!(run = run.id, workflow = %run.workflow, doc = %run.doc, err = %run.error.as_deref().unwrap_or(""), "workflow run dead-lettered");
        if let Err(e) = record(shared, &run, &mut cursor).await {
            tracing::error!(err = %e, "cannot write the run log");
        }
        // A dead effect is a decision: recorded in its marker, so that no
        // other node takes it over and every node shows it dead.
        for &i in &failed_here {
            let key = super::effect::effect_key(&run.key, &run.steps[i].id);
            let by = shared.local.clone();
            // A chain's effect that succeeded dies of the step after it.
            let error = run.steps[i]
                .error
                .clone()
                .or_else(|| run.error.clone())
                .unwrap_or_default();
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
    // Marked before the record: a crash between the two runs the chain
    // again here (keyed writes), never leaves the others waiting for good.
    mark_chains(shared, plan, &run, &[]).await;
    if let Err(e) = record(shared, &run, &mut cursor).await {
        tracing::error!(err = %e, "cannot write the run log");
    }
}

/// Marks handled each effect that ran here and that later steps build on
/// (but those in `dead`, whose chain failed), now that the run is over:
/// until then the other nodes waited, and one taking the run over would run
/// the effect and those steps again.
async fn mark_chains(shared: &Arc<Shared>, plan: &Plan, run: &Run, dead: &[usize]) {
    for (i, s) in run.steps.iter().enumerate() {
        if dead.contains(&i) {
            continue;
        }
        let chained = plan.steps.iter().any(|p| p.after_effects.contains(&i));
        let here = s.output.as_ref().is_some_and(|o| {
            ["delivered_by", "dead_by", "skipped_by", "ran_on"]
                .iter()
                .all(|k| o.get(k).is_none())
        });
        if chained && s.state == StepState::Done && here {
            let key = super::effect::effect_key(&run.key, &s.id);
            let by = shared.local.clone();
            let what = Marker::Handled {
                by,
                when_false: false,
            };
            mark(shared, run, &key, what).await;
        }
    }
}

/// The node that ran effect step `s` for this run, if another node did.
fn ran_elsewhere(s: &StepRun) -> Option<String> {
    let o = s.output.as_ref()?;
    let by = o.get("delivered_by").or_else(|| o.get("ran_on"))?;
    Some(by.as_str()?.to_string())
}

/// What `steps` holds for the expressions of step `sp`: the output of each
/// step it needs, directly or through others, with its `state`.
fn outputs(steps: &[StepRun], sp: &StepPlan) -> Json {
    let mut out = serde_json::Map::new();
    for &j in &sp.upstream {
        let s = &steps[j];
        let mut o = match &s.output {
            Some(Json::Object(m)) => m.clone(),
            Some(other) => [("output".to_string(), other.clone())]
                .into_iter()
                .collect(),
            None => serde_json::Map::new(),
        };
        let state = serde_json::to_value(s.state).expect("a state serializes");
        o.insert("state".into(), state);
        out.insert(s.id.clone(), Json::Object(o));
    }
    Json::Object(out)
}

/// Notes who decides about failed step `i`: an effect decides for itself,
/// and a step after effects for them (they ran here, or it would not have
/// run): the other nodes wait on their markers.
fn note_failure(
    s: &mut StepRun,
    sp: &StepPlan,
    plan: &Plan,
    i: usize,
    failed_here: &mut Vec<usize>,
) {
    if plan.def.steps[i].action.is_effect() {
        failed_here.push(i);
    } else if let Some(&j) = sp.after_effects.first() {
        s.output = Some(serde_json::json!({ "after_effect": plan.def.steps[j].id }));
    }
    for &j in &sp.after_effects {
        if !failed_here.contains(&j) {
            failed_here.push(j);
        }
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
        match run_effect(
            shared,
            applied,
            &step.action,
            run,
            &step.id,
            &key,
            Payload {
                input: Some(&input),
                query: &[],
            },
        )
        .await
        {
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
}
