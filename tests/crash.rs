//! Crash test: concurrent clients write through the HTTP API, the node is killed
//! with SIGKILL at a random moment, restarted, and every acknowledged write must
//! be there. Several cycles on one data dir.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{NodeProc, seed};
use mergeflow::client::Client;
use mergeflow::doc::Op;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

const CYCLES: usize = 6;
const WRITERS: usize = 8;
const DOCS: usize = 4;
const COMPACT_OFTEN: (&str, &str) = ("MERGEFLOW_STORE_COMPACT_AFTER_CHANGES", "16");

/// (doc, key) -> value of every acknowledged write.
type Acked = Arc<Mutex<BTreeMap<(String, String), i64>>>;

#[test]
fn acknowledged_writes_survive_kill_9() {
    let seed = seed(0x5eed_c4a5);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let acked: Acked = Arc::default();
    let rt = tokio::runtime::Runtime::new().unwrap();

    for cycle in 0..CYCLES {
        // Compact often, so that kills land inside compactions too.
        let node = NodeProc::try_start_env(&data, &[], &[COMPACT_OFTEN])
            .unwrap_or_else(|(code, err)| panic!("seed {seed}: restart failed ({code:?}): {err}"));
        let client = Client::new(&node.api);
        // Everything acknowledged before must be there after the restart.
        rt.block_on(verify(&client, &acked, cycle, seed));

        let kill_after = Duration::from_millis(rng.random_range(100..600));
        write_until(&rt, &client, &acked, cycle, || {
            std::thread::sleep(kill_after); // the kill moment is what we randomise
            node.kill9();
        });
        println!(
            "cycle {cycle}: killed after {kill_after:?}, {} acked writes so far",
            acked.lock().unwrap().len()
        );
    }
    let node = NodeProc::start(&data);
    let client = Client::new(&node.api);
    rt.block_on(verify(&client, &acked, CYCLES, seed));
    assert!(
        acked.lock().unwrap().len() > CYCLES * WRITERS,
        "too few writes were acknowledged to test anything"
    );
    assert_eq!(node.terminate(), Some(0));
}

/// Runs `WRITERS` concurrent writers (merge patches and ops, alternating) until
/// `stop` has run and the node stops answering; records every acknowledged write.
fn write_until(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    acked: &Acked,
    cycle: usize,
    stop: impl FnOnce(),
) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, acked) = (client.clone(), acked.clone());
        tasks.push(rt.spawn(async move {
            for i in 0i64.. {
                let doc = format!("crash/doc-{}", (w + i as usize) % DOCS);
                let key = format!("c{cycle}-w{w}-{i}");
                let res = if i % 2 == 0 {
                    client.patch(&doc, &json!({ key.clone(): i })).await
                } else {
                    let op = Op::Set {
                        path: format!("/{key}"),
                        value: json!(i),
                        kind: None,
                    };
                    client.ops(&doc, &[op]).await
                };
                match res {
                    Ok(_) => {
                        acked.lock().unwrap().insert((doc, key), i);
                    }
                    Err(_) => return, // the node is gone; stop this writer
                }
            }
        }));
    }
    stop();
    for t in tasks {
        rt.block_on(t).unwrap();
    }
}

#[test]
fn sigterm_during_writes_exits_0_and_keeps_every_acknowledged_write() {
    let seed = seed(0x5157_7e4d);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let acked: Acked = Arc::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = NodeProc::start(&data);
    let client = Client::new(&node.api);
    let mut code = None;
    write_until(&rt, &client, &acked, 0, || {
        // Stop once writes are flowing: poll for the first acknowledgements.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < 50 {
            assert!(
                std::time::Instant::now() < deadline,
                "seed {seed}: no writes acknowledged"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        code = node.terminate();
    });
    assert_eq!(code, Some(0), "seed {seed}: SIGTERM must exit 0");
    let node = NodeProc::start(&data);
    rt.block_on(verify(&Client::new(&node.api), &acked, 1, seed));
}

async fn verify(client: &Client, acked: &Acked, cycle: usize, seed: u64) {
    let expected = acked.lock().unwrap().clone();
    let mut docs: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (doc, _) in expected.keys() {
        if !docs.contains_key(doc) {
            let v = client.get(doc, None).await.unwrap_or_else(|e| {
                panic!("seed {seed} cycle {cycle}: doc {doc} unreadable after restart: {e}")
            });
            docs.insert(doc.clone(), v);
        }
    }
    for ((doc, key), value) in &expected {
        assert_eq!(
            docs[doc].get(key),
            Some(&json!(value)),
            "seed {seed} cycle {cycle}: acknowledged write {doc}/{key}={value} lost"
        );
    }
}
