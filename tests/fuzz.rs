//! The fuzz targets of `mergeflow::fuzzing` on stable Rust: each runs over a
//! corpus of valid inputs and seeded mutations of them (bit flips, cuts,
//! inserts, splices, random bytes). A panic fails the test and names the
//! seed; rerun with `MERGEFLOW_FUZZ_SEED=<seed>`, and more inputs with
//! `MERGEFLOW_FUZZ_ITERS`. The coverage-guided versions are under `fuzz/`
//! (cargo-fuzz).

mod common;

use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use mergeflow::backup::BackupWriter;
use mergeflow::fuzzing;
use mergeflow::testing::sync::{Message, codec};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn iterations() -> usize {
    std::env::var("MERGEFLOW_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000)
}

/// One mutation of `input` (or of it spliced with another corpus entry).
fn mutate(rng: &mut StdRng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => out.truncate(rng.random_range(0..len)),
            2 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = [0x00, 0xff, 0x7f, 0x80][rng.random_range(0..4)];
            }
            4 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..len);
                let piece = out[a..=b].to_vec();
                let at = rng.random_range(0..=out.len());
                out.splice(at..at, piece);
            }
            5 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                let cut = rng.random_range(0..=out.len());
                let from = rng.random_range(0..=other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            _ => {
                let n = rng.random_range(0..64);
                out = (0..n).map(|_| rng.random()).collect();
            }
        }
    }
    out
}

/// Runs `target` on every corpus entry, then on seeded mutations.
fn run(name: &str, corpus: Vec<Vec<u8>>, target: fn(&[u8])) {
    let seed = common::seed(0x5eed_f022) ^ name.bytes().map(u64::from).sum::<u64>();
    for input in &corpus {
        target(input);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..iterations() {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let input = mutate(&mut rng, base, &corpus);
        let caught = std::panic::catch_unwind(|| target(&input));
        assert!(
            caught.is_ok(),
            "{name}: input {i} panicked (seed {seed}): {input:?}"
        );
    }
}

/// A doc with a few changes: its save, and its changes one by one.
fn sample_doc() -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut doc = Automerge::new();
    for i in 0..3i64 {
        let mut tx = doc.transaction();
        tx.put(ROOT, format!("k{i}"), i).unwrap();
        let text = tx.put_object(ROOT, "t", automerge::ObjType::Text).unwrap();
        tx.splice_text(&text, 0, 0, "héllo").unwrap();
        tx.commit();
    }
    let changes = doc
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    (doc.save(), changes)
}

#[test]
fn wire_messages() {
    let (save, changes) = sample_doc();
    let heads = {
        let doc = Automerge::load(&save).unwrap();
        doc.get_heads()
    };
    let msgs = [
        Message::Change {
            doc: "sensors/a".into(),
            change: changes[0].clone(),
            sig: vec![],
            ack: true,
            seen: vec![1, 2, u64::MAX],
        },
        Message::Digest {
            buckets: vec![0, 7, u64::MAX],
            answer: false,
        },
        Message::Bucket {
            bucket: 3,
            entries: vec![("a".into(), 1), ("b/c".into(), 2)],
            answer: true,
        },
        Message::Sync {
            doc: "a".into(),
            data: vec![0x42, 1, 2, 3],
            sigs: vec![],
        },
        Message::Deleted {
            doc: "gone".into(),
            sig: vec![],
        },
        Message::Doc {
            doc: "d".into(),
            data: save,
            sigs: vec![],
        },
        Message::Have {
            doc: "d".into(),
            heads,
        },
    ];
    let mut corpus: Vec<Vec<u8>> = msgs.iter().map(codec::encode).collect();
    corpus.push(codec::encode_batch(&corpus.clone()));
    run("wire", corpus, fuzzing::wire);
}

#[test]
fn automerge_repo_messages() {
    use mergeflow::testing::amrepo::wire::{PeerMetadata, WireMessage, encode};
    let msgs = [
        WireMessage::Join {
            sender_id: "tab".into(),
            supported_protocol_versions: vec!["1".into()],
            metadata: PeerMetadata::default(),
        },
        WireMessage::Sync {
            request: true,
            sender_id: "tab".into(),
            target_id: "node".into(),
            document_id: mergeflow::testing::amrepo::url::id_of("notes/a"),
            data: vec![0x42, 1, 2, 3],
        },
        WireMessage::Ephemeral {
            sender_id: "tab".into(),
            target_id: "node".into(),
            document_id: "d".into(),
            session_id: "s".into(),
            count: 3,
            data: vec![1],
        },
        WireMessage::Error {
            message: "no".into(),
        },
    ];
    let corpus: Vec<Vec<u8>> = msgs.iter().map(encode).collect();
    run("automerge_repo", corpus, fuzzing::automerge_repo);
}

#[test]
fn http_bodies() {
    let corpus = [
        r#"{"id": "sensors/a", "value": {"celsius": 21.5, "tags": ["x"]}}"#,
        r#"{"a": {"b": null, "c": [1, {"d": true}]}, "s": "text", "n": 2}"#,
        r#"{"s": "téxt changed", "a": null, "new": {"deep": {"er": 1.5e300}}}"#,
        r#"[{"op": "set", "path": "/a/b", "value": [1, 2]},
            {"op": "set", "path": "/c", "value": 5, "as": "counter"},
            {"op": "increment", "path": "/n", "by": -3},
            {"op": "insert", "path": "/a/b/0", "value": "x"},
            {"op": "splice", "path": "/s", "index": 1, "delete": 2, "text": "é"},
            {"op": "delete", "path": "/a/b/1"}]"#,
        r#"[{"op": "set", "path": "/~1weird~0key", "value": {"t": "x"}, "as": "text"}]"#,
    ];
    run(
        "http_body",
        corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        fuzzing::http_body,
    );
}

#[test]
fn workflow_definitions() {
    let corpus = [
        include_str!("../examples/workflows/fahrenheit.toml"),
        include_str!("../examples/workflows/gateway-priority.toml"),
        include_str!("../examples/workflows/room-latest.toml"),
        include_str!("../examples/iot/workflows/average.toml"),
        include_str!("../examples/iot/workflows/setpoints.toml"),
        "name = \"tick\"\nschedule = \"every 30s\"\n[[steps]]\nid = \"w\"\nkind = \"write\"\ndoc = \"a/b\"\nset = { \"/t\" = \"1 + 2\" }\n",
    ];
    run(
        "workflow_toml",
        corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        fuzzing::workflow_toml,
    );
}

#[test]
fn backup_files() {
    let (save, _) = sample_doc();
    let mut w = BackupWriter::new(Vec::new(), "node", 1).unwrap();
    w.doc("a", &save).unwrap();
    w.doc("b/c", b"not automerge, still a backup entry")
        .unwrap();
    w.deleted("gone");
    let full = w.finish(2).unwrap().1;
    let empty = BackupWriter::new(Vec::new(), "node", 1)
        .unwrap()
        .finish(1)
        .unwrap()
        .1;
    run("backup_file", vec![full, empty], fuzzing::backup_file);
}

#[test]
fn stored_documents() {
    let (save, changes) = sample_doc();
    // As the target splits its input: [snapshot length][snapshot]
    // ([change length][change])*; the sample fits in 255-byte pieces.
    let pack = |snapshot: &[u8], changes: &[Vec<u8>]| {
        let mut out = vec![snapshot.len().min(255) as u8];
        out.extend_from_slice(&snapshot[..snapshot.len().min(255)]);
        for c in changes {
            out.push(c.len().min(255) as u8);
            out.extend_from_slice(&c[..c.len().min(255)]);
        }
        out
    };
    let corpus = vec![
        pack(&save, &[]),
        pack(&[], &changes),
        pack(&save, &changes[1..]),
    ];
    run("stored_doc", corpus, fuzzing::stored_doc);
}

/// Found by `stored_documents` (seed 1592652804, input 303): three changes
/// of the sample doc with mutated bytes that make Automerge 0.12 panic in
/// `change_graph.rs` (an assertion) while applying them.
const AUTOMERGE_PANIC: &[u8] = &[
    0, 104, 133, 111, 74, 131, 104, 73, 16, 211, 1, 94, 0, 16, 40, 18, 153, 67, 72, 160, 109, 161,
    186, 129, 215, 34, 247, 56, 179, 25, 1, 1, 0, 0, 0, 10, 1, 4, 2, 4, 17, 4, 19, 7, 21, 8, 52, 2,
    66, 5, 86, 7, 87, 7, 112, 2, 0, 2, 5, 0, 0, 2, 5, 2, 0, 3, 4, 0, 0, 2, 126, 0, 3, 3, 1, 126, 2,
    107, 48, 1, 116, 0, 5, 2, 5, 126, 1, 4, 5, 1, 124, 20, 0, 22, 38, 3, 22, 0, 104, 195, 169, 108,
    108, 111, 7, 0, 148, 133, 111, 74, 131, 195, 83, 41, 148, 1, 137, 1, 1, 104, 73, 16, 211, 123,
    179, 243, 206, 101, 107, 75, 228, 203, 245, 249, 237, 180, 215, 231, 108, 231, 23, 239, 38, 71,
    159, 164, 66, 94, 146, 40, 189, 16, 40, 18, 153, 67, 72, 160, 109, 161, 186, 129, 215, 34, 247,
    56, 179, 25, 2, 8, 0, 0, 0, 12, 1, 4, 2, 4, 17, 4, 19, 7, 21, 8, 52, 2, 66, 5, 86, 7, 87, 7,
    112, 5, 113, 2, 115, 2, 0, 2, 5, 0, 0, 2, 5, 9, 0, 3, 4, 0, 0, 2, 126, 0, 10, 3, 1, 126, 2,
    107, 49, 1, 116, 0, 5, 2, 5, 126, 1, 4, 5, 1, 124, 20, 0, 22, 38, 3, 22, 1, 104, 195, 169, 108,
    108, 111, 126, 0, 1, 5, 0, 127, 0, 127, 2, 148, 133, 111, 74, 131, 173, 222, 182, 207, 1, 137,
    1, 1, 195, 83, 41, 148, 54, 124, 175, 241, 81, 185, 225, 35, 77, 205, 174, 188, 151, 32, 152,
    42, 200, 141, 211, 164, 31, 71, 172, 3, 185, 164, 160, 132, 16, 40, 18, 153, 67, 72, 160, 109,
    161, 186, 129, 215, 34, 247, 56, 179, 25, 127, 15, 0, 0, 0, 12, 1, 4, 2, 4, 17, 4, 19, 7, 21,
    8, 52, 2, 66, 5, 86, 7, 87, 7, 112, 5, 113, 2, 115, 2, 0, 2, 5, 0, 0, 2, 5, 16, 0, 3, 4, 0, 0,
    2, 126, 0, 17, 3, 1, 126, 2, 107, 50, 1, 116, 0, 5, 2, 5, 126, 1, 4, 5, 1, 124, 20, 0, 22, 38,
    3, 22, 2, 104, 195, 169, 108, 108, 111, 126, 0, 1, 5, 0, 127, 0, 127, 9,
];

/// The regression test for that panic: stored on disk as a doc's change
/// tail (as a damaged disk could leave it), it makes that doc a clear
/// "corrupt" error while the node and its other docs go on.
#[tokio::test]
async fn changes_that_make_automerge_panic_cost_their_doc_not_the_node() {
    let (snapshot, changes) = fuzzing::split_stored(AUTOMERGE_PANIC);
    assert!(snapshot.is_empty());
    let loaded = mergeflow::doc::load_stored_contained(&snapshot, changes.clone(), &[]);
    assert_eq!(
        loaded.err().as_deref(),
        Some("automerge panicked while loading")
    );

    let dir = tempfile::tempdir().unwrap();
    {
        let store = mergeflow::testing::store::Store::open(dir.path(), 1 << 20).unwrap();
        let mut meta = mergeflow::testing::store::DocMeta::new(1);
        meta.next_seq = changes.len() as u64;
        meta.tail_changes = changes.len() as u64;
        meta.size_bytes = changes.iter().map(|c| c.len() as u64).sum();
        let mut batch = mergeflow::testing::store::WriteBatch::default();
        let refs: Vec<&[u8]> = changes.iter().map(Vec::as_slice).collect();
        batch.append_changes("damaged", 0, &refs, &meta);
        store.apply(batch).unwrap();
        store.flush().unwrap();
    }
    let node = mergeflow::Node::builder()
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    let err = node.doc("damaged").unwrap().get().await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("damaged") && msg.contains("panicked"), "{msg}");
    let ok = node.doc("fine").unwrap();
    ok.patch(serde_json::json!({"still": "works"}))
        .await
        .unwrap();
    assert_eq!(
        ok.get().await.unwrap(),
        serde_json::json!({"still": "works"})
    );
    node.shutdown().await.unwrap();
}

/// Found by `cargo fuzz run stored_doc` (libFuzzer, 40 s): a 74-byte
/// snapshot that makes Automerge panic in hexane's RLE decoder
/// (`rle/decoder.rs:216`, an unwrap of `None`) while loading. Contained.
#[test]
fn a_snapshot_that_makes_automerge_panic_is_an_error() {
    let data = include_bytes!("../fuzz/regressions/stored_doc-hexane-rle-decoder-216.bin");
    let (snapshot, changes) = fuzzing::split_stored(data);
    assert!(!snapshot.is_empty() && changes.is_empty());
    let loaded = mergeflow::doc::load_stored_contained(&snapshot, changes, &[]);
    assert_eq!(
        loaded.err().as_deref(),
        Some("automerge panicked while loading")
    );
    fuzzing::stored_doc(data);
}
