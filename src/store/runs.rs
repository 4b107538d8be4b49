//! The workflow run log and trigger cursors, in sled tree `runs`.
//!
//! Keys: `r<run id, u64 big-endian>` -> a run record; `c<workflow>\0<doc>` ->
//! the heads the workflow last took for that doc (its trigger cursor). A run
//! record and the cursor it moves are written in one sled batch, so after a
//! crash either both are there or neither is. The records are opaque bytes
//! here; `crate::workflow` owns their format.

use super::{Store, StoreError};

const RUN: u8 = b'r';
const CURSOR: u8 = b'c';

fn run_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = RUN;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn cursor_key(workflow: &str, doc: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + workflow.len() + doc.len());
    k.push(CURSOR);
    k.extend_from_slice(workflow.as_bytes());
    k.push(0);
    k.extend_from_slice(doc.as_bytes());
    k
}

impl Store {
    fn runs_tree(&self) -> Result<sled::Tree, StoreError> {
        self.db.open_tree("runs").map_err(|e| self.sled_err(e))
    }

    /// A new run id, larger than every id handed out before (across restarts).
    ///
    /// # Errors
    /// sled errors.
    pub fn next_run_id(&self) -> Result<u64, StoreError> {
        // sled ids start at 0; run ids start at 1.
        self.db
            .generate_id()
            .map(|id| id + 1)
            .map_err(|e| self.sled_err(e))
    }

    /// Stores run `id`'s record and, if given, moves the cursor of
    /// (workflow, doc) to `heads`, in one atomic batch. Not flushed: the next
    /// flush (a durable write's group commit, at the latest sled's own
    /// background flush) makes it durable.
    ///
    /// # Errors
    /// sled errors.
    pub fn put_run(
        &self,
        id: u64,
        record: &[u8],
        cursor: Option<(&str, &str, &[u8])>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(&run_key(id), record);
        if let Some((workflow, doc, heads)) = cursor {
            batch.insert(cursor_key(workflow, doc), heads);
        }
        self.runs_tree()?
            .apply_batch(batch)
            .map_err(|e| self.sled_err(e))
    }

    /// Moves the cursor of (workflow, doc) to `heads` with no run.
    ///
    /// # Errors
    /// sled errors.
    pub fn put_cursor(&self, workflow: &str, doc: &str, heads: &[u8]) -> Result<(), StoreError> {
        self.runs_tree()?
            .insert(cursor_key(workflow, doc), heads)
            .map(|_| ())
            .map_err(|e| self.sled_err(e))
    }

    /// The cursor of (workflow, doc).
    ///
    /// # Errors
    /// sled errors.
    pub fn cursor(&self, workflow: &str, doc: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.runs_tree()?
            .get(cursor_key(workflow, doc))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| self.sled_err(e))
    }

    /// Run `id`'s record.
    ///
    /// # Errors
    /// sled errors.
    pub fn run(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.runs_tree()?
            .get(run_key(id))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| self.sled_err(e))
    }

    /// Every run record, oldest first, as (id, record).
    ///
    /// # Errors
    /// sled errors, or a key that is not a run id.
    pub fn runs(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let tree = self.runs_tree()?;
        let mut out = Vec::new();
        for item in tree.scan_prefix([RUN]) {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            let id = k
                .get(1..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: format!("run log key {k:?} is not a run id"),
                })?;
            out.push((id, v.to_vec()));
        }
        Ok(out)
    }

    /// Removes run records.
    ///
    /// # Errors
    /// sled errors.
    pub fn remove_runs(&self, ids: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(&run_key(*id));
        }
        self.runs_tree()?
            .apply_batch(batch)
            .map_err(|e| self.sled_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_cursors_round_trip_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let a = store.next_run_id().unwrap();
            let b = store.next_run_id().unwrap();
            assert!(b > a && a >= 1);
            store
                .put_run(a, b"first", Some(("wf", "sensors/a", b"[\"h1\"]")))
                .unwrap();
            store.put_run(b, b"second", None).unwrap();
            store.put_cursor("wf", "sensors/b", b"[]").unwrap();
            store.flush().unwrap();
            (a, b)
        };
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(store.next_run_id().unwrap() > b);
        let all = store.runs().unwrap();
        assert_eq!(all, vec![(a, b"first".to_vec()), (b, b"second".to_vec())]);
        assert_eq!(
            store.cursor("wf", "sensors/a").unwrap().as_deref(),
            Some(&b"[\"h1\"]"[..])
        );
        assert_eq!(
            store.cursor("wf", "sensors/b").unwrap().as_deref(),
            Some(&b"[]"[..])
        );
        assert_eq!(store.cursor("wf", "sensors/c").unwrap(), None);
        store.remove_runs(&[a]).unwrap();
        assert_eq!(store.run(a).unwrap(), None);
        assert_eq!(store.run(b).unwrap().as_deref(), Some(&b"second"[..]));
    }
}
