//! Taking a backup from a running node and merging one into a node.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;

use tokio::sync::mpsc;

use super::Node;
use crate::Error;
use crate::backup::{
    BackupError, BackupWriter, Manifest, RestoreFailure, RestoreReport, partial_path,
};
use crate::doc::{DocError, DocId, now_ms};

/// Merges in flight at once during a restore: enough for group commit to
/// flush many together.
const RESTORE_CONCURRENCY: usize = 64;

impl Node {
    /// Writes a backup of every document to `out`: each doc's Automerge save
    /// as of when it is read, with a manifest and checksums (see
    /// [`crate::backup`]). Every write acknowledged before the call is in
    /// it; writes made meanwhile may be. The node keeps serving; docs are
    /// read one at a time, from the store or memory, with no Automerge work
    /// for docs at rest. Progress shows in [`crate::Status::tasks`].
    ///
    /// # Errors
    /// Writing to `out` failed, or a doc could not be read (named).
    pub async fn backup<W: Write + Send + 'static>(&self, out: W) -> Result<(Manifest, W), Error> {
        let docs = self.docs().clone();
        let node = self.peer_id().to_string();
        let task = self.tasks().start("backup", None);
        tokio::task::spawn_blocking(move || {
            let started = now_ms();
            let ids = docs.ids()?;
            let total = ids.len() as u64;
            let mut w = BackupWriter::new(out, &node, started).map_err(backup_io)?;
            for (i, (id, deleted)) in ids.into_iter().enumerate() {
                task.set(i as u64, Some(total));
                let cannot_read =
                    |e: DocError| Error::Internal(format!("backup: cannot read doc {id:?}: {e}"));
                let save = if deleted {
                    None
                } else {
                    let doc = DocId::new(id.as_str())?;
                    // The save first (it may come from memory, a moment ahead
                    // of the store), then the signatures, which by then are
                    // in the store too; one still missing is signed by the
                    // node that restores the backup.
                    let save = docs.saved(&doc).map_err(cannot_read)?;
                    let sigs = docs.signatures(&doc).map_err(cannot_read)?;
                    save.map(|s| (s, sigs))
                };
                match save {
                    Some((save, sigs)) => w.signed_doc(&id, &save, &sigs).map_err(backup_io)?,
                    // Deleted, possibly since the listing.
                    None => w.deleted(&id),
                }
            }
            let (manifest, out) = w.finish(now_ms()).map_err(backup_io)?;
            tracing::info!(
                docs = manifest.docs.len(),
                deleted = manifest.deleted.len(),
                ms = manifest.finished_at_ms - manifest.started_at_ms,
                "backup taken"
            );
            Ok((manifest, out))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// Writes a backup to the file `path`: to `<path>.partial`, synced, then
    /// renamed, so `path` is only ever a whole backup.
    ///
    /// # Errors
    /// As [`backup`](Self::backup), and file errors naming the path.
    pub async fn backup_to_file(&self, path: &Path) -> Result<Manifest, Error> {
        let partial = partial_path(path);
        let file = File::create(&partial).map_err(|e| file_err(&partial, e))?;
        let result = self.backup(std::io::BufWriter::new(file)).await;
        let (manifest, out) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        let file = out
            .into_inner()
            .map_err(|e| file_err(&partial, e.into_error()))?;
        file.sync_all().map_err(|e| file_err(&partial, e))?;
        std::fs::rename(&partial, path).map_err(|e| file_err(path, e))?;
        Ok(manifest)
    }

    /// Merges the backup file at `path` into this node. The whole file is
    /// checked first (a truncated or damaged file is refused before anything
    /// is merged); then every doc is merged, which only adds changes: the
    /// node's own newer changes stay. Docs deleted here stay deleted, and the
    /// backup's tombstones are not applied. Peers get what changed by sync.
    ///
    /// # Errors
    /// [`Error::Backup`] for a file that does not check out; file errors.
    pub async fn restore_file(&self, path: &Path) -> Result<RestoreReport, Error> {
        let task = self.tasks().start("restore", None);
        let open = {
            let path = path.to_path_buf();
            move || -> Result<BufReader<File>, Error> {
                Ok(BufReader::new(
                    File::open(&path).map_err(|e| file_err(&path, e))?,
                ))
            }
        };
        let check = open.clone();
        let manifest = tokio::task::spawn_blocking(move || {
            crate::backup::read(check()?, |_, _, _| Ok(())).map_err(Error::from)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let total = manifest.docs.len() as u64;
        task.set(0, Some(total));
        // The file is read again on a blocking thread; its docs come here,
        // where up to RESTORE_CONCURRENCY merges run at once.
        let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>, Vec<u8>)>(RESTORE_CONCURRENCY);
        let reader = tokio::task::spawn_blocking(move || -> Result<Manifest, Error> {
            let sent = crate::backup::read(open()?, |id, save, sigs| {
                tx.blocking_send((id.to_string(), save, sigs))
                    .map_err(|_| BackupError::Io(std::io::Error::other("restore stopped")))
            })?;
            Ok(sent)
        });
        let mut report = RestoreReport {
            docs: total,
            tombstones_skipped: manifest.deleted.len() as u64,
            from_node: manifest.node.clone(),
            backup_started_at_ms: manifest.started_at_ms,
            ..RestoreReport::default()
        };
        let mut merges = tokio::task::JoinSet::new();
        let mut done = 0u64;
        loop {
            let next = if merges.len() < RESTORE_CONCURRENCY {
                rx.recv().await
            } else {
                None
            };
            match next {
                Some((id, save, sigs)) => {
                    let docs = self.docs().clone();
                    merges.spawn(async move {
                        let result = match DocId::new(id.as_str()) {
                            Ok(doc) => docs.merge_signed(doc, save, sigs).await,
                            Err(e) => Err(e),
                        };
                        (id, result)
                    });
                }
                None => {
                    let Some(joined) = merges.join_next().await else {
                        break;
                    };
                    let (id, result) = joined.map_err(|e| Error::Internal(e.to_string()))?;
                    done += 1;
                    task.set(done, None);
                    match result {
                        Ok(r) if r.changed => report.changed += 1,
                        Ok(_) => report.unchanged += 1,
                        Err(DocError::Deleted(_)) => report.deleted_here.push(id),
                        Err(e) => report.failed.push(RestoreFailure {
                            id,
                            error: e.to_string(),
                        }),
                    }
                }
            }
        }
        // The second read checks the file again: it changed between reads?
        reader.await.map_err(|e| Error::Internal(e.to_string()))??;
        report.deleted_here.sort();
        report.failed.sort_by(|a, b| a.id.cmp(&b.id));
        tracing::info!(
            docs = report.docs,
            changed = report.changed,
            unchanged = report.unchanged,
            failed = report.failed.len(),
            "backup restored"
        );
        Ok(report)
    }
}

fn backup_io(e: std::io::Error) -> Error {
    Error::Backup(BackupError::Io(e))
}

fn file_err(path: &Path, e: std::io::Error) -> Error {
    Error::Backup(BackupError::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    )))
}
