//! [`Core`]: the state of the sync protocol on one node (peers, sessions,
//! the digest, held changes) and `handle`, which takes one input and
//! returns the outputs. What each message does is in `received.rs`; sync
//! sessions and whole-doc pushes in `sessions.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};

use automerge::sync;
use rand::RngExt;

use super::digest::{Digest, DocState};
use super::replicate::{ReadRule, Replicate};
use super::types::{
    DocAccess, FastChange, Input, MAX_SEEN, Message, Output, PeerKey, Refusal, SyncConfig,
    SyncStats,
};

pub(super) struct Session {
    pub(super) state: sync::State,
    pub(super) idle_rounds: u32,
    pub(super) last_entry: Option<u64>,
    pub(super) used_at: u64,
}
impl Session {
    pub(super) fn new(now: u64) -> Session {
        Session {
            state: sync::State::new(),
            idle_rounds: 0,
            last_entry: None,
            used_at: now,
        }
    }

    /// A new session with `peer` on `doc`, from the sync state saved when
    /// their last session ended in agreement, if the shell kept one.
    pub(super) fn resumed<D: DocAccess>(now: u64, peer: &str, doc: &str, docs: &mut D) -> Session {
        let mut s = Session::new(now);
        if let Some(saved) = docs.saved_sync_state(peer, doc) {
            s.state = saved;
        }
        s
    }
}
pub(super) struct Peer {
    /// Its [`peer_tag`], computed once: every change sent or relayed checks it.
    pub(super) tag: u64,
    pub(super) sessions: HashMap<String, Session>,
    /// Docs anti-entropy found differing, waiting for a session slot.
    pub(super) pending: std::collections::VecDeque<String>,
    pub(super) pending_set: std::collections::HashSet<String>,
    /// Pending docs the peer lacks entirely, too big to push in one message:
    /// their session starts by sending every change.
    pub(super) push: std::collections::HashSet<String>,
    /// Docs the peer lacks, waiting to be pushed whole.
    pub(super) to_push: std::collections::VecDeque<String>,
    pub(super) to_push_set: std::collections::HashSet<String>,
    pub(super) next_digest_at: u64,
    pub(super) last_in_sync_at: Option<u64>,
    /// Our buckets (as this peer compares them) when it last agreed with
    /// us. While they have not changed, a due digest is skipped: if the
    /// peer changed since, its own digest tells us (see
    /// [`QUIET_DIGESTS`]).
    pub(super) agreed: Option<Vec<u64>>,
    /// Due digests skipped in a row because nothing changed.
    pub(super) skipped: u32,
    /// Since when its digests' busy buckets have been left out (see
    /// [`Core::settle_buckets`]).
    pub(super) settling_since: Option<u64>,
    /// When its connection came up: what changed before then did not go
    /// to it by the fast path, so nothing settles for it (see
    /// [`SETTLE_MS`]).
    pub(super) up_at: u64,
    /// We sent it a digest (not an answer) and no digest from it has come
    /// since: one that comes now crossed ours, and needs no answer (it
    /// gets ours).
    pub(super) awaiting_answer: bool,
    /// Fast-path changes that arrived before their dependencies (frames can
    /// overtake each other), per doc, with when the first was held. They are
    /// retried with the doc's next changes from this peer; a doc still
    /// missing dependencies after [`HOLD_MS`] is synced instead.
    pub(super) held: HashMap<String, (u64, Vec<FastChange>)>,
    /// Changes in `held`, for the cap.
    pub(super) held_count: usize,
    /// It had repair work open at the last tick (see [`CONFIRM_MS`]).
    pub(super) busy: bool,
    /// The docs it asked for, from its [`Message::Scope`]; `None` until
    /// that arrives, and meanwhile it is sent nothing about any doc.
    pub(super) replicate: Option<Replicate>,
}
impl Peer {
    pub(super) fn busy(&self) -> bool {
        !self.sessions.is_empty()
            || !self.pending.is_empty()
            || !self.to_push.is_empty()
            || self.held_count > 0
    }
}
/// When the repair work with a peer is done (or the docs this node lacked
/// have arrived), the next digest goes out within this many milliseconds
/// instead of a whole anti-entropy period later: both sides learn soon that
/// they agree (or what is still missing).
pub const CONFIRM_MS: u64 = 1_000;
/// Due digests skipped in a row while our buckets are as the peer last
/// agreed to; the next one goes out anyway. Either side that changes sends
/// its digest at its next period, so two in-sync nodes that change nothing
/// exchange one digest per this many periods (a check that what each holds
/// still matches, against what no message announced: a restored backup, a
/// bug) instead of one per period.
pub const QUIET_DIGESTS: u32 = 10;
/// A doc whose state changed here this recently is not repaired from a
/// digest comparison (pushed, or synced) yet: a peer that lacks its new
/// state most likely has the fast-path message in flight or in its queue
/// (a loaded receiver can be seconds behind), and a push or session then
/// sends it a second time. The comparison comes again this long after;
/// what the fast path really lost is repaired then. (A hot doc's lost
/// change is found sooner, by its next change's missing dependencies.)
pub const SETTLE_MS: u64 = 1_500;
/// Whether a doc that changed here at `at` (by a write or the fast path)
/// is most likely still on its way by the fast path, at `now`, to a peer
/// whose connection came up at `up_at` (see [`SETTLE_MS`]).
fn carried_by_fast_path(now: u64, at: u64, up_at: u64) -> bool {
    now.saturating_sub(at) < SETTLE_MS && at >= up_at
}
/// Longest a peer's digest comparisons leave busy buckets out (see
/// [`Core::settle_buckets`]).
pub const MAX_SETTLING_MS: u64 = 15_000;
/// How long out-of-order changes wait for their dependencies before the doc
/// is synced with the sender.
pub const HOLD_MS: u64 = 500;
/// Most changes held per peer; past it the doc is synced at once.
pub(super) const MAX_HELD: usize = 4096;
/// Most docs counted as lacking (a bound on what a peer's buckets can make
/// us remember).
pub(super) const MAX_LACKING: usize = 1 << 20;
/// The sync core of one node.
pub struct Core {
    pub(super) cfg: SyncConfig,
    /// The [`peer_tag`] of `cfg.local`, if it is set.
    pub(super) local_tag: Option<u64>,
    pub(super) digest: Digest,
    pub(super) peers: BTreeMap<PeerKey, Peer>,
    pub(super) stats: SyncStats,
    /// Pushes left in this tick (see `SyncConfig::max_pushes_per_tick`).
    pub(super) push_budget: usize,
    /// Docs a peer listed (in a bucket) that we do not hold yet: what a new
    /// node still has to receive. Pruned every tick.
    pub(super) lacking: HashSet<String>,
    /// The grants' read rules; `None`: every peer may read every doc.
    pub(super) reads: Option<ReadRule>,
    /// Docs whose state changed here within [`SETTLE_MS`], and when.
    pub(super) recent: HashMap<String, u64>,
}

impl Core {
    /// A core that knows `docs` in their current states.
    pub fn new(cfg: SyncConfig, docs: impl IntoIterator<Item = (String, DocState)>) -> Core {
        let cfg_pushes = cfg.max_pushes_per_tick;
        let mut digest = Digest::new(cfg.buckets);
        for (doc, state) in docs {
            digest.set(&doc, &state);
        }
        Core {
            local_tag: (!cfg.local.is_empty()).then(|| peer_tag(&cfg.local)),
            cfg,
            digest,
            peers: BTreeMap::new(),
            stats: SyncStats::default(),
            push_budget: cfg_pushes,
            lacking: HashSet::new(),
            reads: None,
            recent: HashMap::new(),
        }
    }

    /// Rebuilds the digest from the docs' stored states, e.g. after a failed
    /// store write left it claiming changes that were never stored; open
    /// sessions restart from fresh states.
    pub fn reset_digest(&mut self, docs: impl IntoIterator<Item = (String, DocState)>) {
        let mut digest = Digest::new(self.cfg.buckets);
        for (doc, state) in docs {
            digest.set(&doc, &state);
        }
        self.digest = digest;
        for p in self.peers.values_mut() {
            p.sessions.clear();
        }
    }

    /// The digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Counters.
    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// Connected peers.
    pub fn peers(&self) -> impl Iterator<Item = &PeerKey> {
        self.peers.keys()
    }

    /// When a digest from `peer` last matched ours, if ever.
    pub fn last_in_sync(&self, peer: &str) -> Option<u64> {
        self.peers.get(peer).and_then(|p| p.last_in_sync_at)
    }

    /// Docs peers hold that we do not yet: they are on their way (pushed
    /// whole by the peers that hold them).
    pub fn lacking(&self) -> usize {
        self.lacking.len()
    }

    /// Number of docs syncing with `peer`: open sessions plus docs waiting for one.
    pub fn open_sessions(&self, peer: &str) -> usize {
        self.peers
            .get(peer)
            .map_or(0, |p| p.sessions.len() + p.pending.len() + p.to_push.len())
    }

    /// Handles one input at time `now` (milliseconds on any monotonic clock).
    pub fn handle<R: rand::Rng, D: DocAccess>(
        &mut self,
        now: u64,
        rng: &mut R,
        input: Input,
        docs: &mut D,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::PeerUp(peer) => {
                let next = now + self.jittered(rng);
                self.peers.insert(
                    peer.clone(),
                    Peer {
                        tag: peer_tag(&peer),
                        sessions: HashMap::new(),
                        pending: Default::default(),
                        pending_set: Default::default(),
                        push: Default::default(),
                        to_push: Default::default(),
                        to_push_set: Default::default(),
                        next_digest_at: next,
                        last_in_sync_at: None,
                        agreed: None,
                        skipped: 0,
                        settling_since: None,
                        up_at: now,
                        awaiting_answer: false,
                        held: HashMap::new(),
                        held_count: 0,
                        busy: false,
                        replicate: None,
                    },
                );
                // Our scope first, asking for theirs (the peer may not see
                // this link as new: it then sends no scope of its own); our
                // digest follows theirs (it is compared over the docs both
                // hold).
                out.push(self.scope_to(peer, true));
            }
            Input::Reads(reads) => self.reads_changed(now, rng, reads, &mut out),
            Input::PeerDown(peer) => {
                self.peers.remove(&peer);
            }
            Input::Tick => {
                // A session that heard nothing for a while lost a message (or
                // the peer finished without telling): start it over, in turn.
                let stale_before = now.saturating_sub(self.cfg.session_timeout_ms);
                for p in self.peers.values_mut() {
                    let stale: Vec<String> = p
                        .sessions
                        .iter()
                        .filter(|(_, s)| s.used_at < stale_before)
                        .map(|(d, _)| d.clone())
                        .collect();
                    for doc in stale {
                        p.sessions.remove(&doc);
                        self.stats.sessions_reset += 1;
                        if p.pending_set.insert(doc.clone()) {
                            p.pending.push_back(doc);
                        }
                    }
                }
                let peers: Vec<PeerKey> = self.peers.keys().cloned().collect();
                for peer in &peers {
                    self.expire_held(now, peer, docs, &mut out);
                    self.start_pending(now, peer, docs, &mut out);
                }
                self.push_budget = self.cfg.max_pushes_per_tick;
                self.recent
                    .retain(|_, at| now.saturating_sub(*at) < SETTLE_MS);
                let lacked = !self.lacking.is_empty();
                if lacked {
                    let digest = &self.digest;
                    self.lacking.retain(|doc| digest.entry(doc).is_none());
                }
                let arrived = lacked && self.lacking.is_empty();
                for p in self.peers.values_mut() {
                    let busy = p.busy();
                    if (p.busy && !busy) || arrived {
                        p.next_digest_at = p.next_digest_at.min(now + CONFIRM_MS);
                    }
                    p.busy = busy;
                }
                for peer in &peers {
                    self.push_docs(now, peer, docs, &mut out);
                }
                let due: Vec<PeerKey> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.next_digest_at <= now && p.replicate.is_some())
                    .map(|(k, _)| k.clone())
                    .collect();
                for peer in due {
                    if self.quiet(&peer) {
                        let next = now + self.jittered(rng);
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.next_digest_at = next;
                            p.skipped += 1;
                        }
                        self.stats.digests_skipped += 1;
                        continue;
                    }
                    out.push(self.digest_now(now, rng, peer));
                }
            }
            Input::DigestNow => {
                for peer in self.scoped_peers() {
                    out.push(self.digest_now(now, rng, peer));
                }
            }
            Input::LocalChange {
                doc,
                changes,
                sigs,
                state,
                ack,
            } => {
                self.set_state(now, &doc, &state, true);
                let write = LocalWrite {
                    doc,
                    changes,
                    sigs,
                    ack,
                };
                self.send_local(now, write, docs, &mut out);
            }
            Input::Broadcast {
                doc,
                changes,
                sigs,
                ack,
            } => {
                let write = LocalWrite {
                    doc,
                    changes,
                    sigs,
                    ack,
                };
                self.send_local(now, write, docs, &mut out);
            }
            Input::LocalMerge { doc, state } => {
                self.set_state(now, &doc, &state, false);
                self.sync_with_others(now, "", &doc, docs, &mut out);
            }
            Input::LocalDelete { doc } => {
                self.set_state(now, &doc, &DocState::Deleted, true);
                for p in self.peers.values_mut() {
                    p.sessions.remove(&doc);
                }
                let sig = docs.tombstone_sig(&doc);
                self.broadcast(Message::Deleted { doc, sig }, None, &mut out);
            }
            Input::SendFailed { peer, doc } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.sessions.remove(&doc);
                    if p.pending_set.insert(doc.clone()) {
                        p.pending.push_back(doc);
                    }
                    self.start_pending(now, &peer, docs, &mut out);
                }
            }
            Input::ReceivedChanges { from, doc, changes } => {
                if !self.peers.contains_key(&from) {
                    out.extend(self.handle(now, rng, Input::PeerUp(from.clone()), docs));
                }
                self.received_changes(now, from, doc, changes, docs, &mut out);
            }
            Input::Received { from, msg } => {
                if !self.peers.contains_key(&from) {
                    // The shell delivers messages only from connected peers, so
                    // this one's PeerUp was lost (a full queue): register it now.
                    out.extend(self.handle(now, rng, Input::PeerUp(from.clone()), docs));
                }
                if let Message::Scope { replicate, ask } = msg {
                    self.scope_received(now, rng, &from, replicate, ask, &mut out);
                } else {
                    self.received(now, from, msg, docs, &mut out);
                }
            }
        }
        out
    }

    /// Sends a local write's changes: each on the fast path to the peers
    /// that hold its doc, or, when one is too big for it, a sync session
    /// with every peer.
    fn send_local<D: DocAccess>(
        &mut self,
        now: u64,
        write: LocalWrite,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let LocalWrite {
            doc,
            changes,
            sigs,
            ack,
        } = write;
        if changes
            .iter()
            .all(|c| c.len() <= self.cfg.max_gossip_change_bytes)
        {
            let mut seen: Vec<u64> = self.local_tag.into_iter().collect();
            add_tags(
                &mut seen,
                self.peers
                    .iter()
                    .filter(|(k, _)| self.wants(k, &doc))
                    .map(|(_, p)| p.tag),
            );
            let last = changes.len().saturating_sub(1);
            let mut sigs = sigs.into_iter();
            for (i, change) in changes.into_iter().enumerate() {
                let msg = Message::Change {
                    doc: doc.clone(),
                    change,
                    sig: sigs.next().unwrap_or_default(),
                    // Replicas confirm the write's own change, which
                    // they can apply only after its geneses.
                    ack: ack && i == last,
                    seen: seen.clone(),
                };
                self.broadcast(msg, None, out);
            }
        } else {
            let peers: Vec<PeerKey> = self.peers.keys().cloned().collect();
            for peer in peers {
                self.sync_doc(now, &peer, &doc, true, docs, out);
            }
        }
    }

    /// Takes `doc`'s new state into the digest; returns whether it changed.
    /// With `fast` (a local write or delete, or a change that came by the
    /// fast path: peers are likely getting it by the fast path too) it
    /// notes when (see [`SETTLE_MS`]); not for what came by repair (a
    /// pushed doc, a sync session), which peers are not being sent.
    pub(super) fn set_state(&mut self, now: u64, doc: &str, state: &DocState, fast: bool) -> bool {
        let changed = self.digest.set(doc, state);
        if changed && fast {
            self.recent.insert(doc.to_string(), now);
        }
        changed
    }

    /// Moves the next digest to every peer but `except` to within
    /// [`CONFIRM_MS`].
    pub(super) fn digests_soon(&mut self, now: u64, except: &str) {
        for (k, p) in self.peers.iter_mut() {
            if k.as_str() != except {
                p.next_digest_at = p.next_digest_at.min(now + CONFIRM_MS);
            }
        }
    }

    /// Takes out of `differing` (a digest comparison with `peer`) the
    /// buckets that hold a doc changed here within [`SETTLE_MS`]: while
    /// writes stream in, nearly every bucket differs by what is still in
    /// flight, and answering each with its entries (a few KB) cost more
    /// than the writes. The peer's next digest is moved to [`SETTLE_MS`]
    /// from now. Not once the peer's buckets have been put off for
    /// [`MAX_SETTLING_MS`]: a change the fast path lost in a bucket that
    /// never goes quiet is found then. Returns how many were taken out.
    pub(super) fn settle_buckets(
        &mut self,
        now: u64,
        peer: &str,
        differing: &mut Vec<u32>,
    ) -> usize {
        let Some(p) = self.peers.get_mut(peer) else {
            return 0;
        };
        let overdue = p
            .settling_since
            .is_some_and(|since| now.saturating_sub(since) >= MAX_SETTLING_MS);
        if differing.is_empty() || self.recent.is_empty() || overdue {
            p.settling_since = None;
            return 0;
        }
        let n = self.digest.buckets().len() as u32;
        let up_at = p.up_at;
        let hot: HashSet<u32> = self
            .recent
            .iter()
            .filter(|(_, at)| carried_by_fast_path(now, **at, up_at))
            .map(|(doc, _)| super::digest::bucket_of(doc, n))
            .collect();
        let before = differing.len();
        differing.retain(|b| !hot.contains(b));
        let settling = before - differing.len();
        if settling == 0 {
            p.settling_since = None;
        } else {
            p.settling_since.get_or_insert(now);
            p.next_digest_at = p.next_digest_at.min(now + SETTLE_MS);
            self.stats.buckets_settling += settling as u64;
        }
        settling
    }

    /// Whether `doc` changed here within [`SETTLE_MS`] of `now`, while
    /// `peer` was connected (so the fast path is carrying it there).
    pub(super) fn settling(&self, now: u64, peer: &str, doc: &str) -> bool {
        let up_at = self.peers.get(peer).map_or(u64::MAX, |p| p.up_at);
        self.recent
            .get(doc)
            .is_some_and(|at| carried_by_fast_path(now, *at, up_at))
    }

    /// Queues `msg` for every peer but `except` that is sent its doc: to
    /// all by one broadcast when every one of them holds every doc, else to
    /// each that holds it. Nothing when there is nobody to send it to (a
    /// lone node pays nothing for the fast path).
    pub(super) fn broadcast(&self, msg: Message, except: Option<PeerKey>, out: &mut Vec<Output>) {
        if !self.peers.keys().any(|p| Some(p) != except.as_ref()) {
            return;
        }
        if self.all_whole(except.as_deref()) {
            out.push(Output::Broadcast { msg, except });
            return;
        }
        let doc = msg.doc().unwrap_or_default();
        for peer in self.peers.keys() {
            if Some(peer) != except.as_ref() && self.wants(peer, doc) {
                out.push(Output::Send {
                    to: peer.clone(),
                    msg: msg.clone(),
                });
            }
        }
    }

    pub(super) fn jittered<R: rand::Rng>(&self, rng: &mut R) -> u64 {
        let base = self.cfg.anti_entropy_ms.max(1);
        let quarter = base / 4;
        base - quarter + rng.random_range(0..=quarter * 2)
    }

    /// True when a due digest to `peer` can be skipped: our buckets are
    /// as it last agreed to, and fewer than [`QUIET_DIGESTS`] were
    /// skipped in a row.
    fn quiet(&self, peer: &str) -> bool {
        let Some(p) = self.peers.get(peer) else {
            return false;
        };
        p.skipped + 1 < QUIET_DIGESTS
            && p.agreed
                .as_deref()
                .is_some_and(|a| a == &*self.buckets_for(peer))
    }

    /// Our digest for `peer`, as this round's: its next one is a full
    /// period away.
    pub(super) fn digest_now<R: rand::Rng>(
        &mut self,
        now: u64,
        rng: &mut R,
        peer: PeerKey,
    ) -> Output {
        let next = now + self.jittered(rng);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.next_digest_at = next;
            p.awaiting_answer = true;
            p.skipped = 0;
        }
        self.digest_to(peer, false)
    }

    /// Our digest for `peer` (compared over the docs both hold); `answer`
    /// when it answers theirs.
    pub(super) fn digest_to(&self, peer: PeerKey, answer: bool) -> Output {
        let buckets = self.buckets_for(&peer).into_owned();
        Output::Send {
            to: peer,
            msg: Message::Digest { buckets, answer },
        }
    }

    /// A peer's input the shell did not take: an invalid one is charged to
    /// the peer; a local failure is not its fault (the input comes again
    /// with sync once this node can take it).
    pub(super) fn refuse(&mut self, peer: &str, what: String, why: Refusal, out: &mut Vec<Output>) {
        match why {
            Refusal::Invalid(e) => self.reject(peer, format!("{what}: {e}"), out),
            Refusal::Local(e) => {
                self.stats.local_failures += 1;
                tracing::warn!(peer, "{what} not taken: this node failed: {e}");
            }
        }
    }

    pub(super) fn reject(&mut self, peer: &str, reason: String, out: &mut Vec<Output>) {
        self.stats.rejected += 1;
        out.push(Output::Rejected {
            peer: peer.to_string(),
            reason,
        });
    }
}

/// Most peer tags a [`Message::Change`] carries: past it, relays may send a
/// change to peers that already got it (harmless, only wasteful).
/// A short, stable name of a peer for [`Message::Change`]'s `seen` list.
pub fn peer_tag(peer: &str) -> u64 {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(peer.as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}
/// Adds `tags` to `seen`, up to [`MAX_SEEN`].
pub(super) fn add_tags(seen: &mut Vec<u64>, tags: impl Iterator<Item = u64>) {
    for tag in tags {
        if seen.len() >= MAX_SEEN {
            return;
        }
        if !seen.contains(&tag) {
            seen.push(tag);
        }
    }
}
/// True when the peer's last message said its heads are `ours` (sorted) and
/// that it knows we share them.
pub(super) fn they_know_we_agree(state: &sync::State, ours: &[automerge::ChangeHash]) -> bool {
    let sorted = |h: &[automerge::ChangeHash]| {
        let mut h = h.to_vec();
        h.sort();
        h
    };
    let heads_equal = state
        .their_heads
        .as_deref()
        .is_some_and(|t| sorted(t) == ours);
    let knows = state
        .their_have
        .as_deref()
        .is_some_and(|have| have.iter().any(|h| sorted(&h.last_sync) == ours));
    heads_equal && knows
}
/// An output sending one sync message for `doc` to `peer`.
pub(super) fn sync_message(peer: &str, doc: &str, (data, sigs): (Vec<u8>, Vec<u8>)) -> Output {
    Output::Send {
        to: peer.to_string(),
        msg: Message::Sync {
            doc: doc.to_string(),
            data,
            sigs,
        },
    }
}

/// A local write's changes on their way to peers (see `send_local`).
struct LocalWrite {
    doc: String,
    changes: Vec<Vec<u8>>,
    sigs: Vec<Vec<u8>>,
    ack: bool,
}
