//! A plain WebSocket client of the automerge-repo endpoint
//! (`GET /v1/automerge`), speaking the protocol message by message.

use std::time::Duration;

use automerge::AutoCommit;
use automerge::sync::{self, SyncDoc};
use futures_util::{SinkExt, StreamExt};
use mergeflow::testing::amrepo::url::id_of;
use mergeflow::testing::amrepo::wire::{self, PeerMetadata, WireMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn url(node: &mergeflow::Node) -> String {
    format!("ws://{}/v1/automerge", node.api_addr().unwrap())
}

pub async fn send(ws: &mut Ws, msg: &WireMessage) {
    ws.send(Message::Binary(wire::encode(msg).into()))
        .await
        .unwrap();
}

pub fn join(sender: &str) -> WireMessage {
    WireMessage::Join {
        sender_id: sender.into(),
        supported_protocol_versions: vec!["1".into()],
        metadata: PeerMetadata::default(),
    }
}

/// Connects and joins as `sender`; the node's peer id from its `peer`.
pub async fn joined(node: &mergeflow::Node, sender: &str) -> (Ws, String) {
    joined_at(&url(node), sender).await
}

/// As [`joined`], at `url` (with its `?token=` or `?ticket=`).
pub async fn joined_at(url: &str, sender: &str) -> (Ws, String) {
    let (mut ws, _) = connect_async(url).await.unwrap();
    send(&mut ws, &join(sender)).await;
    match next(&mut ws).await {
        Some(WireMessage::Peer {
            sender_id,
            target_id,
            selected_protocol_version,
            ..
        }) => {
            assert_eq!(target_id, sender);
            assert_eq!(selected_protocol_version, "1");
            (ws, sender_id)
        }
        other => panic!("expected peer, got {other:?}"),
    }
}

/// The next protocol message, or None once the socket closed.
pub async fn next(ws: &mut Ws) -> Option<WireMessage> {
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("the node answers within the deadline");
        match m {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Binary(b))) => return Some(wire::decode(&b, usize::MAX).unwrap()),
            Some(Ok(_)) => continue,
        }
    }
}

/// Reads until the node closes the socket: the `error` it sent first, if
/// any, and the close code.
pub async fn closed_with(ws: &mut Ws) -> (Option<String>, Option<u16>) {
    let mut error = None;
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("the node closes within the deadline");
        match m {
            Some(Ok(Message::Binary(b))) => {
                if let Ok(WireMessage::Error { message }) = wire::decode(&b, usize::MAX) {
                    error = Some(message);
                }
            }
            Some(Ok(Message::Close(frame))) => return (error, frame.map(|f| u16::from(f.code))),
            None | Some(Err(_)) => return (error, None),
            Some(Ok(_)) => {}
        }
    }
}

/// Syncs `doc` (a client copy of the node's doc `name`) until the node has
/// nothing more to say; the session's state.
pub async fn sync_until_quiet(
    ws: &mut Ws,
    me: &str,
    node_id: &str,
    name: &str,
    doc: &mut AutoCommit,
) -> sync::State {
    let mut state = sync::State::new();
    let document_id = id_of(name);
    let first = doc.sync().generate_sync_message(&mut state).unwrap();
    send(
        ws,
        &WireMessage::Sync {
            request: doc.get_heads().is_empty(),
            sender_id: me.into(),
            target_id: node_id.into(),
            document_id: document_id.clone(),
            data: first.encode(),
        },
    )
    .await;
    // Done when the node has told us heads equal to ours and then said
    // nothing for a moment (it may send a last message after agreeing). The
    // quiet moment alone is not enough: on a loaded machine the node's
    // answer can take longer than that.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = tokio::time::timeout(Duration::from_millis(500), next(ws)).await;
        let Ok(reply) = reply else {
            let mut theirs = state.their_heads.clone().unwrap_or_default();
            let mut ours = doc.get_heads();
            theirs.sort();
            ours.sort();
            if state.their_heads.is_some() && theirs == ours {
                return state;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: no agreement with the node within 60 s"
            );
            continue;
        };
        match reply {
            Some(WireMessage::Sync { data, .. }) => {
                let msg = sync::Message::decode(&data).unwrap();
                doc.sync().receive_sync_message(&mut state, msg).unwrap();
                if let Some(m) = doc.sync().generate_sync_message(&mut state) {
                    send(
                        ws,
                        &WireMessage::Sync {
                            request: false,
                            sender_id: me.into(),
                            target_id: node_id.into(),
                            document_id: document_id.clone(),
                            data: m.encode(),
                        },
                    )
                    .await;
                }
            }
            Some(WireMessage::DocUnavailable { .. }) => return state,
            // Another client's presence, relayed.
            Some(WireMessage::Ephemeral { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The first sync message of a client with no copy of a doc.
pub fn empty_sync() -> Vec<u8> {
    AutoCommit::new()
        .sync()
        .generate_sync_message(&mut sync::State::new())
        .unwrap()
        .encode()
}
