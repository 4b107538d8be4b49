//! Write acknowledgement from replicas (`?replicas=N&timeout_ms=T`) and the
//! per-doc sync report (`GET /v1/docs/{id}/sync`), over real libp2p on loopback.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_replicas_and_time_out_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_api_node(&dir.path().join("a"), vec![], |_| {}).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr.clone()], |_| {}).await;
    let c = common::p2p_node(&dir.path().join("c"), vec![a_addr], |_| {}).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.status().await.peers < 2 {
        assert!(Instant::now() < deadline, "peers did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let api = format!("http://{}", a.api_addr().unwrap());
    let http = reqwest::Client::new();

    // Two replicas: both peers store the write before the answer.
    let r = http
        .patch(format!(
            "{api}/v1/docs/orders%2F1?replicas=2&timeout_ms=30000"
        ))
        .json(&json!({"total": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let mut replicas: Vec<String> = serde_json::from_value(body["replicas"].clone()).unwrap();
    replicas.sort();
    let mut want = vec![b.peer_id().to_string(), c.peer_id().to_string()];
    want.sort();
    assert_eq!(replicas, want);
    // Confirmed means stored: both already read the write.
    for n in [&b, &c] {
        let v = n.doc("orders/1").unwrap().get().await.unwrap();
        assert_eq!(v, json!({"total": 10}));
    }

    // Three replicas cannot happen with two peers: 504 after the timeout,
    // saying how many confirmed; the write itself stays.
    let r = http
        .post(format!(
            "{api}/v1/docs/orders%2F1/ops?replicas=3&timeout_ms=300"
        ))
        .json(&json!([{"op": "set", "path": "/total", "value": 11}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "replicas_timeout");
    assert_eq!(body["replicas"].as_array().unwrap().len(), 2);
    assert_eq!(
        a.doc("orders/1").unwrap().get().await.unwrap(),
        json!({"total": 11})
    );

    // The sync report names the peers known to hold our heads.
    let report: Value = http
        .get(format!("{api}/v1/docs/orders%2F1/sync"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let peers = report["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{report}");
    assert!(
        peers
            .iter()
            .all(|p| p["connected"] == true && p["holds_our_heads"] == true),
        "{report}"
    );

    // Bad queries are refused before anything is written.
    let r = http
        .patch(format!("{api}/v1/docs/orders%2F2?replicas=lots"))
        .json(&json!({"x": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(a.doc("orders/2").unwrap().get().await.is_err());
    for n in [c, b, a] {
        n.shutdown().await.unwrap();
    }
}
