//! `GET /v1/status/history`: the last hour of a few counters, for the
//! dashboard's plots, so that they show the past hour when the page opens
//! instead of starting empty.
//!
//! A sample every [`INTERVAL`] (the first at start) goes into a ring of
//! [`SAMPLES`]: changes made here and merged from peers, runs done and dead,
//! and each peer's docs still syncing (at most [`MAX_PEERS`] peers). Only
//! counters the node keeps anyway; nothing here touches the store. The
//! sampler runs while the dashboard is on (`api.dashboard`); with it off the
//! answer holds only the sample taken for the request.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use crate::node::Node;

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: an hour.
pub const SAMPLES: usize = 360;
/// Most peers in one sample (connected ones first).
pub const MAX_PEERS: usize = 32;

/// One sample of the node's counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Unix ms it was taken.
    pub at_ms: u64,
    /// Automerge changes made on this node since start (as in `/v1/status`).
    pub changes_local: u64,
    /// Changes merged from peers since start.
    pub changes_remote: u64,
    /// Workflow runs done since start.
    pub runs_done: u64,
    /// Workflow runs dead-lettered since start.
    pub runs_dead: u64,
    /// Each known peer's sync state.
    pub peers: Vec<PeerSample>,
}

/// One peer in a [`Sample`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerSample {
    /// The peer.
    pub peer_id: String,
    /// Connected then.
    pub connected: bool,
    /// Docs with a sync session open to it (still converging).
    pub docs_syncing: usize,
}

/// Body of `GET /v1/status/history`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryBody {
    /// Milliseconds between samples.
    pub interval_ms: u64,
    /// Oldest first; the last one is taken for this request.
    pub samples: Vec<Sample>,
}

/// The ring of samples, shared by the sampler and the handler.
#[derive(Debug, Default)]
pub(crate) struct History {
    ring: Mutex<VecDeque<Sample>>,
}

impl History {
    /// A ring, with a task that fills it every [`INTERVAL`] until the node
    /// shuts down when `sample` is true (the dashboard is on). The task is
    /// on the node's tracker, so shutdown waits for it to drop its clone of
    /// the node.
    pub(crate) fn start(node: &Node, sample: bool) -> Arc<History> {
        let history = Arc::new(History::default());
        if sample {
            let h = history.clone();
            let node = node.clone();
            let stop = node.shutdown_token();
            node.task_tracker().spawn(async move {
                let mut tick = tokio::time::interval(INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => h.push(take(&node)),
                    }
                }
            });
        }
        history
    }

    fn push(&self, s: Sample) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    /// The samples, oldest first, and one taken now.
    pub(crate) fn answer(&self, node: &Node) -> HistoryBody {
        let mut samples: Vec<Sample> = self
            .ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        samples.push(take(node));
        HistoryBody {
            interval_ms: INTERVAL.as_millis() as u64,
            samples,
        }
    }
}

/// A sample of `node` now.
fn take(node: &Node) -> Sample {
    let (changes_local, changes_remote) = node.docs().changes_stored();
    let runs = node.workflows().stats();
    let mut peers: Vec<PeerSample> = node
        .peers()
        .into_iter()
        .map(|p| PeerSample {
            peer_id: p.peer_id,
            connected: p.connected,
            docs_syncing: p.docs_syncing,
        })
        .collect();
    peers.sort_by(|a, b| {
        b.connected
            .cmp(&a.connected)
            .then(a.peer_id.cmp(&b.peer_id))
    });
    peers.truncate(MAX_PEERS);
    Sample {
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        changes_local,
        changes_remote,
        runs_done: runs.done,
        runs_dead: runs.dead,
        peers,
    }
}

/// `GET /v1/status/history`.
pub(crate) async fn handler(
    State((node, history)): State<(Node, Arc<History>)>,
) -> Json<HistoryBody> {
    Json(history.answer(&node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64) -> Sample {
        Sample {
            at_ms,
            changes_local: 0,
            changes_remote: 0,
            runs_done: 0,
            runs_dead: 0,
            peers: vec![],
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_hour() {
        let h = History::default();
        for t in 0..(SAMPLES as u64 + 5) {
            h.push(sample(t));
        }
        let ring = h.ring.lock().unwrap();
        assert_eq!(ring.len(), SAMPLES);
        assert_eq!(ring.front().unwrap().at_ms, 5);
        assert_eq!(ring.back().unwrap().at_ms, SAMPLES as u64 + 4);
    }
}
