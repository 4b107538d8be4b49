//! The backup file: every document's Automerge save, a manifest, checksums.
//!
//! ```text
//! "MFBACKUP" 0x02                      magic and format version
//! per doc:   ['S' u32 id_len id u64 len sigs]  its changes' signatures, if any
//!            'D' u32 id_len id u64 len save   (little-endian lengths)
//! manifest:  'M' u64 len JSON               (see [`Manifest`])
//! trailer:   sha256 of every byte above (32) "MFBKEND1"
//! ```
//!
//! The manifest comes last so that a backup streams out as the docs are
//! read. It lists each doc's id, size and SHA-256 in file order and the ids
//! of deleted docs (tombstones, whose contents are gone). A reader checks
//! every entry against the manifest and the whole file against the trailer,
//! so a truncated, cut-and-spliced or bit-flipped file is refused with what
//! is wrong and at which byte.
//!
//! `sigs` are the signatures of the doc's changes as the node stored them
//! (a signature list: see [`crate::trust::entries`]), so a restore keeps who admitted each change. Format 1 files
//! (no signatures) are still read; the restoring node signs their changes. The checksums detect damage, not forgery:
//! whoever can write the file can recompute them.

use std::io::{self, Read, Write};

mod restore;
pub use restore::{
    RESTORE_SPOOL, RestoreFailure, RestoreReport, clean_restore_spool, partial_path,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::trust::SIG_ENTRY_LEN;

/// The file's first bytes.
const MAGIC: &[u8; 8] = b"MFBACKUP";
/// The format version this code writes (it reads this one and 1).
pub const FORMAT: u8 = 2;
/// The file's last bytes.
const END: &[u8; 8] = b"MFBKEND1";
const DOC: u8 = b'D';
const SIGS: u8 = b'S';
const MANIFEST: u8 = b'M';
/// Longest doc id accepted (ids are far shorter; this bounds a bad length).
const MAX_ID: u32 = 4096;
/// Largest single doc save accepted.
const MAX_DOC: u64 = 1 << 32;
/// Largest manifest accepted.
const MAX_MANIFEST: u64 = 1 << 30;

/// What a backup holds, written at its end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u8,
    /// The mergeflow version that wrote it.
    pub version: String,
    /// The peer id of the node it was taken from.
    pub node: String,
    /// Unix ms when it was started: every write acknowledged before then is
    /// in it.
    pub started_at_ms: u64,
    /// Unix ms when it was finished.
    pub finished_at_ms: u64,
    /// The docs, in file order.
    pub docs: Vec<Entry>,
    /// Docs deleted on the node (their contents are gone).
    pub deleted: Vec<String>,
}

/// One doc in a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The doc id.
    pub id: String,
    /// Size of its Automerge save.
    pub bytes: u64,
    /// SHA-256 of the save, hex.
    pub sha256: String,
    /// Signatures of its changes the backup carries.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub signatures: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why a backup file was refused.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The file does not start like a backup.
    #[error("not a mergeflow backup (it does not start with \"MFBACKUP\")")]
    NotABackup,
    /// A format this version cannot read.
    #[error("backup format {0} is not supported (this mergeflow reads formats 1 and {FORMAT})")]
    Format(u8),
    /// The file ends early.
    #[error("backup is truncated: it ends at byte {at}, inside {what}")]
    Truncated {
        /// Bytes read before the end.
        at: u64,
        /// What was being read.
        what: String,
    },
    /// Bytes that make no sense where they are.
    #[error("backup is damaged at byte {at}: {what}")]
    Damaged {
        /// Offset of the bad bytes.
        at: u64,
        /// What is wrong.
        what: String,
    },
}

/// Writes a backup to `out`, doc by doc.
pub struct BackupWriter<W: Write> {
    out: Hashing<W>,
    manifest: Manifest,
}

impl<W: Write> BackupWriter<W> {
    /// Starts a backup of node `node`, begun at `started_at_ms`.
    ///
    /// # Errors
    /// Writing to `out` failed.
    pub fn new(out: W, node: &str, started_at_ms: u64) -> io::Result<BackupWriter<W>> {
        let mut out = Hashing::new(out);
        out.write_all(MAGIC)?;
        out.write_all(&[FORMAT])?;
        Ok(BackupWriter {
            out,
            manifest: Manifest {
                format: FORMAT,
                version: env!("CARGO_PKG_VERSION").to_string(),
                node: node.to_string(),
                started_at_ms,
                finished_at_ms: 0,
                docs: Vec::new(),
                deleted: Vec::new(),
            },
        })
    }

    /// Adds doc `id` with its Automerge save.
    ///
    /// # Errors
    /// Writing failed.
    pub fn doc(&mut self, id: &str, save: &[u8]) -> io::Result<()> {
        self.signed_doc(id, save, &[])
    }

    /// Adds doc `id` with its Automerge save and the signatures of its
    /// changes (entries of a change hash and a signature; see the module
    /// docs).
    ///
    /// # Errors
    /// Writing failed.
    pub fn signed_doc(&mut self, id: &str, save: &[u8], sigs: &[u8]) -> io::Result<()> {
        if !sigs.is_empty() {
            self.record(SIGS, id, sigs)?;
        }
        self.record(DOC, id, save)?;
        self.manifest.docs.push(Entry {
            id: id.to_string(),
            bytes: save.len() as u64,
            sha256: hex(&Sha256::digest(save)),
            signatures: (sigs.len() / SIG_ENTRY_LEN) as u64,
        });
        Ok(())
    }

    fn record(&mut self, tag: u8, id: &str, data: &[u8]) -> io::Result<()> {
        self.out.write_all(&[tag])?;
        self.out.write_all(&(id.len() as u32).to_le_bytes())?;
        self.out.write_all(id.as_bytes())?;
        self.out.write_all(&(data.len() as u64).to_le_bytes())?;
        self.out.write_all(data)
    }

    /// Records that doc `id` was deleted.
    pub fn deleted(&mut self, id: &str) {
        self.manifest.deleted.push(id.to_string());
    }

    /// Docs added so far.
    pub fn docs(&self) -> usize {
        self.manifest.docs.len()
    }

    /// Writes the manifest and trailer; returns the manifest and the
    /// writer.
    ///
    /// # Errors
    /// Writing failed.
    pub fn finish(mut self, finished_at_ms: u64) -> io::Result<(Manifest, W)> {
        self.manifest.finished_at_ms = finished_at_ms;
        let json = serde_json::to_vec(&self.manifest).map_err(io::Error::other)?;
        self.out.write_all(&[MANIFEST])?;
        self.out.write_all(&(json.len() as u64).to_le_bytes())?;
        self.out.write_all(&json)?;
        let sum = self.out.hasher.clone().finalize();
        self.out.inner.write_all(&sum)?;
        self.out.inner.write_all(END)?;
        self.out.inner.flush()?;
        Ok((self.manifest, self.out.inner))
    }
}

/// Reads a backup from `input`, checking it as it goes: `on_doc` gets each
/// doc (id, save and the signatures of its changes, empty in a format 1
/// file) once its checksum matched, in file order. The manifest
/// is returned only when the whole file checked out; a caller that must not
/// act on a damaged file reads it twice: once with a no-op `on_doc`, then
/// for real.
///
/// # Errors
/// [`BackupError`] naming what is wrong and where; whatever `on_doc` returns.
pub fn read<R: Read>(
    input: R,
    mut on_doc: impl FnMut(&str, Vec<u8>, Vec<u8>) -> Result<(), BackupError>,
) -> Result<Manifest, BackupError> {
    let mut r = Reading {
        input: Hashing::new(input),
        at: 0,
    };
    let magic = r.bytes(MAGIC.len(), "the header")?;
    if magic != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let format = r.bytes(1, "the header")?[0];
    if format != 1 && format != FORMAT {
        return Err(BackupError::Format(format));
    }
    // Each doc as read: id, size, SHA-256, signatures and where its record
    // starts.
    let mut seen: Vec<(String, u64, String, u64, u64)> = Vec::new();
    // A signatures record, waiting for its doc.
    let mut sigs: Option<(String, Vec<u8>, u64)> = None;
    let manifest_at;
    let manifest: Manifest = loop {
        let at = r.at;
        match r.bytes(1, "an entry tag")?[0] {
            SIGS if format > 1 && sigs.is_none() => {
                let (id, data) = r.record(at, "signatures of")?;
                if data.len() % SIG_ENTRY_LEN != 0 {
                    return Err(r.damaged(
                        at,
                        format!("signatures of doc {id:?}: {} bytes", data.len()),
                    ));
                }
                sigs = Some((id, data, at));
            }
            DOC => {
                let (id, save) = r.record(at, "doc")?;
                let sigs = match sigs.take() {
                    Some((of, data, _)) if of == id => data,
                    Some((of, _, sigs_at)) => {
                        return Err(r.damaged(
                            sigs_at,
                            format!("signatures of doc {of:?} are followed by doc {id:?}"),
                        ));
                    }
                    None => Vec::new(),
                };
                let sum = hex(&Sha256::digest(&save));
                let signed = (sigs.len() / SIG_ENTRY_LEN) as u64;
                seen.push((id.clone(), save.len() as u64, sum, signed, at));
                on_doc(&id, save, sigs)?;
            }
            MANIFEST if sigs.is_none() => {
                manifest_at = at;
                let len = r.u64("the manifest length")?;
                if len > MAX_MANIFEST {
                    return Err(r.damaged(at, format!("manifest claims {len} bytes")));
                }
                let json = r.bytes(len as usize, "the manifest")?;
                break serde_json::from_slice(&json)
                    .map_err(|e| r.damaged(at, format!("manifest does not parse: {e}")))?;
            }
            SIGS | MANIFEST if sigs.is_some() => {
                let of = sigs.map(|(id, _, _)| id).unwrap_or_default();
                return Err(r.damaged(
                    at,
                    format!("signatures of doc {of:?} are not followed by that doc"),
                ));
            }
            tag => return Err(r.damaged(at, format!("unknown entry tag {tag:#04x}"))),
        }
    };
    let sum = r.input.hasher.clone().finalize();
    let at = r.at;
    let mut trailer = Vec::with_capacity(40);
    r.input.inner.by_ref().take(40).read_to_end(&mut trailer)?;
    if trailer.len() < 40 {
        return Err(BackupError::Truncated {
            at: at + trailer.len() as u64,
            what: "the trailer".into(),
        });
    }
    if trailer[32..] != END[..] {
        return Err(r.damaged(at + 32, "the trailer's end marker is wrong".into()));
    }
    // A doc whose bytes differ from its manifest entry is where the damage
    // is: name it (with its offset) rather than the trailer, which only
    // says that something, somewhere, changed.
    let mismatch = (manifest.docs.len() == seen.len())
        .then(|| {
            manifest
                .docs
                .iter()
                .zip(&seen)
                .find(|(e, (id, len, sum, signed, _))| {
                    (&e.id, e.bytes, &e.sha256, e.signatures) != (id, *len, sum, *signed)
                })
        })
        .flatten();
    if trailer[..32] != sum[..] {
        return Err(match mismatch {
            Some((_, (id, len, _, _, doc_at))) => r.damaged(
                *doc_at,
                format!(
                    "doc {id:?} (bytes {doc_at}..{}) does not match its manifest entry \
                     (size or SHA-256): its bytes, or its entry in the manifest at byte \
                     {manifest_at}, changed after the backup was written",
                    doc_at + 1 + 4 + id.len() as u64 + 8 + len
                ),
            ),
            None if manifest.docs.len() != seen.len() => r.damaged(
                manifest_at,
                format!(
                    "the manifest lists {} docs, the file holds {}, and the SHA-256 in the \
                     trailer does not match the file",
                    manifest.docs.len(),
                    seen.len()
                ),
            ),
            None => r.damaged(
                manifest_at,
                format!(
                    "every doc matches its manifest entry, but the SHA-256 in the trailer \
                     (byte {at}) does not match the file: the manifest (bytes \
                     {manifest_at}..{at}) or the trailer changed after the backup was written"
                ),
            ),
        });
    }
    let mut extra = [0u8; 1];
    if r.input.inner.read(&mut extra)? != 0 {
        return Err(r.damaged(at + 40, "bytes after the end of the backup".into()));
    }
    if manifest.format != format {
        return Err(BackupError::Format(manifest.format));
    }
    if manifest.docs.len() != seen.len() {
        return Err(r.damaged(
            manifest_at,
            format!(
                "the manifest lists {} docs, the file holds {}",
                manifest.docs.len(),
                seen.len()
            ),
        ));
    }
    if let Some((_, (id, _, _, _, doc_at))) = mismatch {
        return Err(r.damaged(
            *doc_at,
            format!("doc {id:?} does not match its manifest entry (size, SHA-256 or signatures)"),
        ));
    }
    Ok(manifest)
}

/// Reads `input` through, hashing what it reads.
struct Reading<R: Read> {
    input: Hashing<R>,
    at: u64,
}

impl<R: Read> Reading<R> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>, BackupError> {
        // Grown as bytes arrive: a bad length must not allocate up front.
        let mut buf = Vec::with_capacity(n.min(1 << 20));
        (&mut self.input).take(n as u64).read_to_end(&mut buf)?;
        self.at += buf.len() as u64;
        if buf.len() < n {
            return Err(BackupError::Truncated {
                at: self.at,
                what: what.to_string(),
            });
        }
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, BackupError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, BackupError> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// The rest of a doc or signatures record that started at `at`: its
    /// id and data.
    fn record(&mut self, at: u64, what: &str) -> Result<(String, Vec<u8>), BackupError> {
        let len = self.u32("a doc id length")?;
        if len == 0 || len > MAX_ID {
            return Err(self.damaged(at, format!("doc id length {len}")));
        }
        let id = String::from_utf8(self.bytes(len as usize, "a doc id")?)
            .map_err(|_| self.damaged(at, "doc id is not UTF-8".into()))?;
        let len = self.u64("a doc length")?;
        if len > MAX_DOC {
            return Err(self.damaged(at, format!("{what} {id:?} claims {len} bytes")));
        }
        let data = self.bytes(len as usize, &format!("{what} {id:?}"))?;
        Ok((id, data))
    }

    fn damaged(&self, at: u64, what: String) -> BackupError {
        BackupError::Damaged { at, what }
    }
}

/// A reader or writer that hashes the bytes passing through.
struct Hashing<T> {
    inner: T,
    hasher: Sha256,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = BackupWriter::new(Vec::new(), "node-a", 1).unwrap();
        w.doc("a", b"first doc").unwrap();
        w.doc("b/c", &[0u8; 300]).unwrap();
        w.signed_doc("signed", b"with sigs", &[7u8; 2 * SIG_ENTRY_LEN])
            .unwrap();
        w.deleted("gone");
        w.finish(2).unwrap().1
    }

    type Docs = Vec<(String, Vec<u8>)>;

    fn docs(bytes: &[u8]) -> Result<(Manifest, Docs), BackupError> {
        let mut docs = Vec::new();
        let m = read(bytes, |id, save, _| {
            docs.push((id.to_string(), save));
            Ok(())
        })?;
        Ok((m, docs))
    }

    /// A format 1 file as the previous version wrote it.
    fn format_1(docs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Hashing::new(Vec::new());
        out.write_all(MAGIC).unwrap();
        out.write_all(&[1]).unwrap();
        let mut entries = Vec::new();
        for (id, save) in docs {
            out.write_all(&[DOC]).unwrap();
            out.write_all(&(id.len() as u32).to_le_bytes()).unwrap();
            out.write_all(id.as_bytes()).unwrap();
            out.write_all(&(save.len() as u64).to_le_bytes()).unwrap();
            out.write_all(save).unwrap();
            entries.push(serde_json::json!({
                "id": id, "bytes": save.len(), "sha256": hex(&Sha256::digest(save)),
            }));
        }
        let json = serde_json::to_vec(&serde_json::json!({
            "format": 1, "version": "0.1.0", "node": "old", "started_at_ms": 1,
            "finished_at_ms": 2, "docs": entries, "deleted": [],
        }))
        .unwrap();
        out.write_all(&[MANIFEST]).unwrap();
        out.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
        out.write_all(&json).unwrap();
        let sum = out.hasher.clone().finalize();
        let mut bytes = out.inner;
        bytes.extend_from_slice(&sum);
        bytes.extend_from_slice(END);
        bytes
    }

    #[test]
    fn signatures_travel_with_their_doc() {
        let mut got = Vec::new();
        let m = read(&sample()[..], |id, _, sigs| {
            got.push((id.to_string(), sigs.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            vec![
                ("a".into(), 0),
                ("b/c".into(), 0),
                ("signed".into(), 2 * SIG_ENTRY_LEN)
            ]
        );
        assert_eq!(m.docs[2].signatures, 2);
        assert_eq!(m.format, FORMAT);
    }

    #[test]
    fn a_format_1_backup_still_reads() {
        let (m, got) = docs(&format_1(&[("x", b"old save")])).unwrap();
        assert_eq!(got, vec![("x".into(), b"old save".to_vec())]);
        assert_eq!((m.format, m.docs[0].signatures), (1, 0));
    }

    #[test]
    fn signatures_of_one_doc_before_another_are_refused() {
        let mut w = BackupWriter::new(Vec::new(), "n", 1).unwrap();
        w.record(SIGS, "a", &[1u8; SIG_ENTRY_LEN]).unwrap();
        w.doc("b", b"save").unwrap();
        let bytes = w.finish(2).unwrap().1;
        let err = docs(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("signatures of doc \"a\" are followed by doc \"b\""),
            "{err}"
        );
    }

    #[test]
    fn round_trips_docs_and_manifest() {
        let (m, got) = docs(&sample()).unwrap();
        assert_eq!(
            got,
            vec![
                ("a".into(), b"first doc".to_vec()),
                ("b/c".into(), vec![0; 300]),
                ("signed".into(), b"with sigs".to_vec())
            ]
        );
        assert_eq!(m.node, "node-a");
        assert_eq!(m.deleted, vec!["gone".to_string()]);
        assert_eq!(m.docs[1].bytes, 300);
        assert_eq!((m.started_at_ms, m.finished_at_ms), (1, 2));
    }

    #[test]
    fn refuses_every_truncation() {
        let full = sample();
        for len in 0..full.len() {
            let err = docs(&full[..len]).unwrap_err();
            assert!(
                matches!(err, BackupError::Truncated { .. }),
                "cut at {len}: {err}"
            );
        }
    }

    #[test]
    fn refuses_every_flipped_byte() {
        let full = sample();
        for at in 0..full.len() {
            let mut bad = full.clone();
            bad[at] ^= 0x01;
            assert!(docs(&bad).is_err(), "flipped byte {at} was accepted");
        }
        let mut long = full.clone();
        long.push(0);
        assert!(matches!(
            docs(&long),
            Err(BackupError::Damaged { what, .. }) if what.contains("after the end")
        ));
    }

    #[test]
    fn a_flipped_byte_in_a_doc_is_reported_at_that_docs_record() {
        // Issue 18: a byte flipped at 5,000 of a 21,488-byte backup was
        // reported at the trailer. Docs of 4,000 bytes: offset 5,000 is in
        // the second doc's save.
        let mut w = BackupWriter::new(Vec::new(), "node-a", 1).unwrap();
        let mut starts = Vec::new();
        let mut at = (MAGIC.len() + 1) as u64;
        for i in 0..5u8 {
            let id = format!("sensors/{i}");
            starts.push((at, at + 1 + 4 + id.len() as u64 + 8 + 4000));
            w.doc(&id, &[i; 4000]).unwrap();
            at = starts.last().unwrap().1;
        }
        let full = w.finish(2).unwrap().1;
        for (doc, &(start, end)) in starts.iter().enumerate() {
            // Every byte of the save (not its header: a bad length or id
            // derails the reading and is reported where it is found).
            let save_start = end - 4000;
            for flip in [save_start, (save_start + end) / 2, end - 1] {
                let mut bad = full.clone();
                bad[flip as usize] ^= 0x10;
                match docs(&bad) {
                    Err(BackupError::Damaged { at, what }) => {
                        assert_eq!(at, start, "flip at {flip} (doc {doc}): {what}");
                        assert!(what.contains(&format!("sensors/{doc}")), "{what}");
                        assert!(what.contains(&format!("bytes {start}..{end}")), "{what}");
                    }
                    other => panic!("flip at {flip}: {other:?}"),
                }
            }
        }
        let mut bad = full.clone();
        bad[5000] ^= 0x01;
        let err = docs(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("backup is damaged at byte {}:", starts[1].0)),
            "{err}"
        );
        // A flip in the trailer's checksum: every doc checks out, so the
        // damage is in the manifest or the trailer, after the docs.
        let mut bad = full.clone();
        let last = bad.len() - 40;
        bad[last] ^= 0x01;
        match docs(&bad) {
            Err(BackupError::Damaged { at, what }) => {
                assert_eq!(at, starts[4].1, "{what}");
                assert!(what.contains("every doc matches"), "{what}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_a_doc_that_does_not_match_its_manifest_entry() {
        // Rewrite one doc's bytes and the file checksum, as a careless
        // tool would: the manifest's SHA-256 still catches it.
        let mut w = BackupWriter::new(Vec::new(), "n", 0).unwrap();
        w.doc("a", b"one").unwrap();
        let (mut m, _) = w.finish(0).unwrap();
        m.docs[0].sha256 = hex(&Sha256::digest(b"two"));
        let mut w = BackupWriter::new(Vec::new(), "n", 0).unwrap();
        w.doc("a", b"one").unwrap();
        w.manifest = m;
        let forged = w.finish(0).unwrap().1;
        let err = docs(&forged).unwrap_err().to_string();
        assert!(err.contains("does not match its manifest entry"), "{err}");
    }
}
