//! The runtime's one way in for peers, whatever carries their bytes: a
//! connection id (a libp2p peer id as a string) and a sync [`Input`],
//! queued for the writer thread on a bounded channel, for mergeflow peers;
//! a [`ClientConn`] for automerge-repo clients (the WebSocket endpoint),
//! whose messages wait for room and whose answers come back on the
//! connection's own channel. Replica confirmations skip the queue.

use std::sync::Arc;

use automerge::ChangeHash;
use tokio::sync::mpsc;

use super::clients::{ClientMsg, ClientOut, ConnId, ConnShared};
use super::host::confirm;
use super::state::Inner;
use super::writer::WriterMsg;
use crate::doc::DocId;
use crate::sync::Input;

/// A handle on the runtime's sync inbox. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    pub(super) inner: Arc<Inner>,
    pub(super) writer: mpsc::Sender<WriterMsg>,
}

impl Inbox {
    /// Hands input to the sync core. Remote input must not wait behind a full
    /// queue (it would stall the transport's loop), so it is dropped instead,
    /// and anti-entropy repairs what that loses. Returns `false` if it was
    /// dropped (queue full or node stopping).
    pub fn send(&self, input: Input) -> bool {
        self.send_all(vec![input])
    }

    /// Queues several inputs for the sync core as one writer message (so a
    /// frame of many messages takes one queue slot); false if the queue is full.
    pub fn send_all(&self, inputs: Vec<Input>) -> bool {
        self.writer.try_send(WriterMsg::Sync(inputs)).is_ok()
    }

    /// Records a peer's [`Message::Have`](crate::sync::Message::Have): it
    /// stores `doc` at `heads`. Called directly by the transport, so
    /// confirmations never queue behind writes.
    pub fn confirm_held(&self, peer: &str, doc: &str, heads: Vec<ChangeHash>) {
        confirm(&self.inner, peer, doc, heads);
    }
}

/// Where the next [`ClientConn`] number comes from.
static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The writer thread is gone (the node is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the node is stopping")]
pub struct Stopped;

impl Inbox {
    /// Opens an automerge-repo client connection: its sync messages are
    /// merged by the writer (see `runtime/clients.rs`), and what the writer
    /// sends it arrives on [`ClientConn::recv`], at most `queue` messages
    /// ahead of the reader (past that the connection is closed). Its
    /// changes carry `origin` in the feed and in workflow runs; it may
    /// follow at most `max_docs` docs.
    ///
    /// # Errors
    /// [`Stopped`] if the node is stopping.
    pub async fn open_client(
        &self,
        origin: String,
        queue: usize,
        max_docs: usize,
    ) -> Result<ClientConn, Stopped> {
        let id = NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (out, rx) = mpsc::channel(queue.max(1));
        let shared = Arc::new(ConnShared::default());
        let open = ClientMsg::Open {
            conn: id,
            origin,
            out,
            shared: shared.clone(),
            max_docs,
        };
        self.writer
            .send(WriterMsg::Client(open))
            .await
            .map_err(|_| Stopped)?;
        Ok(ClientConn {
            id,
            writer: self.writer.clone(),
            rx,
            shared,
        })
    }
}

/// One automerge-repo client connection, as its transport holds it. Closing
/// it (dropping it) tells the writer to forget its sync states.
pub struct ClientConn {
    id: ConnId,
    writer: mpsc::Sender<WriterMsg>,
    rx: mpsc::Receiver<ClientOut>,
    shared: Arc<ConnShared>,
}

impl ClientConn {
    /// Hands the client's sync message for `doc` to the writer, waiting
    /// for room in its queue (this connection waits; nobody else does).
    /// `request`: the client has no copy of the doc.
    ///
    /// # Errors
    /// [`Stopped`] if the node is stopping.
    pub async fn sync(&self, doc: DocId, data: Vec<u8>, request: bool) -> Result<(), Stopped> {
        let msg = ClientMsg::Sync {
            conn: self.id,
            doc,
            data,
            request,
        };
        self.writer
            .send(WriterMsg::Client(msg))
            .await
            .map_err(|_| Stopped)
    }

    /// Starts syncing `doc` with the other side without being asked: the
    /// writer sends the doc's first sync message (this side dialed a sync
    /// server and offers it the doc).
    ///
    /// # Errors
    /// [`Stopped`] if the node is stopping.
    pub async fn announce(&self, doc: DocId) -> Result<(), Stopped> {
        let msg = ClientMsg::Announce { conn: self.id, doc };
        self.writer
            .send(WriterMsg::Client(msg))
            .await
            .map_err(|_| Stopped)
    }

    /// The next message for the client; `None` once the node is stopping.
    pub async fn recv(&mut self) -> Option<ClientOut> {
        self.rx.recv().await
    }

    /// What tells the transport that the node gave up on this connection
    /// (and why): it closes it then.
    pub fn shared(&self) -> Arc<ConnShared> {
        self.shared.clone()
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        // If the queue is full, the writer finds the connection gone (its
        // channel closed) at its next client round instead.
        let _ = self
            .writer
            .try_send(WriterMsg::Client(ClientMsg::Close { conn: self.id }));
    }
}
