//! Who a request is and what it may reach. [`require_token`] identifies
//! the token (`api.token` or a `[[api.tokens]]` entry); what a scoped
//! token may reach is decided from the request's method and path before
//! any handler runs ([`authorize`]), so that a route added later is
//! admin-only until it is listed here.
//!
//! A scoped token may:
//! - read (`GET`) and write (anything else) `/v1/docs/{id}` and its
//!   sub-routes for the docs its `read` and `write` globs cover;
//! - list docs (`GET /v1/docs`), follow `/v1/events`, get tickets and use
//!   `/v1/automerge`: the handlers show only what it may read;
//! - create docs (`POST /v1/docs`): the handler checks the id;
//! - see `/v1/status` (no config) and `/v1/status/history`.
//!
//! Everything else (workflows, runs, peers, backups, metrics) needs the
//! admin token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::access::{Access, Tokens};

/// With a token configured (`api.token`, `[[api.tokens]]`), refuses (401,
/// before anything else runs) every request but `/healthz` that does not
/// send `Authorization: Bearer <token>`; then refuses (403) what the
/// token's scope does not cover (see [`authorize`]). The request
/// carries its [`Access`] for the handlers.
pub(super) async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // The dashboard page holds no data; it asks for the token itself. The
    // automerge WebSocket checks its own (browsers cannot send headers).
    let open = matches!(req.uri().path(), "/healthz" | "/" | "/v1/automerge");
    let got = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let access = match tokens.identify(got) {
        Some(access) => access,
        None if open => Access::Admin,
        None => return unauthorized(got.is_empty()),
    };
    if !open && let Err(e) = authorize(&access, req.method(), req.uri().path()) {
        return e.into_response();
    }
    req.extensions_mut().insert(access);
    next.run(req).await
}

fn unauthorized(no_token: bool) -> Response {
    let message = if no_token {
        "this API needs a token: send Authorization: Bearer <token> (the CLI sends MERGEFLOW_API_TOKEN)"
    } else {
        "wrong API token"
    };
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// Ok if `access` may make this request as far as its path tells.
///
/// # Errors
/// 403 `forbidden` naming the doc, or the route.
pub(super) fn authorize(access: &Access, method: &Method, path: &str) -> Result<(), ApiError> {
    let Access::Scoped(token) = access else {
        return Ok(());
    };
    let reads = matches!(*method, Method::GET | Method::HEAD);
    match path {
        "/v1/status" | "/v1/status/history" if reads => return Ok(()),
        "/v1/docs" | "/v1/events" | "/v1/tickets" => return Ok(()),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/docs/") {
        let raw = rest.split('/').next().unwrap_or_default();
        let doc = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let (allowed, what) = if reads {
            (access.can_read(&doc), "read")
        } else {
            (access.can_write(&doc), "write")
        };
        if allowed {
            return Ok(());
        }
        let globs = if reads {
            token.read.patterns()
        } else {
            token.write.patterns()
        };
        return Err(forbidden(format!(
            "token {:?} may not {what} doc {doc:?} (its {what} globs: {globs:?})",
            token.name
        )));
    }
    Err(forbidden(format!(
        "token {:?} is scoped to documents; {method} {path} needs the admin token (api.token)",
        token.name
    )))
}

/// 403 `forbidden`.
pub(super) fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{DocScope, ScopedToken};
    use std::sync::Arc;

    #[test]
    fn a_scoped_token_reaches_its_docs_and_nothing_else() {
        let globs = |p: &[&str]| {
            DocScope::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let t = Access::Scoped(Arc::new(ScopedToken {
            name: "app".into(),
            read: globs(&["homes/42/**", "config/*"]),
            write: globs(&["homes/42/**"]),
        }));
        let ok = |m: Method, p: &str| authorize(&t, &m, p).is_ok();
        assert!(ok(Method::GET, "/v1/docs/homes%2F42%2Fkitchen"));
        assert!(ok(Method::GET, "/v1/docs/homes%2F42%2Fkitchen/history"));
        assert!(ok(Method::PATCH, "/v1/docs/homes%2F42%2Fkitchen"));
        assert!(ok(Method::POST, "/v1/docs/homes%2F42%2Fkitchen/ops"));
        assert!(ok(Method::GET, "/v1/docs/config%2Fapp"));
        assert!(!ok(Method::PATCH, "/v1/docs/config%2Fapp"));
        assert!(!ok(Method::DELETE, "/v1/docs/config%2Fapp"));
        assert!(!ok(Method::GET, "/v1/docs/homes%2F7%2Fkitchen"));
        assert!(!ok(Method::GET, "/v1/docs/_mergeflow%2Fworkflows%2Fx"));
        for (m, p) in [
            (Method::GET, "/v1/workflows"),
            (Method::POST, "/v1/workflows"),
            (Method::GET, "/v1/peers"),
            (Method::GET, "/v1/backup"),
            (Method::POST, "/v1/restore"),
            (Method::GET, "/metrics"),
            (Method::POST, "/v1/runs/1/retry"),
            (Method::POST, "/v1/status"),
        ] {
            let e = authorize(&t, &m, p).unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN, "{m} {p}");
        }
        for p in ["/v1/docs", "/v1/events", "/v1/status"] {
            assert!(ok(Method::GET, p), "{p}");
        }
        assert!(authorize(&Access::Admin, &Method::POST, "/v1/workflows").is_ok());
        let e = authorize(&t, &Method::PATCH, "/v1/docs/config%2Fapp").unwrap_err();
        assert!(e.message.contains("config/app"), "{}", e.message);
    }
}
