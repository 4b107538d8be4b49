//! Dialing automerge-repo sync servers (`[[automerge.servers]]`): the node
//! joins a server as a client of the same protocol the endpoint serves and
//! keeps the docs its glob matches synced with it, so a mergeflow mesh can
//! join an existing Automerge deployment.
//!
//! One task per server. It connects, sends `join`, waits for `peer`, then
//! announces every live doc the glob matches (servers do not announce, so
//! the node offers what it shares) and each matching doc that appears
//! later (from the change feed). From then on the connection is a client
//! connection of the runtime like one the endpoint accepted: the writer
//! holds one sync state per doc, merges what the server sends in its rounds
//! (group commit before the answer), and sends the server the changes made
//! anywhere else. A doc the server offers outside the glob is answered
//! `doc-unavailable`. When the link fails (refused, closed, silent for two
//! pings) the task waits, doubling from half a second up to 30 s, and
//! dials again with fresh sync states; the sync protocol then sends only
//! what either side lacks.
//!
//! Docs a server's other clients create are not learned here: a server
//! does not announce, and the node cannot ask for a doc it has no name for.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::server::{HANDSHAKE, doc_for, encode_out};
use super::wire::{self, PROTOCOL_VERSION, PeerMetadata, WireMessage};
use crate::config::{AutomergeConfig, AutomergeServer};
use crate::doc::{DocId, SYSTEM_PREFIX};
use crate::feed::{DocGlob, Feed, FeedItem};
use crate::runtime::{ClientConn, Docs};
use crate::status::{ServerLinkStatus, ServerLinks};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// First wait before dialing again; doubles per failure.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest wait before dialing again.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// A link up this long starts the next failure's wait from the first again.
const STABLE: Duration = Duration::from_secs(30);

/// Starts one link per configured server; they stop with `stop`.
pub fn spawn(
    docs: &Docs,
    feed: &Arc<Feed>,
    cfg: &AutomergeConfig,
    me: &str,
    links: &ServerLinks,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) {
    *links.lock().unwrap_or_else(|p| p.into_inner()) = cfg
        .servers
        .iter()
        .map(|s| ServerLinkStatus {
            url: s.url.split('?').next().unwrap_or_default().to_string(),
            docs: s.docs.clone(),
            ..ServerLinkStatus::default()
        })
        .collect();
    for (index, server) in cfg.servers.iter().enumerate() {
        let Ok(glob) = DocGlob::new(&server.docs) else {
            continue; // validated with the config
        };
        let link = Link {
            server: server.clone(),
            glob,
            docs: docs.clone(),
            feed: feed.clone(),
            me: me.to_string(),
            max_message_bytes: cfg.max_message_bytes,
            queue: cfg.queue,
            ping: Duration::from_millis(cfg.ping_ms),
            stop: stop.clone(),
            links: links.clone(),
            index,
        };
        tasks.spawn(link.run());
    }
}

/// One configured server and what its link needs.
struct Link {
    server: AutomergeServer,
    glob: DocGlob,
    docs: Docs,
    feed: Arc<Feed>,
    /// This node's peer id: its `senderId` and `storageId`.
    me: String,
    max_message_bytes: usize,
    queue: usize,
    ping: Duration,
    stop: CancellationToken,
    /// Where its status is shown, at `index`.
    links: ServerLinks,
    index: usize,
}

impl Link {
    /// Updates this link's status.
    fn show(&self, f: impl FnOnce(&mut ServerLinkStatus)) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = links.get_mut(self.index) {
            f(s);
        }
    }

    /// Dials, serves the link while it lasts, and dials again, until the
    /// node stops.
    async fn run(self) {
        let url = self.server.url.clone();
        let mut wait = FIRST_RETRY;
        loop {
            let started = Instant::now();
            let result = self.session().await;
            self.show(|s| {
                s.connected = false;
                s.shared_docs = 0;
                if let Err(why) = &result {
                    s.last_error = Some(why.clone());
                }
            });
            match result {
                Ok(()) => return,
                Err(why) => {
                    if started.elapsed() > STABLE {
                        wait = FIRST_RETRY;
                    }
                    tracing::warn!(server = %url, error = %why, retry_in_ms = wait.as_millis() as u64,
                        "automerge sync server link down");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.cancelled() => return,
            }
            wait = (wait * 2).min(MAX_RETRY);
        }
    }

    /// One connection, from dial to its end: `Ok` when the node stops,
    /// else why it ended.
    async fn session(&self) -> Result<(), String> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes));
        let dial =
            tokio_tungstenite::connect_async_with_config(&self.server.url, Some(config), true);
        let mut ws = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE, dial) => match r {
                Err(_) => return Err("no answer to the WebSocket upgrade within 10 s".into()),
                Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
                Ok(Ok((ws, _))) => ws,
            },
            () = self.stop.cancelled() => return Ok(()),
        };
        let remote = tokio::select! {
            r = self.handshake(&mut ws) => r?,
            () = self.stop.cancelled() => return Ok(()),
        };
        tracing::info!(server = %self.server.url, peer = %remote, docs = %self.server.docs,
            "joined automerge sync server");
        self.show(|s| {
            s.connected = true;
            s.peer = Some(remote.clone());
            s.joins += 1;
        });
        let origin = format!("automerge:{remote}");
        let conn = self
            .docs
            .inbox()
            .open_client(origin, self.queue, usize::MAX)
            .await
            .map_err(|e| e.to_string())?;
        let result = self.serve(&mut ws, conn, &remote).await;
        let frame = match &result {
            Ok(()) => Some((1001, "the node is stopping")),
            Err(_) => Some((1000, "reconnecting")),
        };
        if let Some((code, reason)) = frame {
            let _ = ws
                .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: code.into(),
                    reason: reason.into(),
                }))
                .await;
        }
        result
    }

    /// Sends `join`; the server's peer id from its `peer`.
    async fn handshake(&self, ws: &mut Ws) -> Result<String, String> {
        let join = WireMessage::Join {
            sender_id: self.me.clone(),
            supported_protocol_versions: vec![PROTOCOL_VERSION.into()],
            metadata: PeerMetadata {
                storage_id: Some(self.me.clone()),
                is_ephemeral: false,
            },
        };
        ws.send(Message::Binary(wire::encode(&join).into()))
            .await
            .map_err(|e| format!("cannot send join: {e}"))?;
        let deadline = tokio::time::Instant::now() + HANDSHAKE;
        loop {
            let m = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| "no peer message within 10 s of join".to_string())?;
            let bytes = match m {
                None | Some(Ok(Message::Close(_))) => {
                    return Err("the server closed the connection after join".into());
                }
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(_)) => continue,
            };
            match wire::decode(&bytes, self.max_message_bytes).map_err(|e| e.to_string())? {
                WireMessage::Peer {
                    sender_id,
                    selected_protocol_version,
                    ..
                } if selected_protocol_version == PROTOCOL_VERSION => return Ok(sender_id),
                WireMessage::Peer {
                    selected_protocol_version,
                    ..
                } => {
                    return Err(format!(
                        "the server chose protocol version {selected_protocol_version:?}; this node speaks {PROTOCOL_VERSION}"
                    ));
                }
                WireMessage::Error { message } => {
                    return Err(format!("the server said: {message}"));
                }
                other => return Err(format!("expected peer, got {}", other.kind())),
            }
        }
    }

    /// Shares the matching docs over a joined connection until it ends.
    async fn serve(&self, ws: &mut Ws, mut conn: ClientConn, remote: &str) -> Result<(), String> {
        // Subscribe before listing, so a doc created in between is seen.
        let mut changes = Box::pin(self.feed.subscribe_quiet(self.glob.clone()));
        let mut shared_docs: HashSet<DocId> = HashSet::new();
        self.announce_all(&conn, &mut shared_docs).await?;
        let closed = conn.shared();
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + self.ping, self.ping);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                why = closed.wait_closed() => return Err(why),
                m = ws.next() => {
                    heard = Instant::now();
                    match m {
                        None | Some(Ok(Message::Close(_))) => return Err("the server closed the connection".into()),
                        Some(Err(e)) => return Err(e.to_string()),
                        Some(Ok(Message::Binary(b))) => {
                            if let Some(answer) = self.received(&b, &conn, &mut shared_docs).await? {
                                ws.send(Message::Binary(answer.into())).await.map_err(|e| e.to_string())?;
                            }
                        }
                        Some(Ok(_)) => {}
                    }
                }
                out = conn.recv() => {
                    let Some(out) = out else { return Ok(()) };
                    let bytes = encode_out(&self.me, remote, out);
                    ws.send(Message::Binary(bytes.into())).await.map_err(|e| e.to_string())?;
                }
                item = changes.next() => match item {
                    Some(FeedItem::Change(e)) => {
                        if !e.deleted {
                            self.announce(&conn, &mut shared_docs, &e.doc).await?;
                        }
                    }
                    // Fell behind the feed: list again (announcing twice is a no-op).
                    Some(FeedItem::Missed { .. }) => self.announce_all(&conn, &mut shared_docs).await?,
                    None => return Ok(()),
                },
                _ = ping.tick() => {
                    if heard.elapsed() > 2 * self.ping {
                        return Err("no message or pong from the server for two ping intervals".into());
                    }
                    ws.send(Message::Ping(Vec::new().into())).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }

    /// Announces every live doc the glob matches.
    async fn announce_all(
        &self,
        conn: &ClientConn,
        shared: &mut HashSet<DocId>,
    ) -> Result<(), String> {
        let docs = self.docs.clone();
        let ids = tokio::task::spawn_blocking(move || docs.ids())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot list docs: {e}"))?;
        for (id, deleted) in ids {
            if !deleted && self.glob.matches(&id) {
                self.announce(conn, shared, &id).await?;
            }
        }
        Ok(())
    }

    /// Starts syncing doc `id` with the server, once.
    async fn announce(
        &self,
        conn: &ClientConn,
        shared: &mut HashSet<DocId>,
        id: &str,
    ) -> Result<(), String> {
        if id.starts_with(SYSTEM_PREFIX) {
            return Ok(());
        }
        let Ok(doc) = DocId::new(id) else {
            return Ok(());
        };
        if shared.insert(doc.clone()) {
            conn.announce(doc).await.map_err(|e| e.to_string())?;
            let n = shared.len();
            self.show(|s| s.shared_docs = n);
        }
        Ok(())
    }

    /// One message from the server: hands a sync message for a shared doc
    /// to the runtime. Returns an answer to send at once, if any
    /// (`doc-unavailable` for a doc outside the glob).
    async fn received(
        &self,
        bytes: &[u8],
        conn: &ClientConn,
        shared: &mut HashSet<DocId>,
    ) -> Result<Option<Vec<u8>>, String> {
        let msg = wire::decode(bytes, self.max_message_bytes)
            .map_err(|e| format!("bad message from the server: {e}"))?;
        match msg {
            WireMessage::Sync {
                request,
                sender_id,
                target_id,
                document_id,
                data,
            } => {
                if target_id != self.me {
                    return Ok(None);
                }
                let doc = match doc_for(&self.docs, &document_id) {
                    Ok(doc)
                        if self.glob.matches(doc.as_str())
                            && !doc.as_str().starts_with(SYSTEM_PREFIX) =>
                    {
                        doc
                    }
                    _ => {
                        let answer = WireMessage::DocUnavailable {
                            sender_id: self.me.clone(),
                            target_id: sender_id,
                            document_id,
                        };
                        return Ok(Some(wire::encode(&answer)));
                    }
                };
                if shared.insert(doc.clone()) {
                    let n = shared.len();
                    self.show(|s| s.shared_docs = n);
                }
                conn.sync(doc, data, request)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(None)
            }
            WireMessage::Error { message } => Err(format!("the server said: {message}")),
            // doc-unavailable (the server lacks a doc it was asked about;
            // the node's next change offers it again), ephemeral and heads
            // messages: nothing to do.
            _ => Ok(None),
        }
    }
}
