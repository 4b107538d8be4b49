//! Workflow endpoints: definitions (`/v1/workflows`) and runs (`/v1/runs`).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::error::WrappedRejection;
use super::{ApiError, ApiResult, body};
use crate::node::Node;
use crate::workflow::{RunStatus, WorkflowError};

/// Most runs one listing returns.
const MAX_LIMIT: usize = 10_000;

/// The workflow routes, merged into the main router.
pub(super) fn routes() -> Router<Node> {
    Router::new()
        .route("/v1/workflows", get(list).post(apply))
        .route("/v1/workflows/{name}/enable", post(enable))
        .route("/v1/workflows/{name}/disable", post(disable))
        .route("/v1/workflows/validate", post(validate))
        .route("/v1/workflows/{name}", get(show).delete(remove))
        .route("/v1/runs", get(runs))
        .route("/v1/runs/{id}", get(run))
        .route("/v1/runs/{id}/retry", post(retry))
        .route("/v1/runs/{id}/skip", post(skip))
}

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        let (status, code) = match &e {
            WorkflowError::NoRun(_) | WorkflowError::NoWorkflow(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            WorkflowError::WrongState { .. } => (StatusCode::CONFLICT, "wrong_state"),
            WorkflowError::DefinedByFile { .. } => (StatusCode::CONFLICT, "defined_by_file"),
            WorkflowError::Def(_) => (StatusCode::BAD_REQUEST, "invalid_workflow"),
            WorkflowError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            WorkflowError::Store(_) | WorkflowError::Corrupt { .. } | WorkflowError::Write(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "store_error")
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

async fn list(State(node): State<Node>) -> Response {
    Json(node.workflows().list()).into_response()
}

async fn show(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let Path(name) = path.map_err(|r| WrappedRejection(r, None))?;
    Ok(Json(node.workflows().get(&name)?).into_response())
}

/// `POST /v1/workflows/validate`: the body is a definition (TOML); the
/// answer is what it would load as, or why it does not load.
async fn validate(
    State(node): State<Node>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b = body(b)?;
    Ok(Json(node.workflows().validate("request body", utf8(&b)?)?).into_response())
}

/// `POST /v1/workflows`: the body is a definition (TOML), stored in a
/// system doc that syncs, so every node whose labels match runs it.
async fn apply(State(node): State<Node>, b: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    super::access::admin_only(&node)?;
    let b = body(b)?;
    let text = utf8(&b)?;
    Ok(Json(node.workflows().apply(text).await?).into_response())
}

/// `DELETE /v1/workflows/{name}`: removes a definition applied through the
/// API, on every node (its system doc syncs).
async fn remove(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    super::access::admin_only(&node)?;
    let Path(name) = path.map_err(|r| WrappedRejection(r, None))?;
    Ok(Json(node.workflows().delete(&name).await?).into_response())
}

async fn enable(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    super::access::admin_only(&node)?;
    let Path(name) = path.map_err(|r| WrappedRejection(r, None))?;
    Ok(Json(node.workflows().set_enabled(&name, true).await?).into_response())
}

async fn disable(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    super::access::admin_only(&node)?;
    let Path(name) = path.map_err(|r| WrappedRejection(r, None))?;
    Ok(Json(node.workflows().set_enabled(&name, false).await?).into_response())
}

fn utf8(b: &[u8]) -> ApiResult<&str> {
    std::str::from_utf8(b).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("the definition is not UTF-8: {e}"),
        )
    })
}

/// Query of `GET /v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    workflow: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    /// Only runs with a lower id: the last id of the previous page.
    before: Option<u64>,
}

async fn runs(
    State(node): State<Node>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|r| WrappedRejection(r, None))?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("status {s:?}: one of queued, running, done, dead, skipped"),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100).min(MAX_LIMIT);
    let engine = node.workflows().clone();
    let workflow = q.workflow.clone();
    let before = q.before;
    let runs = super::off_executor(move || match before {
        None => engine.runs(workflow.as_deref(), status, limit),
        Some(b) => engine.runs_before(workflow.as_deref(), status, b, limit),
    })
    .await?;
    // A full page may have more behind it: name the next one, as
    // `GET /v1/docs` does.
    let next = match runs.last() {
        Some(last) if limit > 0 && runs.len() == limit => {
            let mut pairs: Vec<(&str, String)> = vec![];
            if let Some(w) = &q.workflow {
                pairs.push(("workflow", w.clone()));
            }
            if let Some(s) = &q.status {
                pairs.push(("status", s.clone()));
            }
            pairs.push(("limit", limit.to_string()));
            pairs.push(("before", last.id.to_string()));
            Some(pairs)
        }
        _ => None,
    };
    let mut resp = Json(runs).into_response();
    if let Some(next) = next {
        super::link_next(&mut resp, "/v1/runs", &next);
    }
    Ok(resp)
}

fn run_id(path: Result<Path<String>, PathRejection>) -> ApiResult<u64> {
    let Path(id) = path.map_err(|r| WrappedRejection(r, None))?;
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_path",
            format!("run id {id:?} is not a number"),
        )
    })
}

async fn run(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = run_id(path)?;
    let engine = node.workflows().clone();
    let run = super::off_executor(move || engine.run(id)).await?;
    Ok(Json(run).into_response())
}

async fn retry(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    Ok(Json(node.workflows().retry(run_id(path)?).await?).into_response())
}

async fn skip(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    Ok(Json(node.workflows().skip(run_id(path)?).await?).into_response())
}
