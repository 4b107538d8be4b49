//! One connection per peer.
//!
//! Two nodes that list each other as peers (or find each other by mDNS at
//! the same moment) both dial, and each dial succeeds: two connections, each
//! with its own pings, identify and Kademlia traffic, for the price of one.
//! Once a peer has a connection dialed by each side, both sides close the
//! one dialed by the larger peer id: they decide alike without a word, so
//! exactly one connection stays. Closing it loses nothing the sync core
//! keeps track of: the peer stays connected, and a frame lost with the
//! closed connection is repaired like any lost message.

use std::collections::HashMap;

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;

/// Each peer's open connections, and who dialed each.
#[derive(Default)]
pub(super) struct Conns {
    by_peer: HashMap<PeerId, Vec<(ConnectionId, PeerId)>>,
}

impl Conns {
    /// Connection `id` to `peer` is up, dialed by us (`we_dialed`) or by
    /// the peer. Returns the connections to `peer` to close: those dialed by
    /// the larger of the two peer ids, once one dialed by the smaller is up.
    pub(super) fn established(
        &mut self,
        local: PeerId,
        peer: PeerId,
        id: ConnectionId,
        we_dialed: bool,
    ) -> Vec<ConnectionId> {
        let dialer = if we_dialed { local } else { peer };
        let conns = self.by_peer.entry(peer).or_default();
        conns.push((id, dialer));
        let keep = local.min(peer);
        if !conns.iter().any(|(_, d)| *d == keep) {
            return Vec::new();
        }
        conns
            .iter()
            .filter(|(_, d)| *d != keep)
            .map(|(c, _)| *c)
            .collect()
    }

    /// Connection `id` to `peer` closed.
    pub(super) fn closed(&mut self, peer: PeerId, id: ConnectionId) {
        if let Some(conns) = self.by_peer.get_mut(&peer) {
            conns.retain(|(c, _)| *c != id);
            if conns.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_close_the_connection_dialed_by_the_larger_id() {
        let (a, b) = {
            let (x, y) = (PeerId::random(), PeerId::random());
            (x.min(y), x.max(y))
        };
        let (c1, c2) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        // c1 dialed by a, c2 by b, seen by each side in either order.
        let mut on_a = Conns::default();
        assert!(on_a.established(a, b, c2, false).is_empty());
        assert_eq!(on_a.established(a, b, c1, true), [c2]);
        let mut on_b = Conns::default();
        assert!(on_b.established(b, a, c2, true).is_empty());
        assert_eq!(on_b.established(b, a, c1, false), [c2]);
        let mut on_b = Conns::default();
        assert!(on_b.established(b, a, c1, false).is_empty());
        assert_eq!(on_b.established(b, a, c2, true), [c2]);

        // A connection dialed by b alone stays; a later one of a's
        // replaces it.
        on_a.closed(b, c2);
        on_a.closed(b, c1);
        let (c3, c4) = (
            ConnectionId::new_unchecked(3),
            ConnectionId::new_unchecked(4),
        );
        assert!(on_a.established(a, b, c3, false).is_empty());
        assert_eq!(on_a.established(a, b, c4, true), [c3]);
        on_a.closed(b, c3);
        on_a.closed(b, c4);
        assert!(on_a.by_peer.is_empty());
    }
}
