//! Workflow engine on one node: trigger-to-step latency of a `derive` (the
//! triggering write's change event -> the derived change's event, and the
//! write call's return -> the derived event), and derive runs per second
//! with many writers.
//!
//! Then the engine's own pace: a backlog of docs written while the workflow
//! was disabled, worked off once it is enabled.
//!
//! Prints numbers; asserts nothing. Run: `cargo bench --bench workflow`.
//! Env: `WRITES` (sequential writes for latency, default 2000), `DOCS`
//! (docs written round-robin, default 100), `LOAD` (writes for throughput,
//! default 20000), `WRITERS` (concurrent writers, default 32), `BACKLOG`
//! (docs in the backlog, default `LOAD`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mergeflow::feed::FeedItem;
use serde_json::json;

const FAHRENHEIT: &str = r#"
name = "fahrenheit"
[on]
doc = "sensors/*"
path = "/celsius"
[[steps]]
id = "convert"
kind = "derive"
set = { "/fahrenheit" = "doc.celsius * 9.0 / 5.0 + 32.0" }
"#;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let writes = env("WRITES", 2000);
    let docs = env("DOCS", 100);
    let load = env("LOAD", 20_000);
    let writers = env("WRITERS", 32);
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(defs.join("fahrenheit.toml"), FAHRENHEIT).unwrap();
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.path().join("node");
    config.workflow.dir = defs;
    let node = mergeflow::Node::builder()
        .config(config)
        .network(false)
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.workflows().list().is_empty() {
        assert!(Instant::now() < deadline, "workflow not loaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Latency: one write at a time, each waiting for its derived change.
    let mut events = std::pin::pin!(node.subscribe("sensors/*").unwrap());
    let mut from_event = Vec::with_capacity(writes);
    let mut from_return = Vec::with_capacity(writes);
    for i in 0..writes {
        let doc = format!("sensors/s{}", i % docs);
        let sent = Instant::now();
        node.doc(&doc)
            .unwrap()
            .patch(json!({ "celsius": i }))
            .await
            .unwrap();
        let returned = Instant::now();
        let mut applied = None;
        loop {
            let item = events.next().await.expect("feed open");
            let FeedItem::Change(e) = item else {
                panic!("missed events")
            };
            if e.doc != doc {
                continue;
            }
            match &e.cause {
                None => applied = Some(Instant::now()),
                Some(_) => {
                    let now = Instant::now();
                    from_event.push(now - applied.unwrap_or(sent));
                    from_return.push(now - returned);
                    break;
                }
            }
        }
    }
    from_event.sort();
    from_return.sort();
    println!(
        "derive latency over {writes} writes to {docs} docs: change event -> derived event \
         p50 {:.3} ms p99 {:.3} ms; write returned -> derived event p50 {:.3} ms p99 {:.3} ms",
        pct(&from_event, 0.5),
        pct(&from_event, 0.99),
        pct(&from_return, 0.5),
        pct(&from_return, 0.99),
    );

    // Throughput: many writers, distinct docs; runs coalesce when a doc
    // changes faster than its runs finish.
    let before = node.workflows().stats();
    let started = Instant::now();
    let per = load / writers;
    let mut tasks = Vec::new();
    let last: Arc<std::sync::Mutex<HashMap<String, i64>>> = Default::default();
    for w in 0..writers {
        let node = node.clone();
        let last = last.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let doc = format!(
                    "sensors/load-{w}-{}",
                    i % (docs.max(writers) / writers).max(1)
                );
                let v = (w * per + i) as i64;
                node.doc(&doc)
                    .unwrap()
                    .patch(json!({ "celsius": v }))
                    .await
                    .unwrap();
                last.lock().unwrap().insert(doc, v);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let written = started.elapsed();
    let last = last.lock().unwrap().clone();
    for (doc, v) in &last {
        let want = json!(*v as f64 * 9.0 / 5.0 + 32.0);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let got = node.doc(doc).unwrap().get_path("/fahrenheit").await.ok();
            if got.as_ref() == Some(&want) {
                break;
            }
            assert!(Instant::now() < deadline, "{doc} not derived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let elapsed = started.elapsed();
    let after = node.workflows().stats();
    let runs = after.runs - before.runs;
    println!(
        "derive throughput: {} writes by {writers} writers in {:.2} s ({:.0} writes/s); \
         {runs} runs ({} triggers coalesced) done {:.2} s after the first write: {:.0} runs/s",
        per * writers,
        written.as_secs_f64(),
        (per * writers) as f64 / written.as_secs_f64(),
        after.coalesced - before.coalesced,
        elapsed.as_secs_f64(),
        runs as f64 / elapsed.as_secs_f64(),
    );

    // Backlog: the engine's own pace, with no writes competing for the
    // store. Docs written while the workflow is disabled, then enabled:
    // one run per doc, as after a catch-up sync brings many changed docs.
    let flows = node.workflows();
    flows.set_enabled("fahrenheit", false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !flows.list().iter().any(|w| w.state == "disabled") {
        assert!(Instant::now() < deadline, "workflow not disabled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let backlog = env("BACKLOG", load);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..backlog).step_by(writers) {
                node.doc(&format!("sensors/backlog-{i}"))
                    .unwrap()
                    .patch(json!({ "celsius": i }))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let before = flows.stats();
    let started = Instant::now();
    flows.set_enabled("fahrenheit", true).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while flows.stats().done < before.done + backlog as u64 {
        assert!(Instant::now() < deadline, "backlog not worked off");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "derive backlog: {backlog} docs written while the workflow was disabled, all derived \
         {:.2} s after enabling it: {:.0} runs/s",
        elapsed.as_secs_f64(),
        backlog as f64 / elapsed.as_secs_f64(),
    );
    node.shutdown().await.unwrap();
}
