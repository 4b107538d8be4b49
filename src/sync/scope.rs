//! Partial replication: which docs each side of a link holds and is sent.
//!
//! A node holds the docs its `node.replicate` globs cover (all by default)
//! that the grants let it read; system docs always. It tells each peer its
//! globs in a [`Message::Scope`](super::Message::Scope), the first message
//! on every link, and learns theirs the same way. The read rule (from the
//! grants) is the same on every node that has the same access doc, so both
//! sides of a link compute the same *common scope*: the docs both hold. The
//! core sends a peer nothing about a doc outside it (no change, sync message,
//! push, tombstone or digest entry), compares digests over it only, and
//! drops what a peer sends outside its own scope.

use super::core::Core;
use super::replicate::{ReadRule, Replicate};

impl Core {
    /// True if this node holds `doc`: it asked for it and may read it.
    pub(super) fn holds(&self, doc: &str) -> bool {
        self.cfg.replicate.covers(doc)
            && self
                .reads
                .as_ref()
                .is_none_or(|r| r.allows(&self.cfg.local, doc))
    }

    /// True if `peer` is sent `doc`: it told us its scope, asked for the
    /// doc and may read it.
    pub(super) fn wants(&self, peer: &str, doc: &str) -> bool {
        self.peers
            .get(peer)
            .and_then(|p| p.replicate.as_ref())
            .is_some_and(|r| r.covers(doc))
            && self.reads.as_ref().is_none_or(|r| r.allows(peer, doc))
    }

    /// True if both this node and `peer` hold `doc`: their digests and
    /// bucket lists compare those docs only.
    pub(super) fn in_common(&self, peer: &str, doc: &str) -> bool {
        self.holds(doc) && self.wants(peer, doc)
    }

    /// True if this node and `peer` both hold every doc: their digests are
    /// the whole ones.
    pub(super) fn whole(&self, peer: &str) -> bool {
        self.reads.is_none()
            && self.cfg.replicate.is_all()
            && self
                .peers
                .get(peer)
                .and_then(|p| p.replicate.as_ref())
                .is_some_and(Replicate::is_all)
    }

    /// True if every peer but `except` is sent every doc, so a message may
    /// go to all of them (by gossip).
    pub(super) fn all_whole(&self, except: Option<&str>) -> bool {
        self.reads.is_none()
            && self.peers.iter().all(|(k, p)| {
                Some(k.as_str()) == except || p.replicate.as_ref().is_some_and(Replicate::is_all)
            })
    }

    /// Our digest's buckets as `peer` compares them.
    pub(super) fn buckets_for(&self, peer: &str) -> std::borrow::Cow<'_, [u64]> {
        if self.whole(peer) {
            std::borrow::Cow::Borrowed(self.digest.buckets())
        } else {
            std::borrow::Cow::Owned(self.digest.buckets_where(|doc| self.in_common(peer, doc)))
        }
    }

    /// Our entries of `bucket` as `peer` compares them.
    pub(super) fn bucket_for(&self, peer: &str, bucket: u32) -> Vec<(String, u64)> {
        let mut entries = self.digest.bucket_entries(bucket);
        if !self.whole(peer) {
            entries.retain(|(doc, _)| self.in_common(peer, doc));
        }
        entries
    }

    /// Our [`Message::Scope`](super::Message::Scope) for `peer`, asking for
    /// theirs or not.
    pub(super) fn scope_to(&self, peer: String, ask: bool) -> super::Output {
        super::Output::Send {
            to: peer,
            msg: super::Message::Scope {
                replicate: self.cfg.replicate.to_wire(),
                ask,
            },
        }
    }

    /// A peer's [`Message::Scope`](super::Message::Scope): from now on it is
    /// sent what it asked for. A new or changed one starts anti-entropy with
    /// it; one that asks is answered with ours.
    pub(super) fn scope_received<R: rand::Rng>(
        &mut self,
        now: u64,
        rng: &mut R,
        from: &str,
        replicate: Option<Vec<String>>,
        ask: bool,
        out: &mut Vec<super::Output>,
    ) {
        let wire = replicate.clone();
        let scope = match Replicate::from_wire(replicate) {
            Ok(s) => s,
            Err(e) => return self.reject(from, format!("scope: {e}"), out),
        };
        if ask {
            out.push(self.scope_to(from.to_string(), false));
        }
        let Some(p) = self.peers.get_mut(from) else {
            return;
        };
        let known = p.replicate.as_ref().map(Replicate::to_wire);
        if known == Some(wire) {
            return; // as we knew it
        }
        p.replicate = Some(scope);
        self.forget_unwanted(from);
        out.push(self.digest_now(now, rng, from.to_string()));
    }

    /// New read rules (the grants changed): work on docs a peer may no
    /// longer have is dropped, and every peer gets our digest now, so the
    /// docs it may now have start on their way.
    pub(super) fn reads_changed<R: rand::Rng>(
        &mut self,
        now: u64,
        rng: &mut R,
        reads: Option<ReadRule>,
        out: &mut Vec<super::Output>,
    ) {
        self.reads = reads;
        for peer in self.scoped_peers() {
            self.forget_unwanted(&peer);
            out.push(self.digest_now(now, rng, peer));
        }
    }

    /// The peers whose scope is known: those anti-entropy runs with.
    pub(super) fn scoped_peers(&self) -> Vec<String> {
        self.peers
            .iter()
            .filter(|(_, p)| p.replicate.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Drops sessions, queued syncs, pushes and held changes of docs that
    /// `peer` is no longer sent (or this node no longer holds).
    fn forget_unwanted(&mut self, peer: &str) {
        let keep: std::collections::HashSet<String> = {
            let Some(p) = self.peers.get(peer) else {
                return;
            };
            p.sessions
                .keys()
                .chain(&p.pending)
                .chain(&p.to_push)
                .chain(p.held.keys())
                .filter(|d| self.in_common(peer, d))
                .cloned()
                .collect()
        };
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        p.sessions.retain(|d, _| keep.contains(d));
        p.pending.retain(|d| keep.contains(d));
        p.pending_set.retain(|d| keep.contains(d));
        p.push.retain(|d| keep.contains(d));
        p.to_push.retain(|d| keep.contains(d));
        p.to_push_set.retain(|d| keep.contains(d));
        p.held.retain(|d, _| keep.contains(d));
        p.held_count = p.held.values().map(|(_, c)| c.len()).sum();
    }
}
