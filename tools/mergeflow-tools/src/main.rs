//! The `mergeflow-tools` command: development tools run against mergeflow
//! nodes by `scripts/chaos.sh` (`chaos workload|receive|check`) and
//! `scripts/bench.sh` (`bench`). Not shipped with the node.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use mergeflow::client::Client;

mod chaos_cmd;
mod progress;

#[derive(Parser)]
#[command(
    name = "mergeflow-tools",
    version,
    about = "Development tools for mergeflow: the fault campaign's pieces and a load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fault-campaign tools run by scripts/chaos.sh: workload, effect
    /// receiver, checker.
    Chaos {
        #[command(subcommand)]
        cmd: chaos_cmd::ChaosCmd,
    },
    /// Measure durable write throughput and latency against a running node
    /// (scripts/bench.sh).
    Bench {
        /// API of the node to talk to.
        #[arg(long, env = "MERGEFLOW_API", default_value = "http://127.0.0.1:7700")]
        api: String,
        /// API token of the node (its api.token).
        #[arg(long, env = "MERGEFLOW_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print each run's result as JSON.
        #[arg(long)]
        json: bool,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    mergeflow::cli_support::run(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Chaos { cmd } => {
            if chaos_cmd::run(cmd).await? {
                Ok(())
            } else {
                bail!("the campaign broke a promise (see the VIOLATION lines above)")
            }
        }
        Cmd::Bench {
            api,
            token,
            json,
            concurrency,
            seconds,
            docs,
            fill,
            fill_prefix,
        } => {
            let c = Client::new(&api).with_token(token.as_deref());
            if let Some(n) = fill {
                let template = "{spinner} filling [{bar:30}] {pos}/{len} docs ({per_sec})";
                let secs = progress::counting(Some(n as u64), template, async |done| {
                    mergeflow_tools::bench::fill(&c, &fill_prefix, n, 32, done).await
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
                let r = progress::counting(None, &template, async |done| {
                    mergeflow_tools::bench::load(&c, conc, run, docs, done).await
                })
                .await?;
                if json {
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
