//! The network shell: one task owns the libp2p Swarm and carries the sync
//! core's messages between peers.
//!
//! Transport is TCP with noise (authenticated, encrypted) and yamux. Sync
//! messages are packed into length-prefixed frames capped at
//! `net.max_message_bytes`, sent on one long-lived stream per peer
//! (`/mergeflow/frames/1`, see `link.rs`), or, when that stream cannot take
//! them, as requests of a request-response protocol (`/mergeflow/sync/1`)
//! with an empty acknowledgement. Bytes that do not decode are dropped,
//! counted and logged against the peer, and never reach the core. The core's
//! broadcast (the fast path) is a direct send to every connected peer; receivers relay a new change only to their peers the
//! origin did not reach (see [`crate::sync`]). With `net.gossipsub` the fast
//! path goes over a gossipsub topic instead.
//!
//! Each peer's inbound frames are rate limited (`net.max_peer_bytes_per_sec`,
//! `net.max_peer_frames_per_sec`; see [`limit`]): a frame over the limit is not
//! read or answered, and a peer that stays over collects strikes.
//!
//! Who may join: with `net.key` set, connections start with libp2p's private
//! network handshake (pnet, a pre-shared key), so a node without the key cannot
//! even complete noise; with `net.allow` set, peers whose id is not listed are
//! disconnected before any message reaches the core.
//!
//! Peers are found by mDNS (on the local network, when enabled) and by dialing
//! the configured `net.peers`, redialled with exponential backoff (up to 5
//! seconds) for as long as the node runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, connection_limits, gossipsub, identify, kad, mdns, noise,
    ping, quic, tcp, yamux,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runtime::Docs;
use crate::sync::{Input, Message, Output, codec};

mod bans;
pub mod limit;
mod link;
mod liveness;

/// Errors starting the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A listen or peer address does not parse.
    #[error("invalid multiaddr {addr:?} in {key}: {reason}")]
    Addr {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The transport could not be built or could not listen.
    #[error("network: {0}")]
    Transport(String),
}

/// What the network shell needs to know.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial and keep dialing.
    pub peers: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Largest sync message, in bytes.
    pub max_message_bytes: usize,
    /// Pre-shared network key: only nodes with the same key can connect.
    pub key: Option<[u8; 32]>,
    /// If not empty, the only peers allowed to connect.
    pub allow: Vec<PeerId>,
    /// Most connections at once.
    pub max_connections: u32,
    /// Discover peers' peers with Kademlia.
    pub kademlia: bool,
    /// Carry the fast path on gossipsub instead of direct sends.
    pub gossipsub: bool,
    /// Most bytes per second taken from one peer (0: unlimited).
    pub max_peer_bytes_per_sec: u64,
    /// Most frames per second taken from one peer (0: unlimited).
    pub max_peer_frames_per_sec: u64,
    /// A connected peer not heard from for this long is disconnected.
    pub peer_timeout: Duration,
    /// Time between pings on each connection.
    pub ping_interval: Duration,
    /// A sync request unanswered for this long fails.
    pub request_timeout: Duration,
    /// A connection with no open stream is closed after this long.
    pub idle_connection_timeout: Duration,
    /// Most unanswered sync requests per peer.
    pub max_streams_per_peer: usize,
    /// Longest wait between dials of an unreachable static peer.
    pub max_redial_backoff: Duration,
    /// Rejected inputs that ban a peer.
    pub max_strikes: u64,
    /// How long a ban lasts.
    pub ban: Duration,
}

/// Parses a network key: 64 hex digits (what `mergeflow keygen` prints).
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_key(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected 64 hex digits, got {} characters",
            hex.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(key)
}

/// A new random network key, as 64 hex digits.
pub fn generate_key() -> String {
    let key: [u8; 32] = rand::random();
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses peer ids from config.
///
/// # Errors
/// A message naming the bad id.
pub fn parse_peer_ids(ids: &[String]) -> Result<Vec<PeerId>, String> {
    ids.iter()
        .map(|s| s.parse::<PeerId>().map_err(|e| format!("{s:?}: {e}")))
        .collect()
}

/// A peer as shown by the status endpoint.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct PeerInfo {
    /// Its peer id.
    pub peer_id: String,
    /// Addresses we know for it.
    pub addrs: Vec<String>,
    /// Connected now.
    pub connected: bool,
    /// Messages from it that did not decode, and seconds it spent over its
    /// rate limit: strikes (enough of them ban it for a while).
    pub rejected: u64,
    /// Frames from it dropped for going over its rate limit.
    #[serde(default)]
    pub rate_limited: u64,
    /// Unix ms when its digest last matched ours (all docs in sync), if ever.
    pub last_in_sync_at: Option<u64>,
    /// Docs with a sync session open to it (still converging).
    pub docs_syncing: usize,
    /// What we sent it and what it sent us: sync frames and gossip.
    #[serde(default)]
    pub traffic: PeerTraffic,
}

/// Messages and bytes exchanged with one peer, since this node started.
/// Bytes are those of our frames (or gossip payloads), not of the
/// encrypted stream around them (see the `libp2p_bandwidth` metric).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct PeerTraffic {
    /// Messages sent to it (a gossipsub publish is counted under no peer).
    pub messages_out: u64,
    /// Bytes of the frames sent to it.
    pub bytes_out: u64,
    /// Messages received from it, decoded or not.
    pub messages_in: u64,
    /// Bytes of the frames and gossip received from it.
    pub bytes_in: u64,
}

impl PeerInfo {
    /// A peer we have just heard of: not connected, nothing known yet.
    fn new(peer: PeerId) -> PeerInfo {
        PeerInfo {
            peer_id: peer.to_string(),
            addrs: vec![],
            connected: false,
            rejected: 0,
            rate_limited: 0,
            last_in_sync_at: None,
            docs_syncing: 0,
            traffic: PeerTraffic::default(),
        }
    }
}

/// Live network state, shared with the API.
#[derive(Debug, Default)]
pub struct NetState {
    /// Our listen addresses with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// Known peers.
    pub peers: HashMap<PeerId, PeerInfo>,
    /// Messages sent, by kind ([`Message::kind`]): one per recipient, and
    /// one per gossipsub publish.
    pub sent: BTreeMap<&'static str, u64>,
    /// Messages received and decoded, by kind.
    pub received: BTreeMap<&'static str, u64>,
}

impl NetState {
    /// The entry of `peer`, made if it is new.
    fn peer(&mut self, peer: PeerId) -> &mut PeerInfo {
        self.peers
            .entry(peer)
            .or_insert_with(|| PeerInfo::new(peer))
    }

    /// Counts `msgs` (decoded, by kind) and `bytes` received from `peer`.
    fn count_received<'a>(
        &mut self,
        peer: PeerId,
        bytes: usize,
        msgs: impl Iterator<Item = &'a Message>,
    ) {
        let mut n = 0;
        for m in msgs {
            *self.received.entry(m.kind()).or_default() += 1;
            n += 1;
        }
        let t = &mut self.peer(peer).traffic;
        t.messages_in += n.max(1);
        t.bytes_in += bytes as u64;
    }
}

/// The network task's shared parts: its live state and libp2p's own metrics
/// (swarm, protocols, bandwidth), recorded as events happen.
#[derive(Clone)]
pub struct NetHandle {
    /// Peers, addresses and traffic.
    pub state: Arc<Mutex<NetState>>,
    /// libp2p's metrics, prefixed `libp2p_`.
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Whether the node talks to peers (see [`crate::Node::set_online`]).
    pub online: tokio::sync::watch::Sender<bool>,
}

/// Parses multiaddrs from config.
///
/// # Errors
/// [`NetError::Addr`] naming the key and address.
pub fn parse_addrs(key: &'static str, addrs: &[String]) -> Result<Vec<Multiaddr>, NetError> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>().map_err(|e| NetError::Addr {
                key,
                addr: a.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    sync: request_response::Behaviour<SyncCodec>,
    /// Long-lived frame streams (`link.rs`); request-response is the fallback.
    stream: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    gossipsub: Toggle<gossipsub::Behaviour>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

const PROTOCOL: StreamProtocol = StreamProtocol::new("/mergeflow/sync/1");
/// The gossipsub topic of the fast path: changes and deletes.
fn changes_topic() -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new("mergeflow/changes/1")
}

/// Our own Kademlia network, apart from any public one.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mergeflow/kad/1");

/// Length-prefixed frames (u32 LE), capped: requests carry one encoded sync
/// message, responses are empty.
#[derive(Clone)]
struct SyncCodec {
    max: usize,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds net.max_message_bytes = {max}"),
        ));
    }
    // Grow the buffer as bytes arrive: a length header alone must not make us
    // allocate up to the cap.
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "frame ends early",
        ));
    }
    Ok(buf)
}

/// Appends `data` to `out` as one frame: its length (u32 LE), then itself.
fn put_frame(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + data.len());
    put_frame(&mut buf, data);
    io.write_all(&buf).await?;
    io.close().await
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, self.max).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<()> {
        read_frame(io, 0).await.map(|_| ())
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        (): (),
    ) -> io::Result<()> {
        write_frame(io, &[]).await
    }
}

/// A peer we dial and keep dialing.
struct StaticPeer {
    addr: Multiaddr,
    peer: Option<PeerId>,
    next_attempt: Instant,
    backoff: Duration,
}

/// Starts the swarm task. It runs until `cancel` fires.
///
/// # Errors
/// [`NetError`] if the transport cannot be built or an address cannot be listened on.
pub fn spawn(
    key: Keypair,
    cfg: NetConfig,
    docs: Docs,
    mut outputs: mpsc::Receiver<Output>,
    cancel: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<NetHandle, NetError> {
    let online = tokio::sync::watch::Sender::new(true);
    let local = key.public().to_peer_id();
    let mdns_on = cfg.mdns;
    let kad_on = cfg.kademlia;
    let gossip_on = cfg.gossipsub;
    let max_connections = cfg.max_connections;
    let max = cfg.max_message_bytes;
    let psk = cfg.key.map(PreSharedKey::new);
    let mut registry = prometheus_client::registry::Registry::default();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                // TCP, then (with a network key) the pnet handshake, then noise and
                // yamux: without the key, nothing past pnet is readable.
                let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
                let noise = noise::Config::new(key)?;
                let transport = match psk {
                    Some(psk) => tcp
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(upgrade::Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                        .boxed(),
                    // Without a network key, QUIC too (TLS 1.3 inside, one
                    // round trip to connect, no head-of-line blocking).
                    None => tcp
                        .upgrade(upgrade::Version::V1)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                        .or_transport(
                            quic::tokio::Transport::new(quic::Config::new(key))
                                .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn))),
                        )
                        .map(|either, _| either.into_inner())
                        .boxed(),
                };
                Ok(transport)
            },
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_bandwidth_metrics(&mut registry)
        .with_behaviour(|key| {
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
            } else {
                None
            };
            let kad = kad_on.then(|| {
                let mut cfg = kad::Config::new(KAD_PROTOCOL);
                cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
                let mut kad =
                    kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), cfg);
                // Answer queries on any address: nodes on a LAN or loopback
                // never get an external address confirmed.
                kad.set_mode(Some(kad::Mode::Server));
                kad
            });
            let gossipsub = if gossip_on {
                let gossip_cfg = gossipsub::ConfigBuilder::default()
                    .validation_mode(gossipsub::ValidationMode::Strict)
                    .validate_messages()
                    .max_transmit_size(max)
                    .build()
                    .map_err(|e| e.to_string())?;
                let mut gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_cfg,
                )?;
                gossipsub.subscribe(&changes_topic())?;
                Some(gossipsub)
            } else {
                None
            };
            Ok(Behaviour {
                gossipsub: gossipsub.into(),
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max_connections))
                        .with_max_established_per_peer(Some(4))
                        .with_max_pending_incoming(Some(max_connections.min(64))),
                ),
                kad: kad.into(),
                sync: request_response::Behaviour::with_codec(
                    SyncCodec { max },
                    [(PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(cfg.request_timeout)
                        .with_max_concurrent_streams(cfg.max_streams_per_peer),
                ),
                stream: libp2p_stream::Behaviour::new(),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/mergeflow/1".into(),
                    key.public(),
                )),
                // A peer that stops answering (a partition, a pulled cable)
                // is noticed within net.peer_timeout_ms (see `liveness`) and its
                // connection closed, so it shows as disconnected and is
                // redialled, instead of holding requests until they time out.
                ping: ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(cfg.ping_interval)
                        .with_timeout(PING_TIMEOUT),
                ),
                mdns: mdns.into(),
            })
        })
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_connection_timeout))
        .build();
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Transport(format!("cannot listen on {addr}: {e}")))?;
    }
    let metrics = libp2p::metrics::Metrics::new(&mut registry);
    let state = Arc::new(Mutex::new(NetState::default()));
    let mut statics: Vec<StaticPeer> = cfg
        .peers
        .iter()
        .map(|addr| StaticPeer {
            addr: addr.clone(),
            peer: addr.iter().find_map(|p| match p {
                Protocol::P2p(id) => Some(id),
                _ => None,
            }),
            next_attempt: Instant::now(),
            backoff: Duration::from_millis(250),
        })
        .collect();
    let shared = state.clone();
    let frame_target = FRAME_TARGET.min(max);
    let (mut links, mut link_events) = link::Links::start(
        swarm.behaviour().stream.new_control(),
        max,
        cancel.clone(),
        tasks.clone(),
    )
    .map_err(NetError::Transport)?;
    let mut admit = Admission {
        allow: cfg.allow.iter().copied().collect(),
        online: *online.borrow(),
    };
    let mut online_rx = online.subscribe();
    let online_tx = online.clone();
    tasks.spawn(async move {
        let mut connected: BTreeSet<PeerId> = BTreeSet::new();
        let mut in_flight = InFlight {
            max: cfg.max_streams_per_peer,
            ..InFlight::default()
        };
        let mut bans = Bans::new(cfg.max_strikes, cfg.ban);
        let limit = limit::RateLimit::new(
            cfg.max_peer_bytes_per_sec,
            cfg.max_peer_frames_per_sec,
            max,
        );
        let mut buckets: HashMap<PeerId, limit::Bucket> = HashMap::new();
        let mut redial = tokio::time::interval(Duration::from_millis(250));
        let mut liveness = liveness::Liveness::new(cfg.peer_timeout);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Ok(()) = online_rx.changed() => {
                    admit.online = *online_rx.borrow_and_update();
                    if admit.online {
                        tracing::info!("online: dialing peers again");
                        for p in statics.iter_mut() {
                            p.next_attempt = Instant::now();
                            p.backoff = Duration::from_millis(250);
                        }
                    } else {
                        tracing::info!(peers = connected.len(), "offline: disconnecting every peer");
                        for peer in &connected {
                            let _ = swarm.disconnect_peer_id(*peer);
                        }
                    }
                }
                _ = redial.tick(), if admit.online => {
                    let now = Instant::now();
                    bans.prune(now);
                    for peer in liveness.silent(&connected, now) {
                        tracing::info!(peer = %peer, timeout = ?cfg.peer_timeout, "peer silent: disconnecting");
                        let _ = swarm.disconnect_peer_id(peer);
                        // Closing waits for the muxer, which a partition can
                        // hold up: the peer counts as gone now (for
                        // `?replicas`, effect ownership and /v1/peers) and as
                        // back when a connection is established again.
                        peer_down(peer, &docs, &mut connected, &shared, "peer fell silent");
                    }
                    for p in statics.iter_mut() {
                        let up = p.peer.is_some_and(|id| connected.contains(&id));
                        if up || p.next_attempt > now {
                            continue;
                        }
                        if let Err(e) = swarm.dial(p.addr.clone()) {
                            tracing::debug!(addr = %p.addr, err = %e, "dial failed");
                        }
                        p.next_attempt = now + p.backoff;
                        p.backoff = (p.backoff * 2).min(cfg.max_redial_backoff);
                    }
                }
                out = outputs.recv() => {
                    let Some(out) = out else { break };
                    // Take everything queued, then send it packed per peer.
                    let mut outbox = Outbox::default();
                    outbox.add(&mut swarm, &connected, &shared, &mut bans, out);
                    while outbox.len() < MAX_OUTBOX {
                        let Ok(out) = outputs.try_recv() else { break };
                        outbox.add(&mut swarm, &connected, &shared, &mut bans, out);
                    }
                    outbox.flush(&mut swarm, &shared, &mut in_flight, &mut links, frame_target);
                }
                Some(ev) = link_events.recv() => match ev {
                    link::LinkEvent::Frame(peer, frame) => {
                        liveness.heard(peer, Instant::now());
                        // Read before a disconnect or ban and handled after it:
                        // dropped, or the sync core would take the peer for
                        // connected again (anti-entropy repairs what it held).
                        if bans.is_banned(&peer) || !connected.contains(&peer) {
                            continue;
                        }
                        if !admit_frame(&limit, &mut buckets, &mut swarm, &shared, &mut bans, peer, frame.len()) {
                            continue;
                        }
                        if admit.admits(&peer) {
                            on_frame(&mut swarm, &docs, &shared, &mut bans, peer, &frame);
                        }
                    }
                    link::LinkEvent::Refused(peer, reason) => {
                        strike(&mut swarm, &shared, &mut bans, peer, &reason);
                    }
                    link::LinkEvent::Unsent { peer, link, frames, opened } => {
                        links.failed(peer, link, opened);
                        // To a peer that is gone they would only make us dial
                        // it; sync repairs them when it is back.
                        if connected.contains(&peer) {
                            for (frame, docs) in frames {
                                in_flight.send(&mut swarm, peer, frame, docs);
                            }
                        }
                    }
                },
                ev = swarm.select_next_some() => {
                    record(&metrics, &ev);
                    if let SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
                        peer,
                        message: request_response::Message::Request { request, .. },
                        ..
                    })) = &ev
                        && !admit_frame(&limit, &mut buckets, &mut swarm, &shared, &mut bans, *peer, request.len())
                    {
                        continue; // dropped unanswered: the sender repairs it later
                    }
                    if let SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } = &ev {
                        buckets.remove(peer_id);
                        links.disconnected(peer_id);
                        liveness.forget(peer_id);
                    } else if let Some(peer) = heard_from(&ev) {
                        liveness.heard(peer, Instant::now());
                    }
                    on_event(ev, &mut swarm, &docs, &mut connected, &mut in_flight, &mut bans, &mut statics, &shared, local, &admit);
                }
            }
        }
        tracing::debug!("network stopped");
    });
    Ok(NetHandle {
        state,
        metrics: Arc::new(registry),
        online: online_tx,
    })
}

/// Records `ev` in libp2p's metrics: the swarm's, and those of the
/// protocols libp2p-metrics knows.
fn record(metrics: &libp2p::metrics::Metrics, ev: &SwarmEvent<BehaviourEvent>) {
    use libp2p::metrics::Recorder;
    metrics.record(ev);
    match ev {
        SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => metrics.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => metrics.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => metrics.record(e),
        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => metrics.record(e),
        _ => {}
    }
}

/// Which peers may talk to us now: those in `net.allow` (any, if empty),
/// and none while the node is offline.
struct Admission {
    allow: BTreeSet<PeerId>,
    online: bool,
}

impl Admission {
    fn admits(&self, peer: &PeerId) -> bool {
        self.online && (self.allow.is_empty() || self.allow.contains(peer))
    }
}

/// A ping unanswered for this long fails (logged only: libp2p's ping reports
/// just the second failure in a row, and silence is judged by `liveness`
/// from everything heard of the peer): a peer counts as gone
/// `net.peer_timeout_ms` after it was last heard from, and with a ping
/// every `net.ping_interval_ms` a live peer is heard that often. The redial
/// backoff (`net.max_redial_backoff_ms`, 5 s) is short because it bounds how
/// long after a partition heals the link comes back; frames unanswered past
/// `net.max_streams_per_peer` are dropped (anti-entropy repairs them)
/// instead of piling up streams for a peer that is slow or gone.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

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

use bans::Bans;

/// Counts a rejected input against `peer`; at `net.max_strikes` the peer is
/// disconnected and refused for `net.ban_ms` (see [`bans`]).
fn strike(
    swarm: &mut libp2p::Swarm<Behaviour>,
    state: &Mutex<NetState>,
    bans: &mut Bans,
    peer: PeerId,
    reason: &str,
) {
    let strikes = {
        let mut st = state.lock().expect("not poisoned");
        let info = st.peer(peer);
        info.rejected += 1;
        info.rejected
    };
    tracing::warn!(peer = %peer, err = %reason, strikes, "rejected input from peer");
    if strikes >= bans.max_strikes && !bans.is_banned(&peer) {
        tracing::warn!(peer = %peer, "too many bad messages: disconnecting and banning the peer");
        bans.ban(peer, Instant::now());
        let _ = swarm.disconnect_peer_id(peer);
    }
}

/// Charges a frame of `len` bytes from `peer` (by request-response or its
/// frame stream) to the peer's rate limit; false if it is over, and then
/// counted (see [`over_limit`]).
fn admit_frame(
    limit: &limit::RateLimit,
    buckets: &mut HashMap<PeerId, limit::Bucket>,
    swarm: &mut libp2p::Swarm<Behaviour>,
    state: &Mutex<NetState>,
    bans: &mut Bans,
    peer: PeerId,
    len: usize,
) -> bool {
    let now = Instant::now();
    let bucket = buckets.entry(peer).or_insert_with(|| limit.bucket(now));
    if limit.admit(bucket, len, now) {
        return true;
    }
    over_limit(swarm, state, bans, peer, bucket, now);
    false
}

/// A frame from `peer` went over its rate limit and was dropped: counted,
/// and a strike at most once a second (so a peer over the limit for
/// `net.max_strikes` seconds is banned, while a short burst costs little).
fn over_limit(
    swarm: &mut libp2p::Swarm<Behaviour>,
    state: &Mutex<NetState>,
    bans: &mut Bans,
    peer: PeerId,
    bucket: &mut limit::Bucket,
    now: Instant,
) {
    state.lock().expect("not poisoned").peer(peer).rate_limited += 1;
    if bucket
        .struck_at
        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
    {
        bucket.struck_at = Some(now);
        strike(swarm, state, bans, peer, "over its rate limit");
    }
}

/// Frames are filled up to this many bytes (or `net.max_message_bytes`, if
/// smaller); a bigger message travels alone.
const FRAME_TARGET: usize = 1 << 20;

/// Most queued outputs taken at once before sending.
const MAX_OUTBOX: usize = 4096;

/// Frames in flight: per peer (for the cap) and the docs each is about (so a
/// failed delivery can be repaired).
#[derive(Default)]
struct InFlight {
    by_id: HashMap<request_response::OutboundRequestId, (PeerId, Vec<String>)>,
    per_peer: HashMap<PeerId, usize>,
    /// Most unanswered frames per peer (`net.max_streams_per_peer`).
    max: usize,
}

impl InFlight {
    fn send(
        &mut self,
        swarm: &mut libp2p::Swarm<Behaviour>,
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
    fn done(&mut self, id: request_response::OutboundRequestId) -> Vec<String> {
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
struct Outbox {
    per_peer: HashMap<PeerId, Vec<Queued>>,
    len: usize,
    /// Messages queued or published, by kind: counted in [`NetState::sent`]
    /// at the flush.
    sent: BTreeMap<&'static str, u64>,
}

impl Outbox {
    fn len(&self) -> usize {
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

    /// Takes one output of the sync core: messages are queued, rejections
    /// strike the peer at once.
    fn add(
        &mut self,
        swarm: &mut libp2p::Swarm<Behaviour>,
        connected: &BTreeSet<PeerId>,
        state: &Mutex<NetState>,
        bans: &mut Bans,
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
            Output::Rejected { peer, reason } => {
                if let Ok(peer) = peer.parse::<PeerId>() {
                    strike(swarm, state, bans, peer, &reason);
                }
            }
            Output::Merged { .. } | Output::Held { .. } => {}
        }
    }

    /// Sends everything queued, each peer's messages packed in order into
    /// frames of up to `target` bytes, and counts them in `state`.
    fn flush(
        self,
        swarm: &mut libp2p::Swarm<Behaviour>,
        state: &Mutex<NetState>,
        in_flight: &mut InFlight,
        links: &mut link::Links,
        target: usize,
    ) {
        let mut traffic: Vec<(PeerId, u64, u64)> = Vec::with_capacity(self.per_peer.len());
        // By the peer's frame stream when it takes the frame, else by
        // request-response.
        let mut send = |swarm: &mut libp2p::Swarm<Behaviour>, peer, frame, docs| {
            if let Some((frame, docs)) = links.send(peer, (frame, docs)) {
                in_flight.send(swarm, peer, frame, docs);
            }
        };
        for (peer, queued) in self.per_peer {
            let count = queued.len() as u64;
            let mut bytes = 0u64;
            let mut send = |swarm: &mut libp2p::Swarm<Behaviour>, frame: Vec<u8>, docs| {
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

/// A frame from `peer` (by request-response or its frame stream): its
/// messages go to the sync core, confirmations straight to the waiting
/// writers; an undecodable frame is a strike.
fn on_frame(
    swarm: &mut libp2p::Swarm<Behaviour>,
    docs: &Docs,
    state: &Mutex<NetState>,
    bans: &mut Bans,
    peer: PeerId,
    frame: &[u8],
) {
    let decoded = codec::decode_frame(frame, usize::MAX);
    let none = Vec::new();
    state.lock().expect("not poisoned").count_received(
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
                    Message::Have { doc, heads } => docs.confirm_held(&from, &doc, heads),
                    msg => inputs.push(Input::Received {
                        from: from.clone(),
                        msg,
                    }),
                }
            }
            if !inputs.is_empty() && !docs.sync_inputs(inputs) {
                tracing::debug!(peer = %peer, "sync queue full: frame dropped");
            }
        }
        Err(e) => strike(
            swarm,
            state,
            bans,
            peer,
            &format!("undecodable message: {e}"),
        ),
    }
}

/// The peer an event shows alive: a connection, an answered ping, a message.
fn heard_from(ev: &SwarmEvent<BehaviourEvent>) -> Option<PeerId> {
    match ev {
        SwarmEvent::ConnectionEstablished { peer_id, .. } => Some(*peer_id),
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
            peer,
            result: Ok(_),
            ..
        })) => Some(*peer),
        SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
            peer,
            ..
        })) => Some(*peer),
        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
            propagation_source,
            ..
        })) => Some(*propagation_source),
        _ => None,
    }
}

/// Marks `peer` disconnected (once): /v1/peers shows it, and the sync
/// core forgets its sessions.
fn peer_down(
    peer: PeerId,
    docs: &Docs,
    connected: &mut BTreeSet<PeerId>,
    state: &Mutex<NetState>,
    why: &'static str,
) {
    if !connected.remove(&peer) {
        return;
    }
    tracing::info!(peer = %peer, "{why}");
    if let Some(info) = state.lock().expect("not poisoned").peers.get_mut(&peer) {
        info.connected = false;
    }
    docs.sync_input(Input::PeerDown(peer.to_string()));
}

#[allow(clippy::too_many_arguments)]
fn on_event(
    ev: SwarmEvent<BehaviourEvent>,
    swarm: &mut libp2p::Swarm<Behaviour>,
    docs: &Docs,
    connected: &mut BTreeSet<PeerId>,
    in_flight: &mut InFlight,
    bans: &mut Bans,
    statics: &mut [StaticPeer],
    state: &Mutex<NetState>,
    local: PeerId,
    admit: &Admission,
) {
    let allowed = |peer: &PeerId| admit.admits(peer);
    match ev {
        SwarmEvent::NewListenAddr { address, .. } => {
            let full = address.with(Protocol::P2p(local));
            tracing::info!(addr = %full, "listening");
            state
                .lock()
                .expect("not poisoned")
                .listen_addrs
                .push(full.to_string());
        }
        SwarmEvent::ConnectionEstablished { peer_id, .. } if !admit.online => {
            tracing::debug!(peer = %peer_id, "offline: disconnecting");
            let _ = swarm.disconnect_peer_id(peer_id);
        }
        SwarmEvent::ConnectionEstablished { peer_id, .. } if !allowed(&peer_id) => {
            tracing::warn!(peer = %peer_id, "peer not in net.allow: disconnecting");
            let _ = swarm.disconnect_peer_id(peer_id);
        }
        SwarmEvent::ConnectionEstablished { peer_id, .. } if bans.is_banned(&peer_id) => {
            tracing::debug!(peer = %peer_id, "banned peer: disconnecting");
            let _ = swarm.disconnect_peer_id(peer_id);
        }
        SwarmEvent::ConnectionEstablished {
            peer_id, endpoint, ..
        } => {
            if let libp2p::core::ConnectedPoint::Dialer { address, .. } = &endpoint {
                // A static peer given without /p2p/<id>: learn its id, so it
                // counts as connected and is not dialled again and again.
                for p in statics.iter_mut() {
                    if p.peer.is_none() && same_addr(&p.addr, address) {
                        tracing::debug!(peer = %peer_id, addr = %p.addr, "static peer identified");
                        p.peer = Some(peer_id);
                    }
                }
            }
            let mut st = state.lock().expect("not poisoned");
            let info = st.peer(peer_id);
            info.connected = true;
            let addr = endpoint.get_remote_address().to_string();
            if !info.addrs.contains(&addr) {
                info.addrs.push(addr);
            }
            drop(st);
            for p in statics.iter_mut() {
                if p.peer == Some(peer_id) {
                    p.backoff = Duration::from_millis(250);
                }
            }
            // Not only the first connection: one that replaces a connection
            // still closing after its peer fell silent brings the peer back.
            if connected.insert(peer_id) {
                tracing::info!(peer = %peer_id, "peer connected");
                docs.sync_input(Input::PeerUp(peer_id.to_string()));
            }
        }
        SwarmEvent::ConnectionClosed {
            peer_id,
            num_established: 0,
            ..
        } => peer_down(peer_id, docs, connected, state, "peer disconnected"),
        SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
            peer,
            message:
                request_response::Message::Request {
                    request, channel, ..
                },
            ..
        })) => {
            if !allowed(&peer) {
                return; // raced the disconnect; the response channel just drops
            }
            let _ = swarm.behaviour_mut().sync.send_response(channel, ());
            on_frame(swarm, docs, state, bans, peer, &request);
        }
        SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::OutboundFailure {
            peer,
            error,
            request_id,
            ..
        })) => {
            tracing::debug!(peer = %peer, err = %error, "sync message not delivered");
            let failed: Vec<Input> = in_flight
                .done(request_id)
                .into_iter()
                .map(|doc| Input::SendFailed {
                    peer: peer.to_string(),
                    doc,
                })
                .collect();
            if !failed.is_empty() {
                docs.sync_inputs(failed);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message {
            message: request_response::Message::Response { request_id, .. },
            ..
        })) => {
            in_flight.done(request_id);
        }
        SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::InboundFailure {
            peer,
            error,
            ..
        })) => {
            // Only a frame we refused is the peer's fault; timeouts and closed
            // connections happen to honest peers too.
            match error {
                request_response::InboundFailure::Io(e)
                    if e.kind() == io::ErrorKind::InvalidData =>
                {
                    strike(swarm, state, bans, peer, &format!("bad frame: {e}"));
                }
                e => tracing::debug!(peer = %peer, err = %e, "inbound sync message failed"),
            }
        }
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
        })) => {
            // Only changes and deletes travel by gossip; anything else, or
            // bytes that do not decode, is rejected, which lowers the
            // forwarder's gossipsub score and counts against it here.
            let decoded = codec::decode(&message.data, usize::MAX).and_then(|m| match m {
                Message::Change { .. } | Message::Deleted { .. } => Ok(m),
                _ => Err(codec::DecodeError::Malformed(
                    "only changes and deletes travel by gossip",
                )),
            });
            state.lock().expect("not poisoned").count_received(
                propagation_source,
                message.data.len(),
                decoded.iter(),
            );
            let Some(gossip) = swarm.behaviour_mut().gossipsub.as_mut() else {
                return;
            };
            match decoded {
                Ok(msg) => {
                    gossip.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Accept,
                    );
                    docs.sync_input(Input::Received {
                        from: propagation_source.to_string(),
                        msg,
                    });
                }
                Err(e) => {
                    gossip.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Reject,
                    );
                    strike(
                        swarm,
                        state,
                        bans,
                        propagation_source,
                        &format!("bad gossip message: {e}"),
                    );
                }
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
            peer_id,
            info,
            ..
        })) => {
            // What a peer says it listens on feeds Kademlia, which tells the
            // peers' peers about it.
            if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
                for addr in info.listen_addrs {
                    kad.add_address(&peer_id, addr);
                }
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
            peer,
            addresses,
            ..
        })) if peer != local
            && !connected.contains(&peer)
            && allowed(&peer)
            && !bans.contains(&peer) =>
        {
            tracing::debug!(peer = %peer, "learned of a peer through Kademlia: dialling");
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addresses.into_vec())
                .build();
            let _ = swarm.dial(opts);
        }
        SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list)))
            if admit.online =>
        {
            for (peer, addr) in list {
                if !connected.contains(&peer) && peer != local {
                    // mDNS addresses may already end in /p2p/<id>.
                    let addr = if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                        addr
                    } else {
                        addr.with(Protocol::P2p(peer))
                    };
                    let _ = swarm.dial(addr);
                }
            }
        }
        _ => {}
    }
}
