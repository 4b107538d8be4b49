//! Nodes over real libp2p on loopback (TCP, noise, yamux), joined by static
//! peers with mDNS off: concurrent edits converge, and a late joiner catches up
//! on 1,000 docs.

use std::time::{Duration, Instant};

mod common;

use common::{listen_addr, p2p_node};
use mergeflow::Node;
use serde_json::json;

async fn start(dir: &std::path::Path, peers: Vec<String>) -> Node {
    p2p_node(dir, peers, |c| c.net.anti_entropy_ms = 1_000).await
}

/// Polls until every node has the same list of docs with the same heads.
async fn converged(nodes: &[&Node], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut views = Vec::new();
        for n in nodes {
            let list: Vec<(String, Vec<String>)> = n
                .docs()
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|d| {
                    let mut h = d.heads;
                    h.sort();
                    (d.id, h)
                })
                .collect();
            views.push(list);
        }
        if views.windows(2).all(|w| w[0] == w[1]) && !views[0].is_empty() {
            return;
        }
        let sizes: Vec<usize> = views.iter().map(Vec::len).collect();
        assert!(
            Instant::now() < deadline,
            "{what}: not converged, docs per node {sizes:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_and_a_late_joiner_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr = listen_addr(&a).await;
    let b = start(&dir.path().join("b"), vec![a_addr.clone()]).await;
    let c = start(&dir.path().join("c"), vec![a_addr.clone()]).await;

    // Concurrent edits to shared docs from all three.
    for i in 0..30 {
        for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
            node.doc(&format!("shared/{}", i % 5))
                .unwrap()
                .patch(json!({ format!("{name}{i}"): i }))
                .await
                .unwrap();
        }
    }
    converged(&[&a, &b, &c], "shared docs").await;
    // /metrics counts what the sync core did: c applied peers' changes.
    let text = c.metrics().await;
    let m = common::samples(&text);
    let get = |series: &str| {
        m.get(series)
            .copied()
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert!(get("mergeflow_sync_changes_applied_total") >= 1.0);
    get("mergeflow_anti_entropy_docs_differing_total");
    assert_eq!(get("mergeflow_write_duration_seconds_count"), 30.0);
    assert!(get("mergeflow_flush_duration_seconds_count") >= 1.0);
    assert_eq!(
        get("mergeflow_changes_applied_total{origin=\"local\"}"),
        30.0
    );
    assert!(get("mergeflow_changes_applied_total{origin=\"remote\"}") >= 60.0);
    // Per peer: c is connected to a, and each sent the other its changes.
    let a_peer = a.peer_id().to_string();
    let series =
        |name: &str, labels: &str| format!("mergeflow_{name}{{peer=\"{a_peer}\"{labels}}}");
    assert_eq!(get(&series("peer_connected", "")), 1.0);
    for way in ["in", "out"] {
        let dir = format!(",direction=\"{way}\"");
        assert!(get(&series("peer_messages_total", &dir)) >= 1.0);
        assert!(get(&series("peer_traffic_bytes_total", &dir)) >= 1.0);
    }
    assert!(get("mergeflow_net_messages_total{direction=\"in\",kind=\"change\"}") >= 1.0);
    // libp2p's own metrics follow in the same exposition, ended once.
    for family in [
        "libp2p_bandwidth_bytes_total{",
        "libp2p_swarm_connections_established_total{",
    ] {
        assert!(text.contains(family), "no {family} in\n{text}");
    }
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    let v = c.doc("shared/4").unwrap().get().await.unwrap();
    assert_eq!(
        (v["a29"].clone(), v["b29"].clone(), v["c29"].clone()),
        (json!(29), json!(29), json!(29))
    );

    // 1,000 docs on a, then a fresh node joins through b.
    for i in 0..1000 {
        a.doc(&format!("bulk/{i}"))
            .unwrap()
            .patch(json!({"n": i}))
            .await
            .unwrap();
    }
    let b_addr = listen_addr(&b).await;
    let late = start(&dir.path().join("late"), vec![b_addr]).await;
    let t = Instant::now();
    converged(&[&a, &b, &c, &late], "late joiner").await;
    println!(
        "late joiner caught up on {} docs in {:?}",
        late.docs().count(),
        t.elapsed()
    );
    assert_eq!(late.docs().count(), 1005);
    assert_eq!(
        late.doc("bulk/999").unwrap().get().await.unwrap(),
        json!({"n": 999})
    );
    for n in [a, b, c, late] {
        n.shutdown().await.unwrap();
    }
}

async fn doc_ids(node: &Node) -> Vec<String> {
    node.docs()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect()
}

async fn start_with(
    dir: &std::path::Path,
    peers: Vec<String>,
    key: &str,
    allow: Vec<String>,
) -> Node {
    p2p_node(dir, peers, |c| {
        c.net.anti_entropy_ms = 500;
        c.net.key = key.to_string();
        c.net.allow = allow;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_key_or_off_the_allowlist_nothing_is_read_or_written() {
    let dir = tempfile::tempdir().unwrap();
    let key = mergeflow::generate_key();
    let other_key = mergeflow::generate_key();
    // b is the only peer a allows; it has a's key.
    let b_peer = {
        // Learn b's peer id by starting it once (identity is kept in its data dir).
        let b = start_with(&dir.path().join("b"), vec![], &key, vec![]).await;
        let id = b.peer_id().to_string();
        b.shutdown().await.unwrap();
        id
    };
    let a = start_with(&dir.path().join("a"), vec![], &key, vec![b_peer.clone()]).await;
    let a_addr = listen_addr(&a).await;
    a.doc("secret")
        .unwrap()
        .patch(json!({"s": 1}))
        .await
        .unwrap();
    let b = start_with(&dir.path().join("b"), vec![a_addr.clone()], &key, vec![]).await;
    let no_key = start_with(&dir.path().join("nokey"), vec![a_addr.clone()], "", vec![]).await;
    let wrong_key = start_with(
        &dir.path().join("wrong"),
        vec![a_addr.clone()],
        &other_key,
        vec![],
    )
    .await;
    let not_allowed = start_with(&dir.path().join("na"), vec![a_addr.clone()], &key, vec![]).await;
    for n in [&no_key, &wrong_key, &not_allowed] {
        n.doc("intruder")
            .unwrap()
            .patch(json!({"x": 1}))
            .await
            .unwrap();
    }
    // b, with the key and on the list, gets the doc: the network works.
    converged(&[&a, &b], "allowed peer").await;
    // Let several anti-entropy rounds pass at a and b (500 ms each): the others
    // keep redialling all along.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in [&no_key, &wrong_key, &not_allowed] {
        let ids = doc_ids(n).await;
        assert_eq!(ids, vec!["intruder"], "an outsider read a's docs");
        assert_eq!(n.status().await.peers, 0);
    }
    for n in [&a, &b] {
        let ids = doc_ids(n).await;
        assert_eq!(ids, vec!["secret"], "an outsider wrote to the network");
    }
    for n in [a, b, no_key, wrong_key, not_allowed] {
        n.shutdown().await.unwrap();
    }
}

/// Two nodes that each know only a third one find each other through
/// Kademlia and connect directly; a QUIC-only node joins too. The fast path
/// runs on gossipsub here.
#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_peers_are_found_through_kademlia_and_quic_works() {
    let dir = tempfile::tempdir().unwrap();
    let hub = common::p2p_node(&dir.path().join("hub"), vec![], |c| {
        c.net.gossipsub = true;
        c.net.listen = vec![
            "/ip4/127.0.0.1/tcp/0".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
        ];
    })
    .await;
    let hub_tcp = common::listen_addr(&hub).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let hub_quic = loop {
        let addrs = hub.status().await.listen_addrs;
        if let Some(a) = addrs.iter().find(|a| a.contains("/quic-v1")) {
            break a.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no QUIC listen address: {addrs:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let b = common::p2p_node(&dir.path().join("b"), vec![hub_tcp], |c| {
        c.net.gossipsub = true;
    })
    .await;
    let c = common::p2p_node(&dir.path().join("c"), vec![hub_quic], |c| {
        c.net.gossipsub = true;
        c.net.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()];
    })
    .await;
    let c_id = c.peer_id().to_string();
    let b_id = b.peer_id().to_string();
    loop {
        let b_sees_c = b.peers().iter().any(|p| p.peer_id == c_id && p.connected);
        let c_sees_b = c.peers().iter().any(|p| p.peer_id == b_id && p.connected);
        if b_sees_c && c_sees_b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b and c did not find each other: b {:?} c {:?}",
            b.peers(),
            c.peers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And data flows over the QUIC connection.
    c.doc("quic/doc")
        .unwrap()
        .patch(json!({"v": 1}))
        .await
        .unwrap();
    converged(&[&hub, &b, &c], "after a write on the QUIC-only node").await;
    for n in [c, b, hub] {
        n.shutdown().await.unwrap();
    }
}

/// A doc whose raw changes exceed a peer's size cap, but whose compacted form
/// fits, syncs to that peer; the sender is not struck as hostile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doc_of_many_small_changes_syncs_under_a_peer_cap_on_stored_size() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let doc = a.doc("big/many-changes").unwrap();
    for i in 0..2_000 {
        doc.patch(json!({ "n": i })).await.unwrap();
    }
    let a_addr = listen_addr(&a).await;
    let b = p2p_node(&dir.path().join("b"), vec![a_addr], |c| {
        c.doc.max_doc_bytes = 64 * 1024;
        c.doc.max_change_bytes = 16 * 1024;
    })
    .await;
    converged(&[&a, &b], "a big doc under b's cap").await;
    assert_eq!(
        b.doc("big/many-changes").unwrap().get().await.unwrap(),
        json!({ "n": 1_999 })
    );
    let struck: u64 = b.peers().iter().map(|p| p.rejected).sum();
    assert_eq!(struck, 0, "an honest peer was struck: {:?}", b.peers());
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A peer that goes away still shows when it was last in sync: that is
/// what an operator wants to know while it is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_peer_keeps_its_last_time_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let b = start(&dir.path().join("b"), vec![listen_addr(&a).await]).await;
    let b_id = b.peer_id().to_string();
    let peer = |a: &Node| a.peers().into_iter().find(|p| p.peer_id == b_id);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !peer(&a).is_some_and(|p| p.connected && p.last_in_sync_at.is_some()) {
        assert!(Instant::now() < deadline, "a never saw b in sync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.shutdown().await.unwrap();
    drop(b);
    while peer(&a).is_some_and(|p| p.connected) {
        assert!(Instant::now() < deadline, "a still shows b connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = peer(&a).unwrap();
    assert!(gone.last_in_sync_at.is_some(), "{gone:?}");
    a.shutdown().await.unwrap();
}

/// Heartbeats alone keep an idle pair connected: with nothing else said
/// (no digests due, libp2p's ping every 5 min), both nodes still count the
/// other as heard for three peer timeouts, and no connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_alone_keep_an_idle_pair_connected() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = |c: &mut mergeflow::config::Config| {
        c.net.anti_entropy_ms = 600_000;
        c.net.kademlia = false;
        c.net.peer_timeout_ms = 2_000;
        c.net.ping_interval_ms = 1_000;
    };
    let a = p2p_node(&dir.path().join("a"), vec![], quiet).await;
    let b = p2p_node(&dir.path().join("b"), vec![listen_addr(&a).await], quiet).await;
    let both = || {
        [(&a, &b), (&b, &a)].iter().all(|(n, other)| {
            let id = other.peer_id().to_string();
            n.peers().iter().any(|p| p.peer_id == id && p.connected)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !both() {
        assert!(Instant::now() < deadline, "a and b never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Watch three timeouts go by: a peer judged silent would be shown
    // disconnected and its connection closed.
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        assert!(both(), "a peer was judged silent while heartbeats ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in [&a, &b] {
        let m = common::samples(&n.metrics().await);
        let closed: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("libp2p_swarm_connections_closed_total"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(closed, 0.0, "a connection closed: {m:?}");
    }
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A node pushes a doc it holds as a compact save, with every signature,
/// straight from the store: serving a fresh peer loads none of them (a
/// load and a save per doc was most of a sender's catch-up CPU). The peer
/// gets every doc whole and takes every signature. A doc not known to
/// have every signature stored (one from before signatures, here with a
/// signature left by a crash making up the count) goes the long way,
/// where the sender signs what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_saves_are_pushed_without_loading_them() {
    const DOCS: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let writes = (0..DOCS).map(|i| {
        let a = a.clone();
        async move {
            let doc = a.doc(&format!("saved/{i:03}")).unwrap();
            // 8 changes: stored as one save (a small doc compacts at 8).
            for n in 0..8 {
                doc.patch(json!({ "i": i, "n": n })).await.unwrap();
            }
        }
    });
    futures_util::future::join_all(writes).await;
    // A save and a tail of 4: loaded and saved to go, signed all the same.
    let tail = a.doc("saved/tail").unwrap();
    for n in 0..12 {
        tail.patch(json!({ "n": n })).await.unwrap();
    }
    drop(tail);
    a.shutdown().await.unwrap();
    drop(a);
    let legacy = "saved/000";
    let data = dir.path().join("a");
    tokio::task::spawn_blocking(move || make_legacy(&data, legacy))
        .await
        .unwrap();
    // Restarted: nothing in memory.
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr = listen_addr(&a).await;
    let b = start(&dir.path().join("b"), vec![a_addr]).await;
    converged(&[&a, &b], "a fresh node from stored saves").await;
    let loaded = a.status().await.docs_cached_peak;
    assert!(
        loaded < 16,
        "the sender loaded {loaded} docs to push {DOCS} stored saves"
    );
    let mut expected: Vec<(String, serde_json::Value)> = (0..DOCS)
        .step_by(17)
        .map(|i| (format!("saved/{i:03}"), json!({ "i": i, "n": 7 })))
        .collect();
    expected.push(("saved/tail".into(), json!({ "n": 11 })));
    assert!(expected.iter().any(|(id, _)| id == legacy));
    for (id, value) in expected {
        assert_eq!(b.doc(&id).unwrap().get().await.unwrap(), value, "{id}");
        let history = b.doc(&id).unwrap().history().await.unwrap();
        assert!(history.len() >= 8, "{id}: {history:?}");
        assert!(
            history.iter().all(|h| h.signed_by.is_some()),
            "{id}: a change arrived unsigned: {history:?}"
        );
    }
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// Makes stored doc `id` look like one written before signatures, with a
/// crash leftover on top: one change's signature gone, a signature of no
/// change in its place (as many signatures as changes), and a meta
/// without the `signed` mark, as a build from before it wrote.
fn make_legacy(data_dir: &std::path::Path, id: &str) {
    use mergeflow::testing::store::{Store, WriteBatch};
    let store = Store::open(data_dir, 1 << 20).unwrap();
    let mut meta = store.doc_meta(id).unwrap().unwrap();
    assert!(meta.signed && meta.tail_changes == 0, "{meta:?}");
    let sigs = store.sigs(id).unwrap();
    assert_eq!(sigs.len() as u64, meta.next_seq);
    let (hash, sig) = sigs.iter().next().unwrap();
    let snapshot = store.doc_data(id, &meta).unwrap().snapshot;
    meta.signed = false;
    let mut batch = WriteBatch::default();
    batch.remove_sig(id, hash);
    batch.put_sig(id, &[7; 32], sig);
    batch.compact(id, &snapshot, &meta, meta.next_seq..meta.next_seq);
    store.apply(batch).unwrap();
    store.flush().unwrap();
}

/// A fresh node catching up holds about its doc cache's worth of docs in
/// memory, not what its peer pushes at once (frames of a thousand docs,
/// hundreds of frames queued): a writer round takes at most
/// `store.cache_docs / 2` remote inputs, and trims the cache after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_catching_up_holds_few_docs_in_memory() {
    const DOCS: usize = 600;
    const CACHE: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let writes = (0..DOCS).map(|i| {
        let a = a.clone();
        async move {
            let doc = a.doc(&format!("catchup/{i:04}")).unwrap();
            doc.patch(json!({ "n": i })).await.unwrap();
        }
    });
    futures_util::future::join_all(writes).await;
    let a_addr = listen_addr(&a).await;
    let b = p2p_node(&dir.path().join("b"), vec![a_addr], |c| {
        c.store.cache_docs = CACHE;
    })
    .await;
    converged(&[&a, &b], "a fresh node with a small cache").await;
    let status = b.status().await;
    assert_eq!(status.docs, DOCS as u64);
    // The cache's bound, plus one round's docs (CACHE / 2), plus slack for
    // docs a reader (the test's list, the digest) had in use.
    assert!(
        status.docs_cached_peak <= (CACHE + CACHE / 2 + 8) as u64,
        "{} docs in memory at once, cache_docs = {CACHE}",
        status.docs_cached_peak
    );
    assert!(status.docs_cached <= CACHE as u64, "{status:?}");
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
