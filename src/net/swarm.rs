//! Building the swarm: the transport (TCP with noise and yamux, behind
//! pnet with a network key; QUIC too without one) and the behaviours
//! (connection limits, request-response sync, frame streams, identify, ping,
//! and optionally Kademlia, gossipsub and mDNS), with libp2p's metrics.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Transport as _;
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    StreamProtocol, Swarm, connection_limits, gossipsub, identify, kad, mdns, noise, ping, tcp,
    yamux,
};
use prometheus_client::registry::Registry;

use super::frames::{PROTOCOL, SyncCodec};

/// A connection's transport, as the swarm takes it.
type Boxed = libp2p::core::transport::Boxed<(libp2p::PeerId, StreamMuxerBox)>;

/// `tcp`, or QUIC: TLS 1.3 inside, one round trip to connect, no
/// head-of-line blocking.
#[cfg(feature = "quic")]
fn with_quic(tcp: Boxed, key: &Keypair) -> Boxed {
    tcp.or_transport(
        libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key))
            .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn))),
    )
    .map(|either, _| either.into_inner())
    .boxed()
}

/// `tcp` alone: this build has no QUIC (the `quic` feature is off).
#[cfg(not(feature = "quic"))]
fn with_quic(tcp: Boxed, _key: &Keypair) -> Boxed {
    tcp
}

/// The node's behaviours, in the order libp2p polls them.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    limits: connection_limits::Behaviour,
    pub(super) sync: request_response::Behaviour<SyncCodec>,
    /// Long-lived frame streams (`link.rs`); request-response is the fallback.
    pub(super) stream: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    pub(super) kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    pub(super) gossipsub: Toggle<gossipsub::Behaviour>,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// The gossipsub topic of the fast path: changes and deletes.
pub(super) fn changes_topic() -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new("mergeflow/changes/1")
}

/// Our own Kademlia network, apart from any public one.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mergeflow/kad/1");

/// Between libp2p pings on a connection. Liveness comes from our own
/// heartbeats (`liveness`); libp2p's ping stays to answer nodes from before
/// them, which still ping every `net.ping_interval_ms` and count the answers.
const LIBP2P_PING_INTERVAL: Duration = Duration::from_secs(300);

/// Between Kademlia's periodic bootstraps.
const KAD_REFRESH: Duration = Duration::from_secs(300);

/// A ping unanswered for this long fails (logged only: libp2p's ping reports
/// just the second failure in a row, and silence is judged by `liveness`
/// from everything heard of the peer): a peer counts as gone
/// `net.peer_timeout_ms` after it was last heard from, and with a heartbeat
/// every `net.ping_interval_ms` a live peer is heard that often. The redial
/// backoff (`net.max_redial_backoff_ms`, 5 s) is short because it bounds how
/// long after a partition heals the link comes back; frames unanswered past
/// `net.max_streams_per_peer` are dropped (anti-entropy repairs them)
/// instead of piling up streams for a peer that is slow or gone.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What the swarm is built with (from the node's `NetConfig`).
pub(super) struct SwarmConfig {
    /// Discover peers on the local network with mDNS.
    pub(super) mdns: bool,
    /// Discover peers' peers with Kademlia.
    pub(super) kademlia: bool,
    /// Carry the fast path on gossipsub.
    pub(super) gossipsub: bool,
    /// Most connections at once.
    pub(super) max_connections: u32,
    /// Largest sync message, in bytes.
    pub(super) max_message_bytes: usize,
    /// Pre-shared network key.
    pub(super) key: Option<[u8; 32]>,
    /// A sync request unanswered for this long fails.
    pub(super) request_timeout: Duration,
    /// Most unanswered sync requests per peer.
    pub(super) max_streams_per_peer: usize,
    /// A connection with no open stream is closed after this long.
    pub(super) idle_connection_timeout: Duration,
}

/// Builds the swarm of `key`, registering the bandwidth metrics in `registry`.
///
/// # Errors
/// Why the transport or a behaviour could not be built.
pub(super) fn build(
    key: Keypair,
    cfg: &SwarmConfig,
    registry: &mut Registry,
) -> Result<Swarm<Behaviour>, String> {
    let local = key.public().to_peer_id();
    let mdns_on = cfg.mdns;
    let kad_on = cfg.kademlia;
    let gossip_on = cfg.gossipsub;
    let max_connections = cfg.max_connections;
    let max = cfg.max_message_bytes;
    let psk = cfg.key.map(PreSharedKey::new);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
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
                    // Without a network key, QUIC too where the build has it.
                    None => with_quic(
                        tcp.upgrade(upgrade::Version::V1)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default())
                            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                            .boxed(),
                        key,
                    ),
                };
                Ok(transport)
            },
        )
        .map_err(|e| e.to_string())?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| {
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
            } else {
                None
            };
            let kad = kad_on.then(|| {
                let mut cfg = kad::Config::new(KAD_PROTOCOL);
                // libp2p's default. A joining node's own bootstrap (when its
                // routing table first fills) finds its peers' peers at once,
                // so the periodic one only refreshes; every 60 s it was
                // about 100 B/s of an idle pair's traffic.
                cfg.set_periodic_bootstrap_interval(Some(KAD_REFRESH));
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
                        .with_interval(LIBP2P_PING_INTERVAL)
                        .with_timeout(PING_TIMEOUT),
                ),
                mdns: mdns.into(),
            })
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_connection_timeout))
        .build();
    Ok(swarm)
}

/// Records `ev` in libp2p's metrics: the swarm's, and those of the
/// protocols libp2p-metrics knows.
pub(super) fn record(metrics: &libp2p::metrics::Metrics, ev: &SwarmEvent<BehaviourEvent>) {
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
