//! `deploy/`: the systemd unit and the container file are parsed (not run)
//! and checked against the binary and the config (issue 18 item 20).
//!
//! - `deploy/mergeflow.service`: `ExecStart` runs our binary's `start` with
//!   flags `mergeflow start` has; the config file it names is
//!   `deploy/mergeflow.toml`, which loads and validates once the env file
//!   gives it `MERGEFLOW_NET_KEY` (and is refused without), keeps its data in
//!   the unit's `StateDirectory`; the stop timeout outlasts the node's own.
//! - `deploy/Containerfile`: the image's entry point is `mergeflow start`;
//!   its environment is a config that validates once `MERGEFLOW_API_TOKEN`
//!   and `MERGEFLOW_NET_KEY` are given (and is refused without, as the file
//!   says); `EXPOSE` lists
//!   exactly the API port (the default, 7700) and the p2p TCP port of that
//!   config; the builder's Rust is at least `rust-version`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mergeflow::config::{Config, Overrides};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A systemd unit: section -> key -> values (keys may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line {}: keep entries on one line",
            i + 1
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            unit.entry(name.to_string()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", i + 1));
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("line {}: outside a section", i + 1));
        unit.get_mut(section)
            .unwrap()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    unit
}

fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    let values = unit
        .get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("[{section}] {key} missing"));
    assert_eq!(values.len(), 1, "[{section}] {key} given {values:?}");
    &values[0]
}

/// The long flags `mergeflow start` takes, from its help.
fn start_flags() -> BTreeSet<String> {
    let out = std::process::Command::new(common::bin())
        .args(["start", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect()
}

#[test]
fn the_systemd_unit_runs_mergeflow_start_on_a_config_that_loads() {
    let unit = parse_unit(&read("deploy/mergeflow.service"));
    assert!(unit.contains_key("Unit"));
    let exec: Vec<&str> = one(&unit, "Service", "ExecStart")
        .split_whitespace()
        .collect();
    assert!(
        exec[0].starts_with('/') && exec[0].ends_with("/mergeflow"),
        "ExecStart must name the binary by absolute path: {exec:?}"
    );
    assert_eq!(exec[1], "start", "{exec:?}");
    let flags = start_flags();
    let mut config_path = None;
    let mut args = exec[2..].iter();
    while let Some(a) = args.next() {
        assert!(
            flags.contains(*a),
            "`mergeflow start` has no {a} ({flags:?})"
        );
        if *a == "--config" {
            config_path = args.next().copied();
        }
    }
    // The config it names is the one shipped beside it.
    let config_path = Path::new(config_path.expect("ExecStart passes --config"));
    assert_eq!(config_path.file_name().unwrap(), "mergeflow.toml");
    // It listens for peers on 0.0.0.0, so it is refused until the env file
    // gives it a network key.
    let file = root().join("deploy/mergeflow.toml");
    let err = Config::load(Some(&file), Vec::new(), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("net.key"), "{err}");
    let key = vec![("MERGEFLOW_NET_KEY".to_string(), mergeflow::generate_key())];
    let config = Config::load(Some(&file), key, &Overrides::default()).unwrap();
    // The data lives in systemd's StateDirectory, the working directory.
    let state = one(&unit, "Service", "StateDirectory");
    let data = PathBuf::from(format!("/var/lib/{state}"));
    assert_eq!(config.node.data_dir, data);
    assert_eq!(Path::new(one(&unit, "Service", "WorkingDirectory")), data);
    // A stop is SIGTERM (a clean stop) and systemd waits longer than the node.
    assert_eq!(one(&unit, "Service", "KillSignal"), "SIGTERM");
    let stop: u64 = one(&unit, "Service", "TimeoutStopSec").parse().unwrap();
    assert!(
        stop * 1000 > config.perf.shutdown_timeout_ms + 5_000,
        "{stop}"
    );
    // Secrets come from an optional env file, not the config.
    assert!(one(&unit, "Service", "EnvironmentFile").starts_with("-/"));
    assert!(config.api.token.is_empty());
    assert!(!std::fs::read_to_string(&file).unwrap().contains("\nkey"));
    assert_eq!(one(&unit, "Service", "Restart"), "on-failure");
    assert_eq!(one(&unit, "Install", "WantedBy"), "multi-user.target");
    // Peers need a fixed port to dial.
    assert!(
        tcp_ports(&config).iter().all(|&p| p != 0) && !tcp_ports(&config).is_empty(),
        "{:?}",
        config.net.listen
    );
}

/// A container file's instructions, continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (cmd, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((cmd.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "a continuation runs off the end");
    out
}

/// `KEY=value KEY2='value 2'` as in a container file's ENV.
fn env_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        let mut value = String::new();
        let mut quote = None;
        while let Some(&c) = chars.peek() {
            match (quote, c) {
                (None, c) if c.is_whitespace() => break,
                (None, '\'' | '"') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                _ => value.push(c),
            }
            chars.next();
        }
        out.push((key, value));
    }
}

fn json_array(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not exec form {s:?}: {e}"))
}

fn tcp_ports(config: &Config) -> Vec<u16> {
    config
        .net
        .listen
        .iter()
        .filter_map(|a| {
            let mut parts = a.split('/');
            while let Some(p) = parts.next() {
                if p == "tcp" {
                    return parts.next()?.parse().ok();
                }
            }
            None
        })
        .collect()
}

/// `1.90` -> (1, 90).
fn version(s: &str) -> (u32, u32) {
    let mut it = s.split('.').map(|p| p.parse::<u32>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn the_container_file_exposes_the_ports_its_config_listens_on() {
    let all = instructions(&read("deploy/Containerfile"));
    let last_from = all.iter().rposition(|(c, _)| c == "FROM").unwrap();
    let (build, image) = all.split_at(last_from);
    let get = |cmd: &str| -> Vec<&str> {
        image
            .iter()
            .filter(|(c, _)| c == cmd)
            .map(|(_, r)| r.as_str())
            .collect()
    };

    // It runs `mergeflow start`, the binary the build stage compiled.
    let entry = json_array(get("ENTRYPOINT")[0]);
    let cmd = json_array(get("CMD")[0]);
    assert!(entry[0].ends_with("/mergeflow"), "{entry:?}");
    assert_eq!(cmd.first().map(String::as_str), Some("start"), "{cmd:?}");
    let copy = get("COPY");
    assert!(
        copy.iter().any(|c| c.starts_with("--from=build")
            && c.contains("target/release/mergeflow")
            && c.ends_with(&entry[0])),
        "{copy:?}"
    );
    assert!(
        build
            .iter()
            .any(|(c, r)| c == "RUN" && r.contains("cargo build --release --locked")),
        "{build:?}"
    );

    // Its environment is a config: refused without a token (the API listens
    // off loopback), valid with one.
    let env: Vec<(String, String)> = get("ENV").iter().flat_map(|e| env_pairs(e)).collect();
    let err = Config::load(None, env.clone(), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("api.token"), "{err}");
    let mut with_token = env.clone();
    with_token.push((
        "MERGEFLOW_API_TOKEN".into(),
        "a-token-of-24-characters".into(),
    ));
    // Peers reach it on 0.0.0.0: closed by default, so a network key too.
    let err = Config::load(None, with_token.clone(), &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("net.key"), "{err}");
    with_token.push(("MERGEFLOW_NET_KEY".into(), mergeflow::generate_key()));
    let config = Config::load(None, with_token, &Overrides::default()).unwrap();
    assert!(
        config.api.listen.ip().is_unspecified(),
        "{}",
        config.api.listen
    );
    assert_eq!(
        config.api.listen.port(),
        Config::default().api.listen.port(),
        "the image's API port is the default one"
    );
    let data = config.node.data_dir.to_str().unwrap().to_string();
    assert!(get("VOLUME").iter().any(|v| v.contains(&data)), "{data}");

    // EXPOSE: exactly the API port and the p2p TCP ports.
    let exposed: BTreeSet<u16> = get("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| {
            let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
            assert_eq!(proto, "tcp", "{p}");
            port.parse().unwrap()
        })
        .collect();
    let mut want: BTreeSet<u16> = tcp_ports(&config).into_iter().collect();
    want.insert(config.api.listen.port());
    assert!(!want.contains(&0), "{want:?}");
    assert_eq!(exposed, want);

    // The builder's Rust can build this crate.
    let from = &build[0].1;
    let tag = from
        .split_whitespace()
        .next()
        .and_then(|image| image.rsplit_once(':'))
        .map(|(_, tag)| tag)
        .unwrap();
    let rust = tag.split('-').next().unwrap();
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    assert!(
        version(rust) >= version(msrv),
        "{rust} < rust-version {msrv}"
    );

    // The build context leaves out the (large) target dirs.
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"), "{ignore}");
}

#[test]
fn the_parsers_read_what_they_are_given() {
    assert_eq!(
        env_pairs(r#"A=1 B='["x", "y"]'  C="two words""#),
        vec![
            ("A".into(), "1".into()),
            ("B".into(), r#"["x", "y"]"#.into()),
            ("C".into(), "two words".into())
        ]
    );
    let i = instructions("# c\nFROM a AS b\nRUN x \\\n    && y\n");
    assert_eq!(i[1], ("RUN".into(), "x  && y".into()));
    let u = parse_unit("[S]\nA=1\nA=2\n# x\n");
    assert_eq!(u["S"]["A"], vec!["1", "2"]);
}
