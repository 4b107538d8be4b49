//! Faults the chaos campaign found, as regression tests on in-process nodes
//! (a full disk, by fault injection). The campaign itself
//! (workload, receiver and checker on an in-process cluster) is
//! `tools/mergeflow-tools/tests/campaign.rs`.

mod common;

use std::time::Duration;

/// Found by `scripts/chaos.sh` (seed 1, disk-full fault): a local change
/// went to peers before the store had it; when storing failed the doc was
/// reloaded without it, and the next write reused its actor and sequence
/// number, so every peer rejected the new change as a duplicate sequence
/// and banned the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_disk_refused_is_not_sent_and_the_next_one_reaches_peers() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_node(&dir.path().join("a"), vec![], |_| {}).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr], |_| {}).await;
    let read = |n: &mergeflow::Node| {
        let doc = n.doc("x").unwrap();
        async move { doc.get().await.ok() }
    };
    let until = |n: mergeflow::Node, key: &'static str| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if read(&n).await.is_some_and(|v| v.get(key).is_some()) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{key} never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    let x = a.doc("x").unwrap();
    x.patch(serde_json::json!({"k1": 1})).await.unwrap();
    until(b.clone(), "k1").await;
    a.docs().fail_store(true);
    let err = x.patch(serde_json::json!({"k2": 2})).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    a.docs().fail_store(false);
    x.patch(serde_json::json!({"k3": 3})).await.unwrap();
    until(b.clone(), "k3").await;
    let (va, vb) = (read(&a).await.unwrap(), read(&b).await.unwrap());
    assert_eq!(va, vb);
    assert_eq!(
        va,
        serde_json::json!({"k1": 1, "k3": 3}),
        "k2 was never stored"
    );
    assert_eq!(a.peers().len(), 1, "b still talks to a");
    for n in [a, b] {
        n.shutdown().await.unwrap();
    }
}

/// Found by `scripts/chaos.sh` (seed 2, disk-full fault): a node whose
/// store failed counted its peers' changes as bad input and banned every
/// peer. Its own failure is not the peers' fault: they stay connected with
/// no strikes, and sync brings the changes once the store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_store_fails_does_not_blame_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let fast = |c: &mut mergeflow::config::Config| c.net.anti_entropy_ms = 300;
    let a = common::p2p_node(&dir.path().join("a"), vec![], fast).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr], fast).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.peers().iter().all(|p| !p.connected) {
        assert!(std::time::Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.docs().fail_store(true);
    for i in 0..30 {
        let doc = a.doc(&format!("y{}", i % 3)).unwrap();
        doc.patch(serde_json::json!({ format!("k{i}"): i }))
            .await
            .unwrap();
    }
    let a_id = a.peer_id().to_string();
    // b refuses what it cannot store; give it time to (wrongly) strike a.
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.docs().fail_store(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut keys = 0;
        for d in ["y0", "y1", "y2"] {
            if let Ok(v) = b.doc(d).unwrap().get().await {
                keys += v.as_object().map_or(0, |o| o.len());
            }
        }
        if keys == 30 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b has {keys} of 30 keys"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = b.peers().into_iter().find(|p| p.peer_id == a_id).unwrap();
    assert_eq!(seen.rejected, 0, "a was charged for b's failure");
    assert!(seen.connected, "b dropped a");
    for n in [a, b] {
        n.shutdown().await.unwrap();
    }
}

/// After sled's first I/O error (a full disk) it refuses writes until
/// reopened: the node says so in `/healthz`, `/v1/status` and
/// `Node::store_failure`, keeps serving reads, answers writes with 507
/// `store_failed`, and a restart on the same data dir (what `mergeflow
/// start` does by itself once the dir takes writes) brings back every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_is_reported_and_a_restart_recovers_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::api_node(dir.path(), |_| {}).await;
    let api = format!("http://{}", node.api_addr().unwrap());
    let doc = node.doc("kept").unwrap();
    doc.patch(serde_json::json!({"a": 1})).await.unwrap();
    assert_eq!(node.store_failure(), None);

    node.docs().fail_store(true);
    doc.patch(serde_json::json!({"b": 2})).await.unwrap_err();
    let why = node.store_failure().expect("the failure is reported");
    assert!(why.contains("injected failure"), "{why}");
    let health = reqwest::get(format!("{api}/healthz")).await.unwrap();
    assert_eq!(health.status(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_failed", "{body}");
    assert!(node.status().await.store_error.is_some());
    // Reads go on; every write is refused with 507 at once.
    let http = reqwest::Client::new();
    let read = http
        .get(format!("{api}/v1/docs/kept"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(
        read.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"a": 1})
    );
    let listed = http.get(format!("{api}/v1/docs")).send().await.unwrap();
    assert_eq!(listed.status(), 200);
    for req in [
        http.patch(format!("{api}/v1/docs/kept"))
            .json(&serde_json::json!({"c": 1})),
        http.post(format!("{api}/v1/docs"))
            .json(&serde_json::json!({"value": {}})),
        http.delete(format!("{api}/v1/docs/kept")),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 507);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "store_failed", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("reads go on")
        );
    }

    // What `mergeflow start` does: stop (the final flush fails, so the
    // data dir is not sealed), drop, and start again on the same dir.
    assert!(node.shutdown().await.is_err());
    drop((doc, node));
    let node = common::api_node(dir.path(), |_| {}).await;
    assert_eq!(node.store_failure(), None);
    let doc = node.doc("kept").unwrap();
    assert_eq!(doc.get().await.unwrap()["a"], 1);
    doc.patch(serde_json::json!({"c": 3})).await.unwrap();
    node.shutdown().await.unwrap();
}
