//! The HTTP API (axum) under `/v1`, plus `/healthz`.
//!
//! Doc ids are percent-encoded in URLs (`sensors%2Fgreenhouse-3`). Write
//! responses are sent after the write is durable. Every error is JSON
//! `{"error": {"code", "message"}}`; bodies are parsed by us (not by axum's
//! extractors) so that malformed input gets the same shape, and a rejected body
//! never reaches the store.
//!
//! Browser safety (Host, Origin, CORS, content types) is in `guard.rs`; the
//! connection handling (limits, timeouts, shutdown) in `serve.rs`.

mod access;
mod auth;
mod automerge;
mod backup;
mod dashboard;
mod error;
mod events;
mod extract;
pub(crate) mod guard;
pub mod history;
mod mqtt;
pub(crate) mod serve;
mod workflows;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use events::{EventsQuery, Include};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json_;

use std::sync::Arc;

use crate::access::{Access, Tokens};
use crate::doc::{DocId, Op, Pointer};
use crate::node::Node;
use crate::runtime::Change;
use dashboard::{dashboard, dashboard_off};
use error::WrappedRejection;
use extract::{ApiResult, body, doc_id, link_next, parse};

/// Body of `POST /v1/docs`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The id; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// The initial content, a JSON object.
    pub value: Json_,
}

/// Query of `GET /v1/docs/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    /// A JSON Pointer to a subtree.
    pub path: Option<String>,
}

/// Body of `DELETE /v1/docs/{id}`'s response.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeleteResponse {
    /// The document.
    pub id: String,
    /// Heads at deletion.
    pub heads: Vec<String>,
    /// Always true.
    pub deleted: bool,
}

/// Builds the router for `node`.
pub fn router(node: Node) -> Router {
    let limit = node.config().api.max_body_bytes;
    // The config was validated: its tokens parse.
    let tokens = Arc::new(Tokens::new(&node.config().api).unwrap_or_default());
    let dashboard = if node.config().api.dashboard {
        Router::new().route("/", get(dashboard))
    } else {
        Router::new().route("/", get(dashboard_off))
    };
    let samples = Router::new()
        .route("/v1/status/history", get(history::handler))
        .with_state((
            node.clone(),
            history::History::start(&node, node.config().api.dashboard),
        ));
    dashboard
        .merge(samples)
        .route("/healthz", get(healthz))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/peers", get(peers))
        .route("/v1/peers/digest", post(ask_digests))
        .route("/v1/docs", post(create).get(list))
        .route("/v1/docs/{id}", get(read).patch(patch).delete(delete))
        .route("/v1/docs/{id}/ops", post(ops))
        .route("/v1/docs/{id}/heads", get(heads))
        .route("/v1/docs/{id}/sync", get(doc_sync))
        .route("/v1/docs/{id}/history", get(history))
        .route("/v1/events", get(events::events))
        .merge(workflows::routes())
        .merge(access::routes())
        .merge(automerge::routes(&node, tokens.clone()))
        .merge(backup::routes())
        .merge(mqtt::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            refuse_writes_on_failed_store,
        ))
        .layer(axum::middleware::from_fn(guard::require_body_type))
        .layer(axum::middleware::from_fn_with_state(
            tokens.clone(),
            auth::require_token,
        ))
        // Outermost: browser checks first, so that preflights (which carry
        // no token) are answered and foreign pages are refused before
        // anything else runs.
        .layer(axum::middleware::from_fn_with_state(
            guard::Guard::new(&node.config().api),
            guard::browser_guard,
        ))
        .with_state(node)
}

/// While the store has failed (a full disk), reads go on and every request
/// that would write answers 507 `store_failed` at once: the store refuses
/// writes until the node restarts on its data dir, which `mergeflow start`
/// does once the data dir takes writes again.
async fn refuse_writes_on_failed_store(
    State(node): State<Node>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let reads = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    ) || matches!(
        req.uri().path(),
        "/v1/peers/digest" | "/v1/workflows/validate"
    );
    match node.store_failure() {
        Some(e) if !reads => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "store_failed",
            format!(
                "the store failed ({e}): writes are refused until the data dir takes writes \
                 again and the node restarts on it (mergeflow start does so by itself); reads go on"
            ),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// A read's error; while the store has failed, a store error is 503
/// `store_failed`: sled may refuse a read that needs it to rewrite a page.
fn read_error(node: &Node, e: crate::doc::DocError) -> ApiError {
    match (node.store_failure(), &e) {
        (Some(why), crate::doc::DocError::Store(_)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_failed",
            format!(
                "the store failed ({why}) and refused this read; most reads of single docs \
                 still work, and all do once the node restarts with room on its disk"
            ),
        ),
        _ => e.into(),
    }
}

async fn healthz(State(node): State<Node>) -> Response {
    if let Some(e) = node.store_failure() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_failed",
            format!(
                "the store failed ({e}); it refuses writes until the node restarts on its data dir (reads go on)"
            ),
        )
        .into_response();
    }
    if node.docs().writer_alive() {
        Json(serde_json::json!({"ok": true})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "writer_stopped",
            "the writer thread has stopped; writes fail until the node restarts",
        )
        .into_response()
    }
}

async fn status(
    State(node): State<Node>,
    Extension(access): Extension<Access>,
) -> Json<crate::Status> {
    let mut status = node.status().await;
    if let Access::Scoped(_) = access {
        // The config names the other tokens and their scopes.
        status.config = None;
    }
    Json(status)
}

async fn metrics(State(node): State<Node>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics().await,
    )
}

async fn peers(State(node): State<Node>) -> Json<Vec<crate::net::PeerInfo>> {
    Json(node.peers())
}

/// Body of `POST /v1/peers/digest`'s response.
#[derive(Debug, Serialize, Deserialize)]
pub struct DigestAsked {
    /// Connected peers sent our digest.
    pub peers: usize,
}

/// `POST /v1/peers/digest`: sends this node's digest to every connected
/// peer now instead of at the next anti-entropy round; each that agrees
/// answers with its own, so `last_in_sync_at` moves within a round trip.
async fn ask_digests(State(node): State<Node>) -> ApiResult<Json<DigestAsked>> {
    let peers = node.peers().iter().filter(|p| p.connected).count();
    if peers > 0 && !node.sync_input(crate::sync::Input::DigestNow) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the sync queue is full; try again shortly",
        ));
    }
    Ok(Json(DigestAsked { peers }))
}

/// Runs a store (sled) call on the blocking pool, off the async executor;
/// its error becomes the API's.
async fn off_executor<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(Into::into)
}

async fn no_route(uri: axum::http::Uri) -> ApiError {
    let message = match encoded_doc_path(uri.path()) {
        Some(path) => format!(
            "no such endpoint; a doc id holding '/' is percent-encoded in the URL \
             ('/' as %2F): did you mean {path}?"
        ),
        None => "no such endpoint; see README for the API".to_string(),
    };
    ApiError::new(StatusCode::NOT_FOUND, "no_route", message)
}

/// Sub-resources of a doc: `/v1/docs/{id}/<one of these>`.
const DOC_SUFFIXES: [&str; 6] = ["ops", "heads", "sync", "history", "save", "merge"];

/// For a path under `/v1/docs/` that no route took because the doc id's
/// `/` was not encoded (`/v1/docs/a/b`, `/v1/docs/a/b/ops`), the path with
/// it encoded (`/v1/docs/a%2Fb`, `/v1/docs/a%2Fb/ops`).
fn encoded_doc_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/docs/")?;
    let (id, suffix) = match rest.rsplit_once('/') {
        Some((id, last)) if DOC_SUFFIXES.contains(&last) && id.contains('/') => {
            (id, format!("/{last}"))
        }
        _ => (rest, String::new()),
    };
    let id = id.trim_end_matches('/');
    if !id.contains('/') || id.starts_with('/') {
        return None;
    }
    Some(format!("/v1/docs/{}{suffix}", id.replace('/', "%2F")))
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

/// Query of the write endpoints: wait for replicas.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    /// Answer only once this many peers confirmed they stored the write.
    pub replicas: Option<usize>,
    /// How long to wait for them (default 5,000 ms, at most 600,000); after
    /// it the answer is 504 with how many confirmed (the write stays).
    pub timeout_ms: Option<u64>,
}

impl WriteQuery {
    /// The write waits for replicas, so its change asks peers to confirm.
    fn acks(&self) -> bool {
        self.replicas.is_some_and(|n| n > 0)
    }
}

/// Most replicas a write can ask for.
const MAX_REPLICAS: usize = 64;

fn write_query(q: Result<Query<WriteQuery>, QueryRejection>) -> ApiResult<WriteQuery> {
    let Query(q) = q.map_err(|r| WrappedRejection(r, None))?;
    if q.replicas.is_some_and(|n| n > MAX_REPLICAS) || q.timeout_ms.is_some_and(|t| t > 600_000) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("replicas must be at most {MAX_REPLICAS} and timeout_ms at most 600000"),
        ));
    }
    Ok(q)
}

/// Sends a durable write's result, after waiting for replicas if asked:
/// `replicas` (the peers that confirmed) is added to the body; a timeout is
/// 504 `replicas_timeout` with the same fields.
async fn answer_write(
    node: &Node,
    q: &WriteQuery,
    status: StatusCode,
    result: crate::runtime::WriteResult,
) -> ApiResult<Response> {
    let Some(want) = q.replicas.filter(|n| *n > 0) else {
        return Ok((status, Json(result)).into_response());
    };
    let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(5_000));
    let waited = node
        .docs()
        .wait_replicas(&result.id, &result.heads, want, timeout)
        .await;
    let mut body = serde_json::to_value(&result)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    match waited {
        Ok(peers) => {
            body["replicas"] = serde_json::json!(peers);
            Ok((status, Json(body)).into_response())
        }
        Err(peers) => {
            body["replicas"] = serde_json::json!(peers);
            body["error"] = serde_json::json!({
                "code": "replicas_timeout",
                "message": format!(
                    "the write is durable here, but {} of {want} replicas confirmed within {} ms",
                    peers.len(),
                    timeout.as_millis()
                ),
            });
            Ok((StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response())
        }
    }
}

async fn create(
    State(node): State<Node>,
    Extension(access): Extension<Access>,
    q: Result<Query<WriteQuery>, QueryRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let q = write_query(q)?;
    let req: CreateRequest = parse(&body(b)?)?;
    let id = match req.id {
        Some(id) => DocId::new(id)?,
        None => DocId::generate(),
    };
    crate::doc::user_writable(&id)?;
    if !access.can_write(id.as_str()) {
        return Err(auth::forbidden(format!(
            "token {:?} may not write doc {:?}: name an id its write globs cover",
            access.name().unwrap_or_default(),
            id.as_str()
        )));
    }
    let by = access.name().map(str::to_string);
    let result = node.docs().create_by(id, req.value, q.acks(), by).await?;
    answer_write(&node, &q, StatusCode::CREATED, result).await
}

/// Query of `GET /v1/docs`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only ids that start with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Only ids after this one: the last id of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Page size, 1 to [`MAX_LIST_LIMIT`]; [`DEFAULT_LIST_LIMIT`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Include the node's system docs (`_mergeflow/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<bool>,
}

/// Docs in a page of `GET /v1/docs` when the request names no `limit`.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// Most docs in a page of `GET /v1/docs`.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// `GET /v1/docs`: one page of live docs in id order, a JSON array. When
/// more follow, a `Link: <...&after=LAST>; rel="next"` header names the
/// next page.
async fn list(
    State(node): State<Node>,
    Extension(access): Extension<Access>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|r| WrappedRejection(r, None))?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("limit must be 1 to {MAX_LIST_LIMIT}, got {limit}"),
        ));
    }
    let query = crate::runtime::ListQuery {
        prefix: q.prefix.clone().unwrap_or_default(),
        after: q.after.clone(),
        limit,
        system: q.system.unwrap_or(false),
    };
    let mut page = node
        .docs()
        .list_page(query)
        .await
        .map_err(|e| read_error(&node, e))?;
    let next = match (page.more, page.docs.last()) {
        (true, Some(last)) => Some(ListParams {
            after: Some(last.id.clone()),
            limit: Some(limit),
            ..q
        }),
        _ => None,
    };
    // A scoped token sees the docs it may read: a page may hold fewer than
    // `limit` (even none) and still have a next one.
    page.docs.retain(|d| access.can_read(&d.id));
    let mut resp = Json(page.docs).into_response();
    if let Some(next) = next {
        link_next(&mut resp, "/v1/docs", &next);
    }
    Ok(resp)
}

async fn read(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<GetQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    let Query(q) = q.map_err(|r| WrappedRejection(r, None))?;
    let ptr = q.path.as_deref().map(Pointer::parse).transpose()?;
    let value = node
        .docs()
        .get(id, ptr)
        .await
        .map_err(|e| read_error(&node, e))?;
    Ok(Json(value).into_response())
}

async fn patch(
    State(node): State<Node>,
    Extension(access): Extension<Access>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    q: Result<Query<WriteQuery>, QueryRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    let q = write_query(q)?;
    let patch: Json_ = parse(&body(b)?)?;
    let result = write(&node, &access, &headers, id, Change::Patch(patch), q.acks()).await?;
    answer_write(&node, &q, StatusCode::OK, result).await
}

/// A write, applied at most once per doc and `Idempotency-Key` header
/// value when the request has one.
async fn write(
    node: &Node,
    access: &Access,
    headers: &HeaderMap,
    id: DocId,
    change: Change,
    acks: bool,
) -> ApiResult<crate::runtime::WriteResult> {
    crate::doc::user_writable(&id)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_header",
                        "Idempotency-Key: printable ASCII only",
                    )
                })?
                .to_string(),
        ),
    };
    if let Some(k) = &key {
        crate::doc::stamp::check_idempotency_key(k).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_header",
                format!("Idempotency-Key: {e}"),
            )
        })?;
    }
    let opts = crate::runtime::WriteOpts {
        ack: acks,
        idem: key,
        by: access.name().map(str::to_string),
        coalesce: false,
    };
    Ok(node.docs().write_opts(id, change, opts).await?)
}

async fn ops(
    State(node): State<Node>,
    Extension(access): Extension<Access>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    q: Result<Query<WriteQuery>, QueryRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    let q = write_query(q)?;
    let ops: Vec<Op> = parse(&body(b)?)?;
    let result = write(&node, &access, &headers, id, Change::Ops(ops), q.acks()).await?;
    answer_write(&node, &q, StatusCode::OK, result).await
}

/// Body of `GET /v1/docs/{id}/sync`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SyncReport {
    /// The doc.
    pub id: String,
    /// Our heads.
    pub heads: Vec<String>,
    /// Connected peers, and any others that confirmed a version of the doc.
    pub peers: Vec<PeerDocSync>,
}

/// One peer's known state of one doc.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerDocSync {
    /// The peer.
    pub peer_id: String,
    /// Connected now.
    pub connected: bool,
    /// Heads it last confirmed it stores (none if it has not confirmed any
    /// since it connected).
    pub heads: Vec<String>,
    /// Unix ms of that confirmation.
    pub confirmed_at: Option<u64>,
    /// It confirmed it stores our current heads.
    pub holds_our_heads: bool,
}

async fn doc_sync(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    let heads = node.docs().heads(id.clone()).await?;
    let held = node.docs().held(&id);
    let ours: Vec<::automerge::ChangeHash> = heads.iter().filter_map(|h| h.parse().ok()).collect();
    let mut peers: Vec<PeerDocSync> = node
        .peers()
        .into_iter()
        .filter(|p| p.connected || held.contains_key(&p.peer_id))
        .map(|p| {
            let h = held.get(&p.peer_id);
            let theirs: Vec<String> = h
                .map(|h| h.heads.iter().map(|x| x.to_string()).collect())
                .unwrap_or_default();
            PeerDocSync {
                holds_our_heads: h.is_some_and(|h| h.includes(&ours)),
                connected: p.connected,
                confirmed_at: h.map(|h| h.at_ms),
                heads: theirs,
                peer_id: p.peer_id,
            }
        })
        .collect();
    peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    Ok(Json(SyncReport {
        id: id.to_string(),
        heads,
        peers,
    })
    .into_response())
}

async fn heads(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    let heads = node.docs().heads(id.clone()).await?;
    Ok(Json(serde_json::json!({"id": id, "heads": heads})).into_response())
}

async fn history(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    Ok(Json(node.docs().history(id).await?).into_response())
}

async fn delete(
    State(node): State<Node>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = doc_id(path)?;
    crate::doc::user_writable(&id)?;
    let r = node.docs().delete(id).await?;
    Ok(Json(DeleteResponse {
        id: r.id.to_string(),
        heads: r.heads,
        deleted: true,
    })
    .into_response())
}
