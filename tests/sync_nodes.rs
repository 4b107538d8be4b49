//! Real nodes (store, writer thread, sync core) wired by an in-memory shell
//! instead of libp2p: concurrent edits converge, merged changes are durable
//! across a restart, deletes stay deleted, and a node that was down catches up.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mergeflow::config::Config;
use mergeflow::testing::sync::{Input, Output, SyncConfig};
use mergeflow::{Error, Node};
use serde_json::{Value, json};

/// Routes the sync outputs of connected nodes to each other.
#[derive(Clone, Default)]
struct Shell {
    nodes: Arc<Mutex<HashMap<String, Node>>>,
    /// Bytes of Automerge sync messages delivered, per doc.
    sync_bytes: Arc<Mutex<HashMap<String, usize>>>,
}

impl Shell {
    /// Connects `node` as `name` to every node already in the shell.
    fn join(&self, name: &str, node: &Node) {
        let mut outputs = node.take_sync_outputs().expect("sync enabled");
        let others: Vec<(String, Node)> = {
            let mut nodes = self.nodes.lock().unwrap();
            let others = nodes.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            nodes.insert(name.to_string(), node.clone());
            others
        };
        for (other_name, other) in others {
            other.sync_input(Input::PeerUp(name.to_string()));
            node.sync_input(Input::PeerUp(other_name));
        }
        let (shell, from) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            while let Some(out) = outputs.recv().await {
                let targets: Vec<(String, Node, mergeflow::testing::sync::Message)> = {
                    let nodes = shell.nodes.lock().unwrap();
                    match out {
                        Output::Send { to, msg } => nodes
                            .get(&to)
                            .map(|n| vec![(to.clone(), n.clone(), msg)])
                            .unwrap_or_default(),
                        Output::Broadcast { msg, except } => nodes
                            .iter()
                            .filter(|(k, _)| **k != from && Some(*k) != except.as_ref())
                            .map(|(k, n)| (k.clone(), n.clone(), msg.clone()))
                            .collect(),
                        Output::Rejected { peer, reason } => {
                            panic!("{from} rejected {peer}: {reason}")
                        }
                        Output::Merged { .. } | Output::Held { .. } => vec![],
                    }
                };
                for (_, node, msg) in targets {
                    // Through the codec, as on the wire.
                    let bytes = mergeflow::testing::sync::codec::encode(&msg);
                    if let mergeflow::testing::sync::Message::Sync { doc, data, .. } = &msg {
                        *shell
                            .sync_bytes
                            .lock()
                            .unwrap()
                            .entry(doc.clone())
                            .or_default() += data.len();
                    }
                    let msg = mergeflow::testing::sync::codec::decode(&bytes, 16 << 20).unwrap();
                    node.sync_input(Input::Received {
                        from: from.clone(),
                        msg,
                    });
                }
            }
        });
    }

    /// Connects `node` (joined before, then left) to everyone again.
    fn rejoin(&self, name: &str, node: &Node) {
        let mut nodes = self.nodes.lock().unwrap();
        for (other_name, other) in nodes.iter() {
            other.sync_input(Input::PeerUp(name.to_string()));
            node.sync_input(Input::PeerUp(other_name.clone()));
        }
        nodes.insert(name.to_string(), node.clone());
    }

    /// Disconnects `name` from everyone.
    fn leave(&self, name: &str) {
        let mut nodes = self.nodes.lock().unwrap();
        nodes.remove(name);
        for other in nodes.values() {
            other.sync_input(Input::PeerDown(name.to_string()));
        }
    }
}

async fn start(dir: &std::path::Path) -> Node {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    Node::builder()
        .config(config)
        .sync(SyncConfig {
            anti_entropy_ms: 500,
            ..SyncConfig::default()
        })
        .start()
        .await
        .unwrap()
}

async fn read(node: &Node, doc: &str) -> Option<Value> {
    match node.doc(doc).unwrap().get().await {
        Ok(v) => Some(v),
        Err(Error::Doc(_)) => None,
        Err(e) => panic!("{e}"),
    }
}

/// Polls until every node reads the same value for every doc, with a generous deadline.
async fn converged(nodes: &[&Node], docs: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut views = Vec::new();
        for n in nodes {
            let mut v = Vec::new();
            for d in docs {
                v.push((read(n, d).await, n.doc(d).unwrap().heads().await.ok()));
            }
            views.push(v);
        }
        if views.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(Instant::now() < deadline, "not converged: {views:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Nodes `a` and `b` (data dirs under `dir`), joined in a new shell.
async fn two_joined(dir: &std::path::Path) -> (Shell, Node, Node) {
    let shell = Shell::default();
    let a = start(&dir.join("a")).await;
    let b = start(&dir.join("b")).await;
    shell.join("a", &a);
    shell.join("b", &b);
    (shell, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge_and_merged_changes_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (shell, a, b) = two_joined(dir.path()).await;

    // Concurrent edits to the same doc from both sides.
    for i in 0..20 {
        a.doc("shared")
            .unwrap()
            .patch(json!({ format!("a{i}"): i }))
            .await
            .unwrap();
        b.doc("shared")
            .unwrap()
            .patch(json!({ format!("b{i}"): i }))
            .await
            .unwrap();
    }
    a.doc("only-a")
        .unwrap()
        .patch(json!({"x": 1}))
        .await
        .unwrap();
    a.doc("doomed")
        .unwrap()
        .patch(json!({"x": 1}))
        .await
        .unwrap();
    converged(&[&a, &b], &["shared", "only-a", "doomed"]).await;
    let v = read(&b, "shared").await.unwrap();
    assert_eq!((v["a19"].clone(), v["b19"].clone()), (json!(19), json!(19)));

    b.doc("doomed").unwrap().delete().await.unwrap();
    converged(&[&a, &b], &["doomed"]).await;
    assert_eq!(read(&a, "doomed").await, None, "the delete reached a");

    // b restarts: what it merged from a must have been stored.
    shell.leave("b");
    let heads = b.doc("shared").unwrap().heads().await.unwrap();
    b.shutdown().await.unwrap();
    drop(b);
    // a writes while b is down.
    a.doc("while-down")
        .unwrap()
        .patch(json!({"y": 2}))
        .await
        .unwrap();
    let b = start(&dir.path().join("b")).await;
    assert_eq!(b.doc("shared").unwrap().heads().await.unwrap(), heads);
    assert_eq!(read(&b, "only-a").await, Some(json!({"x": 1})));
    shell.join("b", &b);
    converged(&[&a, &b], &["shared", "only-a", "doomed", "while-down"]).await;
    // A deleted doc does not come back from a's live copy, nor from new edits.
    assert_eq!(read(&b, "doomed").await, None);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Writes `n` changes to `doc` on `node`, 16 writers at a time.
async fn write_many(node: &Node, doc: &str, n: usize) {
    let mut tasks = Vec::new();
    for w in 0..16 {
        let d = node.doc(doc).unwrap();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(16) {
                d.patch(json!({ "n": i })).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Sync state is kept per peer and doc: after a restart, syncing a doc with a
/// long history costs bytes for what changed, not a summary of every change
/// (a fresh Automerge sync state sends a Bloom filter over all of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_after_restart_starts_from_the_saved_state() {
    const HISTORY: usize = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let (shell, a, b) = two_joined(dir.path()).await;
    a.doc("long")
        .unwrap()
        .patch(json!({"n": -1}))
        .await
        .unwrap();
    converged(&[&a, &b], &["long"]).await;
    // b misses a long run of changes, then a sync session brings them and
    // ends with both at the same heads: that state is saved.
    shell.leave("b");
    write_many(&a, "long", HISTORY).await;
    shell.rejoin("b", &b);
    converged(&[&a, &b], &["long"]).await;
    shell.leave("b");
    b.shutdown().await.unwrap();
    drop(b);
    a.doc("long")
        .unwrap()
        .patch(json!({"last": true}))
        .await
        .unwrap();
    let b = start(&dir.path().join("b")).await;
    shell.sync_bytes.lock().unwrap().clear();
    shell.join("b", &b);
    converged(&[&a, &b], &["long"]).await;
    let bytes = shell.sync_bytes.lock().unwrap().get("long").copied();
    println!(
        "sync bytes after restart for one missed change on a doc of {HISTORY} changes: {bytes:?}"
    );
    // From nothing, b's first message alone carries a Bloom filter over
    // every change (~1.2 bytes each, 3.6 KB here).
    assert!(bytes.is_some_and(|b| b < 1_500), "{bytes:?} bytes");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A frame of fast-path changes (as a busy peer sends them) is applied as a
/// batch: changes that depend on earlier ones in the same frame (or come
/// before them), duplicates, and changes of two docs interleaved all land,
/// and the doc ends at the sender's heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_changes_applies_as_a_batch() {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    use mergeflow::testing::sync::Message;
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("n")).await;
    let mut outputs = node.take_sync_outputs().unwrap();
    tokio::spawn(async move { while outputs.recv().await.is_some() {} });
    node.sync_input(Input::PeerUp("x".into()));
    let mut docs = [automerge::Automerge::new(), automerge::Automerge::new()];
    let signer =
        mergeflow::trust::Signer::new(&libp2p::identity::Keypair::generate_ed25519()).unwrap();
    let mut frame: Vec<Input> = Vec::new();
    for i in 0..300 {
        let (name, d) = if i % 3 == 0 {
            ("batch/b", &mut docs[1])
        } else {
            ("batch/a", &mut docs[0])
        };
        let mut tx = d.transaction();
        tx.put(automerge::ROOT, "n", i as i64).unwrap();
        let (hash, _) = tx.commit();
        let change = d
            .get_change_by_hash(&hash.unwrap())
            .unwrap()
            .raw_bytes()
            .to_vec();
        // Signed, as every node signs the changes it admits.
        let sig = signer.sign(name, &hash.unwrap().0).to_bytes().to_vec();
        let msg = Message::Change {
            doc: name.into(),
            change,
            sig,
            ack: false,
            seen: vec![],
        };
        if i == 10 {
            frame.push(frame[0].clone()); // a duplicate
        }
        frame.push(Input::Received {
            from: "x".into(),
            msg,
        });
    }
    // Frames overtake each other: a change before the one it depends on.
    frame.swap(20, 21);
    assert!(node.sync_inputs(frame));
    for (name, d) in [("batch/a", &docs[0]), ("batch/b", &docs[1])] {
        let mut want: Vec<String> = d.get_heads().iter().map(|h| h.to_string()).collect();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let heads = node.doc(name).unwrap().heads().await.ok();
            if heads.as_ref() == Some(&want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: {heads:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(read(&node, "batch/a").await, Some(json!({"n": 299})));
    assert_eq!(read(&node, "batch/b").await, Some(json!({"n": 297})));
    assert_eq!(
        node.doc("batch/a").unwrap().history().await.unwrap().len(),
        200
    );
    node.shutdown().await.unwrap();
}

/// A keyed write (one with an idempotency key: an MQTT reading, a retried
/// API request) leaves the node only once durable, by every path: a peer
/// that asks for the doc while the write's flush is pending gets its answer
/// after the flush, while a durable doc is answered at once. (Had the change
/// left before and the node crashed, the retried write would be applied
/// again under the new boot's actor, and the peer would bring the first
/// copy back: the doc would hold it twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_write_leaves_the_node_only_once_durable() {
    use mergeflow::testing::runtime::Change;
    use mergeflow::testing::sync::Message;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .data_dir(dir.path())
        .sync(SyncConfig::default())
        .start()
        .await
        .unwrap();
    let mut outputs = node.take_sync_outputs().unwrap();
    let x = "peer-x".to_string();
    common::sync_peer_up(&node, &x);
    node.doc("plain")
        .unwrap()
        .patch(json!({"a": 1}))
        .await
        .unwrap();
    node.docs().pause_flushes(true);
    let docs = node.docs().clone();
    let write = tokio::spawn(async move {
        let patch = Change::Patch(json!({"r": 1}));
        docs.write_idempotent("keyed".parse().unwrap(), patch, false, "r-1".into())
            .await
    });
    // Applied in memory (a read sees it) while its flush waits.
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.doc("keyed").unwrap().get().await.ok() != Some(json!({"r": 1})) {
        assert!(Instant::now() < deadline, "the keyed write never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The peer asks for both docs, as a peer holding nothing does.
    let ask = |doc: &str| {
        use automerge::sync::SyncDoc;
        let mut state = automerge::sync::State::new();
        let data = automerge::Automerge::new()
            .generate_sync_message(&mut state)
            .unwrap()
            .encode();
        Input::Received {
            from: x.clone(),
            msg: Message::Sync {
                doc: doc.into(),
                data,
                sigs: vec![],
            },
        }
    };
    node.sync_input(ask("keyed"));
    node.sync_input(ask("plain"));
    let sync_about = |o: &Output, doc: &str| matches!(o, Output::Send { msg: Message::Sync { doc: d, .. }, .. } if d == doc);
    loop {
        let o = tokio::time::timeout(Duration::from_secs(60), outputs.recv())
            .await
            .expect("an answer about plain")
            .unwrap();
        assert!(
            !sync_about(&o, "keyed"),
            "the keyed change left before its flush"
        );
        if sync_about(&o, "plain") {
            break;
        }
    }
    assert!(!write.is_finished(), "the write returned before its flush");
    node.docs().pause_flushes(false);
    write.await.unwrap().unwrap();
    loop {
        let o = tokio::time::timeout(Duration::from_secs(60), outputs.recv())
            .await
            .expect("the answer about keyed, after the flush")
            .unwrap();
        if let Output::Send {
            msg: Message::Sync { doc, data, .. },
            ..
        } = &o
            && doc == "keyed"
        {
            let msg = automerge::sync::Message::decode(data).unwrap();
            assert!(!msg.changes.is_empty(), "it carries the change");
            break;
        }
    }
    node.shutdown().await.unwrap();
}
