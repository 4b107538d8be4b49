//! The sync protocol core: sans-IO. It owns per-peer sync sessions and the
//! anti-entropy digest, takes `(now, input)` and returns outputs (messages to
//! send); it does no I/O, reads no clock and spawns nothing, so a seeded
//! simulator drives it in `tests/sim.rs` exactly as the network shell will.
//!
//! Documents are reached through [`DocAccess`], which the shell implements over
//! the document service (and the simulator over in-memory Automerge docs).
//!
//! # Protocol
//!
//! - **Fast path.** A local change is broadcast as [`Message::Change`],
//!   listing (as [`peer_tag`]s) the origin and the peers it goes to. A
//!   receiver that has its dependencies applies it and relays it to those of
//!   its other peers that are not listed, adding them to the list (once: a
//!   change it already has is not relayed again). In a full mesh nothing is
//!   relayed; a peer that reaches the origin only through others still gets
//!   it. A receiver that lacks the dependencies starts an Automerge sync
//!   session for that doc with the sender. A change sent with `ack` asks its
//!   receivers to confirm with [`Message::Have`] once it is durable.
//! - **Repair path.** [`Message::Sync`] carries the Automerge sync protocol for
//!   one doc; each (peer, doc) pair has its own `sync::State`. A session ends
//!   when neither side has anything to send. A session that goes
//!   `max_idle_rounds` rounds without our heads moving is reset and counted,
//!   so sync never silently sticks.
//! - **Anti-entropy.** On connect and every `anti_entropy_ms` (jittered), a node
//!   sends its [`Message::Digest`]: bucket hashes over `h(doc id, heads)`. The
//!   receiver answers each differing bucket with [`Message::Bucket`] (its docs
//!   and their hashes); the first side then syncs every doc whose hash differs,
//!   from a fresh sync state, since a difference after a loss may mean a stale
//!   one, and pushes whole every doc the other side lacks as a
//!   [`Message::Doc`] (its stored bytes, no session and no answer; at most
//!   `max_pushes_per_tick` per tick, so a catch-up cannot flood the queues;
//!   a doc over `max_push_bytes` goes by a primed session whose first message
//!   carries every change instead). Docs only the other side holds
//!   are left to it to push; the bucket is sent back (once) so it knows. Lost
//!   messages, partitions and restarts are all repaired this way.
//! - **Passing on.** Changes merged by sync (not by the fast path) are synced
//!   on to the node's other peers, so a change repaired into one node reaches
//!   the rest of a connected mesh without waiting for their anti-entropy.
//! - **Saved sync state.** When a session ends with both sides at the same
//!   heads, the shell may keep that state ([`DocAccess::save_sync_state`]);
//!   a later session with the peer (after a restart, say) starts from it, so
//!   its first messages cover only changes since then.
//! - **Tombstones.** A deleted doc is in the digest as deleted; a peer holding it
//!   live is told with [`Message::Deleted`] and deletes it too. Changes and sync
//!   messages for a deleted doc are ignored, so it does not come back.
//!
//! # Example: two cores converge
//!
//! See `tests/sim.rs` for a full simulator; in short, the shell loops:
//! `for out in core.handle(now, &mut rng, input, &mut docs) { deliver(out) }`.

pub mod codec;
pub mod digest;

use std::collections::{BTreeMap, HashMap, HashSet};

use automerge::sync;
use rand::RngExt;

use digest::entry_hash;
pub use digest::{Digest, DocState};

/// A peer, as the shell names it (a libp2p peer id in the node).
pub type PeerKey = String;

/// Sync core settings.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Number of digest buckets.
    pub buckets: u32,
    /// Milliseconds between anti-entropy digests to each peer (jittered by
    /// up to a quarter either way).
    pub anti_entropy_ms: u64,
    /// Sync rounds for one doc without our heads moving before the session is
    /// reset.
    pub max_idle_rounds: u32,
    /// Largest change sent on the fast path; bigger ones go by sync.
    pub max_gossip_change_bytes: usize,
    /// Most entries accepted in one [`Message::Bucket`].
    pub max_bucket_entries: usize,
    /// Sync sessions this node starts at once with one peer; docs found
    /// differing beyond that wait their turn.
    pub max_sessions_per_peer: usize,
    /// A session that hears nothing from the peer for this long is restarted
    /// from a fresh state (its message or the answer was lost).
    pub session_timeout_ms: u64,
    /// Docs pushed whole (to peers that lack them) per tick, over all peers.
    pub max_pushes_per_tick: usize,
    /// Largest doc pushed whole in one message; bigger ones sync in rounds.
    pub max_push_bytes: usize,
    /// This node, as its peers name it (its tag goes into the changes it
    /// originates, so relays do not send them back); empty if unknown.
    pub local: PeerKey,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            buckets: 64,
            anti_entropy_ms: 30_000,
            max_idle_rounds: 16,
            max_gossip_change_bytes: 64 * 1024,
            max_bucket_entries: 100_000,
            max_sessions_per_peer: 64,
            session_timeout_ms: 5_000,
            max_pushes_per_tick: 1024,
            max_push_bytes: 1 << 20,
            local: PeerKey::new(),
        }
    }
}

impl Message {
    /// The message's kind, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Change { .. } => "change",
            Message::Digest { .. } => "digest",
            Message::Bucket { .. } => "bucket",
            Message::Sync { .. } => "sync",
            Message::Deleted { .. } => "deleted",
            Message::Doc { .. } => "doc",
            Message::Have { .. } => "have",
        }
    }

    /// The doc the message is about, if it is about one.
    pub fn doc(&self) -> Option<&str> {
        match self {
            Message::Change { doc, .. }
            | Message::Sync { doc, .. }
            | Message::Deleted { doc }
            | Message::Doc { doc, .. }
            | Message::Have { doc, .. } => Some(doc),
            Message::Digest { .. } | Message::Bucket { .. } => None,
        }
    }
}

/// A message between two peers.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// One change of one doc (fast path).
    Change {
        /// The doc.
        doc: String,
        /// The raw Automerge change.
        change: Vec<u8>,
        /// The writer waits for replicas: receivers confirm with
        /// [`Message::Have`] once the change is durable.
        ack: bool,
        /// [`peer_tag`]s of the peers that already have it or are being sent
        /// it (the origin and its peers, then each relay's targets): a relay
        /// skips them. At most [`MAX_SEEN`].
        seen: Vec<u64>,
    },
    /// The sender's digest.
    Digest {
        /// Bucket hashes.
        buckets: Vec<u64>,
    },
    /// The sender's docs in one bucket, answering a digest that differed there.
    Bucket {
        /// The bucket.
        bucket: u32,
        /// (doc id, entry hash), sorted by id.
        entries: Vec<(String, u64)>,
        /// The sender wants the receiver's entries for this bucket in return
        /// (so it can push the docs the receiver lacks).
        answer: bool,
    },
    /// An Automerge sync message for one doc.
    Sync {
        /// The doc.
        doc: String,
        /// The encoded `automerge::sync::Message`.
        data: Vec<u8>,
    },
    /// The doc is deleted on the sender.
    Deleted {
        /// The doc.
        doc: String,
    },
    /// A whole doc, pushed to a peer that lacks it: Automerge chunks (a saved
    /// doc and/or changes) that the receiver merges. Needs no answer.
    Doc {
        /// The doc.
        doc: String,
        /// The chunks.
        data: Vec<u8>,
    },
    /// The sender has stored (flushed) the doc at these heads, after merging
    /// changes it got from the receiver: a confirmation for replica acks.
    Have {
        /// The doc.
        doc: String,
        /// The sender's heads.
        heads: Vec<automerge::ChangeHash>,
    },
}

/// An event for the core.
#[derive(Debug, Clone)]
pub enum Input {
    /// A connection to a peer is up.
    PeerUp(PeerKey),
    /// The connection to a peer is gone.
    PeerDown(PeerKey),
    /// A message arrived.
    Received {
        /// The sender.
        from: PeerKey,
        /// The message.
        msg: Message,
    },
    /// Several fast-path changes of one doc from one peer (what one frame
    /// carried), applied in one go: Automerge's remote apply walks the
    /// doc's ops once per call, so a batch costs about what one change does.
    ReceivedChanges {
        /// The sender.
        from: PeerKey,
        /// The doc.
        doc: String,
        /// The changes, in the order received.
        changes: Vec<FastChange>,
    },
    /// A local write committed a change (already applied to the doc).
    LocalChange {
        /// The doc.
        doc: String,
        /// The raw changes, in order: the write's own change last, after
        /// the geneses of containers it created (see `doc::container`).
        changes: Vec<Vec<u8>>,
        /// The doc's state after it.
        state: DocState,
        /// The writer waits for replicas to confirm it.
        ack: bool,
    },
    /// A local merge (a restore or import) changed a doc: it is synced
    /// with every peer.
    LocalMerge {
        /// The doc.
        doc: String,
        /// The doc's state after it.
        state: DocState,
    },
    /// A local delete.
    LocalDelete {
        /// The doc.
        doc: String,
    },
    /// A message about `doc` could not be delivered to `peer` (the shell saw
    /// the request fail): that doc is synced with the peer again.
    SendFailed {
        /// The peer.
        peer: PeerKey,
        /// The doc the message was about.
        doc: String,
    },
    /// Time passed; the shell calls this regularly (e.g. every 100 ms).
    Tick,
    /// Send our digest to every peer now instead of at the next round (a
    /// user waits to know whether this node is in sync). Each peer that
    /// finds it matching answers with its own, so both sides learn the
    /// match within a round trip.
    DigestNow,
}

/// One change as [`Message::Change`] carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct FastChange {
    /// The raw Automerge change.
    pub change: Vec<u8>,
    /// The writer waits for replicas.
    pub ack: bool,
    /// Peer tags the change was already sent to.
    pub seen: Vec<u64>,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a message to one peer.
    Send {
        /// The peer.
        to: PeerKey,
        /// The message.
        msg: Message,
    },
    /// Send a message to every connected peer but `except` (gossip).
    Broadcast {
        /// The message.
        msg: Message,
        /// The peer it came from, when relaying.
        except: Option<PeerKey>,
    },
    /// A peer sent something invalid: count it, lower its score.
    Rejected {
        /// The peer.
        peer: PeerKey,
        /// What was wrong.
        reason: String,
    },
    /// A remote change or deletion was merged into a doc.
    Merged {
        /// The doc.
        doc: String,
        /// The peer it came from.
        from: PeerKey,
        /// The doc's state now.
        state: DocState,
    },
    /// A peer confirmed it stores `doc` at `heads` ([`Message::Have`]).
    Held {
        /// The peer.
        peer: PeerKey,
        /// The doc.
        doc: String,
        /// Its heads.
        heads: Vec<automerge::ChangeHash>,
    },
}

/// What applying a fast-path change did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The change was new and is applied; the doc's state now.
    Ok(DocState),
    /// The doc already had the change; its state.
    Had(DocState),
    /// The change's dependencies are missing; nothing was applied.
    MissingDeps,
    /// The doc is deleted here; the change was ignored.
    Deleted,
}

/// Why the shell did not take a peer's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The input does not decode or apply: the peer is charged for it.
    Invalid(String),
    /// This node failed to take it (its store failed, or the doc failed
    /// earlier in the same round): not the peer's fault.
    Local(String),
}

impl From<String> for Refusal {
    fn from(e: String) -> Refusal {
        Refusal::Invalid(e)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(e) => f.write_str(e),
            Refusal::Local(e) => write!(f, "this node failed: {e}"),
        }
    }
}

/// The shell's documents, as the core needs them. Errors are strings that name
/// what was wrong with the peer's input; they reject that input only.
pub trait DocAccess {
    /// The state of `doc`, or `None` if this node has never heard of it.
    fn state(&mut self, doc: &str) -> Option<DocState>;
    /// The next sync message for `doc` to a peer with `state`, encoded; `None`
    /// when there is nothing to send. A deleted or unknown doc syncs as empty.
    fn generate_sync(&mut self, doc: &str, state: &mut sync::State) -> Option<Vec<u8>>;
    /// Applies a peer's sync message (creating the doc if it brings changes)
    /// and returns the doc's state after it: `None` if the doc still does not
    /// exist here (the message carried no changes). A deleted doc ignores it.
    ///
    /// # Errors
    /// A message that does not decode or apply.
    fn receive_sync(
        &mut self,
        doc: &str,
        state: &mut sync::State,
        data: &[u8],
    ) -> Result<Option<DocState>, Refusal>;
    /// Applies one fast-path change.
    ///
    /// # Errors
    /// A change that does not decode or apply.
    fn apply_change(&mut self, doc: &str, change: &[u8]) -> Result<Applied, Refusal>;

    /// Applies several changes of `doc` (in order), with one result each. The
    /// default applies them one by one; a shell should apply all that are
    /// ready in one Automerge call.
    fn apply_changes(&mut self, doc: &str, changes: &[&[u8]]) -> Vec<Result<Applied, Refusal>> {
        changes.iter().map(|c| self.apply_change(doc, c)).collect()
    }
    /// Deletes `doc` because a peer deleted it.
    ///
    /// # Errors
    /// The shell could not store the tombstone.
    fn delete(&mut self, doc: &str) -> Result<(), Refusal>;
    /// Every change of live `doc` as Automerge chunks that
    /// [`merge_doc`](Self::merge_doc) takes (a save, or stored chunks as they
    /// are); `None` if the doc is not live here or cannot be read.
    fn doc_bytes(&mut self, doc: &str) -> Option<Vec<u8>>;
    /// Merges a peer's pushed doc (from its `doc_bytes`), creating the doc if
    /// needed, and returns its state after; a deleted doc ignores it.
    ///
    /// # Errors
    /// Bytes that do not load.
    fn merge_doc(&mut self, doc: &str, data: &[u8]) -> Result<Option<DocState>, Refusal>;

    /// The sync state saved for (`peer`, `doc`) when a session last ended in
    /// agreement (only its shared heads matter), if the shell keeps one. A
    /// new session starts from it, so after a restart the first messages
    /// cover only changes since then, not the doc's whole history.
    fn saved_sync_state(&mut self, _peer: &str, _doc: &str) -> Option<sync::State> {
        None
    }

    /// Keeps `state` for (`peer`, `doc`): a session just ended with both
    /// sides at the same heads.
    fn save_sync_state(&mut self, _peer: &str, _doc: &str, _state: &sync::State) {}
}

/// Counters of the core, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncStats {
    /// Fast-path changes applied.
    pub changes_applied: u64,
    /// Fast-path changes that lacked dependencies.
    pub changes_missing_deps: u64,
    /// Sync messages received.
    pub sync_received: u64,
    /// Sync sessions reset for making no progress.
    pub sessions_reset: u64,
    /// Digests received that matched ours.
    pub digests_in_sync: u64,
    /// Docs found different by anti-entropy.
    pub docs_differing: u64,
    /// Inputs rejected.
    pub rejected: u64,
    /// Peer inputs not taken because this node failed (its store).
    pub local_failures: u64,
    /// Whole docs pushed to peers that lacked them.
    pub docs_pushed_out: u64,
    /// Whole docs merged from peers' pushes.
    pub docs_pushed_in: u64,
    /// Docs peers hold that this node does not yet (a level, not a count;
    /// set by whoever publishes the stats, from [`Core::lacking`]).
    pub docs_lacking: u64,
}

struct Session {
    state: sync::State,
    idle_rounds: u32,
    last_entry: Option<u64>,
    used_at: u64,
}

impl Session {
    fn new(now: u64) -> Session {
        Session {
            state: sync::State::new(),
            idle_rounds: 0,
            last_entry: None,
            used_at: now,
        }
    }

    /// A new session with `peer` on `doc`, from the sync state saved when
    /// their last session ended in agreement, if the shell kept one.
    fn resumed<D: DocAccess>(now: u64, peer: &str, doc: &str, docs: &mut D) -> Session {
        let mut s = Session::new(now);
        if let Some(saved) = docs.saved_sync_state(peer, doc) {
            s.state = saved;
        }
        s
    }
}

struct Peer {
    /// Its [`peer_tag`], computed once: every change sent or relayed checks it.
    tag: u64,
    sessions: HashMap<String, Session>,
    /// Docs anti-entropy found differing, waiting for a session slot.
    pending: std::collections::VecDeque<String>,
    pending_set: std::collections::HashSet<String>,
    /// Pending docs the peer lacks entirely, too big to push in one message:
    /// their session starts by sending every change.
    push: std::collections::HashSet<String>,
    /// Docs the peer lacks, waiting to be pushed whole.
    to_push: std::collections::VecDeque<String>,
    to_push_set: std::collections::HashSet<String>,
    next_digest_at: u64,
    /// We sent it our digest after its last one arrived: a matching digest
    /// from it now may be its answer to ours, and is not answered again.
    digest_sent_last: bool,
    last_in_sync_at: Option<u64>,
    /// Fast-path changes that arrived before their dependencies (frames can
    /// overtake each other), per doc, with when the first was held. They are
    /// retried with the doc's next changes from this peer; a doc still
    /// missing dependencies after [`HOLD_MS`] is synced instead.
    held: HashMap<String, (u64, Vec<FastChange>)>,
    /// Changes in `held`, for the cap.
    held_count: usize,
    /// It had repair work open at the last tick (see [`CONFIRM_MS`]).
    busy: bool,
}

impl Peer {
    fn busy(&self) -> bool {
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

/// How long out-of-order changes wait for their dependencies before the doc
/// is synced with the sender.
pub const HOLD_MS: u64 = 500;

/// Most changes held per peer; past it the doc is synced at once.
const MAX_HELD: usize = 4096;

/// Most docs counted as lacking (a bound on what a peer's buckets can make
/// us remember).
const MAX_LACKING: usize = 1 << 20;

/// The sync core of one node.
pub struct Core {
    cfg: SyncConfig,
    /// The [`peer_tag`] of `cfg.local`, if it is set.
    local_tag: Option<u64>,
    digest: Digest,
    peers: BTreeMap<PeerKey, Peer>,
    stats: SyncStats,
    /// Pushes left in this tick (see `SyncConfig::max_pushes_per_tick`).
    push_budget: usize,
    /// Docs a peer listed (in a bucket) that we do not hold yet: what a new
    /// node still has to receive. Pruned every tick.
    lacking: HashSet<String>,
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
                        digest_sent_last: true,
                        last_in_sync_at: None,
                        held: HashMap::new(),
                        held_count: 0,
                        busy: false,
                    },
                );
                out.push(self.digest_to(peer));
            }
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
                    .filter(|(_, p)| p.next_digest_at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for peer in due {
                    out.push(self.digest_now(now, rng, peer));
                }
            }
            Input::DigestNow => {
                let peers: Vec<PeerKey> = self.peers.keys().cloned().collect();
                for peer in peers {
                    out.push(self.digest_now(now, rng, peer));
                }
            }
            Input::LocalChange {
                doc,
                changes,
                state,
                ack,
            } => {
                self.digest.set(&doc, &state);
                if changes
                    .iter()
                    .all(|c| c.len() <= self.cfg.max_gossip_change_bytes)
                {
                    let mut seen: Vec<u64> = self.local_tag.into_iter().collect();
                    add_tags(&mut seen, self.peers.values().map(|p| p.tag));
                    let last = changes.len().saturating_sub(1);
                    for (i, change) in changes.into_iter().enumerate() {
                        let msg = Message::Change {
                            doc: doc.clone(),
                            change,
                            // Replicas confirm the write's own change, which
                            // they can apply only after its geneses.
                            ack: ack && i == last,
                            seen: seen.clone(),
                        };
                        self.broadcast(msg, None, &mut out);
                    }
                } else {
                    let peers: Vec<PeerKey> = self.peers.keys().cloned().collect();
                    for peer in peers {
                        self.sync_doc(now, &peer, &doc, true, docs, &mut out);
                    }
                }
            }
            Input::LocalMerge { doc, state } => {
                self.digest.set(&doc, &state);
                self.sync_with_others(now, "", &doc, docs, &mut out);
            }
            Input::LocalDelete { doc } => {
                self.digest.set(&doc, &DocState::Deleted);
                for p in self.peers.values_mut() {
                    p.sessions.remove(&doc);
                }
                self.broadcast(Message::Deleted { doc }, None, &mut out);
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
                self.received(now, from, msg, docs, &mut out);
            }
        }
        out
    }

    /// Queues `msg` for every peer but `except`; nothing when there is nobody
    /// to send it to (a lone node pays nothing for the fast path).
    fn broadcast(&self, msg: Message, except: Option<PeerKey>, out: &mut Vec<Output>) {
        if self.peers.keys().any(|p| Some(p) != except.as_ref()) {
            out.push(Output::Broadcast { msg, except });
        }
    }

    fn jittered<R: rand::Rng>(&self, rng: &mut R) -> u64 {
        let base = self.cfg.anti_entropy_ms.max(1);
        let quarter = base / 4;
        base - quarter + rng.random_range(0..=quarter * 2)
    }

    /// Our digest for `peer`, as this round's: its next one is a full
    /// period away.
    fn digest_now<R: rand::Rng>(&mut self, now: u64, rng: &mut R, peer: PeerKey) -> Output {
        let next = now + self.jittered(rng);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.next_digest_at = next;
            p.digest_sent_last = true;
        }
        self.digest_to(peer)
    }

    fn digest_to(&self, peer: PeerKey) -> Output {
        Output::Send {
            to: peer,
            msg: Message::Digest {
                buckets: self.digest.buckets().to_vec(),
            },
        }
    }

    /// A peer's input the shell did not take: an invalid one is charged to
    /// the peer; a local failure is not its fault (the input comes again
    /// with sync once this node can take it).
    fn refuse(&mut self, peer: &str, what: String, why: Refusal, out: &mut Vec<Output>) {
        match why {
            Refusal::Invalid(e) => self.reject(peer, format!("{what}: {e}"), out),
            Refusal::Local(e) => {
                self.stats.local_failures += 1;
                tracing::warn!(peer, "{what} not taken: this node failed: {e}");
            }
        }
    }

    fn reject(&mut self, peer: &str, reason: String, out: &mut Vec<Output>) {
        self.stats.rejected += 1;
        out.push(Output::Rejected {
            peer: peer.to_string(),
            reason,
        });
    }

    fn received<D: DocAccess>(
        &mut self,
        now: u64,
        from: PeerKey,
        msg: Message,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        match msg {
            Message::Digest { buckets } => {
                if buckets.len() != self.digest.buckets().len() {
                    let reason = format!(
                        "digest has {} buckets, we use {}",
                        buckets.len(),
                        self.digest.buckets().len()
                    );
                    return self.reject(&from, reason, out);
                }
                let differing = self.digest.differing(&buckets);
                let period = self.cfg.anti_entropy_ms.max(1);
                if let Some(p) = self.peers.get_mut(&from) {
                    let answer = differing.is_empty() && !p.digest_sent_last;
                    if differing.is_empty() {
                        p.last_in_sync_at = Some(now);
                    }
                    // Tell it we agree, unless this digest may be its answer
                    // to ours (no ping-pong). The exchange counts as this
                    // period's for both sides, so idle traffic stays as it was.
                    p.digest_sent_last = answer;
                    if answer {
                        p.next_digest_at = now + period;
                        out.push(self.digest_to(from.clone()));
                    }
                }
                if differing.is_empty() {
                    self.stats.digests_in_sync += 1;
                }
                for bucket in differing {
                    out.push(Output::Send {
                        to: from.clone(),
                        msg: Message::Bucket {
                            bucket,
                            entries: self.digest.bucket_entries(bucket),
                            answer: true,
                        },
                    });
                }
            }
            Message::Bucket {
                bucket,
                entries,
                answer,
            } => {
                if bucket >= self.digest.buckets().len() as u32
                    || entries.len() > self.cfg.max_bucket_entries
                {
                    let reason = format!("bucket {bucket} with {} entries", entries.len());
                    return self.reject(&from, reason, out);
                }
                let theirs: HashMap<&str, u64> =
                    entries.iter().map(|(d, h)| (d.as_str(), *h)).collect();
                let mine = self.digest.bucket_entries(bucket);
                // Docs both hold differently are synced; docs only we hold are
                // pushed whole (one message instead of a negotiation); docs
                // only they hold are left to them to push, and we send our
                // entries back if they asked, so that they know what we lack.
                let mut differing: Vec<(String, bool)> = Vec::new();
                for (doc, hash) in &mine {
                    match theirs.get(doc.as_str()) {
                        Some(h) if h == hash => {}
                        Some(_) => differing.push((doc.clone(), false)),
                        None => differing.push((doc.clone(), true)),
                    }
                }
                let mut lacking = 0;
                for (doc, _) in &entries {
                    if self.digest.entry(doc).is_none() {
                        lacking += 1;
                        if self.lacking.len() < MAX_LACKING {
                            self.lacking.insert(doc.clone());
                        }
                    }
                }
                self.stats.docs_differing += (differing.len() + lacking) as u64;
                let deleted = |doc: &str, hash: u64| hash == entry_hash(doc, &DocState::Deleted);
                for (doc, push) in differing {
                    let Some(p) = self.peers.get_mut(&from) else {
                        break;
                    };
                    let hash = self.digest.entry(&doc).unwrap_or_default();
                    if deleted(&doc, hash) {
                        out.push(Output::Send {
                            to: from.clone(),
                            msg: Message::Deleted { doc },
                        });
                    } else if push {
                        if p.to_push_set.insert(doc.clone()) {
                            p.to_push.push_back(doc);
                        }
                    } else if !p.sessions.contains_key(&doc) && p.pending_set.insert(doc.clone()) {
                        p.pending.push_back(doc);
                    }
                }
                if lacking > 0 && answer {
                    out.push(Output::Send {
                        to: from.clone(),
                        msg: Message::Bucket {
                            bucket,
                            entries: mine,
                            answer: false,
                        },
                    });
                }
                self.start_pending(now, &from, docs, out);
                self.push_docs(now, &from, docs, out);
            }
            Message::Doc { doc, data } => {
                let before = self.digest.entry(&doc);
                match docs.merge_doc(&doc, &data) {
                    Err(e) => self.refuse(&from, format!("doc {doc:?}"), e, out),
                    Ok(None) => {}
                    Ok(Some(state)) => {
                        self.stats.docs_pushed_in += 1;
                        if self.digest.set(&doc, &state) {
                            out.push(Output::Merged {
                                doc: doc.clone(),
                                from: from.clone(),
                                state,
                            });
                        }
                        if before != self.digest.entry(&doc) {
                            self.sync_with_others(now, &from, &doc, docs, out);
                        }
                    }
                }
            }
            Message::Have { doc, heads } => {
                out.push(Output::Held {
                    peer: from,
                    doc,
                    heads,
                });
            }
            Message::Sync { doc, data } => {
                self.stats.sync_received += 1;
                let Some(peer) = self.peers.get_mut(&from) else {
                    return;
                };
                let session = peer
                    .sessions
                    .entry(doc.clone())
                    .or_insert_with(|| Session::resumed(now, &from, &doc, docs));
                session.used_at = now;
                let before = self.digest.entry(&doc);
                match docs.receive_sync(&doc, &mut session.state, &data) {
                    Err(e) => {
                        peer.sessions.remove(&doc);
                        return self.refuse(&from, format!("sync message for {doc:?}"), e, out);
                    }
                    Ok(None) => {}
                    Ok(Some(state)) => {
                        if self.digest.set(&doc, &state) {
                            out.push(Output::Merged {
                                doc: doc.clone(),
                                from: from.clone(),
                                state,
                            });
                        }
                    }
                }
                let after = self.digest.entry(&doc);
                self.continue_session(now, &from, &doc, before != after, docs, out);
                if before != after {
                    // Changes that came by sync did not travel the fast path:
                    // pass them on to the other peers, who may lack them too.
                    self.sync_with_others(now, &from, &doc, docs, out);
                }
            }
            Message::Change {
                doc,
                change,
                ack,
                seen,
            } => {
                let changes = vec![FastChange { change, ack, seen }];
                self.received_changes(now, from, doc, changes, docs, out);
            }
            Message::Deleted { doc } => {
                if docs.state(&doc) == Some(DocState::Deleted) {
                    return;
                }
                if let Err(e) = docs.delete(&doc) {
                    return self.refuse(&from, format!("delete of {doc:?}"), e, out);
                }
                self.digest.set(&doc, &DocState::Deleted);
                for p in self.peers.values_mut() {
                    p.sessions.remove(&doc);
                }
                self.broadcast(
                    Message::Deleted { doc: doc.clone() },
                    Some(from.clone()),
                    out,
                );
                out.push(Output::Merged {
                    doc,
                    from,
                    state: DocState::Deleted,
                });
            }
        }
    }

    /// Fast-path changes of `doc` from `from`: each new one is relayed to
    /// the peers it was not sent to; missing dependencies start a sync with
    /// the sender.
    fn received_changes<D: DocAccess>(
        &mut self,
        now: u64,
        from: PeerKey,
        doc: String,
        changes: Vec<FastChange>,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        // Changes held for this doc (waiting on these, perhaps) go first.
        let mut changes = changes;
        let mut held_since = None;
        if let Some(p) = self.peers.get_mut(&from)
            && let Some((since, mut held)) = p.held.remove(&doc)
        {
            p.held_count -= held.len();
            held_since = Some(since);
            held.append(&mut changes);
            changes = held;
        }
        let raw: Vec<&[u8]> = changes.iter().map(|c| c.change.as_slice()).collect();
        let results = docs.apply_changes(&doc, &raw);
        let mut missing = Vec::new();
        let mut last = None;
        let mut error = None;
        for (c, result) in changes.iter().zip(results) {
            match result {
                // One strike per batch, not per change: a batch refused as a
                // whole (a size cap) is one bad input.
                Err(e) => error = error.or(Some(e)),
                Ok(Applied::Deleted) => {}
                Ok(Applied::MissingDeps) => missing.push(c.clone()),
                Ok(Applied::Had(state)) => last = Some(state),
                Ok(Applied::Ok(state)) => {
                    self.stats.changes_applied += 1;
                    // New to us: relay it to our other peers that it was not
                    // sent to (not connected to its origin).
                    let targets: Vec<(&PeerKey, u64)> = self
                        .peers
                        .iter()
                        .filter(|(k, p)| **k != from && !c.seen.contains(&p.tag))
                        .map(|(k, p)| (k, p.tag))
                        .collect();
                    let mut seen = c.seen.clone();
                    add_tags(&mut seen, targets.iter().map(|(_, tag)| *tag));
                    for (to, _) in targets {
                        let msg = Message::Change {
                            doc: doc.clone(),
                            change: c.change.clone(),
                            ack: c.ack,
                            seen: seen.clone(),
                        };
                        out.push(Output::Send {
                            to: to.clone(),
                            msg,
                        });
                    }
                    last = Some(state);
                }
            }
        }
        if let Some(e) = error {
            self.refuse(&from, format!("change for {doc:?}"), e, out);
        }
        if let Some(state) = last
            && self.digest.set(&doc, &state)
        {
            out.push(Output::Merged {
                doc: doc.clone(),
                from: from.clone(),
                state,
            });
        }
        if missing.is_empty() {
            return;
        }
        // Their dependencies are most likely in a frame still on its way:
        // hold them a while rather than start a sync at once (which, for a
        // busy doc, would start one per reordered frame).
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if p.held_count + missing.len() <= MAX_HELD {
            p.held_count += missing.len();
            p.held.insert(doc, (held_since.unwrap_or(now), missing));
        } else {
            self.stats.changes_missing_deps += missing.len() as u64;
            // From a fresh state: an open session may be waiting on an
            // answer (in flight) and would send nothing.
            self.sync_doc(now, &from, &doc, true, docs, out);
        }
    }

    /// Docs whose held changes waited [`HOLD_MS`] in vain are synced with
    /// the peer (the held changes are dropped: the sync brings them).
    fn expire_held<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let expired: Vec<String> = p
            .held
            .iter()
            .filter(|(_, (since, _))| since + HOLD_MS <= now)
            .map(|(doc, _)| doc.clone())
            .collect();
        for doc in expired {
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            if let Some((_, held)) = p.held.remove(&doc) {
                p.held_count -= held.len();
                self.stats.changes_missing_deps += held.len() as u64;
            }
            self.sync_doc(now, peer, &doc, true, docs, out);
        }
    }

    /// Queues a sync of `doc` with every connected peer but `except`.
    fn sync_with_others<D: DocAccess>(
        &mut self,
        now: u64,
        except: &str,
        doc: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let others: Vec<PeerKey> = self
            .peers
            .keys()
            .filter(|k| k.as_str() != except)
            .cloned()
            .collect();
        for peer in others {
            if let Some(p) = self.peers.get_mut(&peer)
                && !p.sessions.contains_key(doc)
                && p.pending_set.insert(doc.to_string())
            {
                p.pending.push_back(doc.to_string());
            }
            self.start_pending(now, &peer, docs, out);
        }
    }

    /// Pushes docs `peer` lacks, whole, while this tick's budget lasts; one
    /// too big for a message goes to a primed session instead.
    fn push_docs<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let mut big = false;
        while self.push_budget > 0 {
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            let Some(doc) = p.to_push.pop_front() else {
                break;
            };
            p.to_push_set.remove(&doc);
            match docs.doc_bytes(&doc) {
                Some(data) if data.len() <= self.cfg.max_push_bytes => {
                    self.push_budget -= 1;
                    self.stats.docs_pushed_out += 1;
                    out.push(Output::Send {
                        to: peer.to_string(),
                        msg: Message::Doc { doc, data },
                    });
                }
                Some(_) if !p.sessions.contains_key(&doc) && p.pending_set.insert(doc.clone()) => {
                    p.push.insert(doc.clone());
                    p.pending.push_back(doc);
                    big = true;
                }
                Some(_) => {}
                // Deleted or gone since: the digest exchange sorts it out.
                None => {}
            }
        }
        if big {
            self.start_pending(now, peer, docs, out);
        }
    }

    /// Starts sessions for pending docs while `peer` has free session slots.
    /// Each starts from a fresh state: a difference found by anti-entropy
    /// after a loss may mean a stale one.
    fn start_pending<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let max = self.cfg.max_sessions_per_peer.max(1);
        loop {
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            if p.sessions.len() >= max {
                return;
            }
            let Some(doc) = p.pending.pop_front() else {
                return;
            };
            p.pending_set.remove(&doc);
            if !self.sync_doc(now, peer, &doc, true, docs, out)
                && let Some(p) = self.peers.get_mut(peer)
            {
                // Nothing to send: the session is done before it began.
                p.sessions.remove(&doc);
            }
        }
    }

    /// Starts (or, with `reset`, restarts from a fresh state) a sync session for
    /// `doc` with `peer` and sends its first message; returns whether it sent one.
    #[allow(clippy::too_many_arguments)]
    fn sync_doc<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        doc: &str,
        reset: bool,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) -> bool {
        let Some(p) = self.peers.get_mut(peer) else {
            return false;
        };
        let fresh = reset || !p.sessions.contains_key(doc);
        let session = p
            .sessions
            .entry(doc.to_string())
            .or_insert_with(|| Session::new(now));
        if fresh {
            *session = Session::resumed(now, peer, doc, docs);
        }
        if p.push.remove(doc) {
            // The peer has none of this doc: tell the sync state so, and the
            // first message carries every change.
            session.state.their_heads = Some(vec![]);
            session.state.their_need = Some(vec![]);
            session.state.their_have = Some(vec![sync::Have::default()]);
        }
        match docs.generate_sync(doc, &mut session.state) {
            Some(data) => {
                out.push(sync_message(peer, doc, data));
                true
            }
            None => false,
        }
    }

    /// After a sync message was applied: send the next one, close the session
    /// when there is nothing to send, reset it when it stopped making progress.
    fn continue_session<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        doc: &str,
        progressed: bool,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let max_idle = self.cfg.max_idle_rounds;
        let entry = self.digest.entry(doc);
        let ours = match docs.state(doc) {
            Some(DocState::Live(mut heads)) => {
                heads.sort();
                Some(heads)
            }
            _ => None,
        };
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let Some(session) = p.sessions.get_mut(doc) else {
            return;
        };
        if let Some(ours) = &ours
            && they_know_we_agree(&session.state, ours)
        {
            docs.save_sync_state(peer, doc, &session.state);
            // Their heads are ours and their message names ours as shared:
            // they need nothing and know we need nothing. Answering would
            // make them (their session closed) open a new one and answer in
            // turn, and so on forever.
            p.sessions.remove(doc);
            self.start_pending(now, peer, docs, out);
            return;
        }
        if progressed || session.last_entry != entry {
            session.idle_rounds = 0;
            session.last_entry = entry;
        } else {
            session.idle_rounds += 1;
        }
        if session.idle_rounds > max_idle {
            // Stuck: start over from a fresh state (anti-entropy would too).
            *session = Session::new(now);
            self.stats.sessions_reset += 1;
        }
        let done = match docs.generate_sync(doc, &mut session.state) {
            Some(data) => {
                out.push(sync_message(peer, doc, data));
                // The peer told us its heads and we just sent ours: if they are
                // the same, both sides are in sync and the peer will have nothing
                // to answer, so the session ends here rather than idling until
                // it goes stale (it would hold a session slot meanwhile).
                let mut theirs = session.state.their_heads.clone().unwrap_or_default();
                let mut ours = session.state.last_sent_heads.clone();
                theirs.sort();
                ours.sort();
                let agreed = session.state.their_heads.is_some() && theirs == ours;
                if agreed {
                    docs.save_sync_state(peer, doc, &session.state);
                }
                agreed
            }
            None => true,
        };
        if done {
            p.sessions.remove(doc);
            self.start_pending(now, peer, docs, out);
        }
    }
}

/// Most peer tags a [`Message::Change`] carries: past it, relays may send a
/// change to peers that already got it (harmless, only wasteful).
pub const MAX_SEEN: usize = 64;

/// A short, stable name of a peer for [`Message::Change`]'s `seen` list.
pub fn peer_tag(peer: &str) -> u64 {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(peer.as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

/// Adds `tags` to `seen`, up to [`MAX_SEEN`].
fn add_tags(seen: &mut Vec<u64>, tags: impl Iterator<Item = u64>) {
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
fn they_know_we_agree(state: &sync::State, ours: &[automerge::ChangeHash]) -> bool {
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
fn sync_message(peer: &str, doc: &str, data: Vec<u8>) -> Output {
    Output::Send {
        to: peer.to_string(),
        msg: Message::Sync {
            doc: doc.to_string(),
            data,
        },
    }
}
