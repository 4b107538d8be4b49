//! Run records: what one run of a workflow on one doc state did, step by
//! step. Stored as JSON in the run log (`crate::store` tree `runs`) and
//! served as is by the API.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Taken, steps not started (or waiting to be resumed after a restart).
    Queued,
    /// Steps executing.
    Running,
    /// Every step done or skipped.
    Done,
    /// A step failed after its last attempt (or could not run at all);
    /// waits for `retry` or `skip`.
    Dead,
    /// A dead run a user chose to skip.
    Skipped,
}

impl RunStatus {
    /// Parses the name used in the API (`queued`, `running`, ...).
    pub fn parse(s: &str) -> Option<RunStatus> {
        serde_json::from_value(Json::String(s.to_string())).ok()
    }

    /// How the status reads in a sentence about a run: `is queued`,
    /// `was skipped`, ...
    pub fn phrase(self) -> &'static str {
        match self {
            RunStatus::Queued => "is queued",
            RunStatus::Running => "is running",
            RunStatus::Done => "is done",
            RunStatus::Dead => "is dead",
            RunStatus::Skipped => "was skipped",
        }
    }

    /// True while the run still has work to do.
    pub fn is_open(self) -> bool {
        matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Executing (or retrying).
    Running,
    /// Succeeded.
    Done,
    /// Its `when` was false, or a step it needs was skipped.
    Skipped,
    /// Failed after its last attempt.
    Failed,
    /// Not run because a step it needs failed.
    Cancelled,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRun {
    /// The step's id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Where it is.
    pub state: StepState,
    /// Attempts made.
    pub attempts: u32,
    /// Unix ms of the first attempt.
    pub started_ms: Option<u64>,
    /// Unix ms it finished.
    pub finished_ms: Option<u64>,
    /// What it did (e.g. the paths a derive wrote).
    pub output: Option<Json>,
    /// Why it failed or was skipped.
    pub error: Option<String>,
}

/// One run of a workflow on one state of one doc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Run id, increasing on this node.
    pub id: u64,
    /// hash(workflow, doc, trigger heads): the same on every node that runs
    /// it, and the idempotency key effects send.
    pub key: String,
    /// The workflow.
    pub workflow: String,
    /// The triggering doc.
    pub doc: String,
    /// The doc's heads the run started from (the trigger state).
    pub heads: Vec<String>,
    /// Runs in the chain of triggers up to this one (1: triggered by a write
    /// no workflow made).
    pub depth: u32,
    /// What started it: `change`, `startup` (a doc state no run had taken
    /// when the node started: written while it was down, or before the
    /// workflow existed), `definition` (a doc state no run had taken when a
    /// new or changed definition was loaded while the node ran), `schedule`,
    /// `retry`.
    pub trigger: String,
    /// Where it is.
    pub status: RunStatus,
    /// Unix ms it was created.
    pub created_ms: u64,
    /// Unix ms of its last update.
    pub updated_ms: u64,
    /// Why it is dead.
    pub error: Option<String>,
    /// Its steps, in execution order.
    pub steps: Vec<StepRun>,
    /// Where the change that triggered it came from, as the change feed
    /// says: this node's peer id (a local write), a peer's, or
    /// `automerge:<senderId>` (an automerge-repo client of the node that
    /// merged it). Absent for runs not started by a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// The run key: hex of SHA-256 over workflow, doc and sorted heads
/// (truncated to 128 bits).
pub fn run_key(workflow: &str, doc: &str, heads: &[String]) -> String {
    let mut sorted: Vec<&str> = heads.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    h.update(workflow.as_bytes());
    h.update([0]);
    h.update(doc.as_bytes());
    for head in sorted {
        h.update([0]);
        h.update(head.as_bytes());
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_keys_ignore_head_order_and_tell_workflows_docs_and_heads_apart() {
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let k = run_key("w", "d", &h(&["a", "b"]));
        assert_eq!(k.len(), 32);
        assert_eq!(k, run_key("w", "d", &h(&["b", "a"])));
        assert_ne!(k, run_key("w2", "d", &h(&["a", "b"])));
        assert_ne!(k, run_key("w", "d2", &h(&["a", "b"])));
        assert_ne!(k, run_key("w", "d", &h(&["a"])));
        assert_eq!(RunStatus::parse("dead"), Some(RunStatus::Dead));
        assert_eq!(RunStatus::parse("nope"), None);
    }
}
