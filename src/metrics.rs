//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! Latencies are histograms recorded as things happen ([`Timings`]); every
//! other number is read from the node at scrape time (the same sources as
//! `/v1/status`), so nothing is counted twice and a scrape costs what a
//! status call does. Names follow Prometheus conventions: a `mergeflow_`
//! prefix, base units in the name, `_total` on counters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};

use crate::Status;
use crate::net::PeerInfo;
use crate::sync::SyncStats;

/// Latency histograms (clones share their counts), kept by the parts that
/// record them: [`crate::runtime::Docs::write_latency`],
/// [`crate::workflow::Engine::run_latency`].
#[derive(Clone, Debug)]
pub struct Timings {
    /// Local writes, from the call to the answer (durable, or for workflow
    /// writes, applied).
    pub write: Histogram,
    /// Workflow runs: time spent running their steps.
    pub run: Histogram,
    /// Group-commit flushes of the store (`sled::Db::flush`).
    pub flush: Histogram,
}

/// The network's numbers that are not per peer: messages by kind, and
/// libp2p's own registry (swarm, protocols, bandwidth).
pub struct NetMetrics {
    /// Messages sent, by kind.
    pub sent: BTreeMap<&'static str, u64>,
    /// Messages received and decoded, by kind.
    pub received: BTreeMap<&'static str, u64>,
    /// libp2p's metrics, recorded by the network task.
    pub libp2p: Arc<Registry>,
}

/// Everything one scrape shows.
pub struct Scrape<'a> {
    /// The node's status.
    pub status: &'a Status,
    /// The sync core's counters (absent without network).
    pub sync: Option<&'a SyncStats>,
    /// Latency histograms.
    pub timings: &'a Timings,
    /// Known peers, connected or not.
    pub peers: &'a [PeerInfo],
    /// Network-wide counts (absent without network).
    pub net: Option<&'a NetMetrics>,
}

/// One number read at scrape time: a level (gauge) or a count since the
/// node started (counter), with its unit if it has one.
struct Sample {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    counter: bool,
    value: u64,
}

fn gauge(name: &'static str, help: &'static str, value: u64) -> Sample {
    Sample {
        name,
        help,
        unit: None,
        counter: false,
        value,
    }
}

fn counter(name: &'static str, help: &'static str, value: u64) -> Sample {
    Sample {
        counter: true,
        ..gauge(name, help, value)
    }
}

impl Sample {
    fn in_unit(self, unit: Unit) -> Sample {
        Sample {
            unit: Some(unit),
            ..self
        }
    }

    fn register(&self, r: &mut Registry, metric: impl Metric) {
        match &self.unit {
            Some(unit) => r.register_with_unit(self.name, self.help, unit.clone(), metric),
            None => r.register(self.name, self.help, metric),
        }
    }
}

/// The Prometheus text exposition of a scrape, then libp2p's metrics.
pub fn render(scrape: &Scrape) -> String {
    let Scrape {
        status,
        sync,
        timings,
        peers,
        net,
    } = *scrape;
    let w = &status.workflows;
    let mut samples = vec![
        gauge("docs", "Live documents", status.docs),
        gauge(
            "store_size",
            "Size of the store on disk",
            status.store_bytes,
        )
        .in_unit(Unit::Bytes),
        gauge(
            "peers_connected",
            "Peers connected now",
            status.peers as u64,
        ),
        gauge("uptime", "Time since the node started", status.uptime_s).in_unit(Unit::Seconds),
        counter(
            "flushes",
            "Group-commit flushes of the store",
            status.flushes,
        ),
        counter(
            "flushed_writes",
            "Writes acknowledged by group-commit flushes",
            status.flushed_writes,
        ),
        counter(
            "lazy_rounds",
            "Rounds of merged remote changes published before their flush",
            status.lazy_rounds,
        ),
        gauge(
            "workflows",
            "Workflow definitions loaded and valid",
            w.workflows,
        ),
        gauge(
            "workflows_invalid",
            "Workflow definition files that do not load",
            w.invalid,
        ),
        counter("workflow_runs_started", "Workflow runs created", w.runs),
        counter(
            "workflow_runs_done",
            "Workflow runs finished with every step done or skipped",
            w.done,
        ),
        counter(
            "workflow_runs_unchanged",
            "Workflow runs whose steps wrote nothing (the values were there)",
            w.unchanged,
        ),
        counter("workflow_runs_dead", "Workflow runs dead-lettered", w.dead),
        gauge(
            "workflow_dead_letters",
            "Dead runs in the run log now, waiting for retry or skip",
            w.dead_waiting,
        ),
        counter(
            "workflow_triggers_coalesced",
            "Triggers folded into a pending run of the same workflow and doc",
            w.coalesced,
        ),
    ];
    if let Some(s) = sync {
        samples.extend([
            counter(
                "sync_changes_applied",
                "Changes from peers applied on the fast path",
                s.changes_applied,
            ),
            counter(
                "sync_changes_missing_deps",
                "Changes from peers that lacked dependencies (repaired by a sync session)",
                s.changes_missing_deps,
            ),
            counter(
                "sync_messages_received",
                "Automerge sync messages received",
                s.sync_received,
            ),
            counter(
                "sync_sessions_reset",
                "Sync sessions reset for making no progress",
                s.sessions_reset,
            ),
            counter(
                "sync_inputs_rejected",
                "Inputs from peers rejected (malformed, oversized, invalid)",
                s.rejected,
            ),
            counter(
                "sync_docs_pushed_out",
                "Whole docs pushed to peers that lacked them",
                s.docs_pushed_out,
            ),
            counter(
                "sync_docs_pushed_in",
                "Whole docs merged from peers' pushes",
                s.docs_pushed_in,
            ),
            gauge(
                "sync_docs_lacking",
                "Docs peers hold that this node does not yet (on their way)",
                s.docs_lacking,
            ),
            counter(
                "anti_entropy_digests_in_sync",
                "Anti-entropy digests received that matched ours",
                s.digests_in_sync,
            ),
            counter(
                "anti_entropy_docs_differing",
                "Docs that anti-entropy found different",
                s.docs_differing,
            ),
        ]);
    }
    let mut r = Registry::with_prefix("mergeflow");
    for s in &samples {
        if s.counter {
            s.register(&mut r, ConstCounter::new(s.value));
        } else {
            s.register(
                &mut r,
                ConstGauge::new(i64::try_from(s.value).unwrap_or(i64::MAX)),
            );
        }
    }
    r.register_with_unit(
        "write_duration",
        "Local writes, from the call to the answer",
        Unit::Seconds,
        timings.write.clone(),
    );
    r.register_with_unit(
        "workflow_run_duration",
        "Workflow runs: time spent running their steps",
        Unit::Seconds,
        timings.run.clone(),
    );
    r.register_with_unit(
        "flush_duration",
        "Group-commit flushes of the store",
        Unit::Seconds,
        timings.flush.clone(),
    );
    register_peers(&mut r, peers);
    let changes = Family::<Labels, Counter>::default();
    for (origin, n) in [
        ("local", status.changes_local),
        ("remote", status.changes_remote),
    ] {
        changes
            .get_or_create(&vec![("origin", origin.into())])
            .inc_by(n);
    }
    r.register(
        "changes_applied",
        "Automerge changes stored: made here (local) or merged from peers or a restore (remote)",
        changes,
    );
    if let Some(net) = net {
        let messages = Family::<Labels, Counter>::default();
        for (direction, counts) in [("out", &net.sent), ("in", &net.received)] {
            for (kind, n) in counts {
                messages
                    .get_or_create(&vec![
                        ("direction", direction.into()),
                        ("kind", (*kind).into()),
                    ])
                    .inc_by(*n);
            }
        }
        r.register(
            "net_messages",
            "Sync messages sent (one per recipient; a gossipsub publish once) and received, by kind",
            messages,
        );
    }
    let mut out = String::new();
    encode_registry(&mut out, &r).expect("writing to a String does not fail");
    if let Some(net) = net {
        encode_registry(&mut out, &net.libp2p).expect("writing to a String does not fail");
    }
    encode_eof(&mut out).expect("writing to a String does not fail");
    out
}

/// Label pairs of a series.
type Labels = Vec<(&'static str, String)>;

/// Per-peer series, labelled `peer="<peer id>"`: one set per peer this node
/// has known since it started.
fn register_peers(r: &mut Registry, peers: &[PeerInfo]) {
    let connected = Family::<Labels, Gauge>::default();
    let syncing = Family::<Labels, Gauge>::default();
    let in_sync_at = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let messages = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let rejected = Family::<Labels, Counter>::default();
    let rate_limited = Family::<Labels, Counter>::default();
    for p in peers {
        let peer = || vec![("peer", p.peer_id.clone())];
        let way = |direction: &'static str| {
            vec![("peer", p.peer_id.clone()), ("direction", direction.into())]
        };
        connected.get_or_create(&peer()).set(i64::from(p.connected));
        syncing
            .get_or_create(&peer())
            .set(i64::try_from(p.docs_syncing).unwrap_or(i64::MAX));
        if let Some(ms) = p.last_in_sync_at {
            in_sync_at.get_or_create(&peer()).set(ms as f64 / 1000.0);
        }
        let t = &p.traffic;
        messages.get_or_create(&way("out")).inc_by(t.messages_out);
        messages.get_or_create(&way("in")).inc_by(t.messages_in);
        bytes.get_or_create(&way("out")).inc_by(t.bytes_out);
        bytes.get_or_create(&way("in")).inc_by(t.bytes_in);
        rejected.get_or_create(&peer()).inc_by(p.rejected);
        rate_limited.get_or_create(&peer()).inc_by(p.rate_limited);
    }
    r.register(
        "peer_connected",
        "1 if the peer is connected now",
        connected,
    );
    r.register(
        "peer_docs_syncing",
        "Docs with a sync session open to the peer (still converging)",
        syncing,
    );
    r.register_with_unit(
        "peer_last_in_sync_timestamp",
        "When the peer's anti-entropy digest last matched ours (all docs in sync)",
        Unit::Seconds,
        in_sync_at,
    );
    r.register(
        "peer_messages",
        "Sync messages exchanged with the peer, by direction",
        messages,
    );
    r.register_with_unit(
        "peer_traffic",
        "Bytes of sync frames and gossip exchanged with the peer, by direction",
        Unit::Bytes,
        bytes,
    );
    r.register(
        "peer_rejected",
        "Strikes against the peer: undecodable inputs and seconds over its rate limit",
        rejected,
    );
    r.register(
        "peer_rate_limited",
        "Frames from the peer dropped for going over its rate limit",
        rate_limited,
    );
}
