//! Peers refused for a while after too many rejected inputs.
//!
//! Every input a peer sends that the node refuses (a frame that does not
//! decode, a change that fails its checks, a rate limit overrun) is a strike
//! against it; at `net.max_strikes` it is disconnected and refused for
//! `net.ban_ms`. A misbehaving peer costs itself, not the others. Ended bans
//! are dropped, so the list stays as long as the peers banned right now.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Banned peers and when their ban ends.
pub(super) struct Bans {
    until: HashMap<PeerId, Instant>,
    /// Strikes that ban a peer.
    pub(super) max_strikes: u64,
    /// How long a ban lasts.
    length: Duration,
}

impl Bans {
    pub(super) fn new(max_strikes: u64, length: Duration) -> Bans {
        Bans {
            until: HashMap::new(),
            max_strikes,
            length,
        }
    }

    /// True while `peer` is banned.
    pub(super) fn is_banned(&self, peer: &PeerId) -> bool {
        self.until
            .get(peer)
            .is_some_and(|until| *until > Instant::now())
    }

    /// True if `peer` has a ban on record (ended or not, until pruned).
    pub(super) fn contains(&self, peer: &PeerId) -> bool {
        self.until.contains_key(peer)
    }

    /// Bans `peer` from `now` for the ban length.
    pub(super) fn ban(&mut self, peer: PeerId, now: Instant) {
        self.until.insert(peer, now + self.length);
    }

    /// Forgets the bans that ended before `now`.
    pub(super) fn prune(&mut self, now: Instant) {
        self.until.retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ban_lasts_its_length_and_is_then_pruned() {
        let mut bans = Bans::new(10, Duration::from_secs(300));
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        bans.ban(a, t0);
        assert!(bans.is_banned(&a) && !bans.is_banned(&b));
        bans.prune(t0 + Duration::from_secs(299));
        assert!(bans.contains(&a));
        bans.prune(t0 + Duration::from_secs(301));
        assert!(!bans.contains(&a), "an ended ban is dropped");
    }
}
