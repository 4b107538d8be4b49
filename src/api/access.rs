//! `GET /v1/access` (the rules this node holds) and `PUT /v1/access` (apply
//! an access file for the whole network; admins only, see
//! [`crate::grants`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{ApiError, ApiResult, body};
use crate::grants::AccessFile;
use crate::node::Node;

pub(super) fn routes() -> Router<Node> {
    Router::new().route("/v1/access", get(show).put(apply))
}

async fn show(State(node): State<Node>) -> Response {
    let policy = node.policy();
    let me = node.peer_id().to_string();
    Json(json!({
        "admins": policy.admins(),
        "this_node_is_admin": policy.is_admin(&me),
        "grant": policy.grants(),
    }))
    .into_response()
}

/// The body is an access file (TOML).
async fn apply(State(node): State<Node>, b: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let b = body(b)?;
    let bad = |what: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_access_file", what);
    let text = std::str::from_utf8(&b).map_err(|e| bad(format!("the body is not UTF-8: {e}")))?;
    let file = AccessFile::parse(text, "request body").map_err(bad)?;
    let written = node.apply_access(&file).await?;
    Ok(Json(json!({
        "id": written.id,
        "heads": written.heads,
        "changed": written.changed,
        "grants": file.grant.len(),
    }))
    .into_response())
}

/// Refuses a change to workflow definitions on a node that is not an admin
/// (`net.admins`): 403 `forbidden`.
pub(super) fn admin_only(node: &Node) -> ApiResult<()> {
    Ok(node.require_admin("change workflow definitions and grants")?)
}
