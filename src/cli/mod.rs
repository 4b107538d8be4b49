//! Commands of the `mergeflow` binary that need more than a few lines.

pub mod backup;
pub mod chaos;
pub mod progress;
