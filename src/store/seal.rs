//! The clean-shutdown seal: detects a data dir damaged while the node was down.
//!
//! sled recovers from a torn write by treating the first bad record as the end of
//! its log. That is right after a crash, but after a clean shutdown it means
//! silent loss of everything behind the damage (and sled rewrites the files as
//! it recovers). So a node that stops cleanly records the length and CRC32 of
//! every sled file in `<data_dir>/SEAL`; the next start checks them *before*
//! sled opens anything and refuses a data dir that changed, leaving the files
//! as they are. A valid seal is removed before sled opens; a data dir without
//! one (after a crash) is left to sled's own recovery.
//!
//! The seal is only written while holding the same exclusive `flock` on
//! `db/db` that sled holds while it is open, so it can never describe files
//! that sled is still writing.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::StoreError;

const SEAL: &str = "SEAL";
/// How long the seal waits for sled to let go of a just-closed database.
const SEAL_WAIT: Duration = Duration::from_secs(1);
/// How often a wait for the lock looks again.
const POLL: Duration = Duration::from_millis(5);

/// Takes the exclusive lock on `f`, waiting up to `wait` for whoever holds
/// it. `Ok(false)` when it is still held then; the lock lasts while `f` is open.
fn lock_within(f: &File, wait: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(POLL);
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Waits up to `wait` for no one to hold the exclusive lock on the file at
/// `lock_path` (sled's `db/db`). True when it is free, or when the file does
/// not exist or cannot be locked (then sled's own open reports the problem).
/// Takes the lock only to look, and lets it go at once.
pub(super) fn wait_released(lock_path: &Path, wait: Duration) -> bool {
    match File::open(lock_path) {
        Ok(f) => lock_within(&f, wait).unwrap_or(true),
        Err(_) => true,
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Seal {
    files: Vec<FileSeal>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileSeal {
    /// Path relative to the data dir, with `/` separators.
    path: String,
    len: u64,
    crc32: u32,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

/// Seals `data_dir` if sled has released it. Returns `Ok(false)` (and writes
/// nothing) when the database is still open somewhere.
///
/// # Errors
/// I/O errors while hashing or writing the seal.
pub fn seal(data_dir: &Path) -> Result<bool, StoreError> {
    let lock_path = data_dir.join("db").join("db");
    let lock = File::open(&lock_path).map_err(io("cannot open", &lock_path))?;
    // sled releases its lock from a background thread just after the last
    // handle drops (see `Store::open`): give it a moment before giving up.
    if !lock_within(&lock, SEAL_WAIT).map_err(io("cannot lock", &lock_path))? {
        return Ok(false);
    }
    let seal = Seal {
        files: scan(data_dir)?,
    };
    let tmp = data_dir.join("SEAL.tmp");
    let dst = data_dir.join(SEAL);
    let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(&serde_json::to_vec_pretty(&seal).expect("seal serializes"))
        .map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    std::fs::rename(&tmp, &dst).map_err(io("cannot rename to", &dst))?;
    sync_dir(data_dir);
    drop(lock);
    Ok(true)
}

/// Checks the seal, if there is one. Must run before sled opens. Returns whether
/// there was one (then call [`unseal`] once sled has opened).
///
/// # Errors
/// [`StoreError::Corrupt`] naming the first file that changed since the clean
/// shutdown (nothing is modified then), I/O errors.
pub fn verify(data_dir: &Path) -> Result<bool, StoreError> {
    let path = data_dir.join(SEAL);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io("cannot read", &path)(e)),
    };
    let corrupt = |path: PathBuf, what: String| StoreError::Corrupt {
        path,
        what: format!(
            "{what}. It changed after the last clean shutdown, so sled would silently drop \
             data behind the damage; refusing to open (nothing was modified). Restore the data \
             dir from a backup, or delete {} to let sled recover what it can",
            data_dir.join(SEAL).display()
        ),
    };
    let want: Seal = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(path.clone(), format!("the seal file does not parse: {e}")))?;
    let have = scan(data_dir)?;
    for w in &want.files {
        let full = data_dir.join(&w.path);
        match have.iter().find(|h| h.path == w.path) {
            None => return Err(corrupt(full, "the file is missing".into())),
            Some(h) if h.len != w.len => {
                return Err(corrupt(
                    full,
                    format!("its size is {} bytes, was {}", h.len, w.len),
                ));
            }
            Some(h) if h.crc32 != w.crc32 => {
                return Err(corrupt(full, "its checksum differs".into()));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = have
        .iter()
        .find(|h| !want.files.iter().any(|w| w.path == h.path))
    {
        return Err(corrupt(
            data_dir.join(&extra.path),
            "the file appeared".into(),
        ));
    }
    Ok(true)
}

/// Removes the seal: from now on the files change.
///
/// # Errors
/// I/O errors.
pub fn unseal(data_dir: &Path) -> Result<(), StoreError> {
    let path = data_dir.join(SEAL);
    std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
    sync_dir(data_dir);
    Ok(())
}

/// Length and CRC32 of every file under `<data_dir>/db`, sorted by path.
fn scan(data_dir: &Path) -> Result<Vec<FileSeal>, StoreError> {
    let mut out = Vec::new();
    let db = data_dir.join("db");
    if !db.exists() {
        return Ok(out); // every sealed file then counts as missing
    }
    let mut stack = vec![db];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io("cannot list", &dir))? {
            let p = entry.map_err(io("cannot list", &dir))?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let mut f = File::open(&p).map_err(io("cannot open", &p))?;
            let mut hasher = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut len = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(io("cannot read", &p))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            let rel = p.strip_prefix(data_dir).unwrap_or(&p);
            let path = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(FileSeal {
                path,
                len,
                crc32: hasher.finalize(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_db() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("db/blobs")).unwrap();
        std::fs::write(d.path().join("db/db"), b"log bytes").unwrap();
        std::fs::write(d.path().join("db/conf"), b"conf").unwrap();
        d
    }

    #[test]
    fn unchanged_files_unseal() {
        let d = dir_with_db();
        assert!(seal(d.path()).unwrap());
        assert!(verify(d.path()).unwrap());
        unseal(d.path()).unwrap();
        assert!(!d.path().join(SEAL).exists());
        assert!(!verify(d.path()).unwrap()); // no seal: nothing to check
    }

    #[test]
    fn changed_missing_or_new_files_are_refused_and_kept() {
        type Damage = fn(&Path);
        let cases: [(&str, Damage); 4] = [
            ("checksum differs", |p| {
                std::fs::write(p.join("db/db"), b"log bytez").unwrap()
            }),
            ("size is", |p| {
                std::fs::write(p.join("db/db"), b"log").unwrap()
            }),
            ("missing", |p| {
                std::fs::remove_file(p.join("db/conf")).unwrap()
            }),
            ("appeared", |p| {
                std::fs::write(p.join("db/blobs/1"), b"x").unwrap()
            }),
        ];
        for (want, damage) in cases {
            let d = dir_with_db();
            assert!(seal(d.path()).unwrap());
            damage(d.path());
            let err = verify(d.path()).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("refusing"),
                "{want}: {err}"
            );
            assert!(d.path().join(SEAL).exists(), "the seal must stay");
        }
    }

    #[test]
    fn no_seal_while_the_db_is_locked() {
        let d = dir_with_db();
        let f = File::open(d.path().join("db/db")).unwrap();
        f.lock().unwrap();
        assert!(!seal(d.path()).unwrap());
        assert!(!d.path().join(SEAL).exists());
    }
}
