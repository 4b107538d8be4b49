//! The CLI as a client of a running node: every `doc` subcommand, `status`,
//! `--json`, stdin input, and one-line failures with a non-zero exit.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::bin;
use mergeflow::Node;
use serde_json::{Value, json};

struct Cli {
    api: String,
    /// Sent as MERGEFLOW_API_TOKEN (none: the variable is removed).
    token: Option<String>,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, None)
    }

    fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(bin())
            .args(args)
            .env("MERGEFLOW_API", &self.api)
            .env_remove("MERGEFLOW_API_TOKEN")
            .envs(self.token.iter().map(|t| ("MERGEFLOW_API_TOKEN", t)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs a command that must fail; returns its one-line stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("error: "), "{err}");
        err
    }
}

async fn start_node(dir: &std::path::Path) -> Node {
    common::api_node(dir, |_| {}).await
}

#[tokio::test(flavor = "multi_thread")]
async fn doc_commands_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let cli = Cli {
        api: node.api_addr().unwrap().to_string(),
        token: None,
    };
    tokio::task::spawn_blocking(move || {
        let r = cli.json(&[
            "doc",
            "create",
            "--id",
            "sensors/gh-3",
            r#"{"celsius": 20}"#,
        ]);
        assert_eq!(r["id"], "sensors/gh-3");
        let out = cli.run_stdin(
            &["doc", "create", "--id", "from/stdin"],
            Some(r#"{"a": 1}"#),
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("created from/stdin"));
        let out = cli.run_stdin(
            &["doc", "patch", "from/stdin", "-"],
            Some(r#"{"piped": true}"#),
        );
        assert!(out.status.success());
        assert_eq!(
            cli.json(&["doc", "get", "from/stdin"]),
            json!({"a": 1, "piped": true})
        );

        assert!(
            cli.ok(&["doc", "patch", "sensors/gh-3", r#"{"celsius": 21}"#])
                .starts_with("patched sensors/gh-3")
        );
        cli.ok(&[
            "doc",
            "ops",
            "sensors/gh-3",
            r#"[{"op":"increment","path":"/n","by":5}]"#,
        ]);
        assert_eq!(
            cli.json(&["doc", "get", "sensors/gh-3"]),
            json!({"celsius": 21, "n": 5})
        );
        assert_eq!(
            cli.json(&["doc", "get", "sensors/gh-3", "--path", "/n"]),
            json!(5)
        );
        let heads = cli.json(&["doc", "heads", "sensors/gh-3"]);
        assert_eq!(heads.as_array().unwrap().len(), 1);
        let history = cli.json(&["doc", "history", "sensors/gh-3"]);
        let writes = history.as_array().unwrap().iter();
        assert_eq!(writes.filter(|h| h["genesis"] != json!(true)).count(), 3);
        assert!(cli.ok(&["doc", "history", "sensors/gh-3"]).contains("ops"));
        let list = cli.json(&["doc", "list"]);
        assert_eq!(list.as_array().unwrap().len(), 2);
        assert!(cli.ok(&["doc", "list"]).contains("sensors/gh-3"));
        let sensors = cli.json(&["doc", "list", "--prefix", "sensors/"]);
        assert_eq!(sensors.as_array().unwrap().len(), 1, "{sensors}");
        let one = cli.run(&["doc", "list", "--limit", "1"]);
        let (out, err) = (
            String::from_utf8_lossy(&one.stdout),
            String::from_utf8_lossy(&one.stderr),
        );
        assert!(
            out.contains("from/stdin") && !out.contains("sensors/gh-3"),
            "{out}"
        );
        assert!(err.contains("--after from/stdin"), "{err}");
        let rest = cli.ok(&["doc", "list", "--after", "from/stdin"]);
        assert!(
            rest.contains("sensors/gh-3") && !rest.contains("from/stdin"),
            "{rest}"
        );
        let status = cli.json(&["status"]);
        assert_eq!(status["docs"], 2);
        assert!(cli.ok(&["status"]).contains("peer_id"));
        assert!(
            cli.ok(&["doc", "delete", "sensors/gh-3"])
                .contains("deleted")
        );

        let err = cli.fails(&["doc", "get", "sensors/gh-3"]);
        assert!(err.contains("deleted") && err.contains("410"), "{err}");
        let err = cli.fails(&["doc", "get", "nope"]);
        assert!(err.contains("not found") && err.contains("404"), "{err}");
        let err = cli.fails(&["doc", "patch", "x", "{not json"]);
        assert!(err.contains("PATCH is not valid JSON"), "{err}");
        let err = cli.fails(&["doc", "ops", "x", r#"[{"op":"frob"}]"#]);
        assert!(err.contains("OPS must be a JSON array"), "{err}");
        let err = cli.fails(&["doc", "get", "bad id"]);
        assert!(err.contains("invalid doc id"), "{err}");
    })
    .await
    .unwrap();
    node.shutdown().await.unwrap();
}

#[test]
fn node_not_running_is_a_one_line_error() {
    // A port that was free a moment ago: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cli = Cli {
        api: format!("http://127.0.0.1:{port}"),
        token: None,
    };
    for args in [&["status"][..], &["doc", "list"], &["doc", "get", "a"]] {
        let err = cli.fails(args);
        assert!(err.contains("cannot reach a mergeflow node"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workflow_and_runs_commands() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("data").join("workflows");
    std::fs::create_dir_all(&defs).unwrap();
    let good = "name = \"double\"\n[on]\ndoc = \"n/*\"\n[[steps]]\nid = \"x2\"\nkind = \"derive\"\nset = { \"/twice\" = \"doc.v * 2\" }\n";
    let bad = "name = \"bad\"\n[on]\ndoc = \"n/*\"\n[[steps]]\nid = \"s\"\nkind = \"derive\"\nset = { \"/y\" = \"doc.v *\" }\n";
    std::fs::write(defs.join("double.toml"), good).unwrap();
    std::fs::write(dir.path().join("bad.toml"), bad).unwrap();
    let node = start_node(dir.path()).await;
    let cli = Cli {
        api: node.api_addr().unwrap().to_string(),
        token: None,
    };

    // validate works on a file, without asking the node.
    let out = cli.ok(&[
        "workflow",
        "validate",
        defs.join("double.toml").to_str().unwrap(),
    ]);
    assert!(out.contains("workflow \"double\" is valid"), "{out}");
    let err = cli.fails(&[
        "workflow",
        "validate",
        dir.path().join("bad.toml").to_str().unwrap(),
    ]);
    assert!(
        err.contains("bad.toml") && err.contains("step \"s\": set \"/y\""),
        "{err}"
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let list = cli.json(&["workflow", "list"]);
        if list.as_array().unwrap().len() == 1 {
            assert_eq!(list[0]["name"], "double");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "workflow not loaded");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Run updates appear on /v1/events as `event: run`.
    let mut events = reqwest::Client::new()
        .get(format!("http://{}/v1/events?doc=n/*", cli.api))
        .send()
        .await
        .unwrap();
    cli.ok(&["doc", "patch", "n/1", "{\"v\": 21}"]);
    let mut seen = String::new();
    while !seen.contains("event: run") || !seen.contains("\"status\":\"done\"") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), events.chunk())
            .await
            .expect("run events in time")
            .unwrap()
            .expect("stream open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("\"workflow\":\"double\""), "{seen}");
    let run = loop {
        let runs = cli.json(&["runs", "--workflow", "double", "--status", "done"]);
        if let Some(r) = runs.as_array().unwrap().first() {
            break r.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no run");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(
        cli.json(&["doc", "get", "n/1"]),
        json!({"v": 21, "twice": 42})
    );
    let id = run["id"].to_string();
    let shown = cli.json(&["runs", "show", &id]);
    assert_eq!(shown["steps"][0]["state"], "done");
    assert_eq!(shown["steps"][0]["output"]["wrote"], json!(["/twice"]));
    let summary = cli.ok(&["runs", "show", &id]);
    assert!(
        summary.starts_with(&format!("run {id}: done of workflow double on doc n/1")),
        "{summary}"
    );
    assert!(
        summary.contains("steps:\n  x2") && summary.contains("1 attempt"),
        "{summary}"
    );
    let table = cli.ok(&["runs"]);
    assert!(table.contains("double") && table.contains("n/1"), "{table}");
    let err = cli.fails(&["runs", "retry", &id]);
    assert!(err.contains("only a dead run"), "{err}");
    let err = cli.fails(&["runs", "--status", "sideways"]);
    assert!(err.contains("status \"sideways\""), "{err}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_sends_the_api_token_from_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let token = "cli-token-0123456789";
    let node = common::api_node(dir.path(), |c| c.api.token = token.into()).await;
    let api = format!("http://{}", node.api_addr().unwrap());
    let without = Cli {
        api: api.clone(),
        token: None,
    };
    let err = without.fails(&["status"]);
    assert!(err.contains("token"), "{err}");
    let with = Cli {
        api,
        token: Some(token.into()),
    };
    with.ok(&["doc", "patch", "a/b", r#"{"x": 1}"#]);
    assert_eq!(with.json(&["doc", "get", "a/b"]), json!({"x": 1}));
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_restore_export_and_import_commands() {
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(&dir.path().join("a")).await;
    let b = start_node(&dir.path().join("b")).await;
    for i in 0..20 {
        a.doc(&format!("d/{i}"))
            .unwrap()
            .patch(json!({ "i": i }))
            .await
            .unwrap();
    }
    let cli_a = Cli {
        api: a.api_addr().unwrap().to_string(),
        token: None,
    };
    let cli_b = Cli {
        api: b.api_addr().unwrap().to_string(),
        token: None,
    };
    let (file, cut, stopped) = (
        dir.path().join("a.mfbackup"),
        dir.path().join("cut.mfbackup"),
        dir.path().join("stopped"),
    );
    let (f, c, s) = (file.clone(), cut.clone(), stopped.clone());
    let (b_dir, dir_path) = (dir.path().join("b/data"), dir.path().to_path_buf());
    tokio::task::spawn_blocking(move || {
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let out = cli_a.ok(&["backup", "--to", &path(&f)]);
        assert!(out.starts_with("backup of 20 docs (0 deleted)"), "{out}");
        assert!(!backup_partial(&f).exists());
        // Into a running node, through its API.
        let report = cli_b.json(&["restore", &path(&f)]);
        assert_eq!(
            (report["docs"].clone(), report["changed"].clone()),
            (json!(20), json!(20))
        );
        assert_eq!(cli_b.json(&["doc", "get", "d/7"]), json!({"i": 7}));
        // The spool went with the restore, and so did its directory.
        assert!(
            !b_dir.join("restore-tmp").exists(),
            "restore-tmp left behind"
        );
        // --api names a running node, --data-dir a stopped one: both at
        // once is refused, and nothing is restored anywhere.
        let mixed = dir_path.join("mixed");
        let err = cli_b.fails(&[
            "restore",
            &path(&f),
            "--api",
            &cli_b.api,
            "--data-dir",
            &path(&mixed),
        ]);
        assert!(err.contains("--api") && err.contains("--data-dir"), "{err}");
        assert!(!mixed.exists(), "a data dir was created: {err}");
        let cfg = dir_path.join("mixed.toml");
        std::fs::write(&cfg, format!("[node]\ndata_dir = {:?}\n", path(&mixed))).unwrap();
        let err = cli_b.fails(&[
            "restore",
            &path(&f),
            "--config",
            &path(&cfg),
            "--api",
            &cli_b.api,
        ]);
        assert!(err.contains("--api") && err.contains("--config"), "{err}");
        assert!(!mixed.exists(), "a data dir was created: {err}");
        // Into a stopped node's data dir.
        let out = cli_b.ok(&["restore", &path(&f), "--data-dir", &path(&s)]);
        assert!(out.contains("20 changed"), "{out}");
        // A damaged file is refused before anything is sent.
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&c, &bytes[..bytes.len() - 10]).unwrap();
        let err = cli_b.fails(&["restore", &path(&c)]);
        assert!(err.contains("truncated"), "{err}");

        // One doc: JSON out and in (the target doc ends equal to the file),
        // Automerge bytes out and merged in elsewhere.
        let json_file = path(&f.with_extension("json"));
        cli_a.ok(&["export", "d/3", "--to", &json_file]);
        std::fs::write(&json_file, r#"{"i": 33, "note": null}"#).unwrap();
        assert!(
            cli_a
                .ok(&["import", "d/3", &json_file])
                .contains("imported")
        );
        assert_eq!(
            cli_a.json(&["doc", "get", "d/3"]),
            json!({"i": 33, "note": null})
        );
        let am_file = path(&f.with_extension("automerge"));
        cli_a.ok(&["export", "d/3", "--to", &am_file]);
        assert!(cli_b.ok(&["import", "d/3", &am_file]).contains("imported"));
        assert_eq!(
            cli_b.json(&["doc", "get", "d/3"]),
            json!({"i": 33, "note": null})
        );
        let err = cli_b.fails(&["import", "x", &path(&f)]);
        assert!(err.contains("does not load"), "{err}");
    })
    .await
    .unwrap();
    // The stopped node's data dir holds the docs.
    let stopped = mergeflow::Node::builder()
        .data_dir(&stopped)
        .start()
        .await
        .unwrap();
    assert_eq!(stopped.docs().count(), 20);
    stopped.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

fn backup_partial(path: &std::path::Path) -> std::path::PathBuf {
    mergeflow::backup::partial_path(path)
}

fn fast_anti_entropy(c: &mut mergeflow::config::Config) {
    c.net.anti_entropy_ms = 500;
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_synced_follows_a_new_nodes_initial_sync() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_api_node(&dir.path().join("a"), vec![], fast_anti_entropy).await;
    for i in 0..200 {
        a.doc(&format!("d/{i}"))
            .unwrap()
            .patch(json!({ "i": i }))
            .await
            .unwrap();
    }
    let alone = Cli {
        api: a.api_addr().unwrap().to_string(),
        token: None,
    };
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_api_node(&dir.path().join("b"), vec![a_addr], fast_anti_entropy).await;
    let cli = Cli {
        api: b.api_addr().unwrap().to_string(),
        token: None,
    };
    let b_docs = tokio::task::spawn_blocking(move || {
        let out = cli.ok(&["wait-synced", "--timeout", "120"]);
        assert!(out.starts_with("in sync with 1 peers"), "{out}");
        assert!(cli.ok(&["status"]).contains("lacking   0"));
        cli.json(&["status"])["docs"].as_u64().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(b_docs, a.docs().count());
    b.shutdown().await.unwrap();
    // Without peers it never is: a one-line error after the timeout.
    tokio::task::spawn_blocking(move || {
        let err = alone.fails(&["wait-synced", "--timeout", "1"]);
        assert!(err.contains("not in sync after 1s"), "{err}");
    })
    .await
    .unwrap();
    a.shutdown().await.unwrap();
}

/// A token HTTP cannot carry as given (16 spaces pass the length check;
/// header whitespace is trimmed, so no client could ever match it) stops the
/// node at start with an error naming `api.token`.
#[test]
fn a_token_no_client_can_send_is_refused_at_start() {
    for (token, why) in [
        ("                ", "whitespace"),
        (" 0123456789abcdef", "whitespace"),
        ("0123456789abcdef\t", "whitespace"),
        ("0123456789abcdéf", "printable ASCII"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (code, err) =
            common::NodeProc::try_start_env(dir.path(), &[], &[("MERGEFLOW_API_TOKEN", token)])
                .err()
                .unwrap_or_else(|| panic!("the node started with token {token:?}"));
        assert_ne!(code, Some(0));
        assert!(
            err.contains("api.token") && err.contains(why),
            "{token:?}: {err}"
        );
    }
}

/// `mergeflow token hash` prints what `token_sha256` wants, from an
/// argument or standard input; `token new` a token and its hash.
#[test]
fn token_hash_and_new() {
    let sha_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let out = Command::new(bin())
        .args(["token", "hash", "abc"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sha_abc);
    let mut child = Command::new(bin())
        .args(["token", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sha_abc);
    let out = Command::new(bin()).args(["token", "new"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[1], mergeflow::access::token_sha256(lines[0]));
}

/// Closed by default: a p2p listen address other machines can reach, with
/// no `net.key`, stops the node at start with one line naming `net.key` and
/// `net.open`; `net.open = true` runs it, with a warning. (0.0.0.0 only
/// binds: no mDNS and no peers, so nothing leaves this machine.)
#[test]
fn an_open_network_on_a_reachable_address_needs_net_open() {
    let dir = tempfile::tempdir().unwrap();
    let reachable = ["--listen", "/ip4/0.0.0.0/tcp/0"];
    let (code, err) = common::NodeProc::try_start(dir.path(), &reachable)
        .err()
        .expect("the node started on 0.0.0.0 without net.key");
    assert_ne!(code, Some(0));
    let line = err
        .lines()
        .find(|l| l.contains("net.key"))
        .unwrap_or_else(|| panic!("no line names net.key: {err}"));
    assert!(
        line.contains("net.open") && line.contains("0.0.0.0"),
        "{line}"
    );
    // Nothing was created: the refusal came before the store opened.
    assert!(!dir.path().join("FORMAT").exists());

    let node =
        common::NodeProc::try_start_env(dir.path(), &reachable, &[("MERGEFLOW_NET_OPEN", "true")])
            .unwrap_or_else(|(code, err)| panic!("net.open = true: exit {code:?}: {err}"));
    let warned = node
        .stderr
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a warning on stderr");
    assert!(warned.contains("net.open = true"), "{warned}");
    assert_eq!(node.terminate(), Some(0));

    // With a key it starts without a word about it.
    let key = mergeflow::generate_key();
    let node =
        common::NodeProc::try_start_env(dir.path(), &reachable, &[("MERGEFLOW_NET_KEY", &key)])
            .unwrap_or_else(|(code, err)| panic!("net.key set: exit {code:?}: {err}"));
    assert_eq!(node.terminate(), Some(0));
}

/// Two nodes already in sync: `wait-synced` asks the peer for its digest at
/// once instead of waiting for the next anti-entropy round, here an hour
/// away, so it can only return through that ask.
#[tokio::test(flavor = "multi_thread")]
async fn wait_synced_asks_peers_at_once() {
    let hourly = |c: &mut mergeflow::config::Config| c.net.anti_entropy_ms = 3_600_000;
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_api_node(&dir.path().join("a"), vec![], hourly).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_api_node(&dir.path().join("b"), vec![a_addr], hourly).await;
    a.doc("x").unwrap().patch(json!({"v": 1})).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while b.docs().count() < 1 {
        assert!(std::time::Instant::now() < deadline, "b never got the doc");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let cli = Cli {
        api: b.api_addr().unwrap().to_string(),
        token: None,
    };
    tokio::task::spawn_blocking(move || {
        let out = cli.ok(&["wait-synced", "--timeout", "60"]);
        eprintln!("{out}");
        assert!(out.starts_with("in sync with 1 peers"), "{out}");
    })
    .await
    .unwrap();
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_light_mode_and_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let token = "status-test-token-0123";
    let node = common::api_node(dir.path(), |c| {
        let data = c.node.data_dir.clone();
        *c = mergeflow::config::Config::light();
        c.node.data_dir = data;
        c.api.token = token.to_string();
        c.net.anti_entropy_ms = 45_000;
    })
    .await;
    let cli = Cli {
        api: node.api_addr().unwrap().to_string(),
        token: Some(token.to_string()),
    };
    tokio::task::spawn_blocking(move || {
        let text = cli.ok(&["status"]);
        assert!(text.contains("\nlight     on\n"), "{text}");
        assert!(text.contains("\nconfig    effective"), "{text}");
        for line in [
            "  [net]",
            "  anti_entropy_ms = 45000",
            "  light = true",
            "  dashboard = false",
            "  token = \"(set)\"",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
        assert!(!text.contains(token), "the token is shown:\n{text}");
        // Scripts find the p2p address with awk '/^listen/': config keys
        // named listen are indented.
        // (This node runs without the network: no listen line of its own.)
        assert!(
            text.lines()
                .filter(|l| l.starts_with("listen"))
                .all(|l| l.starts_with("listen    /")),
            "{text}"
        );
        assert!(text.contains("\n  listen = "), "{text}");

        let json = cli.json(&["status"]);
        assert_eq!(json["light"], json!(true));
        assert_eq!(json["config"]["net"]["anti_entropy_ms"], json!(45_000));
        assert_eq!(json["config"]["api"]["token"], json!("(set)"));
        assert_eq!(json["config"]["store"]["cache_docs"], json!(128));
        assert!(!json.to_string().contains(token));

        // A reader that stops early (`| grep -q`, `| awk '... exit'`) is
        // not an error: no panic, exit 0, text or JSON.
        for json in [false, true] {
            let mut child = Command::new(bin())
                .args(["status", "--api", &cli.api])
                .args(json.then_some("--json"))
                .env("MERGEFLOW_API_TOKEN", token)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "json {json}: {:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    })
    .await
    .unwrap();
    node.shutdown().await.unwrap();
}

/// Issue 18 items 15 and 17: `workflow delete` removes an applied
/// workflow on every node (two connected nodes); `validate` says that
/// `apply` refuses `exec` steps.
#[tokio::test(flavor = "multi_thread")]
async fn workflow_delete_removes_an_applied_workflow_on_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_api_node(&dir.path().join("a"), vec![], |_| {}).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_api_node(&dir.path().join("b"), vec![a_addr], |_| {}).await;
    let cli = |n: &Node| Cli {
        api: n.api_addr().unwrap().to_string(),
        token: None,
    };
    let (on_a, on_b) = (cli(&a), cli(&b));
    let def = dir.path().join("double.toml");
    std::fs::write(
        &def,
        "name = \"double\"\n[on]\ndoc = \"n/*\"\n[[steps]]\nid = \"x2\"\nkind = \"derive\"\nset = { \"/twice\" = \"doc.v * 2\" }\n",
    )
    .unwrap();
    on_a.ok(&["workflow", "apply", def.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let names = |c: &Cli| -> Vec<String> {
        c.json(&["workflow", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect()
    };
    while names(&on_b) != ["double"] {
        assert!(std::time::Instant::now() < deadline, "b never ran it");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // Deleted on b, gone from both.
    let out = on_b.ok(&["workflow", "delete", "double"]);
    assert!(out.contains("deleted workflow \"double\""), "{out}");
    while !names(&on_a).is_empty() || !names(&on_b).is_empty() {
        assert!(std::time::Instant::now() < deadline, "still listed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Nothing runs it any more: a write on b reaches a, derived nowhere.
    on_b.ok(&["doc", "patch", "n/1", "{\"v\": 21}"]);
    while on_a.run(&["doc", "get", "n/1"]).status.code() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never reached a"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for c in [&on_a, &on_b] {
        assert_eq!(c.json(&["doc", "get", "n/1"]), json!({"v": 21}));
    }
    let err = on_a.fails(&["workflow", "delete", "double"]);
    assert!(err.contains("no workflow named \"double\""), "{err}");
    // The name can be applied again.
    on_a.ok(&["workflow", "apply", def.to_str().unwrap()]);
    while names(&on_b) != ["double"] {
        assert!(std::time::Instant::now() < deadline, "b never ran it again");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // validate, without a node: valid, but apply will refuse it.
    let exec = dir.path().join("cmd.toml");
    std::fs::write(
        &exec,
        "name = \"cmd\"\n[on]\ndoc = \"d/*\"\n[[steps]]\nid = \"s\"\nkind = \"exec\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let out = on_a.ok(&["workflow", "validate", exec.to_str().unwrap()]);
    assert!(
        out.contains("is valid") && out.contains("workflow.allow_applied_exec"),
        "{out}"
    );
    let err = on_a.fails(&["workflow", "apply", exec.to_str().unwrap()]);
    assert!(err.contains("workflow.allow_applied_exec"), "{err}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// `mergeflow events` prints the change feed as JSON lines, filtered by
/// `--doc`; `doc patch` and `doc ops` take `--idempotency-key`,
/// `--replicas` and `--timeout-ms`; development commands stay out of the
/// help but still run.
#[tokio::test(flavor = "multi_thread")]
async fn events_write_flags_and_a_help_without_development_commands() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let api = node.api_addr().unwrap().to_string();
    let cli = Cli {
        api: api.clone(),
        token: None,
    };
    let mut events = Command::new(bin())
        .args(["events", "--doc", "sensors/**", "--api", &api])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = events.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let seen = tokio::task::spawn_blocking(move || {
        // Write until the subscriber (started concurrently) sees a change.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut n = 0;
        loop {
            n += 1;
            cli.ok(&["doc", "patch", "other/b", &format!("{{\"n\": {n}}}")]);
            cli.ok(&["doc", "patch", "sensors/a", &format!("{{\"n\": {n}}}")]);
            if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
                break (cli, line);
            }
            assert!(std::time::Instant::now() < deadline, "no event line");
        }
    })
    .await
    .unwrap();
    let (cli, line) = seen;
    let _ = events.kill();
    let _ = events.wait();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["event"], "change", "{event}");
    assert_eq!(
        event["data"]["doc"], "sensors/a",
        "only docs matching --doc"
    );
    assert!(event["id"].is_string(), "{event}");

    tokio::task::spawn_blocking(move || {
        let patch = [
            "doc",
            "patch",
            "k/1",
            r#"{"a": 1}"#,
            "--idempotency-key",
            "once",
        ];
        assert!(cli.ok(&patch).starts_with("patched k/1"));
        assert!(
            cli.ok(&patch).starts_with("unchanged k/1"),
            "a retry is applied once"
        );
        let ops = r#"[{"op": "increment", "path": "/n"}]"#;
        let err = cli.fails(&[
            "doc",
            "ops",
            "k/1",
            ops,
            "--replicas",
            "1",
            "--timeout-ms",
            "100",
        ]);
        assert!(
            err.contains("replicas"),
            "a lone node has no replica: {err}"
        );
        let help = cli.ok(&["--help"]);
        assert!(
            help.contains("events") && help.contains("wait-synced"),
            "{help}"
        );
        // The campaign and the load generator are `mergeflow-tools`
        // (tools/mergeflow-tools/tests/cli.rs checks its `bench --help`).
        assert!(!help.contains("chaos") && !help.contains("bench"), "{help}");
    })
    .await
    .unwrap();
    node.shutdown().await.unwrap();
}

/// `mergeflow access check` takes a valid file (exit 0) and warns about a
/// grant that lets nodes write docs it does not let them read (they could
/// write none of them: a node holds only docs it may read).
#[test]
fn access_check_warns_about_a_write_glob_without_its_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.toml");
    std::fs::write(
        &file,
        "[[grant]]\nlabels = { role = \"sensor\" }\nwrite = [\"sensors/{peer}/**\"]\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["access", "check", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    assert!(
        stderr.contains("warning:") && stderr.contains("sensors/{peer}/**"),
        "{stderr}"
    );
}

/// Lines of a child's stdout on a channel, read by a thread that drops the
/// pipe (closing it) after `keep` lines.
fn stdout_lines(child: &mut std::process::Child, keep: usize) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let lines = std::io::BufReader::new(stdout).lines();
        for line in lines.map_while(Result::ok).take(keep) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The next line as JSON, within a generous deadline.
fn next_json(rx: &std::sync::mpsc::Receiver<String>) -> Value {
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a line in time");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// Waits (generously) for `child` to exit; its status.
fn exits(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `mergeflow events --include doc` prints each change with the doc as it
/// was right after it, follows the node across a restart (reconnecting by
/// itself, with a `missed` line for the new boot), and exits 0 when its
/// stdout closes (`| head -4`) and on Ctrl-C.
#[tokio::test(flavor = "multi_thread")]
async fn events_include_the_doc_and_follow_the_node_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let addr = node.api_addr().unwrap();
    let api = format!("http://{addr}");
    let doc = node.doc("cli/a").unwrap();
    doc.patch(json!({"n": 1})).await.unwrap();
    doc.patch(json!({"n": 2, "tags": ["x"]})).await.unwrap();
    node.doc("other/b")
        .unwrap()
        .patch(json!({"n": 0}))
        .await
        .unwrap();
    // From the boot's first event: the changes so far, then live ones.
    let from_start = format!("{}-0", node.status().await.boot);
    let args = [
        "events",
        "--include",
        "doc",
        "--doc",
        "cli/*",
        "--after",
        &from_start,
        "--api",
        &api,
    ];
    let mut events = Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = stdout_lines(&mut events, 4);
    let first = next_json(&lines);
    assert_eq!(first["event"], "change", "{first}");
    assert!(first["id"].is_string());
    assert_eq!(first["data"]["id"], first["id"]);
    assert_eq!(first["data"]["doc"], "cli/a");
    assert_eq!(first["data"]["value"], json!({"n": 1}), "at its change");
    assert_eq!(first["data"]["read_at"], "heads");
    let second = next_json(&lines);
    assert_eq!(second["data"]["value"], json!({"n": 2, "tags": ["x"]}));

    // The node restarts on the same address: the command reconnects with
    // the last id it printed, which is from the old boot, so it is told
    // that it missed events; then it follows the new boot.
    node.shutdown().await.unwrap();
    drop((doc, node)); // the last handles close the data dir
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.path().join("data");
    let node = Node::builder()
        .config(config)
        .api(addr)
        .start()
        .await
        .unwrap();
    let missed = next_json(&lines);
    assert_eq!(missed["event"], "missed", "{missed}");
    assert_eq!(missed["id"], Value::Null);
    // The `missed` line comes from the new subscription: a write now is live.
    node.doc("cli/a")
        .unwrap()
        .patch(json!({"n": 3}))
        .await
        .unwrap();
    let third = next_json(&lines);
    assert_eq!(third["data"]["value"], json!({"n": 3, "tags": ["x"]}));
    // The reader took its 4 lines and closed the pipe: the command ends
    // at once, without waiting for another event to fail to print.
    assert!(exits(&mut events).success());

    // Ctrl-C ends it cleanly too (once it runs: it printed a line).
    let mut events = Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = stdout_lines(&mut events, usize::MAX);
    let _ = next_json(&lines);
    let int = Command::new("kill")
        .args(["-INT", &events.id().to_string()])
        .status()
        .unwrap();
    assert!(int.success());
    assert!(exits(&mut events).success());

    // A refusal (a bad glob) is an error at once, not a retry.
    let cli = Cli { api, token: None };
    let err = tokio::task::spawn_blocking(move || cli.fails(&["events", "--doc", "["]))
        .await
        .unwrap();
    assert!(err.contains("glob"), "{err}");
    node.shutdown().await.unwrap();
}
