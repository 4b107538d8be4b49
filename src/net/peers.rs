//! The peer table: what the node knows of each peer ([`PeerInfo`]: its
//! addresses, whether it is connected, its strikes and traffic), and the
//! message counts by kind, in [`NetState`], which the event loop writes and
//! the API reads (`/v1/peers`, `/v1/status`, `/metrics`).
//!
//! The table is bounded: it keeps every connected peer and every static peer
//! (`net.peers`), and at most `net.max_known_peers` others (by default
//! [`MAX_KNOWN_PEERS`]), dropping the longest gone first.

use std::collections::{BTreeMap, HashMap, HashSet};

use libp2p::PeerId;
use serde::Serialize;

use crate::sync::Message;

/// The default of `net.max_known_peers`: most disconnected peers (static
/// peers aside) kept in the peer table; past
/// it, the peers gone longest are forgotten (a forgotten peer that comes back
/// starts a new entry: its strikes and traffic start from zero).
pub const MAX_KNOWN_PEERS: usize = 1024;

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
    pub(super) fn new(peer: PeerId) -> PeerInfo {
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
#[derive(Debug)]
pub struct NetState {
    /// Our listen addresses with `/p2p/<peer id>`.
    pub listen_addrs: Vec<String>,
    /// Known peers: the connected and static ones, and at most
    /// `net.max_known_peers` others.
    pub peers: HashMap<PeerId, PeerInfo>,
    /// Messages sent, by kind ([`Message::kind`]): one per recipient, and
    /// one per gossipsub publish.
    pub sent: BTreeMap<&'static str, u64>,
    /// Messages received and decoded, by kind.
    pub received: BTreeMap<&'static str, u64>,
    /// The peers of `peers` not connected, by when they went (or were first
    /// heard of): smaller is longer ago.
    gone: HashMap<PeerId, u64>,
    /// The next value of `gone`.
    next_gone: u64,
    /// Static peers (`net.peers`) whose id is known: never dropped.
    pinned: HashSet<PeerId>,
    /// Most disconnected, unpinned peers kept.
    max_known: usize,
}

impl Default for NetState {
    fn default() -> NetState {
        NetState::with_limit(MAX_KNOWN_PEERS)
    }
}

impl NetState {
    /// An empty table keeping at most `max_known` disconnected peers.
    pub(super) fn with_limit(max_known: usize) -> NetState {
        NetState {
            listen_addrs: Vec::new(),
            peers: HashMap::new(),
            sent: BTreeMap::new(),
            received: BTreeMap::new(),
            gone: HashMap::new(),
            next_gone: 0,
            pinned: HashSet::new(),
            max_known,
        }
    }

    /// The entry of `peer`, made (not connected) if it is new.
    pub(super) fn peer(&mut self, peer: PeerId) -> &mut PeerInfo {
        if let std::collections::hash_map::Entry::Vacant(e) = self.peers.entry(peer) {
            e.insert(PeerInfo::new(peer));
            self.went(peer);
            self.prune();
        }
        self.peers
            .get_mut(&peer)
            .expect("just made, and the newest gone is pruned last")
    }

    /// `peer` is connected: its entry is kept while it is.
    pub(super) fn up(&mut self, peer: PeerId) -> &mut PeerInfo {
        self.peer(peer);
        self.gone.remove(&peer);
        let info = self.peers.get_mut(&peer).expect("made above");
        info.connected = true;
        info
    }

    /// `peer` is no longer connected: it counts towards the bound from now.
    pub(super) fn down(&mut self, peer: PeerId) {
        if let Some(info) = self.peers.get_mut(&peer) {
            info.connected = false;
            self.went(peer);
            self.prune();
        }
    }

    /// `peer` is a static peer: its entry is never dropped.
    pub(super) fn pin(&mut self, peer: PeerId) {
        self.pinned.insert(peer);
    }

    fn went(&mut self, peer: PeerId) {
        self.gone.insert(peer, self.next_gone);
        self.next_gone += 1;
    }

    /// Drops the disconnected, unpinned peers gone longest, past the bound.
    fn prune(&mut self) {
        let mut gone: Vec<(u64, PeerId)> = self
            .gone
            .iter()
            .filter(|(p, _)| !self.pinned.contains(p))
            .map(|(p, at)| (*at, *p))
            .collect();
        if gone.len() <= self.max_known {
            return;
        }
        gone.sort_unstable();
        let excess = gone.len() - self.max_known;
        for (_, peer) in gone.into_iter().take(excess) {
            self.gone.remove(&peer);
            self.peers.remove(&peer);
        }
    }

    /// Counts `msgs` (decoded, by kind) and `bytes` received from `peer`.
    pub(super) fn count_received<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_table_keeps_connected_and_static_peers_and_the_latest_gone() {
        let mut st = NetState::with_limit(2);
        let (stat, live) = (PeerId::random(), PeerId::random());
        st.pin(stat);
        st.up(stat);
        st.up(live);
        let gone: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        for p in &gone {
            st.up(*p);
        }
        st.down(stat);
        for p in &gone {
            st.down(*p);
        }
        // Heard of but never connected: counts as gone now.
        let stranger = PeerId::random();
        st.peer(stranger).rejected += 1;
        assert_eq!(st.peers.len(), 4, "{:?}", st.peers.keys());
        for p in [stat, live, gone[4], stranger] {
            assert!(st.peers.contains_key(&p), "{p} kept");
        }
        assert!(st.peers[&live].connected && !st.peers[&stat].connected);
        // Back again: kept while connected, whatever the bound.
        st.up(gone[4]);
        for _ in 0..10 {
            st.peer(PeerId::random());
        }
        assert!(st.peers[&gone[4]].connected && st.peers.contains_key(&stat));
        assert_eq!(st.peers.len(), 3 + 2);
        assert!(st.gone.len() <= 2 + 1, "bookkeeping is bounded too");
    }

    #[test]
    fn the_default_bound_is_max_known_peers() {
        let mut st = NetState::default();
        for _ in 0..MAX_KNOWN_PEERS + 10 {
            let p = PeerId::random();
            st.up(p);
            st.down(p);
        }
        assert_eq!(st.peers.len(), MAX_KNOWN_PEERS);
    }
}
