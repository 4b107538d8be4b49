//! Which connected peers have fallen silent, and the heartbeats that tell.
//!
//! libp2p's ping stays quiet about the first failure in a row, so a peer that
//! stops answering (a partition, a pulled cable, a stopped process whose
//! kernel keeps its TCP connections up) would show as connected for two
//! ping rounds and two timeouts. The node judges silence itself instead:
//! every heartbeat answered and every message received counts as hearing
//! from the peer, and a peer not heard from for `net.peer_timeout_ms` is gone.
//!
//! **Heartbeats.** libp2p's ping tells only the side that sent it that the
//! peer is alive, so both sides of a connection ping: four messages per
//! round, and an idle pair's whole traffic. Here one side sends, on one
//! stream per peer ([`ALIVE_PROTOCOL`]), one byte every `net.ping_interval_ms`
//! and the other echoes it: the sender hears the echo, the echoer the beat,
//! so one exchange serves both. The side with the smaller peer id sends,
//! so both agree without a word. A peer that does not speak the protocol
//! (a node from before it) is not judged silent: it is heard through its
//! messages, and its connection goes when TCP gives up; it still pings us,
//! and libp2p's ping still answers.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, Stream, StreamProtocol, gossipsub, ping, request_response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::swarm::BehaviourEvent;

/// The heartbeat protocol: one byte each way per beat, on a long-lived stream.
pub(super) const ALIVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/mergeflow/alive/1");

/// Heartbeat streams one peer may hold open towards us; more are dropped.
const MAX_INBOUND_PER_PEER: usize = 2;

/// A heartbeat stream that cannot be opened in this long is tried again.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the event loop and the heartbeat tasks share.
#[derive(Default)]
struct Heard {
    /// When each connected peer was last heard from.
    at: HashMap<PeerId, Instant>,
    /// Peers without heartbeats: never judged silent.
    exempt: HashSet<PeerId>,
}

/// When each connected peer was last heard from, and the heartbeats.
pub(super) struct Liveness {
    heard: Arc<Mutex<Heard>>,
    timeout: Duration,
    beats: Option<Beats>,
}

/// The heartbeats this node sends.
struct Beats {
    control: libp2p_stream::Control,
    local: PeerId,
    interval: Duration,
    /// Each peer we send to: its task's token.
    running: HashMap<PeerId, CancellationToken>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Liveness {
    /// Silence judged from what the event loop reports alone (no heartbeats).
    #[cfg(test)]
    pub(super) fn new(timeout: Duration) -> Liveness {
        Liveness {
            heard: Arc::default(),
            timeout,
            beats: None,
        }
    }

    /// As [`Liveness::new`], with heartbeats every `interval` on `control`:
    /// answers peers' beats from now on, and sends its own to each peer
    /// [`up`](Self::up) reports (when it has the smaller id).
    ///
    /// # Errors
    /// The protocol is already registered on `control`'s behaviour.
    pub(super) fn with_heartbeats(
        timeout: Duration,
        mut control: libp2p_stream::Control,
        local: PeerId,
        interval: Duration,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Liveness, String> {
        let incoming = control
            .accept(ALIVE_PROTOCOL)
            .map_err(|e| format!("cannot accept {ALIVE_PROTOCOL}: {e}"))?;
        let heard: Arc<Mutex<Heard>> = Arc::default();
        let echoed = heard.clone();
        tasks.spawn(super::link::accept_streams(
            incoming,
            MAX_INBOUND_PER_PEER,
            cancel.clone(),
            tasks.clone(),
            move |peer, stream| {
                let heard = echoed.clone();
                async move { echo(peer, stream, &heard).await }
            },
        ));
        Ok(Liveness {
            heard,
            timeout,
            beats: Some(Beats {
                control,
                local,
                interval,
                running: HashMap::new(),
                cancel,
                tasks,
            }),
        })
    }

    /// How long a peer may stay silent.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `peer` said something (or just connected).
    pub(super) fn heard(&mut self, peer: PeerId, now: Instant) {
        lock(&self.heard).at.insert(peer, now);
    }

    /// `peer` is connected: heartbeats to it start, if this side sends them.
    pub(super) fn up(&mut self, peer: PeerId) {
        let Some(b) = self.beats.as_mut() else {
            return;
        };
        if b.local >= peer || b.running.contains_key(&peer) {
            return;
        }
        let token = b.cancel.child_token();
        b.tasks.spawn(beat(
            b.control.clone(),
            peer,
            b.interval,
            self.heard.clone(),
            token.clone(),
        ));
        b.running.insert(peer, token);
    }

    /// What `peer` said it speaks (identify): without heartbeats it is
    /// never judged silent.
    pub(super) fn identified(&mut self, peer: PeerId, protocols: &[StreamProtocol]) {
        if self.beats.is_some() && !protocols.contains(&ALIVE_PROTOCOL) {
            exempt(&self.heard, peer);
        }
    }

    /// Stops the heartbeats to `peer`, if this side sends them.
    fn stop_beats(&mut self, peer: &PeerId) {
        if let Some(token) = self.beats.as_mut().and_then(|b| b.running.remove(peer)) {
            token.cancel();
        }
    }

    /// `peer` is no longer connected.
    pub(super) fn forget(&mut self, peer: &PeerId) {
        let mut heard = lock(&self.heard);
        heard.at.remove(peer);
        heard.exempt.remove(peer);
        drop(heard);
        self.stop_beats(peer);
    }

    /// The peers of `connected` not heard from within the timeout; each is
    /// reported once (forgotten until heard from again).
    pub(super) fn silent(&mut self, connected: &BTreeSet<PeerId>, now: Instant) -> Vec<PeerId> {
        let timeout = self.timeout;
        let mut heard = lock(&self.heard);
        let silent: Vec<PeerId> = connected
            .iter()
            .filter(|p| {
                !heard.exempt.contains(p)
                    && heard
                        .at
                        .get(p)
                        .is_some_and(|t| now.saturating_duration_since(*t) >= timeout)
            })
            .copied()
            .collect();
        for p in &silent {
            heard.at.remove(p);
        }
        drop(heard);
        for p in &silent {
            self.stop_beats(p);
        }
        silent
    }
}

fn lock(heard: &Mutex<Heard>) -> std::sync::MutexGuard<'_, Heard> {
    heard.lock().expect("not poisoned")
}

/// `peer` sends and answers no heartbeats (identify said so, or it refused
/// the stream): it is never judged silent.
fn exempt(heard: &Mutex<Heard>, peer: PeerId) {
    if lock(heard).exempt.insert(peer) {
        tracing::info!(peer = %peer, "peer has no heartbeats (an older node): its silence is noticed only when TCP gives up");
    }
}

/// Sends a beat to `peer` every `interval` and waits for its echo, on one
/// stream, opened again if it fails, until cancelled (the peer is gone).
async fn beat(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    interval: Duration,
    heard: Arc<Mutex<Heard>>,
    cancel: CancellationToken,
) {
    let pause = || async {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(interval) => true,
        }
    };
    loop {
        let opened = tokio::select! {
            _ = cancel.cancelled() => return,
            s = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, ALIVE_PROTOCOL)) => s,
        };
        let mut stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
                exempt(&heard, peer);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, err = %e, "no heartbeat stream yet");
                if !pause().await {
                    return;
                }
                continue;
            }
            Err(_) => continue, // timed out: try again
        };
        let mut echo = [0u8; 1];
        loop {
            let exchanged = tokio::select! {
                _ = cancel.cancelled() => return,
                r = async {
                    stream.write_all(&[1]).await?;
                    stream.flush().await?;
                    stream.read_exact(&mut echo).await
                } => r,
            };
            if let Err(e) = exchanged {
                tracing::debug!(peer = %peer, err = %e, "heartbeat stream failed");
                break;
            }
            lock(&heard).at.insert(peer, Instant::now());
            if !pause().await {
                return;
            }
        }
        if !pause().await {
            return;
        }
    }
}

/// Echoes each beat `peer` sends on `stream` until the stream ends.
async fn echo(peer: PeerId, mut stream: Stream, heard: &Mutex<Heard>) {
    let mut beat = [0u8; 1];
    while stream.read_exact(&mut beat).await.is_ok() {
        lock(heard).at.insert(peer, Instant::now());
        if stream.write_all(&beat).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// The peer an event shows alive: a connection, an answered ping, a message.
pub(super) fn heard_from(ev: &SwarmEvent<BehaviourEvent>) -> Option<PeerId> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_silent_once_after_the_timeout() {
        let mut l = Liveness::new(Duration::from_secs(8));
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        l.heard(a, t0);
        l.heard(b, t0);
        let connected: BTreeSet<PeerId> = [a, b].into();
        assert!(l.silent(&connected, t0 + Duration::from_secs(7)).is_empty());
        l.heard(b, t0 + Duration::from_secs(7));
        assert_eq!(l.silent(&connected, t0 + Duration::from_secs(8)), vec![a]);
        assert!(
            l.silent(&connected, t0 + Duration::from_secs(9)).is_empty(),
            "once"
        );
        assert_eq!(l.silent(&connected, t0 + Duration::from_secs(15)), vec![b]);
    }
}
