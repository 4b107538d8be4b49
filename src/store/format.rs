//! The `FORMAT` file: the schema version of a data dir, read before sled opens it.
//!
//! sled may write to its files while it opens them (recovery), so the version
//! check must happen before: a data dir from a newer mergeflow is refused with
//! its files untouched.

use std::io::Write;
use std::path::Path;

use super::StoreError;

/// The on-disk format version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

const MAGIC: &str = "mergeflow-store";

/// Where a data dir is in its life, as its FORMAT file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// No database yet: FORMAT was just written, or an earlier first boot
    /// stopped before the database was set up.
    New,
    /// The database was set up (FORMAT's second line says `initialized`); its
    /// files must exist.
    Initialized,
}

/// Checks (or, in a new data dir, creates) `<data_dir>/FORMAT`.
///
/// # Errors
/// [`StoreError::SchemaVersion`] for another version, [`StoreError::Corrupt`] for a
/// FORMAT file that is not ours or a database without one, [`StoreError::Io`] if
/// the directory cannot be created or read.
pub fn check_format(data_dir: &Path) -> Result<Stage, StoreError> {
    let format_path = data_dir.join("FORMAT");
    match std::fs::read(&format_path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let mut lines = text.lines();
            let first = lines.next().unwrap_or("");
            let version = first
                .trim()
                .strip_prefix(MAGIC)
                .map(str::trim)
                .ok_or_else(|| StoreError::Corrupt {
                    path: format_path.clone(),
                    what: format!(
                        "expected \"{MAGIC} <version>\", found {:?}",
                        truncate(&text)
                    ),
                })?;
            if version != SCHEMA_VERSION.to_string() {
                return Err(StoreError::SchemaVersion {
                    path: data_dir.to_path_buf(),
                    found: truncate(version),
                    expected: SCHEMA_VERSION,
                });
            }
            match lines.next().map(str::trim) {
                None | Some("") => Ok(Stage::New),
                Some("initialized") => Ok(Stage::Initialized),
                Some(other) => Err(StoreError::Corrupt {
                    path: format_path.clone(),
                    what: format!("unexpected second line {:?}", truncate(other)),
                }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if data_dir.join("db").exists() {
                return Err(StoreError::Corrupt {
                    path: data_dir.to_path_buf(),
                    what: "it has a db/ directory but no FORMAT file".into(),
                });
            }
            std::fs::create_dir_all(data_dir).map_err(io("cannot create data dir", data_dir))?;
            write_format(data_dir, Stage::New)?;
            Ok(Stage::New)
        }
        Err(e) => Err(io("cannot read", &format_path)(e)),
    }
}

/// Writes FORMAT atomically (temp file, fsync, rename, fsync of the directory).
pub fn write_format(data_dir: &Path, stage: Stage) -> Result<(), StoreError> {
    let tmp = data_dir.join("FORMAT.tmp");
    let dst = data_dir.join("FORMAT");
    let mut f = std::fs::File::create(&tmp).map_err(io("cannot create", &tmp))?;
    let second = match stage {
        Stage::New => "",
        Stage::Initialized => "initialized\n",
    };
    write!(f, "{MAGIC} {SCHEMA_VERSION}\n{second}").map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    std::fs::rename(&tmp, &dst).map_err(io("cannot rename to", &dst))?;
    if let Ok(dir) = std::fs::File::open(data_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_dir_gets_format_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        assert_eq!(check_format(&d).unwrap(), Stage::New);
        assert_eq!(check_format(&d).unwrap(), Stage::New);
        write_format(&d, Stage::Initialized).unwrap();
        assert_eq!(check_format(&d).unwrap(), Stage::Initialized);
    }

    #[test]
    fn other_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("FORMAT"), "mergeflow-store 99\n").unwrap();
        let err = check_format(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::SchemaVersion { .. }), "{err}");
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[test]
    fn garbage_format_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("FORMAT"), [0xff, 0, 1]).unwrap();
        assert!(matches!(
            check_format(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn db_without_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("db")).unwrap();
        assert!(matches!(
            check_format(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
