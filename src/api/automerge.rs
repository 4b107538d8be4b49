//! automerge-repo clients on the API: `GET /v1/automerge` (the WebSocket,
//! served by [`crate::amrepo::server::Hub`]), `POST /v1/tickets` (short-lived
//! tickets for browsers, which cannot set headers on a WebSocket) and
//! `GET /v1/docs/{id}/url` (a doc's automerge URL).
//!
//! With a token configured, the upgrade needs `?token=<token>` or
//! `?ticket=<ticket>` (each ticket works once, within
//! `automerge.ticket_ttl_ms`, with the rights of the token that got it);
//! anything else gets 401 before the upgrade. A scoped token's connection
//! gets `doc-unavailable` for the docs it may not read, and is closed with
//! `error` when it sends changes to a doc it may not write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::PathRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{ApiResult, doc_id};
use crate::Node;
use crate::access::{Access, Tokens};
use crate::amrepo::server::Hub;

/// Most tickets outstanding at once.
const MAX_TICKETS: usize = 10_000;

/// What the routes share.
#[derive(Clone)]
pub(super) struct AmState {
    node: Node,
    hub: Arc<Hub>,
    tickets: Arc<Tickets>,
    tokens: Arc<Tokens>,
}

/// The routes, with their own state.
pub(super) fn routes(node: &Node, tokens: Arc<Tokens>) -> Router<Node> {
    let cfg = node.config().automerge.clone();
    let hub = Arc::new(Hub::new(
        node.docs().clone(),
        cfg.clone(),
        node.peer_id().to_string(),
        node.shutdown_token(),
    ));
    let state = AmState {
        node: node.clone(),
        hub,
        tickets: Arc::new(Tickets::new(Duration::from_millis(cfg.ticket_ttl_ms))),
        tokens,
    };
    Router::new()
        .route("/v1/automerge", get(upgrade))
        .route("/v1/tickets", post(ticket))
        .route("/v1/docs/{id}/url", get(url))
        .with_state(state)
}

/// The upgrade's query: how a browser authenticates.
#[derive(Debug, Default, Deserialize)]
struct AuthQuery {
    token: Option<String>,
    ticket: Option<String>,
}

async fn upgrade(
    State(s): State<AmState>,
    query: Result<Query<AuthQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let cfg = &s.node.config().automerge;
    if !cfg.enabled {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "automerge-repo clients are not served here (automerge.enabled = false)",
        )
        .into_response();
    }
    let Query(q) = query.unwrap_or_default();
    let access = match s.authorize(&q) {
        Ok(access) => access,
        Err(e) => return e.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => {
            return ApiError::new(
                r.status(),
                "websocket_required",
                format!(
                    "this endpoint is a WebSocket for automerge-repo clients \
                     (new BrowserWebSocketClientAdapter(\"ws://<host>/v1/automerge\")): {r}"
                ),
            )
            .into_response();
        }
    };
    if s.hub.connections() >= cfg.max_connections as u64 {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!(
                "this node serves {} automerge clients, the most automerge.max_connections allows; retry later",
                cfg.max_connections
            ),
        )
        .into_response();
    }
    let hub = s.hub.clone();
    ws.max_message_size(cfg.max_message_bytes)
        .max_frame_size(cfg.max_message_bytes)
        .on_upgrade(move |socket| hub.serve(socket, access))
}

impl AmState {
    /// With a token configured: a token or a valid ticket in the query;
    /// what the connection may do.
    fn authorize(&self, q: &AuthQuery) -> Result<Access, ApiError> {
        if !self.tokens.required() {
            return Ok(Access::Admin);
        }
        if let Some(access) = q.token.as_deref().and_then(|t| self.tokens.identify(t)) {
            return Ok(access);
        }
        if let Some(ticket) = &q.ticket {
            if let Some(access) = self.tickets.redeem(ticket) {
                return Ok(access);
            }
            return Err(unauthorized(
                "this ticket is unknown, used or expired: get a new one with POST /v1/tickets",
            ));
        }
        if q.token.is_some() {
            return Err(unauthorized("wrong API token"));
        }
        Err(unauthorized(
            "this endpoint needs ?token=<token> or ?ticket=<a ticket from POST /v1/tickets>",
        ))
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// `POST /v1/tickets`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct TicketResponse {
    /// The ticket: `?ticket=<it>` on the WebSocket URL, once.
    pub ticket: String,
    /// Unix ms after which it is refused.
    pub expires_at: u64,
}

async fn ticket(
    State(s): State<AmState>,
    Extension(access): Extension<Access>,
) -> ApiResult<Json<TicketResponse>> {
    let (ticket, ttl) = s.tickets.issue(access).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_tickets",
            format!("{MAX_TICKETS} tickets are outstanding; use or let some expire first"),
        )
    })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let expires_at = u64::try_from((now + ttl).as_millis()).unwrap_or(u64::MAX);
    Ok(Json(TicketResponse { ticket, expires_at }))
}

/// `GET /v1/docs/{id}/url`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct UrlResponse {
    /// `automerge:<document id>`: the same on every node.
    pub url: String,
}

async fn url(path: Result<Path<String>, PathRejection>) -> ApiResult<Json<UrlResponse>> {
    let id = doc_id(path)?;
    crate::doc::user_writable(&id)?;
    Ok(Json(UrlResponse {
        url: crate::amrepo::url::url_of(id.as_str()),
    }))
}

/// Outstanding tickets: when each expires, and the rights of the token
/// that asked for it.
struct Tickets {
    ttl: Duration,
    open: Mutex<HashMap<String, (Instant, Access)>>,
}

impl Tickets {
    fn new(ttl: Duration) -> Tickets {
        Tickets {
            ttl,
            open: Mutex::default(),
        }
    }

    /// A new ticket and how long it lasts; `None` when too many are out.
    fn issue(&self, access: Access) -> Option<(String, Duration)> {
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, (expires, _)| *expires > now);
        if open.len() >= MAX_TICKETS {
            return None;
        }
        let bytes: [u8; 24] = rand::random();
        let ticket: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        open.insert(ticket.clone(), (now + self.ttl, access));
        Some((ticket, self.ttl))
    }

    /// Takes a ticket: its rights, if it was outstanding and unexpired.
    fn redeem(&self, ticket: &str) -> Option<Access> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(ticket)
            .filter(|(expires, _)| *expires > Instant::now())
            .map(|(_, access)| access)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_works_once_and_not_after_it_expires() {
        let t = Tickets::new(Duration::from_secs(60));
        let (a, _) = t.issue(Access::Admin).unwrap();
        assert!(t.redeem(&a).is_some());
        assert!(t.redeem(&a).is_none(), "a ticket works once");
        assert!(t.redeem("made-up").is_none());
        let short = Tickets::new(Duration::ZERO);
        let (b, _) = short.issue(Access::Admin).unwrap();
        assert!(short.redeem(&b).is_none(), "expired");
    }
}
