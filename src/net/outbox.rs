//! The outbox: the sync core's outputs taken in a batch and sent packed,
//! each peer's messages in order in frames of up to [`FRAME_TARGET`] bytes,
//! by the peer's frame stream (`link.rs`) when it takes them, else by
//! request-response, with at most `net.max_streams_per_peer` of those
//! unanswered per peer ([`InFlight`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use libp2p::request_response;
use libp2p::{PeerId, Swarm, gossipsub};

use super::link::Links;
use super::peers::NetState;
use super::swarm::{Behaviour, changes_topic};
use crate::sync::{Message, Output, codec};

/// Frames are filled up to this many bytes (or `net.max_message_bytes`, if
/// smaller); a bigger message travels alone.
pub(super) const FRAME_TARGET: usize = 1 << 20;

/// Most queued outputs taken at once before sending.
pub(super) const MAX_OUTBOX: usize = 4096;

/// Frames in flight: per peer (for the cap) and the docs each is about (so a
/// failed delivery can be repaired).
#[derive(Default)]
pub(super) struct InFlight {
    by_id: HashMap<request_response::OutboundRequestId, (PeerId, Vec<String>)>,
    per_peer: HashMap<PeerId, usize>,
    /// Most unanswered frames per peer (`net.max_streams_per_peer`).
    max: usize,
}

impl InFlight {
    /// Nothing in flight; at most `max` unanswered frames per peer.
    pub(super) fn new(max: usize) -> InFlight {
        InFlight {
            max,
            ..InFlight::default()
        }
    }

    pub(super) fn send(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        frame: Vec<u8>,
        docs: Vec<String>,
    ) {
        let n = self.per_peer.entry(peer).or_default();
        if *n >= self.max {
            tracing::debug!(peer = %peer, "too many unanswered frames: frame dropped");
            return;
        }
        *n += 1;
        let id = swarm.behaviour_mut().sync.send_request(&peer, frame);
        self.by_id.insert(id, (peer, docs));
    }

    /// The frame ended (answered or failed); returns the docs it was about.
    pub(super) fn done(&mut self, id: request_response::OutboundRequestId) -> Vec<String> {
        let Some((peer, docs)) = self.by_id.remove(&id) else {
            return vec![];
        };
        if let Some(n) = self.per_peer.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
        docs
    }
}

/// One encoded message waiting to be framed, and the doc it is about.
struct Queued {
    bytes: Vec<u8>,
    doc: Option<String>,
}

/// Messages taken from the sync core's queue, per peer, in order.
#[derive(Default)]
pub(super) struct Outbox {
    per_peer: HashMap<PeerId, Vec<Queued>>,
    len: usize,
    /// Messages queued or published, by kind: counted in [`NetState::sent`]
    /// at the flush.
    sent: BTreeMap<&'static str, u64>,
}

impl Outbox {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, peer: PeerId, bytes: Vec<u8>, msg: &Message) {
        self.len += 1;
        *self.sent.entry(msg.kind()).or_default() += 1;
        self.per_peer.entry(peer).or_default().push(Queued {
            bytes,
            doc: msg.doc().map(str::to_string),
        });
    }

    /// Takes one output of the sync core: its messages are queued (the
    /// event loop handles the other outputs).
    pub(super) fn add(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        connected: &BTreeSet<PeerId>,
        out: Output,
    ) {
        match out {
            Output::Send { to, msg } => {
                if let Ok(peer) = to.parse::<PeerId>() {
                    self.push(peer, codec::encode(&msg), &msg);
                }
            }
            Output::Broadcast { msg, except } => {
                // The fast path goes by gossipsub, which forwards it through
                // the mesh: a relay (`except` set) is gossipsub's job, so only
                // an origin publishes. Peers not (yet) on the topic, e.g. just
                // connected, get it directly.
                let bytes = codec::encode(&msg);
                let mut on_topic: BTreeSet<PeerId> = BTreeSet::new();
                if let Some(gossip) = swarm.behaviour_mut().gossipsub.as_mut() {
                    let topic = changes_topic();
                    if except.is_none() {
                        match gossip.publish(topic.clone(), bytes.clone()) {
                            Ok(_) => *self.sent.entry(msg.kind()).or_default() += 1,
                            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                            Err(e) => tracing::debug!(err = %e, "gossip publish failed"),
                        }
                    }
                    let hash = topic.hash();
                    on_topic = gossip
                        .all_peers()
                        .filter(|(_, topics)| topics.contains(&&hash))
                        .map(|(p, _)| *p)
                        .collect();
                }
                let except = except.and_then(|e| e.parse::<PeerId>().ok());
                for peer in connected
                    .iter()
                    .filter(|p| Some(**p) != except && !on_topic.contains(p))
                {
                    self.push(*peer, bytes.clone(), &msg);
                }
            }
            Output::Rejected { .. } | Output::Merged { .. } | Output::Held { .. } => {}
        }
    }

    /// Sends everything queued, each peer's messages packed in order into
    /// frames of up to `target` bytes, and counts them in `state`.
    pub(super) fn flush(
        self,
        swarm: &mut Swarm<Behaviour>,
        state: &Mutex<NetState>,
        in_flight: &mut InFlight,
        links: &mut Links,
        target: usize,
    ) {
        let mut traffic: Vec<(PeerId, u64, u64)> = Vec::with_capacity(self.per_peer.len());
        // By the peer's frame stream when it takes the frame, else by
        // request-response.
        let mut send = |swarm: &mut Swarm<Behaviour>, peer, frame, docs| {
            if let Some((frame, docs)) = links.send(peer, (frame, docs)) {
                in_flight.send(swarm, peer, frame, docs);
            }
        };
        for (peer, queued) in self.per_peer {
            let count = queued.len() as u64;
            let mut bytes = 0u64;
            let mut send = |swarm: &mut Swarm<Behaviour>, frame: Vec<u8>, docs| {
                bytes += frame.len() as u64;
                send(swarm, peer, frame, docs);
            };
            let mut msgs: Vec<Vec<u8>> = Vec::new();
            let mut docs: Vec<String> = Vec::new();
            let mut size = codec::BATCH_OVERHEAD;
            for q in queued {
                let add = q.bytes.len() + codec::BATCH_PER_MESSAGE;
                if !msgs.is_empty() && size + add > target {
                    let frame = codec::encode_batch(&std::mem::take(&mut msgs));
                    send(swarm, frame, std::mem::take(&mut docs));
                    size = codec::BATCH_OVERHEAD;
                }
                size += add;
                msgs.push(q.bytes);
                docs.extend(q.doc);
            }
            if !msgs.is_empty() {
                send(swarm, codec::encode_batch(&msgs), docs);
            }
            traffic.push((peer, count, bytes));
        }
        let mut st = state.lock().expect("not poisoned");
        for (kind, n) in self.sent {
            *st.sent.entry(kind).or_default() += n;
        }
        for (peer, messages, bytes) in traffic {
            let t = &mut st.peer(peer).traffic;
            t.messages_out += messages;
            t.bytes_out += bytes;
        }
    }
}
