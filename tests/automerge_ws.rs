//! The automerge-repo endpoint (`GET /v1/automerge`) against hostile and
//! broken clients, spoken to from Rust with a plain WebSocket client and an
//! Automerge doc: every bad input gets a clear `error` and a close (or is
//! dropped, where the protocol says so), stores nothing, and the node keeps
//! serving its other clients. The stock JS clients are in tests/interop/.

mod common;

use common::until;
use common::ws::*;

use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT, ReadDoc};
use futures_util::SinkExt;
use mergeflow::testing::amrepo::url::id_of;
use mergeflow::testing::amrepo::wire::{self, PeerMetadata, WireMessage};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// A well-behaved client still reads `notes/ok` from the node.
async fn still_serves(node: &mergeflow::Node) {
    let (mut ws, node_id) = joined(node, "good-client").await;
    let mut doc = AutoCommit::new();
    sync_until_quiet(&mut ws, "good-client", &node_id, "notes/ok", &mut doc).await;
    let (v, _) = doc.get(ROOT, "n").unwrap().expect("the client got the doc");
    assert_eq!(v.as_i64(), Some(1));
}

async fn node_with_doc(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut mergeflow::Config),
) -> mergeflow::Node {
    let node = common::api_node(dir, tweak).await;
    node.doc("notes/ok")
        .unwrap()
        .patch(serde_json::json!({"n": 1}))
        .await
        .unwrap();
    node
}

#[tokio::test]
async fn broken_clients_get_an_error_and_a_close_and_others_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_doc(dir.path(), |c| c.automerge.max_message_bytes = 64 * 1024).await;
    let node_id = node.peer_id().to_string();
    struct Case {
        name: &'static str,
        before_join: bool,
        frame: Message,
        says: &'static str,
    }
    let sync_for = |document_id: &str| {
        Message::Binary(
            wire::encode(&WireMessage::Sync {
                request: false,
                sender_id: "bad".into(),
                target_id: node_id.clone(),
                document_id: document_id.into(),
                data: vec![0x42, 0x01, 0x02],
            })
            .into(),
        )
    };
    let cases = [
        Case {
            name: "garbage bytes as the join",
            before_join: true,
            frame: Message::Binary(vec![0xff, 0x00, 0x13, 0x37].into()),
            says: "malformed",
        },
        Case {
            name: "a text frame as the join",
            before_join: true,
            frame: Message::Text("{\"type\":\"join\"}".into()),
            says: "binary",
        },
        Case {
            name: "sync before join",
            before_join: true,
            frame: sync_for(&id_of("notes/ok")),
            says: "first message must be join",
        },
        Case {
            name: "join without version 1",
            before_join: true,
            frame: Message::Binary(
                wire::encode(&WireMessage::Join {
                    sender_id: "bad".into(),
                    supported_protocol_versions: vec!["2".into()],
                    metadata: PeerMetadata::default(),
                })
                .into(),
            ),
            says: "protocol version 1",
        },
        Case {
            name: "garbage after join",
            before_join: false,
            frame: Message::Binary(vec![0xa1, 0x61].into()),
            says: "malformed",
        },
        Case {
            name: "a text frame after join",
            before_join: false,
            frame: Message::Text("hello".into()),
            says: "text messages",
        },
        Case {
            name: "a document id that is not bs58check",
            before_join: false,
            frame: sync_for("not-an-id-0OIl"),
            says: "bad documentId",
        },
        Case {
            name: "a sync message that is not Automerge",
            before_join: false,
            frame: sync_for(&id_of("notes/ok")),
            says: "notes/ok",
        },
    ];
    for case in cases {
        let (mut ws, _) = connect_async(url(&node)).await.unwrap();
        if !case.before_join {
            send(&mut ws, &join("bad")).await;
            assert!(matches!(
                next(&mut ws).await,
                Some(WireMessage::Peer { .. })
            ));
        }
        ws.send(case.frame).await.unwrap();
        let (error, code) = closed_with(&mut ws).await;
        let error = error.unwrap_or_else(|| panic!("{}: no error message", case.name));
        assert!(
            error.contains(case.says),
            "{}: error {error:?} should say {:?}",
            case.name,
            case.says
        );
        assert_eq!(
            code,
            Some(1008),
            "{}: closed as a policy violation",
            case.name
        );
        still_serves(&node).await;
    }
    // A frame over automerge.max_message_bytes ends the connection.
    let (mut ws, _) = joined(&node, "big").await;
    let _ = ws.send(Message::Binary(vec![0u8; 65 * 1024].into())).await;
    let _ = closed_with(&mut ws).await;
    still_serves(&node).await;
    assert_eq!(
        node.doc("notes/ok").unwrap().get().await.unwrap(),
        serde_json::json!({"n": 1}),
        "nothing a broken client sent was stored"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn messages_naming_another_sender_or_target_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_doc(dir.path(), |_| {}).await;
    let (mut ws, node_id) = joined(&node, "mallory").await;
    // A change the client makes, sent as if from another peer, then to
    // another target: neither is taken.
    let mut doc = AutoCommit::new();
    let mut state = sync_until_quiet(&mut ws, "mallory", &node_id, "notes/ok", &mut doc).await;
    doc.put(ROOT, "n", 666).unwrap();
    let data = doc
        .sync()
        .generate_sync_message(&mut state)
        .unwrap()
        .encode();
    assert!(
        !sync::Message::decode(&data).unwrap().changes.is_empty(),
        "the message carries the change"
    );
    for (sender, target) in [("alice", node_id.as_str()), ("mallory", "someone-else")] {
        send(
            &mut ws,
            &WireMessage::Sync {
                request: false,
                sender_id: sender.into(),
                target_id: target.into(),
                document_id: id_of("notes/ok"),
                data: data.clone(),
            },
        )
        .await;
    }
    // The connection stays open and answers its own messages: a request
    // for an unknown doc gets doc-unavailable, so the two above were read.
    send(
        &mut ws,
        &WireMessage::Sync {
            request: true,
            sender_id: "mallory".into(),
            target_id: node_id.clone(),
            document_id: id_of("notes/none"),
            data: empty_sync(),
        },
    )
    .await;
    loop {
        match next(&mut ws).await {
            Some(WireMessage::DocUnavailable { document_id, .. }) => {
                assert_eq!(document_id, id_of("notes/none"));
                break;
            }
            Some(WireMessage::Sync { .. }) => continue,
            other => panic!("expected doc-unavailable, got {other:?}"),
        }
    }
    assert_eq!(
        node.doc("notes/ok").unwrap().get().await.unwrap(),
        serde_json::json!({"n": 1}),
        "a message naming another sender or target changed nothing"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connection_may_follow_only_so_many_docs_and_the_node_only_so_many_connections() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_doc(dir.path(), |c| {
        c.automerge.max_docs_per_connection = 3;
        c.automerge.max_connections = 4;
    })
    .await;
    let (mut ws, node_id) = joined(&node, "greedy").await;
    let empty = empty_sync();
    for i in 0..4 {
        send(
            &mut ws,
            &WireMessage::Sync {
                request: true,
                sender_id: "greedy".into(),
                target_id: node_id.clone(),
                document_id: id_of(&format!("notes/{i}")),
                data: empty.clone(),
            },
        )
        .await;
    }
    let (error, code) = closed_with(&mut ws).await;
    let error = error.expect("an error message");
    assert!(error.contains("max_docs_per_connection"), "{error}");
    assert_eq!(code, Some(1008));
    // Four connections are served; the fifth is refused before the upgrade,
    // and a slot frees when one closes.
    let mut open = Vec::new();
    for i in 0..4 {
        open.push(joined(&node, &format!("c{i}")).await.0);
    }
    let refused = connect_async(url(&node))
        .await
        .expect_err("a fifth connection");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("max_connections"), "{body}");
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
    let mut last = open.pop().unwrap();
    last.close(None).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        match connect_async(url(&node)).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("no slot freed: {e}"),
        }
    }
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_second_join_replaces_the_first_and_a_flood_costs_only_its_sender() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_doc(dir.path(), |_| {}).await;
    let (mut first, _) = joined(&node, "same").await;
    let (mut second, node_id) = joined(&node, "same").await;
    let (error, _) = closed_with(&mut first).await;
    assert!(error.unwrap_or_default().contains("replaced"));
    // The second connection floods ephemeral messages and sync requests it
    // never reads the answers to; another client is served meanwhile.
    let flood = async {
        for i in 0..5_000u64 {
            let msg = if i % 2 == 0 {
                WireMessage::Ephemeral {
                    sender_id: "same".into(),
                    target_id: node_id.clone(),
                    document_id: id_of("notes/ok"),
                    session_id: "s".into(),
                    count: i + 1,
                    data: vec![0; 512],
                }
            } else {
                WireMessage::Sync {
                    request: true,
                    sender_id: "same".into(),
                    target_id: node_id.clone(),
                    document_id: id_of("notes/ok"),
                    data: empty_sync(),
                }
            };
            if second
                .send(Message::Binary(wire::encode(&msg).into()))
                .await
                .is_err()
            {
                break; // the node closed it: also fine
            }
        }
    };
    tokio::join!(flood, still_serves(&node));
    still_serves(&node).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_dials_another_nodes_endpoint_as_a_sync_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::api_node(&dir.path().join("server"), |_| {}).await;
    let url = url(&server);
    let dialer = common::api_node(&dir.path().join("dialer"), |c| {
        c.automerge.servers = vec![mergeflow::config::AutomergeServer {
            url: url.clone(),
            docs: "notes/**".into(),
        }];
    })
    .await;
    dialer
        .doc("notes/x")
        .unwrap()
        .patch(serde_json::json!({"from": "dialer"}))
        .await
        .unwrap();
    dialer
        .doc("other/y")
        .unwrap()
        .patch(serde_json::json!({"private": true}))
        .await
        .unwrap();
    // The server has no name for the doc, so it holds it under its URL's id.
    let on_server = format!("am/{}", id_of("notes/x"));
    until("the server has notes/x", || async {
        let v = server.doc(&on_server).unwrap().get().await.ok()?;
        (v["from"] == "dialer").then_some(())
    })
    .await;
    // An edit at the server comes back to the dialer's named doc.
    server
        .doc(&on_server)
        .unwrap()
        .patch(serde_json::json!({"reply": "from the server"}))
        .await
        .unwrap();
    until("the dialer has the server's edit", || async {
        let v = dialer.doc("notes/x").unwrap().get().await.ok()?;
        (v["reply"] == "from the server").then_some(())
    })
    .await;
    assert!(
        server
            .doc(&format!("am/{}", id_of("other/y")))
            .unwrap()
            .get()
            .await
            .is_err(),
        "a doc outside the glob is not shared"
    );
    let link = &dialer.status().await.automerge_servers[0];
    assert!(
        link.connected && link.joins == 1 && link.shared_docs == 1,
        "{link:?}"
    );
    dialer.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
}

/// A client following a doc gets a keyed write's change (an MQTT reading,
/// a write with an Idempotency-Key) only once it is durable: with the
/// node's flushes held, a plain write to another followed doc reaches the
/// client and the keyed one does not, until the flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_a_keyed_change_only_once_durable() {
    use mergeflow::testing::runtime::Change;
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_doc(dir.path(), |_| {}).await;
    node.doc("keyed")
        .unwrap()
        .patch(serde_json::json!({"r": 0}))
        .await
        .unwrap();
    let (mut ws, node_id) = joined(&node, "follower").await;
    let mut ok = AutoCommit::new();
    sync_until_quiet(&mut ws, "follower", &node_id, "notes/ok", &mut ok).await;
    let mut keyed = AutoCommit::new();
    sync_until_quiet(&mut ws, "follower", &node_id, "keyed", &mut keyed).await;

    node.docs().pause_flushes(true);
    let docs = node.docs().clone();
    let write = tokio::spawn(async move {
        let patch = Change::Patch(serde_json::json!({"r": 1}));
        docs.write_idempotent("keyed".parse().unwrap(), patch, false, "r-1".into())
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.doc("keyed").unwrap().get().await.ok() != Some(serde_json::json!({"r": 1})) {
        assert!(Instant::now() < deadline, "the keyed write never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let docs = node.docs().clone();
    let plain = tokio::spawn(async move {
        let patch = Change::Patch(serde_json::json!({"n": 2}));
        docs.write("notes/ok".parse().unwrap(), patch).await
    });
    let (keyed_id, ok_id) = (id_of("keyed"), id_of("notes/ok"));
    loop {
        match next(&mut ws).await {
            Some(WireMessage::Sync { document_id, .. }) if document_id == ok_id => break,
            Some(WireMessage::Sync { document_id, .. }) => {
                assert_ne!(
                    document_id, keyed_id,
                    "the keyed change left before its flush"
                );
            }
            Some(_) => {}
            None => panic!("the node closed the connection"),
        }
    }
    assert!(!write.is_finished(), "the write returned before its flush");
    node.docs().pause_flushes(false);
    write.await.unwrap().unwrap();
    plain.await.unwrap().unwrap();
    loop {
        match next(&mut ws).await {
            Some(WireMessage::Sync {
                document_id, data, ..
            }) if document_id == keyed_id => {
                let msg = sync::Message::decode(&data).unwrap();
                assert!(!msg.changes.is_empty(), "it carries the change");
                break;
            }
            Some(_) => {}
            None => panic!("the node closed the connection"),
        }
    }
}
