//! The runtime's one way in for peers, whatever carries their bytes: a
//! connection id (today a libp2p peer id as a string) and a sync
//! [`Input`], queued for the writer thread on a bounded channel. The
//! network shell uses it; the coming WebSocket endpoint will use it the same
//! way. Replica confirmations skip the queue.

use std::sync::Arc;

use automerge::ChangeHash;
use tokio::sync::mpsc;

use super::host::confirm;
use super::state::Inner;
use super::writer::WriterMsg;
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
