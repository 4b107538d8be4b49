//! The run log: run records in the store, with an index in memory.
//!
//! Every record is read once, when the engine starts; from then on the
//! index (run id -> status and workflow) answers listings and pruning, so
//! neither decodes the whole log again. A node that keeps 10,000 runs used
//! to decode all of them on every prune (each 1,000 runs) and every listing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::error::WorkflowError;
use super::run::{Run, RunStatus};
use crate::store::{Store, StoreError};

/// What the index keeps of a run.
#[derive(Debug, Clone)]
struct Entry {
    status: RunStatus,
    workflow: Arc<str>,
    /// The triggering doc (empty for a scheduled run).
    doc: Arc<str>,
}

/// The run log of one node.
pub(super) struct RunLog {
    store: Store,
    /// Every decodable run record in the store, by id (oldest first).
    /// Held while the store changes, so the two agree.
    index: Mutex<BTreeMap<u64, Entry>>,
    /// Dead runs in the index (kept as it changes, for status reads).
    dead: AtomicU64,
}

/// Decodes a stored run record.
fn decode(id: u64, bytes: &[u8]) -> Result<Run, WorkflowError> {
    serde_json::from_slice(bytes).map_err(|e| WorkflowError::Corrupt {
        id,
        what: e.to_string(),
    })
}

impl RunLog {
    /// Reads the whole log once: returns the log and its open runs (to
    /// resume), oldest first. A record that does not decode is logged and
    /// left out (it costs that run, not the others); a log that cannot be
    /// read is logged, and the engine starts with none of it.
    pub(super) fn open(store: Store) -> (RunLog, Vec<Run>) {
        let mut index = BTreeMap::new();
        let mut open = Vec::new();
        let mut names: BTreeMap<String, Arc<str>> = BTreeMap::new();
        let mut docs: BTreeMap<String, Arc<str>> = BTreeMap::new();
        let records = store.runs().unwrap_or_else(|e| {
            tracing::error!(err = %e, "cannot read the run log; open runs are not resumed");
            vec![]
        });
        for (id, bytes) in records {
            match decode(id, &bytes) {
                Ok(run) => {
                    let workflow = names
                        .entry(run.workflow.clone())
                        .or_insert_with(|| Arc::from(run.workflow.as_str()))
                        .clone();
                    let doc = docs
                        .entry(run.doc.clone())
                        .or_insert_with(|| Arc::from(run.doc.as_str()))
                        .clone();
                    index.insert(
                        id,
                        Entry {
                            status: run.status,
                            workflow,
                            doc,
                        },
                    );
                    if run.status.is_open() {
                        open.push(run);
                    }
                }
                Err(e) => tracing::error!(err = %e, "run record skipped: not resumed or listed"),
            }
        }
        let dead = index
            .values()
            .filter(|e| e.status == RunStatus::Dead)
            .count();
        let log = RunLog {
            store,
            index: Mutex::new(index),
            dead: AtomicU64::new(dead as u64),
        };
        (log, open)
    }

    fn index(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `run` (and moves its cursor to `cursor`, in the same batch).
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn put(&self, run: &Run, cursor: Option<&[u8]>) -> Result<(), StoreError> {
        let record = serde_json::to_vec(run).expect("a run serializes");
        let cursor = cursor.map(|heads| (run.workflow.as_str(), run.doc.as_str(), heads));
        let mut index = self.index();
        self.store.put_run(run.id, &record, cursor)?;
        let (workflow, doc) = match index.get(&run.id) {
            Some(e) if *e.workflow == *run.workflow && *e.doc == *run.doc => {
                (e.workflow.clone(), e.doc.clone())
            }
            _ => (
                Arc::from(run.workflow.as_str()),
                Arc::from(run.doc.as_str()),
            ),
        };
        let before = index.insert(
            run.id,
            Entry {
                status: run.status,
                workflow,
                doc,
            },
        );
        self.recount(before.map(|e| e.status), Some(run.status));
        Ok(())
    }

    /// Run `id`.
    ///
    /// # Errors
    /// [`WorkflowError::NoRun`], store errors, a record that does not decode.
    pub(super) fn get(&self, id: u64) -> Result<Run, WorkflowError> {
        let bytes = self.store.run(id)?.ok_or(WorkflowError::NoRun(id))?;
        decode(id, &bytes)
    }

    /// Runs, newest first: of `workflow` and in `status` if given, at most
    /// `limit`. Reads only the records it returns.
    ///
    /// # Errors
    /// Store errors.
    #[cfg(test)]
    pub(super) fn list(
        &self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<Run>, WorkflowError> {
        self.list_before(workflow, status, None, limit)
    }

    /// As [`list`](Self::list), only runs with an id below `before` (the
    /// last id of the previous page) when given.
    ///
    /// # Errors
    /// Store errors.
    pub(super) fn list_before(
        &self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Run>, WorkflowError> {
        let ids: Vec<u64> = self
            .index()
            .range(..before.unwrap_or(u64::MAX))
            .rev()
            .filter(|(_, e)| {
                workflow.is_none_or(|w| *e.workflow == *w) && status.is_none_or(|s| s == e.status)
            })
            .map(|(id, _)| *id)
            .take(limit)
            .collect();
        self.get_all(ids)
    }

    /// The dead runs of `workflow` on a doc that `doc` accepts, oldest
    /// first. Reads only the records it returns.
    ///
    /// # Errors
    /// Store errors, a record that does not decode.
    pub(super) fn dead_of(
        &self,
        workflow: &str,
        doc: impl Fn(&str) -> bool,
    ) -> Result<Vec<Run>, WorkflowError> {
        let ids: Vec<u64> = self
            .index()
            .iter()
            .filter(|(_, e)| e.status == RunStatus::Dead && *e.workflow == *workflow && doc(&e.doc))
            .map(|(id, _)| *id)
            .collect();
        self.get_all(ids)
    }

    /// The runs `ids` still held, in that order (a run pruned since its id
    /// was read is left out).
    fn get_all(&self, ids: Vec<u64>) -> Result<Vec<Run>, WorkflowError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.get(id) {
                Ok(run) => out.push(run),
                Err(WorkflowError::NoRun(_)) => {} // pruned since
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The (workflow, doc) pairs that have dead runs (docs not empty).
    pub(super) fn dead_pairs(&self) -> Vec<(String, String)> {
        let set: std::collections::BTreeSet<(String, String)> = self
            .index()
            .values()
            .filter(|e| e.status == RunStatus::Dead && !e.doc.is_empty())
            .map(|e| (e.workflow.to_string(), e.doc.to_string()))
            .collect();
        set.into_iter().collect()
    }

    /// Dead runs in the log.
    pub(super) fn dead(&self) -> u64 {
        self.dead.load(Ordering::Relaxed)
    }

    /// Keeps the count of dead runs as an entry goes from `from` to `to`.
    fn recount(&self, from: Option<RunStatus>, to: Option<RunStatus>) {
        if from == Some(RunStatus::Dead) {
            self.dead.fetch_sub(1, Ordering::Relaxed);
        }
        if to == Some(RunStatus::Dead) {
            self.dead.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes the oldest finished (done or skipped) runs beyond `keep`, and
    /// the oldest dead runs beyond `keep` (with a warning: they were waiting
    /// for someone). Returns how many went.
    ///
    /// # Errors
    /// Store errors (nothing is removed from the index then).
    pub(super) fn prune(&self, keep: usize) -> Result<usize, StoreError> {
        let mut index = self.index();
        let of = |wanted: &dyn Fn(RunStatus) -> bool| -> Vec<u64> {
            index
                .iter()
                .filter(|(_, e)| wanted(e.status))
                .map(|(id, _)| *id)
                .collect()
        };
        let finished = of(&|s| matches!(s, RunStatus::Done | RunStatus::Skipped));
        let dead = of(&|s| s == RunStatus::Dead);
        let mut old: Vec<u64> = finished[..finished.len().saturating_sub(keep)].to_vec();
        let old_dead = &dead[..dead.len().saturating_sub(keep)];
        if !old_dead.is_empty() {
            tracing::warn!(
                count = old_dead.len(),
                keep,
                "pruning the oldest dead runs: more than workflow.keep_runs are waiting for retry or skip"
            );
            old.extend_from_slice(old_dead);
        }
        if old.is_empty() {
            return Ok(0);
        }
        self.store.remove_runs(&old)?;
        for id in &old {
            let gone = index.remove(id);
            self.recount(gone.map(|e| e.status), None);
        }
        Ok(old.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: u64, workflow: &str, status: RunStatus) -> Run {
        Run {
            id,
            key: format!("k{id}"),
            workflow: workflow.into(),
            doc: "d".into(),
            heads: vec![],
            depth: 1,
            trigger: "test".into(),
            status,
            created_ms: 0,
            updated_ms: 0,
            error: None,
            steps: vec![],
            origin: None,
        }
    }

    #[test]
    fn lists_and_prunes_from_the_index_and_reopens_to_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (log, open) = RunLog::open(store.clone());
        assert!(open.is_empty());
        for id in 1..=10 {
            let status = match id % 4 {
                0 => RunStatus::Dead,
                1 => RunStatus::Running,
                _ => RunStatus::Done,
            };
            let wf = if id % 2 == 0 { "even" } else { "odd" };
            log.put(&run(id, wf, status), None).unwrap();
        }
        // A record that does not decode is left out, not fatal.
        store.put_run(11, b"not json", None).unwrap();
        let ids = |runs: Vec<Run>| runs.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(log.list(None, None, 3).unwrap()), vec![10, 9, 8]);
        assert_eq!(
            ids(log.list(Some("even"), Some(RunStatus::Dead), 10).unwrap()),
            vec![8, 4]
        );
        // Pages: below the last id of the previous one.
        assert_eq!(
            ids(log.list_before(None, None, Some(8), 3).unwrap()),
            vec![7, 6, 5]
        );
        assert_eq!(
            ids(log.list_before(Some("even"), None, Some(4), 10).unwrap()),
            vec![2]
        );
        assert!(log.list_before(None, None, Some(1), 10).unwrap().is_empty());
        assert_eq!(log.dead(), 2);
        // Keep 2 of each: done 2, 3, 6 go (7, 10 stay); dead 4, 8 both stay.
        assert_eq!(log.prune(2).unwrap(), 3);
        assert_eq!(log.prune(2).unwrap(), 0);
        assert!(matches!(log.get(2), Err(WorkflowError::NoRun(2))));
        // Keep 1: done 7 and dead 4 go.
        assert_eq!(log.prune(1).unwrap(), 2);
        assert_eq!(log.dead(), 1);
        log.put(&run(8, "even", RunStatus::Skipped), None).unwrap();
        assert_eq!(log.dead(), 0);
        drop(log);
        let (log, open) = RunLog::open(store);
        assert_eq!(ids(open), vec![1, 5, 9]);
        assert_eq!(
            ids(log.list(None, None, 100).unwrap()),
            vec![10, 9, 8, 5, 1]
        );
        assert_eq!(log.dead(), 0);
    }
}
