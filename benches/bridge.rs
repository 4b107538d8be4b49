//! The bridges to the systems around the mesh (issue 22), measured in one
//! process on loopback with a real Mosquitto:
//! - MQTT in, throughput: `READINGS` (default 50,000) QoS 1 readings
//!   published as fast as the broker takes them, over 100 device docs, until
//!   node A has stored them all (durable): readings/s;
//! - MQTT in, latency: `RATE` readings/s (default 5,000) for `SECONDS`
//!   (default 10), each from its publish until node B (synced from A) holds
//!   it, p50/p99/max;
//! - pull: `BATCHES` (default 20) doc-triggered `http` GETs of 1,000 records
//!   each from a local HTTP source, merged into docs by a `write` step:
//!   records/s from the first trigger until the last batch is stored.
//!
//! Prints numbers; asserts nothing. Run: `cargo bench --bench bridge`
//! (`ONLY=mqtt` or `ONLY=pull` for one part)
//! (`scripts/bench.sh --bridge`). Skips the MQTT part when the machine has no
//! `mosquitto` (Debian: `apt-get install mosquitto`).

#[path = "../tests/common/mosquitto.rs"]
#[allow(dead_code)]
mod mosquitto;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use mergeflow::Node;
use mergeflow::config::Config;
use mergeflow::feed::FeedItem;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn node(dir: &std::path::Path, peers: Vec<String>, tweak: impl FnOnce(&mut Config)) -> Node {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.net.mdns = false;
    config.net.peers = peers;
    config.log.level = "error".into();
    tweak(&mut config);
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

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A device connection; returns its client and a counter of broker acks.
fn device(port: u16, id: &str) -> (AsyncClient, Arc<Mutex<u64>>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(o, 10_000);
    let acked = Arc::new(Mutex::new(0u64));
    let a = acked.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => *a.lock().unwrap() += 1,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    (client, acked)
}

async fn mqtt() {
    let Some(broker) = mosquitto::Mosquitto::start() else {
        println!("mqtt: skipped (no mosquitto)");
        return;
    };
    let readings = env("READINGS", 50_000);
    let rate = env("RATE", 5_000);
    let seconds = env("SECONDS", 10);
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[[mqtt]]\nurl = \"{}\"\nclient_id = \"bench-a\"\n\
         [[mqtt.in]]\nsubscribe = \"sensors/+/reading\"\ndoc = \"sensors/{{1}}\"\npath = \"/readings/-\"\n\
         [[mqtt.in]]\nsubscribe = \"lat/+\"\ndoc = \"lat/{{1}}\"\nmerge = true\n",
        broker.url()
    );
    #[derive(serde::Deserialize)]
    struct Only {
        mqtt: Vec<mergeflow::config::MqttBroker>,
    }
    let brokers = toml::from_str::<Only>(&cfg).unwrap().mqtt;
    let a = node(&dir.path().join("a"), vec![], |c| c.mqtt = brokers).await;
    let b = node(&dir.path().join("b"), vec![addr(&a).await], |_| {}).await;
    while b.status().await.peers < 1 || !a.mqtt_bridges()[0].connected {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Throughput: as fast as the broker takes them.
    let (client, acked) = device(broker.port, "bench-device");
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        for i in 0..readings {
            let payload = serde_json::to_vec(&json!({ "seq": i, "c": i % 40 })).unwrap();
            let topic = format!("sensors/dev{}/reading", i % 100);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    });
    loop {
        let stored = a.mqtt_bridges()[0].stored;
        if stored >= readings {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    publisher.await.unwrap();
    println!(
        "mqtt in: {readings} QoS 1 readings into 100 docs, durable on one node: {:.2} s, {:.0} readings/s (broker acked {} to the device)",
        took.as_secs_f64(),
        readings as f64 / took.as_secs_f64(),
        acked.lock().unwrap()
    );

    // Latency: a steady rate, from publish until B holds the reading.
    let sent: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut feed = Box::pin(b.subscribe("lat/*").unwrap());
    let (s2, seen2) = (sent.clone(), seen.clone());
    let watcher = tokio::spawn(async move {
        while let Some(item) = feed.next().await {
            let FeedItem::Change(e) = item else { continue };
            let at = now_us();
            let sent = s2.lock().unwrap();
            let mut seen = seen2.lock().unwrap();
            for p in &e.paths {
                if let Some(t) = sent.get(p.trim_start_matches('/')) {
                    seen.push(at.saturating_sub(*t));
                }
            }
        }
    });
    let (client, _) = device(broker.port, "bench-device-2");
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now())
            && wait > Duration::from_millis(1)
        {
            tokio::time::sleep(wait).await;
        }
        let key = format!("r{i}");
        let t = now_us();
        sent.lock().unwrap().insert(key.clone(), t);
        let payload = serde_json::to_vec(&json!({ key: t })).unwrap();
        client
            .publish(
                format!("lat/dev{}", i % 10),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (seen.lock().unwrap().len() as u64) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
    let mut lat = seen.lock().unwrap().clone();
    lat.sort_unstable();
    println!(
        "mqtt in: {rate} readings/s for {seconds} s, publish -> visible on node B: {} of {total} seen, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        percentile(&lat, 0.5) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// Serves `GET /batch?n=N`: 1,000 records of batch N.
async fn source() -> String {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/batch",
        get(
            |q: axum::extract::Query<HashMap<String, String>>| async move {
                let n: u64 = q["n"].parse().unwrap();
                let records: serde_json::Map<String, serde_json::Value> = (0..1000)
                .map(|i| {
                    (
                        format!("{n}-{i}"),
                        json!({ "id": format!("{n}-{i}"), "v": n * 1000 + i, "name": "reading" }),
                    )
                })
                .collect();
                axum::Json(json!({ "records": records }))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn pull() {
    let batches = env("BATCHES", 20);
    let src = source().await;
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(
        defs.join("pull.toml"),
        format!(
            "name = \"pull\"\n[on]\ndoc = \"pulls/*\"\n[[steps]]\nid = \"fetch\"\nkind = \"http\"\n\
             method = \"GET\"\nurl = \"{src}/batch\"\nquery = \"#{{ n: doc.n }}\"\n\
             [[steps]]\nid = \"save\"\nkind = \"write\"\nneeds = [\"fetch\"]\ndoc = \"records/all\"\n\
             merge = \"#{{ records: steps.fetch.body.records }}\"\n"
        ),
    )
    .unwrap();
    let a = node(&dir.path().join("a"), vec![], |c| {
        c.workflow.dir = defs.clone()
    })
    .await;
    while a.workflows().list().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    for n in 0..batches {
        a.doc(&format!("pulls/{n}"))
            .unwrap()
            .patch(json!({ "n": n }))
            .await
            .unwrap();
    }
    let want = batches as usize * 1000;
    // Done runs are cheap to count; the doc is read once at the end
    // (reading a doc of 20,000 records every few ms would slow the writes).
    loop {
        let done = a
            .workflows()
            .runs(
                Some("pull"),
                Some(mergeflow::workflow::RunStatus::Done),
                1000,
            )
            .unwrap()
            .len();
        if done as u64 >= batches {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let got = a
        .doc("records/all")
        .unwrap()
        .get_path("/records")
        .await
        .ok()
        .and_then(|r| r.as_object().map(|m| m.len()))
        .unwrap_or(0);
    assert_eq!(got, want, "every record stored");
    if std::env::var_os("PULL_RUNS").is_some() {
        let runs = a.workflows().runs(Some("pull"), None, 1000).unwrap();
        for r in runs.iter().rev() {
            let steps: Vec<String> = r
                .steps
                .iter()
                .map(|s| {
                    let at = |t: Option<u64>| t.map_or(-1, |t| t as i64 - r.created_ms as i64);
                    format!("{} {}..{} ms", s.id, at(s.started_ms), at(s.finished_ms))
                })
                .collect();
            println!("  run {} {}: {}", r.id, r.doc, steps.join(", "));
        }
    }
    println!(
        "pull: {batches} GETs of 1,000 records from a local HTTP source, merged into one doc: {:.2} s, {:.0} records/s",
        took.as_secs_f64(),
        want as f64 / took.as_secs_f64()
    );
    a.shutdown().await.unwrap();
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks for the list of benchmarks
    }
    let only = std::env::var("ONLY").unwrap_or_default();
    if only.is_empty() || only == "mqtt" {
        mqtt().await;
    }
    if only.is_empty() || only == "pull" {
        pull().await;
    }
}
