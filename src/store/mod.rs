//! The store: the only code in mergeflow that touches sled.
//!
//! # On-disk layout
//!
//! ```text
//! <data_dir>/FORMAT      "mergeflow-store <version>\n", checked before sled is opened
//! <data_dir>/SEAL        lengths and CRC32s of sled's files, written at clean shutdown
//!                        and checked before the next open (see `seal`)
//! <data_dir>/db/         the sled database
//!   tree "meta"          schema_version, node identity (libp2p keypair), boot counter
//!   tree "actors"        Automerge actor id (16 bytes) -> ActorRecord (JSON)
//!   tree "docs"          every document, keyed so one sled batch covers one write:
//!                          b'm' ++ id              -> DocMeta (JSON)
//!                          b's' ++ id ++ 0x00      -> compacted Automerge save
//!                          b'c' ++ id ++ 0x00 ++ seq (u64 BE) -> one raw change
//!                          b'g' ++ id ++ 0x00 ++ change hash -> its signature (96 bytes,
//!                                                 `trust::ChangeSig`), written before the change
//! ```
//!
//! Doc ids never contain 0x00, so `b'c' ++ id ++ 0x00` is a prefix that matches one
//! document's changes only (`a` and `a/b` do not collide).
//!
//! # Durability
//!
//! sled recovers a prefix of its log, and every mutation here is ordered so that
//! any prefix leaves each doc at a state it was in (an append writes the change,
//! then the meta that counts it; see [`WriteBatch`]). Mutations become durable
//! when a [`GroupCommit::flush`] that started after them returns. sled 0.34
//! `flush` writes the log and calls `sync_file_range` on Linux: that survives a
//! process kill and an OS that keeps running, but it does not flush the drive's
//! write cache, so it is not a power-loss guarantee. Compaction replaces the
//! snapshot and removes the changes it covers in one atomic batch, so a kill
//! at any point of it loses nothing.
//!
//! The store is synchronous; async callers run it inside `spawn_blocking` (see
//! `runtime::Docs`).

mod commit;
mod format;
mod seal;

pub use commit::{Ack, FlushStats, GroupCommit};
pub use format::{SCHEMA_VERSION, Stage, check_format};
pub use seal::seal;

mod batch;
mod dead;
mod error;
mod keys;
mod records;
mod runs;

pub use batch::WriteBatch;
pub use error::StoreError;
pub use records::{ActorRecord, DocData, DocMeta};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use batch::BatchOp;
use error::sled_err;
use keys::{
    META_BOOTS, META_IDENTITY, META_SCHEMA, change_key, decode_u64, meta_key, snapshot_key,
    sync_state_key,
};

use automerge::ActorId;
use libp2p::identity::Keypair;

/// The sled database of one node.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    actors: sled::Tree,
    docs: sled::Tree,
    path: PathBuf,
    /// Blob files already fsynced (see [`Store::sync_files`]).
    synced_blobs: Arc<Mutex<HashSet<std::ffi::OsString>>>,
    /// Fault injection: while set, every operation fails (see
    /// [`Store::fail`]).
    #[cfg(feature = "test-utils")]
    failing: Arc<std::sync::atomic::AtomicBool>,
    /// Fault injection: while true, flushes wait (see
    /// [`Store::pause_flushes`]).
    #[cfg(feature = "test-utils")]
    paused: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// The first I/O error sled reported (see [`Store::failure`]).
    failure: Arc<Mutex<Option<String>>>,
}

/// How long [`Store::open`] waits for a data dir's lock to be released
/// before calling it in use. sled lets go of its lock from a background
/// thread a moment *after* the last handle to a database is dropped (its
/// thread pool still holds the log file while it finishes a write), so a
/// store closed and reopened in one process (a restart in an app or a test)
/// can find the lock still held for a few milliseconds, longer on a loaded
/// machine. A second node on the same dir still gets [`StoreError::InUse`].
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Store {
    /// Opens (or creates) the store in `data_dir`.
    ///
    /// # Errors
    /// [`StoreError::SchemaVersion`] if the data dir was written by another format
    /// version (checked before sled touches anything), [`StoreError::Corrupt`] or
    /// [`StoreError::Sled`] if the files cannot be read.
    pub fn open(data_dir: &Path, cache_capacity_bytes: u64) -> Result<Store, StoreError> {
        let stage = check_format(data_dir)?;
        let db_path = data_dir.join("db");
        // sled holds an exclusive flock on db/db while open; check it ourselves
        // first, for a clear error and before the seal is looked at.
        if !seal::wait_released(&db_path.join("db"), RELEASE_WAIT) {
            return Err(StoreError::InUse(data_dir.to_path_buf()));
        }
        let sealed = seal::verify(data_dir)?;
        if stage == Stage::Initialized && !db_path.exists() {
            return Err(StoreError::Corrupt {
                path: db_path,
                what: "the database directory is missing (FORMAT says this is a data dir)".into(),
            });
        }
        remove_unfinished_snapshots(&db_path)?;
        let config = sled::Config::new()
            .path(&db_path)
            .cache_capacity(cache_capacity_bytes)
            // We flush explicitly (group commit); the background flusher only adds
            // a safety net for data nobody waits on.
            .flush_every_ms(Some(1000))
            .mode(sled::Mode::HighThroughput);
        // sled panics on some kinds of damaged files; turn that into an error.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(sled_err(&db_path, e)),
            Err(_) => {
                return Err(StoreError::Corrupt {
                    path: db_path,
                    what: "sled panicked while opening the database".into(),
                });
            }
        };
        // Only now that sled has opened (and may write) is the seal stale.
        if sealed {
            seal::unseal(data_dir)?;
        }
        let sled = |e| sled_err(&db_path, e);
        let meta = db.open_tree("meta").map_err(sled)?;
        let actors = db.open_tree("actors").map_err(sled)?;
        let docs = db.open_tree("docs").map_err(sled)?;
        let store = Store {
            db,
            meta,
            actors,
            docs,
            path: db_path.clone(),
            synced_blobs: Arc::default(),
            #[cfg(feature = "test-utils")]
            failing: Arc::default(),
            #[cfg(feature = "test-utils")]
            paused: Arc::default(),
            failure: Arc::default(),
        };
        match store.meta.get(META_SCHEMA).map_err(sled)? {
            Some(v) => {
                let found = String::from_utf8_lossy(&v).to_string();
                if found != SCHEMA_VERSION.to_string() {
                    return Err(StoreError::SchemaVersion {
                        path: data_dir.to_path_buf(),
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
            None if stage == Stage::New && store.meta.is_empty() => {
                store
                    .meta
                    .insert(META_SCHEMA, SCHEMA_VERSION.to_string().as_bytes())
                    .map_err(sled)?;
                store.flush()?;
            }
            None => {
                return Err(StoreError::Corrupt {
                    path: db_path,
                    what: "meta tree has data but no schema_version".into(),
                });
            }
        }
        if stage == Stage::New {
            format::write_format(data_dir, Stage::Initialized)?;
        }
        Ok(store)
    }

    /// The sled directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sled_err(&self, e: sled::Error) -> StoreError {
        if matches!(e, sled::Error::Io(_) | sled::Error::ReportableBug(_)) {
            self.failed(&e.to_string());
        }
        sled_err(&self.path, e)
    }

    fn failed(&self, why: &str) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!(
                err = why,
                path = %self.path.display(),
                "the store failed: sled refuses every operation after an I/O error until it is reopened"
            );
            *f = Some(why.to_string());
        }
    }

    /// The first I/O error sled reported, if any. sled 0.34 keeps it and
    /// fails every later operation with it, so a store that has failed works
    /// again only once reopened: the node must restart (`mergeflow start`
    /// restarts it by itself). Nothing acknowledged is lost: sled's recovery
    /// keeps every flushed write.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the node's libp2p identity, creating and storing an ed25519 keypair on
    /// first boot.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if a stored key does not decode.
    pub fn identity(&self) -> Result<Keypair, StoreError> {
        if let Some(bytes) = self.meta.get(META_IDENTITY).map_err(|e| self.sled_err(e))? {
            return Keypair::from_protobuf_encoding(&bytes).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                what: format!("node identity does not decode: {e}"),
            });
        }
        self.put_new_identity()
    }

    fn put_new_identity(&self) -> Result<Keypair, StoreError> {
        let key = Keypair::generate_ed25519();
        let bytes = key
            .to_protobuf_encoding()
            .expect("ed25519 keys always encode");
        self.meta
            .insert(META_IDENTITY, bytes)
            .map_err(|e| self.sled_err(e))?;
        Ok(key)
    }

    /// Replaces the node's identity with a new ed25519 keypair, flushed
    /// before it returns (key rotation).
    ///
    /// # Errors
    /// sled errors.
    pub fn new_identity(&self) -> Result<Keypair, StoreError> {
        let key = self.put_new_identity()?;
        self.flush()?;
        Ok(key)
    }

    /// Records a new boot: increments the boot counter and maps `actor` to this node.
    /// Flushes before returning, so no change is ever written by an unrecorded actor.
    ///
    /// # Errors
    /// sled errors.
    pub fn record_boot(
        &self,
        actor: &ActorId,
        peer_id: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let boots = match self.meta.get(META_BOOTS).map_err(|e| self.sled_err(e))? {
            Some(v) => decode_u64(&v).ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                what: "boot counter is not 8 bytes".into(),
            })?,
            None => 0,
        };
        let boot = boots + 1;
        let record = ActorRecord {
            peer_id: peer_id.to_string(),
            boot,
            started_at_ms: now_ms,
        };
        self.meta
            .insert(META_BOOTS, &boot.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        self.actors
            .insert(
                actor.to_bytes(),
                serde_json::to_vec(&record).expect("serializable"),
            )
            .map_err(|e| self.sled_err(e))?;
        self.flush()?;
        Ok(boot)
    }

    /// Looks up which node and boot wrote with `actor`.
    ///
    /// # Errors
    /// sled errors or an undecodable record.
    pub fn actor(&self, actor: &ActorId) -> Result<Option<ActorRecord>, StoreError> {
        match self
            .actors
            .get(actor.to_bytes())
            .map_err(|e| self.sled_err(e))?
        {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| self.corrupt(format!("actor record: {e}"))),
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// Flushes everything written so far to disk. Prefer [`GroupCommit`].
    ///
    /// # Errors
    /// sled I/O errors.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.check_writable()?;
        self.db.flush().map(|_| ()).map_err(|e| self.sled_err(e))
    }

    /// Makes what sled has flushed survive power loss and OS crashes (with
    /// `store.fsync`): fsyncs sled's log file, the blob files written since
    /// the last call, and their directories. sled 0.34's flush only starts
    /// the log's pages to the device (`sync_file_range`, which neither
    /// flushes the drive's cache nor the file's size) and never syncs blob
    /// files (values of more than a segment's share). Returns the number of
    /// files and directories synced.
    ///
    /// # Errors
    /// [`StoreError::Flush`] naming the file that could not be synced.
    pub fn sync_files(&self) -> Result<usize, StoreError> {
        // A failed fsync may have dropped dirty pages that a later fsync
        // would not report: the store is failed and must be reopened.
        let sync = |p: &Path| {
            std::fs::File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|e| {
                    let why = format!("fsync {}: {e}", p.display());
                    self.failed(&why);
                    StoreError::Flush(why)
                })
        };
        let mut n = 0;
        sync(&self.path.join("db"))?;
        n += 1;
        let blobs = self.path.join("blobs");
        if let Ok(entries) = std::fs::read_dir(&blobs) {
            let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
            let mut present = HashSet::new();
            let mut new = false;
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !synced.contains(&name) {
                    sync(&entry.path())?;
                    n += 1;
                    new = true;
                }
                present.insert(name);
            }
            // Blobs sled removed are forgotten; the directory holds new names.
            *synced = present;
            if new {
                sync(&blobs)?;
                n += 1;
            }
        }
        sync(&self.path)?;
        Ok(n + 1)
    }

    /// Reads a document's meta.
    ///
    /// # Errors
    /// sled errors or an undecodable record.
    pub fn doc_meta(&self, id: &str) -> Result<Option<DocMeta>, StoreError> {
        match self.docs.get(meta_key(id)).map_err(|e| self.sled_err(e))? {
            None => Ok(None),
            Some(v) => self.decode_meta(id, &v).map(Some),
        }
    }

    fn decode_meta(&self, id: &str, v: &[u8]) -> Result<DocMeta, StoreError> {
        serde_json::from_slice(v).map_err(|e| self.corrupt(format!("meta of doc {id:?}: {e}")))
    }

    /// Reads a document's snapshot and change tail.
    ///
    /// # Errors
    /// sled errors.
    pub fn doc_data(&self, id: &str, meta: &DocMeta) -> Result<DocData, StoreError> {
        let snapshot = self
            .docs
            .get(snapshot_key(id))
            .map_err(|e| self.sled_err(e))?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        let first = meta.tail_range().start;
        let mut changes = Vec::new();
        for kv in self
            .docs
            .range(change_key(id, first)..change_key(id, meta.next_seq))
        {
            let (_, v) = kv.map_err(|e| self.sled_err(e))?;
            changes.push(v.to_vec());
        }
        if changes.len() as u64 != meta.tail_changes {
            return Err(self.corrupt(format!(
                "doc {id:?}: meta counts {} changes in its tail, the store holds {}",
                meta.tail_changes,
                changes.len()
            )));
        }
        Ok(DocData { snapshot, changes })
    }

    /// Applies `batch` in order, each doc's writes such that a crash at any
    /// point leaves the doc as it was before one of them (see [`WriteBatch`]).
    ///
    /// # Errors
    /// sled errors; then a prefix of the batch may be applied, which leaves
    /// every doc readable at one of the states above.
    pub fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.check_writable()?;
        for op in batch.ops {
            match op {
                BatchOp::Append { change, meta } => {
                    self.docs
                        .insert(change.0, change.1)
                        .map_err(|e| self.sled_err(e))?;
                    self.docs
                        .insert(meta.0, meta.1)
                        .map_err(|e| self.sled_err(e))?;
                }
                BatchOp::Insert((k, v)) => {
                    self.docs.insert(k, v).map_err(|e| self.sled_err(e))?;
                }
                BatchOp::Atomic(b) => self.docs.apply_batch(b).map_err(|e| self.sled_err(e))?,
            }
        }
        Ok(())
    }

    /// Fault injection for tests: while `on`, every write and flush fails
    /// before touching sled, as they do once sled has hit an I/O error (a
    /// full disk); reads go on, as sled's do. [`Store::failure`] reports it
    /// while it lasts.
    #[doc(hidden)]
    #[cfg(feature = "test-utils")]
    pub fn fail(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::Relaxed);
        if !on {
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Fault injection for tests: while `on`, the group-commit thread's
    /// flushes wait (a slow disk): writes are applied and answered only
    /// once it is off again.
    #[doc(hidden)]
    #[cfg(feature = "test-utils")]
    pub fn pause_flushes(&self, on: bool) {
        let (lock, cv) = &*self.paused;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = on;
        cv.notify_all();
    }

    /// Waits while flushes are paused (see [`Store::pause_flushes`]).
    pub(super) fn wait_unpaused(&self) {
        #[cfg(feature = "test-utils")]
        {
            let (lock, cv) = &*self.paused;
            let mut paused = lock.lock().unwrap_or_else(|p| p.into_inner());
            while *paused {
                paused = cv.wait(paused).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Refuses a write or flush when the store has failed (or a test says
    /// it has): sled would refuse it too, and a flush into a sled that hit an
    /// I/O error can wait forever for a log position that never comes.
    fn check_writable(&self) -> Result<(), StoreError> {
        if let Some(why) = self.failure() {
            return Err(StoreError::Write(why));
        }
        #[cfg(feature = "test-utils")]
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            let why = format!(
                "injected failure in {} (as a full disk)",
                self.path.display()
            );
            self.failed(&why);
            return Err(StoreError::Write(why));
        }
        Ok(())
    }

    /// The stored signature of change `hash` of doc `id`.
    ///
    /// # Errors
    /// sled errors.
    pub fn sig(&self, id: &str, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .docs
            .get(keys::sig_key(id, hash))
            .map_err(|e| self.sled_err(e))?
            .map(|v| v.to_vec()))
    }

    /// Stores the signature of change `hash` of doc `id` at once, outside
    /// any batch (a signature made for a change stored before signatures).
    ///
    /// # Errors
    /// sled errors.
    pub fn put_sig(&self, id: &str, hash: &[u8; 32], sig: &[u8]) -> Result<(), StoreError> {
        self.check_writable()?;
        self.docs
            .insert(keys::sig_key(id, hash), sig)
            .map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    /// The stored signatures of doc `id`'s changes, by change hash.
    ///
    /// # Errors
    /// sled errors.
    pub fn sigs(
        &self,
        id: &str,
    ) -> Result<std::collections::HashMap<[u8; 32], Vec<u8>>, StoreError> {
        let prefix = keys::sig_prefix(id);
        let mut out = std::collections::HashMap::new();
        for kv in self.docs.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            if let Ok(hash) = <[u8; 32]>::try_from(&k[prefix.len()..]) {
                out.insert(hash, v.to_vec());
            }
        }
        Ok(out)
    }

    /// The Automerge sync state (encoded: the heads both sides had when a
    /// sync session with `peer` last ended in agreement) for doc `id`, so a
    /// session after a restart starts from what both already share instead
    /// of from nothing.
    ///
    /// # Errors
    /// sled errors.
    pub fn sync_state(&self, id: &str, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .docs
            .get(sync_state_key(id, peer))
            .map_err(|e| self.sled_err(e))?
            .map(|v| v.to_vec()))
    }

    /// Records a sync state (see [`sync_state`](Self::sync_state)). It is a
    /// hint, not data: it is written without waiting for a flush, and losing
    /// it costs only a longer first sync.
    ///
    /// # Errors
    /// sled errors.
    pub fn put_sync_state(&self, id: &str, peer: &str, state: &[u8]) -> Result<(), StoreError> {
        self.docs
            .insert(sync_state_key(id, peer), state)
            .map(|_| ())
            .map_err(|e| self.sled_err(e))
    }

    /// Forgets every sync state kept for doc `id` (it was deleted).
    ///
    /// # Errors
    /// sled errors.
    pub fn remove_sync_states(&self, id: &str) -> Result<(), StoreError> {
        self.remove_prefix(&sync_state_key(id, ""))
    }

    fn remove_prefix(&self, prefix: &[u8]) -> Result<(), StoreError> {
        for kv in self.docs.scan_prefix(prefix) {
            let (k, _) = kv.map_err(|e| self.sled_err(e))?;
            self.docs.remove(k).map_err(|e| self.sled_err(e))?;
        }
        Ok(())
    }

    /// Lists every doc (tombstones included) with its meta, in id order.
    ///
    /// # Errors
    /// sled errors or an undecodable record.
    pub fn list_docs(&self) -> Result<Vec<(String, DocMeta)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.docs.scan_prefix(b"m") {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let id = String::from_utf8_lossy(&k[1..]).to_string();
            let meta = self.decode_meta(&id, &v)?;
            out.push((id, meta));
        }
        Ok(out)
    }

    /// Docs whose id starts with `prefix` and comes after `after`, in id
    /// order, that `keep` accepts: at most `limit` of them, and whether more
    /// follow. Reads only as far as it needs to.
    ///
    /// # Errors
    /// sled errors or an undecodable record.
    pub fn list_docs_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&str, &DocMeta) -> bool,
    ) -> Result<(Vec<(String, DocMeta)>, bool), StoreError> {
        let mut start = Vec::from(&b"m"[..]);
        match after {
            // The least key above `m{after}`: ids never hold a NUL.
            Some(a) if a >= prefix => {
                start.extend_from_slice(a.as_bytes());
                start.push(0);
            }
            _ => start.extend_from_slice(prefix.as_bytes()),
        }
        let mut out = Vec::new();
        for kv in self.docs.range(start..) {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            if !k[1..].starts_with(prefix.as_bytes()) || k[0] != b'm' {
                break;
            }
            let id = String::from_utf8_lossy(&k[1..]).to_string();
            let meta = self.decode_meta(&id, &v)?;
            if !keep(&id, &meta) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push((id, meta));
        }
        Ok((out, false))
    }

    /// Size of the database on disk, in bytes.
    ///
    /// # Errors
    /// sled errors.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.sled_err(e))
    }
}

/// Removes the snapshot files sled 0.34 left unfinished (`snap.<lsn>.generating`).
///
/// sled writes a snapshot to `snap.<lsn>.generating`, syncs it and renames
/// it to `snap.<lsn>`; but when it opens, it takes the newest file whose name
/// starts with `snap.`, unfinished ones included. A snapshot write cut short
/// (a full disk, found by the chaos campaign; a kill during the write) thus
/// made every later open fail with "corrupt". An unfinished file is never the
/// one to read: the previous snapshot and the log are still there.
/// Known upstream as spacejam/sled#1527; the cause is in
/// docs/upstream-reports.md.
fn remove_unfinished_snapshots(db_path: &Path) -> Result<(), StoreError> {
    let Ok(entries) = std::fs::read_dir(db_path) else {
        return Ok(()); // a new data dir
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing a snapshot file sled did not finish writing");
            std::fs::remove_file(entry.path()).map_err(|e| StoreError::Corrupt {
                path: entry.path(),
                what: format!("an unfinished sled snapshot cannot be removed: {e}"),
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::keys::change_prefix;
    use super::*;

    fn meta(next_seq: u64) -> DocMeta {
        DocMeta {
            heads: vec![],
            size_bytes: 0,
            snapshot_bytes: 0,
            tail_changes: next_seq,
            next_seq,
            created_at_ms: 1,
            updated_at_ms: 1,
            deleted_at_ms: None,
            signed: false,
        }
    }

    #[test]
    fn sync_states_are_per_doc_and_peer_and_go_with_the_doc() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        s.put_sync_state("a", "p1", b"1").unwrap();
        s.put_sync_state("a", "p2", b"2").unwrap();
        s.put_sync_state("a/b", "p1", b"3").unwrap();
        assert_eq!(s.sync_state("a", "p2").unwrap(), Some(b"2".to_vec()));
        s.remove_sync_states("a").unwrap();
        assert_eq!(s.sync_state("a", "p1").unwrap(), None);
        assert_eq!(s.sync_state("a", "p2").unwrap(), None);
        assert_eq!(s.sync_state("a/b", "p1").unwrap(), Some(b"3".to_vec()));
        assert!(s.list_docs().unwrap().is_empty(), "states are not docs");
    }

    #[test]
    fn sync_files_fsyncs_the_log_and_each_new_blob_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        b.append_change("small", 0, b"x", &meta(1));
        s.apply(b).unwrap();
        s.flush().unwrap();
        // The log, the db dir (no blobs yet).
        assert_eq!(s.sync_files().unwrap(), 2);
        // A value far over sled's blob threshold becomes a blob file.
        let big = vec![7u8; 4 << 20];
        let mut b = WriteBatch::default();
        b.append_change("big", 0, &big, &meta(1));
        s.apply(b).unwrap();
        s.flush().unwrap();
        let first = s.sync_files().unwrap();
        assert!(
            first >= 4,
            "the log, a blob, the blobs dir, the db dir: {first}"
        );
        // Nothing new: the log and the db dir only.
        assert_eq!(s.sync_files().unwrap(), 2);
        assert_eq!(s.doc_data("big", &meta(1)).unwrap().changes, vec![big]);
    }

    /// Found by the chaos campaign: a restart while the disk was still full
    /// left an empty `snap.<lsn>.generating`, and sled then refused to open
    /// the data dir ("corrupt") for good.
    #[test]
    fn an_unfinished_sled_snapshot_does_not_make_the_store_unopenable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 1 << 20).unwrap();
            let mut b = WriteBatch::default();
            b.append_change("kept", 0, b"x", &meta(1));
            s.apply(b).unwrap();
            s.flush().unwrap();
        }
        let unfinished = dir
            .path()
            .join("db")
            .join("snap.FFFFFFFFFFFFFFFF.generating");
        std::fs::write(&unfinished, b"").unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(!unfinished.exists());
        assert_eq!(
            s.doc_data("kept", &meta(1)).unwrap().changes,
            vec![b"x".to_vec()]
        );
    }

    #[test]
    fn change_keys_of_prefix_ids_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        b.append_change("a", 0, b"x", &meta(1));
        b.append_change("a/b", 0, b"y", &meta(1));
        s.apply(b).unwrap();
        let mut b = WriteBatch::default();
        b.append_change("a", 1, b"z", &meta(2));
        s.apply(b).unwrap();
        assert_eq!(
            s.doc_data("a", &meta(2)).unwrap().changes,
            vec![b"x".to_vec(), b"z".to_vec()]
        );
        assert_eq!(
            s.doc_data("a/b", &meta(1)).unwrap().changes,
            vec![b"y".to_vec()]
        );
        let ids: Vec<_> = s.list_docs().unwrap().into_iter().map(|(i, _)| i).collect();
        assert_eq!(ids, vec!["a", "a/b"]);
    }

    #[test]
    fn compaction_removes_its_tail_and_a_crash_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        for seq in 0..3 {
            b.append_change("d", seq, &[seq as u8], &meta(seq + 1));
        }
        s.apply(b).unwrap();
        // What a crash during the next append leaves: change 3 without
        // the meta that counts it.
        s.docs.insert(change_key("d", 3), &b"lost"[..]).unwrap();
        // The next change (3 again) is stored only in the compaction of
        // 0..3: nothing would ever overwrite the leftover at 3, so the
        // compaction removes it.
        let mut m = meta(4);
        m.tail_changes = 0;
        let mut b = WriteBatch::default();
        b.compact("d", b"snap", &m, 0..3);
        s.apply(b).unwrap();
        let data = s.doc_data("d", &m).unwrap();
        assert_eq!(data.snapshot, b"snap");
        assert!(data.changes.is_empty());
        assert_eq!(s.docs.scan_prefix(change_prefix("d")).count(), 0);
        // Changes appended earlier in the compaction's own batch go too:
        // the removal cancels the insert.
        let mut b = WriteBatch::default();
        for seq in 4..6 {
            b.append_change("d", seq, &[seq as u8], &meta(seq + 1));
        }
        let mut m = meta(6);
        m.tail_changes = 0;
        b.compact("d", b"snap2", &m, 4..6);
        s.apply(b).unwrap();
        assert_eq!(s.doc_data("d", &m).unwrap().snapshot, b"snap2");
        assert_eq!(s.docs.scan_prefix(change_prefix("d")).count(), 0);
    }

    #[test]
    fn a_compaction_made_meanwhile_keeps_the_changes_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        for seq in 0..5 {
            b.append_change("d", seq, &[seq as u8], &meta(seq + 1));
        }
        s.apply(b).unwrap();
        // A save of changes 0..3, made while 3 and 4 came.
        let mut m = meta(5);
        m.tail_changes = 2;
        let mut b = WriteBatch::default();
        b.compact_covered("d", b"snap", &m, 0..3);
        s.apply(b).unwrap();
        let data = s.doc_data("d", &m).unwrap();
        assert_eq!(data.snapshot, b"snap");
        assert_eq!(data.changes, vec![vec![3u8], vec![4u8]]);
        assert_eq!(s.docs.scan_prefix(change_prefix("d")).count(), 2);
    }

    #[test]
    fn a_change_without_its_meta_is_ignored_then_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        b.append_change("d", 0, b"x", &meta(1));
        s.apply(b).unwrap();
        // What a crash between an append's two inserts leaves: change 1
        // stored, the meta still counting one change.
        s.docs.insert(change_key("d", 1), &b"lost"[..]).unwrap();
        assert_eq!(
            s.doc_data("d", &meta(1)).unwrap().changes,
            vec![b"x".to_vec()]
        );
        let mut b = WriteBatch::default();
        b.append_change("d", 1, b"y", &meta(2));
        s.apply(b).unwrap();
        let got = s.doc_data("d", &meta(2)).unwrap().changes;
        assert_eq!(got, vec![b"x".to_vec(), b"y".to_vec()]);
        // A tombstone removes a leftover at `next_seq` too.
        s.docs.insert(change_key("d", 2), &b"lost"[..]).unwrap();
        let mut m = meta(2);
        m.deleted_at_ms = Some(9);
        let mut b = WriteBatch::default();
        b.tombstone("d", &m, 0..2);
        s.apply(b).unwrap();
        assert_eq!(s.docs.scan_prefix(change_prefix("d")).count(), 0);
    }

    #[test]
    fn several_changes_of_a_doc_are_appended_atomically() {
        // Their meta names the heads after the last one: no crash may leave
        // it stored with only some of them, so they go in one sled batch.
        let mut b = WriteBatch::default();
        b.append_changes("d", 0, &[b"x", b"y", b"z"], &meta(3));
        assert!(matches!(b.ops.as_slice(), [BatchOp::Atomic(_)]));
        assert_eq!(b.len(), 4);
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        s.apply(b).unwrap();
        let got = s.doc_data("d", &meta(3)).unwrap().changes;
        assert_eq!(got, vec![b"x".to_vec(), b"y".to_vec(), b"z".to_vec()]);
        // One change: two plain inserts.
        let mut b = WriteBatch::default();
        b.append_changes("d", 3, &[b"w"], &meta(4));
        assert!(matches!(b.ops.as_slice(), [BatchOp::Append { .. }]));
    }

    #[test]
    fn a_meta_that_miscounts_its_tail_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        b.append_change("d", 0, b"x", &meta(1));
        s.apply(b).unwrap();
        let err = s.doc_data("d", &meta(2)).unwrap_err().to_string();
        assert!(
            err.contains("doc \"d\"") && err.contains("2 changes"),
            "{err}"
        );
    }

    #[test]
    fn identity_and_boots_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (peer, actor) = {
            let s = Store::open(dir.path(), 1 << 20).unwrap();
            let key = s.identity().unwrap();
            let peer = key.public().to_peer_id().to_string();
            let actor = ActorId::random();
            assert_eq!(s.record_boot(&actor, &peer, 5).unwrap(), 1);
            (peer, actor)
        };
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            s.identity().unwrap().public().to_peer_id().to_string(),
            peer
        );
        let rec = s.actor(&actor).unwrap().unwrap();
        assert_eq!((rec.peer_id.as_str(), rec.boot), (peer.as_str(), 1));
        assert_eq!(s.record_boot(&ActorId::random(), &peer, 6).unwrap(), 2);
    }

    #[test]
    fn tombstone_keeps_meta_and_drops_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        b.append_change("d", 0, b"x", &meta(1));
        s.apply(b).unwrap();
        let mut m = meta(1);
        m.deleted_at_ms = Some(9);
        let mut b = WriteBatch::default();
        b.tombstone("d", &m, 0..1);
        s.apply(b).unwrap();
        assert_eq!(s.docs.scan_prefix(change_prefix("d")).count(), 0);
        assert_eq!(s.doc_meta("d").unwrap().unwrap().deleted_at_ms, Some(9));
        let listed = s.list_docs().unwrap();
        assert_eq!(listed.len(), 1, "the tombstone stays listed");
        assert!(
            listed.iter().all(|(_, m)| m.deleted_at_ms.is_some()),
            "no live doc left"
        );
    }
}
