//! automerge-repo clients (browsers, JS apps, samod) on the writer thread:
//! one Automerge sync state per (connection, doc), the docs each connection
//! follows, and what each round sends them.
//!
//! A client's sync message is merged in the writer's round like a peer's
//! (same batch, same group commit), and its changes go on to the mesh
//! through the sync core as a local change would. The answer that moves the
//! client's view of the shared heads is sent only after the round's flush,
//! so a client never believes the node holds a change it could lose. When
//! a doc a client follows changes any other way (a local write, a peer, a
//! second client), the round generates that client's next sync message as
//! soon as the store has the change (before the flush, as changes go to
//! peers).
//!
//! Docs are never announced: a connection follows the docs it asked about.
//! Connection handles are in [`super::inbox`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use automerge::sync;
use tokio::sync::mpsc;

use super::round::{Round, Touch};
use crate::doc::DocId;
use crate::sync::{DocAccess, DocState, Input, Refusal};

/// A client connection's number, unique within the process.
pub type ConnId = u64;

/// More changes than this from one client message go to peers by sync
/// sessions rather than one by one on the fast path.
const MAX_FAST_CHANGES: usize = 64;

/// What a client connection asks of the writer.
pub(super) enum ClientMsg {
    /// A connection opened.
    Open {
        conn: ConnId,
        /// The origin its changes carry in the feed and in workflow runs.
        origin: String,
        out: mpsc::Sender<ClientOut>,
        shared: Arc<ConnShared>,
        /// Most docs it may follow.
        max_docs: usize,
    },
    /// A sync message for `doc` (`request`: the client has no copy).
    Sync {
        conn: ConnId,
        doc: DocId,
        data: Vec<u8>,
        request: bool,
    },
    /// Start syncing `doc` with the other side, unasked (the node dials a
    /// sync server and offers it the docs it shares).
    Announce { conn: ConnId, doc: DocId },
    /// The connection closed.
    Close { conn: ConnId },
}

/// What the writer sends a client connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOut {
    /// An Automerge sync message for the doc.
    Sync {
        /// The doc.
        doc: DocId,
        /// The encoded `automerge::sync::Message`.
        data: Vec<u8>,
    },
    /// This node does not have the doc (or the client may not see it: the
    /// same answer, so a refusal reveals nothing).
    Unavailable {
        /// The doc.
        doc: DocId,
    },
}

/// What the writer and a connection's task share.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Why the writer gave up on the connection (its queue was full, the
    /// client sent bad input, a flush failed); the task closes it.
    closed: std::sync::Mutex<Option<String>>,
    is_closed: AtomicBool,
    wake: tokio::sync::Notify,
}

impl ConnShared {
    /// Marks the connection for closing with `reason` (the first reason wins).
    pub(super) fn close(&self, reason: &str) {
        let mut r = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason.to_string());
        }
        self.is_closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Waits until the writer gives up on the connection; why it did.
    pub async fn wait_closed(&self) -> String {
        loop {
            if let Some(why) = self.closed() {
                return why;
            }
            self.wake.notified().await;
        }
    }

    /// Why the writer gave up on the connection, if it did.
    pub fn closed(&self) -> Option<String> {
        if !self.is_closed.load(Ordering::Acquire) {
            return None;
        }
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct Conn {
    origin: String,
    out: mpsc::Sender<ClientOut>,
    shared: Arc<ConnShared>,
    max_docs: usize,
    docs: HashMap<DocId, sync::State>,
}

/// Every client connection the writer knows.
#[derive(Default)]
pub(super) struct Clients {
    conns: HashMap<ConnId, Conn>,
    /// Which connections follow each doc.
    followers: HashMap<DocId, HashSet<ConnId>>,
}

/// What a round owes clients, gathered while it handles their input.
#[derive(Default)]
pub(super) struct ClientRound {
    /// (connection, doc) pairs that sent input and get an answer.
    answer: Vec<(ConnId, DocId)>,
    /// Pairs answered `doc-unavailable`.
    unavailable: Vec<(ConnId, DocId)>,
    /// A client's changes were merged: this round's messages to clients
    /// wait for its flush.
    pub(super) wrote: bool,
}

/// Messages a round sends to clients, once it may.
#[derive(Default)]
pub(super) struct Outgoing(Vec<(mpsc::Sender<ClientOut>, Arc<ConnShared>, ClientOut)>);

impl Outgoing {
    /// Takes out the sync messages about docs in `unflushed`: they may
    /// carry keyed changes not durable yet, and go after the round's flush.
    pub(super) fn held_back(&mut self, unflushed: &super::unflushed::Unflushed) -> Outgoing {
        let (held, now) = std::mem::take(&mut self.0).into_iter().partition(|(_, _, m)| {
            matches!(m, ClientOut::Sync { doc, .. } if unflushed.contains(doc.as_str()))
        });
        self.0 = now;
        Outgoing(held)
    }

    /// Sends them. A connection whose queue is full is closed: a lost sync
    /// message would leave its session waiting forever.
    pub(super) fn send(self) {
        for (out, shared, msg) in self.0 {
            if out.try_send(msg).is_err() {
                shared.close("the node's queue to this client is full (a slow client)");
            }
        }
    }

    /// The round's flush failed: the messages are not sent, and their
    /// connections close (their sessions assumed the round's changes).
    pub(super) fn fail(self) {
        for (_, shared, _) in self.0 {
            shared.close("this node failed to store changes; reconnect");
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Clients {
    pub(super) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    fn remove(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            for doc in c.docs.keys() {
                if let Some(f) = self.followers.get_mut(doc) {
                    f.remove(&conn);
                    if f.is_empty() {
                        self.followers.remove(doc);
                    }
                }
            }
        }
    }

    /// Forgets connections whose task is gone or that were closed.
    fn sweep(&mut self) {
        let gone: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.out.is_closed() || c.shared.closed().is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    /// Handles a round's client messages: merges their changes into the
    /// round and queues, in `to_core`, what the sync core must send peers
    /// once the store has them.
    pub(super) fn handle(
        &mut self,
        msgs: Vec<ClientMsg>,
        round: &mut Round<'_>,
        work: &mut ClientRound,
        to_core: &mut Vec<Input>,
    ) {
        self.sweep();
        for msg in msgs {
            match msg {
                ClientMsg::Open {
                    conn,
                    origin,
                    out,
                    shared,
                    max_docs,
                } => {
                    let c = Conn {
                        origin,
                        out,
                        shared,
                        max_docs,
                        docs: HashMap::new(),
                    };
                    self.conns.insert(conn, c);
                }
                ClientMsg::Close { conn } => self.remove(conn),
                ClientMsg::Announce { conn, doc } => {
                    if self.follow(conn, &doc) {
                        work.answer.push((conn, doc));
                    }
                }
                ClientMsg::Sync {
                    conn,
                    doc,
                    data,
                    request,
                } => self.receive(conn, doc, &data, request, round, work, to_core),
            }
        }
    }

    /// Connection `conn` follows `doc` from now on (if it did not). False
    /// if the connection is gone, or closed for following more docs than
    /// it may.
    fn follow(&mut self, conn: ConnId, doc: &DocId) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        if !c.docs.contains_key(doc) {
            if c.docs.len() >= c.max_docs {
                c.shared.close(&format!(
                    "this connection follows {} docs, the most automerge.max_docs_per_connection allows",
                    c.max_docs
                ));
                return false;
            }
            c.docs.insert(doc.clone(), sync::State::new());
            self.followers.entry(doc.clone()).or_default().insert(conn);
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn receive(
        &mut self,
        conn: ConnId,
        doc: DocId,
        data: &[u8],
        request: bool,
        round: &mut Round<'_>,
        work: &mut ClientRound,
        to_core: &mut Vec<Input>,
    ) {
        if !self.follow(conn, &doc) {
            return; // closed meanwhile, or past its limit
        }
        let c = self.conns.get_mut(&conn).expect("follow found it");
        let state = c.docs.get_mut(&doc).expect("follow added it");
        round.from = Some(c.origin.clone());
        let received = round.receive_client_sync(&doc, state, data);
        round.from = None;
        match received {
            Err(Refusal::Invalid(e)) => {
                c.shared
                    .close(&format!("doc {:?}: {e}", crate::id::preview(doc.as_str())));
            }
            // Not the client's fault; its session is retried on its next
            // message.
            Err(Refusal::Local(e)) => {
                tracing::debug!(doc = doc.as_str(), err = %e, "client input not taken");
                c.docs.insert(doc, sync::State::new());
            }
            Ok((None | Some(DocState::Deleted), _)) if request => {
                work.unavailable.push((conn, doc));
            }
            Ok((Some(DocState::Deleted), _)) => work.unavailable.push((conn, doc)),
            Ok((None, _)) => work.answer.push((conn, doc)),
            Ok((Some(state), added)) => {
                if !added.is_empty() {
                    work.wrote = true;
                    let input = if added.len() <= MAX_FAST_CHANGES {
                        Input::LocalChange {
                            doc: doc.to_string(),
                            sigs: round.sigs.sigs_for(round.inner, doc.as_str(), &added),
                            changes: added,
                            state,
                            ack: false,
                        }
                    } else {
                        Input::LocalMerge {
                            doc: doc.to_string(),
                            state,
                        }
                    };
                    to_core.push(input);
                }
                work.answer.push((conn, doc));
            }
        }
    }

    /// The round's messages to clients, once the store has its batch: the
    /// answers to their input, and the next sync message of every
    /// connection following a doc the round changed.
    pub(super) fn outgoing(&mut self, round: &mut Round<'_>, work: ClientRound) -> Outgoing {
        let mut out = Outgoing::default();
        let unavailable: HashSet<(ConnId, DocId)> = work.unavailable.into_iter().collect();
        let mut pairs: Vec<(ConnId, DocId)> = Vec::new();
        let mut seen: HashSet<(ConnId, DocId)> = HashSet::new();
        for pair in work.answer {
            if seen.insert(pair.clone()) {
                pairs.push(pair);
            }
        }
        let changed: Vec<DocId> = round
            .events
            .iter()
            .filter(|e| matches!(e.touch, Touch::Changed(..)))
            .map(|e| e.doc.clone())
            .collect();
        for doc in changed {
            for conn in self.followers.get(&doc).into_iter().flatten() {
                let pair = (*conn, doc.clone());
                if !unavailable.contains(&pair) && seen.insert(pair.clone()) {
                    pairs.push(pair);
                }
            }
        }
        for (conn, doc) in unavailable {
            if let Some(c) = self.conns.get(&conn) {
                out.0.push((
                    c.out.clone(),
                    c.shared.clone(),
                    ClientOut::Unavailable { doc },
                ));
            }
        }
        for (conn, doc) in pairs {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            let Some(state) = c.docs.get_mut(&doc) else {
                continue;
            };
            // A client gets Automerge sync messages only: signatures are
            // between nodes.
            if let Some((data, _)) = round.generate_sync(doc.as_str(), state) {
                out.0.push((
                    c.out.clone(),
                    c.shared.clone(),
                    ClientOut::Sync { doc, data },
                ));
            }
        }
        out
    }

    /// The round's store write failed: connections that sent input in it
    /// are closed (their sessions may have counted on changes now lost).
    pub(super) fn failed(&mut self, work: ClientRound) {
        for (conn, _) in work.answer.iter().chain(&work.unavailable) {
            if let Some(c) = self.conns.get(conn) {
                c.shared
                    .close("this node failed to store changes; reconnect");
            }
        }
    }
}
