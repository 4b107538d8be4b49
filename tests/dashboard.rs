//! The web dashboard (issue 18 item 19): what the page is built from, the
//! endpoints it pages through, and what `/` says when the dashboard is off.
//! `scripts/dashboard-check.sh` drives the page itself in Chromium.

mod common;

use common::until;

use mergeflow::Node;
use serde_json::{Value, json};

fn base(node: &Node) -> String {
    format!("http://{}", node.api_addr().unwrap())
}

/// The exact policy the page is served with; the off page has it too.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self'; form-action 'none'; frame-ancestors 'none'";

/// The page has a container for each plot, the paged lists, the dead runs
/// and the error banner; it reads the endpoints those need (docs by prefix
/// and cursor, runs by cursor, dead runs, peers' membership docs for their
/// labels) and names no other origin; its CSP is unchanged.
#[tokio::test]
async fn the_page_has_its_plots_paged_lists_and_dead_runs_and_loads_nothing_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::api_node(dir.path(), |_| {}).await;
    let resp = reqwest::get(format!("{}/", base(&node))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-security-policy"], CSP);
    let page = resp.text().await.unwrap();
    for (needle, what) in [
        ("id=\"plot-rate\"", "the write and merge rate plot"),
        ("id=\"plot-lag\"", "the sync lag per peer plot"),
        ("id=\"plot-runs\"", "the run outcomes plot"),
        ("/v1/status/history", "the node's samples of the last hour"),
        ("changes_local", "writes (local changes) for the rate"),
        ("changes_remote", "merges (remote changes) for the rate"),
        ("docs_syncing", "per-peer sync lag"),
        ("/v1/docs?", "the doc listing"),
        ("q.set(\"prefix\"", "the doc prefix filter"),
        ("q.set(\"after\"", "the doc cursor"),
        ("rel=\"next\"", "the Link header's next page"),
        ("id=\"docs-next\"", "a next page of docs"),
        ("/v1/runs?", "the run listing"),
        ("q.set(\"before\"", "the run cursor"),
        ("id=\"runs-older\"", "an older page of runs"),
        ("status=dead", "dead runs"),
        ("id=\"dead-runs\"", "the dead runs list"),
        ("_mergeflow/nodes/", "peer labels from membership docs"),
        ("p.addrs", "peer addresses"),
        ("delivered_by", "which node delivered an effect"),
        ("human(s.uptime_s)", "uptime in human units"),
        ("id=\"error\"", "the one error banner"),
        ("/v1/mqtt/dead", "the MQTT dead letters"),
        ("id=\"mqtt-bridges\"", "the MQTT bridges"),
        ("/v1/events", "live updates"),
        ("Authorization", "the token"),
    ] {
        assert!(page.contains(needle), "the page lacks {what} ({needle})");
    }
    // No outside requests; ids never break mid-word.
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("src=\""));
    assert!(!page.contains("overflow-wrap: anywhere") && !page.contains("break-all"));
    // Bounded: every listing the page makes names a limit.
    for call in page
        .match_indices("/v1/runs?")
        .map(|(i, _)| &page[i..i + 40])
    {
        assert!(call.contains("limit") || call.contains("\" + q"), "{call}");
    }
    node.shutdown().await.unwrap();
}

/// `/` with the dashboard off answers a short page that says why and how
/// to turn it on: in light mode, and with `api.dashboard = false`. Light
/// mode with `api.dashboard = true` serves the dashboard.
#[tokio::test]
async fn slash_says_the_dashboard_is_off_and_how_to_turn_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let light = common::api_node(&dir.path().join("light"), |c| {
        c.node.light = true;
        c.api.dashboard = false;
    })
    .await;
    let resp = reqwest::get(format!("{}/", base(&light))).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(resp.headers()["content-security-policy"], CSP);
    let text = resp.text().await.unwrap();
    for needle in [
        "dashboard is off in light mode",
        "dashboard = true",
        "[api]",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    // The API goes on.
    let status = reqwest::get(format!("{}/v1/status", base(&light)))
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    light.shutdown().await.unwrap();

    let off = common::api_node(&dir.path().join("off"), |c| c.api.dashboard = false).await;
    let resp = reqwest::get(format!("{}/", base(&off))).await.unwrap();
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("api.dashboard = false") && !text.contains("light mode"),
        "{text}"
    );
    off.shutdown().await.unwrap();

    let on = common::api_node(&dir.path().join("on"), |c| {
        c.node.light = true;
        c.api.dashboard = true;
    })
    .await;
    let resp = reqwest::get(format!("{}/", base(&on))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("id=\"plot-rate\""));
    on.shutdown().await.unwrap();
}

const STAMP: &str = r#"
name = "stamp"
[on]
doc = "notes/*"
path = "/text"

[[steps]]
id = "mark"
kind = "derive"
set = { "/seen" = "true" }
"#;

/// `GET /v1/runs?limit=N&before=ID` pages newest first: each full page
/// names the next in a `Link: rel="next"` header, the last page none, and
/// the pages together hold every run once.
#[tokio::test]
async fn runs_page_by_cursor_with_a_next_link() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::api_node(dir.path(), |_| {}).await;
    let http = reqwest::Client::new();
    let applied = http
        .post(format!("{}/v1/workflows", base(&node)))
        .header("content-type", "application/toml")
        .body(STAMP)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 200, "{}", applied.text().await.unwrap());
    for i in 0..5 {
        node.doc(&format!("notes/{i}"))
            .unwrap()
            .patch(json!({"text": format!("note {i}")}))
            .await
            .unwrap();
    }
    until("five done runs", || async {
        let runs = node.workflows().runs(Some("stamp"), None, 100).unwrap();
        (runs.len() == 5 && runs.iter().all(|r| !r.status.is_open())).then_some(())
    })
    .await;

    let mut url = format!("{}/v1/runs?workflow=stamp&limit=2", base(&node));
    let mut seen: Vec<u64> = vec![];
    let mut pages = 0;
    loop {
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let link = resp
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<Value> = resp.json().await.unwrap();
        pages += 1;
        seen.extend(page.iter().map(|r| r["id"].as_u64().unwrap()));
        let Some(link) = link else { break };
        let next = link
            .strip_prefix('<')
            .and_then(|l| l.split_once(">; rel=\"next\""))
            .map(|(u, _)| u.to_string())
            .unwrap_or_else(|| panic!("{link}"));
        assert!(
            next.contains("workflow=stamp") && next.contains("limit=2"),
            "{next}"
        );
        url = format!("{}{next}", base(&node));
        assert!(pages < 10, "pages do not end");
    }
    // 2 + 2 + 1: the last page is short and names no next one.
    assert_eq!(pages, 3);
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted, "newest first, each run once");
    assert_eq!(seen.len(), 5);

    // A cursor below every id is an empty page.
    let resp = http
        .get(format!("{}/v1/runs?before=1", base(&node)))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("link").is_none());
    assert_eq!(
        resp.json::<Vec<Value>>().await.unwrap(),
        Vec::<Value>::new()
    );
    node.shutdown().await.unwrap();
}

/// Peers are named by their labels: a node that runs workflows writes its
/// `node.labels` to its membership doc, which the dashboard reads for every
/// peer (and the node's own labels are in its status).
#[tokio::test]
async fn a_nodes_labels_are_in_its_status_and_its_membership_doc() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::api_node(dir.path(), |c| {
        c.node.labels.insert("name".into(), "greenhouse-gw".into());
        c.node.labels.insert("site".into(), "north".into());
    })
    .await;
    let b = base(&node);
    let applied = reqwest::Client::new()
        .post(format!("{b}/v1/workflows"))
        .header("content-type", "application/toml")
        .body(STAMP)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 200);
    let status: Value = reqwest::get(format!("{b}/v1/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["config"]["node"]["labels"]["name"], "greenhouse-gw");
    let peer = status["peer_id"].as_str().unwrap().to_string();
    let url = format!("{b}/v1/docs/_mergeflow%2Fnodes%2F{peer}?path=%2Flabels");
    let labels = until("the membership doc's labels", || async {
        let resp = reqwest::get(&url).await.unwrap();
        if resp.status() != 200 {
            return None;
        }
        Some(resp.json::<Value>().await.unwrap())
    })
    .await;
    assert_eq!(labels, json!({"name": "greenhouse-gw", "site": "north"}));
    node.shutdown().await.unwrap();
}

/// `GET /v1/status/history`: the node's samples of the last hour, oldest
/// first, the last taken for the request: changes made and merged, runs
/// done and dead, each peer's docs syncing. It needs the token like the
/// rest of the API, and answers (one sample) with the dashboard off too.
#[tokio::test]
async fn status_history_serves_the_samples_the_plots_start_from() {
    let dir = tempfile::tempdir().unwrap();
    let token = "history-token-0123456789";
    let node = common::api_node(&dir.path().join("on"), |c| c.api.token = token.into()).await;
    for i in 0..3 {
        node.doc(&format!("notes/{i}"))
            .unwrap()
            .patch(json!({"text": i}))
            .await
            .unwrap();
    }
    let http = reqwest::Client::new();
    let url = format!("{}/v1/status/history", base(&node));
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let body: Value = http
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["interval_ms"], 10_000);
    let samples = body["samples"].as_array().unwrap();
    // The one taken at start (the sampler's first tick may still be on
    // its way) and the one taken now.
    assert!(!samples.is_empty() && samples.len() <= 360, "{body}");
    let at: Vec<u64> = samples
        .iter()
        .map(|s| s["at_ms"].as_u64().unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    let last = samples.last().unwrap();
    assert!(last["changes_local"].as_u64().unwrap() >= 3, "{last}");
    for key in ["changes_remote", "runs_done", "runs_dead"] {
        assert!(last[key].is_u64(), "{key} in {last}");
    }
    assert_eq!(last["peers"], json!([]));
    node.shutdown().await.unwrap();

    let off = common::api_node(&dir.path().join("off"), |c| c.api.dashboard = false).await;
    let body: Value = reqwest::get(format!("{}/v1/status/history", base(&off)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["samples"].as_array().unwrap().len(), 1, "{body}");
    off.shutdown().await.unwrap();
}
