//! `workflow.http_allow`: an applied definition (which syncs from any
//! admitted peer) posts only where the node's operator allows. Before it,
//! one peer could apply an `http` step aimed at an internal port and every
//! node that owned the effect posted its docs there.

mod common;

use std::sync::{Arc, Mutex};

use common::until;
use mergeflow::workflow::run::RunStatus;
use serde_json::{Value, json};

/// A loopback receiver; the peer ids of the nodes that posted to it.
async fn receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    use axum::routing::post;
    let posted: Arc<Mutex<Vec<String>>> = Arc::default();
    let p = posted.clone();
    let app = axum::Router::new().route(
        "/in",
        post(move |body: axum::Json<Value>| {
            let p = p.clone();
            async move {
                let node = body["run"]["node"].as_str().unwrap_or_default().to_string();
                p.lock().unwrap().push(node);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, posted)
}

fn leak(url: &str) -> String {
    format!(
        "name = \"leak\"\n[on]\ndoc = \"**\"\n[[steps]]\nid = \"post\"\nkind = \"http\"\nurl = \"{url}\"\nretry = {{ attempts = 1 }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_no_applied_http_step_aimed_where_it_does_not_allow() {
    let (port, posted) = receiver().await;
    let url = format!("http://127.0.0.1:{port}/in");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-workflows");
    // A allows loopback (its operator runs the receiver); B allows nothing.
    let a = common::p2p_node(&dir.path().join("a"), vec![], |c| {
        c.workflow.dir = empty.clone();
        c.workflow.http_allow = vec!["127.0.0.1".into()];
    })
    .await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr], |c| {
        c.workflow.dir = empty.clone();
    })
    .await;
    until("peers to connect", || async {
        (a.status().await.peers >= 1).then_some(())
    })
    .await;

    // B refuses to apply it at all, naming the setting.
    let err = b
        .workflows()
        .apply(&leak(&url))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("workflow.http_allow") && err.contains(&url),
        "{err}"
    );

    // Applied on A, it reaches B, which holds it invalid and never runs it.
    a.workflows().apply(&leak(&url)).await.unwrap();
    let state = until("B to hold the definition", || async {
        let w = b.workflows().get("leak").ok()?;
        Some(w)
    })
    .await;
    assert_eq!(state.state, "invalid", "{state:?}");
    let why = state.error.unwrap_or_default();
    assert!(why.contains("workflow.http_allow"), "{why}");
    assert!(
        b.workflows()
            .validate("x", &leak(&url))
            .unwrap()
            .warnings
            .iter()
            .any(|w| w.contains("workflow.http_allow")),
        "validate warns"
    );

    // Docs written on B (one holds a password): only A posts them.
    for i in 0..5 {
        b.doc(&format!("secrets/{i}"))
            .unwrap()
            .patch(json!({"password": "hunter2"}))
            .await
            .unwrap();
    }
    until("A to post the five docs", || async {
        let runs = a.workflows().runs(Some("leak"), None, 100).unwrap();
        let done = runs
            .iter()
            .filter(|r| r.doc.starts_with("secrets/") && r.status == RunStatus::Done)
            .count();
        (done >= 5).then_some(())
    })
    .await;
    let b_id = b.peer_id().to_string();
    let from_b = posted
        .lock()
        .unwrap()
        .iter()
        .filter(|n| **n == b_id)
        .count();
    assert_eq!(from_b, 0, "B posted to a destination it does not allow");
    assert!(
        b.workflows()
            .runs(Some("leak"), None, 100)
            .unwrap()
            .is_empty()
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A listed host name that resolves to loopback (DNS rebinding) reaches it
/// only when the loopback range is listed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_name_reaches_loopback_only_when_loopback_is_listed() {
    let (port, posted) = receiver().await;
    let url = format!("http://localhost:{port}/in");
    for (allow, delivers) in [
        (vec!["localhost"], false),
        (vec!["localhost", "127.0.0.0/8", "::1"], true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let node = common::api_node(dir.path(), |c| {
            c.workflow.dir = dir.path().join("no-workflows");
            c.workflow.http_allow = allow.iter().map(|s| s.to_string()).collect();
        })
        .await;
        node.workflows().apply(&leak(&url)).await.unwrap();
        until("the definition active", || async {
            (node.workflows().get("leak").ok()?.state == "active").then_some(())
        })
        .await;
        let before = posted.lock().unwrap().len();
        node.doc("d/1")
            .unwrap()
            .patch(json!({"n": 1}))
            .await
            .unwrap();
        let run = until("the run to finish", || async {
            let runs = node.workflows().runs(Some("leak"), None, 10).unwrap();
            let r = runs.into_iter().find(|r| r.doc == "d/1")?;
            matches!(r.status, RunStatus::Done | RunStatus::Dead).then_some(r)
        })
        .await;
        if delivers {
            assert_eq!(run.status, RunStatus::Done, "{allow:?}: {run:?}");
            assert_eq!(posted.lock().unwrap().len(), before + 1);
        } else {
            assert_eq!(run.status, RunStatus::Dead, "{allow:?}");
            let err = run.steps[0].error.clone().unwrap_or_default();
            assert!(err.contains("workflow.http_allow"), "{err}");
            assert_eq!(posted.lock().unwrap().len(), before, "it posted");
        }
        node.shutdown().await.unwrap();
    }
}
