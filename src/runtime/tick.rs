//! The sync core keeps no clock: this task ticks it (retries, digests,
//! timeouts) through the inbox until the node is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Inbox;
use crate::sync::Input;

/// How often the sync core is ticked.
const TICK: Duration = Duration::from_millis(100);

/// Spawns the tick task onto `tasks`; it stops when `cancel` fires.
pub fn spawn_tick(inbox: Inbox, cancel: CancellationToken, tasks: &TaskTracker) {
    tasks.spawn(async move {
        let mut every = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = every.tick() => { inbox.send(Input::Tick); }
            }
        }
    });
}
