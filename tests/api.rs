//! The HTTP API end to end on an in-process node: every endpoint, every error
//! shape, and that rejected requests change nothing.

mod common;

use mergeflow::client::{Client, ClientError};
use mergeflow::{Node, config::Config};
use serde_json::{Value, json};

async fn node(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut Config),
) -> (Node, Client, reqwest::Client) {
    let node = common::api_node(dir, tweak).await;
    let client = Client::new(&node.api_addr().unwrap().to_string());
    (node, client, reqwest::Client::new())
}

/// Sends a raw request and returns (status, JSON body).
async fn raw(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[tokio::test]
async fn document_lifecycle_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c, _) = node(dir.path(), |_| {}).await;

    let created = c
        .create(
            Some("sensors/greenhouse-3"),
            json!({"celsius": 21.5, "tags": ["a"]}),
        )
        .await
        .unwrap();
    assert_eq!(created.id.as_str(), "sensors/greenhouse-3");
    assert_eq!(created.heads.len(), 1);
    let generated = c.create(None, json!({})).await.unwrap();
    assert_eq!(generated.id.as_str().len(), 26);

    assert_eq!(
        c.get("sensors/greenhouse-3", None).await.unwrap(),
        json!({"celsius": 21.5, "tags": ["a"]})
    );
    assert_eq!(
        c.get("sensors/greenhouse-3", Some("/tags/0"))
            .await
            .unwrap(),
        json!("a")
    );

    let patched = c
        .patch(
            "sensors/greenhouse-3",
            &json!({"celsius": 22, "tags": null, "meta": {"room": "b"}}),
        )
        .await
        .unwrap();
    assert!(patched.changed);
    assert_ne!(patched.heads, created.heads);
    let same = c
        .patch("sensors/greenhouse-3", &json!({"celsius": 22}))
        .await
        .unwrap();
    assert!(!same.changed, "an equal patch changes nothing");
    assert_eq!(same.heads, patched.heads);

    let ops: Vec<mergeflow::doc::Op> = serde_json::from_value(json!([
        {"op": "increment", "path": "/count", "by": 2},
        {"op": "set", "path": "/notes", "value": "hllo", "as": "text"},
        {"op": "splice", "path": "/notes", "pos": 1, "text": "e"},
        {"op": "set", "path": "/readings", "value": []},
        {"op": "insert", "path": "/readings/-", "value": 1},
        {"op": "delete", "path": "/meta/room"}
    ]))
    .unwrap();
    c.ops("sensors/greenhouse-3", &ops).await.unwrap();
    assert_eq!(
        c.get("sensors/greenhouse-3", None).await.unwrap(),
        json!({"celsius": 22, "count": 2, "notes": "hello", "readings": [1], "meta": {}})
    );

    let heads = c.heads("sensors/greenhouse-3").await.unwrap();
    let all = c.history("sensors/greenhouse-3").await.unwrap();
    // The writes, without the geneses of the containers they created.
    let history: Vec<_> = all.iter().filter(|h| !h.genesis).collect();
    assert_eq!(history.len(), 3, "{all:?}");
    assert!(
        all.len() > 3,
        "the counter and the meta object have geneses"
    );
    assert_eq!(history.last().unwrap().hash, heads[0]);
    assert!(history[1].deps.contains(&history[0].hash));
    assert_eq!(
        history[0].peer_id.as_deref(),
        Some(node.peer_id().to_string().as_str())
    );
    // The kind of write, then what every change says about itself (clock,
    // node priority): see doc::stamp.
    let message = history[0].message.as_deref().unwrap();
    assert!(message.starts_with("create hlc="), "{message}");

    let list = c.list().await.unwrap();
    assert_eq!(list.len(), 2);
    let entry = list
        .iter()
        .find(|d| d.id == "sensors/greenhouse-3")
        .unwrap();
    assert_eq!(entry.heads, heads);
    assert!(entry.size_bytes > 0 && entry.updated_at > 0);

    let status = c.status().await.unwrap();
    assert_eq!(status.docs, 2);
    assert_eq!(status.peer_id, node.peer_id().to_string());

    c.delete("sensors/greenhouse-3").await.unwrap();
    match c.get("sensors/greenhouse-3", None).await {
        Err(ClientError::Api {
            status: 410, code, ..
        }) => assert_eq!(code, "deleted"),
        other => panic!("expected 410, got {other:?}"),
    }
    match c.patch("sensors/greenhouse-3", &json!({"a": 1})).await {
        Err(ClientError::Api { status: 410, .. }) => {}
        other => panic!("a tombstone must not be written to: {other:?}"),
    }
    assert_eq!(c.list().await.unwrap().len(), 1);
    assert_eq!(c.status().await.unwrap().docs, 1);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn errors_are_json_with_fitting_status_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c, http) = node(dir.path(), |cfg| {
        cfg.api.max_body_bytes = 64 * 1024;
        cfg.doc.max_change_bytes = 16 * 1024;
    })
    .await;
    let base = format!("http://{}", node.api_addr().unwrap());
    let doc = format!("{base}/v1/docs/d%2F1");
    c.create(Some("d/1"), json!({"a": 1, "s": "x"}))
        .await
        .unwrap();
    let heads = c.heads("d/1").await.unwrap();

    let big = json!({"big": "x".repeat(20 * 1024)}).to_string();
    let huge = json!({"big": "x".repeat(100 * 1024)}).to_string();
    let json_ct = ("content-type", "application/json");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (http.patch(&doc).header(json_ct.0, json_ct.1).body("{\"a\":"), 400, "bad_json"),
        (http.patch(&doc).header(json_ct.0, json_ct.1).body("[1,2]"), 422, "bad_value"),
        (http.patch(&doc).header("content-type", "text/plain").body("{}"), 415, "unsupported_media_type"),
        (http.patch(&doc).header(json_ct.0, json_ct.1).body(big), 413, "change_too_large"),
        (http.patch(&doc).header(json_ct.0, json_ct.1).body(huge), 413, "body_too_large"),
        (http.post(format!("{doc}/ops")).header(json_ct.0, json_ct.1).body("{}"), 400, "bad_json"),
        (http.post(format!("{doc}/ops")).json(&json!([{"op": "set", "path": "/b", "value": 1}, {"op": "increment", "path": "/a"}])), 422, "type_mismatch"),
        (http.post(format!("{doc}/ops")).json(&json!([{"op": "delete", "path": "/nope"}])), 404, "path_not_found"),
        (http.post(format!("{doc}/ops")).json(&json!([{"op": "splice", "path": "/a", "pos": 0}])), 422, "type_mismatch"),
        (http.post(format!("{base}/v1/docs")).json(&json!({"id": "d/1", "value": {}})), 409, "already_exists"),
        (http.post(format!("{base}/v1/docs")).json(&json!({"id": "bad id", "value": {}})), 400, "invalid_doc_id"),
        (http.post(format!("{base}/v1/docs")).json(&json!({"value": [1]})), 422, "bad_value"),
        (http.post(format!("{base}/v1/docs")).json(&json!({"value": {}, "extra": 1})), 400, "bad_json"),
        (http.get(format!("{base}/v1/docs/missing")), 404, "not_found"),
        (http.get(format!("{doc}?path=/zz")), 404, "path_not_found"),
        (http.get(format!("{doc}?path=zz")), 400, "bad_path"),
        (http.get(format!("{base}/v1/docs/a%20b")), 400, "invalid_doc_id"),
        (http.delete(format!("{base}/v1/docs/missing")), 404, "not_found"),
        (http.get(format!("{base}/v1/nothing")), 404, "no_route"),
        (http.put(format!("{base}/v1/docs")), 405, "method_not_allowed"),
    ];
    for (i, (req, status, want)) in cases.into_iter().enumerate() {
        let (got, body) = raw(req).await;
        assert_eq!((got, code(&body)), (status, want), "case {i}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "case {i}"
        );
    }
    assert_eq!(
        c.heads("d/1").await.unwrap(),
        heads,
        "a rejected request changed the doc"
    );
    assert_eq!(c.get("d/1", None).await.unwrap(), json!({"a": 1, "s": "x"}));
    assert_eq!(c.list().await.unwrap().len(), 1);

    // merge-patch content type and a doc created by PATCH.
    let (s, _) = raw(http
        .patch(format!("{base}/v1/docs/new"))
        .header("content-type", "application/merge-patch+json")
        .body("{\"x\":1}"))
    .await;
    assert_eq!(s, 200);
    assert_eq!(c.get("new", None).await.unwrap(), json!({"x": 1}));
    let (s, body) = raw(http.get(format!("{base}/healthz"))).await;
    assert_eq!((s, body), (200, json!({"ok": true})));
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_with_writes_docs_and_workflow_runs() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(
        defs.join("f.toml"),
        "name = \"f\"\n[on]\ndoc = \"sensors/*\"\n[[steps]]\nid = \"d\"\nkind = \"derive\"\nset = { \"/f\" = \"doc.c * 2\" }\n",
    )
    .unwrap();
    let (node, client, http) = node(dir.path(), |c| c.workflow.dir = defs.clone()).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while node.workflows().list().is_empty() {
        assert!(std::time::Instant::now() < deadline, "workflow not loaded");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for i in 0..3 {
        client
            .patch(&format!("sensors/s{i}"), &json!({ "c": i }))
            .await
            .unwrap();
    }
    let url = format!("http://{}/metrics", node.api_addr().unwrap());
    let (content_type, text, m) = loop {
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        let text = resp.text().await.unwrap();
        let m = common::samples(&text);
        if m.get("mergeflow_workflow_runs_done_total") == Some(&3.0) {
            break (ct, text, m);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "runs not counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(text.contains("# TYPE mergeflow_write_duration_seconds histogram"));
    // The three written, and this node's workflow membership doc.
    assert_eq!(m["mergeflow_docs"], 4.0);
    assert_eq!(m["mergeflow_workflows"], 1.0);
    assert_eq!(m["mergeflow_workflow_dead_letters"], 0.0);
    assert_eq!(m["mergeflow_peers_connected"], 0.0);
    // Three writes by the client, three derived writes by the runs.
    assert!(m["mergeflow_write_duration_seconds_count"] >= 6.0, "{text}");
    assert_eq!(
        m["mergeflow_write_duration_seconds_bucket{le=\"+Inf\"}"],
        m["mergeflow_write_duration_seconds_count"]
    );
    assert_eq!(m["mergeflow_workflow_run_duration_seconds_count"], 3.0);
    assert!(m["mergeflow_flushes_total"] >= 1.0);
    assert!(m["mergeflow_store_size_bytes"] > 0.0);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_token_guards_every_endpoint_but_healthz_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = "test-token-0123456789";
    let (node, _, http) = node(dir.path(), |c| c.api.token = token.into()).await;
    let base = format!("http://{}", node.api_addr().unwrap());
    let (status, _) = raw(http.get(format!("{base}/healthz"))).await;
    assert_eq!(status, 200, "health checks need no token");
    // No header, a wrong token, the right token without the Bearer scheme.
    for auth in [None, Some("Bearer wrong-token-0123456789"), Some(token)] {
        let mut req = http
            .post(format!("{base}/v1/docs"))
            .json(&json!({"id": "a/b", "value": {"x": 1}}));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(code(&body), "unauthorized");
    }
    for path in [
        "/v1/status",
        "/metrics",
        "/v1/docs/a%2Fb",
        "/v1/workflows",
        "/v1/events",
        "/v1/backup",
        "/v1/docs/a%2Fb/save",
        "/nope",
    ] {
        let (status, _) = raw(http.get(format!("{base}{path}"))).await;
        assert_eq!(status, 401, "{path}");
    }
    for path in ["/v1/restore", "/v1/docs/a%2Fb/merge"] {
        let (status, _) = raw(http.post(format!("{base}{path}")).body(vec![1u8; 64])).await;
        assert_eq!(status, 401, "{path}");
    }
    // The refused create changed nothing; with the token, everything works.
    let client = Client::new(&base).with_token(Some(token));
    assert!(matches!(
        client.get("a/b", None).await,
        Err(ClientError::Api { status: 404, .. })
    ));
    client.create(Some("a/b"), json!({"x": 1})).await.unwrap();
    assert_eq!(client.get("a/b", None).await.unwrap(), json!({"x": 1}));
    node.shutdown().await.unwrap();
}

/// The dashboard page is served without the token (it holds no data and asks
/// for the token itself), loads nothing from elsewhere, and is off with
/// `api.dashboard = false`. scripts/dashboard-check.sh drives it in Chromium.
#[tokio::test]
async fn the_dashboard_is_one_embedded_page_that_loads_nothing_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (n, _, http) = node(dir.path(), |c| c.api.token = "test-token-0123456789".into()).await;
    let base = format!("http://{}", n.api_addr().unwrap());
    let resp = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let page = resp.text().await.unwrap();
    for needle in [
        "/v1/status",
        "/v1/peers",
        "/v1/docs",
        "/v1/runs",
        "/v1/events",
        "Retry",
        "Authorization",
    ] {
        assert!(page.contains(needle), "the page does not use {needle}");
    }
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("src=\""));
    // Its data still needs the token.
    let (status, _) = raw(http.get(format!("{base}/v1/status"))).await;
    assert_eq!(status, 401);
    n.shutdown().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (off, _, http) = node(dir.path(), |c| c.api.dashboard = false).await;
    // Off: a short page says so (tests/dashboard.rs checks what it says).
    let resp = http
        .get(format!("http://{}/", off.api_addr().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.text().await.unwrap().contains("dashboard is off"));
    off.shutdown().await.unwrap();
}

/// The attack of issue 18: a web page the user visits posts, through the
/// user's browser, at the default API (loopback, no token). Every way in is
/// closed: a foreign `Origin`, a body without a JSON/TOML type, and a `Host`
/// that is not loopback (DNS rebinding). What the CLI, curl and the
/// dashboard send still works.
#[tokio::test]
async fn a_web_page_cannot_use_the_default_api() {
    let dir = tempfile::tempdir().unwrap();
    // The example workflow applied below posts its alert to 127.0.0.1:9000.
    let (node, c, http) = node(dir.path(), |c| {
        c.workflow.http_allow = vec!["127.0.0.1:9000".into()]
    })
    .await;
    let addr = node.api_addr().unwrap();
    let base = format!("http://{addr}");
    let wf = include_str!("../examples/workflows/fahrenheit.toml");
    let evil = "http://evil.example";

    // A page's "simple" cross-origin POST: text/plain, foreign Origin.
    let (s, body) = raw(http
        .post(format!("{base}/v1/workflows"))
        .header("origin", evil)
        .header("content-type", "text/plain")
        .body(wf))
    .await;
    assert_eq!((s, code(&body)), (403, "origin_not_allowed"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api.allow_origins")
    );
    // Even with the right type, and on a body-less POST.
    for req in [
        http.post(format!("{base}/v1/docs"))
            .header("origin", evil)
            .json(&json!({"id": "x", "value": {}})),
        http.post(format!("{base}/v1/workflows/fahrenheit/disable"))
            .header("origin", evil),
        http.get(format!("{base}/v1/docs")).header("origin", "null"),
    ] {
        let (s, body) = raw(req).await;
        assert_eq!((s, code(&body)), (403, "origin_not_allowed"), "{body}");
    }
    // Without an Origin, a body still needs its type: 415 naming it.
    let cases = [
        (
            http.post(format!("{base}/v1/workflows"))
                .header("content-type", "text/plain")
                .body(wf),
            "application/toml",
        ),
        (
            http.post(format!("{base}/v1/workflows/validate")).body(wf),
            "application/toml",
        ),
        (
            http.post(format!("{base}/v1/workflows"))
                .header("content-type", "application/json")
                .body(wf),
            "application/toml",
        ),
        (
            http.post(format!("{base}/v1/docs"))
                .body(r#"{"id": "x", "value": {}}"#),
            "application/json",
        ),
        (
            http.post(format!("{base}/v1/docs"))
                .header("content-type", "text/plain")
                .body(r#"{"id": "x", "value": {}}"#),
            "application/json",
        ),
        (
            http.post(format!("{base}/v1/docs"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("id=x"),
            "application/json",
        ),
        (
            http.patch(format!("{base}/v1/docs/x")).body(r#"{"a": 1}"#),
            "application/json",
        ),
        (
            http.post(format!("{base}/v1/docs/x/ops"))
                .header("content-type", "multipart/form-data")
                .body("[]"),
            "application/json",
        ),
        (
            http.post(format!("{base}/v1/restore"))
                .header("content-type", "text/plain")
                .body(vec![1u8; 64]),
            "application/octet-stream",
        ),
        (
            http.post(format!("{base}/v1/docs/x/merge"))
                .body(vec![1u8; 64]),
            "application/octet-stream",
        ),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let (s, body) = raw(req).await;
        assert_eq!(
            (s, code(&body)),
            (415, "unsupported_media_type"),
            "case {i}: {body}"
        );
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "case {i}: {msg}");
    }
    // A name that is not loopback in Host: a rebound DNS name.
    for host in [
        "evil.example",
        "evil.example:7700",
        "localhost.evil.example",
        "10.0.0.1",
    ] {
        let (s, body) = raw(http.get(format!("{base}/v1/docs")).header("host", host)).await;
        assert_eq!(
            (s, code(&body)),
            (403, "host_not_allowed"),
            "{host}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("api.allow_hosts")
        );
    }
    // Nothing got in.
    assert!(c.list().await.unwrap().is_empty());
    assert!(c.workflows().await.unwrap().is_empty());

    // What honest clients send works: loopback names, the dashboard's own
    // origin, JSON with a charset, TOML, bytes, and requests without a body.
    let port = addr.port();
    for host in [
        format!("localhost:{port}"),
        "127.0.0.2".into(),
        format!("[::1]:{port}"),
        "LOCALHOST".into(),
    ] {
        let (s, body) = raw(http
            .get(format!("{base}/v1/docs"))
            .header("host", host.as_str()))
        .await;
        assert_eq!(s, 200, "{host}: {body}");
    }
    let (s, body) = raw(http
        .post(format!("{base}/v1/docs"))
        .header("origin", base.as_str())
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"id": "same-origin", "value": {"a": 1}}"#))
    .await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = raw(http
        .post(format!("{base}/v1/runs/1/retry"))
        .header("origin", format!("http://localhost:{port}"))
        .header("host", format!("localhost:{port}")))
    .await;
    assert_eq!((s, code(&body)), (404, "not_found"), "{body}");
    let (s, body) = raw(http
        .post(format!("{base}/v1/workflows/validate"))
        .header("content-type", "application/toml")
        .body(wf))
    .await;
    assert_eq!(s, 200, "{body}");
    c.apply_workflow(wf.to_string()).await.unwrap();
    let saved = c.save("same-origin").await.unwrap();
    c.merge("merged", saved).await.unwrap();
    assert_eq!(c.get("merged", None).await.unwrap(), json!({"a": 1}));
    c.set_workflow_enabled("fahrenheit", false).await.unwrap();
    c.delete("merged").await.unwrap();
    // A browser's same-origin GET carries no CORS headers.
    let resp = http
        .get(format!("{base}/v1/status"))
        .header("origin", base.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    node.shutdown().await.unwrap();
}

/// `api.allow_origins` lets a listed page in, with CORS headers and
/// answered preflights; `api.allow_hosts` adds names to loopback's.
#[tokio::test]
async fn listed_origins_get_cors_and_listed_hosts_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let app = "http://localhost:5173";
    let (node, _, http) = node(dir.path(), |c| {
        c.api.allow_origins = vec![app.into()];
        c.api.allow_hosts = vec!["mergeflow.test".into()];
    })
    .await;
    let base = format!("http://{}", node.api_addr().unwrap());
    let resp = http
        .request(reqwest::Method::OPTIONS, format!("{base}/v1/docs"))
        .header("origin", app)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], app);
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("POST") && methods.contains("PATCH"),
        "{methods}"
    );
    let headers = h["access-control-allow-headers"].to_str().unwrap();
    assert!(
        headers.contains("content-type") && headers.contains("authorization"),
        "{headers}"
    );
    let resp = http
        .post(format!("{base}/v1/docs"))
        .header("origin", app)
        .json(&json!({"id": "from-app", "value": {"x": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["access-control-allow-origin"], app);
    // Another port is another origin.
    let resp = http
        .request(reqwest::Method::OPTIONS, format!("{base}/v1/docs"))
        .header("origin", "http://localhost:5174")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    for (host, want) in [
        ("mergeflow.test", 200),
        ("MergeFlow.test:7700", 200),
        ("other.test", 403),
    ] {
        let (s, _) = raw(http.get(format!("{base}/healthz")).header("host", host)).await;
        assert_eq!(s, want, "{host}");
    }
    node.shutdown().await.unwrap();
}

/// Settings that would open the API to every page, or that name nothing,
/// stop the node with an error naming the key.
#[tokio::test]
async fn browser_settings_are_validated() {
    type Tweak = fn(&mut Config);
    let cases: Vec<(Tweak, &str)> = vec![
        (
            |c| c.api.allow_origins = vec!["*".into()],
            "api.allow_origins",
        ),
        (
            |c| c.api.allow_origins = vec!["localhost:5173".into()],
            "api.allow_origins",
        ),
        (
            |c| c.api.allow_origins = vec!["http://localhost:5173/".into()],
            "api.allow_origins",
        ),
        (
            |c| c.api.allow_hosts = vec!["http://nas.local".into()],
            "api.allow_hosts",
        ),
        (
            |c| c.api.allow_hosts = vec!["nas.local:port".into()],
            "api.allow_hosts",
        ),
    ];
    for (tweak, key) in cases {
        let mut c = Config::default();
        tweak(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
    let mut c = Config::default();
    c.api.allow_origins = vec!["*".into()];
    c.api.token = "0123456789abcdef".into();
    c.validate().unwrap();
}

/// A repeat of a write with its `Idempotency-Key` is answered without
/// applying it again; the same key with a different body is a client bug
/// and is refused (422 `idempotency_key_reused`) instead of silently
/// dropping the new write.
#[tokio::test]
async fn an_idempotency_key_reused_for_another_body_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c, http) = node(dir.path(), |_| {}).await;
    let base = format!("http://{}/v1/docs/orders%2F7", node.api_addr().unwrap());
    let ops = |key: &str, by: i64| {
        http.post(format!("{base}/ops"))
            .header("Idempotency-Key", key)
            .json(&json!([{ "op": "increment", "path": "/n", "by": by }]))
    };
    let (s, first) = raw(ops("k-1", 5)).await;
    assert_eq!((s, &first["changed"]), (200, &json!(true)), "{first}");
    let (s, again) = raw(ops("k-1", 5)).await;
    assert_eq!((s, &again["changed"]), (200, &json!(false)), "{again}");
    assert_eq!(again["heads"], first["heads"]);

    let (s, reused) = raw(ops("k-1", 6)).await;
    assert_eq!(
        (s, code(&reused)),
        (422, "idempotency_key_reused"),
        "{reused}"
    );
    let msg = reused["error"]["message"].as_str().unwrap();
    assert!(msg.contains("k-1") && msg.contains("orders/7"), "{msg}");
    // A patch under the same key is another request too.
    let (s, patched) = raw(http
        .patch(&base)
        .header("Idempotency-Key", "k-1")
        .json(&json!({"x": 1})))
    .await;
    assert_eq!((s, code(&patched)), (422, "idempotency_key_reused"));
    // Key order in a JSON body does not make it another request.
    let body = |text: &'static str| {
        http.patch(&base)
            .header("Idempotency-Key", "k-2")
            .header("content-type", "application/json")
            .body(text)
    };
    assert_eq!(raw(body(r#"{"a": 1, "b": 2}"#)).await.0, 200);
    let (s, same) = raw(body(r#"{"b":2,"a":1}"#)).await;
    assert_eq!((s, &same["changed"]), (200, &json!(false)), "{same}");

    assert_eq!(
        c.get("orders/7", None).await.unwrap(),
        json!({"n": 5, "a": 1, "b": 2}),
        "refused writes changed nothing"
    );
    node.shutdown().await.unwrap();
}

/// `GET /v1/docs` pages in id order with a cursor, filters by prefix, and
/// hides the node's system docs unless asked.
#[tokio::test]
async fn listing_pages_by_cursor_and_hides_system_docs() {
    let dir = tempfile::tempdir().unwrap();
    // The example workflow applied below posts its alert to 127.0.0.1:9000.
    let (node, c, http) = node(dir.path(), |c| {
        c.workflow.http_allow = vec!["127.0.0.1:9000".into()]
    })
    .await;
    let ids = ["a/1", "a/2", "a/3", "a/4", "a/5", "b/1", "c"];
    for id in ids {
        c.patch(id, &json!({"v": 1})).await.unwrap();
    }
    c.delete("a/3").await.unwrap();
    // A workflow stores its definition in a system doc.
    let def = include_str!("../examples/workflows/fahrenheit.toml");
    let (s, body) = raw(http
        .post(format!("http://{}/v1/workflows", node.api_addr().unwrap()))
        .header("content-type", "application/toml")
        .body(def))
    .await;
    assert!(s == 200 || s == 201, "{s} {body}");
    let base = format!("http://{}/v1/docs", node.api_addr().unwrap());
    let page = |q: &str| {
        let url = format!("{base}?{q}");
        let http = http.clone();
        async move {
            let resp = http.get(&url).send().await.unwrap();
            let status = resp.status().as_u16();
            let link = resp
                .headers()
                .get("link")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = resp.json().await.unwrap();
            let ids: Vec<String> = body
                .as_array()
                .map(|a| a.iter().map(|d| d["id"].as_str().unwrap().into()).collect())
                .unwrap_or_default();
            (status, ids, link)
        }
    };
    let (_, all, link) = page("").await;
    assert_eq!(
        all,
        ["a/1", "a/2", "a/4", "a/5", "b/1", "c"],
        "no system docs, no tombstones"
    );
    assert_eq!(link, None, "one page holds them all");

    let (_, first, link) = page("prefix=a/&limit=2").await;
    assert_eq!(first, ["a/1", "a/2"]);
    let link = link.expect("more follow");
    assert!(link.ends_with("rel=\"next\""), "{link}");
    assert!(
        link.contains("after=a%2F2") && link.contains("prefix=a%2F"),
        "{link}"
    );
    let next = link
        .trim_start_matches("</v1/docs?")
        .split('>')
        .next()
        .unwrap();
    let (_, second, link) = page(next).await;
    assert_eq!(second, ["a/4", "a/5"], "the deleted a/3 is skipped");
    assert_eq!(link, None, "nothing after a/5 under a/");

    let (_, sys, _) = page("system=true").await;
    assert!(sys.iter().any(|i| i.starts_with("_mergeflow/")), "{sys:?}");
    let (_, under, _) = page("prefix=_mergeflow/").await;
    assert!(!under.is_empty() && under.iter().all(|i| i.starts_with("_mergeflow/")));
    let (_, after_c, _) = page("after=b/1").await;
    assert_eq!(after_c, ["c"]);

    for bad in ["limit=0", "limit=10001", "limit=x", "colour=red"] {
        let (s, _, _) = page(bad).await;
        assert_eq!(s, 400, "{bad}");
    }
    // The client follows every page.
    let listed: Vec<_> = c.list().await.unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(listed, all);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unencoded_slash_in_a_doc_id_gets_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let (node, c, http) = node(dir.path(), |_| {}).await;
    let base = format!("http://{}", node.api_addr().unwrap());
    c.create(Some("sensors/gh-1"), json!({"celsius": 21}))
        .await
        .unwrap();
    let cases = [
        (
            http.get(format!("{base}/v1/docs/sensors/gh-1")),
            "/v1/docs/sensors%2Fgh-1",
        ),
        (
            http.get(format!("{base}/v1/docs/a/b/c/history")),
            "/v1/docs/a%2Fb%2Fc/history",
        ),
        (
            http.post(format!("{base}/v1/docs/sensors/gh-1/ops"))
                .header("content-type", "application/json")
                .body("[]"),
            "/v1/docs/sensors%2Fgh-1/ops",
        ),
        (
            http.patch(format!("{base}/v1/docs/sensors/gh-1"))
                .header("content-type", "application/json")
                .body("{}"),
            "/v1/docs/sensors%2Fgh-1",
        ),
    ];
    for (req, want) in cases {
        let (s, body) = raw(req).await;
        assert_eq!((s, code(&body)), (404, "no_route"), "{want}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("did you mean {want}?")), "{msg}");
    }
    // The hinted path works.
    let (s, body) = raw(http.get(format!("{base}/v1/docs/sensors%2Fgh-1"))).await;
    assert_eq!((s, body), (200, json!({"celsius": 21})));
    // Elsewhere, no hint.
    let (s, body) = raw(http.get(format!("{base}/v1/nothing/here"))).await;
    assert_eq!((s, code(&body)), (404, "no_route"));
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean"),
        "{body}"
    );
    node.shutdown().await.unwrap();
}

/// Issue 18 items 15 and 17 over HTTP: a write to a system doc is refused
/// with a message that says what the doc is (a membership doc is not about
/// workflows); `validate` warns that `apply` refuses `exec`; `DELETE` of
/// an unknown workflow is 404 and of a file-defined one 409.
#[tokio::test]
async fn system_docs_and_workflow_definitions_answer_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("defs");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(
        defs.join("local.toml"),
        "name = \"local\"\n[on]\ndoc = \"x/*\"\n[[steps]]\nid = \"d\"\nkind = \"derive\"\nset = { \"/y\" = \"1\" }\n",
    )
    .unwrap();
    let (node, _c, http) = node(dir.path(), |c| c.workflow.dir = defs.clone()).await;
    let base = format!("http://{}", node.api_addr().unwrap());
    let patch = |doc: &str| {
        http.patch(format!("{base}/v1/docs/{}", doc.replace('/', "%2F")))
            .header("content-type", "application/json")
            .body("{\"a\": 1}")
    };
    let (s, body) = raw(patch("_mergeflow/nodes/12D3KooWx")).await;
    assert_eq!((s, code(&body)), (403, "reserved_doc"), "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("membership") && !msg.contains("workflow"),
        "{msg}"
    );
    let (s, body) = raw(patch("_mergeflow/workflows/w")).await;
    assert_eq!((s, code(&body)), (403, "reserved_doc"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/workflows"),
        "{body}"
    );

    // Valid as a file, refused by apply: validate says so.
    let exec = "name = \"cmd\"\n[on]\ndoc = \"d/*\"\n[[steps]]\nid = \"s\"\nkind = \"exec\"\ncommand = [\"true\"]\n";
    let toml = |req: reqwest::RequestBuilder| req.header("content-type", "application/toml");
    let (s, body) = raw(toml(http.post(format!("{base}/v1/workflows/validate"))).body(exec)).await;
    assert_eq!(s, 200, "{body}");
    let warnings = body["warnings"].to_string();
    assert!(warnings.contains("workflow.allow_applied_exec"), "{body}");
    let (s, body) = raw(toml(http.post(format!("{base}/v1/workflows"))).body(exec)).await;
    assert_eq!((s, code(&body)), (400, "invalid_workflow"), "{body}");

    let (s, body) = raw(http.delete(format!("{base}/v1/workflows/nope"))).await;
    assert_eq!((s, code(&body)), (404, "not_found"), "{body}");
    while node.workflows().get("local").is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (s, body) = raw(http.delete(format!("{base}/v1/workflows/local"))).await;
    assert_eq!((s, code(&body)), (409, "defined_by_file"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("local.toml"),
        "{body}"
    );
    node.shutdown().await.unwrap();
}
