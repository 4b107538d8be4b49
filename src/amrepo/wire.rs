//! The automerge-repo sync protocol's messages (version "1", as
//! `@automerge/automerge-repo` 2.5 speaks it over a WebSocket): each binary
//! message is one CBOR map with string keys and a `type`.
//!
//! Decoding takes outside input: it never panics, refuses a message over
//! the cap before reading it, reads definite-length strings and bytes only,
//! skips keys it does not know (without recursion), and says what is wrong.
//! It accepts what the JS side sends: `storageId` as `undefined`, numbers as
//! floats, `metadata` for `peerMetadata`.

use minicbor::data::Type;
use minicbor::{Decoder, Encoder};

/// The protocol version this side speaks.
pub const PROTOCOL_VERSION: &str = "1";

/// What a peer says of itself in `join` and `peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// The id of its storage, if it has one (a browser tab without storage
    /// sends none).
    pub storage_id: Option<String>,
    /// It keeps nothing (a tab that only relays ephemeral messages).
    pub is_ephemeral: bool,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum WireMessage {
    /// A client's first message.
    Join {
        /// Its peer id.
        sender_id: String,
        /// The versions it speaks.
        supported_protocol_versions: Vec<String>,
        /// What it says of itself.
        metadata: PeerMetadata,
    },
    /// The server's answer to `join`.
    Peer {
        /// The server's peer id.
        sender_id: String,
        /// The client's.
        target_id: String,
        /// The version chosen.
        selected_protocol_version: String,
        /// What the server says of itself.
        metadata: PeerMetadata,
    },
    /// An Automerge sync message for one doc (`request`: the sender has no
    /// copy of the doc).
    Sync {
        /// `request` rather than `sync`.
        request: bool,
        /// The sender's peer id.
        sender_id: String,
        /// The receiver's.
        target_id: String,
        /// The doc: the bs58check id of its URL.
        document_id: String,
        /// The Automerge sync message.
        data: Vec<u8>,
    },
    /// The sender does not have the doc (or may not show it).
    DocUnavailable {
        /// The sender's peer id.
        sender_id: String,
        /// The receiver's.
        target_id: String,
        /// The doc.
        document_id: String,
    },
    /// Data for the doc's other clients, not stored.
    Ephemeral {
        /// The sender's peer id.
        sender_id: String,
        /// The receiver's.
        target_id: String,
        /// The doc.
        document_id: String,
        /// The sender's session (a tab).
        session_id: String,
        /// Rises with each message of the session.
        count: u64,
        /// The payload.
        data: Vec<u8>,
    },
    /// Something went wrong; the sender closes the connection.
    Error {
        /// What.
        message: String,
    },
    /// A message type this side does not act on (`remote-heads-changed`,
    /// `remote-subscription-change`, or one from a newer version).
    Other {
        /// Its `type`.
        kind: String,
    },
}

impl WireMessage {
    /// Its `type`, as the protocol names it.
    pub fn kind(&self) -> &str {
        match self {
            WireMessage::Join { .. } => "join",
            WireMessage::Peer { .. } => "peer",
            WireMessage::Sync { request: true, .. } => "request",
            WireMessage::Sync { .. } => "sync",
            WireMessage::DocUnavailable { .. } => "doc-unavailable",
            WireMessage::Ephemeral { .. } => "ephemeral",
            WireMessage::Error { .. } => "error",
            WireMessage::Other { kind } => kind,
        }
    }
}

/// Why bytes are not a protocol message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Bigger than the cap.
    #[error("message of {size} bytes exceeds the cap of {cap}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The cap.
        cap: usize,
    },
    /// Not CBOR, or not the CBOR a message is.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A field the message's type needs is absent.
    #[error("{kind} message lacks {field}")]
    Missing {
        /// The message's type.
        kind: String,
        /// The field.
        field: &'static str,
    },
}

fn bad(e: impl std::fmt::Display) -> WireError {
    WireError::Malformed(e.to_string())
}

/// The fields of a message as read, before its type decides which it needs.
#[derive(Default)]
struct Fields {
    kind: Option<String>,
    sender_id: Option<String>,
    target_id: Option<String>,
    document_id: Option<String>,
    session_id: Option<String>,
    versions: Option<Vec<String>>,
    selected: Option<String>,
    metadata: Option<PeerMetadata>,
    count: Option<u64>,
    data: Option<Vec<u8>>,
    message: Option<String>,
}

/// Decodes one message of at most `cap` bytes.
///
/// # Errors
/// [`WireError`] saying what is wrong; never panics.
pub fn decode(bytes: &[u8], cap: usize) -> Result<WireMessage, WireError> {
    if bytes.len() > cap {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            cap,
        });
    }
    let mut d = Decoder::new(bytes);
    let mut f = Fields::default();
    for_each_entry(&mut d, |d, key| {
        match key {
            "type" => f.kind = Some(text(d)?),
            "senderId" => f.sender_id = Some(text(d)?),
            "targetId" => f.target_id = Some(text(d)?),
            "documentId" => f.document_id = Some(text(d)?),
            "sessionId" => f.session_id = Some(text(d)?),
            "selectedProtocolVersion" => f.selected = Some(text(d)?),
            "message" => f.message = Some(text(d)?),
            "supportedProtocolVersions" => f.versions = Some(texts(d)?),
            "peerMetadata" | "metadata" => f.metadata = Some(metadata(d)?),
            "count" => f.count = Some(number(d)?),
            "data" => f.data = Some(byte_string(d)?),
            _ => d.skip().map_err(bad)?,
        }
        Ok(())
    })?;
    if d.position() != bytes.len() {
        return Err(bad("bytes after the end of the message"));
    }
    let kind = f.kind.clone().ok_or_else(|| bad("no type"))?;
    let need = |v: Option<String>, field: &'static str| {
        v.ok_or_else(|| WireError::Missing {
            kind: kind.clone(),
            field,
        })
    };
    Ok(match kind.as_str() {
        "join" => WireMessage::Join {
            sender_id: need(f.sender_id, "senderId")?,
            supported_protocol_versions: f.versions.unwrap_or_default(),
            metadata: f.metadata.unwrap_or_default(),
        },
        "peer" => WireMessage::Peer {
            sender_id: need(f.sender_id, "senderId")?,
            target_id: need(f.target_id, "targetId")?,
            selected_protocol_version: need(f.selected, "selectedProtocolVersion")?,
            metadata: f.metadata.unwrap_or_default(),
        },
        "sync" | "request" => WireMessage::Sync {
            request: kind == "request",
            sender_id: need(f.sender_id, "senderId")?,
            target_id: need(f.target_id, "targetId")?,
            document_id: need(f.document_id, "documentId")?,
            data: f.data.ok_or_else(|| WireError::Missing {
                kind: kind.clone(),
                field: "data",
            })?,
        },
        "doc-unavailable" => WireMessage::DocUnavailable {
            sender_id: need(f.sender_id, "senderId")?,
            target_id: need(f.target_id, "targetId")?,
            document_id: need(f.document_id, "documentId")?,
        },
        "ephemeral" => WireMessage::Ephemeral {
            sender_id: need(f.sender_id, "senderId")?,
            target_id: need(f.target_id, "targetId")?,
            document_id: need(f.document_id, "documentId")?,
            session_id: need(f.session_id, "sessionId")?,
            count: f.count.ok_or_else(|| WireError::Missing {
                kind: kind.clone(),
                field: "count",
            })?,
            data: f.data.unwrap_or_default(),
        },
        "error" => WireMessage::Error {
            message: f.message.unwrap_or_default(),
        },
        _ => WireMessage::Other { kind },
    })
}

/// Calls `f` with each key of the map at `d`, `f` reading the value.
fn for_each_entry<'b>(
    d: &mut Decoder<'b>,
    mut f: impl FnMut(&mut Decoder<'b>, &str) -> Result<(), WireError>,
) -> Result<(), WireError> {
    match d.map().map_err(bad)? {
        Some(n) => {
            for _ in 0..n {
                let key = d.str().map_err(bad)?;
                f(d, key)?;
            }
        }
        None => loop {
            if d.datatype().map_err(bad)? == Type::Break {
                d.skip().map_err(bad)?;
                break;
            }
            let key = d.str().map_err(bad)?;
            f(d, key)?;
        },
    }
    Ok(())
}

/// A text value, `undefined` and `null` read as absent by the callers that
/// allow it (see [`metadata`]).
fn text(d: &mut Decoder) -> Result<String, WireError> {
    Ok(d.str().map_err(bad)?.to_string())
}

/// A byte string, or one tagged 64 (a `Uint8Array`, as cbor-x writes one
/// unless told not to).
fn byte_string(d: &mut Decoder) -> Result<Vec<u8>, WireError> {
    if d.datatype().map_err(bad)? == Type::Tag {
        let tag = d.tag().map_err(bad)?;
        if tag.as_u64() != 64 {
            return Err(bad(format!(
                "data tagged {}, not a Uint8Array (64)",
                tag.as_u64()
            )));
        }
    }
    Ok(d.bytes().map_err(bad)?.to_vec())
}

/// An array of texts (at most 16: versions).
fn texts(d: &mut Decoder) -> Result<Vec<String>, WireError> {
    let n = d
        .array()
        .map_err(bad)?
        .ok_or_else(|| bad("indefinite array"))?;
    if n > 16 {
        return Err(bad("more than 16 protocol versions"));
    }
    (0..n).map(|_| text(d)).collect()
}

/// A count: an unsigned integer, or a float holding one.
fn number(d: &mut Decoder) -> Result<u64, WireError> {
    match d.datatype().map_err(bad)? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => d.u64().map_err(bad),
        Type::F32 | Type::F64 => {
            let v = d.f64().map_err(bad)?;
            if v.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&v) {
                Ok(v as u64)
            } else {
                Err(bad(format!("count {v} is not a whole number")))
            }
        }
        t => Err(bad(format!("count is {t}, not a number"))),
    }
}

fn metadata(d: &mut Decoder) -> Result<PeerMetadata, WireError> {
    let mut m = PeerMetadata::default();
    if matches!(d.datatype().map_err(bad)?, Type::Undefined | Type::Null) {
        d.skip().map_err(bad)?;
        return Ok(m);
    }
    for_each_entry(d, |d, key| {
        match (key, d.datatype().map_err(bad)?) {
            ("storageId", Type::Undefined | Type::Null) => d.skip().map_err(bad)?,
            ("storageId", _) => m.storage_id = Some(text(d)?),
            ("isEphemeral", Type::Bool) => m.is_ephemeral = d.bool().map_err(bad)?,
            _ => d.skip().map_err(bad)?,
        }
        Ok(())
    })?;
    Ok(m)
}

/// Encodes `msg` as the JS side expects: a definite-length map, text keys,
/// `data` as bytes.
pub fn encode(msg: &WireMessage) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    write(&mut e, msg).expect("writing to a Vec does not fail");
    e.into_writer()
}

type EncodeResult = Result<(), minicbor::encode::Error<std::convert::Infallible>>;

fn write(e: &mut Encoder<Vec<u8>>, msg: &WireMessage) -> EncodeResult {
    match msg {
        WireMessage::Join {
            sender_id,
            supported_protocol_versions,
            metadata,
        } => {
            e.map(4)?.str("type")?.str("join")?;
            e.str("senderId")?.str(sender_id)?;
            e.str("supportedProtocolVersions")?
                .array(supported_protocol_versions.len() as u64)?;
            for v in supported_protocol_versions {
                e.str(v)?;
            }
            e.str("peerMetadata")?;
            write_metadata(e, metadata)?;
        }
        WireMessage::Peer {
            sender_id,
            target_id,
            selected_protocol_version,
            metadata,
        } => {
            e.map(5)?.str("type")?.str("peer")?;
            e.str("senderId")?.str(sender_id)?;
            e.str("targetId")?.str(target_id)?;
            e.str("selectedProtocolVersion")?
                .str(selected_protocol_version)?;
            e.str("peerMetadata")?;
            write_metadata(e, metadata)?;
        }
        WireMessage::Sync {
            request,
            sender_id,
            target_id,
            document_id,
            data,
        } => {
            let kind = if *request { "request" } else { "sync" };
            e.map(5)?.str("type")?.str(kind)?;
            e.str("senderId")?.str(sender_id)?;
            e.str("targetId")?.str(target_id)?;
            e.str("documentId")?.str(document_id)?;
            e.str("data")?.bytes(data)?;
        }
        WireMessage::DocUnavailable {
            sender_id,
            target_id,
            document_id,
        } => {
            e.map(4)?.str("type")?.str("doc-unavailable")?;
            e.str("senderId")?.str(sender_id)?;
            e.str("targetId")?.str(target_id)?;
            e.str("documentId")?.str(document_id)?;
        }
        WireMessage::Ephemeral {
            sender_id,
            target_id,
            document_id,
            session_id,
            count,
            data,
        } => {
            e.map(7)?.str("type")?.str("ephemeral")?;
            e.str("senderId")?.str(sender_id)?;
            e.str("targetId")?.str(target_id)?;
            e.str("documentId")?.str(document_id)?;
            e.str("sessionId")?.str(session_id)?;
            e.str("count")?.u64(*count)?;
            e.str("data")?.bytes(data)?;
        }
        WireMessage::Error { message } => {
            e.map(2)?.str("type")?.str("error")?;
            e.str("message")?.str(message)?;
        }
        WireMessage::Other { kind } => {
            e.map(1)?.str("type")?.str(kind)?;
        }
    }
    Ok(())
}

fn write_metadata(e: &mut Encoder<Vec<u8>>, m: &PeerMetadata) -> EncodeResult {
    match &m.storage_id {
        Some(id) => {
            e.map(2)?.str("storageId")?.str(id)?;
        }
        None => {
            e.map(1)?;
        }
    }
    e.str("isEphemeral")?.bool(m.is_ephemeral)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<WireMessage> {
        vec![
            WireMessage::Join {
                sender_id: "client-1".into(),
                supported_protocol_versions: vec!["1".into()],
                metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: false,
                },
            },
            WireMessage::Peer {
                sender_id: "node".into(),
                target_id: "client-1".into(),
                selected_protocol_version: "1".into(),
                metadata: PeerMetadata {
                    storage_id: Some("store-1".into()),
                    is_ephemeral: false,
                },
            },
            WireMessage::Sync {
                request: true,
                sender_id: "a".into(),
                target_id: "b".into(),
                document_id: "4NMNnkMhL8jXrdJ9jamS58PAVdXu".into(),
                data: vec![0x42, 0, 1],
            },
            WireMessage::Sync {
                request: false,
                sender_id: "a".into(),
                target_id: "b".into(),
                document_id: "d".into(),
                data: vec![],
            },
            WireMessage::DocUnavailable {
                sender_id: "a".into(),
                target_id: "b".into(),
                document_id: "d".into(),
            },
            WireMessage::Ephemeral {
                sender_id: "a".into(),
                target_id: "b".into(),
                document_id: "d".into(),
                session_id: "s".into(),
                count: 7,
                data: vec![1, 2],
            },
            WireMessage::Error {
                message: "unsupported protocol version".into(),
            },
            WireMessage::Other {
                kind: "remote-heads-changed".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(decode(&encode(&m), 1 << 20).unwrap(), m);
        }
    }

    /// A join as cbor-x writes it from a tab without storage: `storageId`
    /// is `undefined`, the metadata key may be `metadata`, an unknown key
    /// with a nested value is skipped, and `count` may be a float.
    #[test]
    fn what_the_js_side_sends_decodes() {
        let mut e = Encoder::new(Vec::new());
        e.map(5).unwrap();
        e.str("type").unwrap().str("join").unwrap();
        e.str("senderId").unwrap().str("tab-9").unwrap();
        e.str("supportedProtocolVersions")
            .unwrap()
            .array(1)
            .unwrap()
            .str("1")
            .unwrap();
        e.str("metadata").unwrap().map(2).unwrap();
        e.str("storageId").unwrap().undefined().unwrap();
        e.str("isEphemeral").unwrap().bool(true).unwrap();
        e.str("extra").unwrap().array(2).unwrap();
        e.map(1).unwrap().str("k").unwrap().array(0).unwrap();
        e.f64(1.5).unwrap();
        let join = decode(&e.into_writer(), 1 << 20).unwrap();
        assert_eq!(
            join,
            WireMessage::Join {
                sender_id: "tab-9".into(),
                supported_protocol_versions: vec!["1".into()],
                metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: true
                },
            }
        );
        let mut e = Encoder::new(Vec::new());
        e.begin_map().unwrap();
        for (k, v) in [
            ("type", "ephemeral"),
            ("senderId", "a"),
            ("targetId", "b"),
            ("documentId", "d"),
            ("sessionId", "s"),
        ] {
            e.str(k).unwrap().str(v).unwrap();
        }
        e.str("count").unwrap().f64(3.0).unwrap();
        e.str("data").unwrap().bytes(&[9]).unwrap();
        e.end().unwrap();
        match decode(&e.into_writer(), 1 << 20).unwrap() {
            WireMessage::Ephemeral { count, data, .. } => assert_eq!((count, data), (3, vec![9])),
            m => panic!("{m:?}"),
        }
    }

    /// Bytes as cbor-x 1.x encodes a sync message and an ephemeral one with
    /// its default options (maps with two-byte lengths, `data` as a
    /// Uint8Array under tag 64), and a join with `storageId: undefined`.
    #[test]
    fn messages_encoded_by_cbor_x_decode() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let sync = hex(
            "b9000564747970656473796e636873656e6465724964616168746172676574496461626a646f63756d656e74496461646464617461d84043010203",
        );
        assert_eq!(
            decode(&sync, 1 << 20).unwrap(),
            WireMessage::Sync {
                request: false,
                sender_id: "a".into(),
                target_id: "b".into(),
                document_id: "d".into(),
                data: vec![1, 2, 3],
            }
        );
        let eph = hex(
            "b90007647479706569657068656d6572616c6873656e6465724964616168746172676574496461626a646f63756d656e74496461646973657373696f6e4964617365636f756e74036464617461d8404109",
        );
        assert!(matches!(
            decode(&eph, 1 << 20).unwrap(),
            WireMessage::Ephemeral { count: 3, .. }
        ));
        let join = hex(
            "b900046474797065646a6f696e6873656e6465724964657461622d317819737570706f7274656450726f746f636f6c56657273696f6e738161316c706565724d65746164617461b900026973746f726167654964f76b6973457068656d6572616cf4",
        );
        assert_eq!(
            decode(&join, 1 << 20).unwrap(),
            WireMessage::Join {
                sender_id: "tab-1".into(),
                supported_protocol_versions: vec!["1".into()],
                metadata: PeerMetadata::default(),
            }
        );
        // Another tag on data is refused.
        let mut other = sync.clone();
        let at = other.len() - 6;
        assert_eq!(other[at..at + 2], [0xd8, 0x40]);
        other[at + 1] = 0x41;
        assert!(decode(&other, 1 << 20).is_err());
    }

    #[test]
    fn bad_input_is_an_error_never_a_panic() {
        let big = encode(&samples()[2]);
        assert!(matches!(decode(&big, 4), Err(WireError::TooLarge { .. })));
        for bytes in [
            &[][..],
            &[0xff],
            &[0xa1, 0x64, b't', b'y', b'p', b'e'], // a key without a value
            &[0x81, 0x01],                         // an array, not a map
            &[0xa1, 0x01, 0x01],                   // a number as a key
            &[0xbf, 0x64, b't', b'y', b'p', b'e'], // an indefinite map never ended
            &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // a huge array
        ] {
            assert!(decode(bytes, 1 << 20).is_err(), "{bytes:?}");
        }
        // A sync message without its data, a join without a sender.
        let mut e = Encoder::new(Vec::new());
        e.map(4).unwrap();
        for (k, v) in [
            ("type", "sync"),
            ("senderId", "a"),
            ("targetId", "b"),
            ("documentId", "d"),
        ] {
            e.str(k).unwrap().str(v).unwrap();
        }
        assert_eq!(
            decode(&e.into_writer(), 1 << 20),
            Err(WireError::Missing {
                kind: "sync".into(),
                field: "data"
            })
        );
        // A count that is not whole, deep nesting under an unknown key.
        let mut e = Encoder::new(Vec::new());
        e.map(2).unwrap().str("type").unwrap().str("x").unwrap();
        e.str("deep").unwrap();
        for _ in 0..10_000 {
            e.array(1).unwrap();
        }
        e.u8(0).unwrap();
        assert_eq!(
            decode(&e.into_writer(), 1 << 20).unwrap(),
            WireMessage::Other { kind: "x".into() }
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{RngExt, SeedableRng};
        let seed = 20;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let valid: Vec<Vec<u8>> = samples().iter().map(encode).collect();
        for i in 0..20_000 {
            let mut b = valid[i % valid.len()].clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
            }
            b.truncate(rng.random_range(0..=b.len()));
            // Must return, whatever it returns (seed {seed}).
            let _ = decode(&b, 1 << 20);
        }
    }
}
