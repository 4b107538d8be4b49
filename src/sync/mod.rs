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
//! - **Partial replication.** Each side's first message is its
//!   [`Message::Scope`] (`node.replicate`); with the grants' read rules
//!   ([`Input::Reads`]) it decides the docs both sides hold. Nothing about a
//!   doc outside that common scope is sent, digests compare it only, and
//!   what a peer sends outside our own scope is dropped (see `scope.rs`).
//! - **Tombstones.** A deleted doc is in the digest as deleted; a peer holding it
//!   live is told with [`Message::Deleted`] and deletes it too. Changes and sync
//!   messages for a deleted doc are ignored, so it does not come back.
//!
//! # Example: two cores converge
//!
//! See `tests/sim.rs` for a full simulator; in short, the shell loops:
//! `for out in core.handle(now, &mut rng, input, &mut docs) { deliver(out) }`.
pub mod codec;
mod core;
pub mod digest;
mod received;
pub mod replicate;
mod scope;
mod sessions;
mod types;

pub use core::{Core, QUIET_DIGESTS, SETTLE_MS};
pub use digest::{Digest, DocState};
pub use replicate::{ReadRule, Replicate};
pub use types::{
    Applied, DocAccess, FastChange, Input, Message, Output, PeerKey, Refusal, SyncConfig, SyncStats,
};
