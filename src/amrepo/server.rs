//! Serving automerge-repo clients: one task per WebSocket connection,
//! speaking the protocol in [`super::wire`], handing sync messages to the
//! runtime through a [`ClientConn`] and relaying ephemeral messages between
//! the clients of a doc on this node.
//!
//! A connection starts with the client's `join` (within
//! [`HANDSHAKE`]); the node answers `peer`, or `error` and closes when
//! version "1" is not offered. After that:
//! - `request` / `sync` go to the runtime (answered per (connection, doc)
//!   sync state on the writer thread); a client's document id finds the
//!   named doc whose URL it is, else the doc `am/<id>`;
//! - `ephemeral` goes to the doc's other clients here, once per (sender,
//!   session, count);
//! - messages naming another sender or target are dropped; bad CBOR, text
//!   frames, oversized frames and a bad document id get `error` and close;
//! - a second connection joining with the same sender id replaces this one;
//! - a client silent for two pings is closed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::url::{client_doc_name, decode_id, id_of};
use super::wire::{self, PROTOCOL_VERSION, PeerMetadata, WireMessage};
use crate::access::Access;
use crate::config::AutomergeConfig;
use crate::doc::DocId;
use crate::runtime::{ClientConn, ClientOut, Docs};

/// How long a new connection has to send `join`.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// Ephemeral messages queued to one client; more are dropped (they are
/// ephemeral).
const EPHEMERAL_QUEUE: usize = 256;

/// Most (sender, session) pairs remembered for deduplicating ephemeral
/// messages; past it the memory starts over.
const MAX_SESSIONS: usize = 10_000;

/// What every connection of one node shares.
pub struct Hub {
    docs: Docs,
    cfg: AutomergeConfig,
    /// This node's peer id, its `senderId` and `storageId`.
    me: String,
    stop: CancellationToken,
    next: AtomicU64,
    /// Connections by the client's sender id: a new `join` closes the old.
    senders: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Who follows each doc here, for ephemeral messages.
    followers: Mutex<HashMap<DocId, HashMap<u64, Follower>>>,
    /// The last count seen per (sender, session).
    sessions: Mutex<HashMap<(String, String), u64>>,
    /// Connections open now.
    open: AtomicU64,
}

#[derive(Clone)]
struct Follower {
    sender_id: String,
    tx: mpsc::Sender<Vec<u8>>,
}

impl Hub {
    /// A hub for the node whose documents are `docs` and whose peer id is
    /// `me`; its connections close when `stop` is cancelled.
    pub fn new(docs: Docs, cfg: AutomergeConfig, me: String, stop: CancellationToken) -> Hub {
        Hub {
            docs,
            cfg,
            me,
            stop,
            next: AtomicU64::new(1),
            senders: Mutex::default(),
            followers: Mutex::default(),
            sessions: Mutex::default(),
            open: AtomicU64::new(0),
        }
    }

    /// Client connections open now.
    pub fn connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Serves one upgraded connection until it closes.
    pub async fn serve(self: Arc<Self>, mut ws: WebSocket, access: Access) {
        self.open.fetch_add(1, Ordering::Relaxed);
        let conn_no = self.next.fetch_add(1, Ordering::Relaxed);
        match self.handshake(&mut ws).await {
            Ok(client) => {
                let replaced = CancellationToken::new();
                let old = self
                    .senders
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(client.clone(), (conn_no, replaced.clone()));
                if let Some((_, old)) = old {
                    old.cancel();
                }
                let mut c = Connection {
                    hub: &self,
                    no: conn_no,
                    client: client.clone(),
                    followed: HashSet::new(),
                    access,
                };
                let end = c.run(&mut ws, &replaced).await;
                c.forget();
                {
                    let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
                    if senders.get(&client).is_some_and(|(n, _)| *n == conn_no) {
                        senders.remove(&client);
                    }
                }
                close(&mut ws, end).await;
            }
            Err(end) => close(&mut ws, end).await,
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Waits for `join` and answers `peer`; the client's sender id.
    async fn handshake(&self, ws: &mut WebSocket) -> Result<String, End> {
        let first = tokio::select! {
            m = tokio::time::timeout(HANDSHAKE, ws.recv()) => m,
            () = self.stop.cancelled() => return Err(End::Stopping),
        };
        let bytes = match first {
            Err(_) => return Err(End::error("no join message within 10 s")),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return Err(End::Gone),
            Ok(Some(Ok(Message::Binary(b)))) => b,
            Ok(Some(Ok(_))) => {
                return Err(End::error(
                    "expected a binary join message (CBOR, automerge-repo protocol 1)",
                ));
            }
        };
        let msg = wire::decode(&bytes, self.cfg.max_message_bytes)
            .map_err(|e| End::error(&e.to_string()))?;
        let WireMessage::Join {
            sender_id,
            supported_protocol_versions,
            ..
        } = msg
        else {
            return Err(End::error("the first message must be join"));
        };
        if !supported_protocol_versions
            .iter()
            .any(|v| v == PROTOCOL_VERSION)
        {
            return Err(End::error(&format!(
                "this node speaks automerge-repo protocol version {PROTOCOL_VERSION}; the client offered {supported_protocol_versions:?}"
            )));
        }
        let peer = WireMessage::Peer {
            sender_id: self.me.clone(),
            target_id: sender_id.clone(),
            selected_protocol_version: PROTOCOL_VERSION.into(),
            metadata: PeerMetadata {
                storage_id: Some(self.me.clone()),
                is_ephemeral: false,
            },
        };
        ws.send(Message::Binary(wire::encode(&peer).into()))
            .await
            .map_err(|_| End::Gone)?;
        Ok(sender_id)
    }

    /// Relays an ephemeral message to the doc's other clients, once per
    /// (sender, session, count).
    fn relay(&self, from_conn: u64, doc: &DocId, msg: WireMessage) {
        let WireMessage::Ephemeral {
            sender_id,
            document_id,
            session_id,
            count,
            data,
            ..
        } = msg
        else {
            return;
        };
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if sessions.len() >= MAX_SESSIONS {
                sessions.clear();
            }
            let last = sessions
                .entry((sender_id.clone(), session_id.clone()))
                .or_insert(0);
            if count <= *last && *last != 0 {
                return;
            }
            *last = count;
        }
        let targets: Vec<Follower> = self
            .followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(doc)
            .map(|f| {
                f.iter()
                    .filter(|(n, _)| **n != from_conn)
                    .map(|(_, f)| f.clone())
                    .collect()
            })
            .unwrap_or_default();
        for t in targets {
            let out = WireMessage::Ephemeral {
                sender_id: sender_id.clone(),
                target_id: t.sender_id.clone(),
                document_id: document_id.clone(),
                session_id: session_id.clone(),
                count,
                data: data.clone(),
            };
            let _ = t.tx.try_send(wire::encode(&out));
        }
    }
}

/// The doc a document id names: the named doc whose URL it is, else the
/// doc `am/<id>` (one an automerge-repo client created).
pub(super) fn doc_for(docs: &Docs, document_id: &str) -> Result<DocId, String> {
    let bytes = decode_id(document_id).map_err(|e| e.to_string())?;
    if let Some(doc) = docs.doc_for_url(&bytes) {
        return Ok(doc);
    }
    DocId::new(client_doc_name(document_id).as_str()).map_err(|e| e.to_string())
}

/// The protocol message, from peer `me` to peer `to`, that carries what the
/// runtime sends the other side.
pub(super) fn encode_out(me: &str, to: &str, out: ClientOut) -> Vec<u8> {
    let msg = match out {
        ClientOut::Sync { doc, data } => WireMessage::Sync {
            request: false,
            sender_id: me.to_string(),
            target_id: to.to_string(),
            document_id: id_of(doc.as_str()),
            data,
        },
        ClientOut::Unavailable { doc } => WireMessage::DocUnavailable {
            sender_id: me.to_string(),
            target_id: to.to_string(),
            document_id: id_of(doc.as_str()),
        },
    };
    wire::encode(&msg)
}

/// How a connection ends.
enum End {
    /// The client went away (or the socket failed): nothing to say.
    Gone,
    /// The node is stopping.
    Stopping,
    /// Tell the client why, with `error`, then close.
    Error(String),
}

impl End {
    fn error(why: &str) -> End {
        End::Error(why.to_string())
    }
}

async fn close(ws: &mut WebSocket, end: End) {
    let (code, reason) = match end {
        End::Gone => return,
        End::Stopping => (1001, "the node is stopping".to_string()),
        End::Error(why) => {
            let msg = WireMessage::Error {
                message: why.clone(),
            };
            let _ = ws.send(Message::Binary(wire::encode(&msg).into())).await;
            (1008, why)
        }
    };
    // A close reason is at most 123 bytes.
    let mut reason = reason;
    while reason.len() > 120 {
        reason.pop();
    }
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = ws.send(Message::Close(Some(frame))).await;
}

/// One joined connection.
struct Connection<'h> {
    hub: &'h Hub,
    no: u64,
    /// The client's sender id.
    client: String,
    /// Docs it follows (for ephemeral messages).
    followed: HashSet<DocId>,
    /// What its token may read and write.
    access: Access,
}

impl Connection<'_> {
    async fn run(&mut self, ws: &mut WebSocket, replaced: &CancellationToken) -> End {
        let hub = self.hub;
        let origin = format!("automerge:{}", self.client);
        let mut conn = match hub
            .docs
            .inbox()
            .open_client(origin, hub.cfg.queue, hub.cfg.max_docs_per_connection)
            .await
        {
            Ok(c) => c,
            Err(_) => return End::Stopping,
        };
        let (eph_tx, mut eph_rx) = mpsc::channel::<Vec<u8>>(EPHEMERAL_QUEUE);
        let ping_every = Duration::from_millis(hub.cfg.ping_ms);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let mut heard = Instant::now();
        let shared = conn.shared();
        loop {
            tokio::select! {
                () = hub.stop.cancelled() => return End::Stopping,
                () = replaced.cancelled() => {
                    return End::error("replaced by a newer connection with the same senderId");
                }
                why = shared.wait_closed() => return End::Error(why),
                m = ws.recv() => {
                    heard = Instant::now();
                    match m {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return End::Gone,
                        Some(Ok(Message::Binary(b))) => {
                            if let Err(end) = self.received(&b, &conn, &eph_tx).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Text(_))) => {
                            return End::error("text messages are not part of the protocol; send binary CBOR");
                        }
                    }
                }
                out = conn.recv() => {
                    let Some(out) = out else { return End::Stopping };
                    let msg = encode_out(&hub.me, &self.client, out);
                    if ws.send(Message::Binary(msg.into())).await.is_err() {
                        return End::Gone;
                    }
                }
                Some(bytes) = eph_rx.recv() => {
                    if ws.send(Message::Binary(bytes.into())).await.is_err() {
                        return End::Gone;
                    }
                }
                _ = ping.tick() => {
                    if heard.elapsed() > 2 * ping_every {
                        return End::error("no message or pong for two ping intervals");
                    }
                    if ws.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return End::Gone;
                    }
                }
            }
        }
    }

    /// One message from the client.
    async fn received(
        &mut self,
        bytes: &[u8],
        conn: &ClientConn,
        eph_tx: &mpsc::Sender<Vec<u8>>,
    ) -> Result<(), End> {
        let hub = self.hub;
        let msg = wire::decode(bytes, hub.cfg.max_message_bytes)
            .map_err(|e| End::error(&e.to_string()))?;
        let (sender, target, document_id) = match &msg {
            WireMessage::Sync {
                sender_id,
                target_id,
                document_id,
                ..
            }
            | WireMessage::Ephemeral {
                sender_id,
                target_id,
                document_id,
                ..
            } => (sender_id, target_id, document_id),
            WireMessage::Error { message } => {
                tracing::debug!(client = %self.client, message, "automerge client reported an error");
                return Err(End::Gone);
            }
            // A repeated join, doc-unavailable (the client lacks a doc it
            // asked for), heads and subscription messages: nothing to do.
            _ => return Ok(()),
        };
        if *sender != self.client || *target != hub.me {
            tracing::debug!(client = %self.client, sender, target, "automerge message for another peer dropped");
            return Ok(());
        }
        let doc = doc_for(&hub.docs, document_id)
            .map_err(|e| End::error(&format!("bad documentId: {e}")))?;
        if !self.access.can_read(doc.as_str()) {
            // The same answer as for a doc the node does not have.
            let out = encode_out(&hub.me, &self.client, ClientOut::Unavailable { doc });
            let _ = eph_tx.try_send(out);
            return Ok(());
        }
        if let WireMessage::Sync { data, .. } = &msg
            && !self.access.can_write(doc.as_str())
            && carries_changes(data)
        {
            return Err(End::error(&format!(
                "token {:?} may read but not write doc {}",
                self.access.name().unwrap_or_default(),
                id_of(doc.as_str())
            )));
        }
        self.follow(&doc, eph_tx);
        match msg {
            WireMessage::Sync { request, data, .. } => conn
                .sync(doc, data, request)
                .await
                .map_err(|_| End::Stopping),
            eph @ WireMessage::Ephemeral { .. } => {
                hub.relay(self.no, &doc, eph);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn follow(&mut self, doc: &DocId, eph_tx: &mpsc::Sender<Vec<u8>>) {
        if self.followed.contains(doc) {
            return;
        }
        self.followed.insert(doc.clone());
        self.hub
            .followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(doc.clone())
            .or_default()
            .insert(
                self.no,
                Follower {
                    sender_id: self.client.clone(),
                    tx: eph_tx.clone(),
                },
            );
    }

    /// Leaves the ephemeral relay.
    fn forget(&mut self) {
        let mut followers = self.hub.followers.lock().unwrap_or_else(|p| p.into_inner());
        for doc in self.followed.drain() {
            if let Some(f) = followers.get_mut(&doc) {
                f.remove(&self.no);
                if f.is_empty() {
                    followers.remove(&doc);
                }
            }
        }
    }
}

/// True if a sync message carries changes (or does not decode: the
/// document service reports that itself).
fn carries_changes(data: &[u8]) -> bool {
    automerge::sync::Message::decode(data).map_or(true, |m| !m.changes.is_empty())
}
