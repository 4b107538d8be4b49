//! Helpers for tests of workflows run by in-process nodes.

use std::path::Path;

use serde_json::{Value, json};

use super::until;

pub fn write_def(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
}

pub async fn path_of(node: &mergeflow::Node, doc: &str, path: &str) -> Option<Value> {
    node.doc(doc).unwrap().get_path(path).await.ok()
}

pub async fn local_node(
    dir: &Path,
    defs: &Path,
    tweak: impl FnOnce(&mut mergeflow::config::Config),
) -> mergeflow::Node {
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.workflow.dir = defs.to_path_buf();
    tweak(&mut config);
    mergeflow::Node::builder()
        .config(config)
        .network(false)
        .start()
        .await
        .unwrap()
}

/// Waits until every node is connected to every other and knows that each
/// runs `workflows`.
pub async fn full_mesh_running(nodes: &[mergeflow::Node], workflows: &[&str]) {
    for n in nodes {
        for m in nodes {
            let doc = format!("_mergeflow/nodes/{}", m.peer_id());
            for w in workflows {
                until("membership docs everywhere", || async {
                    let connected =
                        n.peers().iter().filter(|p| p.connected).count() >= nodes.len() - 1;
                    let member =
                        path_of(n, &doc, &format!("/workflows/{w}")).await == Some(json!(true));
                    // What peers check its effect markers against.
                    let ran = path_of(n, &doc, &format!("/ran/{w}")).await == Some(json!(true));
                    (connected && member && ran).then_some(())
                })
                .await;
            }
        }
    }
}
