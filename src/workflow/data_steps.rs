//! The data steps: `derive` (values into the triggering doc), `write`
//! (values or a merge patch into another doc) and `resolve` (a conflict
//! policy applied), each written as one change carrying the run's cause.

use std::sync::Arc;

use serde_json::{Value as Json, json};

use super::def::Policy;
use super::expr::Bound;
use super::plan::StepPlan;
use super::shared::Shared;
use crate::doc::{DocError, DocId, Pointer};
use crate::feed::Cause;
use crate::runtime::Change;

/// Why a step failed: `Final` failures would fail the same way again.
pub(super) enum StepError {
    Final(String),
    Retry(String),
}

/// How a data step writes: the run's cause, and the idempotency key its
/// change carries when it comes after an effect (so that a node taking
/// the run over cannot apply it twice).
pub(super) struct WriteAs<'a> {
    pub(super) cause: &'a Cause,
    pub(super) idem: Option<String>,
}

pub(super) type Wrote = Vec<(Pointer, Json)>;

/// The values of `sp.set` that differ from what `current` holds.
fn changes(
    shared: &Arc<Shared>,
    sp: &StepPlan,
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

pub(super) fn write_error(e: DocError) -> StepError {
    match e {
        DocError::Store(_) | DocError::Internal(_) => StepError::Retry(e.to_string()),
        e => StepError::Final(e.to_string()),
    }
}

/// A `derive` step: values written into the triggering doc where they differ.
pub(super) async fn derive(
    shared: &Arc<Shared>,
    sp: &StepPlan,
    bound: &Bound,
    doc: &str,
    json: &Json,
    how: &WriteAs<'_>,
) -> Result<(Json, Wrote), StepError> {
    let wrote = changes(shared, sp, bound, json)?;
    write_values(shared, doc, wrote, how).await
}

/// A `resolve` step: at each conflicted place its glob names, the value the
/// policy picks is written, unless reads already return it.
pub(super) async fn resolve(
    shared: &Arc<Shared>,
    sp: &StepPlan,
    doc: &str,
    policy: Policy,
    how: &WriteAs<'_>,
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
        report.push(json!({
            "path": c.path,
            "values": c.values.len(),
            "winner": winner.value,
        }));
        if winner.value != c.visible {
            let ptr = Pointer::parse(&c.path).map_err(|e| StepError::Final(e.to_string()))?;
            wrote.push((ptr, winner.value.clone()));
        }
    }
    let (mut output, wrote) = write_values(shared, doc, wrote, how).await?;
    output["conflicts"] = Json::Array(report);
    Ok((output, wrote))
}

/// A `write` step: values written into the target doc where they differ,
/// or its `merge` patch applied to it.
pub(super) async fn write(
    shared: &Arc<Shared>,
    sp: &StepPlan,
    bound: &Bound,
    how: &WriteAs<'_>,
) -> Result<(Json, Wrote), StepError> {
    let target = sp.target.clone().expect("write steps have a target");
    if let Some(expr) = &sp.merge {
        let doc = target.to_string();
        let patch = match shared.sandbox.eval(expr, bound) {
            Ok(None) => return Ok((json!({ "doc": doc, "merged": false }), vec![])),
            Ok(Some(p @ Json::Object(_))) => p,
            Ok(Some(other)) => {
                let kind = crate::doc::ops::describe_json(&other);
                return Err(StepError::Final(format!(
                    "merge: the value is {kind}; a merge patch is a JSON object"
                )));
            }
            Err(e) => return Err(StepError::Final(format!("merge: {e}"))),
        };
        let result = shared
            .docs
            .write_caused(
                target,
                Change::Patch(patch),
                how.cause.clone(),
                how.idem.clone(),
            )
            .await
            .map_err(write_error)?;
        let output = json!({ "doc": doc, "merged": result.changed, "heads": result.heads });
        return Ok((output, vec![]));
    }
    let current = match shared.docs.get(target.clone(), None).await {
        Ok(j) => j,
        Err(DocError::NotFound(_)) => Json::Object(Default::default()),
        Err(e) => return Err(write_error(e)),
    };
    let wrote = changes(shared, sp, bound, &current)?;
    write_values(shared, target.as_str(), wrote, how).await
}

/// Writes `wrote` into `doc` as one change, each value only where the doc
/// (as the writer sees it, not as the run read it) holds another.
async fn write_values(
    shared: &Arc<Shared>,
    doc: &str,
    wrote: Wrote,
    how: &WriteAs<'_>,
) -> Result<(Json, Wrote), StepError> {
    let nothing = || json!({ "doc": doc, "wrote": [] });
    if wrote.is_empty() {
        return Ok((nothing(), wrote));
    }
    let id = DocId::new(doc).map_err(|e| StepError::Final(e.to_string()))?;
    let result = shared
        .docs
        .write_caused(
            id,
            Change::SetIfDifferent(wrote.clone()),
            how.cause.clone(),
            how.idem.clone(),
        )
        .await
        .map_err(write_error)?;
    if !result.changed {
        return Ok((nothing(), vec![]));
    }
    let paths: Vec<&str> = wrote.iter().map(|(p, _)| p.as_str()).collect();
    let output = json!({ "doc": doc, "wrote": paths, "heads": result.heads });
    Ok((output, wrote))
}

/// Sets `value` at JSON Pointer `ptr` in `json`, creating missing maps.
pub(super) fn set_pointer(json: &mut Json, ptr: &str, value: Json) {
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
    fn set_pointer_creates_maps_and_unescapes() {
        let mut j = serde_json::json!({"a": [1, 2]});
        set_pointer(&mut j, "/b/c~1d", Json::from(3));
        set_pointer(&mut j, "/a/1", Json::from(5));
        assert_eq!(j, serde_json::json!({"a": [1, 5], "b": {"c/d": 3}}));
    }
}
