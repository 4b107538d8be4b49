//! Helpers for tests that run the `mergeflow` binary.
#![allow(dead_code)]

pub mod flows;
pub mod mosquitto;
pub mod ws;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous deadline for a node to come up (debug build, loaded CI machine).
pub const START_DEADLINE: Duration = Duration::from_secs(60);

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mergeflow"))
}

/// The test seed: `MERGEFLOW_TEST_SEED` or a fixed default. Printed so a failing
/// run can be repeated.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("MERGEFLOW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("seed = {seed} (set MERGEFLOW_TEST_SEED to repeat)");
    seed
}

/// A `mergeflow start` process on a free loopback port.
pub struct NodeProc {
    pub child: Child,
    pub api: String,
    pub stderr: mpsc::Receiver<String>,
}

impl NodeProc {
    /// Starts a node on `data_dir` and waits for its ready line.
    pub fn start(data_dir: &Path) -> NodeProc {
        Self::try_start(data_dir, &[])
            .unwrap_or_else(|(code, err)| panic!("node did not start (exit {code:?}):\n{err}"))
    }

    /// Starts a node; on failure returns its exit code and stderr.
    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<NodeProc, (Option<i32>, String)> {
        Self::try_start_env(data_dir, extra, &[])
    }

    /// As [`NodeProc::try_start`], with extra environment variables.
    pub fn try_start_env(
        data_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<NodeProc, (Option<i32>, String)> {
        let mut child = Command::new(bin())
            .arg("start")
            .arg("--data-dir")
            .arg(data_dir)
            // Loopback only, and no mDNS: tests send nothing off this machine
            // and do not find each other's nodes.
            .args(["--api", "127.0.0.1:0", "--log-level", "warn", "--no-mdns"])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra)
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mergeflow");
        let (out_tx, out_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = out_tx.send(line);
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match out_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(api) = line.split_whitespace().find_map(|w| w.strip_prefix("api="))
                    {
                        return Ok(NodeProc {
                            child,
                            api: api.to_string(),
                            stderr: err_rx,
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Drain stderr: the reader thread ends when the pipe closes.
                let err: Vec<String> = err_rx.iter().collect();
                return Err((status.code(), err.join("\n")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node did not print its ready line within {START_DEADLINE:?}");
            }
        }
    }

    /// SIGKILL, no chance to flush.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(ok.success());
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s.code();
            }
            assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `dir` with its bytes, for "unchanged" checks.
pub fn snapshot_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Copies directory `from` (a stopped node's data dir) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// The config of a node on the network: listening on loopback, mDNS off,
/// dialing `peers`; `tweak` adjusts the rest.
pub fn p2p_config(
    dir: &Path,
    peers: Vec<String>,
    tweak: impl FnOnce(&mut mergeflow::config::Config),
) -> mergeflow::config::Config {
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.net.mdns = false;
    config.net.peers = peers;
    tweak(&mut config);
    config
}

/// An in-process node on the network (see [`p2p_config`]).
pub async fn p2p_node(
    dir: &Path,
    peers: Vec<String>,
    tweak: impl FnOnce(&mut mergeflow::config::Config),
) -> mergeflow::Node {
    mergeflow::Node::builder()
        .config(p2p_config(dir, peers, tweak))
        .network(true)
        .start()
        .await
        .unwrap()
}

/// As [`p2p_node`], serving its HTTP API on a free loopback port too.
pub async fn p2p_api_node(
    dir: &Path,
    peers: Vec<String>,
    tweak: impl FnOnce(&mut mergeflow::config::Config),
) -> mergeflow::Node {
    mergeflow::Node::builder()
        .config(p2p_config(dir, peers, tweak))
        .network(true)
        .api("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap()
}

/// An in-process node serving its HTTP API on a free loopback port, data in
/// `dir/data`; `tweak` adjusts the rest of its config.
pub async fn api_node(
    dir: &Path,
    tweak: impl FnOnce(&mut mergeflow::config::Config),
) -> mergeflow::Node {
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.join("data");
    tweak(&mut config);
    mergeflow::Node::builder()
        .config(config)
        .api("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap()
}

/// The samples of a Prometheus text exposition, by series (name and
/// labels); panics on a line that is not a comment or `series value`.
pub fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
        out.insert(series.to_string(), value);
    }
    out
}

/// The node's first p2p listen address (with /p2p/<id>), once the swarm has one.
pub async fn listen_addr(node: &mergeflow::Node) -> String {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Some(a) = node.status().await.listen_addrs.first() {
            return a.clone();
        }
        assert!(Instant::now() < deadline, "no listen address");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after a
/// generous deadline (60 s: debug build, loaded CI machine).
pub async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tells `node`'s sync core (a node started with `.sync(..)` and no
/// network) that peer `peer` connected and replicates everything, as its
/// first message on a link would.
pub fn sync_peer_up(node: &mergeflow::Node, peer: &str) {
    use mergeflow::testing::sync::{Input, Message};
    node.sync_input(Input::PeerUp(peer.to_string()));
    node.sync_input(Input::Received {
        from: peer.to_string(),
        msg: Message::Scope {
            replicate: None,
            ask: false,
        },
    });
}
