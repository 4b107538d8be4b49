//! An offline-first app embedding mergeflow: two nodes in one process (say,
//! a phone and a laptop) share a shopping list. The phone goes offline, both
//! edit the same list, the phone comes back, and both converge to the same
//! merged list, which the phone's subscription to its change feed shows.
//!
//! Run: `cargo run --example offline_first` (loopback only; prints each step
//! and exits 0 once both nodes hold the merged list).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mergeflow::Node;
use mergeflow::config::Config;
use mergeflow::feed::FeedItem;
use serde_json::{Value, json};

/// A node on loopback, mDNS off, dialing `peers`.
async fn device(dir: &std::path::Path, peers: Vec<String>) -> anyhow::Result<Node> {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.net.mdns = false;
    config.net.peers = peers;
    Ok(Node::builder().config(config).network(true).start().await?)
}

/// Waits until `check` holds, or fails after a minute.
async fn until<F: AsyncFn() -> bool>(what: &str, check: F) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn list(node: &Node) -> Value {
    node.doc("lists/shopping")
        .unwrap()
        .get()
        .await
        .unwrap_or(Value::Null)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let laptop = device(&dir.path().join("laptop"), vec![]).await?;
    let addr = loop {
        if let Some(a) = laptop.status().await.listen_addrs.first() {
            break a.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let phone = device(&dir.path().join("phone"), vec![addr]).await?;

    // The app on the phone follows the list through the node's change feed.
    let mut feed = std::pin::pin!(phone.subscribe("lists/*")?);

    laptop
        .doc("lists/shopping")?
        .patch(json!({"items": {"milk": {"done": false}}}))
        .await?;
    until("the phone gets the list", async || {
        list(&phone).await != Value::Null
    })
    .await?;
    println!(
        "1. both online, the phone has the list: {}",
        list(&phone).await
    );

    phone.set_online(false);
    until("the phone is offline", async || {
        laptop.status().await.peers == 0
    })
    .await?;
    println!("2. the phone goes offline");

    // Both edit the same list meanwhile.
    laptop
        .doc("lists/shopping")?
        .patch(json!({"items": {"bread": {"done": false}}}))
        .await?;
    phone
        .doc("lists/shopping")?
        .patch(json!({"items": {"milk": {"done": true}, "eggs": {"done": false}}}))
        .await?;
    println!("3. laptop added bread: {}", list(&laptop).await);
    println!(
        "   phone (offline) ticked milk and added eggs: {}",
        list(&phone).await
    );

    phone.set_online(true);
    until("both hold the same list", async || {
        let (a, b) = (list(&laptop).await, list(&phone).await);
        a == b && a["items"].as_object().is_some_and(|m| m.len() == 3)
    })
    .await?;
    println!("4. the phone is back online; both converge");

    // What the app saw: the feed's latest event for the list, then the doc.
    let mut last = None;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), feed.next()).await {
        if let FeedItem::Change(e) = item {
            last = Some(e);
        }
    }
    let e = last.ok_or_else(|| anyhow::anyhow!("the subscription saw no change"))?;
    let merged = list(&phone).await;
    println!(
        "5. the phone's subscription: last change to {} from {} (touched {:?})",
        e.doc,
        if e.local { "this device" } else { "the laptop" },
        e.paths
    );
    println!("   merged list on both: {merged}");
    let items = &merged["items"];
    anyhow::ensure!(
        items["milk"]["done"] == json!(true)
            && items["bread"]["done"] == json!(false)
            && items["eggs"]["done"] == json!(false),
        "unexpected merge: {merged}"
    );
    anyhow::ensure!(list(&laptop).await == merged, "the nodes differ");
    println!("ok: no edit was lost");
    phone.shutdown().await?;
    laptop.shutdown().await?;
    Ok(())
}
