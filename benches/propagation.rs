//! Propagation and catch-up over real libp2p on loopback, in one process:
//! - a small change written on A, until it is readable on B (2 nodes), p50/p99;
//! - the same to all of 4 other nodes (5 nodes, star around A);
//! - a fresh node catching up on N small docs (default 10,000);
//! - a fresh node catching up on one doc of N small changes (default 100,000),
//!   on a new pair of nodes.
//!
//! Prints numbers; asserts nothing. Run: `cargo bench --bench propagation`
//! (or `scripts/bench.sh --p2p`). Env: `DOCS` (catch-up size), `WRITES`,
//! `POOL` (propagation writes go round-robin to this many docs, default 1),
//! `HOT` (changes to the hot doc, A -> B, default 20,000; 0 skips it),
//! `CHANGES` (changes in the one big doc), `PROGRESS` (report each second),
//! `KADEMLIA=0`, `REMOTE_FLUSH_MS` (the node setting). Each propagation run
//! also prints the CPU time of the whole process per write and the flushes
//! per write on each node.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mergeflow::Node;
use mergeflow::config::Config;
use mergeflow::feed::FeedItem;
use serde_json::json;

async fn start(dir: &std::path::Path, peers: Vec<String>) -> Node {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.net.mdns = false;
    config.net.peers = peers;
    config.log.level = "error".into();
    // KADEMLIA=0 turns peer discovery off: the 5 nodes then stay a star
    // around A instead of a full mesh.
    config.net.kademlia = std::env::var("KADEMLIA").map_or(true, |v| v != "0");
    // REMOTE_FLUSH_MS=0: every merged remote change is flushed before its
    // feed event (the default batches those flushes, see config.example.toml).
    if let Ok(ms) = std::env::var("REMOTE_FLUSH_MS") {
        config.store.remote_flush_ms = ms.parse().expect("REMOTE_FLUSH_MS: milliseconds");
    }
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

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) this process has used, from `/proc/self/stat`
/// (Linux; zero elsewhere). Every node of the bench runs in this process.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
    // utime and stime are fields 14 and 15 of the line, 11 and 12 here
    // (the state letter does not parse), in clock ticks of 10 ms.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// Writes `writes` small changes on `a`; for each, waits until every node in
/// `others` has stored the writer's heads, as its change feed reports them
/// (an event is published once the change is durable there). Returns
/// per-write latencies. Waiting on the feed, not polling `heads()`, keeps the
/// measuring client from competing with the nodes for the doc and the CPU.
///
/// Each run writes to its own fresh doc: Automerge applies a remote change in
/// time proportional to the ops already in the object it changes (see
/// `benches/apply.rs`), so runs on one shared doc would not be comparable.
async fn propagate(a: &Node, others: &[Node], writes: usize, id: &str) -> Vec<Duration> {
    use futures_util::StreamExt;
    let pool = env_usize("POOL", 1);
    let glob = format!("{id}/*");
    let mut feeds: Vec<_> = others
        .iter()
        .map(|o| Box::pin(o.subscribe(&glob).unwrap()))
        .collect();
    let mut lat = Vec::with_capacity(writes);
    let flushes = |n: &Node| {
        let n = n.clone();
        async move { n.status().await.flushes }
    };
    let mut before = Vec::new();
    for n in std::iter::once(a).chain(others) {
        before.push(flushes(n).await);
    }
    let cpu = cpu_time();
    for i in 0..writes {
        let doc = a.doc(&format!("{id}/{}", i % pool)).unwrap();
        let t = Instant::now();
        let r = doc.patch(json!({"i": i})).await.unwrap();
        let mut want = r.heads.clone();
        want.sort();
        for feed in &mut feeds {
            loop {
                match feed.next().await.expect("feed ended") {
                    FeedItem::Change(e) => {
                        let mut got = e.heads.clone();
                        got.sort();
                        if got == want {
                            break;
                        }
                    }
                    FeedItem::Missed { .. } => panic!("the benchmark fell behind a feed"),
                }
            }
        }
        lat.push(t.elapsed());
    }
    println!(
        "  CPU of all {} nodes per write: {:.0} us",
        others.len() + 1,
        (cpu_time() - cpu).as_secs_f64() * 1e6 / writes as f64
    );
    let mut per_write = Vec::new();
    for (n, b) in std::iter::once(a).chain(others).zip(before) {
        per_write.push(format!(
            "{:.2}",
            (flushes(n).await - b) as f64 / writes as f64
        ));
    }
    println!(
        "  flushes per write on A, then each receiver: {}",
        per_write.join(" ")
    );
    lat
}

/// A hot doc: 32 writers on `a` write `n` changes to one doc as fast as they
/// can while `b` and every other connected node (4 in the bench) receive
/// them; prints A's write rate and how far behind `b` is when the last write
/// is done (the receiver applies a frame's changes
/// to one doc in one Automerge call; one by one, each call walks the doc).
async fn sustained(a: &Node, b: &Node, n: usize) {
    const ID: &str = "bench/hot";
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let doc = a.doc(ID).unwrap();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(32) {
                doc.patch(json!({"n": i})).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wrote = t.elapsed();
    let heads = a.doc(ID).unwrap().heads().await.unwrap();
    let t = Instant::now();
    while b.doc(ID).unwrap().heads().await.ok().as_ref() != Some(&heads) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "hot doc: {n} changes from 32 writers on A in {:.2} s ({:.0}/s); B had them all {:.2} s after the last write",
        wrote.as_secs_f64(),
        n as f64 / wrote.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let writes = env_usize("WRITES", 1000);
    let docs = env_usize("DOCS", 10_000);
    let changes = env_usize("CHANGES", 100_000);
    let progress = std::env::var_os("PROGRESS").is_some();
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr = addr(&a).await;
    let b = start(&dir.path().join("b"), vec![a_addr.clone()]).await;
    wait_peers(&a, 1).await;
    let mut lat = propagate(&a, std::slice::from_ref(&b), writes, "bench/p2").await;
    println!(
        "propagation A -> B (2 nodes, {writes} writes to a fresh doc, each until B's change feed has it): p50 {:.3} ms  p99 {:.3} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    let mut others = vec![b];
    for i in 0..3 {
        others.push(start(&dir.path().join(format!("n{i}")), vec![a_addr.clone()]).await);
    }
    wait_peers(&a, 4).await;
    let mut lat = propagate(&a, &others, writes, "bench/p5").await;
    println!(
        "propagation A -> all of 5 nodes ({writes} writes to a fresh doc, each until every change feed has it): p50 {:.3} ms  p99 {:.3} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    // After the 5-node run, so its load does not touch those numbers.
    let hot = env_usize("HOT", 20_000);
    if hot > 0 {
        sustained(&a, &others[0], hot).await;
    }
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
    drop((fresh, a, dir));

    catch_up_one_doc(changes, progress).await;
}

/// Catch-up to one big doc: a new node A (own temp dir, none of the docs
/// above) writes `changes` small changes to one doc; then a fresh node F dials
/// A, and the time until F's heads for the doc equal A's is measured.
///
/// Default caps suffice at 100,000 changes: the doc is stored as ~220 KiB
/// (`doc.max_doc_bytes` is 64 MiB), and the merge on F, which counts the raw
/// bytes of every change it adds (~105 B each, ~10 MiB), stays under it too.
async fn catch_up_one_doc(changes: usize, progress: bool) {
    const ID: &str = "bench/big";
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr = addr(&a).await;

    let t = Instant::now();
    let written = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..32 {
        let (doc, written) = (a.doc(ID).unwrap(), written.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..changes).step_by(32) {
                doc.patch(json!({"n": i})).await.unwrap();
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let reporter = progress.then(|| {
        let written = written.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            let mut last = 0;
            loop {
                every.tick().await;
                let n = written.load(Ordering::Relaxed);
                eprintln!(
                    "  {:>5.1} s: {n} changes written ({} in the last second)",
                    t.elapsed().as_secs_f64(),
                    n - last
                );
                last = n;
            }
        })
    });
    for t in tasks {
        t.await.unwrap();
    }
    if let Some(r) = reporter {
        r.abort();
    }
    println!(
        "wrote one doc of {changes} changes on A in {:.2} s (32 writers)",
        t.elapsed().as_secs_f64()
    );
    let a_doc = a.doc(ID).unwrap();
    let want = a_doc.heads().await.unwrap();

    let t = Instant::now();
    let fresh = start(&dir.path().join("fresh"), vec![a_addr]).await;
    let f_doc = fresh.doc(ID).unwrap();
    // Progress from its own task: one `heads` call can wait behind F merging
    // the whole doc, and the report should not wait with it.
    let reporter = progress.then(|| {
        let (fresh, f_doc, want) = (fresh.clone(), f_doc.clone(), want.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                let state = match f_doc.heads().await {
                    Ok(h) if h == want => "caught up",
                    Ok(_) => "present, behind",
                    Err(_) => "absent",
                };
                eprintln!(
                    "  {:>5.1} s: doc {state}, store {:.1} MiB",
                    t.elapsed().as_secs_f64(),
                    mib(fresh.status().await.store_bytes)
                );
            }
        })
    });
    while f_doc.heads().await.ok().as_ref() != Some(&want) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "catch-up of a fresh node to one doc of {changes} changes: {:.2} s (start to heads equal)",
        t.elapsed().as_secs_f64()
    );
    if let Some(r) = reporter {
        r.abort();
    }
    let doc_bytes = |n: &Node| {
        let n = n.clone();
        async move {
            let list = n.docs().list().await.unwrap();
            list.iter().find(|d| d.id == ID).map_or(0, |d| d.size_bytes)
        }
    };
    // F's heads are read from memory, where the merge lands before its
    // round reaches the store: wait for the stored doc, then flush both
    // (sled buffers recent writes) before measuring sizes on disk.
    while doc_bytes(&fresh).await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.docs().flush().await.unwrap();
    fresh.docs().flush().await.unwrap();
    println!(
        "store size after one doc of {changes} changes: A {:.1} MiB, F {:.1} MiB (the doc: A {:.1} KiB, F {:.1} KiB stored)",
        mib(a.status().await.store_bytes),
        mib(fresh.status().await.store_bytes),
        doc_bytes(&a).await as f64 / 1024.0,
        doc_bytes(&fresh).await as f64 / 1024.0,
    );
    fresh.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
