//! What README.md and ARCHITECTURE.md tell a new user, checked where a test
//! can (issue 18 item 20):
//!
//! - links stay inside the repository (relative links to files that exist,
//!   anchors to headings that exist) or on loopback: the docs work from a
//!   fresh clone on a machine with no network, and name nothing outside it;
//! - the install facts match Cargo.toml (`rust-version`, `cargo install`);
//! - curl's `--json` comes with the curl version it needs;
//! - every `--peer` example can be pasted as is, and the form it uses (an
//!   address without `/p2p/<id>`) connects.

mod common;

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The docs under test.
const DOCS: [&str; 2] = ["README.md", "ARCHITECTURE.md"];

/// Markdown link targets: `[text](target)`, `![alt](target)`, `<scheme://x>`.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("](") {
        let rest = &text[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].trim().to_string());
        }
    }
    for (i, _) in text.match_indices('<') {
        let rest = &text[i + 1..];
        if let Some(end) = rest.find('>') {
            let inner = &rest[..end];
            if inner.contains("://") && !inner.contains(' ') {
                out.push(inner.to_string());
            }
        }
    }
    out
}

/// Every `http://` or `https://` URL in the text, links or not (code too).
fn urls(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for scheme in ["http://", "https://"] {
        for (i, _) in text.match_indices(scheme) {
            let url: String = text[i..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !"`)\"'<>]".contains(*c))
                .collect();
            out.push(url);
        }
    }
    out
}

/// The host of `scheme://host[:port]/...`; empty when there is none.
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation
/// other than `-` and `_` dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// `path` (relative to `dir`, in the repo) normalised, or None if it leaves
/// the repo.
fn inside_repo(dir: &Path, path: &str) -> Option<PathBuf> {
    if path.starts_with('/') {
        return None;
    }
    let mut out = dir.to_path_buf();
    for c in Path::new(path).components() {
        match c {
            Component::ParentDir => {
                if out.as_os_str().is_empty() {
                    return None;
                }
                out.pop();
            }
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Problems with one doc's links and references.
fn link_problems(name: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let dir = Path::new(name)
        .parent()
        .unwrap_or(Path::new(""))
        .to_path_buf();
    for target in link_targets(text) {
        if target.contains("://") || target.starts_with("mailto:") {
            if !(target.starts_with("http://") || target.starts_with("https://"))
                || !is_loopback(host(&target))
            {
                problems.push(format!("{name}: link outside the repo: {target}"));
            }
            continue;
        }
        let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
        let file = if path.is_empty() {
            Some(PathBuf::from(name))
        } else {
            inside_repo(&dir, path)
        };
        let Some(file) = file else {
            problems.push(format!("{name}: link leaves the repo: {target}"));
            continue;
        };
        let full = root().join(&file);
        if !full.exists() {
            problems.push(format!("{name}: link to a missing file: {target}"));
            continue;
        }
        if !anchor.is_empty() && file.extension().is_some_and(|x| x == "md") {
            let text = std::fs::read_to_string(&full).unwrap();
            if !anchors(&text).iter().any(|a| a == anchor) {
                problems.push(format!("{name}: no heading for the anchor {target}"));
            }
        }
    }
    for url in urls(text) {
        let h = host(&url);
        if !h.is_empty() && !is_loopback(h) {
            problems.push(format!("{name}: a URL outside this machine: {url}"));
        }
    }
    // Paths that climb out of the repo (`../shared/x`), links or not;
    // `.../disable` (an elision) is not one.
    for (i, _) in text.match_indices("../") {
        let before = text[..i].chars().next_back();
        if !before.is_some_and(|c| c == '.' || c.is_alphanumeric()) {
            let rest: String = text[i..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '`')
                .collect();
            if inside_repo(&dir, &rest).is_none() {
                problems.push(format!("{name}: a path outside the repo: {rest}"));
            }
        }
    }
    problems
}

#[test]
fn readme_and_architecture_link_only_inside_the_repo_or_to_loopback() {
    let mut problems = Vec::new();
    for name in DOCS {
        problems.extend(link_problems(name, &read(name)));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_link_check_finds_what_it_is_for() {
    let bad = "see [automerge](https://automerge.org), <https://example.com/x>, \
               `../shared/DESIGN.md`, [gone](docs/nothing.md), [a](#no-such-heading)\n\
               fetch http://10.0.0.1:7700/v1 or http://evil.example\n";
    let problems = link_problems("README.md", bad);
    for want in [
        "https://automerge.org",
        "https://example.com/x",
        "../shared/DESIGN.md",
        "docs/nothing.md",
        "#no-such-heading",
        "http://10.0.0.1:7700/v1",
        "http://evil.example",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{want} not found in {problems:?}"
        );
    }
    let good = "[cfg](config.example.toml) [w](#workflows) [b](BENCHMARKS.md#machine) \
                http://127.0.0.1:7700/ http://localhost:5173 http://[::1]:80/ `http://` only, \
                `POST .../disable`\n";
    assert_eq!(link_problems("README.md", good), Vec::<String>::new());
    assert_eq!(
        slug(" Power-loss durability (`store.fsync`)"),
        "power-loss-durability-storefsync"
    );
    assert_eq!(host("http://user@[::1]:80/x"), "::1");
}

#[test]
fn install_facts_match_cargo_toml() {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("Rust {msrv} or newer")),
        "README must state the minimum Rust version, {msrv}"
    );
    assert!(readme.contains("cargo install --locked --path ."));
    for (target, package) in [
        ("aarch64-unknown-linux-gnu", "gcc-aarch64-linux-gnu"),
        ("armv7-unknown-linux-gnueabihf", "gcc-arm-linux-gnueabihf"),
    ] {
        assert!(
            readme.contains(target) && readme.contains(package),
            "{target}"
        );
    }
    for file in ["deploy/mergeflow.service", "deploy/Containerfile"] {
        assert!(
            readme.contains(&format!("]({file})")),
            "README links {file}"
        );
    }
}

#[test]
fn curl_json_examples_say_which_curl_they_need() {
    let readme = read("README.md");
    let uses_json = readme
        .lines()
        .any(|l| l.contains("curl ") && l.contains(" --json "));
    if uses_json {
        assert!(
            readme.contains("curl 7.82 or newer")
                && readme.contains("-H 'content-type: application/json' -d"),
            "curl --json needs curl 7.82; say so and give the older form"
        );
    }
}

/// The argument after every `--peer` in the README.
fn peer_examples(readme: &str) -> Vec<String> {
    readme
        .split("--peer")
        .skip(1)
        .filter_map(|rest| {
            let arg = rest.strip_prefix(' ')?.split_whitespace().next()?;
            // `--peer`, `--peer,` in prose: not an example.
            arg.starts_with('/')
                .then(|| arg.trim_end_matches([')', '`', ',']).to_string())
        })
        .collect()
}

#[test]
fn peer_examples_can_be_pasted_as_is() {
    let examples = peer_examples(&read("README.md"));
    assert!(!examples.is_empty(), "the README shows no --peer example");
    for arg in &examples {
        assert!(
            !arg.contains("...") && !arg.contains('<'),
            "--peer {arg} holds a placeholder"
        );
        mergeflow::testing::net::parse_addrs("net.peers", std::slice::from_ref(arg))
            .unwrap_or_else(|e| panic!("--peer {arg}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_given_without_its_id_connects() {
    // The README's form: /ip4/<addr>/tcp/<port>, no /p2p/<peer id>.
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_node(&dir.path().join("a"), vec![], |_| {}).await;
    let full = common::listen_addr(&a).await;
    let bare = full.split("/p2p/").next().unwrap().to_string();
    assert!(bare.starts_with("/ip4/127.0.0.1/tcp/"), "{full}");
    let b = common::p2p_node(&dir.path().join("b"), vec![bare.clone()], |_| {}).await;
    let a_id = a.peer_id().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b.peers().iter().any(|p| p.peer_id == a_id && p.connected) {
        assert!(Instant::now() < deadline, "b never connected to {bare}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
