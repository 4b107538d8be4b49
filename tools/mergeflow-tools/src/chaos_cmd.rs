//! `mergeflow-tools chaos ...`: the pieces of `scripts/chaos.sh` that run as
//! processes (see [`mergeflow_tools::chaos`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;

use mergeflow_tools::chaos;

#[derive(Subcommand)]
pub enum ChaosCmd {
    /// Write unique keys into chaos/d<N> through the nodes and log every
    /// operation (invoke, then ok / fail / info) as JSON lines.
    Workload {
        /// API base URLs of the nodes, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// The nodes' API token.
        #[arg(long, env = "MERGEFLOW_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Docs the clients spread over.
        #[arg(long, default_value_t = 16)]
        docs: usize,
        /// Seconds to write.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Seed of the clients' choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Milliseconds each client pauses after an acknowledged write.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Milliseconds before a write counts as indeterminate.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Before writing, apply the chaos-effect workflow (an `http` step to
        /// this URL) through the first node and wait until every node runs it.
        #[arg(long)]
        effect_url: Option<String>,
        /// The operation log (appended).
        #[arg(long)]
        log: PathBuf,
    },
    /// Receive the chaos-effect workflow's deliveries and log each with its
    /// Idempotency-Key and heads; runs until killed.
    Receive {
        /// Address to listen on.
        #[arg(long)]
        listen: String,
        /// The effect log (appended).
        #[arg(long)]
        log: PathBuf,
        /// Share of deliveries answered 503, so that retries run.
        #[arg(long, default_value_t = 0.1)]
        fail_rate: f64,
        /// Seed of which deliveries fail.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// After the heal: wait for convergence, read every node and report what
    /// held. Exits 1 when a promise was broken.
    Check {
        /// API base URLs of the nodes, comma-separated; all must be running.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// The nodes' API token.
        #[arg(long, env = "MERGEFLOW_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The workload's operation log.
        #[arg(long)]
        ops: PathBuf,
        /// The receiver's effect log.
        #[arg(long)]
        effects: Option<PathBuf>,
        /// The nemesis's fault log (`<unix ms> <kind> <details>` lines).
        #[arg(long)]
        faults: Option<PathBuf>,
        /// A node log to search for panics (repeatable).
        #[arg(long)]
        node_log: Vec<PathBuf>,
        /// When the faults were healed, Unix milliseconds [default: now].
        #[arg(long)]
        healed_at_ms: Option<u64>,
        /// Seconds to wait for convergence, and again for effects.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
        /// The campaign's seed, printed in the report.
        #[arg(long)]
        seed: Option<u64>,
        /// Also write the report as JSON here.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

pub async fn run(cmd: ChaosCmd) -> Result<bool> {
    match cmd {
        ChaosCmd::Workload {
            nodes,
            token,
            clients,
            docs,
            seconds,
            seed,
            interval_ms,
            timeout_ms,
            effect_url,
            log,
        } => {
            if let Some(url) = effect_url {
                chaos::install_workflow(&nodes, token.as_deref(), &url, Duration::from_secs(60))
                    .await?;
            }
            let opts = chaos::WorkloadOptions {
                nodes,
                token,
                clients,
                docs,
                duration: Duration::from_secs_f64(seconds),
                seed,
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(timeout_ms),
                log,
            };
            let s = chaos::workload(&opts).await?;
            println!(
                "workload: {} acknowledged, {} failed, {} indeterminate writes",
                s.ok, s.fail, s.info
            );
            Ok(true)
        }
        ChaosCmd::Receive {
            listen,
            log,
            fail_rate,
            seed,
        } => {
            anyhow::ensure!(
                (0.0..1.0).contains(&fail_rate),
                "--fail-rate must be in [0, 1)"
            );
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("receiving on {}", listener.local_addr()?);
            chaos::receive(listener, &log, fail_rate, seed).await?;
            Ok(true)
        }
        ChaosCmd::Check {
            nodes,
            token,
            ops,
            effects,
            faults,
            node_log,
            healed_at_ms,
            timeout,
            seed,
            json_out,
        } => {
            let opts = chaos::CheckOptions {
                nodes,
                token,
                ops,
                effects,
                faults,
                node_logs: node_log,
                healed_at_ms,
                timeout: Duration::from_secs(timeout),
                seed,
            };
            let report = chaos::check(&opts).await?;
            print!("{}", report.table());
            if let Some(p) = json_out {
                std::fs::write(&p, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", p.display()))?;
            }
            let violations = report.violations();
            for v in &violations {
                println!("VIOLATION: {v}");
            }
            if violations.is_empty() {
                println!("verdict: every promise held");
            }
            Ok(violations.is_empty())
        }
    }
}
