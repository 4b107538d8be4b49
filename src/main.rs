//! The `mergeflow` command: `start` runs a node; every other command is a thin
//! client of a running node's HTTP API (`--api` / `MERGEFLOW_API`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

mod cli;

/// mimalloc rather than the system's malloc: Automerge makes many small
/// allocations, and glibc's malloc took a third to a half of a catch-up's
/// CPU (BENCHMARKS.md, "Catch-up memory bounded, and the allocator").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use cli::ClientArgs;
use cli::doc::{DocCmd, doc};
use cli::output::{print_json, print_status};
use cli::start::{StartArgs, start};
use cli::workflow::{RunsCmd, WorkflowCmd, runs, workflow};

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
    /// `{"event": "change"|"run"|"missed", "id", "data"}`; reconnects by
    /// itself, resuming after the last id printed (Ctrl-C to stop).
    Events {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: cli::events::EventsArgs,
    },
    /// Print a new random network key for `net.key` (64 hex digits).
    Keygen,
    /// Who may write and read what across the network: apply an access
    /// file (admins only), show the rules a node holds.
    Access {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        cmd: cli::access::AccessCmd,
    },
    /// API tokens for `[[api.tokens]]`.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(clap::Subcommand)]
enum TokenCmd {
    /// Print the SHA-256 of a token (64 hex digits), for `token_sha256`.
    /// Reads the token from standard input when not given, so that it stays
    /// out of the shell's history.
    Hash {
        /// The token.
        token: Option<String>,
    },
    /// Print a new random token and, on a second line, its SHA-256.
    New,
}

fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    use mergeflow::access::token_sha256;
    match cmd {
        TokenCmd::Hash { token } => {
            let token = match token {
                Some(t) => t,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            anyhow::ensure!(
                !token.is_empty(),
                "no token given (argument or standard input)"
            );
            println!("{}", token_sha256(&token));
        }
        TokenCmd::New => {
            // 32 hex digits of randomness: 128 bits.
            let token = &mergeflow::generate_key()[..32];
            println!("{token}\n{}", token_sha256(token));
        }
    }
    Ok(())
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
    mergeflow::cli_support::run(run(cli))
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
        Cmd::Events { client, args } => cli::events::events(&client.client(), args).await,
        Cmd::Keygen => {
            println!("{}", mergeflow::generate_key());
            Ok(())
        }
        Cmd::Token { cmd } => token(cmd),
        Cmd::Access { client, cmd } => cli::access::access(client, cmd).await,
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
    }
}
