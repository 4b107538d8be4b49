//! The automerge-repo sync protocol: JS and browser clients
//! (`@automerge/automerge-repo`), samod and other automerge-repo
//! implementations sync with the node over a WebSocket
//! (`GET /v1/automerge`).
//!
//! - `wire.rs`: the protocol's CBOR messages;
//! - `url.rs`: document URLs and how they name mergeflow's docs;
//! - `server.rs`: the endpoint's connections, handing sync messages to the
//!   runtime (`runtime/clients.rs` holds the per-(connection, doc) sync
//!   states on the writer thread) and relaying ephemeral messages;
//! - `dial.rs`: the node as a client of other sync servers
//!   (`[[automerge.servers]]`), on the same runtime connections.

pub mod dial;
pub mod server;
pub mod url;
pub mod wire;
