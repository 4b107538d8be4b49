//! The campaign's raw HTTP client (the workload sends its writes itself, to
//! tell a refused connection from a timeout), set up as `mergeflow::client`
//! sets up its own.

use std::time::Duration;

/// A reqwest client for a node's API: `Authorization: Bearer <token>` when a
/// token is given, no proxy (the nodes are local or on the cluster's own
/// network).
///
/// # Panics
/// If `token` holds characters a header cannot (control characters).
pub(crate) fn http_client(
    token: Option<&str>,
    connect_timeout: Duration,
    timeout: Duration,
) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .expect("an API token is printable text");
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .default_headers(headers)
        .build()
        .expect("reqwest client builds")
}

/// The innermost cause of an error, which names what went wrong.
pub(crate) fn root_cause(e: &dyn std::error::Error) -> String {
    let mut reason = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        reason = s.to_string();
        src = s.source();
    }
    reason
}
