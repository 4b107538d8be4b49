//! Propagation and catch-up over real libp2p on loopback, in one process:
//! - a small change written on A, until it is readable on B (2 nodes), p50/p99;
//! - the same to all of 4 other nodes (5 nodes, star around A);
//! - a fresh node catching up on N small docs (default 10,000).
//!
//! Prints numbers; asserts nothing. Run: `cargo bench --bench propagation`
//! (or `scripts/bench.sh --p2p`). Env: `DOCS` (catch-up size), `WRITES`.

use std::time::{Duration, Instant};

use mergeflow::Node;
use mergeflow::config::Config;
use serde_json::json;

async fn start(dir: &std::path::Path, peers: Vec<String>) -> Node {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.net.mdns = false;
    config.net.peers = peers;
    config.log.level = "error".into();
    Node::builder()
        .config(config)
        .network(true)
        .start()
        .await
        .unwrap()
}

async fn addr(node: &Node) -> String {
    loop {
        if let Some(a) = node.status().await.listen_addrs.first() {
            return a.clone();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_peers(node: &Node, n: usize) {
    while node.status().await.peers < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// Writes `writes` small changes on `a`; for each, waits until every node in
/// `others` has the writer's heads. Returns per-write latencies.
async fn propagate(a: &Node, others: &[Node], writes: usize) -> Vec<Duration> {
    let doc = a.doc("bench/propagation").unwrap();
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let t = Instant::now();
        let r = doc.patch(json!({"i": i})).await.unwrap();
        for o in others {
            let d = o.doc("bench/propagation").unwrap();
            loop {
                if d.heads().await.ok().as_ref() == Some(&r.heads) {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        lat.push(t.elapsed());
    }
    lat
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let writes: usize = std::env::var("WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let docs: usize = std::env::var("DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr = addr(&a).await;
    let b = start(&dir.path().join("b"), vec![a_addr.clone()]).await;
    wait_peers(&a, 1).await;
    let mut lat = propagate(&a, std::slice::from_ref(&b), writes).await;
    println!(
        "propagation A -> B (2 nodes, {writes} writes, durable on A first): p50 {:.3} ms  p99 {:.3} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    let mut others = vec![b];
    for i in 0..3 {
        others.push(start(&dir.path().join(format!("n{i}")), vec![a_addr.clone()]).await);
    }
    wait_peers(&a, 4).await;
    let mut lat = propagate(&a, &others, writes).await;
    println!(
        "propagation A -> all of 5 nodes ({writes} writes): p50 {:.3} ms  p99 {:.3} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    for o in others {
        o.shutdown().await.unwrap();
    }

    // Catch-up: a fresh node joins a node holding `docs` small docs.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..docs).step_by(32) {
                a.doc(&format!("bulk/{i}"))
                    .unwrap()
                    .patch(json!({"n": i, "name": "sensor"}))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "wrote {docs} docs on A in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let total = a.docs().count();
    let t = Instant::now();
    let fresh = start(&dir.path().join("fresh"), vec![a_addr.clone()]).await;
    let progress = std::env::var_os("PROGRESS").is_some();
    let mut next_report = Duration::from_secs(1);
    while fresh.docs().count() < total {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if progress && t.elapsed() >= next_report {
            eprintln!(
                "  {:>5.1} s: {} docs",
                t.elapsed().as_secs_f64(),
                fresh.docs().count()
            );
            next_report += Duration::from_secs(1);
        }
    }
    println!(
        "catch-up of a fresh node to {total} docs: {:.2} s (start to last doc stored)",
        t.elapsed().as_secs_f64()
    );
    fresh.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
