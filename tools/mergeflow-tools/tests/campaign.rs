//! The chaos campaign's workload, receiver and checker on an in-process
//! cluster on loopback, with one node taken offline mid-run (the fault that
//! needs no root). `scripts/chaos.sh` runs the same pieces against nodes in
//! network namespaces with real faults. (Moved from the root's
//! `tests/chaos.rs`, whose other tests stay there.)

use std::path::Path;
use std::time::{Duration, Instant};

use mergeflow_tools::chaos;

/// The test seed: `MERGEFLOW_TEST_SEED` or a fixed default (as the root's
/// `tests/common`). Printed so a failing run can be repeated.
fn seed(default: u64) -> u64 {
    let seed = std::env::var("MERGEFLOW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("seed = {seed} (set MERGEFLOW_TEST_SEED to repeat)");
    seed
}

/// An in-process node on loopback, mDNS off, dialing `peers`, serving its
/// HTTP API on a free port; `tweak` adjusts the rest of its config.
async fn p2p_api_node(
    dir: &Path,
    peers: Vec<String>,
    tweak: impl FnOnce(&mut mergeflow::config::Config),
) -> mergeflow::Node {
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.net.mdns = false;
    config.net.peers = peers;
    // The campaign's workflow posts to a receiver on loopback.
    config.workflow.http_allow = vec!["127.0.0.1".into()];
    tweak(&mut config);
    mergeflow::Node::builder()
        .config(config)
        .network(true)
        .api("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap()
}

/// The node's first p2p listen address (with /p2p/<id>), once it has one.
async fn listen_addr(node: &mergeflow::Node) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(a) = node.status().await.listen_addrs.first() {
            return a.clone();
        }
        assert!(Instant::now() < deadline, "no listen address");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_campaign_with_an_offline_node_loses_nothing_and_delivers_every_final_effect() {
    let seed = seed(7);
    let dir = tempfile::tempdir().unwrap();
    let fast = |c: &mut mergeflow::config::Config| c.net.anti_entropy_ms = 500;
    let a = p2p_api_node(&dir.path().join("a"), vec![], fast).await;
    let a_addr = listen_addr(&a).await;
    let b = p2p_api_node(&dir.path().join("b"), vec![a_addr.clone()], fast).await;
    let c = p2p_api_node(&dir.path().join("c"), vec![a_addr], fast).await;
    let nodes: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|n| format!("http://{}", n.api_addr().unwrap()))
        .collect();

    let effects = dir.path().join("effects.jsonl");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/effects", listener.local_addr().unwrap());
    let receiver = tokio::spawn({
        let effects = effects.clone();
        async move { chaos::receive(listener, &effects, 0.2, seed).await }
    });
    chaos::install_workflow(&nodes, None, &url, Duration::from_secs(60))
        .await
        .unwrap();

    let ops = dir.path().join("ops.jsonl");
    let opts = chaos::WorkloadOptions {
        nodes: nodes.clone(),
        token: None,
        clients: 4,
        docs: 4,
        duration: Duration::from_secs(3),
        seed,
        interval: Duration::from_millis(5),
        timeout: Duration::from_secs(10),
        log: ops.clone(),
    };
    let work = tokio::spawn(async move { chaos::workload(&opts).await });
    // Node c is cut off for the middle second: its writes are acknowledged
    // locally and must reach the others after it comes back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.set_online(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.set_online(true);
    let healed_at_ms = chaos::now_ms();
    let summary = work.await.unwrap().unwrap();
    assert!(summary.ok > 0, "no acknowledged writes: {summary:?}");

    let report = chaos::check(&chaos::CheckOptions {
        nodes,
        token: None,
        ops,
        effects: Some(effects),
        faults: None,
        node_logs: vec![],
        healed_at_ms: Some(healed_at_ms),
        timeout: Duration::from_secs(120),
        seed: Some(seed),
    })
    .await
    .unwrap();
    println!("{}", report.table());
    assert!(
        report.violations().is_empty(),
        "seed {seed}: {:?}",
        report.violations()
    );
    assert_eq!(report.acknowledged, summary.ok);
    assert_eq!(report.nodes, 3);
    assert!(report.converge_seconds.is_some());
    let (all, accepted) = report.effect_deliveries.unwrap();
    assert!(all > accepted, "the receiver refused some deliveries");
    receiver.abort();
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}
