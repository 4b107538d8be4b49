//! The `mergeflow` command: `start` runs a node; every other command is a thin
//! client of a running node's HTTP API (`--api` / `MERGEFLOW_API`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::Value as Json;

use mergeflow::client::Client;
use mergeflow::config::{Config, LogFormat, Overrides};
use mergeflow::doc::Op;

mod cli;

#[derive(Parser)]
#[command(
    name = "mergeflow",
    version,
    about = "A peer-to-peer sync node for JSON documents (Automerge CRDTs in sled)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (data in ./mergeflow-data, API on 127.0.0.1:7700 by default).
    #[command(args_override_self = true)]
    Start(StartArgs),
    /// Create, read, edit and delete documents on a running node.
    Doc {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: DocCmd,
    },
    /// Show a running node's status.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the node's peers: addresses, connection, last time in sync.
    Peers {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Workflow definitions: list the node's, show one, check a file.
    Workflow {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: WorkflowCmd,
    },
    /// Workflow runs, newest first; `runs show|retry|skip ID` for one.
    Runs {
        #[command(flatten)]
        client: ClientArgs,
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only runs in this state: queued, running, done, dead, skipped.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(subcommand)]
        cmd: Option<RunsCmd>,
    },
    /// Take a backup of every document of a running node into FILE
    /// (checked before it is kept).
    Backup {
        #[command(flatten)]
        client: ClientArgs,
        /// The backup file to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Merge a backup into a node: a running one through its API, or a
    /// stopped one with --data-dir or --config. Nothing the node holds is lost.
    Restore {
        #[command(flatten)]
        client: ClientArgs,
        /// The backup file.
        file: PathBuf,
        /// Restore into this data dir (its node must be stopped).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Restore into the data dir of this config (its node must be stopped).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Whether `--api` was given on the command line (not by
        /// MERGEFLOW_API or the default): with --data-dir or --config it
        /// names a second target, and the command is refused.
        #[arg(skip)]
        api_flag: bool,
    },
    /// Write one document as JSON or as its Automerge save (with history).
    Export {
        #[command(flatten)]
        client: ClientArgs,
        /// The doc id.
        id: String,
        /// Format [default: from --to's extension: .json is JSON, else automerge; JSON to stdout].
        #[arg(long, value_enum)]
        format: Option<cli::backup::Format>,
        /// File to write [default: stdout].
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Import one document: Automerge bytes are merged in; JSON makes the doc
    /// equal to it (one change).
    Import {
        #[command(flatten)]
        client: ClientArgs,
        /// The doc id.
        id: String,
        /// The file.
        file: PathBuf,
        /// Format [default: .json is JSON, else automerge].
        #[arg(long, value_enum)]
        format: Option<cli::backup::Format>,
    },
    /// Wait until the node is in sync with every connected peer, showing its
    /// docs against those it still lacks (a new node's initial sync).
    WaitSynced {
        #[command(flatten)]
        client: ClientArgs,
        /// Give up (exit 1) after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Print the change feed as it happens, one JSON object per line:
    /// `{"event": "change"|"run"|"missed", "id", "data"}` (Ctrl-C to stop).
    Events {
        #[command(flatten)]
        client: ClientArgs,
        /// Only docs whose id matches this glob, such as `sensors/**`.
        #[arg(long)]
        doc: Option<String>,
        /// Start after this event id (resume where an earlier run stopped).
        #[arg(long)]
        after: Option<String>,
    },
    /// Print a new random network key for `net.key` (64 hex digits).
    Keygen,
    /// Fault-campaign tools run by scripts/chaos.sh: workload, effect
    /// receiver, checker. (Development; not in the help.)
    #[command(hide = true)]
    Chaos {
        #[command(subcommand)]
        cmd: cli::chaos::ChaosCmd,
    },
    /// Measure durable write throughput and latency against a running node.
    /// (Development: scripts/bench.sh; not in the help.)
    #[command(hide = true)]
    Bench {
        #[command(flatten)]
        client: ClientArgs,
        /// Comma-separated writer counts to run, one after another.
        #[arg(long, default_value = "1,32", value_delimiter = ',')]
        concurrency: Vec<usize>,
        /// Seconds per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Documents the writers spread over.
        #[arg(long, default_value_t = 64)]
        docs: usize,
        /// Instead of measuring, create this many documents `<prefix>/doc-N`.
        #[arg(long)]
        fill: Option<usize>,
        /// The id prefix of the documents --fill creates.
        #[arg(long, default_value = "fill")]
        fill_prefix: String,
    },
}

#[derive(Args)]
struct StartArgs {
    /// Data directory [default: ./mergeflow-data; config node.data_dir].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API listen address [default: 127.0.0.1:7700; config api.listen].
    #[arg(long)]
    api: Option<SocketAddr>,
    /// TOML config file (see config.example.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Log format [config log.format].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter such as `info` or `mergeflow=debug` [config log.level; RUST_LOG wins].
    #[arg(long)]
    log_level: Option<String>,
    /// Multiaddr to listen on for peers, e.g. /ip4/0.0.0.0/tcp/4001 (repeatable) [config net.listen].
    #[arg(long)]
    listen: Vec<String>,
    /// Multiaddr of a peer to dial and keep dialing (repeatable) [config net.peers].
    #[arg(long)]
    peer: Vec<String>,
    /// Do not discover peers with mDNS [config net.mdns].
    #[arg(long)]
    no_mdns: bool,
    /// Light mode for small devices: no dashboard, small caches and queues,
    /// anti-entropy every 2 min; keys you set still win [config node.light].
    #[arg(long)]
    light: bool,
}

#[derive(Args)]
struct ClientArgs {
    /// API of the node to talk to.
    #[arg(
        long,
        env = "MERGEFLOW_API",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    api: String,
    /// API token of the node (its api.token).
    #[arg(
        long,
        env = "MERGEFLOW_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Print raw JSON responses.
    #[arg(long, global = true)]
    json: bool,
}

impl ClientArgs {
    fn client(&self) -> Client {
        Client::new(&self.api).with_token(self.token.as_deref())
    }
}

/// How a write is sent (`doc patch`, `doc ops`).
#[derive(clap::Args)]
struct WriteArgs {
    /// Answer only once this many peers confirmed they stored the write.
    #[arg(long)]
    replicas: Option<usize>,
    /// How long to wait for --replicas, in milliseconds (default 5000).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Apply the write at most once per doc and key: a retry with the same
    /// key (after a lost answer) is not applied again.
    #[arg(long)]
    idempotency_key: Option<String>,
}

impl WriteArgs {
    fn options(self) -> mergeflow::client::WriteOptions {
        mergeflow::client::WriteOptions {
            replicas: self.replicas,
            timeout_ms: self.timeout_ms,
            idempotency_key: self.idempotency_key,
        }
    }
}

#[derive(Subcommand)]
enum DocCmd {
    /// Create a document from a JSON object (VALUE, or stdin when VALUE is - or absent).
    Create {
        /// Id such as sensors/greenhouse-3; generated when absent.
        #[arg(long)]
        id: Option<String>,
        /// JSON object.
        value: Option<String>,
    },
    /// Print a document, or the value at --path (a JSON Pointer).
    Get {
        /// Document id.
        id: String,
        /// JSON Pointer such as /readings/0.
        #[arg(long)]
        path: Option<String>,
    },
    /// Apply a JSON merge patch (RFC 7396); creates the document if absent.
    Patch {
        /// Document id.
        id: String,
        /// JSON object (or - for stdin).
        patch: Option<String>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Apply a JSON list of ops as one change, all or nothing.
    Ops {
        /// Document id.
        id: String,
        /// JSON array such as [{"op":"increment","path":"/n"}] (or - for stdin).
        ops: Option<String>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// List documents in id order (every page; the node's system docs
    /// only with --system).
    List {
        /// Only ids that start with this, such as `sensors/`.
        #[arg(long)]
        prefix: Option<String>,
        /// Only ids after this one (to go on where a --limit listing stopped).
        #[arg(long)]
        after: Option<String>,
        /// Print at most this many (1 to 10000), then the --after to go on with.
        #[arg(long)]
        limit: Option<usize>,
        /// Include the node's system docs (`_mergeflow/...`).
        #[arg(long)]
        system: bool,
    },
    /// Print a document's heads.
    Heads {
        /// Document id.
        id: String,
    },
    /// Print a document's change history.
    History {
        /// Document id.
        id: String,
    },
    /// Delete a document (it leaves a tombstone).
    Delete {
        /// Document id.
        id: String,
    },
}

#[derive(Subcommand)]
enum WorkflowCmd {
    /// List the node's workflows, the invalid ones with their error.
    List,
    /// Show one workflow.
    Show {
        /// Its name.
        name: String,
    },
    /// Check a definition file here, without a node: prints what it loads
    /// as, or what is wrong and where (exit code 1).
    Validate {
        /// The TOML file.
        file: PathBuf,
    },
    /// Store a definition on the node; it syncs, and every node whose labels
    /// match runs it (a workflow-dir file of the same name wins on its node).
    Apply {
        /// The TOML file.
        file: PathBuf,
    },
    /// Let a workflow run again, on every node.
    Enable {
        /// Its name.
        name: String,
    },
    /// Stop a workflow from running, on every node (runs in flight finish).
    Disable {
        /// Its name.
        name: String,
    },
    /// Remove a workflow applied with `apply`, on every node (runs in
    /// flight finish). A file in a node's workflow dir is not touched.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum RunsCmd {
    /// Show one run: each step's state, attempts, timings, output and error.
    Show {
        /// Run id.
        id: u64,
    },
    /// Run a dead run again from its failed step, on the doc's current state.
    Retry {
        /// Run id.
        id: u64,
    },
    /// Mark a dead run skipped.
    Skip {
        /// Run id.
        id: u64,
    },
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Cmd::Restore { api_flag, .. } = &mut cli.cmd {
        *api_flag = matches
            .subcommand_matches("restore")
            .and_then(|m| m.value_source("api"))
            == Some(clap::parser::ValueSource::CommandLine);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors often include their cause in their message; print each
            // part of the chain once.
            let mut line = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !line.contains(&cause) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&cause);
                }
            }
            eprintln!("error: {line}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Start(args) => start(args).await,
        Cmd::Peers { client } => {
            let peers = client.client().peers().await?;
            if client.json {
                print_json(&peers);
            } else {
                println!(
                    "{:<54} {:<9} {:>8} {:>8} {:>8} {:>8}  ADDRESSES",
                    "PEER", "STATE", "SYNCING", "IN SYNC", "STRIKES", "LIMITED"
                );
                for p in peers {
                    let state = if p.connected { "connected" } else { "down" };
                    let in_sync = p
                        .last_in_sync_at
                        .map(|t| {
                            format!("{}s ago", mergeflow::doc::now_ms().saturating_sub(t) / 1000)
                        })
                        .unwrap_or_else(|| "never".into());
                    println!(
                        "{:<54} {:<9} {:>8} {:>8} {:>8} {:>8}  {}",
                        p.peer_id,
                        state,
                        p.docs_syncing,
                        in_sync,
                        p.rejected,
                        p.rate_limited,
                        p.addrs.join(" ")
                    );
                }
            }
            Ok(())
        }
        Cmd::Backup { client, to } => cli::backup::backup(&client.client(), &to).await,
        Cmd::Restore {
            client,
            file,
            data_dir,
            config,
            api_flag,
        } => {
            if api_flag && (data_dir.is_some() || config.is_some()) {
                let offline = if data_dir.is_some() {
                    "--data-dir"
                } else {
                    "--config"
                };
                bail!(
                    "restore: --api {} names a running node, {offline} a stopped node's data \
                     dir: give one of them (--api to merge through the node's API, \
                     {offline} while its node is stopped)",
                    client.api
                );
            }
            let offline = cli::backup::Offline { data_dir, config };
            cli::backup::restore(&client.client(), &file, offline, client.json).await
        }
        Cmd::Export {
            client,
            id,
            format,
            to,
        } => cli::backup::export(&client.client(), &id, format, to.as_deref()).await,
        Cmd::Import {
            client,
            id,
            file,
            format,
        } => cli::backup::import(&client.client(), &id, &file, format).await,
        Cmd::WaitSynced { client, timeout } => {
            cli::progress::wait_synced(&client.client(), Duration::from_secs(timeout)).await
        }
        Cmd::Events { client, doc, after } => events(&client.client(), doc, after).await,
        Cmd::Keygen => {
            println!("{}", mergeflow::net::generate_key());
            Ok(())
        }
        Cmd::Chaos { cmd } => {
            if cli::chaos::run(cmd).await? {
                Ok(())
            } else {
                bail!("the campaign broke a promise (see the VIOLATION lines above)")
            }
        }
        Cmd::Doc { client, cmd } => doc(client, cmd).await,
        Cmd::Workflow { client, cmd } => workflow(client, cmd).await,
        Cmd::Runs {
            client,
            workflow,
            status,
            limit,
            cmd,
        } => runs(client, workflow, status, limit, cmd).await,
        Cmd::Status { client } => {
            let c = client.client();
            let s = c.status().await?;
            if client.json {
                print_json(&s);
            } else {
                print_status(&s)?;
            }
            Ok(())
        }
        Cmd::Bench {
            client,
            concurrency,
            seconds,
            docs,
            fill,
            fill_prefix,
        } => {
            let c = client.client();
            if let Some(n) = fill {
                let template = "{spinner} filling [{bar:30}] {pos}/{len} docs ({per_sec})";
                let secs = cli::progress::counting(Some(n as u64), template, async |done| {
                    mergeflow::bench::fill(&c, &fill_prefix, n, 32, done).await
                })
                .await?;
                println!(
                    "created {n} docs in {secs:.2}s ({:.0} docs/s)",
                    n as f64 / secs
                );
                return Ok(());
            }
            for conc in concurrency {
                let template = format!(
                    "{{spinner}} {conc} writers: {{pos}} durable writes ({{per_sec}}), {seconds}s run"
                );
                let run = Duration::from_secs_f64(seconds);
                let r = cli::progress::counting(None, &template, async |done| {
                    mergeflow::bench::load(&c, conc, run, docs, done).await
                })
                .await?;
                if client.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "concurrency {:>3}: {:>8.0} durable writes/s  p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ({} writes, {} errors, {:.1}s)",
                        r.concurrency,
                        r.writes_per_s,
                        r.p50_ms,
                        r.p99_ms,
                        r.max_ms,
                        r.writes,
                        r.errors,
                        r.seconds
                    );
                }
            }
            Ok(())
        }
    }
}

async fn workflow(client: ClientArgs, cmd: WorkflowCmd) -> Result<()> {
    let c = client.client();
    let cmd_kind = match &cmd {
        WorkflowCmd::Enable { .. } => "enable",
        _ => "disable",
    };
    match cmd {
        WorkflowCmd::List => {
            let list = c.workflows().await?;
            if client.json {
                print_json(&list);
                return Ok(());
            }
            println!("{:<24} {:<8} {:<24} STEPS / ERROR", "NAME", "VALID", "DOCS");
            for w in list {
                let steps: Vec<String> = w["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        format!(
                            "{}:{}",
                            s["id"].as_str().unwrap_or(""),
                            s["kind"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                let valid = w["valid"].as_bool().unwrap_or(false);
                let tail = if valid {
                    steps.join(" -> ")
                } else {
                    w["error"].as_str().unwrap_or("").to_string()
                };
                println!(
                    "{:<24} {:<8} {:<24} {tail}",
                    w["name"].as_str().unwrap_or(""),
                    if valid { "yes" } else { "NO" },
                    w["doc"].as_str().unwrap_or("-"),
                );
            }
            Ok(())
        }
        WorkflowCmd::Show { name } => {
            print_json(&c.workflow(&name).await?);
            Ok(())
        }
        WorkflowCmd::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let w = c.apply_workflow(text).await?;
            if client.json {
                print_json(&w);
            } else {
                println!(
                    "applied workflow {}; it reaches every node as its doc syncs",
                    w["name"]
                );
            }
            Ok(())
        }
        WorkflowCmd::Enable { name } | WorkflowCmd::Disable { name } => {
            let on = matches!(cmd_kind, "enable");
            let w = c.set_workflow_enabled(&name, on).await?;
            if client.json {
                print_json(&w);
            } else {
                println!("{cmd_kind}d workflow {name:?} on every node");
            }
            Ok(())
        }
        WorkflowCmd::Delete { name } => {
            let d = c.delete_workflow(&name).await?;
            if client.json {
                print_json(&d);
            } else {
                println!("deleted workflow {name:?} on every node");
                if let Some(file) = d["file"].as_str() {
                    println!("note: the file {file} still defines it on this node");
                }
            }
            Ok(())
        }
        WorkflowCmd::Validate { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let sandbox = mergeflow::workflow::expr::Sandbox::new();
            let plan = mergeflow::workflow::plan::Plan::load(
                &sandbox,
                &file.display().to_string(),
                &text,
            )?;
            let order: Vec<&str> = plan.def.steps.iter().map(|s| s.id.as_str()).collect();
            println!(
                "{}: workflow {:?} is valid; steps run in the order {}",
                file.display(),
                plan.name(),
                order.join(" -> ")
            );
            if plan.runs_commands() {
                // Checked here without a node: its setting is unknown.
                println!(
                    "warning: it runs commands (exec): `workflow apply` is refused unless the \
                     node sets workflow.allow_applied_exec = true; as a file in the node's \
                     workflow dir it runs"
                );
            }
            Ok(())
        }
    }
}

/// `mergeflow events`: one JSON line per event until the node ends the
/// stream (it shut down) or stdout closes.
async fn events(c: &Client, doc: Option<String>, after: Option<String>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    c.events(doc.as_deref(), after.as_deref(), |event, id, data| {
        let line = serde_json::json!({ "event": event, "id": id, "data": data });
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    })
    .await?;
    eprintln!("the node ended the event stream");
    Ok(())
}

async fn runs(
    client: ClientArgs,
    workflow: Option<String>,
    status: Option<String>,
    limit: usize,
    cmd: Option<RunsCmd>,
) -> Result<()> {
    let c = client.client();
    let (id, action) = match cmd {
        None => {
            let runs = c
                .runs(workflow.as_deref(), status.as_deref(), limit)
                .await?;
            if client.json {
                print_json(&runs);
                return Ok(());
            }
            println!(
                "{:>10} {:<8} {:<20} {:<28} {:<8} {:>5}  ERROR",
                "ID", "STATUS", "WORKFLOW", "DOC", "TRIGGER", "DEPTH"
            );
            for r in runs {
                println!(
                    "{:>10} {:<8} {:<20} {:<28} {:<8} {:>5}  {}",
                    r.id,
                    format!("{:?}", r.status).to_lowercase(),
                    r.workflow,
                    r.doc,
                    r.trigger,
                    r.depth,
                    r.error.as_deref().unwrap_or("")
                );
            }
            return Ok(());
        }
        Some(RunsCmd::Show { id }) => (id, None),
        Some(RunsCmd::Retry { id }) => (id, Some("retry")),
        Some(RunsCmd::Skip { id }) => (id, Some("skip")),
    };
    let run = match action {
        None => c.run(id).await?,
        Some(a) => c.run_action(id, a).await?,
    };
    if client.json {
        print_json(&run);
    } else {
        print!("{}", run_summary(&run));
    }
    Ok(())
}

/// `runs show` for people: the run, then one line per step (state,
/// attempts, time taken, who delivered an effect), then errors.
fn run_summary(run: &mergeflow::workflow::Run) -> String {
    use std::fmt::Write;
    let lower = |s: String| s.to_lowercase();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "run {}: {} of workflow {} on doc {}",
        run.id,
        lower(format!("{:?}", run.status)),
        run.workflow,
        run.doc
    );
    let _ = writeln!(
        o,
        "  trigger {}, depth {}, key {}",
        run.trigger, run.depth, run.key
    );
    let took = run.updated_ms.saturating_sub(run.created_ms);
    let _ = writeln!(
        o,
        "  created {} (unix ms), {took} ms to its last update",
        run.created_ms
    );
    if let Some(e) = &run.error {
        let _ = writeln!(o, "  error: {e}");
    }
    let _ = writeln!(o, "steps:");
    for s in &run.steps {
        let attempts = match s.attempts {
            1 => "1 attempt".to_string(),
            n => format!("{n} attempts"),
        };
        let took = match (s.started_ms, s.finished_ms) {
            (Some(a), Some(b)) => format!(", {} ms", b.saturating_sub(a)),
            _ => String::new(),
        };
        let _ = write!(
            o,
            "  {:<16} {:<8} {:<8} {attempts}{took}",
            s.id,
            s.kind,
            lower(format!("{:?}", s.state))
        );
        let out = s.output.as_ref();
        let who = |k: &str| out.and_then(|v| v[k].as_str()).map(str::to_string);
        if let Some(by) = who("delivered_by") {
            let _ = write!(o, ", delivered by {by}");
        } else if let Some(by) = who("dead_by") {
            let _ = write!(o, ", dead-lettered by {by}");
        } else if let Some(by) = who("skipped_by") {
            let _ = write!(o, ", skipped by {by}");
        } else if let Some(by) = who("waiting_for") {
            let _ = write!(o, ", waiting for {by}");
        }
        let _ = writeln!(o);
        if let Some(e) = &s.error {
            let _ = writeln!(o, "    error: {e}");
        }
    }
    o
}

async fn start(args: StartArgs) -> Result<()> {
    let flags = Overrides {
        data_dir: args.data_dir,
        api_listen: args.api,
        log_format: args.log_format,
        log_level: args.log_level,
        listen: args.listen,
        peers: args.peer,
        no_mdns: args.no_mdns,
        light: args.light,
    };
    let mut config = Config::load(args.config.as_deref(), std::env::vars(), &flags)?;
    // After a restart in place (see `reexec`), listen where the last run did,
    // so clients and peers find the node again even on ports chosen by the OS.
    if let Ok(addrs) = std::env::var(LISTEN_ENV)
        && let Ok((api, p2p)) =
            serde_json::from_str::<(Option<std::net::SocketAddr>, Vec<String>)>(&addrs)
    {
        if let Some(api) = api {
            config.api.listen = api;
        }
        if !p2p.is_empty() {
            config.net.listen = p2p;
        }
    }
    init_logging(&config);
    let mut stop = std::pin::pin!(shutdown_signal()?);
    // A store that fails (sled after an I/O error such as a full disk)
    // refuses writes until reopened. The node keeps serving reads (writes
    // answer 507) until its data dir has room again, then the process starts
    // over on it (a failed sled store cannot be closed in-process: its drop
    // can wait forever), with a backoff, as a supervisor would.
    let mut restarts: u32 = std::env::var(RESTARTS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    loop {
        if restarts > 0 {
            let backoff = restart_backoff(restarts);
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        let node = match mergeflow::Node::builder()
            .config(config.clone())
            .serve_api(true)
            .network(true)
            .start()
            .await
        {
            Ok(node) => node,
            Err(e) if restarts > 0 && restarts < MAX_RESTARTS => {
                tracing::error!(err = %e, restarts, "the node does not start again; retrying");
                restarts += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let api = node
            .api_addr()
            .map(|a| format!("http://{a}"))
            .unwrap_or_default();
        // One line on stdout for people and scripts; logs go to stderr.
        println!(
            "mergeflow {} ready: api={api} peer_id={} data_dir={}",
            env!("CARGO_PKG_VERSION"),
            node.peer_id(),
            node.data_dir().display()
        );
        let up = std::time::Instant::now();
        let failure = tokio::select! {
            _ = &mut stop => None,
            e = store_failed(&node) => Some(e),
        };
        let Some(failure) = failure else {
            tracing::info!("shutting down");
            let stopped = node.shutdown().await;
            drop(node); // closes sled, then seals the data dir (after a clean stop)
            return stopped.map_err(Into::into);
        };
        tracing::error!(
            err = %failure,
            "the store failed: serving reads and refusing writes (507) until the data dir has room again"
        );
        let dir = node.data_dir().to_path_buf();
        let stopping = tokio::select! {
            _ = &mut stop => true,
            _ = has_room_again(&dir) => false,
        };
        // Stop serving (in-flight requests finish), but never drop the failed
        // store: the process exits or starts over without closing it. Every
        // acknowledged write was flushed before it was acknowledged.
        let _ = tokio::time::timeout(FAILED_STOP_WAIT, node.shutdown()).await;
        if stopping {
            tracing::info!("shutting down with a failed store");
            std::process::exit(0);
        }
        if up.elapsed() > Duration::from_secs(60) {
            restarts = 0;
        }
        restarts += 1;
        if restarts >= MAX_RESTARTS {
            // Failing again and again within a minute of each start: leave it
            // to a supervisor and a human, with a clear exit status.
            eprintln!(
                "error: the store failed {restarts} times, each within a minute of starting; giving up (last error: {failure})"
            );
            std::process::exit(1);
        }
        tracing::info!(
            restarts,
            "the data dir has room again: starting the process over on it"
        );
        let p2p = node
            .status()
            .await
            .listen_addrs
            .iter()
            .map(|a| a.split("/p2p/").next().unwrap_or(a).to_string())
            .collect::<Vec<_>>();
        let listen = serde_json::to_string(&(node.api_addr(), p2p)).expect("addresses serialize");
        return Err(reexec(restarts, &listen));
    }
}

/// Carries the count of recent restarts across [`reexec`].
const RESTARTS_ENV: &str = "MERGEFLOW_INTERNAL_RESTARTS";
/// Carries the API and p2p addresses the last run listened on across
/// [`reexec`], as JSON `[api, [multiaddr...]]`.
const LISTEN_ENV: &str = "MERGEFLOW_INTERNAL_LISTEN";

/// The wait before restart number `n` (from 1): 1 s, doubling, at most
/// [`MAX_BACKOFF`].
fn restart_backoff(n: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(n.saturating_sub(1).min(5))).min(MAX_BACKOFF)
}

/// Restarts after store failures (each within a minute of the last start,
/// or failing to start) before giving up.
const MAX_RESTARTS: u32 = 10;
/// Longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a node whose store failed gets to stop before the process is
/// started over instead.
const FAILED_STOP_WAIT: Duration = Duration::from_secs(10);

/// Replaces this process with a fresh run of the same program, arguments and
/// environment, telling it this is restart number `restarts` and where the
/// last run listened (`listen`, see [`LISTEN_ENV`]) (the pid stays,
/// so a supervisor sees no exit). Files and sockets close on exec, which lets
/// go of the data dir's lock. Returns only if the exec failed.
fn reexec(restarts: u32, listen: &str) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return anyhow::anyhow!("cannot start the process over: {e}"),
    };
    let err = std::process::Command::new(&program)
        .args(std::env::args_os().skip(1))
        .env(RESTARTS_ENV, restarts.to_string())
        .env(LISTEN_ENV, listen)
        .exec();
    anyhow::anyhow!("cannot start {} over: {err}", program.display())
}

/// Resolves once `dir` has room again: more free space than when the store
/// failed by [`ROOM_FREED`], or plenty of it (the failure was not a full
/// disk), and it takes a test write of [`PROBE_BYTES`]. Checked every
/// [`PROBE_EVERY`].
async fn has_room_again(dir: &std::path::Path) {
    let free = |dir: &std::path::Path| fs2::available_space(dir).unwrap_or(0);
    let at_failure = free(dir);
    let probe = dir.join(".write-probe");
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let (now, total) = (free(dir), fs2::total_space(dir).unwrap_or(0));
        let freed = now >= at_failure.saturating_add(ROOM_FREED);
        let plenty = now >= ROOM_PLENTY && now >= total / 10;
        if !(freed || plenty) {
            continue;
        }
        let p = probe.clone();
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let written = std::fs::File::create(&p).and_then(|mut f| {
                f.write_all(&vec![0u8; PROBE_BYTES])?;
                f.sync_all()
            });
            let _ = std::fs::remove_file(&p);
            written.is_ok()
        })
        .await
        .unwrap_or(false);
        if written {
            return;
        }
    }
}

/// Space freed since a failure that counts as "room again".
const ROOM_FREED: u64 = 16 << 20;
/// Free space that counts as room whatever the failure was (and at least a
/// tenth of the file system).
const ROOM_PLENTY: u64 = 64 << 20;
/// The test write before a restart.
const PROBE_BYTES: usize = 4 << 20;
/// How often a failed store's data dir is checked.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Resolves with the error once the node's store has failed.
async fn store_failed(node: &mergeflow::Node) -> String {
    loop {
        if let Some(e) = node.store_failure() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Resolves on SIGINT or SIGTERM. Install it before announcing readiness: until
/// the handlers exist, SIGTERM would kill the process without a clean stop.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // Colours only on a terminal: logs redirected to a file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Reads a JSON argument, or stdin when it is `-` or absent.
fn json_arg(arg: Option<String>, what: &str) -> Result<Json> {
    let text = match arg.as_deref() {
        None | Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .with_context(|| format!("reading {what} from stdin"))?;
            s
        }
        Some(s) => s.to_string(),
    };
    serde_json::from_str(&text).with_context(|| format!("{what} is not valid JSON"))
}

async fn doc(args: ClientArgs, cmd: DocCmd) -> Result<()> {
    let c = args.client();
    let json = args.json;
    match cmd {
        DocCmd::Create { id, value } => {
            let value = json_arg(value, "VALUE")?;
            let r = c.create(id.as_deref(), value).await?;
            write_result(json, "created", &r)
        }
        DocCmd::Get { id, path } => {
            let v = c.get(&id, path.as_deref()).await?;
            print_json(&v);
            Ok(())
        }
        DocCmd::Patch { id, patch, write } => {
            let patch = json_arg(patch, "PATCH")?;
            let r = c.patch_with(&id, &patch, &write.options()).await?;
            written(json, "patched", &r)
        }
        DocCmd::Ops { id, ops, write } => {
            let ops: Vec<Op> = serde_json::from_value(json_arg(ops, "OPS")?)
                .context("OPS must be a JSON array of ops such as [{\"op\":\"set\",\"path\":\"/a\",\"value\":1}]")?;
            let r = c.ops_with(&id, &ops, &write.options()).await?;
            written(json, "applied", &r)
        }
        DocCmd::List {
            prefix,
            after,
            limit,
            system,
        } => {
            let mut q = mergeflow::api::ListParams {
                prefix,
                after,
                limit,
                system: system.then_some(true),
            };
            if !json {
                println!(
                    "{:<40} {:>6} {:>10}  UPDATED (unix ms)",
                    "ID", "HEADS", "BYTES"
                );
            }
            let mut all = Vec::new();
            loop {
                let (page, more) = c.list_page(&q).await?;
                let last = page.last().map(|d| d.id.clone());
                for d in page {
                    if json {
                        all.push(d);
                    } else {
                        println!(
                            "{:<40} {:>6} {:>10}  {}",
                            d.id,
                            d.heads.len(),
                            d.size_bytes,
                            d.updated_at
                        );
                    }
                }
                match (more, last) {
                    (true, Some(last)) if limit.is_some() => {
                        eprintln!("more docs follow: go on with --after {last}");
                        break;
                    }
                    (true, Some(last)) => q.after = Some(last),
                    _ => break,
                }
            }
            if json {
                print_json(&all);
            }
            Ok(())
        }
        DocCmd::Heads { id } => {
            let heads = c.heads(&id).await?;
            if json {
                print_json(&heads);
            } else {
                heads.iter().for_each(|h| println!("{h}"));
            }
            Ok(())
        }
        DocCmd::History { id } => {
            let h = c.history(&id).await?;
            if json {
                print_json(&h);
            } else {
                for e in h {
                    let who = e.peer_id.as_deref().unwrap_or("unknown peer");
                    println!(
                        "{}  {}  seq {:<4} t={}  {}  ({who})",
                        &e.hash[..12.min(e.hash.len())],
                        &e.actor[..8.min(e.actor.len())],
                        e.seq,
                        e.time,
                        e.message.unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        DocCmd::Delete { id } => {
            let r = c.delete(&id).await?;
            if json {
                print_json(&r);
            } else {
                println!("deleted {}", r.id);
            }
            Ok(())
        }
    }
}

/// As [`write_result`], with the replicas that confirmed, if asked for.
fn written(json: bool, verb: &str, w: &mergeflow::client::Written) -> Result<()> {
    if json {
        print_json(w);
        return Ok(());
    }
    write_result(false, verb, &w.result)?;
    if let Some(peers) = w.replicas.as_ref().and_then(|r| r.as_array()) {
        println!("confirmed by {} replicas", peers.len());
    }
    Ok(())
}

fn write_result(json: bool, verb: &str, r: &mergeflow::doc::WriteResult) -> Result<()> {
    if json {
        print_json(r);
    } else if r.changed {
        println!("{verb} {} heads {}", r.id, r.heads.join(","));
    } else {
        println!("unchanged {} heads {}", r.id, r.heads.join(","));
    }
    if r.heads.is_empty() && r.changed {
        bail!("the node returned no heads for a write");
    }
    Ok(())
}

/// `mergeflow status` for people: one `name value` line each, then the
/// effective config as TOML, indented (so `awk '/^listen/'` finds only the
/// listen lines). Written in one piece ([`write_stdout`]).
fn print_status(s: &mergeflow::node::Status) -> Result<()> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "peer_id   {}", s.peer_id);
    let _ = writeln!(w, "version   {}", s.version);
    let _ = writeln!(w, "light     {}", if s.light { "on" } else { "off" });
    let _ = writeln!(w, "docs      {}", s.docs);
    let _ = writeln!(w, "uptime_s  {}", s.uptime_s);
    let _ = writeln!(w, "data_dir  {}", s.data_dir);
    let _ = writeln!(w, "boot      {}", s.boot);
    let _ = writeln!(w, "store     {} bytes", s.store_bytes);
    let _ = writeln!(w, "peers     {} connected", s.peers);
    if let Some(n) = s.docs_lacking {
        let _ = writeln!(w, "lacking   {n} docs peers hold (on their way)");
    }
    for t in &s.tasks {
        let total = t.total.map(|n| format!("/{n}")).unwrap_or_default();
        let _ = writeln!(w, "task      {} {}{total}", t.kind, t.done);
    }
    let f = &s.workflows;
    let _ = writeln!(
        w,
        "workflows {} loaded, {} invalid; runs {} ({} done, {} dead)",
        f.workflows, f.invalid, f.runs, f.done, f.dead
    );
    for a in &s.listen_addrs {
        let _ = writeln!(w, "listen    {a}");
    }
    if let Some(config) = &s.config {
        let _ = writeln!(
            w,
            "config    effective: defaults < file < MERGEFLOW_* < flags; secrets hidden"
        );
        let text = toml::to_string(config).unwrap_or_else(|_| {
            // A value TOML cannot hold (a null from a newer node): as JSON.
            serde_json::to_string_pretty(config).unwrap_or_default()
        });
        for line in text.lines().filter(|l| !l.is_empty()) {
            let _ = writeln!(w, "  {line}");
        }
    }
    Ok(write_stdout(&out)?)
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            if let Err(e) = write_stdout(&format!("{s}\n")) {
                eprintln!("error: cannot print JSON: {e}");
            }
        }
        Err(e) => eprintln!("error: cannot print JSON: {e}"),
    }
}

/// Writes `text` to stdout in one piece. A reader that stopped early (`|
/// grep -q`, `| head`) is not an error: what it wanted, it had.
fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}
