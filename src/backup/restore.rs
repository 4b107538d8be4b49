//! What a restore reports, and the files it keeps while it runs: the spool
//! of a restore through the API and the partial file of a backup being
//! written. `Node::backup` and `Node::restore_file` (in `node/backup.rs`)
//! use them.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RestoreReport {
    /// Docs in the backup.
    pub docs: u64,
    /// Docs that gained changes from it (new docs included).
    pub changed: u64,
    /// Docs that held everything already.
    pub unchanged: u64,
    /// Docs deleted on this node, left deleted (a tombstone takes no merge).
    pub deleted_here: Vec<String>,
    /// Docs that could not be merged, with why.
    pub failed: Vec<RestoreFailure>,
    /// Tombstones in the backup, not applied: a restore only adds.
    pub tombstones_skipped: u64,
    /// The node the backup was taken from.
    pub from_node: String,
    /// When that backup started (Unix ms).
    pub backup_started_at_ms: u64,
}

/// One doc a restore could not merge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreFailure {
    /// The doc.
    pub id: String,
    /// Why.
    pub error: String,
}

/// The directory under the data dir where `POST /v1/restore` spools the
/// backup it receives (`<data_dir>/restore-tmp/*.mfbackup`) before checking
/// and merging it. A spool is removed when its restore ends, and the
/// directory with the last one; a restore killed mid-way (`kill -9`) leaves
/// its spool, which the next start removes ([`clean_restore_spool`]).
pub const RESTORE_SPOOL: &str = "restore-tmp";

/// Removes what restores killed mid-way left in `<data_dir>/restore-tmp/`:
/// its `*.mfbackup` spools, then the directory if nothing else is in it.
/// Called when the node starts, with the data dir locked and before the API
/// serves: no restore of this node is in flight. Returns the files and bytes
/// removed; failures are logged, never fatal (a leftover costs only disk).
pub fn clean_restore_spool(data_dir: &Path) -> (u64, u64) {
    let dir = data_dir.join(RESTORE_SPOOL);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (0, 0),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), err = %e, "cannot read the restore spool dir");
            return (0, 0);
        }
    };
    let (mut files, mut bytes) = (0, 0);
    for entry in entries.flatten() {
        let path = entry.path();
        let spool = path.extension().is_some_and(|x| x == "mfbackup")
            && entry.file_type().is_ok_and(|t| t.is_file());
        if !spool {
            continue;
        }
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => (files, bytes) = (files + 1, bytes + size),
            Err(e) => {
                tracing::warn!(file = %path.display(), err = %e, "cannot remove a restore spool")
            }
        }
    }
    // Only when empty: anything else in it is not ours to remove.
    let _ = std::fs::remove_dir(&dir);
    if files > 0 {
        tracing::info!(
            files,
            bytes,
            dir = %dir.display(),
            "removed the spools of restores that did not finish"
        );
    }
    (files, bytes)
}

/// Where a backup to `path` is written before it is complete.
pub fn partial_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}
