//! MQTT bridge endpoints: `GET /v1/mqtt` (each bridge's state and
//! numbers) and its dead letters (`GET /v1/mqtt/dead`, `DELETE
//! /v1/mqtt/dead/{id}` once handled).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::WrappedRejection;
use super::{ApiError, ApiResult};
use crate::node::Node;

/// Most dead letters one page holds.
const MAX_LIMIT: usize = 1000;

pub(super) fn routes() -> Router<Node> {
    Router::new()
        .route("/v1/mqtt", get(bridges))
        .route("/v1/mqtt/dead", get(dead))
        .route("/v1/mqtt/dead/{id}", delete(remove))
}

async fn bridges(State(node): State<Node>) -> ApiResult<Json<serde_json::Value>> {
    let n = node.clone();
    let (_, count) = super::off_executor(move || n.dead_letters(0, None)).await?;
    Ok(Json(json!({
        "bridges": node.mqtt_bridges(),
        "dead_letters": count,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadQuery {
    limit: Option<usize>,
    /// Only letters with a lower id: the last id of the previous page.
    before: Option<u64>,
}

async fn dead(
    State(node): State<Node>,
    q: Result<Query<DeadQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = q.map_err(|r| WrappedRejection(r, None))?;
    let limit = q.limit.unwrap_or(100).min(MAX_LIMIT);
    let (letters, count) = super::off_executor(move || node.dead_letters(limit, q.before)).await?;
    Ok(Json(json!({ "dead_letters": letters, "count": count })))
}

async fn remove(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Path(id) = path.map_err(|r| WrappedRejection(r, None))?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_path",
            format!("dead letter id {id:?} is not a number"),
        )
    })?;
    if !super::off_executor(move || node.remove_dead_letter(id)).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead letter {id}"),
        ));
    }
    Ok(Json(json!({ "removed": id })))
}
