//! Scoped API tokens (`[[api.tokens]]`): on every route, in the feed, in
//! listings and on the automerge-repo endpoint, a token reaches the docs
//! its globs cover and nothing else; a refused request changes nothing.

mod common;

use automerge::AutoCommit;
use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use futures_util::StreamExt;
use mergeflow::testing::amrepo::url::id_of;
use mergeflow::testing::amrepo::wire::WireMessage;
use serde_json::{Value, json};

use common::ws::*;

const ADMIN: &str = "admin-token-0123456789";
const KITCHEN: &str = "kitchen-token-0123456789";
const READER: &str = "reader-token-0123456789";

async fn node(dir: &std::path::Path) -> mergeflow::Node {
    let node = common::api_node(dir, |c| {
        c.api.token = ADMIN.into();
        c.api.tokens = vec![
            mergeflow::config::ApiToken {
                name: "kitchen-app".into(),
                token: KITCHEN.into(),
                read: vec!["homes/42/**".into(), "config/*".into()],
                write: vec!["homes/42/**".into()],
                ..Default::default()
            },
            mergeflow::config::ApiToken {
                name: "reader".into(),
                token_sha256: mergeflow::access::token_sha256(READER),
                read: vec!["**".into()],
                ..Default::default()
            },
        ];
    })
    .await;
    for (id, v) in [
        ("homes/42/kitchen", json!({"lights": "off"})),
        ("homes/7/kitchen", json!({"lights": "on"})),
        ("config/app", json!({"theme": "dark"})),
    ] {
        node.doc(id).unwrap().patch(v).await.unwrap();
    }
    node
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(node: &mergeflow::Node) -> Api {
        Api {
            base: format!("http://{}", node.api_addr().unwrap()),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// Routes every token may use (their answers are trimmed to its scope).
fn open(method: &str, path: &str) -> bool {
    method == "GET" && ["/v1/status", "/v1/status/history", "/v1/docs"].contains(&path)
}

/// Every doc's id and heads, as the admin lists them.
async fn state(api: &Api) -> Value {
    let (s, docs) = api.call(ADMIN, "GET", "/v1/docs?system=true", None).await;
    assert_eq!(s, 200);
    docs
}

/// Every route the API has, with a body where it takes one: (method, path, body).
fn every_route() -> Vec<(&'static str, &'static str, Option<Value>)> {
    let patch = Some(json!({"x": 1}));
    vec![
        ("GET", "/v1/status", None),
        ("GET", "/v1/status/history", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/peers", None),
        ("POST", "/v1/peers/digest", None),
        ("GET", "/v1/docs", None),
        (
            "POST",
            "/v1/docs",
            Some(json!({"id": "homes/7/new", "value": {"x": 1}})),
        ),
        ("POST", "/v1/docs", Some(json!({"value": {"x": 1}}))),
        ("GET", "/v1/docs/homes%2F7%2Fkitchen", None),
        ("PATCH", "/v1/docs/homes%2F7%2Fkitchen", patch.clone()),
        ("DELETE", "/v1/docs/homes%2F7%2Fkitchen", None),
        (
            "POST",
            "/v1/docs/homes%2F7%2Fkitchen/ops",
            Some(json!([{"op": "set", "path": "/x", "value": 1}])),
        ),
        ("GET", "/v1/docs/homes%2F7%2Fkitchen/heads", None),
        ("GET", "/v1/docs/homes%2F7%2Fkitchen/sync", None),
        ("GET", "/v1/docs/homes%2F7%2Fkitchen/history", None),
        ("GET", "/v1/docs/homes%2F7%2Fkitchen/url", None),
        ("GET", "/v1/docs/homes%2F7%2Fkitchen/save", None),
        ("POST", "/v1/docs/homes%2F7%2Fkitchen/merge", None),
        ("PATCH", "/v1/docs/config%2Fapp", patch.clone()),
        ("GET", "/v1/docs/_mergeflow%2Fnodes%2Fx", None),
        ("GET", "/v1/workflows", None),
        ("POST", "/v1/workflows", Some(json!("name = \"w\"\n"))),
        (
            "POST",
            "/v1/workflows/validate",
            Some(json!("name = \"w\"\n")),
        ),
        ("GET", "/v1/workflows/w", None),
        ("DELETE", "/v1/workflows/w", None),
        ("POST", "/v1/workflows/w/enable", None),
        ("POST", "/v1/workflows/w/disable", None),
        ("GET", "/v1/runs", None),
        ("GET", "/v1/runs/1", None),
        ("POST", "/v1/runs/1/retry", None),
        ("POST", "/v1/runs/1/skip", None),
        ("GET", "/v1/backup", None),
        ("POST", "/v1/restore", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_token_reaches_only_its_docs_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let api = Api::new(&node);
    let before = state(&api).await;

    // The kitchen app: none of these routes is its to use but the open ones.
    for (method, path, body) in every_route() {
        if open(method, path) {
            continue;
        }
        let (status, answer) = api.call(KITCHEN, method, path, body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], "forbidden", "{method} {path}");
    }
    // Except these, whose answers it may see, trimmed to its scope.
    let (s, status) = api.call(KITCHEN, "GET", "/v1/status", None).await;
    assert_eq!(s, 200);
    assert!(status["config"].is_null(), "the config names other tokens");
    let (s, listed) = api.call(KITCHEN, "GET", "/v1/docs", None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["config/app", "homes/42/kitchen"]);
    // A refusal names the doc.
    let (_, refused) = api
        .call(KITCHEN, "GET", "/v1/docs/homes%2F7%2Fkitchen", None)
        .await;
    let msg = refused["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("homes/7/kitchen") && msg.contains("kitchen-app"),
        "{msg}"
    );
    // Nothing changed on the node.
    assert_eq!(
        state(&api).await,
        before,
        "a refused request changed the node"
    );

    // Inside its scope it reads and writes, and its changes carry its name.
    let (s, _) = api
        .call(
            KITCHEN,
            "PATCH",
            "/v1/docs/homes%2F42%2Fkitchen",
            Some(json!({"lights": "dim"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .call(
            KITCHEN,
            "POST",
            "/v1/docs",
            Some(json!({"id": "homes/42/hall", "value": {"n": 1}})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = api
        .call(KITCHEN, "GET", "/v1/docs/homes%2F42%2Fkitchen", None)
        .await;
    assert_eq!((s, &v["lights"]), (200, &json!("dim")));
    let (s, history) = api
        .call(
            KITCHEN,
            "GET",
            "/v1/docs/homes%2F42%2Fkitchen/history",
            None,
        )
        .await;
    assert_eq!(s, 200);
    let by: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| &h["by"])
        .collect();
    assert_eq!(by, [&Value::Null, &json!("kitchen-app")], "{history}");
    let (s, _) = api
        .call(KITCHEN, "GET", "/v1/docs/config%2Fapp", None)
        .await;
    assert_eq!(s, 200, "config/* is readable");

    // The reader reads everything and writes nothing.
    let before = state(&api).await;
    for (method, path, body) in every_route() {
        let (status, answer) = api.call(READER, method, path, body).await;
        let reads_a_doc =
            method == "GET" && path.starts_with("/v1/docs/") && !path.contains("_mergeflow");
        let open =
            method == "GET" && ["/v1/status", "/v1/status/history", "/v1/docs"].contains(&path);
        if reads_a_doc || open {
            assert_eq!(status, 200, "{method} {path}: {answer}");
        } else {
            assert_eq!(status, 403, "{method} {path}: {answer}");
        }
    }
    assert_eq!(state(&api).await, before, "the reader changed the node");

    // The admin token still does everything; a wrong token is 401.
    let (s, _) = api.call(ADMIN, "GET", "/v1/workflows", None).await;
    assert_eq!(s, 200);
    let (s, _) = api
        .call("not-a-token-0123456789", "GET", "/v1/docs", None)
        .await;
    assert_eq!(s, 401);
    node.shutdown().await.unwrap();
}

/// Reads `n` change events' doc ids from an SSE response.
async fn feed_docs(resp: reqwest::Response, n: usize) -> Vec<String> {
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    let mut docs = Vec::new();
    while docs.len() < n {
        let chunk = tokio::time::timeout(DEADLINE, bytes.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                let e: Value = serde_json::from_str(data).unwrap();
                if let Some(doc) = e["doc"].as_str() {
                    docs.push(doc.to_string());
                }
            }
        }
    }
    docs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_carries_only_readable_docs() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let api = Api::new(&node);
    let resp = api
        .http
        .get(format!("{}/v1/events", api.base))
        .bearer_auth(KITCHEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Writes to docs it may not read, then one it may: only the last shows.
    for id in ["homes/7/kitchen", "secrets/x", "homes/42/kitchen"] {
        node.doc(id).unwrap().patch(json!({"t": 1})).await.unwrap();
    }
    assert_eq!(feed_docs(resp, 1).await, ["homes/42/kitchen"]);
    node.shutdown().await.unwrap();
}

/// A client with a copy of the node's `name`, after one sync round.
async fn fetched(ws: &mut Ws, me: &str, node_id: &str, name: &str) -> (AutoCommit, sync::State) {
    let mut doc = AutoCommit::new();
    let state = sync_until_quiet(ws, me, node_id, name, &mut doc).await;
    (doc, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_automerge_endpoint_honours_token_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let api = Api::new(&node);
    let ws_url = format!("ws://{}/v1/automerge", node.api_addr().unwrap());

    // The kitchen app, by ticket: its docs sync, others are unavailable.
    let (s, t) = api.call(KITCHEN, "POST", "/v1/tickets", None).await;
    assert_eq!(s, 200);
    let url = format!("{ws_url}?ticket={}", t["ticket"].as_str().unwrap());
    let (mut ws, node_id) = joined_at(&url, "kitchen").await;
    let (mut doc, _) = fetched(&mut ws, "kitchen", &node_id, "homes/42/kitchen").await;
    assert!(!doc.get_heads().is_empty(), "its doc synced");
    send(
        &mut ws,
        &WireMessage::Sync {
            request: true,
            sender_id: "kitchen".into(),
            target_id: node_id.clone(),
            document_id: id_of("homes/7/kitchen"),
            data: empty_sync(),
        },
    )
    .await;
    match next(&mut ws).await {
        Some(WireMessage::DocUnavailable { document_id, .. }) => {
            assert_eq!(document_id, id_of("homes/7/kitchen"))
        }
        other => panic!("expected doc-unavailable, got {other:?}"),
    }

    // The reader, by token: it reads, and its first change closes it.
    let url = format!("{ws_url}?token={READER}");
    let (mut ws, node_id) = joined_at(&url, "reader").await;
    let (mut doc, mut state) = fetched(&mut ws, "reader", &node_id, "homes/42/kitchen").await;
    assert!(!doc.get_heads().is_empty());
    let before = node.doc("homes/42/kitchen").unwrap().heads().await.unwrap();
    doc.put(automerge::ROOT, "lights", "hacked").unwrap();
    let msg = doc.sync().generate_sync_message(&mut state).unwrap();
    send(
        &mut ws,
        &WireMessage::Sync {
            request: false,
            sender_id: "reader".into(),
            target_id: node_id,
            document_id: id_of("homes/42/kitchen"),
            data: msg.encode(),
        },
    )
    .await;
    let (error, code) = closed_with(&mut ws).await;
    assert_eq!(code, Some(1008));
    let error = error.expect("an error message");
    assert!(
        error.contains("reader") && error.contains("not write"),
        "{error}"
    );
    assert_eq!(
        node.doc("homes/42/kitchen").unwrap().heads().await.unwrap(),
        before
    );

    // A wrong token never gets to upgrade.
    let refused =
        tokio_tungstenite::connect_async(format!("{ws_url}?token=wrong-token-0123456789")).await;
    assert!(refused.is_err());
    node.shutdown().await.unwrap();
}
