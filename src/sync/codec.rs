//! Wire encoding of [`Message`]: versioned, size-capped, fallible.
//!
//! ```text
//! message = version:u8 (=4) kind:u8 body
//! Change  (1) = str(doc) bytes(change) bytes(sig) ack:u8 count:u32 tag:u64*count
//! Digest  (2) = answer:u8 count:u32 u64*count
//! Bucket  (3) = bucket:u32 answer:u8 count:u32 (str(doc) hash:u64)*count
//! Sync    (4) = str(doc) bytes(data) bytes(sigs)
//! Deleted (5) = str(doc) bytes(sig)    (sig over (doc, trust::TOMBSTONE_HASH))
//! Batch   (6) = count:u32 bytes(message)*count     (no batch inside a batch)
//! Doc     (7) = str(doc) bytes(automerge chunks) bytes(sigs)
//! sig = a trust::ChangeSig (96 bytes) or nothing; sigs = (hash:[u8; 32] sig)*
//! Have    (8) = str(doc) count:u32 hash:[u8; 32]*count
//! Scope   (9) = all:u8 ask:u8 count:u32 str(glob)*count      (all = 1: count is 0)
//! str/bytes = len:u32 payload          integers little-endian
//! ```
//!
//! A network frame holds one message or one batch: the shell packs whatever
//! is queued for a peer into as few frames as the size cap allows, so catching
//! up on thousands of docs costs a few round trips, not thousands.
//!
//! Decoding never panics and never allocates more than the input's size: every
//! length is checked against the bytes left before anything is reserved.

use super::Message;

/// Current wire version.
pub const VERSION: u8 = 4;

/// Most globs a [`Message::Scope`] names.
pub const MAX_SCOPE_GLOBS: usize = 256;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Bigger than the cap.
    #[error("message of {size} bytes exceeds the cap of {cap}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The cap.
        cap: usize,
    },
    /// A version we do not speak.
    #[error("unsupported message version {0}")]
    Version(u8),
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Ends early or has bytes left over.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A doc id that is not one (`[A-Za-z0-9._:/-]{1,200}`).
    #[error("invalid doc id {id:?}: {reason}")]
    DocId {
        /// The id (shortened).
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Encodes `msg`.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = vec![VERSION];
    match msg {
        Message::Change {
            doc,
            change,
            sig,
            ack,
            seen,
        } => {
            out.push(1);
            put_bytes(&mut out, doc.as_bytes());
            put_bytes(&mut out, change);
            put_bytes(&mut out, sig);
            out.push(u8::from(*ack));
            put_u64s(&mut out, seen);
        }
        Message::Digest { buckets, answer } => {
            out.push(2);
            out.push(u8::from(*answer));
            put_u64s(&mut out, buckets);
        }
        Message::Bucket {
            bucket,
            entries,
            answer,
        } => {
            out.push(3);
            put_u32(&mut out, *bucket);
            out.push(u8::from(*answer));
            put_u32(&mut out, entries.len() as u32);
            for (doc, hash) in entries {
                put_bytes(&mut out, doc.as_bytes());
                out.extend_from_slice(&hash.to_le_bytes());
            }
        }
        Message::Sync { doc, data, sigs } => {
            out.push(4);
            put_bytes(&mut out, doc.as_bytes());
            put_bytes(&mut out, data);
            put_bytes(&mut out, sigs);
        }
        Message::Deleted { doc, sig } => {
            out.push(5);
            put_bytes(&mut out, doc.as_bytes());
            put_bytes(&mut out, sig);
        }
        Message::Doc { doc, data, sigs } => {
            out.push(7);
            put_bytes(&mut out, doc.as_bytes());
            put_bytes(&mut out, data);
            put_bytes(&mut out, sigs);
        }
        Message::Have { doc, heads } => {
            out.push(8);
            put_bytes(&mut out, doc.as_bytes());
            put_u32(&mut out, heads.len() as u32);
            for h in heads {
                out.extend_from_slice(&h.0);
            }
        }
        Message::Scope { replicate, ask } => {
            out.push(9);
            out.push(u8::from(replicate.is_none()));
            out.push(u8::from(*ask));
            let globs = replicate.as_deref().unwrap_or_default();
            put_u32(&mut out, globs.len() as u32);
            for g in globs {
                put_bytes(&mut out, g.as_bytes());
            }
        }
    }
    out
}

/// Kind byte of a batch.
const BATCH: u8 = 6;

/// Bytes a batch adds to its messages: a header, and a length per message.
pub const BATCH_OVERHEAD: usize = 6;
/// Bytes a batch adds per message.
pub const BATCH_PER_MESSAGE: usize = 4;

/// Packs encoded messages (from [`encode`]) into one frame; a single message
/// is sent as itself.
pub fn encode_batch(msgs: &[Vec<u8>]) -> Vec<u8> {
    if let [one] = msgs {
        return one.clone();
    }
    let size: usize = msgs.iter().map(|m| m.len() + BATCH_PER_MESSAGE).sum();
    let mut out = Vec::with_capacity(BATCH_OVERHEAD + size);
    out.push(VERSION);
    out.push(BATCH);
    put_u32(&mut out, msgs.len() as u32);
    for m in msgs {
        put_bytes(&mut out, m);
    }
    out
}

/// Decodes a frame of at most `cap` bytes: one message, or a batch of them.
///
/// # Errors
/// [`DecodeError`] for the first thing wrong; a frame is taken whole or not at all.
pub fn decode_frame(bytes: &[u8], cap: usize) -> Result<Vec<Message>, DecodeError> {
    if bytes.len() > cap {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            cap,
        });
    }
    if bytes.get(1) != Some(&BATCH) {
        return decode(bytes, cap).map(|m| vec![m]);
    }
    let mut r = Reader { buf: bytes };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    r.u8()?;
    // Each message takes at least 4 (length) + 2 (version, kind) bytes.
    let n = r.count(6)?;
    let mut msgs = Vec::with_capacity(n);
    for _ in 0..n {
        let inner = r.bytes()?;
        if inner.get(1) == Some(&BATCH) {
            return Err(DecodeError::Malformed("batch inside a batch"));
        }
        msgs.push(decode(inner, cap)?);
    }
    if !r.buf.is_empty() {
        return Err(DecodeError::Malformed("bytes after the end of the batch"));
    }
    Ok(msgs)
}

/// Decodes a message of at most `cap` bytes.
///
/// # Errors
/// [`DecodeError`] saying what is wrong; never panics.
pub fn decode(bytes: &[u8], cap: usize) -> Result<Message, DecodeError> {
    if bytes.len() > cap {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            cap,
        });
    }
    let mut r = Reader { buf: bytes };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let msg = match r.u8()? {
        1 => {
            let doc = r.doc_id()?;
            let change = r.bytes()?.to_vec();
            let sig = r.bytes()?.to_vec();
            let ack = r.flag("change ack flag is not 0 or 1")?;
            let n = r.count(8)?;
            if n > super::types::MAX_SEEN {
                return Err(DecodeError::Malformed("change lists too many peers"));
            }
            let seen = r.u64s(n)?;
            Message::Change {
                doc,
                change,
                sig,
                ack,
                seen,
            }
        }
        2 => {
            let answer = r.flag("digest answer flag is not 0 or 1")?;
            let n = r.count(8)?;
            Message::Digest {
                buckets: r.u64s(n)?,
                answer,
            }
        }
        3 => {
            let bucket = r.u32()?;
            let answer = r.flag("bucket answer flag is not 0 or 1")?;
            // Each entry takes at least 4 (length) + 8 (hash) bytes.
            let n = r.count(12)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push((r.doc_id()?, r.u64()?));
            }
            Message::Bucket {
                bucket,
                entries,
                answer,
            }
        }
        4 => Message::Sync {
            doc: r.doc_id()?,
            data: r.bytes()?.to_vec(),
            sigs: r.bytes()?.to_vec(),
        },
        5 => Message::Deleted {
            doc: r.doc_id()?,
            sig: r.bytes()?.to_vec(),
        },
        7 => Message::Doc {
            doc: r.doc_id()?,
            data: r.bytes()?.to_vec(),
            sigs: r.bytes()?.to_vec(),
        },
        8 => {
            let doc = r.doc_id()?;
            let n = r.count(32)?;
            let mut heads = Vec::with_capacity(n);
            for _ in 0..n {
                let h: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
                heads.push(automerge::ChangeHash(h));
            }
            Message::Have { doc, heads }
        }
        9 => {
            let all = r.flag("scope flag is not 0 or 1")?;
            let ask = r.flag("scope ask flag is not 0 or 1")?;
            let n = r.count(4)?;
            if n > MAX_SCOPE_GLOBS || (all && n > 0) {
                return Err(DecodeError::Malformed("scope lists too many globs"));
            }
            let mut globs = Vec::with_capacity(n);
            for _ in 0..n {
                let g = std::str::from_utf8(r.bytes()?)
                    .map_err(|_| DecodeError::Malformed("scope glob is not UTF-8"))?;
                globs.push(g.to_string());
            }
            Message::Scope {
                replicate: (!all).then_some(globs),
                ask,
            }
        }
        k => return Err(DecodeError::Kind(k)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Malformed("bytes after the end of the message"));
    }
    Ok(msg)
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A count, then the values.
fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    put_u32(out, values.len() as u32);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed("ends early"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// A byte that must be 0 or 1; `what` names it in the error.
    fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Malformed(what)),
        }
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// `n` values (`n` from [`count`](Self::count), so already checked).
    fn u64s(&mut self, n: usize) -> Result<Vec<u64>, DecodeError> {
        (0..n).map(|_| self.u64()).collect()
    }

    /// A count of items of at least `min_size` bytes each, checked against the
    /// bytes left so a forged count cannot make us reserve memory.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.buf.len() {
            return Err(DecodeError::Malformed("count larger than the message"));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A string that must be a valid doc id: ids are checked here, at the
    /// boundary, so the sync core only ever sees valid ones.
    fn doc_id(&mut self) -> Result<String, DecodeError> {
        let id = self.string()?;
        match crate::id::doc_id_problem(&id) {
            None => Ok(id),
            Some(reason) => Err(DecodeError::DocId {
                id: crate::id::preview(&id),
                reason,
            }),
        }
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Malformed("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    fn samples() -> Vec<Message> {
        vec![
            Message::Change {
                doc: "a/b".into(),
                change: vec![1, 2, 3],
                sig: vec![],
                ack: false,
                seen: vec![],
            },
            Message::Change {
                doc: "c".into(),
                change: vec![],
                sig: vec![],
                ack: true,
                seen: vec![1, u64::MAX],
            },
            Message::Digest {
                buckets: vec![0, u64::MAX, 42],
                answer: true,
            },
            Message::Bucket {
                bucket: 7,
                entries: vec![("x".into(), 1), ("y.2".into(), 2)],
                answer: true,
            },
            Message::Sync {
                doc: "d".into(),
                data: vec![],
                sigs: vec![],
            },
            Message::Deleted {
                doc: "gone".into(),
                sig: vec![7; 96],
            },
            Message::Doc {
                doc: "whole".into(),
                data: vec![9; 5],
                sigs: vec![],
            },
            Message::Have {
                doc: "h".into(),
                heads: vec![
                    automerge::ChangeHash([3; 32]),
                    automerge::ChangeHash([4; 32]),
                ],
            },
            Message::Scope {
                replicate: None,
                ask: true,
            },
            Message::Scope {
                replicate: Some(vec!["sensors/s1/**".into(), "config/*".into()]),
                ask: false,
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for m in samples() {
            assert_eq!(decode(&encode(&m), 1 << 20).unwrap(), m);
        }
    }

    #[test]
    fn batches_round_trip_and_refuse_nesting() {
        let encoded: Vec<Vec<u8>> = samples().iter().map(encode).collect();
        let frame = encode_batch(&encoded);
        assert_eq!(decode_frame(&frame, 1 << 20).unwrap(), samples());
        // One message is framed as itself.
        assert_eq!(encode_batch(&encoded[..1]), encoded[0]);
        assert_eq!(decode_frame(&encoded[0], 1 << 20).unwrap(), samples()[..1]);
        assert_eq!(decode_frame(&encode_batch(&[]), 100).unwrap(), vec![]);
        let nested = encode_batch(&[frame.clone(), encoded[0].clone()]);
        assert_eq!(
            decode_frame(&nested, 1 << 20),
            Err(DecodeError::Malformed("batch inside a batch"))
        );
        assert!(matches!(
            decode_frame(&frame, 10),
            Err(DecodeError::TooLarge { .. })
        ));
        let seed = 0xba7c4;
        let mut rng = StdRng::seed_from_u64(seed);
        for cut in 0..frame.len() {
            assert!(decode_frame(&frame[..cut], 1 << 20).is_err(), "cut {cut}");
        }
        for _ in 0..2000 {
            let mut b = frame.clone();
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
            let _ = decode_frame(&b, 1 << 20);
        }
    }

    #[test]
    fn a_message_naming_an_invalid_doc_id_does_not_decode() {
        let bad = [
            "bad id!".to_string(),
            String::new(),
            "..".to_string(),
            "x".repeat(201),
        ];
        for id in bad {
            let msgs = [
                Message::Change {
                    doc: id.clone(),
                    change: vec![1],
                    sig: vec![],
                    ack: false,
                    seen: vec![],
                },
                Message::Bucket {
                    bucket: 0,
                    entries: vec![("ok".into(), 1), (id.clone(), 2)],
                    answer: false,
                },
                Message::Sync {
                    doc: id.clone(),
                    data: vec![],
                    sigs: vec![],
                },
                Message::Deleted {
                    doc: id.clone(),
                    sig: vec![],
                },
                Message::Doc {
                    doc: id.clone(),
                    data: vec![],
                    sigs: vec![],
                },
                Message::Have {
                    doc: id.clone(),
                    heads: vec![],
                },
            ];
            for m in msgs {
                let err = decode(&encode(&m), 1 << 20).unwrap_err();
                assert!(matches!(err, DecodeError::DocId { .. }), "{m:?}: {err}");
                let frame = encode_batch(&[encode(&m)]);
                assert!(decode_frame(&frame, 1 << 20).is_err(), "{m:?}");
            }
        }
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        assert_eq!(decode(&[], 10), Err(DecodeError::Malformed("ends early")));
        assert_eq!(decode(&[9, 1], 10), Err(DecodeError::Version(9)));
        assert_eq!(decode(&[VERSION, 99], 10), Err(DecodeError::Kind(99)));
        assert!(matches!(
            decode(&[0; 100], 10),
            Err(DecodeError::TooLarge { .. })
        ));
        // A forged huge count must not allocate.
        let forged = [VERSION, 2, 0xff, 0xff, 0xff, 0xff];
        assert!(decode(&forged, 100).is_err());
        let mut trailing = encode(&samples()[0]);
        trailing.push(0);
        assert!(decode(&trailing, 100).is_err());
        // Every truncation and random corruption of valid messages: no panic.
        let seed = 0x0c0de;
        let mut rng = StdRng::seed_from_u64(seed);
        for m in samples() {
            let bytes = encode(&m);
            for cut in 0..bytes.len() {
                let _ = decode(&bytes[..cut], 1 << 20);
            }
            for _ in 0..500 {
                let mut b = bytes.clone();
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
                let _ = decode(&b, 1 << 20);
            }
        }
        for _ in 0..2000 {
            let len = rng.random_range(0..64);
            let b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = decode(&b, 1 << 20);
        }
    }
}
