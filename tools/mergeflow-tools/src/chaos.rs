//! `mergeflow-tools chaos`: the workload, the effect receiver and the checker that
//! `scripts/chaos.sh` runs against a cluster while it injects faults
//! (partitions, packet loss, kill -9, SIGSTOP, a full disk).
//!
//! - [`workload`]: concurrent clients write unique keys (`c<client>-<seq>`)
//!   into docs `chaos/d<N>` through every node, and log each operation as
//!   `invoke`, then `ok` (acknowledged: 2xx), `fail` (certainly not applied:
//!   refused connection, 4xx) or `info` (unknown: timeout, reset, 5xx).
//! - [`receive`]: an HTTP receiver for the campaign's workflow effect; it logs
//!   every delivery with its `Idempotency-Key` and the run's heads, and
//!   answers 503 to a seeded share of them so that retries run.
//! - [`check`]: after the faults are healed, waits for the nodes to converge
//!   and reports acknowledged writes lost, nodes not at identical heads,
//!   seconds from heal to convergence, effects missing for a doc's final
//!   state, idempotency keys accepted twice, and panics in the node logs.
//!
//! It prints numbers and a verdict; it asserts nothing about timing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use mergeflow::client::{Client, encode_id};

use mergeflow::client::{http_client, root_cause};

/// The docs the workload writes: `chaos/d0` .. `chaos/d<docs-1>`.
pub const DOC_PREFIX: &str = "chaos/";
/// The workflow that sends every state of a chaos doc to the receiver.
pub const WORKFLOW: &str = "chaos-effect";

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What became of one operation, or that it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    /// Sent.
    Invoke,
    /// Acknowledged (2xx): durable on the node that answered.
    Ok,
    /// Certainly not applied (connection refused, 4xx).
    Fail,
    /// Unknown (timeout, connection lost after sending, 5xx).
    Info,
}

/// One line of the operation log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpRecord {
    /// Unix milliseconds.
    pub t_ms: u64,
    /// The client that ran it.
    pub process: usize,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: OpType,
    /// The node (1-based, the order of `--nodes`).
    pub node: usize,
    /// The doc written.
    pub doc: String,
    /// The unique key written.
    pub key: String,
    /// Why it failed, for `fail` and `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Appends JSON lines to a file, one `write` per line.
#[derive(Clone)]
struct JsonLog(Arc<Mutex<std::fs::File>>);

impl JsonLog {
    fn create(path: &Path) -> std::io::Result<JsonLog> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(JsonLog(Arc::new(Mutex::new(f))))
    }

    fn write(&self, value: &impl Serialize) {
        let mut line = serde_json::to_vec(value).expect("log records serialize");
        line.push(b'\n');
        let mut f = self.0.lock().expect("not poisoned");
        if let Err(e) = f.write_all(&line) {
            tracing::error!("chaos log write failed: {e}");
        }
    }
}

/// Settings of [`workload`].
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// API base URLs of the nodes.
    pub nodes: Vec<String>,
    /// Their API token.
    pub token: Option<String>,
    /// Concurrent clients.
    pub clients: usize,
    /// Docs the clients spread over.
    pub docs: usize,
    /// How long to write.
    pub duration: Duration,
    /// Seeds each client's choice of node and doc.
    pub seed: u64,
    /// Pause after each acknowledged write.
    pub interval: Duration,
    /// Per-request timeout; a write that takes longer is `info`.
    pub timeout: Duration,
    /// The operation log (appended).
    pub log: PathBuf,
}

/// Counts of a [`workload`] run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadSummary {
    /// Acknowledged writes.
    pub ok: u64,
    /// Writes certainly not applied.
    pub fail: u64,
    /// Writes of unknown outcome.
    pub info: u64,
}

/// Sends one write and classifies its outcome.
async fn write_once(
    http: &reqwest::Client,
    base: &str,
    doc: &str,
    key: &str,
    value: u64,
) -> (OpType, Option<String>) {
    let url = format!("{base}/v1/docs/{}", encode_id(doc));
    let body = json!({ key: value }).to_string();
    let sent = http
        .patch(url)
        .header("content-type", "application/merge-patch+json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                (OpType::Ok, None)
            } else {
                let body = resp.text().await.unwrap_or_default();
                let why = format!("{status}: {}", body.chars().take(200).collect::<String>());
                if status.is_client_error() {
                    (OpType::Fail, Some(why))
                } else {
                    (OpType::Info, Some(why))
                }
            }
        }
        // Refused or unreachable: the request never reached the node.
        Err(e) if e.is_connect() && !e.is_timeout() => {
            (OpType::Fail, Some(format!("connect: {}", root_cause(&e))))
        }
        Err(e) => (OpType::Info, Some(root_cause(&e))),
    }
}

/// Runs the clients for `opts.duration` and logs every operation.
///
/// # Errors
/// The log cannot be created, or there are no nodes.
pub async fn workload(opts: &WorkloadOptions) -> anyhow::Result<WorkloadSummary> {
    anyhow::ensure!(!opts.nodes.is_empty(), "no nodes to write to");
    anyhow::ensure!(opts.clients > 0 && opts.docs > 0, "need clients and docs");
    let log = JsonLog::create(&opts.log)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", opts.log.display()))?;
    let http = http_client(opts.token.as_deref(), opts.timeout, opts.timeout);
    let deadline = Instant::now() + opts.duration;
    let mut tasks = Vec::new();
    for process in 0..opts.clients {
        let (http, log, nodes) = (http.clone(), log.clone(), opts.nodes.clone());
        let (docs, interval) = (opts.docs, opts.interval);
        let mut rng = StdRng::seed_from_u64(
            opts.seed ^ (process as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        tasks.push(tokio::spawn(async move {
            let mut sum = WorkloadSummary::default();
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let node = rng.random_range(0..nodes.len());
                let doc = format!("{DOC_PREFIX}d{}", rng.random_range(0..docs));
                let key = format!("c{process}-{seq}");
                let mut rec = OpRecord {
                    t_ms: now_ms(),
                    process,
                    kind: OpType::Invoke,
                    node: node + 1,
                    doc,
                    key,
                    error: None,
                };
                log.write(&rec);
                let (kind, error) = write_once(&http, &nodes[node], &rec.doc, &rec.key, seq).await;
                (rec.t_ms, rec.kind, rec.error) = (now_ms(), kind, error);
                log.write(&rec);
                seq += 1;
                match kind {
                    OpType::Ok => sum.ok += 1,
                    OpType::Fail => sum.fail += 1,
                    _ => sum.info += 1,
                }
                // Back off from a node that is down or stuck.
                let pause = if kind == OpType::Ok {
                    interval
                } else {
                    Duration::from_millis(100)
                };
                tokio::time::sleep(pause).await;
            }
            sum
        }));
    }
    let mut total = WorkloadSummary::default();
    for t in tasks {
        let s = t.await?;
        total.ok += s.ok;
        total.fail += s.fail;
        total.info += s.info;
    }
    Ok(total)
}

/// The campaign's workflow: every state of a chaos doc goes to `url` with
/// its idempotency key, retried through the receiver's 503s.
pub fn workflow_toml(url: &str) -> String {
    format!(
        r#"name = "{WORKFLOW}"
[on]
doc = "{DOC_PREFIX}*"
origin = "any"

[[steps]]
id = "notify"
kind = "http"
url = "{url}"
timeout = "3s"
retry = {{ attempts = 20, backoff = "exponential", initial = "100ms", max = "2s" }}
"#
    )
}

/// Applies [`workflow_toml`] through the first node and waits until every
/// node runs it.
///
/// # Errors
/// The apply fails, or a node does not list it as active within `timeout`.
pub async fn install_workflow(
    nodes: &[String],
    token: Option<&str>,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let clients: Vec<Client> = nodes
        .iter()
        .map(|n| Client::new(n).with_token(token))
        .collect();
    let first = clients.first().ok_or_else(|| anyhow::anyhow!("no nodes"))?;
    first.apply_workflow(workflow_toml(url)).await?;
    let deadline = Instant::now() + timeout;
    for (i, c) in clients.iter().enumerate() {
        loop {
            let list = c.workflows().await.unwrap_or_default();
            let active = list
                .iter()
                .any(|w| w["name"] == WORKFLOW && w["state"] == "active");
            if active {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {} ({}) does not run workflow {WORKFLOW} after {timeout:?}",
                i + 1,
                c.base()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// One line of the effect log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// Unix milliseconds.
    pub t_ms: u64,
    /// The `Idempotency-Key` header.
    pub key: String,
    /// The run's doc.
    pub doc: String,
    /// The run's trigger heads.
    pub heads: Vec<String>,
    /// The node that delivered.
    pub node: String,
    /// The status the receiver answered.
    pub status: u16,
}

/// Serves the effect receiver on `listener` until the process ends: logs
/// each POST to `log` and answers 503 to a `fail_rate` share (seeded).
///
/// # Errors
/// The log cannot be opened; the server fails.
pub async fn receive(
    listener: tokio::net::TcpListener,
    log: &Path,
    fail_rate: f64,
    seed: u64,
) -> anyhow::Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    let log =
        JsonLog::create(log).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", log.display()))?;
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
    let handler = move |headers: HeaderMap, body: axum::body::Bytes| {
        let (log, rng) = (log.clone(), rng.clone());
        async move {
            let Ok(v) = serde_json::from_slice::<Json>(&body) else {
                return StatusCode::BAD_REQUEST;
            };
            let fail = rng.lock().expect("not poisoned").random_bool(fail_rate);
            let status = if fail {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            let run = &v["run"];
            let heads = run["heads"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            log.write(&Delivery {
                t_ms: now_ms(),
                key: headers
                    .get("idempotency-key")
                    .and_then(|k| k.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                doc: run["doc"].as_str().unwrap_or("").to_string(),
                heads,
                node: run["node"].as_str().unwrap_or("").to_string(),
                status: status.as_u16(),
            });
            status
        }
    };
    let app = axum::Router::new().fallback(axum::routing::post(handler));
    axum::serve(listener, app).await?;
    Ok(())
}

/// Settings of [`check`].
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// API base URLs of the nodes, all of which must be running.
    pub nodes: Vec<String>,
    /// Their API token.
    pub token: Option<String>,
    /// The workload's operation log.
    pub ops: PathBuf,
    /// The receiver's effect log, if the campaign ran the workflow.
    pub effects: Option<PathBuf>,
    /// The nemesis's fault log: lines `<unix ms> <kind> <details>`; kind
    /// `crash` is a node that died by itself.
    pub faults: Option<PathBuf>,
    /// Node logs to search for panics.
    pub node_logs: Vec<PathBuf>,
    /// When the faults were healed (Unix ms); default: when the check starts.
    pub healed_at_ms: Option<u64>,
    /// How long to wait for convergence, and then for effects.
    pub timeout: Duration,
    /// The campaign's seed, for the report.
    pub seed: Option<u64>,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The campaign's seed.
    pub seed: Option<u64>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Writes sent.
    pub writes: u64,
    /// Acknowledged writes.
    pub acknowledged: u64,
    /// Writes certainly not applied.
    pub failed: u64,
    /// Writes of unknown outcome.
    pub indeterminate: u64,
    /// Of those, present after the heal.
    pub indeterminate_present: u64,
    /// Acknowledged writes missing on some node (must be 0).
    pub lost: u64,
    /// Some of them, for the report.
    pub lost_examples: Vec<String>,
    /// Failed writes present on some node (must be 0).
    pub failed_present: u64,
    /// Nodes.
    pub nodes: usize,
    /// Nodes whose docs or heads differ from the first node's, or that could
    /// not be read (must be 0).
    pub not_converged: usize,
    /// Of those, nodes that could not be read at all (down, not answering).
    pub unreadable: usize,
    /// Seconds from the heal until every node had the same digest (every
    /// doc, the workflows' run and marker docs too).
    pub converge_seconds: Option<f64>,
    /// Seconds from the heal until the workload's docs had the same heads
    /// on every node.
    pub data_converge_seconds: Option<f64>,
    /// Docs whose final state's effect was not accepted (must be 0).
    pub effects_missing: Option<u64>,
    /// Seconds from the heal until every final state's effect was accepted.
    pub effects_seconds: Option<f64>,
    /// Idempotency keys accepted more than once (allowed: effects are at
    /// least once; expected after kill -9 and partitions).
    pub effects_duplicate_keys: Option<u64>,
    /// Effect deliveries, and of those answered 2xx.
    pub effect_deliveries: Option<(u64, u64)>,
    /// Lines with `panicked` in the node logs (must be 0).
    pub panics: u64,
    /// Nodes that died by themselves (must be 0).
    pub crashes: u64,
}

impl Report {
    /// What broke a promise; empty when everything held.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.acknowledged == 0 {
            v.push("no write was acknowledged: the campaign proved nothing".to_string());
        }
        if self.lost > 0 {
            v.push(format!(
                "{} acknowledged writes lost, e.g. {:?}",
                self.lost, self.lost_examples
            ));
        }
        if self.failed_present > 0 {
            v.push(format!(
                "{} writes that failed with a definite error are present",
                self.failed_present
            ));
        }
        if self.not_converged > 0 {
            v.push(format!(
                "{} of {} nodes not at identical docs and heads",
                self.not_converged, self.nodes
            ));
        }
        if let Some(m) = self.effects_missing.filter(|m| *m > 0) {
            v.push(format!("{m} docs' final state has no accepted effect"));
        }
        if self.panics > 0 {
            v.push(format!("{} panics in the node logs", self.panics));
        }
        if self.crashes > 0 {
            v.push(format!("{} nodes died by themselves", self.crashes));
        }
        v
    }

    /// The report as a table of what was tried and what held.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |what: &str, value: String, verdict: &str| {
            out.push_str(&format!("{what:<44} {value:>12}  {verdict}\n"));
        };
        let seed = self
            .seed
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into());
        row("seed", seed, "");
        for (kind, n) in &self.faults {
            row(&format!("fault: {kind}"), n.to_string(), "injected");
        }
        row("writes sent", self.writes.to_string(), "");
        row("  acknowledged", self.acknowledged.to_string(), "");
        row("  failed (definite)", self.failed.to_string(), "");
        row(
            "  indeterminate (present after heal)",
            format!("{} ({})", self.indeterminate, self.indeterminate_present),
            "",
        );
        let held = |bad: bool| if bad { "VIOLATED" } else { "held" };
        row(
            "acknowledged writes lost",
            self.lost.to_string(),
            held(self.lost > 0 || self.acknowledged == 0),
        );
        row(
            "failed writes present",
            self.failed_present.to_string(),
            held(self.failed_present > 0),
        );
        row(
            "nodes not converged (of them unreadable)",
            format!(
                "{} of {} ({})",
                self.not_converged, self.nodes, self.unreadable
            ),
            held(self.not_converged > 0),
        );
        let secs = |s: Option<f64>| {
            s.map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "never".into())
        };
        row(
            "seconds from heal to same data docs",
            secs(self.data_converge_seconds),
            "",
        );
        row(
            "seconds from heal to same everything",
            secs(self.converge_seconds),
            "",
        );
        if let Some(m) = self.effects_missing {
            row(
                "docs whose final effect is missing",
                m.to_string(),
                held(m > 0),
            );
            row(
                "seconds from heal to all effects",
                secs(self.effects_seconds),
                "",
            );
        }
        if let Some((all, accepted)) = self.effect_deliveries {
            row(
                "effect deliveries (accepted)",
                format!("{all} ({accepted})"),
                "",
            );
        }
        if let Some(d) = self.effects_duplicate_keys {
            row(
                "idempotency keys accepted twice or more",
                d.to_string(),
                "allowed (at least once)",
            );
        }
        row(
            "panics in node logs",
            self.panics.to_string(),
            held(self.panics > 0),
        );
        row(
            "nodes that died by themselves",
            self.crashes.to_string(),
            held(self.crashes > 0),
        );
        out
    }
}

/// Outcomes of the logged writes: key -> (doc, final type). A write with
/// no completion (the workload died) counts as `info`.
pub fn outcomes(ops: &[OpRecord]) -> BTreeMap<String, (String, OpType)> {
    let mut out = BTreeMap::new();
    for op in ops {
        let kind = match op.kind {
            OpType::Invoke => OpType::Info,
            k => k,
        };
        out.insert(op.key.clone(), (op.doc.clone(), kind));
    }
    out
}

/// Reads a JSON-lines file; a torn last line (the writer was killed) is
/// skipped, any other bad line is an error naming it.
///
/// # Errors
/// The file cannot be read, or a line before the last does not parse.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => anyhow::bail!("{}:{}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// What one node holds: each doc's heads, and the keys of the chaos docs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    /// Doc id -> sorted heads.
    pub heads: BTreeMap<String, Vec<String>>,
    /// Chaos doc id -> its top-level keys.
    pub keys: BTreeMap<String, BTreeSet<String>>,
}

/// Fills in the write and convergence counts of `report` from the op
/// outcomes and each node's view.
pub fn judge_writes(
    report: &mut Report,
    outcomes: &BTreeMap<String, (String, OpType)>,
    views: &[NodeView],
) {
    report.nodes = views.len();
    report.writes = outcomes.len() as u64;
    for (key, (doc, kind)) in outcomes {
        let present = |v: &NodeView| v.keys.get(doc).is_some_and(|k| k.contains(key));
        match kind {
            OpType::Ok => {
                report.acknowledged += 1;
                if !views.iter().all(present) {
                    report.lost += 1;
                    if report.lost_examples.len() < 10 {
                        let missing: Vec<usize> = (0..views.len())
                            .filter(|i| !present(&views[*i]))
                            .map(|i| i + 1)
                            .collect();
                        report
                            .lost_examples
                            .push(format!("{doc} {key} missing on nodes {missing:?}"));
                    }
                }
            }
            OpType::Fail => {
                report.failed += 1;
                if views.iter().any(present) {
                    report.failed_present += 1;
                }
            }
            _ => {
                report.indeterminate += 1;
                if views.iter().any(present) {
                    report.indeterminate_present += 1;
                }
            }
        }
    }
    report.not_converged = match views.first() {
        None => 0,
        Some(first) => views.iter().filter(|v| v.heads != first.heads).count(),
    };
}

/// Docs in `finals` (doc -> sorted final heads) for which no accepted
/// delivery carries those heads; and the keys accepted more than once.
pub fn judge_effects(
    finals: &BTreeMap<String, Vec<String>>,
    deliveries: &[Delivery],
) -> (Vec<String>, u64) {
    let mut delivered: BTreeSet<(&str, Vec<&str>)> = BTreeSet::new();
    let mut accepted: BTreeMap<&str, u64> = BTreeMap::new();
    for d in deliveries.iter().filter(|d| (200..300).contains(&d.status)) {
        let mut heads: Vec<&str> = d.heads.iter().map(String::as_str).collect();
        heads.sort_unstable();
        delivered.insert((d.doc.as_str(), heads));
        *accepted.entry(d.key.as_str()).or_default() += 1;
    }
    let missing = finals
        .iter()
        .filter(|(doc, heads)| {
            let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
            !delivered.contains(&(doc.as_str(), heads))
        })
        .map(|(doc, _)| doc.clone())
        .collect();
    let dups = accepted.values().filter(|n| **n > 1).count() as u64;
    (missing, dups)
}

async fn node_view(c: &Client, chaos_docs: &BTreeSet<String>) -> anyhow::Result<NodeView> {
    let mut view = NodeView::default();
    for d in c.list().await? {
        let mut heads = d.heads;
        heads.sort_unstable();
        view.heads.insert(d.id, heads);
    }
    for doc in chaos_docs {
        if !view.heads.contains_key(doc) {
            continue;
        }
        let v = c.get(doc, None).await?;
        let keys = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        view.keys.insert(doc.clone(), keys);
    }
    Ok(view)
}

/// Each node's view; a node that cannot be read (down, not answering) has
/// none, and the report counts it as not converged.
async fn read_views(clients: &[Client], chaos_docs: &BTreeSet<String>) -> Vec<Option<NodeView>> {
    let mut views = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        match node_view(c, chaos_docs).await {
            Ok(v) => views.push(Some(v)),
            Err(e) => {
                eprintln!("cannot read node {} ({}): {e}", i + 1, c.base());
                views.push(None);
            }
        }
    }
    views
}

/// Polls the effect log until every final state has an accepted delivery,
/// or `timeout`; fills in the effect counts.
async fn wait_effects(
    path: &Path,
    finals: &BTreeMap<String, Vec<String>>,
    healed: u64,
    timeout: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let deliveries: Vec<Delivery> = if path.exists() {
            read_jsonl(path)?
        } else {
            Vec::new()
        };
        let (missing, dups) = judge_effects(finals, &deliveries);
        let accepted = deliveries
            .iter()
            .filter(|d| (200..300).contains(&d.status))
            .count() as u64;
        report.effect_deliveries = Some((deliveries.len() as u64, accepted));
        report.effects_missing = Some(missing.len() as u64);
        report.effects_duplicate_keys = Some(dups);
        if missing.is_empty() {
            report.effects_seconds = Some(now_ms().saturating_sub(healed) as f64 / 1000.0);
            return Ok(());
        }
        if Instant::now() >= deadline {
            tracing::warn!("effects missing for {missing:?}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every node answers with the same non-null digest; returns
/// when, or `None` at the deadline. `data` is set to when the chaos docs
/// (`docs`) first had the same heads on every node.
async fn wait_converged(
    clients: &[Client],
    deadline: Instant,
    docs: &BTreeSet<String>,
    data: &mut Option<u64>,
) -> Option<u64> {
    let mut next_report = Instant::now() + Duration::from_secs(5);
    loop {
        if data.is_none() && chaos_heads_equal(clients, docs).await {
            *data = Some(now_ms());
        }
        let mut digests = BTreeSet::new();
        let mut all = true;
        let mut seen = Vec::new();
        for c in clients {
            let status = c.status().await.ok();
            seen.push(match &status {
                Some(s) => format!("{} docs {}", s.docs, s.digest.as_deref().unwrap_or("-")),
                None => "not answering".to_string(),
            });
            match status.and_then(|s| s.digest) {
                Some(d) => {
                    digests.insert(d);
                }
                None => all = false,
            }
        }
        if all && digests.len() == 1 {
            return Some(now_ms());
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(5);
            let nodes: Vec<String> = seen
                .iter()
                .enumerate()
                .map(|(i, s)| format!("n{}: {s}", i + 1))
                .collect();
            eprintln!("not converged yet: {}", nodes.join(", "));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether every node answers and holds the chaos docs at the same heads.
async fn chaos_heads_equal(clients: &[Client], docs: &BTreeSet<String>) -> bool {
    let mut first: Option<BTreeMap<String, Vec<String>>> = None;
    for c in clients {
        let Ok(list) = c.list().await else {
            return false;
        };
        let heads: BTreeMap<String, Vec<String>> = list
            .into_iter()
            .filter(|d| docs.contains(&d.id))
            .map(|d| {
                let mut h = d.heads;
                h.sort_unstable();
                (d.id, h)
            })
            .collect();
        match &first {
            None => first = Some(heads),
            Some(f) if *f != heads => return false,
            Some(_) => {}
        }
    }
    true
}

fn count_panics(logs: &[PathBuf]) -> u64 {
    logs.iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| l.contains("panicked"))
                .count() as u64
        })
        .sum()
}

/// Tallies the fault log by kind; `crash` lines are counted as crashes.
fn read_faults(path: &Path, report: &mut Report) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    for line in text.lines() {
        let Some(kind) = line.split_whitespace().nth(1) else {
            continue;
        };
        if kind == "crash" {
            report.crashes += 1;
        } else {
            *report.faults.entry(kind.to_string()).or_default() += 1;
        }
    }
    Ok(())
}

/// Waits for convergence, reads every node, and judges the campaign.
///
/// # Errors
/// A log cannot be read, or a node cannot be read after convergence.
pub async fn check(opts: &CheckOptions) -> anyhow::Result<Report> {
    let healed = opts.healed_at_ms.unwrap_or_else(now_ms);
    let mut report = Report {
        seed: opts.seed,
        ..Report::default()
    };
    if let Some(f) = &opts.faults {
        read_faults(f, &mut report)?;
    }
    let ops: Vec<OpRecord> = read_jsonl(&opts.ops)?;
    let outcomes = outcomes(&ops);
    let chaos_docs: BTreeSet<String> = outcomes.values().map(|(d, _)| d.clone()).collect();
    let clients: Vec<Client> = opts
        .nodes
        .iter()
        .map(|n| Client::new(n).with_token(opts.token.as_deref()))
        .collect();
    let deadline = Instant::now() + opts.timeout;
    let mut data_at = None;
    let converged = wait_converged(&clients, deadline, &chaos_docs, &mut data_at).await;
    let since_heal = |t: u64| t.saturating_sub(healed) as f64 / 1000.0;
    report.converge_seconds = converged.map(since_heal);
    report.data_converge_seconds = data_at.map(since_heal);
    let mut views = read_views(&clients, &chaos_docs).await;
    if let Some(path) = &opts.effects {
        // The chaos docs' heads are final once the digests match: the
        // workflow only sends effects, it writes nothing into them.
        let finals: BTreeMap<String, Vec<String>> = views
            .iter()
            .flatten()
            .next()
            .map(|v| {
                v.heads
                    .iter()
                    .filter(|(id, _)| chaos_docs.contains(*id))
                    .map(|(id, h)| (id.clone(), h.clone()))
                    .collect()
            })
            .unwrap_or_default();
        wait_effects(path, &finals, healed, opts.timeout, &mut report).await?;
    }
    // Effect markers and run records keep changing system docs until the
    // last effect is in, so compare the nodes once they are quiet: read
    // again until every view is the same, up to the deadline.
    let deadline = Instant::now() + opts.timeout;
    let differ = |views: &[Option<NodeView>]| {
        views
            .iter()
            .any(|v| v.as_ref().map(|v| &v.heads) != views[0].as_ref().map(|v| &v.heads))
    };
    while differ(&views) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        wait_converged(&clients, deadline, &chaos_docs, &mut data_at).await;
        views = read_views(&clients, &chaos_docs).await;
    }
    let readable: Vec<NodeView> = views.iter().flatten().cloned().collect();
    judge_writes(&mut report, &outcomes, &readable);
    report.unreadable = views.len() - readable.len();
    report.nodes = views.len();
    report.not_converged += report.unreadable;
    report.panics = count_panics(&opts.node_logs);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, doc: &str, kind: OpType) -> OpRecord {
        OpRecord {
            t_ms: 0,
            process: 0,
            kind,
            node: 1,
            doc: doc.into(),
            key: key.into(),
            error: None,
        }
    }

    fn view(keys: &[(&str, &[&str])], heads: &[(&str, &[&str])]) -> NodeView {
        NodeView {
            keys: keys
                .iter()
                .map(|(d, ks)| (d.to_string(), ks.iter().map(|k| k.to_string()).collect()))
                .collect(),
            heads: heads
                .iter()
                .map(|(d, hs)| (d.to_string(), hs.iter().map(|h| h.to_string()).collect()))
                .collect(),
        }
    }

    #[test]
    fn an_acknowledged_write_missing_on_one_node_is_lost() {
        let ops = vec![
            op("a", "chaos/d0", OpType::Invoke),
            op("a", "chaos/d0", OpType::Ok),
            op("b", "chaos/d0", OpType::Invoke),
            op("b", "chaos/d0", OpType::Fail),
            op("c", "chaos/d1", OpType::Invoke),
            op("c", "chaos/d1", OpType::Info),
            op("d", "chaos/d1", OpType::Invoke), // never completed
        ];
        let out = outcomes(&ops);
        let heads: &[(&str, &[&str])] = &[("chaos/d0", &["h1"]), ("chaos/d1", &["h2"])];
        let good = view(&[("chaos/d0", &["a"]), ("chaos/d1", &["c"])], heads);
        let mut r = Report::default();
        judge_writes(&mut r, &out, &[good.clone(), good.clone()]);
        assert_eq!(
            (r.writes, r.acknowledged, r.failed, r.indeterminate),
            (4, 1, 1, 2)
        );
        assert_eq!(
            (r.lost, r.failed_present, r.indeterminate_present),
            (0, 0, 1)
        );
        assert_eq!(r.not_converged, 0);
        assert!(r.violations().is_empty(), "{:?}", r.violations());

        let lacking = view(&[("chaos/d0", &[]), ("chaos/d1", &["c", "b"])], heads);
        let mut r = Report::default();
        judge_writes(&mut r, &out, &[good.clone(), lacking]);
        assert_eq!(r.lost, 1);
        assert_eq!(r.lost_examples, vec!["chaos/d0 a missing on nodes [2]"]);
        assert_eq!(r.failed_present, 0, "b was written to another doc");
        assert_eq!(r.violations().len(), 1, "{:?}", r.violations());

        let behind = view(&[("chaos/d0", &["a", "b"])], &[("chaos/d0", &["h0"])]);
        let mut r = Report::default();
        judge_writes(&mut r, &out, &[good, behind]);
        assert_eq!((r.failed_present, r.not_converged), (1, 1));
        assert!(r.table().contains("VIOLATED"));
    }

    #[test]
    fn nothing_acknowledged_proves_nothing() {
        let r = Report::default();
        assert_eq!(r.violations().len(), 1);
    }

    #[test]
    fn effects_need_the_final_heads_and_count_repeated_keys() {
        let d = |key: &str, doc: &str, heads: &[&str], status: u16| Delivery {
            t_ms: 0,
            key: key.into(),
            doc: doc.into(),
            heads: heads.iter().map(|h| h.to_string()).collect(),
            node: "n".into(),
            status,
        };
        let finals: BTreeMap<String, Vec<String>> = [
            (
                "chaos/d0".to_string(),
                vec!["a".to_string(), "b".to_string()],
            ),
            ("chaos/d1".to_string(), vec!["c".to_string()]),
        ]
        .into();
        let deliveries = vec![
            d("k1", "chaos/d0", &["b", "a"], 200), // heads in another order
            d("k1", "chaos/d0", &["b", "a"], 200), // accepted twice
            d("k2", "chaos/d1", &["c"], 503),      // refused: does not count
            d("k3", "chaos/d1", &["old"], 200),    // an earlier state
        ];
        let (missing, dups) = judge_effects(&finals, &deliveries);
        assert_eq!(missing, vec!["chaos/d1".to_string()]);
        assert_eq!(dups, 1);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_other_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ops.jsonl");
        let good = serde_json::to_string(&op("a", "chaos/d0", OpType::Ok)).unwrap();
        std::fs::write(&p, format!("{good}\n{{\"t_ms\": 1, \"pro")).unwrap();
        assert_eq!(read_jsonl::<OpRecord>(&p).unwrap().len(), 1);
        std::fs::write(&p, format!("{{bad\n{good}\n")).unwrap();
        let err = read_jsonl::<OpRecord>(&p).unwrap_err().to_string();
        assert!(err.contains("ops.jsonl:1"), "{err}");
    }
}
