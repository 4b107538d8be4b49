//! Browser safety: what stops a web page the user visits from using this
//! node's API through the user's browser.
//!
//! Three checks, before the token check and any handler:
//!
//! - **Host** (DNS rebinding): a page at `evil.example` whose name is made to
//!   resolve to 127.0.0.1 reaches a loopback API as "same origin", but its
//!   requests still say `Host: evil.example`. On a loopback listener only
//!   loopback names (`localhost`, `127.x.x.x`, `[::1]`, any port) and the
//!   names in `api.allow_hosts` are served; others get 403
//!   `host_not_allowed`. On other listeners `Host` is checked only when
//!   `api.allow_hosts` is set (the API there needs `api.token`, which a page
//!   does not have).
//! - **Origin** (cross-site requests): browsers send `Origin` on every
//!   cross-origin request and every non-GET one. A request with an `Origin`
//!   that is neither this API's own (its host and port equal the request's
//!   `Host`: the dashboard) nor listed in `api.allow_origins` gets 403
//!   `origin_not_allowed`. Requests without `Origin` (curl, the CLI, the
//!   library's client) are not browsers' cross-site requests and pass. Listed
//!   origins get CORS headers and answered preflights (`OPTIONS`).
//! - **Content type** (the rest of CSRF): a request with a body must say what
//!   it is: JSON (`application/json`, any `application/*+json`) for documents,
//!   `application/toml` for workflow definitions, `application/octet-stream`
//!   for restore and merge. None of these is a type a page may send without a
//!   CORS preflight, so a page cannot post a `text/plain` form "simple
//!   request" at us. Others get 415 `unsupported_media_type`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::body::HttpBody;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::config::ApiConfig;
use crate::origin::{normalise_origin, parse_allowed_host, split_host};

/// Methods a preflight may ask for.
const CORS_METHODS: &str = "GET, POST, PATCH, DELETE";
/// Request headers a preflight may ask for.
const CORS_HEADERS: &str = "authorization, content-type, idempotency-key, last-event-id";
/// How long a browser may cache a preflight's answer, in seconds.
const CORS_MAX_AGE: &str = "600";

/// The browser-safety settings, parsed once from `[api]`.
#[derive(Debug)]
pub(super) struct Guard {
    /// Check `Host` at all.
    check_host: bool,
    /// `api.allow_hosts`, lowercase: (name, port if given).
    hosts: Vec<(String, Option<u16>)>,
    /// `api.allow_origins` had `*`.
    any_origin: bool,
    /// `api.allow_origins`, normalised (see [`normalise_origin`]).
    origins: Vec<String>,
    /// When a refused origin was last logged (a page that retries, such as
    /// a WebSocket client, would otherwise fill the log).
    logged_refusal: std::sync::Mutex<Option<std::time::Instant>>,
}

/// At most one log line per this long about refused origins.
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Guard {
    /// From a validated config (entries that do not parse are skipped; the
    /// config's validation refused them already).
    pub(super) fn new(api: &ApiConfig) -> Arc<Guard> {
        let hosts: Vec<_> = api
            .allow_hosts
            .iter()
            .filter_map(|h| parse_allowed_host(h).ok())
            .collect();
        Arc::new(Guard {
            check_host: api.listen.ip().to_canonical().is_loopback() || !hosts.is_empty(),
            hosts,
            any_origin: api.allow_origins.iter().any(|o| o == "*"),
            origins: api
                .allow_origins
                .iter()
                .filter_map(|o| normalise_origin(o).ok())
                .collect(),
            logged_refusal: std::sync::Mutex::new(None),
        })
    }

    /// Logs a refused origin, at most once per [`REFUSAL_LOG_EVERY`]: the
    /// browser shows the page's developer only "403", not the body that
    /// names the key.
    fn log_refusal(&self, origin: &str, path: &str) {
        let mut last = self
            .logged_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        tracing::warn!(
            origin,
            path,
            "refused a request from a web page at another origin (403); list the origin in \
             api.allow_origins to let its pages use this node (logged at most once a minute)"
        );
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        is_loopback_name(&name)
            || self
                .hosts
                .iter()
                .any(|(n, p)| *n == name && (p.is_none() || *p == port))
    }

    fn origin_listed(&self, origin: &str) -> bool {
        self.any_origin || normalise_origin(origin).is_ok_and(|o| self.origins.contains(&o))
    }
}

/// The `Host` a request names: the header, or (HTTP/2) the URI's authority.
fn request_host(req: &Request) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(v) => Some(v.to_str().unwrap_or("\u{fffd}")),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// The middleware: Host, then Origin (answering preflights), then CORS
/// headers on the answer. See the module doc.
pub(super) async fn browser_guard(
    State(guard): State<Arc<Guard>>,
    req: Request,
    next: Next,
) -> Response {
    let host = request_host(&req).map(str::to_string);
    // A request without a Host at all (HTTP/1.0) does not come from a
    // browser, which always sends one.
    if guard.check_host
        && let Some(h) = &host
        && !guard.host_allowed(h)
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "Host {h:?} is not a name of this node: its API listens on loopback, which \
                 only loopback names (localhost, 127.0.0.1, [::1]) reach, and a web page that \
                 makes another name point here is a DNS rebinding attack; add the name to \
                 api.allow_hosts if you meant it"
            ),
        )
        .into_response();
    }
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return next.run(req).await;
    };
    let origin = origin.to_str().unwrap_or("\u{fffd}").to_string();
    if host.as_deref().is_some_and(|h| same_origin(&origin, h)) {
        return next.run(req).await;
    }
    if !guard.origin_listed(&origin) {
        guard.log_refusal(&origin, req.uri().path());
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!(
                "requests from web pages at other origins are refused (Origin: {origin:?}); \
                 list the origin in api.allow_origins to let its pages use this API"
            ),
        )
        .into_response();
    }
    let allow_origin = HeaderValue::from_str(&origin).ok();
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(CORS_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(CORS_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(CORS_MAX_AGE),
        );
        resp
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    if let Some(o) = allow_origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
    }
    h.append(header::VARY, HeaderValue::from_static("origin"));
    resp
}

/// What a request body must be, by endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Toml,
    Binary,
}

impl BodyKind {
    /// The kind `path` takes.
    fn of(path: &str) -> BodyKind {
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["", "v1", "workflows"]
            | ["", "v1", "workflows", "validate"]
            | ["", "v1", "access"] => BodyKind::Toml,
            ["", "v1", "restore"] | ["", "v1", "docs", _, "merge"] => BodyKind::Binary,
            _ => BodyKind::Json,
        }
    }

    fn accepts(self, essence: &str) -> bool {
        match self {
            BodyKind::Json => {
                essence == "application/json"
                    || essence
                        .strip_prefix("application/")
                        .is_some_and(|s| s.len() > "+json".len() && s.ends_with("+json"))
            }
            BodyKind::Toml => essence == "application/toml",
            BodyKind::Binary => essence == "application/octet-stream",
        }
    }

    fn wanted(self) -> &'static str {
        match self {
            BodyKind::Json => {
                "JSON: send Content-Type: application/json (or an application/*+json type such \
                 as application/merge-patch+json)"
            }
            BodyKind::Toml => {
                "a workflow definition or access file in TOML: send Content-Type: application/toml"
            }
            BodyKind::Binary => "bytes: send Content-Type: application/octet-stream",
        }
    }
}

/// The media type of a `Content-Type` value, lowercase, without parameters.
fn essence(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?;
    let v = v.to_str().unwrap_or("\u{fffd}");
    Some(
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// The middleware: a request with a body must name its type (see the module
/// doc); a request without one needs none.
pub(super) async fn require_body_type(req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let kind = BodyKind::of(req.uri().path());
    let got = essence(req.headers());
    if got.as_deref().is_some_and(|e| kind.accepts(e)) {
        return next.run(req).await;
    }
    let got = match got {
        None => "none".to_string(),
        Some(e) => format!("{e:?}"),
    };
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "{} {} takes {}; the request's content type was {got}",
            req.method(),
            req.uri().path(),
            kind.wanted()
        ),
    )
    .into_response()
}

/// `localhost`, an IPv4 address in 127.0.0.0/8, or `[::1]`.
fn is_loopback_name(name: &str) -> bool {
    if name == "localhost" {
        return true;
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6
            .parse::<Ipv6Addr>()
            .is_ok_and(|a| a.to_canonical().is_loopback());
    }
    name.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// The origin is this API's own: the page was loaded from the host and port
/// the request is sent to (scheme aside: a TLS proxy may sit in front).
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    match (split_host(rest), split_host(host)) {
        (Some((on, op)), Some((hn, hp))) => {
            on == hn && op.unwrap_or(default) == hp.unwrap_or(default)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names() {
        for ok in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]"] {
            assert!(is_loopback_name(ok), "{ok}");
        }
        for no in [
            "localhost.evil",
            "evil.localhost",
            "128.0.0.1",
            "::1",
            "[::2]",
            "",
        ] {
            assert!(!is_loopback_name(no), "{no}");
        }
    }

    #[test]
    fn same_origin_compares_the_host() {
        assert!(same_origin("http://127.0.0.1:7700", "127.0.0.1:7700"));
        assert!(same_origin("https://node.example", "node.example:443"));
        assert!(!same_origin("http://127.0.0.1:7701", "127.0.0.1:7700"));
        assert!(!same_origin("null", "127.0.0.1:7700"));
        assert!(!same_origin("http://evil.example", "127.0.0.1"));
    }

    #[test]
    fn body_kinds_by_path() {
        assert_eq!(BodyKind::of("/v1/workflows"), BodyKind::Toml);
        assert_eq!(BodyKind::of("/v1/workflows/validate"), BodyKind::Toml);
        assert_eq!(BodyKind::of("/v1/access"), BodyKind::Toml);
        assert_eq!(BodyKind::of("/v1/workflows/x/enable"), BodyKind::Json);
        assert_eq!(BodyKind::of("/v1/restore"), BodyKind::Binary);
        assert_eq!(BodyKind::of("/v1/docs/a%2Fb/merge"), BodyKind::Binary);
        assert_eq!(BodyKind::of("/v1/docs/merge"), BodyKind::Json);
        assert_eq!(BodyKind::of("/v1/docs"), BodyKind::Json);
        assert!(BodyKind::Json.accepts("application/merge-patch+json"));
        assert!(!BodyKind::Json.accepts("application/+json"));
        assert!(!BodyKind::Json.accepts("text/plain"));
    }
}
