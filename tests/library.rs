//! The library API: concurrent writers, closures over Automerge transactions,
//! compaction (early for small docs) and cache eviction across reopen, size
//! caps.

use std::path::Path;

use automerge::ReadDoc;
use automerge::transaction::Transactable;
use mergeflow::config::Config;
use mergeflow::{DocError, Error, Node};
use serde_json::json;

async fn open(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Node {
    let mut config = Config::default();
    config.node.data_dir = dir.join("data");
    tweak(&mut config);
    Node::builder().config(config).start().await.unwrap()
}

async fn reopen(node: Node, dir: &Path, tweak: impl FnOnce(&mut Config)) -> Node {
    node.shutdown().await.unwrap();
    drop(node);
    open(dir, tweak).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_to_one_doc_lose_no_update() {
    const WRITERS: usize = 32;
    const EACH: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |c| c.store.compact_after_changes = 64).await;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let doc = node.doc("shared/counter").unwrap();
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                if i % 2 == 0 {
                    doc.patch(json!({ format!("w{w}-{i}"): i })).await.unwrap();
                } else {
                    let ops = serde_json::from_value(json!([
                        {"op": "increment", "path": "/count"},
                        {"op": "set", "path": format!("/w{w}-{i}"), "value": i}
                    ]))
                    .unwrap();
                    doc.ops(ops).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let check = |v: serde_json::Value| {
        for w in 0..WRITERS {
            for i in 0..EACH {
                assert_eq!(v[format!("w{w}-{i}")], json!(i), "write w{w}-{i} lost");
            }
        }
        assert_eq!(v["count"], json!(WRITERS * (EACH / 2)), "lost increments");
    };
    check(node.doc("shared/counter").unwrap().get().await.unwrap());
    let history = node.doc("shared/counter").unwrap().history().await.unwrap();
    let writes = history.iter().filter(|h| !h.genesis).count();
    assert_eq!(writes, WRITERS * EACH, "one change per write");
    let node = reopen(node, dir.path(), |_| {}).await;
    check(node.doc("shared/counter").unwrap().get().await.unwrap());
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn change_closure_is_one_change_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |_| {}).await;
    let doc = node.doc("notes/1").unwrap();
    let r = doc
        .change(|tx| {
            tx.put(automerge::ROOT, "title", "hi")?;
            let list = tx.put_object(automerge::ROOT, "items", automerge::ObjType::List)?;
            tx.insert(&list, 0, 1)?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(
        doc.get().await.unwrap(),
        json!({"title": "hi", "items": [1]})
    );
    let failed = doc
        .change(|tx| {
            tx.put(automerge::ROOT, "title", "changed")?;
            // Deleting from a scalar is an Automerge error.
            let (_, title) = tx.get(automerge::ROOT, "title")?.unwrap();
            tx.delete(&title, 0)?;
            Ok(())
        })
        .await;
    assert!(
        matches!(failed, Err(Error::Doc(DocError::Automerge(_)))),
        "{failed:?}"
    );
    assert_eq!(doc.get().await.unwrap()["title"], json!("hi"));
    assert_eq!(
        doc.heads().await.unwrap(),
        r.heads,
        "a failed change stores nothing"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn compaction_and_eviction_keep_every_change_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let tweak = |c: &mut Config| {
        c.store.compact_after_changes = 8;
        c.store.cache_docs = 4;
    };
    let node = open(dir.path(), tweak).await;
    for round in 0..30 {
        for d in 0..12 {
            node.doc(&format!("c/{d}"))
                .unwrap()
                .patch(json!({ format!("r{round}"): d, "last": round }))
                .await
                .unwrap();
        }
    }
    let listed = node.docs().list().await.unwrap();
    assert_eq!(listed.len(), 12);
    let node = reopen(node, dir.path(), tweak).await;
    for d in 0..12 {
        let v = node.doc(&format!("c/{d}")).unwrap().get().await.unwrap();
        for round in 0..30 {
            assert_eq!(v[format!("r{round}")], json!(d), "c/{d} lost round {round}");
        }
        assert_eq!(v["last"], json!(29));
        let history = node
            .doc(&format!("c/{d}"))
            .unwrap()
            .history()
            .await
            .unwrap();
        assert_eq!(history.len(), 30);
    }
    node.shutdown().await.unwrap();
}

/// A small doc is stored as one compact save once its tail holds 8
/// changes, whatever `store.compact_after_changes` says above that; the
/// changes that made it due are never written raw. A big doc, and one past
/// 256 changes, keep their tail until `store.compact_after_changes`.
#[tokio::test]
async fn small_docs_compact_early_and_big_ones_wait() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |_| {}).await;
    for i in 0..8 {
        for d in ["small/seven", "small/eight"] {
            if d == "small/seven" && i == 7 {
                continue;
            }
            node.doc(d).unwrap().patch(json!({ "n": i })).await.unwrap();
        }
    }
    // Small in bytes, but past 256 changes: back on the usual rule, so its
    // tail grows again (it compacted every few changes until then).
    let busy = node.doc("busy").unwrap();
    for i in 0..300 {
        busy.patch(json!({ "n": i })).await.unwrap();
    }
    drop(busy);
    // Over the small-doc bound from its first change.
    let big = node.doc("big").unwrap();
    big.patch(json!({ "blob": "x".repeat(20_000) }))
        .await
        .unwrap();
    for i in 0..20 {
        big.patch(json!({ "n": i })).await.unwrap();
    }
    // (A doc handle holds the store open too.)
    drop(big);
    node.shutdown().await.unwrap();
    drop(node);
    // Off the runtime: the node's last tasks let go of the store on it.
    let data = dir.path().join("data");
    tokio::task::spawn_blocking(move || {
        let store = mergeflow::testing::store::Store::open(&data, 1 << 20).unwrap();
        let stored = |id: &str| {
            let meta = store.doc_meta(id).unwrap().unwrap();
            let data = store.doc_data(id, &meta).unwrap();
            (meta, data)
        };
        let (meta, data) = stored("small/seven");
        assert_eq!((meta.tail_changes, data.changes.len()), (7, 7));
        assert!(data.snapshot.is_empty());
        let (meta, data) = stored("small/eight");
        assert_eq!((meta.tail_changes, data.changes.len()), (0, 0));
        assert_eq!(meta.next_seq, 8, "every change still counted");
        assert_eq!(meta.size_bytes, data.snapshot.len() as u64);
        let doc = automerge::Automerge::load(&data.snapshot).unwrap();
        assert_eq!(
            doc.get_changes(&[]).len(),
            8,
            "the save holds all 8 changes"
        );
        let (meta, _) = stored("busy");
        assert!(meta.size_bytes < 16 << 10, "{meta:?}");
        assert!((40..=256).contains(&meta.tail_changes), "{meta:?}");
        let (meta, data) = stored("big");
        assert_eq!((meta.tail_changes, data.changes.len()), (21, 21));
    })
    .await
    .unwrap();
    let node = open(dir.path(), |_| {}).await;
    let v = node.doc("small/eight").unwrap().get().await.unwrap();
    assert_eq!(v["n"], json!(7));
    assert_eq!(
        node.doc("big").unwrap().get().await.unwrap()["n"],
        json!(19)
    );
    node.shutdown().await.unwrap();
}

/// A doc past the small-doc bounds compacts off the writer thread (its save
/// takes milliseconds): under concurrent writes nothing is lost, the
/// stored tail stays bounded, and what is stored (the save, then the
/// changes that came while it was made) loads as the doc. A doc deleted
/// while its saves may be under way stays deleted, with nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_docs_compact_off_the_writer_thread_and_lose_nothing() {
    const WRITERS: usize = 8;
    const EACH: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let tweak = |c: &mut Config| c.store.compact_after_changes = 16;
    let node = open(dir.path(), tweak).await;
    let write_all = |id: &'static str| {
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let doc = node.doc(id).unwrap();
                tokio::spawn(async move {
                    for i in 0..EACH {
                        doc.patch(json!({ format!("w{w}"): i, "last": i }))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        futures_util::future::join_all(tasks)
    };
    for t in write_all("hot").await {
        t.unwrap();
    }
    for t in write_all("gone").await {
        t.unwrap();
    }
    node.doc("gone").unwrap().delete().await.unwrap();
    let check = |v: &serde_json::Value| {
        for w in 0..WRITERS {
            assert_eq!(v[format!("w{w}")], json!(EACH - 1), "writer {w}: {v}");
        }
    };
    check(&node.doc("hot").unwrap().get().await.unwrap());
    node.shutdown().await.unwrap();
    drop(node);
    let data = dir.path().join("data");
    tokio::task::spawn_blocking(move || {
        let store = mergeflow::testing::store::Store::open(&data, 1 << 20).unwrap();
        let meta = store.doc_meta("hot").unwrap().unwrap();
        let stored = store.doc_data("hot", &meta).unwrap();
        assert!(!stored.snapshot.is_empty(), "{meta:?}");
        // Past 256 changes with no compaction, the tail would hold 224.
        assert!(meta.tail_changes < 128, "{meta:?}");
        assert_eq!(stored.changes.len() as u64, meta.tail_changes);
        let mut doc = automerge::Automerge::load(&stored.snapshot).unwrap();
        let tail: Vec<automerge::Change> = stored
            .changes
            .iter()
            .map(|c| automerge::Change::from_bytes(c.clone()).unwrap())
            .collect();
        doc.apply_changes(tail).unwrap();
        assert_eq!(doc.get_changes(&[]).len() as u64, meta.next_seq);
        let heads: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
        let mut expected = meta.heads.clone();
        expected.sort();
        let mut heads = heads;
        heads.sort();
        assert_eq!(heads, expected, "the stored doc has the meta's heads");
        // A save made before the delete, stored after it, would be back.
        let meta = store.doc_meta("gone").unwrap().unwrap();
        assert!(meta.deleted_at_ms.is_some(), "{meta:?}");
        let stored = store.doc_data("gone", &meta).unwrap();
        assert!(stored.snapshot.is_empty() && stored.changes.is_empty());
    })
    .await
    .unwrap();
    let node = open(dir.path(), tweak).await;
    check(&node.doc("hot").unwrap().get().await.unwrap());
    let history = node.doc("hot").unwrap().history().await.unwrap();
    assert_eq!(
        history.iter().filter(|h| !h.genesis).count(),
        WRITERS * EACH
    );
    let gone = node.doc("gone").unwrap().get().await;
    assert!(
        matches!(gone, Err(Error::Doc(DocError::Deleted(_)))),
        "{gone:?}"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn size_caps_name_the_cap_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |c| {
        c.doc.max_change_bytes = 2_000;
        c.doc.max_doc_bytes = 5_000;
    })
    .await;
    let doc = node.doc("capped").unwrap();
    let err = doc
        .patch(json!({"big": "x".repeat(4_000)}))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("doc.max_change_bytes = 2000"),
        "{err}"
    );
    assert!(matches!(
        doc.get().await,
        Err(Error::Doc(DocError::NotFound(_)))
    ));
    let mut last = None;
    for i in 0..10 {
        match doc
            .patch(json!({ format!("k{i}"): "y".repeat(1_000) }))
            .await
        {
            Ok(r) => last = Some(r.heads),
            Err(e) => {
                assert!(e.to_string().contains("doc.max_doc_bytes = 5000"), "{e}");
                break;
            }
        }
    }
    let heads = last.expect("some writes fit");
    assert_eq!(
        doc.heads().await.unwrap(),
        heads,
        "the refused write left no trace"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_change_fails_alone_and_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |_| {}).await;
    let doc = node.doc("p/1").unwrap();
    doc.patch(json!({"before": 1})).await.unwrap();
    let heads = doc.heads().await.unwrap();
    let err = doc
        .change(|tx| {
            tx.put(automerge::ROOT, "half", 1)?;
            panic!("a bug in the caller's closure");
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("panic"), "{err}");
    assert!(node.docs().writer_alive());
    assert_eq!(
        doc.heads().await.unwrap(),
        heads,
        "the panicked change left no trace"
    );
    assert_eq!(doc.get().await.unwrap(), json!({"before": 1}));
    doc.patch(json!({"after": 2})).await.unwrap();
    node.doc("p/2")
        .unwrap()
        .patch(json!({"x": 1}))
        .await
        .unwrap();
    drop(doc); // a handle keeps the store (and the data dir's lock) open
    let node = reopen(node, dir.path(), |_| {}).await;
    assert_eq!(
        node.doc("p/1").unwrap().get().await.unwrap(),
        json!({"before": 1, "after": 2})
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_doc_cache_is_bounded_by_count_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |c| {
        c.store.cache_docs = 8;
        c.store.cache_doc_bytes = 2_000;
    })
    .await;
    for d in 0..40 {
        let doc = node.doc(&format!("cached/{d}")).unwrap();
        doc.patch(json!({"body": "x".repeat(400), "n": d}))
            .await
            .unwrap();
        let (docs, bytes) = node.docs().cache_usage();
        // ~450 stored bytes per doc: the byte bound (2,000) binds before the
        // count (8). Only the doc in use may push it over, by its own size.
        assert!(docs <= 5, "{docs} docs cached");
        assert!(bytes <= 2_000 + 1_000, "{bytes} bytes cached");
    }
    // Evicted docs come back from the store intact.
    for d in 0..40 {
        let v = node
            .doc(&format!("cached/{d}"))
            .unwrap()
            .get()
            .await
            .unwrap();
        assert_eq!(v["n"], json!(d));
    }
    node.shutdown().await.unwrap();
}

/// An embedder's writes to the node's system docs get the same refusal as
/// HTTP writes (issue 19: the rule lives in one place under `doc/`).
#[tokio::test]
async fn library_writes_to_system_docs_are_refused_as_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |_| {}).await;
    let doc = node.doc("_mergeflow/nodes/someone").unwrap();
    let err = doc
        .patch(serde_json::json!({"workflows": []}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("membership doc"), "{err}");
    let wf = node.doc("_mergeflow/workflows/x").unwrap();
    let err = wf.ops(vec![]).await.unwrap_err();
    assert!(err.to_string().contains("/v1/workflows"), "{err}");
    assert!(wf.delete().await.is_err());
    assert!(
        node.doc("user/doc")
            .unwrap()
            .patch(serde_json::json!({"a": 1}))
            .await
            .is_ok()
    );
    node.shutdown().await.unwrap();
}

/// Holds the writer thread inside a change to doc `block` until the
/// returned sender is dropped or sent to; returns once the writer is held.
async fn hold_writer(node: &Node) -> std::sync::mpsc::Sender<()> {
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let doc = node.doc("block").unwrap();
    tokio::spawn(async move {
        doc.change(move |tx| {
            started_tx.send(()).unwrap();
            let _ = release_rx.recv();
            tx.put(automerge::ROOT, "x", 1)?;
            Ok(())
        })
        .await
        .unwrap();
    });
    tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
        .await
        .unwrap();
    release_tx
}

/// Sends keyed, coalescing writes to `doc` while the writer is held, so
/// that they all wait in one round; returns their answers in order.
async fn coalesced(
    node: &Node,
    doc: &str,
    writes: Vec<(&str, serde_json::Value)>,
) -> Vec<Result<mergeflow::testing::runtime::WriteResult, DocError>> {
    let release = hold_writer(node).await;
    let before = node.docs().queued();
    let mut tasks = Vec::new();
    for (key, ops) in writes {
        let (docs, id) = (node.docs().clone(), mergeflow::DocId::new(doc).unwrap());
        let opts = mergeflow::testing::runtime::WriteOpts {
            idem: Some(key.to_string()),
            coalesce: true,
            ..Default::default()
        };
        let change = mergeflow::testing::runtime::Change::Ops(serde_json::from_value(ops).unwrap());
        tasks.push(tokio::spawn(async move {
            docs.write_opts(id, change, opts).await
        }));
    }
    let want = before + tasks.len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while node.docs().queued() < want {
        assert!(std::time::Instant::now() < deadline, "writes never queued");
        tokio::task::yield_now().await;
    }
    release.send(()).unwrap();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn readings(doc: &mergeflow::DocHandle) -> Vec<u64> {
    let v = doc.get().await.unwrap();
    let mut r: Vec<u64> = serde_json::from_value(v["readings"].clone()).unwrap();
    r.sort_unstable();
    r
}

fn append(n: u64) -> serde_json::Value {
    json!([{ "op": "set", "path": "/readings/-", "value": n }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_writes_share_one_change_and_keep_their_keys_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), |_| {}).await;
    let doc = node.doc("sensors/a").unwrap();

    // Twenty readings and a repeat of one: one change (after the list's
    // genesis), each write answered, the repeat as a repeat.
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let mut writes: Vec<(&str, serde_json::Value)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), append(i as u64)))
        .collect();
    writes.push(("k3", append(3)));
    let answers = coalesced(&node, "sensors/a", writes).await;
    let changed: Vec<bool> = answers
        .iter()
        .map(|a| a.as_ref().unwrap().changed)
        .collect();
    // Of the two k3 writes, whichever the writer took first is applied.
    assert!(changed[3] != changed[20], "{changed:?}");
    assert_eq!(changed.iter().filter(|c| **c).count(), 20, "{changed:?}");
    let heads = &answers[0].as_ref().unwrap().heads;
    assert!(answers.iter().all(|a| &a.as_ref().unwrap().heads == heads));
    // Concurrent writes: each once, in no promised order.
    assert_eq!(readings(&doc).await, (0..20).collect::<Vec<_>>());
    let history = doc.history().await.unwrap();
    let made: Vec<&str> = history
        .iter()
        .filter_map(|h| h.message.as_deref())
        .filter(|m| m.contains("idem="))
        .collect();
    assert_eq!(
        made.len(),
        1,
        "one change for the round's readings: {made:?}"
    );
    for k in &keys {
        assert!(made[0].contains(&format!("idem={k} ")) || made[0].ends_with(&format!("idem={k}")));
    }

    // A bad write among good ones fails alone; the keys already stored are
    // repeats, also after a restart (read back from the stored messages).
    drop(doc);
    let node = reopen(node, dir.path(), |_| {}).await;
    let doc = node.doc("sensors/a").unwrap();
    let writes = vec![
        ("k20", append(20)),
        ("bad", json!([{ "op": "increment", "path": "/readings" }])),
        ("k21", append(21)),
        ("k0", append(0)),
    ];
    let answers = coalesced(&node, "sensors/a", writes).await;
    assert!(answers[0].as_ref().unwrap().changed);
    assert!(answers[1].is_err(), "{:?}", answers[1]);
    assert!(answers[2].as_ref().unwrap().changed);
    assert!(
        !answers[3].as_ref().unwrap().changed,
        "k0 is stored already"
    );
    assert_eq!(readings(&doc).await, (0..22).collect::<Vec<_>>());
    let history = doc.history().await.unwrap();
    let alone = |k: &str| {
        history
            .iter()
            .filter_map(|h| h.message.as_deref())
            .filter(|m| m.split(' ').any(|w| w == format!("idem={k}")))
            .collect::<Vec<_>>()
    };
    for k in ["k20", "k21"] {
        let made = alone(k);
        assert!(
            made.len() == 1 && !made[0].contains("at="),
            "{k} alone: {made:?}"
        );
    }
    // Every key of the coalesced change is known after the restart, not
    // only the first.
    let again: Vec<(&str, serde_json::Value)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), append(i as u64)))
        .collect();
    let answers = coalesced(&node, "sensors/a", again).await;
    assert!(answers.iter().all(|a| !a.as_ref().unwrap().changed));
    assert_eq!(readings(&doc).await, (0..22).collect::<Vec<_>>());

    // Together over the change size cap, each alone under it: each stored.
    drop(doc);
    let node = reopen(node, dir.path(), |c| c.doc.max_change_bytes = 1000).await;
    let big = "x".repeat(300);
    let writes: Vec<(String, serde_json::Value)> = (0..5)
        .map(|i| {
            let op = json!([{ "op": "set", "path": format!("/b{i}"), "value": big }]);
            (format!("big{i}"), op)
        })
        .collect();
    let answers = coalesced(
        &node,
        "sensors/b",
        writes
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect(),
    )
    .await;
    assert!(
        answers.iter().all(|a| a.as_ref().unwrap().changed),
        "{answers:?}"
    );
    let stored = node.doc("sensors/b").unwrap().get().await.unwrap();
    assert_eq!(stored.as_object().unwrap().len(), 5);
    let history = node.doc("sensors/b").unwrap().history().await.unwrap();
    let changes = history
        .iter()
        .filter(|h| h.message.as_deref().is_some_and(|m| m.contains("idem=big")))
        .count();
    assert_eq!(
        changes, 5,
        "one change each, since together they are over the cap"
    );
    node.shutdown().await.unwrap();
}
