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
//! The network is an event loop (`event_loop.rs`): one task owns the Swarm
//! and its state, and [`NetHandle`] sends it commands with oneshot
//! replies over a bounded channel (`net_commands` in the queue metrics);
//! [`NetHandle::shutdown`] returns once the loop has stopped. The files:
//! `swarm.rs` builds the swarm, `frames.rs` frames sync messages,
//! `admission.rs` and `bans.rs` decide who may talk to us, `link.rs` and
//! `outbox.rs` send, `liveness.rs` notices silent peers, `limit.rs` rate
//! limits, `peers.rs` holds the peer table.
//!
//! Peers are found by mDNS (on the local network, when enabled) and by dialing
//! the configured `net.peers`, redialled with exponential backoff (up to 5
//! seconds) for as long as the node runs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Queues;
use crate::runtime::Inbox;
use crate::sync::Output;

mod admission;
mod bans;
mod conns;
mod event_loop;
mod frames;
pub mod limit;
mod link;
mod liveness;
mod outbox;
mod peers;
mod swarm;

use event_loop::Command;
pub use peers::{MAX_KNOWN_PEERS, NetState, PeerInfo, PeerTraffic};

/// Commands waiting for the event loop.
const COMMAND_QUEUE: usize = 64;

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
    /// Most disconnected peers kept in the peer table (static peers aside).
    pub max_known_peers: usize,
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

/// The network task's shared parts: its live state, the online switch, and
/// the way to send its event loop commands.
#[derive(Clone)]
pub struct NetHandle {
    /// Peers, addresses and traffic.
    pub state: Arc<Mutex<NetState>>,
    /// Whether the node talks to peers (see [`crate::Node::set_online`]).
    pub online: watch::Sender<bool>,
    /// The event loop's commands.
    commands: mpsc::Sender<Command>,
}

impl NetHandle {
    /// Stops the event loop and waits until it has stopped (its swarm
    /// dropped, every connection closing). Returns at once if it already has.
    pub async fn shutdown(&self) {
        let (done, stopped) = oneshot::channel();
        if self.commands.send(Command::Shutdown { done }).await.is_ok() {
            let _ = stopped.await;
        }
    }
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

/// Starts the network's event loop. It runs until [`NetHandle::shutdown`],
/// until `cancel` fires, or until `outputs` closes. libp2p's metrics
/// (`libp2p_*`) are registered in `registry`; the net's queues are made
/// with `queues`.
///
/// # Errors
/// [`NetError`] if the transport cannot be built or an address cannot be listened on.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    key: Keypair,
    cfg: NetConfig,
    inbox: Inbox,
    outputs: mpsc::Receiver<Output>,
    registry: &mut Registry,
    queues: &Queues,
    cancel: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<NetHandle, NetError> {
    let max = cfg.max_message_bytes;
    let swarm_cfg = swarm::SwarmConfig {
        mdns: cfg.mdns,
        kademlia: cfg.kademlia,
        gossipsub: cfg.gossipsub,
        max_connections: cfg.max_connections,
        max_message_bytes: max,
        key: cfg.key,
        request_timeout: cfg.request_timeout,
        max_streams_per_peer: cfg.max_streams_per_peer,
        idle_connection_timeout: cfg.idle_connection_timeout,
    };
    let mut swarm = swarm::build(key, &swarm_cfg, registry).map_err(NetError::Transport)?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Transport(format!("cannot listen on {addr}: {e}")))?;
    }
    let metrics = libp2p::metrics::Metrics::new(registry);
    let (links, link_events) = link::Links::start(
        swarm.behaviour().stream.new_control(),
        max,
        queues,
        cancel.clone(),
        tasks.clone(),
    )
    .map_err(NetError::Transport)?;
    let liveness = liveness::Liveness::with_heartbeats(
        cfg.peer_timeout,
        swarm.behaviour().stream.new_control(),
        *swarm.local_peer_id(),
        cfg.ping_interval,
        cancel.clone(),
        tasks.clone(),
    )
    .map_err(NetError::Transport)?;
    let online = watch::Sender::new(true);
    let (commands, command_rx) = queues.channel("net_commands", COMMAND_QUEUE);
    let state = Arc::new(Mutex::new(NetState::with_limit(cfg.max_known_peers)));
    let admission = admission::Admission::new(
        cfg.allow.iter().copied(),
        *online.borrow(),
        bans::Bans::new(cfg.max_strikes, cfg.ban),
        limit::RateLimit::new(cfg.max_peer_bytes_per_sec, cfg.max_peer_frames_per_sec, max),
    );
    let event_loop = event_loop::EventLoop::new(event_loop::Parts {
        swarm,
        metrics,
        inbox,
        commands: command_rx,
        outputs,
        online: online.subscribe(),
        links,
        link_events,
        state: state.clone(),
        statics: cfg.peers,
        admission,
        liveness,
        max_streams_per_peer: cfg.max_streams_per_peer,
        frame_target: outbox::FRAME_TARGET.min(max),
        max_redial_backoff: cfg.max_redial_backoff,
        cancel,
    });
    tasks.spawn(event_loop.run());
    Ok(NetHandle {
        state,
        online,
        commands,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_is_acknowledged_once_the_loop_has_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::Config::default();
        config.node.data_dir = dir.path().to_path_buf();
        config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        config.net.mdns = false;
        let node = crate::Node::builder()
            .config(config)
            .network(true)
            .start()
            .await
            .unwrap();
        let net = node.inner.net.lock().unwrap().clone().unwrap();
        assert!(!net.commands.is_closed(), "the loop runs");
        tokio::time::timeout(Duration::from_secs(10), net.shutdown())
            .await
            .expect("acknowledged");
        assert!(net.commands.is_closed(), "the loop has stopped");
        tokio::time::timeout(Duration::from_secs(1), net.shutdown())
            .await
            .expect("a second shutdown returns at once");
        node.shutdown().await.unwrap();
    }
}
