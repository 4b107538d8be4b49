//! Embedding mergeflow in an application: open a node on a data dir, write and
//! read documents through the library, and shut down cleanly.
//!
//! Run: `cargo run --example embedded -- [DATA_DIR]` (default: a temp dir).

use automerge::transaction::Transactable;
use mergeflow::Node;
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arg = std::env::args().nth(1);
    let dir = match &arg {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("mergeflow-embedded-{}", std::process::id())),
    };
    let node = Node::builder().data_dir(&dir).start().await?;
    println!("node {} on {}", node.peer_id(), dir.display());

    // A JSON merge patch: creates the document if absent, durable on return.
    let doc = node.doc("sensors/greenhouse-3")?;
    let r = doc.patch(json!({"celsius": 21.5, "room": "north"})).await?;
    println!("patched, heads {:?}", r.heads);

    // Explicit ops: one change, all or nothing.
    let ops = serde_json::from_value(json!([
        {"op": "increment", "path": "/readings", "by": 1},
        {"op": "set", "path": "/notes", "value": "calibrated", "as": "text"}
    ]))?;
    doc.ops(ops).await?;

    // Full Automerge access through a closure over a transaction.
    doc.change(|tx| {
        tx.put(automerge::ROOT, "celsius", 22.0)?;
        Ok(())
    })
    .await?;

    println!("document: {}", doc.get().await?);
    println!("celsius: {}", doc.get_path("/celsius").await?);
    for h in doc.history().await? {
        println!(
            "change {} by {:?}: {:?}",
            &h.hash[..12],
            h.peer_id,
            h.message
        );
    }
    node.shutdown().await?;
    drop(node);
    if arg.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
