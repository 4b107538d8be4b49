//! The web dashboard page, and the page `/` shows when it is off.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::node::Node;

/// The web dashboard: one page, embedded in the binary, that reads this
/// node's API. Its content security policy lets it load nothing and connect
/// nowhere else.
pub(super) async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// The dashboard's content security policy: the page loads nothing and
/// connects nowhere but this node.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; form-action 'none'; \
     frame-ancestors 'none'";

/// `/` with the dashboard off: 404 with a short page that says so and how
/// to turn it on, rather than a bare `no_route` (a person reads this one).
pub(super) async fn dashboard_off(State(node): State<Node>) -> Response {
    let (why, how) = if node.config().node.light {
        (
            "The dashboard is off in light mode (<code>node.light = true</code> or \
             <code>--light</code>).",
            "To turn it on, set <code>dashboard = true</code> under <code>[api]</code> in the \
             config file (or <code>MERGEFLOW_API_DASHBOARD=true</code>) and restart the node: \
             keys you set win over light mode's defaults.",
        )
    } else {
        (
            "The dashboard is off (<code>api.dashboard = false</code>).",
            "To turn it on, set <code>dashboard = true</code> under <code>[api]</code> in the \
             config file (or <code>MERGEFLOW_API_DASHBOARD=true</code>) and restart the node.",
        )
    };
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>mergeflow: dashboard off</title></head>\n<body>\n<h1>mergeflow</h1>\n\
         <p>{why}</p>\n<p>{how}</p>\n<p>The HTTP API under <code>/v1</code> works as \
         usual (<code>mergeflow status</code>).</p>\n</body></html>\n"
    );
    (
        StatusCode::NOT_FOUND,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        page,
    )
        .into_response()
}
