//! What a user does first, raced and nested as an adversary would: three
//! nodes over real libp2p on loopback create the same counter, object and
//! list at once and every acknowledged write is kept; a write nested past
//! `doc.max_depth` is refused locally, and a peer's change nested past it is
//! refused by the receiver, which stays healthy.

use std::time::{Duration, Instant};

mod common;

use common::{listen_addr, p2p_node};
use mergeflow::Node;
use mergeflow::doc::Op;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(300);

fn ops(v: Value) -> Vec<Op> {
    serde_json::from_value(v).unwrap()
}

/// Polls until `doc` reads the same on every node and `done` holds for it.
async fn converge(nodes: &[&Node], doc: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut views = Vec::new();
        for n in nodes {
            views.push(n.doc(doc).unwrap().get().await.ok());
        }
        if let Some(Some(v)) = views.first()
            && views.iter().all(|w| w.as_ref() == Some(v))
            && done(v)
        {
            return v.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{doc} did not converge: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Three connected nodes, each writing its first writes to containers none
/// of them has yet: 20 increments of an absent counter each, 20 merge
/// patches into an absent object, 20 appends to an absent list (`/list/-`),
/// 20 `set`s below an absent parent. All 60 of each are there on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_racing_first_writes_keep_every_acknowledged_write() {
    const EACH: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let a = p2p_node(&dir.path().join("a"), vec![], |_| {}).await;
    let a_addr = listen_addr(&a).await;
    let b = p2p_node(&dir.path().join("b"), vec![a_addr.clone()], |_| {}).await;
    let c = p2p_node(&dir.path().join("c"), vec![a_addr], |_| {}).await;
    let deadline = Instant::now() + DEADLINE;
    while a.status().await.peers < 2 {
        assert!(Instant::now() < deadline, "peers did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tasks = Vec::new();
    for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let doc = node.doc("race/first").unwrap();
            for i in 0..EACH {
                let key = format!("{name}{i}");
                doc.ops(ops(json!([{"op": "increment", "path": "/count"}])))
                    .await
                    .unwrap();
                doc.patch(json!({"obj": {&key: i}})).await.unwrap();
                doc.ops(ops(
                    json!([{"op": "set", "path": "/list/-", "value": &key}]),
                ))
                .await
                .unwrap();
                doc.ops(ops(json!([
                    {"op": "set", "path": format!("/deep/er/{key}"), "value": i}
                ])))
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = 3 * EACH;
    let v = converge(&[&a, &b, &c], "race/first", |v| {
        v["count"] == json!(total)
            && v["obj"].as_object().map(|o| o.len()) == Some(total)
            && v["list"].as_array().map(Vec::len) == Some(total)
            && v["deep"]["er"].as_object().map(|o| o.len()) == Some(total)
    })
    .await;
    let mut items: Vec<&str> = v["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    items.sort_unstable();
    items.dedup();
    assert_eq!(items.len(), total, "no list item lost or doubled: {v}");
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn writes_nested_past_the_cap_are_refused_and_the_doc_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder().data_dir(dir.path()).start().await.unwrap();
    let doc = node.doc("deep/x").unwrap();
    // The tester's write: 400 segments, missing parents created.
    let path: String = "/a".repeat(400);
    let err = doc
        .ops(ops(json!([{"op": "set", "path": path, "value": 1}])))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("doc.max_depth") && err.contains("64"), "{err}");
    // At the cap: 64 containers above the value is fine, 65 is not.
    let ok: String = "/a".repeat(65);
    doc.ops(ops(json!([{"op": "set", "path": ok, "value": 1}])))
        .await
        .unwrap();
    let over: String = "/b".repeat(66);
    assert!(
        doc.ops(ops(json!([{"op": "set", "path": over, "value": 1}])))
            .await
            .is_err()
    );
    // A value that nests too: 60 above plus 5 of its own.
    let value = json!({"x": {"x": {"x": {"x": {"x": 1}}}}});
    let path60: String = "/c".repeat(61);
    assert!(
        doc.ops(ops(json!([{"op": "set", "path": path60, "value": value}])))
            .await
            .is_err()
    );
    // A merge patch 70 deep.
    let mut patch = json!(1);
    for _ in 0..70 {
        patch = json!({ "p": patch });
    }
    let err = doc.patch(patch).await.unwrap_err().to_string();
    assert!(err.contains("doc.max_depth"), "{err}");
    let v = doc.get().await.unwrap();
    assert!(v.get("b").is_none() && v.get("c").is_none() && v.get("p").is_none());
    let mut depth = 0;
    let mut at = &v;
    while let Some(next) = at.get("a") {
        at = next;
        depth += 1;
    }
    assert_eq!(depth, 65);
    node.shutdown().await.unwrap();
}

/// A peer that allows deeper docs (as a hostile peer would) writes a doc 300
/// deep; the receiver, at the default cap, refuses that change, keeps the
/// doc as it was, and goes on syncing everything else with that peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_nested_past_the_cap_from_a_peer_is_refused_and_the_node_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let b = p2p_node(&dir.path().join("b"), vec![], |c| {
        c.net.anti_entropy_ms = 1_000;
    })
    .await;
    let b_addr = listen_addr(&b).await;
    let a = p2p_node(&dir.path().join("a"), vec![b_addr], |c| {
        c.doc.max_depth = 1000;
        c.net.anti_entropy_ms = 1_000;
    })
    .await;
    // Something both hold first, so the deep doc's refusal is seen against it.
    a.doc("deep/peer")
        .unwrap()
        .patch(json!({"shallow": 1}))
        .await
        .unwrap();
    converge(&[&a, &b], "deep/peer", |v| v["shallow"] == json!(1)).await;
    let path: String = "/a".repeat(300);
    a.doc("deep/peer")
        .unwrap()
        .ops(ops(json!([{"op": "set", "path": path, "value": 1}])))
        .await
        .unwrap();
    a.doc("after/deep")
        .unwrap()
        .patch(json!({"fine": true}))
        .await
        .unwrap();
    converge(&[&a, &b], "after/deep", |v| v["fine"] == json!(true)).await;
    // b never took a change past its cap (it may hold the empty containers
    // within it, each made by its own genesis change), and the doc is
    // readable and writable there.
    let depth_of = |v: &serde_json::Value| {
        let (mut depth, mut at) = (0, v);
        while let Some(next) = at.get("a") {
            at = next;
            depth += 1;
        }
        depth
    };
    let v = b.doc("deep/peer").unwrap().get().await.unwrap();
    assert_eq!(v["shallow"], json!(1));
    assert!(depth_of(&v) <= 64, "{}", depth_of(&v));
    b.doc("deep/peer")
        .unwrap()
        .patch(json!({"more": 2}))
        .await
        .unwrap();
    assert_eq!(
        b.doc("deep/peer").unwrap().get().await.unwrap()["more"],
        json!(2)
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
