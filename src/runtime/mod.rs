//! The node's runtime: the single writer thread that applies local writes and
//! remote changes durably, the sync host that runs the sans-IO sync core
//! ([`crate::sync::Core`]) on that thread, replica confirmations, and the tick.
//!
//! Everything that changes a document goes through here:
//! - [`Docs`] is the front door for local writes and reads (the HTTP API, the
//!   library's [`crate::DocHandle`], workflows, backups): a write is queued
//!   for the writer thread (`writer.rs`), applied under the doc's lock
//!   (`local.rs`), stored in one sled batch per round (`persist.rs`; a big
//!   doc's compaction is saved on a helper thread: `compact.rs`) and
//!   answered after the group-commit flush.
//! - [`Inbox`] is the transport-agnostic way in for peers: a connection id
//!   (a peer's id as a string) plus a sync [`Input`](crate::sync::Input). The
//!   writer hands it to the sync core with a [`Round`](round::Round) as the
//!   core's document access (`host.rs`, `round.rs`; a doc pushed whole:
//!   `push.rs`); the core's
//!   [`Output`](crate::sync::Output)s go to the channel given at start, to be
//!   sent to their connections by the transport (`crate::net` today).
//!
//! # When is a write durable?
//!
//! 1. The writer thread takes every queued write (up to `perf.write_batch`),
//!    applies each to its in-memory doc under the doc's lock and adds the
//!    change and the doc's new meta to one [`crate::store::WriteBatch`]. Readers may see a
//!    change from here on.
//! 2. The batch is applied to sled (after a crash each doc is at one of the
//!    states the batch passed through), then handed to the group-commit
//!    flush thread, which acknowledges every write whose flush has returned.
//! 3. Only then does [`Docs`] return `Ok`: the change survives a process kill.
//!
//! If a write fails before step 2, its doc is rolled back in memory; if the
//! batch fails, every doc it touched is reloaded from the store, so memory never
//! holds a change the store lacks (other than between steps 1 and 2).

mod clients;
mod compact;
mod docs;
mod host;
mod inbox;
mod local;
mod persist;
mod push;
mod read;
mod replicas;
mod round;
mod sigs;
mod state;
mod tick;
mod unflushed;
mod writer;
mod writes;

pub use clients::{ClientOut, ConnId, ConnShared};
pub use docs::Docs;
pub use inbox::{ClientConn, Inbox, Stopped};
pub use read::{DocInfo, DocPage, HistoryEntry, ListQuery, ReadAt, Snapshot};
pub use replicas::Held;
pub use state::{Change, ChangeFn, DocsConfig, Parts, PeerSyncView, WriteOpts, WriteResult};
pub use tick::spawn_tick;
