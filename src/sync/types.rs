//! The sync core's vocabulary: its config, the messages peers exchange,
//! the inputs the shell hands it and the outputs it asks for, what applying
//! a change did, and [`DocAccess`], the documents as the core sees them.

use automerge::sync;

use super::digest::DocState;
use super::replicate::{ReadRule, Replicate};

pub const MAX_SEEN: usize = 64;

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
    /// The docs this node holds (`node.replicate`; see `scope.rs`).
    pub replicate: Replicate,
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
            replicate: Replicate::All,
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
            Message::Scope { .. } => "scope",
        }
    }

    /// The doc the message is about, if it is about one.
    pub fn doc(&self) -> Option<&str> {
        match self {
            Message::Change { doc, .. }
            | Message::Sync { doc, .. }
            | Message::Deleted { doc, .. }
            | Message::Doc { doc, .. }
            | Message::Have { doc, .. } => Some(doc),
            Message::Digest { .. } | Message::Bucket { .. } | Message::Scope { .. } => None,
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
        /// Its signature by the node that admitted it (`trust::ChangeSig`,
        /// 96 bytes); empty when the sender holds none.
        sig: Vec<u8>,
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
        /// It answers the receiver's digest (which matched): not answered
        /// in turn. Any other digest that matches is answered, so both
        /// sides learn they agree within a round trip.
        answer: bool,
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
        /// Signatures of the changes it carries: entries of a change hash
        /// (32 bytes) and its `trust::ChangeSig` (96 bytes).
        sigs: Vec<u8>,
    },
    /// The doc is deleted on the sender.
    Deleted {
        /// The doc.
        doc: String,
        /// The tombstone's signature by the node that deleted it
        /// (`trust::ChangeSig` over the doc and `trust::TOMBSTONE_HASH`);
        /// empty when the sender holds none.
        sig: Vec<u8>,
    },
    /// A whole doc, pushed to a peer that lacks it: Automerge chunks (a saved
    /// doc and/or changes) that the receiver merges. Needs no answer.
    Doc {
        /// The doc.
        doc: String,
        /// The chunks.
        data: Vec<u8>,
        /// Signatures of its changes, as in [`Message::Sync`].
        sigs: Vec<u8>,
    },
    /// The sender has stored (flushed) the doc at these heads, after merging
    /// changes it got from the receiver: a confirmation for replica acks.
    Have {
        /// The doc.
        doc: String,
        /// The sender's heads.
        heads: Vec<automerge::ChangeHash>,
    },
    /// The docs the sender holds (its `node.replicate` globs; `None` for
    /// all): the first message on every link (see `scope.rs`), and the
    /// answer to a peer that asks.
    Scope {
        /// Its globs.
        replicate: Option<Vec<String>>,
        /// The sender does not know the receiver's scope: answer with yours.
        ask: bool,
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
        /// Their signatures, in the same order (empty ones when unsigned).
        sigs: Vec<Vec<u8>>,
        /// The doc's state after it.
        state: DocState,
        /// The writer waits for replicas to confirm it.
        ack: bool,
    },
    /// The changes of a local write with an idempotency key, once durable:
    /// sent to peers now (the digest took the write's state when it was
    /// made, through a [`Input::LocalChange`] without changes). Sent only
    /// once durable, so that no peer can hold a keyed change its writer
    /// lost in a crash: the writer would apply the key again when it is
    /// asked again, and the doc would hold the write twice.
    Broadcast {
        /// The doc.
        doc: String,
        /// As in [`Input::LocalChange`].
        changes: Vec<Vec<u8>>,
        /// As in [`Input::LocalChange`].
        sigs: Vec<Vec<u8>>,
        /// As in [`Input::LocalChange`].
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
    /// The grants' read rules changed (`None`: every peer may read every
    /// doc): each peer is sent only what it may read from now on.
    Reads(Option<ReadRule>),
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
    /// Its signature, as [`Message::Change`] carries it.
    pub sig: Vec<u8>,
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
    /// The next sync message for `doc` to a peer with `state`, encoded, and
    /// the signatures of the changes it carries (see [`Message::Sync`]);
    /// `None` when there is nothing to send. A deleted or unknown doc syncs
    /// as empty.
    fn generate_sync(&mut self, doc: &str, state: &mut sync::State) -> Option<(Vec<u8>, Vec<u8>)>;
    /// Signatures a peer sent with the changes of `doc` it is about to hand
    /// over (a sync message, fast-path changes, a pushed doc): the shell
    /// keeps those that verify with the changes they sign.
    fn offer_sigs(&mut self, _doc: &str, _sigs: &[u8]) {}
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
    /// Applies one fast-path change with its signature (`sig`, empty if
    /// none came).
    ///
    /// # Errors
    /// A change that does not decode or apply.
    fn apply_change(&mut self, doc: &str, change: &[u8], sig: &[u8]) -> Result<Applied, Refusal>;

    /// Applies several changes of `doc` (in order, each with its signature),
    /// with one result each. The default applies them one by one; a shell
    /// should apply all that are ready in one Automerge call.
    fn apply_changes(
        &mut self,
        doc: &str,
        changes: &[(&[u8], &[u8])],
    ) -> Vec<Result<Applied, Refusal>> {
        changes
            .iter()
            .map(|(c, s)| self.apply_change(doc, c, s))
            .collect()
    }
    /// Deletes `doc` because a peer deleted it; `sig` is the tombstone's
    /// signature (see [`Message::Deleted`]), which the shell checks and keeps.
    ///
    /// # Errors
    /// A signature that does not check out (or a signer that may not delete
    /// the doc), or the shell could not store the tombstone.
    fn delete(&mut self, doc: &str, sig: &[u8]) -> Result<(), Refusal>;

    /// The signature of `doc`'s tombstone to send with a
    /// [`Message::Deleted`] (empty if none).
    fn tombstone_sig(&mut self, _doc: &str) -> Vec<u8> {
        Vec::new()
    }
    /// Every change of live `doc` as Automerge chunks that
    /// [`merge_doc`](Self::merge_doc) takes (a save, or stored chunks as they
    /// are), and their signatures (see [`Message::Sync`]); `None` if the doc
    /// is not live here or cannot be read.
    fn doc_bytes(&mut self, doc: &str) -> Option<(Vec<u8>, Vec<u8>)>;
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
    /// Due digests not sent because nothing changed since the peer last
    /// agreed (see [`QUIET_DIGESTS`](super::QUIET_DIGESTS)).
    pub digests_skipped: u64,
    /// Docs found different by anti-entropy.
    pub docs_differing: u64,
    /// Of those, docs left to the fast path because they had just changed
    /// here (see [`SETTLE_MS`](super::SETTLE_MS)).
    pub docs_settling: u64,
    /// Buckets a digest comparison left out because docs in them had just
    /// changed here (see [`SETTLE_MS`](super::SETTLE_MS)).
    pub buckets_settling: u64,
    /// Inputs rejected.
    pub rejected: u64,
    /// Peer inputs not taken because this node failed (its store).
    pub local_failures: u64,
    /// Whole docs pushed to peers that lacked them.
    pub docs_pushed_out: u64,
    /// Whole docs merged from peers' pushes.
    pub docs_pushed_in: u64,
    /// Messages about docs outside this node's scope, dropped (a peer that
    /// did not yet know our scope or the grants sent them).
    pub out_of_scope: u64,
    /// Docs peers hold that this node does not yet (a level, not a count;
    /// set by whoever publishes the stats, from [`Core::lacking`]).
    pub docs_lacking: u64,
}
