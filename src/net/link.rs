//! Long-lived streams for sync frames: one outbound stream per peer.
//!
//! Request-response opens a yamux substream for every frame, negotiates the
//! protocol on it and waits for an empty answer: about five socket writes per
//! message, and for a small fast-path change that was most of the network's
//! share of the CPU. Here each peer gets one stream, opened on the first
//! frame, that carries length-prefixed frames (the same framing and cap as
//! the request-response codec) until it fails or the peer disconnects.
//!
//! A frame the link cannot take (its queue is full, the peer does not speak
//! the protocol, the stream failed before the frame was written) goes back to
//! the swarm task, which sends it by request-response instead. A frame that
//! was written but lost with its connection is repaired like any lost
//! message: by sync and anti-entropy when the peer reconnects.
//!
//! Inbound frames go to the swarm task over a bounded channel, where they
//! pass the same rate limits, decoding and strikes as request-response frames.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};

use libp2p::futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::frames::{put_frame, read_frame};
use crate::metrics::Queues;

/// The protocol of the long-lived frame stream.
pub(super) const LINK_PROTOCOL: StreamProtocol = StreamProtocol::new("/mergeflow/frames/1");

/// Frames queued for one peer's stream; past it, frames go by request-response.
const LINK_QUEUE: usize = 256;

/// Inbound frame streams one peer may hold open at once; more are dropped.
const MAX_INBOUND_PER_PEER: usize = 4;

/// Frames read from all inbound streams, waiting for the swarm task.
const INBOUND_QUEUE: usize = 256;

/// A stream that cannot be opened in this long counts as unsupported.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A frame and the docs it is about (to repair them if it is lost).
pub(super) type Frame = (Vec<u8>, Vec<String>);

/// What the link tasks tell the swarm task.
pub(super) enum LinkEvent {
    /// A frame read from a peer's stream.
    Frame(PeerId, Vec<u8>),
    /// A peer sent a frame we refuse (over the size cap); its stream is closed.
    Refused(PeerId, String),
    /// Frames link `link` did not write; `opened` is false when the stream
    /// cannot be opened to this peer (it does not speak the protocol, or
    /// opening timed out): try no more until it reconnects.
    Unsent {
        peer: PeerId,
        link: u64,
        frames: Vec<Frame>,
        opened: bool,
    },
}

/// The outbound links, owned by the swarm task.
pub(super) struct Links {
    control: libp2p_stream::Control,
    /// Each peer's link: its number (so a report from an older link is not
    /// taken for the current one's) and its queue.
    out: HashMap<PeerId, (u64, mpsc::Sender<Frame>)>,
    next_link: u64,
    /// Peers whose stream could not be opened: request-response only, until
    /// they reconnect.
    no_link: HashSet<PeerId>,
    events: mpsc::Sender<LinkEvent>,
    /// Where each link's queue is made (its depth shows in the metrics).
    queues: Queues,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Links {
    /// Starts accepting inbound frame streams (at most `max` bytes a frame).
    ///
    /// # Errors
    /// The protocol is already registered on `control`'s behaviour.
    pub(super) fn start(
        mut control: libp2p_stream::Control,
        max: usize,
        queues: &Queues,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<(Links, mpsc::Receiver<LinkEvent>), String> {
        let incoming = control
            .accept(LINK_PROTOCOL)
            .map_err(|e| format!("cannot accept {LINK_PROTOCOL}: {e}"))?;
        let (events, rx) = queues.channel("net_link_in", INBOUND_QUEUE);
        let inbound = events.clone();
        tasks.spawn(accept_streams(
            incoming,
            MAX_INBOUND_PER_PEER,
            cancel.clone(),
            tasks.clone(),
            move |peer, stream| read_stream(peer, stream, max, inbound.clone()),
        ));
        let links = Links {
            control,
            out: HashMap::new(),
            next_link: 0,
            no_link: HashSet::new(),
            events,
            queues: queues.clone(),
            cancel,
            tasks,
        };
        Ok((links, rx))
    }

    /// Queues a frame on `peer`'s stream, opening one if there is none.
    /// Returns the frame if the link cannot take it; send it another way.
    pub(super) fn send(&mut self, peer: PeerId, frame: Frame) -> Option<Frame> {
        if self.no_link.contains(&peer) {
            return Some(frame);
        }
        let (_, tx) = self.out.entry(peer).or_insert_with(|| {
            let (tx, rx) = self.queues.channel("net_link_out", LINK_QUEUE);
            self.next_link += 1;
            self.tasks.spawn(write_stream(
                self.control.clone(),
                peer,
                self.next_link,
                rx,
                self.events.clone(),
                self.cancel.clone(),
            ));
            (self.next_link, tx)
        });
        match tx.try_send(frame) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(frame)) => Some(frame),
            Err(mpsc::error::TrySendError::Closed(frame)) => {
                self.out.remove(&peer);
                Some(frame)
            }
        }
    }

    /// Link `link` to `peer` failed; with `opened` false, stop trying until
    /// the peer reconnects. A report from a link that is no longer the
    /// peer's (it reconnected since) changes nothing.
    pub(super) fn failed(&mut self, peer: PeerId, link: u64, opened: bool) {
        if self.out.get(&peer).is_some_and(|(id, _)| *id == link) {
            self.out.remove(&peer);
            if !opened {
                self.no_link.insert(peer);
            }
        }
    }

    /// `peer` has no connection left: its link ends (and may be tried again).
    pub(super) fn disconnected(&mut self, peer: &PeerId) {
        self.out.remove(peer);
        self.no_link.remove(peer);
    }
}

/// Writes queued frames to one peer's stream until it fails, the queue is
/// dropped (the peer disconnected) or the node stops.
async fn write_stream(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    link: u64,
    mut rx: mpsc::Receiver<Frame>,
    events: mpsc::Sender<LinkEvent>,
    cancel: CancellationToken,
) {
    let opened = tokio::select! {
        _ = cancel.cancelled() => return,
        s = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, LINK_PROTOCOL)) => s,
    };
    let mut stream = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Only a peer that does not speak the protocol is left to
            // request-response for good; a stream lost with its connection
            // (one of two dialed at once, closed) is opened again.
            let supported = !matches!(e, libp2p_stream::OpenStreamError::UnsupportedProtocol(_));
            tracing::debug!(peer = %peer, err = %e, "no frame stream; using request-response");
            give_back(peer, link, Vec::new(), rx, &events, supported).await;
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "frame stream timed out opening; using request-response");
            give_back(peer, link, Vec::new(), rx, &events, false).await;
            return;
        }
    };
    let mut buf = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return,
            f = rx.recv() => match f {
                Some(f) => f,
                None => break,
            },
        };
        buf.clear();
        put_frame(&mut buf, &frame.0);
        let written = tokio::select! {
            // A peer that stops reading must not hold up shutdown.
            _ = cancel.cancelled() => return,
            w = write_all_flush(&mut stream, &buf) => w,
        };
        if let Err(e) = written {
            tracing::debug!(peer = %peer, err = %e, "frame stream failed");
            give_back(peer, link, vec![frame], rx, &events, true).await;
            return;
        }
    }
    let _ = stream.close().await;
}

/// Closes a failed link's queue and hands its frames (`unsent` first) back
/// to the swarm task.
async fn give_back(
    peer: PeerId,
    link: u64,
    mut unsent: Vec<Frame>,
    mut rx: mpsc::Receiver<Frame>,
    events: &mpsc::Sender<LinkEvent>,
    opened: bool,
) {
    rx.close();
    while let Some(f) = rx.recv().await {
        unsent.push(f);
    }
    let _ = events
        .send(LinkEvent::Unsent {
            peer,
            link,
            frames: unsent,
            opened,
        })
        .await;
}

async fn write_all_flush(stream: &mut Stream, buf: &[u8]) -> io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}

/// Takes inbound streams of one protocol, at most `max_per_peer` open per
/// peer at once (more are dropped), and serves each with `serve` in its own
/// task until it ends or the node stops.
pub(super) async fn accept_streams<F, Fut>(
    mut incoming: libp2p_stream::IncomingStreams,
    max_per_peer: usize,
    cancel: CancellationToken,
    tasks: TaskTracker,
    serve: F,
) where
    F: Fn(PeerId, Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    loop {
        let (peer, stream) = tokio::select! {
            _ = cancel.cancelled() => return,
            s = incoming.next() => match s {
                Some(s) => s,
                None => return,
            },
        };
        {
            let mut open = open.lock().expect("not poisoned");
            let n = open.entry(peer).or_default();
            if *n >= max_per_peer {
                tracing::debug!(peer = %peer, "too many inbound streams: one dropped");
                continue;
            }
            *n += 1;
        }
        let served = serve(peer, stream);
        let (cancel, open) = (cancel.clone(), open.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                () = served => {}
            }
            let mut open = open.lock().expect("not poisoned");
            if let Some(n) = open.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&peer);
                }
            }
        });
    }
}

/// Reads frames from one inbound stream until it ends or sends a frame over
/// the cap.
async fn read_stream(
    peer: PeerId,
    mut stream: Stream,
    max: usize,
    events: mpsc::Sender<LinkEvent>,
) {
    loop {
        let event = match read_frame(&mut stream, max).await {
            Ok(frame) => LinkEvent::Frame(peer, frame),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                LinkEvent::Refused(peer, e.to_string())
            }
            Err(_) => return, // closed, or the connection is gone
        };
        let refused = matches!(event, LinkEvent::Refused(..));
        if events.send(event).await.is_err() || refused {
            return;
        }
    }
}
