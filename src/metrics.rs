//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! Latencies are histograms recorded as things happen ([`Timings`]); every
//! other number is read from the node at scrape time (the same sources as
//! `/v1/status`), so nothing is counted twice and a scrape costs what a
//! status call does. Names follow Prometheus conventions: a `mergeflow_`
//! prefix, base units in the name, `_total` on counters.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::Status;
use crate::sync::SyncStats;

/// Latency histograms (clones share their counts), kept by the parts that
/// record them: [`crate::doc::Docs::write_latency`],
/// [`crate::workflow::Engine::run_latency`].
#[derive(Clone, Debug)]
pub struct Timings {
    /// Local writes, from the call to the answer (durable, or for workflow
    /// writes, applied).
    pub write: Histogram,
    /// Workflow runs: time spent running their steps.
    pub run: Histogram,
}

/// A latency histogram in seconds: 50 us to ~26 s, doubling.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// The Prometheus text exposition of `status`, the sync core's counters
/// (`sync`, absent without network) and `timings`.
pub fn render(status: &Status, sync: Option<&SyncStats>, timings: &Timings) -> String {
    let mut r = Registry::with_prefix("mergeflow");
    if let Some(s) = sync {
        let counters = [
            (
                "sync_changes_applied",
                "Changes from peers applied on the fast path",
                s.changes_applied,
            ),
            (
                "sync_changes_missing_deps",
                "Changes from peers that lacked dependencies (repaired by a sync session)",
                s.changes_missing_deps,
            ),
            (
                "sync_messages_received",
                "Automerge sync messages received",
                s.sync_received,
            ),
            (
                "sync_sessions_reset",
                "Sync sessions reset for making no progress",
                s.sessions_reset,
            ),
            (
                "sync_inputs_rejected",
                "Inputs from peers rejected (malformed, oversized, invalid)",
                s.rejected,
            ),
            (
                "sync_docs_pushed_out",
                "Whole docs pushed to peers that lacked them",
                s.docs_pushed_out,
            ),
            (
                "sync_docs_pushed_in",
                "Whole docs merged from peers' pushes",
                s.docs_pushed_in,
            ),
            (
                "anti_entropy_digests_in_sync",
                "Anti-entropy digests received that matched ours",
                s.digests_in_sync,
            ),
            (
                "anti_entropy_docs_differing",
                "Docs that anti-entropy found different",
                s.docs_differing,
            ),
        ];
        for (name, help, value) in counters {
            r.register(name, help, ConstCounter::new(value));
        }
    }
    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    r.register("docs", "Live documents", gauge(status.docs));
    r.register_with_unit(
        "store_size",
        "Size of the store on disk",
        Unit::Bytes,
        gauge(status.store_bytes),
    );
    r.register(
        "peers_connected",
        "Peers connected now",
        gauge(status.peers as u64),
    );
    r.register_with_unit(
        "uptime",
        "Time since the node started",
        Unit::Seconds,
        gauge(status.uptime_s),
    );
    r.register(
        "flushes",
        "Group-commit flushes of the store",
        ConstCounter::new(status.flushes),
    );
    r.register(
        "flushed_writes",
        "Writes acknowledged by group-commit flushes",
        ConstCounter::new(status.flushed_writes),
    );
    r.register(
        "lazy_rounds",
        "Rounds of merged remote changes published before their flush",
        ConstCounter::new(status.lazy_rounds),
    );
    r.register_with_unit(
        "write_duration",
        "Local writes, from the call to the answer",
        Unit::Seconds,
        timings.write.clone(),
    );
    let w = &status.workflows;
    r.register(
        "workflows",
        "Workflow definitions loaded and valid",
        gauge(w.workflows),
    );
    r.register(
        "workflows_invalid",
        "Workflow definition files that do not load",
        gauge(w.invalid),
    );
    r.register(
        "workflow_runs_started",
        "Workflow runs created",
        ConstCounter::new(w.runs),
    );
    r.register(
        "workflow_runs_done",
        "Workflow runs finished with every step done or skipped",
        ConstCounter::new(w.done),
    );
    r.register(
        "workflow_runs_unchanged",
        "Workflow runs whose steps wrote nothing (the values were there)",
        ConstCounter::new(w.unchanged),
    );
    r.register(
        "workflow_runs_dead",
        "Workflow runs dead-lettered",
        ConstCounter::new(w.dead),
    );
    r.register(
        "workflow_dead_letters",
        "Dead runs in the run log now, waiting for retry or skip",
        gauge(w.dead_waiting),
    );
    r.register(
        "workflow_triggers_coalesced",
        "Triggers folded into a pending run of the same workflow and doc",
        ConstCounter::new(w.coalesced),
    );
    r.register_with_unit(
        "workflow_run_duration",
        "Workflow runs: time spent running their steps",
        Unit::Seconds,
        timings.run.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String does not fail");
    out
}
