//! The node's status: what `GET /v1/status` serves, and the numbers
//! `/metrics` reads from the same sources at scrape time (as metric
//! families for [`crate::metrics`], which imports nothing back).

use std::collections::BTreeMap;

use prometheus_client::registry::Unit;
use serde::{Deserialize, Serialize};

use crate::metrics::{Family, Number};
use crate::net::PeerInfo;
use crate::sync::SyncStats;

/// A snapshot of the node's state, as served by `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// libp2p peer id.
    pub peer_id: String,
    /// mergeflow version.
    pub version: String,
    /// Live documents.
    pub docs: u64,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Data directory.
    pub data_dir: String,
    /// This boot's Automerge actor id (hex).
    pub actor: String,
    /// Boot number of this data dir.
    pub boot: u64,
    /// HTTP API address, if served.
    pub api: Option<String>,
    /// Store size on disk, in bytes.
    pub store_bytes: u64,
    /// Peer-to-peer listen addresses, with `/p2p/<peer id>` (empty without network).
    pub listen_addrs: Vec<String>,
    /// Connected peers.
    pub peers: usize,
    /// Hash of every doc id and its heads; equal on two nodes exactly when
    /// they hold the same docs at the same heads (absent without sync).
    pub digest: Option<String>,
    /// Why the store failed, if it has (see [`crate::Node::store_failure`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Group-commit flushes since start.
    pub flushes: u64,
    /// Writes acknowledged by those flushes.
    pub flushed_writes: u64,
    /// Rounds of merged remote changes that went to the change feed before
    /// their flush (they are flushed within `store.remote_flush_ms`).
    pub lazy_rounds: u64,
    /// Workflow definitions and runs since start.
    pub workflows: crate::workflow::EngineStats,
    /// Automerge changes made on this node since start (writes, workflow
    /// writes).
    #[serde(default)]
    pub changes_local: u64,
    /// Automerge changes merged from peers (or a restore) since start.
    #[serde(default)]
    pub changes_remote: u64,
    /// Long operations in progress (backup, restore).
    #[serde(default)]
    pub tasks: Vec<crate::progress::Task>,
    /// Docs that peers hold and this node does not yet (on their way: a new
    /// node's initial sync is done when this is 0); absent without sync.
    #[serde(default)]
    pub docs_lacking: Option<u64>,
    /// Documents loaded in memory now (`store.cache_docs` bounds them, plus
    /// those in use).
    #[serde(default)]
    pub docs_cached: u64,
    /// The most documents loaded in memory at once since start.
    #[serde(default)]
    pub docs_cached_peak: u64,
    /// Light mode (`node.light`, `--light`) is on.
    #[serde(default)]
    pub light: bool,
    /// The effective configuration (defaults < file < `MERGEFLOW_*` <
    /// flags), as in `config.example.toml`, durations in milliseconds;
    /// `api.token` and `net.key` read `"(set)"` when set. JSON rather than
    /// [`crate::config::Config`] so that a client reads the status of a node
    /// whose version has other keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// The automerge-repo sync servers this node dials
    /// (`[[automerge.servers]]`), in config order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub automerge_servers: Vec<ServerLinkStatus>,
    /// The MQTT bridges (`[[mqtt]]`), in config order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mqtt: Vec<crate::mqtt::BridgeInfo>,
}

/// One `[[automerge.servers]]` link, as `GET /v1/status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerLinkStatus {
    /// The server's URL, without its query (which may hold a token).
    pub url: String,
    /// The glob of the docs shared with it.
    pub docs: String,
    /// Joined now.
    pub connected: bool,
    /// The server's peer id, once it has answered `join`.
    pub peer: Option<String>,
    /// Docs shared over the current connection.
    pub shared_docs: usize,
    /// Times it joined since start.
    pub joins: u64,
    /// Why the link last went down, if it has.
    pub last_error: Option<String>,
}

/// The links' statuses, shared between their tasks and the node.
pub type ServerLinks = std::sync::Arc<std::sync::Mutex<Vec<ServerLinkStatus>>>;

/// The network's numbers that are not per peer: messages by kind.
pub(crate) struct NetCounts {
    /// Messages sent, by kind.
    pub sent: BTreeMap<&'static str, u64>,
    /// Messages received and decoded, by kind.
    pub received: BTreeMap<&'static str, u64>,
}

/// Everything one scrape reads.
pub(crate) struct Scrape<'a> {
    /// The node's status.
    pub status: &'a Status,
    /// The sync core's counters (absent without network).
    pub sync: Option<&'a SyncStats>,
    /// Known peers, connected or not.
    pub peers: &'a [PeerInfo],
    /// Network-wide counts (absent without network).
    pub net: Option<&'a NetCounts>,
}

/// The numbers `/metrics` reads at scrape time, as metric families.
pub(crate) fn families(scrape: &Scrape) -> Vec<Family> {
    let Scrape {
        status,
        sync,
        peers,
        net,
    } = *scrape;
    let w = &status.workflows;
    let mut samples = vec![
        Family::gauge("docs", "Live documents", status.docs),
        Family::gauge(
            "store_size",
            "Size of the store on disk",
            status.store_bytes,
        )
        .in_unit(Unit::Bytes),
        Family::gauge(
            "peers_connected",
            "Peers connected now",
            status.peers as u64,
        ),
        Family::gauge(
            "docs_cached",
            "Documents loaded in memory now",
            status.docs_cached,
        ),
        Family::gauge(
            "docs_cached_peak",
            "The most documents loaded in memory at once since start",
            status.docs_cached_peak,
        ),
        Family::gauge("uptime", "Time since the node started", status.uptime_s)
            .in_unit(Unit::Seconds),
        Family::counter(
            "flushes",
            "Group-commit flushes of the store",
            status.flushes,
        ),
        Family::counter(
            "flushed_writes",
            "Writes acknowledged by group-commit flushes",
            status.flushed_writes,
        ),
        Family::counter(
            "lazy_rounds",
            "Rounds of merged remote changes published before their flush",
            status.lazy_rounds,
        ),
        Family::gauge(
            "workflows",
            "Workflow definitions loaded and valid",
            w.workflows,
        ),
        Family::gauge(
            "workflows_invalid",
            "Workflow definition files that do not load",
            w.invalid,
        ),
        Family::counter("workflow_runs_started", "Workflow runs created", w.runs),
        Family::counter(
            "workflow_runs_done",
            "Workflow runs finished with every step done or skipped",
            w.done,
        ),
        Family::counter(
            "workflow_runs_unchanged",
            "Workflow runs whose steps wrote nothing (the values were there)",
            w.unchanged,
        ),
        Family::counter("workflow_runs_dead", "Workflow runs dead-lettered", w.dead),
        Family::gauge(
            "workflow_dead_letters",
            "Dead runs in the run log now, waiting for retry or skip",
            w.dead_waiting,
        ),
        Family::counter(
            "workflow_triggers_coalesced",
            "Triggers folded into a pending run of the same workflow and doc",
            w.coalesced,
        ),
    ];
    if let Some(s) = sync {
        samples.extend([
            Family::counter(
                "sync_changes_applied",
                "Changes from peers applied on the fast path",
                s.changes_applied,
            ),
            Family::counter(
                "sync_changes_missing_deps",
                "Changes from peers that lacked dependencies (repaired by a sync session)",
                s.changes_missing_deps,
            ),
            Family::counter(
                "sync_messages_received",
                "Automerge sync messages received",
                s.sync_received,
            ),
            Family::counter(
                "sync_sessions_reset",
                "Sync sessions reset for making no progress",
                s.sessions_reset,
            ),
            Family::counter(
                "sync_inputs_rejected",
                "Inputs from peers rejected (malformed, oversized, invalid)",
                s.rejected,
            ),
            Family::counter(
                "sync_docs_settling",
                "Docs anti-entropy found different but left to the fast path, having just changed here",
                s.docs_settling,
            ),
            Family::counter(
                "sync_buckets_settling",
                "Digest buckets left out of a comparison, docs in them having just changed here",
                s.buckets_settling,
            ),
            Family::counter(
                "sync_docs_pushed_out",
                "Whole docs pushed to peers that lacked them",
                s.docs_pushed_out,
            ),
            Family::counter(
                "sync_docs_pushed_in",
                "Whole docs merged from peers' pushes",
                s.docs_pushed_in,
            ),
            Family::counter(
                "sync_out_of_scope_dropped",
                "Messages about docs outside this node's scope (node.replicate and read grants), dropped",
                s.out_of_scope,
            ),
            Family::gauge(
                "sync_docs_lacking",
                "Docs peers hold that this node does not yet (on their way)",
                s.docs_lacking,
            ),
            Family::counter(
                "anti_entropy_digests_in_sync",
                "Anti-entropy digests received that matched ours",
                s.digests_in_sync,
            ),
            Family::counter(
                "anti_entropy_digests_skipped",
                "Due anti-entropy digests not sent: nothing changed since the peer agreed",
                s.digests_skipped,
            ),
            Family::counter(
                "anti_entropy_docs_differing",
                "Docs that anti-entropy found different",
                s.docs_differing,
            ),
        ]);
    }
    push_peers(&mut samples, peers);
    push_mqtt(&mut samples, &status.mqtt);
    let mut changes = Family::labelled_counter(
        "changes_applied",
        "Automerge changes stored: made here (local) or merged from peers or a restore (remote)",
    );
    for (origin, n) in [
        ("local", status.changes_local),
        ("remote", status.changes_remote),
    ] {
        changes.push(vec![("origin", origin.into())], Number::Int(n));
    }
    samples.push(changes);
    if let Some(net) = net {
        let mut messages = Family::labelled_counter(
            "net_messages",
            "Sync messages sent (one per recipient; a gossipsub publish once) and received, by kind",
        );
        for (direction, counts) in [("out", &net.sent), ("in", &net.received)] {
            for (kind, n) in counts {
                messages.push(
                    vec![("direction", direction.into()), ("kind", (*kind).into())],
                    Number::Int(*n),
                );
            }
        }
        samples.push(messages);
    }
    samples
}

/// Per-bridge series, labelled `broker="<url>"`.
fn push_mqtt(out: &mut Vec<Family>, bridges: &[crate::mqtt::BridgeInfo]) {
    if bridges.is_empty() {
        return;
    }
    let mut connected = Family::labelled_gauge(
        "mqtt_connected",
        "1 if the MQTT bridge is connected to its broker",
    );
    let mut messages = Family::labelled_counter(
        "mqtt_messages",
        "MQTT messages taken in, by what became of them: stored in a doc, a duplicate already stored, a dead letter",
    );
    let mut published =
        Family::labelled_counter("mqtt_published", "Doc states published to the broker");
    for b in bridges {
        let broker = || vec![("broker", b.url.clone())];
        connected.push(broker(), Number::Int(u64::from(b.connected)));
        for (result, n) in [
            ("stored", b.stored),
            ("duplicate", b.duplicates),
            ("dead", b.dead_letters),
        ] {
            let mut labels = broker();
            labels.push(("result", result.into()));
            messages.push(labels, Number::Int(n));
        }
        published.push(broker(), Number::Int(b.published));
    }
    out.extend([connected, messages, published]);
}

/// Per-peer series, labelled `peer="<peer id>"`: one set per peer this node
/// has known since it started.
fn push_peers(out: &mut Vec<Family>, peers: &[PeerInfo]) {
    let mut connected = Family::labelled_gauge("peer_connected", "1 if the peer is connected now");
    let mut syncing = Family::labelled_gauge(
        "peer_docs_syncing",
        "Docs with a sync session open to the peer (still converging)",
    );
    let mut in_sync_at = Family::labelled_gauge(
        "peer_last_in_sync_timestamp",
        "When the peer's anti-entropy digest last matched ours (all docs in sync)",
    )
    .in_unit(Unit::Seconds);
    let mut messages = Family::labelled_counter(
        "peer_messages",
        "Sync messages exchanged with the peer, by direction",
    );
    let mut bytes = Family::labelled_counter(
        "peer_traffic",
        "Bytes of sync frames and gossip exchanged with the peer, by direction",
    )
    .in_unit(Unit::Bytes);
    let mut rejected = Family::labelled_counter(
        "peer_rejected",
        "Strikes against the peer: undecodable inputs and seconds over its rate limit",
    );
    let mut rate_limited = Family::labelled_counter(
        "peer_rate_limited",
        "Frames from the peer dropped for going over its rate limit",
    );
    for p in peers {
        let peer = || vec![("peer", p.peer_id.clone())];
        let way = |direction: &'static str| {
            vec![("peer", p.peer_id.clone()), ("direction", direction.into())]
        };
        connected.push(peer(), Number::Int(u64::from(p.connected)));
        syncing.push(peer(), Number::Int(p.docs_syncing as u64));
        if let Some(ms) = p.last_in_sync_at {
            in_sync_at.push(peer(), Number::Float(ms as f64 / 1000.0));
        }
        let t = &p.traffic;
        messages.push(way("out"), Number::Int(t.messages_out));
        messages.push(way("in"), Number::Int(t.messages_in));
        bytes.push(way("out"), Number::Int(t.bytes_out));
        bytes.push(way("in"), Number::Int(t.bytes_in));
        rejected.push(peer(), Number::Int(p.rejected));
        rate_limited.push(peer(), Number::Int(p.rate_limited));
    }
    out.extend([
        connected,
        syncing,
        in_sync_at,
        messages,
        bytes,
        rejected,
        rate_limited,
    ]);
}
