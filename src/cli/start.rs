//! `mergeflow start`: run a node, restart it in place after a store failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use mergeflow::config::{Config, LogFormat, Overrides};

#[derive(Args)]
pub(crate) struct StartArgs {
    /// Data directory [default: ./mergeflow-data; config node.data_dir].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// HTTP API listen address [default: 127.0.0.1:7700; config api.listen].
    #[arg(long)]
    pub(crate) api: Option<SocketAddr>,
    /// TOML config file (see config.example.toml).
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    /// Log format [config log.format].
    #[arg(long, value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// Log filter such as `info` or `mergeflow=debug` [config log.level; RUST_LOG wins].
    #[arg(long)]
    pub(crate) log_level: Option<String>,
    /// Multiaddr to listen on for peers, e.g. /ip4/0.0.0.0/tcp/4001 (repeatable) [config net.listen].
    #[arg(long)]
    pub(crate) listen: Vec<String>,
    /// Multiaddr of a peer to dial and keep dialing (repeatable) [config net.peers].
    #[arg(long)]
    pub(crate) peer: Vec<String>,
    /// Do not discover peers with mDNS [config net.mdns].
    #[arg(long)]
    pub(crate) no_mdns: bool,
    /// Light mode for small devices: no dashboard, small caches and queues,
    /// anti-entropy every 2 min; keys you set still win [config node.light].
    #[arg(long)]
    pub(crate) light: bool,
}

pub(crate) async fn start(args: StartArgs) -> Result<()> {
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
pub(crate) const RESTARTS_ENV: &str = "MERGEFLOW_INTERNAL_RESTARTS";
/// Carries the API and p2p addresses the last run listened on across
/// [`reexec`], as JSON `[api, [multiaddr...]]`.
pub(crate) const LISTEN_ENV: &str = "MERGEFLOW_INTERNAL_LISTEN";

/// The wait before restart number `n` (from 1): 1 s, doubling, at most
/// [`MAX_BACKOFF`].
pub(crate) fn restart_backoff(n: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(n.saturating_sub(1).min(5))).min(MAX_BACKOFF)
}

/// Restarts after store failures (each within a minute of the last start,
/// or failing to start) before giving up.
pub(crate) const MAX_RESTARTS: u32 = 10;
/// Longest wait between restarts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a node whose store failed gets to stop before the process is
/// started over instead.
pub(crate) const FAILED_STOP_WAIT: Duration = Duration::from_secs(10);

/// Replaces this process with a fresh run of the same program, arguments and
/// environment, telling it this is restart number `restarts` and where the
/// last run listened (`listen`, see [`LISTEN_ENV`]) (the pid stays,
/// so a supervisor sees no exit). Files and sockets close on exec, which lets
/// go of the data dir's lock. Returns only if the exec failed.
pub(crate) fn reexec(restarts: u32, listen: &str) -> anyhow::Error {
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
pub(crate) async fn has_room_again(dir: &std::path::Path) {
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
pub(crate) const ROOM_FREED: u64 = 16 << 20;
/// Free space that counts as room whatever the failure was (and at least a
/// tenth of the file system).
pub(crate) const ROOM_PLENTY: u64 = 64 << 20;
/// The test write before a restart.
pub(crate) const PROBE_BYTES: usize = 4 << 20;
/// How often a failed store's data dir is checked.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Resolves with the error once the node's store has failed.
pub(crate) async fn store_failed(node: &mergeflow::Node) -> String {
    loop {
        if let Some(e) = node.store_failure() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Resolves on SIGINT or SIGTERM. Install it before announcing readiness: until
/// the handlers exist, SIGTERM would kill the process without a clean stop.
pub(crate) fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
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

/// The filter for `log.level`: Kademlia's "Failed to trigger bootstrap: No
/// known peers" warning (at start and every refresh, on a node that has no
/// peers yet, which is normal) is left out unless the level names
/// `libp2p_kad`.
fn log_directives(level: &str) -> String {
    if level.contains("libp2p_kad") {
        level.to_string()
    } else {
        format!("{level},libp2p_kad::behaviour=error")
    }
}

pub(crate) fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(log_directives(&config.log.level)));
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

#[cfg(test)]
mod tests {
    use super::log_directives;

    #[test]
    fn the_lone_node_bootstrap_warning_is_left_out_unless_kad_is_named() {
        let f = log_directives("info");
        assert_eq!(f, "info,libp2p_kad::behaviour=error");
        tracing_subscriber::EnvFilter::try_new(&f).expect("a valid filter");
        assert_eq!(log_directives("libp2p_kad=debug"), "libp2p_kad=debug");
    }
}
