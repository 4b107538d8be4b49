//! The event loop: one task owns the Swarm and everything the network
//! decides with (connected peers, static peers, admission, liveness, frames
//! in flight, links), shaped like rust-libp2p's file-sharing example. It
//! takes swarm events, the sync core's outputs, frames from the links, the
//! online switch, a redial tick and [`Command`]s (each with a oneshot
//! reply), and writes what the API reads into the shared [`NetState`].
//!
//! It stops on [`Command::Shutdown`] (replying once it has stopped and its
//! swarm is dropped), when the node's cancellation token fires, or when the
//! sync core's output queue closes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, kad, mdns, ping};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::admission::Admission;
use super::conns::Conns;
use super::link::{LinkEvent, Links};
use super::liveness::{Liveness, heard_from};
use super::outbox::{InFlight, MAX_OUTBOX, Outbox};
use super::peers::NetState;
use super::swarm::{Behaviour, BehaviourEvent, record};
use crate::runtime::Inbox;
use crate::sync::{Input, Message, Output, codec};

/// What other tasks ask of the event loop; each carries its reply.
#[derive(Debug)]
pub(super) enum Command {
    /// Stop: the loop ends, drops its swarm (closing every connection) and
    /// then answers on `done`.
    Shutdown {
        /// Answered once the loop has stopped.
        done: oneshot::Sender<()>,
    },
}

/// The first wait between dials of an unreachable static peer.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// A peer we dial and keep dialing.
struct StaticPeer {
    addr: Multiaddr,
    peer: Option<PeerId>,
    next_attempt: Instant,
    backoff: Duration,
}

/// What the event loop is made of (see [`EventLoop::new`]).
pub(super) struct Parts {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) metrics: libp2p::metrics::Metrics,
    /// Where peers' input goes: the runtime's sync inbox.
    pub(super) inbox: Inbox,
    pub(super) commands: mpsc::Receiver<Command>,
    /// The sync core's outputs.
    pub(super) outputs: mpsc::Receiver<Output>,
    pub(super) online: watch::Receiver<bool>,
    pub(super) links: Links,
    pub(super) link_events: mpsc::Receiver<LinkEvent>,
    pub(super) state: Arc<Mutex<NetState>>,
    /// `net.peers`.
    pub(super) statics: Vec<Multiaddr>,
    pub(super) admission: Admission,
    pub(super) liveness: Liveness,
    /// `net.max_streams_per_peer`.
    pub(super) max_streams_per_peer: usize,
    /// Frames are filled up to this many bytes.
    pub(super) frame_target: usize,
    /// `net.max_redial_backoff_ms`.
    pub(super) max_redial_backoff: Duration,
    pub(super) cancel: CancellationToken,
}

/// The network's one task: owns the swarm and its state.
pub(super) struct EventLoop {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    metrics: libp2p::metrics::Metrics,
    inbox: Inbox,
    commands: mpsc::Receiver<Command>,
    outputs: mpsc::Receiver<Output>,
    online: watch::Receiver<bool>,
    links: Links,
    link_events: mpsc::Receiver<LinkEvent>,
    state: Arc<Mutex<NetState>>,
    /// Peers with a connection (or counted as such: see [`Self::peer_down`]).
    connected: BTreeSet<PeerId>,
    /// Each peer's connections: one of two dialed at once is closed.
    conns: Conns,
    statics: Vec<StaticPeer>,
    admission: Admission,
    liveness: Liveness,
    in_flight: InFlight,
    frame_target: usize,
    max_redial_backoff: Duration,
    cancel: CancellationToken,
}

impl EventLoop {
    pub(super) fn new(p: Parts) -> EventLoop {
        let statics: Vec<StaticPeer> = p
            .statics
            .into_iter()
            .map(|addr| StaticPeer {
                peer: addr.iter().find_map(|p| match p {
                    Protocol::P2p(id) => Some(id),
                    _ => None,
                }),
                addr,
                next_attempt: Instant::now(),
                backoff: FIRST_BACKOFF,
            })
            .collect();
        {
            let mut st = p.state.lock().expect("not poisoned");
            for id in statics.iter().filter_map(|s| s.peer) {
                st.pin(id);
            }
        }
        EventLoop {
            local: *p.swarm.local_peer_id(),
            swarm: p.swarm,
            metrics: p.metrics,
            inbox: p.inbox,
            commands: p.commands,
            outputs: p.outputs,
            online: p.online,
            links: p.links,
            link_events: p.link_events,
            state: p.state,
            connected: BTreeSet::new(),
            conns: Conns::default(),
            statics,
            admission: p.admission,
            liveness: p.liveness,
            in_flight: InFlight::new(p.max_streams_per_peer),
            frame_target: p.frame_target,
            max_redial_backoff: p.max_redial_backoff,
            cancel: p.cancel,
        }
    }

    /// Runs until shut down (see the module doc).
    pub(super) async fn run(mut self) {
        let mut redial = tokio::time::interval(FIRST_BACKOFF);
        let done = loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break None,
                Some(cmd) = self.commands.recv() => {
                    if let Some(done) = self.on_command(cmd) {
                        break Some(done);
                    }
                }
                Ok(()) = self.online.changed() => {
                    let online = *self.online.borrow_and_update();
                    self.on_online(online);
                }
                _ = redial.tick(), if self.admission.online => self.on_tick(),
                out = self.outputs.recv() => match out {
                    Some(out) => self.on_outputs(out),
                    None => break None,
                },
                Some(ev) = self.link_events.recv() => self.on_link_event(ev),
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
            }
        };
        // The swarm goes with the loop: its connections close.
        drop(self);
        tracing::debug!("network stopped");
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    /// Handles a command; `Some` to stop the loop and answer there once stopped.
    fn on_command(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Shutdown { done } => {
                tracing::debug!("network shutting down");
                Some(done)
            }
        }
    }

    /// The node went online (dial every static peer again now) or offline
    /// (disconnect every peer).
    fn on_online(&mut self, online: bool) {
        self.admission.online = online;
        if online {
            tracing::info!("online: dialing peers again");
            for p in self.statics.iter_mut() {
                p.next_attempt = Instant::now();
                p.backoff = FIRST_BACKOFF;
            }
        } else {
            tracing::info!(
                peers = self.connected.len(),
                "offline: disconnecting every peer"
            );
            for peer in &self.connected {
                let _ = self.swarm.disconnect_peer_id(*peer);
            }
        }
    }

    /// Every 250 ms while online: ended bans go, silent peers are
    /// disconnected, static peers not connected are redialled when due.
    fn on_tick(&mut self) {
        let now = Instant::now();
        self.admission.bans.prune(now);
        for peer in self.liveness.silent(&self.connected, now) {
            tracing::info!(peer = %peer, timeout = ?self.liveness.timeout(), "peer silent: disconnecting");
            let _ = self.swarm.disconnect_peer_id(peer);
            // Closing waits for the muxer, which a partition can hold up:
            // the peer counts as gone now (for `?replicas`, effect ownership
            // and /v1/peers) and as back when a connection is established
            // again.
            self.peer_down(peer, "peer fell silent");
        }
        for p in self.statics.iter_mut() {
            let up = p.peer.is_some_and(|id| self.connected.contains(&id));
            if up || p.next_attempt > now {
                continue;
            }
            if let Err(e) = self.swarm.dial(p.addr.clone()) {
                tracing::debug!(addr = %p.addr, err = %e, "dial failed");
            }
            p.next_attempt = now + p.backoff;
            p.backoff = (p.backoff * 2).min(self.max_redial_backoff);
        }
    }

    /// Takes `first` and everything queued behind it (up to
    /// [`MAX_OUTBOX`]), then sends it packed per peer.
    fn on_outputs(&mut self, first: Output) {
        let mut outbox = Outbox::default();
        self.on_output(first, &mut outbox);
        while outbox.len() < MAX_OUTBOX {
            let Ok(out) = self.outputs.try_recv() else {
                break;
            };
            self.on_output(out, &mut outbox);
        }
        outbox.flush(
            &mut self.swarm,
            &self.state,
            &mut self.in_flight,
            &mut self.links,
            self.frame_target,
        );
    }

    /// One output of the sync core: messages are queued in `outbox`,
    /// rejections strike the peer at once.
    fn on_output(&mut self, out: Output, outbox: &mut Outbox) {
        match out {
            Output::Rejected { peer, reason } => {
                if let Ok(peer) = peer.parse::<PeerId>() {
                    self.admission
                        .strike(&mut self.swarm, &self.state, peer, &reason);
                }
            }
            out => outbox.add(&mut self.swarm, &self.connected, out),
        }
    }

    fn on_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Frame(peer, frame) => {
                self.liveness.heard(peer, Instant::now());
                // Read before a disconnect or ban and handled after it:
                // dropped, or the sync core would take the peer for
                // connected again (anti-entropy repairs what it held).
                if self.admission.bans.is_banned(&peer) || !self.connected.contains(&peer) {
                    return;
                }
                if !self
                    .admission
                    .admit_frame(&mut self.swarm, &self.state, peer, frame.len())
                {
                    return;
                }
                if self.admission.admits(&peer) {
                    self.on_frame(peer, &frame);
                }
            }
            LinkEvent::Refused(peer, reason) => {
                self.admission
                    .strike(&mut self.swarm, &self.state, peer, &reason);
            }
            LinkEvent::Unsent {
                peer,
                link,
                frames,
                opened,
            } => {
                self.links.failed(peer, link, opened);
                // To a peer that is gone they would only make us dial it;
                // sync repairs them when it is back.
                if self.connected.contains(&peer) {
                    for (frame, docs) in frames {
                        self.in_flight.send(&mut self.swarm, peer, frame, docs);
                    }
                }
            }
        }
    }

    /// A frame from `peer` (by request-response or its frame stream): its
    /// messages go to the sync core, confirmations straight to the waiting
    /// writers; an undecodable frame is a strike.
    fn on_frame(&mut self, peer: PeerId, frame: &[u8]) {
        let decoded = codec::decode_frame(frame, usize::MAX);
        let none = Vec::new();
        self.state.lock().expect("not poisoned").count_received(
            peer,
            frame.len(),
            decoded.as_ref().unwrap_or(&none).iter(),
        );
        match decoded {
            Ok(msgs) => {
                let from = peer.to_string();
                let mut inputs = Vec::with_capacity(msgs.len());
                for msg in msgs {
                    match msg {
                        Message::Have { doc, heads } => self.inbox.confirm_held(&from, &doc, heads),
                        msg => inputs.push(Input::Received {
                            from: from.clone(),
                            msg,
                        }),
                    }
                }
                if !inputs.is_empty() && !self.inbox.send_all(inputs) {
                    tracing::debug!(peer = %peer, "sync queue full: frame dropped");
                }
            }
            Err(e) => self.admission.strike(
                &mut self.swarm,
                &self.state,
                peer,
                &format!("undecodable message: {e}"),
            ),
        }
    }

    /// Marks `peer` disconnected (once): /v1/peers shows it, and the sync
    /// core forgets its sessions.
    fn peer_down(&mut self, peer: PeerId, why: &'static str) {
        if !self.connected.remove(&peer) {
            return;
        }
        tracing::info!(peer = %peer, "{why}");
        self.state.lock().expect("not poisoned").down(peer);
        self.inbox.send(Input::PeerDown(peer.to_string()));
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        record(&self.metrics, &ev);
        if let SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
            peer,
            message: request_response::Message::Request { request, .. },
            ..
        })) = &ev
            && !self
                .admission
                .admit_frame(&mut self.swarm, &self.state, *peer, request.len())
        {
            return; // dropped unanswered: the sender repairs it later
        }
        if let SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            num_established,
            ..
        } = &ev
        {
            self.conns.closed(*peer_id, *connection_id);
            if *num_established == 0 {
                self.admission.forget(peer_id);
                self.links.disconnected(peer_id);
                self.liveness.forget(peer_id);
            }
        } else if let Some(peer) = heard_from(&ev) {
            self.liveness.heard(peer, Instant::now());
        }
        self.on_event(ev);
    }

    /// What a swarm event changes: the peer table, the sync core's view of
    /// who is connected, frames received, dials.
    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(self.local));
                tracing::info!(addr = %full, "listening");
                self.state
                    .lock()
                    .expect("not poisoned")
                    .listen_addrs
                    .push(full.to_string());
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } if !self.admission.online => {
                tracing::debug!(peer = %peer_id, "offline: disconnecting");
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. }
                if !self.admission.admits(&peer_id) =>
            {
                tracing::warn!(peer = %peer_id, "peer not in net.allow: disconnecting");
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. }
                if self.admission.bans.is_banned(&peer_id) =>
            {
                tracing::debug!(peer = %peer_id, "banned peer: disconnecting");
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                self.on_connected(peer_id, &endpoint);
                let dups = self.conns.established(
                    self.local,
                    peer_id,
                    connection_id,
                    endpoint.is_dialer(),
                );
                for c in dups {
                    tracing::debug!(peer = %peer_id, "closing a second connection to the peer");
                    self.swarm.close_connection(c);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => self.peer_down(peer_id, "peer disconnected"),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.on_sync_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Err(e),
                ..
            })) if !matches!(e, ping::Failure::Unsupported) => {
                // Not a verdict by itself: `liveness` decides, from everything
                // heard of the peer, against `net.peer_timeout_ms` (a slow link
                // whose pings time out but whose messages arrive stays up).
                tracing::debug!(peer = %peer, err = %e, "ping failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.on_gossip(propagation_source, &message_id, &message),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                self.liveness.identified(peer_id, &info.protocols);
                // What a peer says it listens on feeds Kademlia, which tells the
                // peers' peers about it.
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                    for addr in info.listen_addrs {
                        kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                addresses,
                ..
            })) if peer != self.local
                && !self.connected.contains(&peer)
                && self.admission.admits(&peer)
                && !self.admission.bans.contains(&peer) =>
            {
                tracing::debug!(peer = %peer, "learned of a peer through Kademlia: dialling");
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addresses.into_vec())
                    .build();
                let _ = self.swarm.dial(opts);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list)))
                if self.admission.online =>
            {
                for (peer, addr) in list {
                    if !self.connected.contains(&peer) && peer != self.local {
                        // mDNS addresses may already end in /p2p/<id>.
                        let addr = if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                            addr
                        } else {
                            addr.with(Protocol::P2p(peer))
                        };
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            _ => {}
        }
    }

    /// An admitted peer's connection is up.
    fn on_connected(&mut self, peer_id: PeerId, endpoint: &libp2p::core::ConnectedPoint) {
        if let libp2p::core::ConnectedPoint::Dialer { address, .. } = endpoint {
            // A static peer given without /p2p/<id>: learn its id, so it
            // counts as connected and is not dialled again and again.
            for p in self.statics.iter_mut() {
                if p.peer.is_none() && same_addr(&p.addr, address) {
                    tracing::debug!(peer = %peer_id, addr = %p.addr, "static peer identified");
                    p.peer = Some(peer_id);
                    self.state.lock().expect("not poisoned").pin(peer_id);
                }
            }
        }
        let mut st = self.state.lock().expect("not poisoned");
        let info = st.up(peer_id);
        let addr = endpoint.get_remote_address().to_string();
        if !info.addrs.contains(&addr) {
            info.addrs.push(addr);
        }
        drop(st);
        for p in self.statics.iter_mut() {
            if p.peer == Some(peer_id) {
                p.backoff = FIRST_BACKOFF;
            }
        }
        // Not only the first connection: one that replaces a connection
        // still closing after its peer fell silent brings the peer back.
        if self.connected.insert(peer_id) {
            tracing::info!(peer = %peer_id, "peer connected");
            self.liveness.up(peer_id);
            self.inbox.send(Input::PeerUp(peer_id.to_string()));
        }
    }

    /// Request-response: a frame received, answered or lost.
    fn on_sync_event(&mut self, ev: request_response::Event<Vec<u8>, ()>) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if !self.admission.admits(&peer) {
                    return; // raced the disconnect; the response channel just drops
                }
                let _ = self.swarm.behaviour_mut().sync.send_response(channel, ());
                self.on_frame(peer, &request);
            }
            request_response::Event::OutboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                tracing::debug!(peer = %peer, err = %error, "sync message not delivered");
                let failed: Vec<Input> = self
                    .in_flight
                    .done(request_id)
                    .into_iter()
                    .map(|doc| Input::SendFailed {
                        peer: peer.to_string(),
                        doc,
                    })
                    .collect();
                if !failed.is_empty() {
                    self.inbox.send_all(failed);
                }
            }
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            } => {
                self.in_flight.done(request_id);
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                // Only a frame we refused is the peer's fault; timeouts and
                // closed connections happen to honest peers too.
                match error {
                    request_response::InboundFailure::Io(e)
                        if e.kind() == std::io::ErrorKind::InvalidData =>
                    {
                        self.admission.strike(
                            &mut self.swarm,
                            &self.state,
                            peer,
                            &format!("bad frame: {e}"),
                        );
                    }
                    e => tracing::debug!(peer = %peer, err = %e, "inbound sync message failed"),
                }
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// A gossip message: only changes and deletes travel by gossip; anything
    /// else, or bytes that do not decode, is rejected, which lowers the
    /// forwarder's gossipsub score and counts against it here.
    fn on_gossip(
        &mut self,
        source: PeerId,
        id: &gossipsub::MessageId,
        message: &gossipsub::Message,
    ) {
        let decoded = codec::decode(&message.data, usize::MAX).and_then(|m| match m {
            Message::Change { .. } | Message::Deleted { .. } => Ok(m),
            _ => Err(codec::DecodeError::Malformed(
                "only changes and deletes travel by gossip",
            )),
        });
        self.state.lock().expect("not poisoned").count_received(
            source,
            message.data.len(),
            decoded.iter(),
        );
        let Some(gossip) = self.swarm.behaviour_mut().gossipsub.as_mut() else {
            return;
        };
        match decoded {
            Ok(msg) => {
                gossip.report_message_validation_result(
                    id,
                    &source,
                    gossipsub::MessageAcceptance::Accept,
                );
                self.inbox.send(Input::Received {
                    from: source.to_string(),
                    msg,
                });
            }
            Err(e) => {
                gossip.report_message_validation_result(
                    id,
                    &source,
                    gossipsub::MessageAcceptance::Reject,
                );
                self.admission.strike(
                    &mut self.swarm,
                    &self.state,
                    source,
                    &format!("bad gossip message: {e}"),
                );
            }
        }
    }
}

/// True if two addresses name the same endpoint, ignoring a `/p2p/<id>` suffix.
fn same_addr(a: &Multiaddr, b: &Multiaddr) -> bool {
    let strip = |m: &Multiaddr| -> Vec<Protocol<'static>> {
        m.iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .map(|p| p.acquire())
            .collect()
    };
    strip(a) == strip(b)
}
