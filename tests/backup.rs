//! Backup and restore through the library: a backup taken while writes go
//! on restores into a fresh node, merges into a node with newer changes
//! without losing them, and a damaged file is refused before anything is
//! merged.

use std::path::Path;

use mergeflow::backup::{self, BackupError};
use mergeflow::config::Config;
use mergeflow::{Error, Node};
use serde_json::json;

async fn open(dir: &Path) -> Node {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    // Small compaction threshold: some docs are a snapshot plus a tail.
    config.store.compact_after_changes = 8;
    Node::builder().config(config).start().await.unwrap()
}

async fn json_of(node: &Node, id: &str) -> serde_json::Value {
    node.doc(id).unwrap().get().await.unwrap()
}

/// Docs `d/0..n`, some with many changes, and one deleted.
async fn fill(node: &Node, n: usize) {
    for i in 0..n {
        let doc = node.doc(&format!("d/{i}")).unwrap();
        for k in 0..(i % 20) + 1 {
            doc.patch(json!({ "n": i, format!("k{k}"): k }))
                .await
                .unwrap();
        }
    }
    node.doc("gone")
        .unwrap()
        .patch(json!({"x": 1}))
        .await
        .unwrap();
    node.doc("gone").unwrap().delete().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_under_writes_restores_into_a_fresh_node() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir.path().join("a")).await;
    fill(&a, 200).await;
    let before: Vec<_> = a.docs().list().await.unwrap();

    // Writes keep going while the backup runs.
    let writer = {
        let a = a.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                a.doc(&format!("during/{}", i % 50))
                    .unwrap()
                    .patch(json!({ "i": i }))
                    .await
                    .unwrap();
            }
        })
    };
    let file = dir.path().join("a.mfbackup");
    let manifest = a.backup_to_file(&file).await.unwrap();
    writer.await.unwrap();
    assert!(!backup::partial_path(&file).exists());
    // Everything acknowledged before the backup began is in it.
    for d in &before {
        assert!(
            manifest.docs.iter().any(|e| e.id == d.id),
            "{} missing from the backup",
            d.id
        );
    }
    assert_eq!(manifest.deleted, vec!["gone".to_string()]);
    assert_eq!(manifest.node, a.peer_id().to_string());

    let b = open(&dir.path().join("b")).await;
    let report = b.restore_file(&file).await.unwrap();
    assert_eq!(report.docs, manifest.docs.len() as u64);
    assert_eq!(report.changed, report.docs, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.tombstones_skipped, 1);
    for i in [0, 7, 19, 199] {
        let id = format!("d/{i}");
        assert_eq!(json_of(&b, &id).await, json_of(&a, &id).await, "{id}");
        assert_eq!(
            b.docs()
                .heads(mergeflow::DocId::new(id.as_str()).unwrap())
                .await
                .unwrap(),
            a.docs()
                .heads(mergeflow::DocId::new(id.as_str()).unwrap())
                .await
                .unwrap()
        );
    }
    // Restoring the same backup again changes nothing.
    let again = b.restore_file(&file).await.unwrap();
    assert_eq!((again.changed, again.unchanged), (0, again.docs));
    // And it survives a restart of the node it was restored into.
    b.shutdown().await.unwrap();
    drop(b);
    let b = open(&dir.path().join("b")).await;
    assert_eq!(json_of(&b, "d/19").await, json_of(&a, "d/19").await);
    assert!(b.tasks().list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_merges_and_keeps_the_targets_newer_changes() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir.path().join("a")).await;
    a.doc("shared")
        .unwrap()
        .patch(json!({"from_a": 1, "v": "old"}))
        .await
        .unwrap();
    a.doc("kept-deleted")
        .unwrap()
        .patch(json!({"x": 1}))
        .await
        .unwrap();
    let file = dir.path().join("a.mfbackup");
    a.backup_to_file(&file).await.unwrap();

    // The target already has the doc, with newer changes of its own, and
    // deleted a doc the backup holds.
    let t = open(&dir.path().join("t")).await;
    let shared = t.doc("shared").unwrap();
    shared
        .patch(json!({"from_t": 2, "v": "newer"}))
        .await
        .unwrap();
    t.doc("kept-deleted")
        .unwrap()
        .patch(json!({"y": 1}))
        .await
        .unwrap();
    t.doc("kept-deleted").unwrap().delete().await.unwrap();

    let report = t.restore_file(&file).await.unwrap();
    assert_eq!(report.deleted_here, vec!["kept-deleted".to_string()]);
    let v = shared.get().await.unwrap();
    assert_eq!(v["from_a"], json!(1));
    assert_eq!(v["from_t"], json!(2));
    // Concurrent writes to "v": Automerge picks one, the same on every node.
    assert!(v["v"] == json!("old") || v["v"] == json!("newer"), "{v}");
    assert!(matches!(
        t.doc("kept-deleted").unwrap().get().await,
        Err(Error::Doc(mergeflow::DocError::Deleted(_)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_backup_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir.path().join("a")).await;
    fill(&a, 30).await;
    let file = dir.path().join("a.mfbackup");
    a.backup_to_file(&file).await.unwrap();
    let good = std::fs::read(&file).unwrap();

    let t = open(&dir.path().join("t")).await;
    let count = t.docs().count();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("without its trailer", good[..good.len() - 40].to_vec()),
        ("with a flipped byte", {
            let mut b = good.clone();
            b[good.len() / 3] ^= 0x40;
            b
        }),
        ("empty", vec![]),
        ("not a backup", b"{\"docs\": []}".to_vec()),
    ];
    for (what, bytes) in cases {
        let bad = dir.path().join("bad.mfbackup");
        std::fs::write(&bad, &bytes).unwrap();
        let err = t.restore_file(&bad).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Backup(
                    BackupError::Truncated { .. }
                        | BackupError::Damaged { .. }
                        | BackupError::NotABackup
                )
            ),
            "{what}: {err}"
        );
        println!("{what}: {err}");
        assert_eq!(t.docs().count(), count, "{what}: docs were merged");
    }
    let missing = t.restore_file(&dir.path().join("nope")).await.unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_spool_left_by_a_killed_restore_is_removed_at_start() {
    // What `kill -9` during `POST /v1/restore` leaves: the spooled body in
    // <data_dir>/restore-tmp/. (The kill itself is not staged here: the
    // node removes the spool only when it next starts, so the leftover
    // file is the whole of the state under test.)
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = open(&data).await;
    node.doc("kept")
        .unwrap()
        .patch(json!({"x": 1}))
        .await
        .unwrap();
    node.shutdown().await.unwrap();
    drop(node);
    let spool = data.join(backup::RESTORE_SPOOL);
    std::fs::create_dir_all(&spool).unwrap();
    for i in 0..2 {
        std::fs::write(
            spool.join(format!("1700000000000-{i:016x}.mfbackup")),
            vec![7u8; 100_000],
        )
        .unwrap();
    }

    let node = open(&data).await;
    assert!(!spool.exists(), "the spool dir is left after start");
    assert_eq!(json_of(&node, "kept").await, json!({"x": 1}));
    node.shutdown().await.unwrap();
    drop(node);

    // A file that is not a spool is not ours: it stays, and so does the dir.
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("notes.txt"), "mine").unwrap();
    std::fs::write(spool.join("1-0.mfbackup"), "x").unwrap();
    let node = open(&data).await;
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec!["notes.txt".to_string()]);
    node.shutdown().await.unwrap();
}
