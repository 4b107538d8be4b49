//! Which connected peers have fallen silent.
//!
//! libp2p's ping stays quiet about the first failure in a row, so a peer that
//! stops answering (a partition, a pulled cable, a stopped process whose
//! kernel keeps its TCP connections up) would show as connected for two
//! ping rounds and two timeouts. The node judges silence itself instead:
//! every ping answered and every message received counts as hearing from the
//! peer, and a peer not heard from for `net.peer_timeout_ms` is gone.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// When each connected peer was last heard from.
pub(super) struct Liveness {
    heard: HashMap<PeerId, Instant>,
    timeout: Duration,
}

impl Liveness {
    pub(super) fn new(timeout: Duration) -> Liveness {
        Liveness {
            heard: HashMap::new(),
            timeout,
        }
    }

    /// How long a peer may stay silent.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `peer` said something (or just connected).
    pub(super) fn heard(&mut self, peer: PeerId, now: Instant) {
        self.heard.insert(peer, now);
    }

    /// `peer` is no longer connected.
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.heard.remove(peer);
    }

    /// The peers of `connected` not heard from within the timeout; each is
    /// reported once (forgotten until heard from again).
    pub(super) fn silent(&mut self, connected: &BTreeSet<PeerId>, now: Instant) -> Vec<PeerId> {
        let timeout = self.timeout;
        let silent: Vec<PeerId> = connected
            .iter()
            .filter(|p| {
                self.heard
                    .get(p)
                    .is_some_and(|t| now.saturating_duration_since(*t) >= timeout)
            })
            .copied()
            .collect();
        for p in &silent {
            self.heard.remove(p);
        }
        silent
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
