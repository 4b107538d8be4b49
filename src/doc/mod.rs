//! Documents: ids, JSON <-> Automerge, merge patches, explicit ops, JSON Pointer
//! paths, conflict stamps, size limits, and the cache of loaded documents.
//!
//! This is document logic only: it reaches sled only through
//! the store (`crate::store::Store`, the cache's loads) and runs no threads or tasks.
//! The runtime (`crate::runtime`) applies writes and remote changes with it.

pub(crate) mod at;
pub(crate) mod cache;
pub mod conflict;
pub(crate) mod container;
pub(crate) mod heads;
mod id;
pub(crate) mod json;
pub(crate) mod ops;
pub(crate) mod patch;
pub(crate) mod path;
pub mod stamp;

pub use cache::{load_stored, load_stored_contained};
pub use id::{DocId, MAX_ID_LEN, SYSTEM_PREFIX, is_system, user_writable};
pub use json::{MAX_READ_DEPTH, StringMode, to_json};
pub use ops::{Op, ValueKind, apply_ops, write_ops};
pub use patch::{apply_merge_patch, ops_to_match};
pub use path::Pointer;
pub use stamp::now_ms;

use crate::store::StoreError;

/// Errors from document operations. Each says what and where.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// The doc id does not match `[A-Za-z0-9._:/-]{1,200}`.
    #[error("invalid doc id {id:?}: {reason}")]
    InvalidId {
        /// The id (shortened).
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No document with this id.
    #[error("doc {0:?} not found")]
    NotFound(String),
    /// The document was deleted; its tombstone stays.
    #[error("doc {0:?} was deleted")]
    Deleted(String),
    /// A create named an id that exists.
    #[error("doc {0:?} already exists")]
    AlreadyExists(String),
    /// A JSON Pointer is malformed.
    #[error("invalid path {path:?}: {reason}")]
    BadPath {
        /// The pointer as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A JSON Pointer names nothing in the document.
    #[error("path {0:?} does not exist in the document")]
    PathNotFound(String),
    /// The value at a path has the wrong type for the operation.
    #[error("path {path:?} holds {found}, but {op} needs {expected}")]
    TypeMismatch {
        /// The pointer.
        path: String,
        /// The operation.
        op: &'static str,
        /// What the operation needs.
        expected: &'static str,
        /// What is there.
        found: String,
    },
    /// A value or request cannot be applied.
    #[error("{0}")]
    BadValue(String),
    /// The change is bigger than `doc.max_change_bytes`.
    #[error("change of {size} bytes exceeds the cap doc.max_change_bytes = {cap}")]
    ChangeTooLarge {
        /// Encoded change size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// The document would grow past `doc.max_doc_bytes`.
    #[error("doc would grow to {size} bytes, over the cap doc.max_doc_bytes = {cap}")]
    DocTooLarge {
        /// Stored size after the change.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// One op of an ops list failed; nothing of the list was applied.
    #[error("op {index}: {source}")]
    InOp {
        /// Position of the op in the list.
        index: usize,
        /// What went wrong.
        #[source]
        source: Box<DocError>,
    },
    /// A write (or a change from a peer) would nest objects and lists
    /// deeper than `doc.max_depth`, or a stored doc is too deep to render.
    #[error("{what} nests {depth} levels deep; the limit is {max} (doc.max_depth)")]
    TooDeep {
        /// What: "this write", "a change from a peer", "doc \"x\"".
        what: String,
        /// How deep it goes (at least).
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// An increment would take a counter past the range of a 64-bit integer.
    #[error("incrementing the counter at {path:?} by {by} would overflow (it holds {value})")]
    CounterOverflow {
        /// The counter's JSON Pointer.
        path: String,
        /// Its value.
        value: i64,
        /// The increment.
        by: i64,
    },
    /// A write's idempotency key was used before, on this doc, by a request
    /// that asked for something else.
    #[error(
        "idempotency key {key:?} was already used on doc {doc:?} for a different request; \
         use a new key for a new write"
    )]
    IdempotencyKeyReused {
        /// The doc.
        doc: String,
        /// The key.
        key: String,
    },
    /// This node may not write the doc: the network's grants do not cover
    /// it, or it is a system doc only admins change (see [`crate::grants`]).
    #[error("{0}")]
    Forbidden(String),
    /// A user's write to a system doc (see [`user_writable`]).
    #[error("doc {id:?} {what}")]
    Reserved {
        /// The doc.
        id: String,
        /// What the doc is and who writes it.
        what: &'static str,
    },
    /// A stored document does not load.
    #[error("stored doc {id:?} does not load: {reason}")]
    Corrupt {
        /// The doc.
        id: String,
        /// What Automerge said.
        reason: String,
    },
    /// Automerge refused an operation.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking task panicked or the node is shutting down.
    #[error("internal error: {0}")]
    Internal(String),
}
