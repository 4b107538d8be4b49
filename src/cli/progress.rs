//! Progress shown in the terminal: a node's initial sync.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mergeflow::cli_support::progress_bar as bar;
use mergeflow::client::Client;

/// How often `wait-synced` asks peers for their digests while some do not
/// match (a digest lost on the way, or docs still syncing).
const ASK_AGAIN: Duration = Duration::from_secs(3);

/// `mergeflow wait-synced`: shows the node's docs against those its peers
/// hold that it lacks, until it is in sync with every connected peer (no
/// doc lacking or syncing, and each peer's digest matched since the wait
/// began). It asks the peers for their digests at once, and again every
/// few seconds while some do not match, so a node already in sync answers
/// within a round trip, not at the next anti-entropy round.
pub async fn wait_synced(client: &Client, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let since = mergeflow::doc::now_ms();
    let mut asked: Option<Instant> = None;
    let bar = bar(
        Some(0),
        "{spinner} syncing [{bar:30}] {pos}/{len} docs here, {msg}",
    );
    loop {
        let status = client.status().await?;
        let peers = client.peers().await?;
        let connected: Vec<_> = peers.iter().filter(|p| p.connected).collect();
        let lacking = status.docs_lacking.unwrap_or(0);
        let syncing: usize = connected.iter().map(|p| p.docs_syncing).sum();
        let matched = connected
            .iter()
            .filter(|p| p.last_in_sync_at.is_some_and(|t| t >= since))
            .count();
        if matched < connected.len() && asked.is_none_or(|t| t.elapsed() >= ASK_AGAIN) {
            client.ask_digests().await?;
            asked = Some(Instant::now());
        }
        bar.set_length(status.docs + lacking);
        bar.set_position(status.docs);
        bar.set_message(format!(
            "{syncing} syncing, {matched}/{} peers in sync",
            connected.len()
        ));
        if !connected.is_empty() && lacking == 0 && syncing == 0 && matched == connected.len() {
            bar.finish_and_clear();
            println!(
                "in sync with {} peers: {} docs, after {:.1}s",
                connected.len(),
                status.docs,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bar.finish_and_clear();
            bail!(
                "not in sync after {}s: {} peers connected ({matched} in sync), {lacking} docs lacking, {syncing} syncing",
                timeout.as_secs(),
                connected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
