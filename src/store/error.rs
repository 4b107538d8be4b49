//! [`StoreError`]: what can go wrong in the store, and sled's errors mapped to it.

use std::path::{Path, PathBuf};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or corruption error.
    #[error("store error in {path}: {source}")]
    Sled {
        /// The database directory.
        path: PathBuf,
        /// What sled said.
        #[source]
        source: sled::Error,
    },
    /// A file or record is not what mergeflow wrote.
    #[error("data dir {path} is corrupt: {what}")]
    Corrupt {
        /// The data dir or file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The data dir was written by another version of mergeflow.
    #[error(
        "data dir {path} has schema version {found}, this mergeflow reads version {expected}; \
         refusing to open it (nothing was changed)"
    )]
    SchemaVersion {
        /// The data dir.
        path: PathBuf,
        /// The version found on disk.
        found: String,
        /// The version this build understands.
        expected: u32,
    },
    /// A file-system error outside sled.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another process has the data dir open.
    #[error("data dir {0} is in use by another process (is another mergeflow node running on it?)")]
    InUse(PathBuf),
    /// Applying a batch failed part-way: some of its writes may be stored
    /// (each doc at a state it passed through), so a failed write's outcome
    /// is unknown; re-read before retrying an op that is not idempotent.
    #[error("store write failed (the write may or may not be stored): {0}")]
    Write(String),
    /// A flush failed (disk full, I/O error). The write was not acknowledged; it
    /// is in memory and may still reach the disk with a later flush.
    #[error("store flush failed: {0}; the write was not acknowledged and may or may not be stored")]
    Flush(String),
    /// The flush thread is gone (the node is shutting down).
    #[error("the store is closed")]
    Closed,
}

pub(super) fn sled_err(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt {
            path: path.to_path_buf(),
            what: e.to_string(),
        },
        e => StoreError::Sled {
            path: path.to_path_buf(),
            source: e,
        },
    }
}
