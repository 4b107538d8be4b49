//! Who may talk to us, and what a peer's misbehaviour costs it.
//!
//! A peer is admitted while the node is online and the peer is in
//! `net.allow` (any peer, if that is empty) and not banned (see `bans.rs`).
//! Each inbound frame is charged to its peer's rate limit (see `limit.rs`);
//! a rejected input (an undecodable frame, a refused change, a second over
//! the rate limit) is a strike, and at `net.max_strikes` the peer is
//! disconnected and banned for `net.ban_ms`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::{PeerId, Swarm};

use super::bans::Bans;
use super::limit::{Bucket, RateLimit};
use super::peers::NetState;
use super::swarm::Behaviour;

/// Which peers may talk to us now, and the strikes and rate limits that
/// decide it for misbehaving ones.
pub(super) struct Admission {
    /// `net.allow`: if not empty, the only peers admitted.
    allow: BTreeSet<PeerId>,
    /// False while the node is offline: no peer is admitted.
    pub(super) online: bool,
    /// Peers banned for too many strikes.
    pub(super) bans: Bans,
    limit: RateLimit,
    buckets: HashMap<PeerId, Bucket>,
}

impl Admission {
    pub(super) fn new(
        allow: impl IntoIterator<Item = PeerId>,
        online: bool,
        bans: Bans,
        limit: RateLimit,
    ) -> Admission {
        Admission {
            allow: allow.into_iter().collect(),
            online,
            bans,
            limit,
            buckets: HashMap::new(),
        }
    }

    /// True if `peer` may talk to us now: those in `net.allow` (any, if
    /// empty), and none while the node is offline.
    pub(super) fn admits(&self, peer: &PeerId) -> bool {
        self.online && (self.allow.is_empty() || self.allow.contains(peer))
    }

    /// `peer` has no connection left: its rate limit starts afresh.
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.buckets.remove(peer);
    }

    /// Counts a rejected input against `peer`; at `net.max_strikes` the peer is
    /// disconnected and refused for `net.ban_ms` (see `bans.rs`).
    pub(super) fn strike(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        state: &Mutex<NetState>,
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
        if strikes >= self.bans.max_strikes && !self.bans.is_banned(&peer) {
            tracing::warn!(peer = %peer, "too many bad messages: disconnecting and banning the peer");
            self.bans.ban(peer, Instant::now());
            let _ = swarm.disconnect_peer_id(peer);
        }
    }

    /// Charges a frame of `len` bytes from `peer` (by request-response or its
    /// frame stream) to the peer's rate limit; false if it is over, and then
    /// counted: a strike at most once a second (so a peer over the limit for
    /// `net.max_strikes` seconds is banned, while a short burst costs little).
    pub(super) fn admit_frame(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        state: &Mutex<NetState>,
        peer: PeerId,
        len: usize,
    ) -> bool {
        let now = Instant::now();
        let limit = &self.limit;
        let bucket = self
            .buckets
            .entry(peer)
            .or_insert_with(|| limit.bucket(now));
        if limit.admit(bucket, len, now) {
            return true;
        }
        state.lock().expect("not poisoned").peer(peer).rate_limited += 1;
        let strike = bucket
            .struck_at
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if strike {
            bucket.struck_at = Some(now);
            self.strike(swarm, state, peer, "over its rate limit");
        }
        false
    }
}
