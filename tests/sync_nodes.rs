//! Real nodes (store, writer thread, sync core) wired by an in-memory shell
//! instead of libp2p: concurrent edits converge, merged changes are durable
//! across a restart, deletes stay deleted, and a node that was down catches up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mergeflow::config::Config;
use mergeflow::sync::{Input, Output, SyncConfig};
use mergeflow::{Error, Node};
use serde_json::{Value, json};

/// Routes the sync outputs of connected nodes to each other.
#[derive(Clone, Default)]
struct Shell {
    nodes: Arc<Mutex<HashMap<String, Node>>>,
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
                let targets: Vec<(String, Node, mergeflow::sync::Message)> = {
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
                    let bytes = mergeflow::sync::codec::encode(&msg);
                    let msg = mergeflow::sync::codec::decode(&bytes, 16 << 20).unwrap();
                    node.sync_input(Input::Received {
                        from: from.clone(),
                        msg,
                    });
                }
            }
        });
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge_and_merged_changes_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let shell = Shell::default();
    let a = start(&dir.path().join("a")).await;
    let b = start(&dir.path().join("b")).await;
    shell.join("a", &a);
    shell.join("b", &b);

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
