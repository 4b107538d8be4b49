//! The records the store keeps: per-document meta, actor records, and a
//! document's stored data.

use serde::{Deserialize, Serialize};

/// Per-document bookkeeping kept beside the data, used for listing without loading
/// documents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DocMeta {
    /// Current heads (hex change hashes).
    pub heads: Vec<String>,
    /// Bytes stored for the doc: snapshot plus tail of changes.
    pub size_bytes: u64,
    /// Bytes of the snapshot alone (0 in metas written before it was kept).
    #[serde(default)]
    pub snapshot_bytes: u64,
    /// Number of changes in the tail (not yet compacted into the snapshot).
    pub tail_changes: u64,
    /// Sequence number the next appended change gets.
    pub next_seq: u64,
    /// Unix milliseconds of creation.
    pub created_at_ms: u64,
    /// Unix milliseconds of the last change.
    pub updated_at_ms: u64,
    /// Set when the doc was deleted: a tombstone. Data is gone, the meta stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at_ms: Option<u64>,
    /// Every change stored for the doc has its signature stored, and has
    /// had since its first change: what lets a push send the stored save
    /// and signatures without loading the doc. False for docs written
    /// before it was kept, or with a change stored unsigned (a node
    /// without an identity, or from before signatures).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signed: bool,
}

impl DocMeta {
    /// Sequence numbers of the doc's stored change tail.
    pub fn tail_range(&self) -> std::ops::Range<u64> {
        self.next_seq.saturating_sub(self.tail_changes)..self.next_seq
    }

    /// The meta of a doc that is being created at `now_ms`: no changes yet.
    pub fn new(now_ms: u64) -> DocMeta {
        DocMeta {
            heads: vec![],
            size_bytes: 0,
            snapshot_bytes: 0,
            tail_changes: 0,
            next_seq: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            deleted_at_ms: None,
            signed: true,
        }
    }
}

/// What the store remembers about one boot's Automerge actor id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActorRecord {
    /// The libp2p peer id of the node that wrote with this actor.
    pub peer_id: String,
    /// Boot number of that node (1 for the first boot).
    pub boot: u64,
    /// Unix milliseconds when the boot started.
    pub started_at_ms: u64,
}

/// A document's stored data: the snapshot (if any) and the tail of changes after it.
#[derive(Debug, Default)]
pub struct DocData {
    /// Compacted Automerge save, empty if the doc was never compacted.
    pub snapshot: Vec<u8>,
    /// Raw changes appended after the snapshot, in append order.
    pub changes: Vec<Vec<u8>>,
}
