//! Trigger coalescing: which (workflow, doc) keys wait for a run, when each
//! is due, and how triggers for a key that is pending or running fold into
//! one run.

use std::collections::BTreeSet;
use std::time::Instant;

/// Most paths kept for `changed` while events coalesce.
pub(super) const MAX_CHANGED: usize = 256;

/// A (workflow, doc).
pub(super) type Key = (String, String);

/// A (workflow, doc) waiting for a run.
pub(super) struct Pending {
    pub(super) depth: u32,
    pub(super) changed: BTreeSet<String>,
    pub(super) trigger: &'static str,
    pub(super) due: Instant,
}
