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
use prometheus_client::registry::{Metric, Registry, Unit};

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

/// The Prometheus text exposition of `status`, the sync core's counters
/// (`sync`, absent without network) and `timings`.
pub fn render(status: &Status, sync: Option<&SyncStats>, timings: &Timings) -> String {
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
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String does not fail");
    out
}
