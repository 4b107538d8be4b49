//! Long operations in progress (backup, restore), shown by `/v1/status`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// One operation in progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Task {
    /// What it is: `backup`, `restore`.
    pub kind: String,
    /// Units done so far (docs).
    pub done: u64,
    /// Units in all, when known.
    pub total: Option<u64>,
    /// Unix ms when it started.
    pub started_at_ms: u64,
}

/// The node's operations in progress.
#[derive(Debug, Default)]
pub struct Tasks {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Task>>,
}

impl Tasks {
    /// Registers a new operation; it is listed until the guard drops.
    pub fn start(self: &Arc<Self>, kind: &str, total: Option<u64>) -> TaskGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let task = Task {
            kind: kind.to_string(),
            done: 0,
            total,
            started_at_ms: crate::doc::now_ms(),
        };
        self.lock().insert(id, task);
        TaskGuard {
            tasks: self.clone(),
            id,
        }
    }

    /// The operations in progress, oldest first.
    pub fn list(&self) -> Vec<Task> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Task>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An operation in progress; dropping it removes it from the list.
#[derive(Debug)]
pub struct TaskGuard {
    tasks: Arc<Tasks>,
    id: u64,
}

impl TaskGuard {
    /// Records `done` units done, and the total if it became known.
    pub fn set(&self, done: u64, total: Option<u64>) {
        if let Some(t) = self.tasks.lock().get_mut(&self.id) {
            t.done = done;
            t.total = total.or(t.total);
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.tasks.lock().remove(&self.id);
    }
}
