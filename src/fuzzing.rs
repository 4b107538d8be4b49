//! Fuzz targets: one function per decoder of outside input. Each takes any
//! bytes and must return without panicking (an error is a fine answer), and
//! checks what must hold for the inputs it accepts. The cargo-fuzz targets
//! under `fuzz/` call them; `tests/fuzz.rs` runs them on stable Rust over a
//! seeded corpus of valid inputs and their mutations, so CI exercises them.
//! Behind the `test-utils` feature (fuzz/ and the dev-dependency on this
//! crate enable it): not part of a shipped node.
//!
//! | target | what a peer, client or disk hands us |
//! | --- | --- |
//! | [`wire`] | frames from peers: sync, gossip and digest messages |
//! | [`http_body`] | request bodies: create, merge patch, ops, applied to a doc |
//! | [`workflow_toml`] | workflow definitions (files, `POST /v1/workflows`) |
//! | [`backup_file`] | backup files given to restore |
//! | [`stored_doc`] | a document's stored snapshot and changes, as loaded from disk |
//! | [`automerge_repo`] | automerge-repo protocol messages from JS and other clients (CBOR) |

use std::sync::OnceLock;

use automerge::{Automerge, ObjType, ROOT};

use crate::doc::{StringMode, apply_merge_patch, apply_ops, to_json};
use crate::sync::codec;

/// Largest frame the targets decode, as `net.max_message_bytes` would cap it.
const CAP: usize = 1 << 20;

/// A frame from a peer. A frame that decodes re-encodes to messages that
/// decode to the same messages.
pub fn wire(data: &[u8]) {
    let Ok(msgs) = codec::decode_frame(data, CAP) else {
        return;
    };
    for msg in msgs {
        let again =
            codec::decode(&codec::encode(&msg), usize::MAX).expect("a re-encoded message decodes");
        assert_eq!(again, msg, "a message changed through encode and decode");
    }
}

/// An automerge-repo protocol message from a client. A message that
/// decodes re-encodes to bytes that decode to the same message.
pub fn automerge_repo(data: &[u8]) {
    let Ok(msg) = crate::amrepo::wire::decode(data, CAP) else {
        return;
    };
    let again = crate::amrepo::wire::decode(&crate::amrepo::wire::encode(&msg), usize::MAX)
        .expect("a re-encoded message decodes");
    assert_eq!(again, msg, "a message changed through encode and decode");
}

/// An HTTP body: parsed as the API parses it (a create request, a merge
/// patch, a list of ops) and, when it parses, applied to a small doc in a
/// transaction, as the writer would. Whatever applies leaves a doc that
/// reads back as JSON.
pub fn http_body(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<crate::api::CreateRequest>(data) {
        let _ = crate::doc::DocId::new(req.id.as_deref().unwrap_or("x"));
    }
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let _ = apply_merge_patch(
        &mut tx,
        &serde_json::json!({"a": {"b": [1, 2, 3]}, "s": "text", "n": 1}),
        StringMode::Text,
    );
    tx.commit();
    if let Ok(patch) = serde_json::from_slice::<serde_json::Value>(data) {
        for strings in [StringMode::Scalar, StringMode::Text] {
            let mut fork = doc.fork();
            let mut tx = fork.transaction();
            if apply_merge_patch(&mut tx, &patch, strings).is_ok() {
                tx.commit();
                to_json(&fork, &ROOT, ObjType::Map).expect("a patched doc reads back");
            }
        }
    }
    if let Ok(ops) = serde_json::from_slice::<Vec<crate::doc::Op>>(data) {
        let mut fork = doc.fork();
        let mut tx = fork.transaction();
        if apply_ops(&mut tx, &ops, StringMode::Text).is_ok() {
            tx.commit();
            to_json(&fork, &ROOT, ObjType::Map).expect("a changed doc reads back");
        }
    }
}

/// A workflow definition: parsed, checked and its expressions compiled.
pub fn workflow_toml(data: &[u8]) {
    static SANDBOX: OnceLock<crate::workflow::expr::Sandbox> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sandbox = SANDBOX.get_or_init(crate::workflow::expr::Sandbox::new);
    let _ = crate::workflow::plan::Plan::load(sandbox, "fuzz.toml", text);
}

/// A backup file: read and checked whole. One that checks out lists, in
/// its manifest, exactly the docs read.
pub fn backup_file(data: &[u8]) {
    let mut ids = Vec::new();
    if let Ok(m) = crate::backup::read(data, |id, _, _| {
        ids.push(id.to_string());
        Ok(())
    }) {
        let listed: Vec<&str> = m.docs.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(listed, ids, "the manifest and the entries differ");
    }
}

/// A stored document: the first byte splits `data` into a snapshot and
/// changes (each change prefixed by its length, one byte), loaded as the
/// store's loader does, against the heads its metadata would record. The
/// loader contains Automerge's panics (see [`crate::doc::load_stored_contained`]);
/// under libFuzzer a panic still aborts, which is how Automerge's own bugs
/// on such input show up.
pub fn stored_doc(data: &[u8]) {
    let (snapshot, changes) = split_stored(data);
    let _ = crate::doc::load_stored_contained(&snapshot, changes, &[]);
}

/// Splits a [`stored_doc`] input into its snapshot and changes.
pub fn split_stored(data: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let Some((&split, rest)) = data.split_first() else {
        return (Vec::new(), Vec::new());
    };
    let split = (split as usize).min(rest.len());
    let (snapshot, mut tail) = rest.split_at(split);
    let mut changes = Vec::new();
    while let Some((&len, more)) = tail.split_first() {
        let len = (len as usize).min(more.len());
        changes.push(more[..len].to_vec());
        tail = &more[len..];
    }
    (snapshot.to_vec(), changes)
}
