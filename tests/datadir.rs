//! Data dir lifecycle through the real binary: clean restarts keep data and
//! identity, a data dir of another schema version or with a damaged file is
//! refused with a clear error and left unchanged, and one data dir cannot be
//! opened by two nodes.

mod common;

use std::path::Path;

use common::{NodeProc, snapshot_files};
use mergeflow::client::Client;
use serde_json::json;

fn write_some(api: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::new(api);
        for i in 0..40 {
            c.patch(&format!("docs/{}", i % 4), &json!({ format!("k{i}"): i }))
                .await
                .unwrap();
        }
    });
}

#[test]
fn sigterm_exits_0_and_a_restart_keeps_data_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = NodeProc::start(&data);
    write_some(&node.api);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let before = rt.block_on(Client::new(&node.api).status()).unwrap();
    assert_eq!(node.terminate(), Some(0), "SIGTERM must exit 0");
    assert!(
        data.join("SEAL").exists(),
        "a clean stop seals the data dir"
    );

    let node = NodeProc::start(&data);
    let c = Client::new(&node.api);
    let after = rt.block_on(c.status()).unwrap();
    assert_eq!(after.peer_id, before.peer_id, "identity is kept");
    assert_ne!(
        after.actor, before.actor,
        "every boot gets a fresh actor id"
    );
    assert_eq!(after.boot, before.boot + 1);
    assert_eq!(after.docs, 4);
    let v = rt.block_on(c.get("docs/1", None)).unwrap();
    assert_eq!(v["k37"], json!(37));
    let history = rt.block_on(c.history("docs/1")).unwrap();
    assert!(
        history
            .iter()
            .all(|h| h.peer_id.as_deref() == Some(before.peer_id.as_str()))
    );
    assert!(
        !data.join("SEAL").exists(),
        "the seal is removed while running"
    );
}

/// Starts a node, writes, stops it cleanly, applies `damage` to the data dir and
/// checks that the next start fails with exit 1 and one line of error, leaving
/// every file as it was. Returns the error.
fn refused_after(damage: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = NodeProc::start(&data);
    write_some(&node.api);
    assert_eq!(node.terminate(), Some(0));
    damage(&data);
    let files = snapshot_files(&data);
    let (code, err) = NodeProc::try_start(&data, &[])
        .err()
        .expect("must not start");
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line of error: {err}");
    assert!(snapshot_files(&data) == files, "files changed");
    err
}

#[test]
fn unknown_schema_version_is_refused_and_files_unchanged() {
    let err = refused_after(|data| {
        std::fs::write(data.join("FORMAT"), "mergeflow-store 99\n").unwrap();
    });
    assert!(
        err.contains("schema version 99") && err.contains("refusing"),
        "{err}"
    );
}

#[test]
fn damaged_sled_file_is_refused_and_files_unchanged() {
    let err = refused_after(|data| {
        // Flip bytes in the middle of sled's log, as a bad sector would.
        let log = data.join("db").join("db");
        let mut bytes = std::fs::read(&log).unwrap();
        let mid = bytes.len() / 3;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0xff;
        }
        std::fs::write(&log, bytes).unwrap();
    });
    assert!(
        err.contains("corrupt") && err.contains("db/db") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn missing_database_is_refused() {
    let err = refused_after(|data| std::fs::remove_dir_all(data.join("db")).unwrap());
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn garbage_format_file_is_refused_and_files_unchanged() {
    let err = refused_after(|data| {
        std::fs::write(data.join("FORMAT"), [0u8, 159, 146, 150]).unwrap();
    });
    assert!(err.contains("FORMAT") && err.contains("corrupt"), "{err}");
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = NodeProc::start(&data);
    let (code, err) = NodeProc::try_start(&data, &[])
        .err()
        .expect("must not start");
    assert_eq!(code, Some(1));
    assert!(err.contains("in use"), "{err}");
    drop(first);
}

#[test]
fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[store]\ncache_doc = 5\n").unwrap();
    let data = dir.path().join("data");
    let (code, err) = NodeProc::try_start(&data, &["--config", cfg.to_str().unwrap()])
        .err()
        .expect("must not start");
    assert_eq!(code, Some(1));
    assert!(err.contains("cache_doc") && err.contains("c.toml"), "{err}");
    assert!(!data.exists(), "nothing is created on a config error");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::try_start(
        &dir.path().join("data"),
        &["--log-format", "json", "--log-level", "info"],
    )
    .unwrap_or_else(|(c, e)| panic!("start failed {c:?}: {e}"));
    let deadline = std::time::Instant::now() + common::START_DEADLINE;
    loop {
        let line = node
            .stderr
            .recv_timeout(deadline - std::time::Instant::now())
            .expect("a log line");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["fields"]["message"] == "node started" {
            assert_eq!(v["level"], "INFO");
            assert!(v["fields"]["peer"].is_string(), "{v}");
            break;
        }
    }
    assert_eq!(node.terminate(), Some(0));
}

/// A tmpfs mounted for one test and unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// None (and a note on stdout) where the test may not mount (not root).
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "mf-test",
            ])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            println!("skipped: mounting a tmpfs (a disk that can fill up) needs root");
        }
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success(), "remount {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A real full disk (a small tmpfs filled by writes): the node keeps its
/// API up and serves reads, refuses writes with 507 instead of restarting
/// in a loop, and takes writes again by itself once space returns, with
/// every acknowledged write still there.
#[test]
fn a_full_disk_keeps_reads_and_takes_writes_again_once_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "24m") else {
        return;
    };
    let node = NodeProc::start(&data);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let base = node.api.clone();
    let blob = "x".repeat(100_000);
    let patch = |i: usize| {
        let req = http
            .patch(format!("{base}/v1/docs/fill%2F{i}"))
            .json(&json!({ "blob": blob, "i": i }));
        rt.block_on(async { req.send().await.map(|r| r.status().as_u16()) })
    };
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..2_000 {
        match patch(i).unwrap() {
            200 => acked.push(i),
            s => {
                refused = Some(s);
                break;
            }
        }
    }
    assert_eq!(refused, Some(507), "the disk never filled");
    assert!(!acked.is_empty());
    let get = |path: &str| {
        let req = http.get(format!("{base}{path}"));
        rt.block_on(async {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        })
    };
    // The store has failed; the API stays up: reads answer, writes get 507.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while get("/healthz").0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure never showed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (s, first) = get("/v1/docs/fill%2F0");
    assert_eq!((s, &first["i"]), (200, &json!(0)), "{first}");
    // sled may refuse a read that makes it rewrite a page (a listing, most
    // often): a clear 503, not a 500.
    let (s, listed) = get("/v1/docs?prefix=fill/");
    assert!(
        s == 200 || (s == 503 && listed["error"]["code"] == "store_failed"),
        "{s} {listed}"
    );
    assert_eq!(patch(99_999).unwrap(), 507);

    // Space returns: the node restarts on its data dir by itself.
    disk.resize("256m");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut up_again = false;
    while std::time::Instant::now() < deadline {
        if patch(100_000).is_ok_and(|s| s == 200) {
            up_again = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if !up_again {
        let log: Vec<String> = node.stderr.try_iter().collect();
        panic!(
            "writes did not come back after space was freed; the node said:\n{}",
            log.join("\n")
        );
    }
    for i in &acked {
        let (s, v) = get(&format!("/v1/docs/fill%2F{i}"));
        assert_eq!(
            (s, &v["i"]),
            (200, &json!(i)),
            "acknowledged write {i} lost"
        );
    }
    println!(
        "{} writes fit, then 507; writes back after space returned",
        acked.len()
    );
    drop(node);
    drop(disk);
}
