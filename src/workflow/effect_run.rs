//! Running an effect step (`http`, `exec`) once: what it is given (the
//! run and the doc, or its `body`; its `query`), the request or command,
//! and the delivery marker that tells the other nodes it was handled.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value as Json;

use super::data_steps::{StepError, Wrote};
use super::def::Action;
use super::effect::{Failure, Marker};
use super::expr::Bound;
use super::ownership::mark;
use super::plan::{StepPlan, kind_name};
use super::run::Run;
use super::shared::Shared;

/// What an effect is given: its JSON input (an `http` step's body, an
/// `exec` step's stdin), and an `http` step's query parameters.
pub(super) struct Payload<'a> {
    pub(super) input: Option<&'a Json>,
    pub(super) query: &'a [(String, String)],
}

/// Executes effect `action` (http or exec) of `run`'s step `step` once,
/// with `input` as its JSON and `key` as its idempotency key.
pub(super) async fn run_effect(
    shared: &Arc<Shared>,
    applied: bool,
    action: &Action,
    run: &Run,
    step: &str,
    key: &str,
    payload: Payload<'_>,
) -> Result<Json, Failure> {
    let Payload { input, query } = payload;
    let max_output = shared.cfg.max_step_output;
    match action {
        Action::Http {
            url,
            timeout,
            method,
            headers,
            ..
        } => {
            let client = if applied {
                // The catalog checked the URL; check again in case the
                // allow list is stricter than when it loaded.
                shared.http_allow.check_url(url).map_err(Failure::Final)?;
                // A definition any peer may have applied reads no secrets
                // from this node's environment.
                if headers.values().any(|v| v.contains("${")) {
                    return Err(Failure::Final(
                        "headers: an applied definition may not read environment variables \
                         (it syncs from peers); put it in the node's workflow dir"
                            .into(),
                    ));
                }
                &shared.http_applied
            } else {
                &shared.http
            };
            let req = super::effect::Request {
                method: *method,
                url,
                timeout: *timeout,
                headers,
                body: input.filter(|_| method.has_body()),
                query,
                key,
                max_output,
            };
            super::effect::http(client, req).await
        }
        Action::Exec { command, timeout } => {
            let input = input.unwrap_or(&Json::Null);
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
            super::effect::exec(command, *timeout, input, &env, data_dir, max_output).await
        }
        other => Err(Failure::Final(format!(
            "kind {} is not an effect",
            kind_name(other)
        ))),
    }
}

/// The JSON an effect gets: the run's metadata and the doc.
pub(super) fn effect_input(
    shared: &Arc<Shared>,
    run: &Run,
    step: &str,
    key: &str,
    doc: &Json,
) -> Json {
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
/// the nodes that did not own it stop waiting), unless `mark_now` is false
/// (later steps build on it: [`mark_chains`] marks it).
pub(super) async fn delivered(
    shared: &Arc<Shared>,
    run: &Run,
    key: &str,
    out: Result<Json, Failure>,
    mark_now: bool,
) -> Result<(Json, Wrote), StepError> {
    let out = out.map_err(|f| match f {
        Failure::Final(e) => StepError::Final(e),
        Failure::Retry(e) => StepError::Retry(e),
    })?;
    let by = shared.local.clone();
    let what = match mark_now {
        true => Marker::Handled {
            by,
            when_false: false,
        },
        // The steps after it run here next: the others wait for this node
        // while it is connected, however long they take.
        false => Marker::Trying { by },
    };
    mark(shared, run, key, what).await;
    let mut out = out;
    out["idempotency_key"] = Json::String(key.to_string());
    Ok((out, vec![]))
}

/// The query parameters of an `http` step with a `query` expression: an
/// object whose values are strings, numbers or booleans (null leaves a
/// parameter out).
pub(super) fn effect_query(
    shared: &Arc<Shared>,
    sp: &StepPlan,
    b: &Bound,
) -> Result<Vec<(String, String)>, String> {
    let Some(expr) = &sp.query else {
        return Ok(vec![]);
    };
    let map = match shared
        .sandbox
        .eval(expr, b)
        .map_err(|e| format!("query: {e}"))?
    {
        None => return Ok(vec![]),
        Some(Json::Object(m)) => m,
        Some(other) => {
            let kind = crate::doc::ops::describe_json(&other);
            return Err(format!("query: the value is {kind}; it must be an object"));
        }
    };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let v = match v {
            Json::Null => continue,
            Json::String(s) => s,
            Json::Number(n) => n.to_string(),
            Json::Bool(b) => b.to_string(),
            other => {
                let kind = crate::doc::ops::describe_json(&other);
                return Err(format!(
                    "query {k:?}: {kind}; use a string, number or boolean"
                ));
            }
        };
        out.push((k, v));
    }
    Ok(out)
}

/// The body an `http` step with a `body` expression sends; `None` for
/// every other step (an effect then gets the run and the doc).
pub(super) fn effect_body(
    shared: &Arc<Shared>,
    sp: &StepPlan,
    action: &Action,
    b: &Bound,
) -> Result<Option<Json>, String> {
    let Some(expr) = &sp.body else {
        return Ok(None);
    };
    if !matches!(action, Action::Http { .. }) {
        return Ok(None);
    }
    let body = shared
        .sandbox
        .eval(expr, b)
        .map_err(|e| format!("body: {e}"))?;
    Ok(Some(body.unwrap_or(Json::Null)))
}
