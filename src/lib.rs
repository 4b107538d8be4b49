//! mergeflow: a peer-to-peer sync node that stores JSON documents as Automerge
//! CRDTs in sled.
//!
//! # Layout
//!
//! - [`node`]: [`Node`]: the running node's handles, lifecycle and shutdown.
//! - `builder.rs`: [`NodeBuilder`]: opens the store and starts the document
//!   service, workflows, network and HTTP API (above both `node` and `api`,
//!   so the node does not import the API that serves it).
//! - [`store`]: the only code that touches sled: trees, key encoding, group
//!   commit, schema version, node identity.
//! - [`doc`]: doc ids, JSON <-> Automerge, merge patches, ops, JSON Pointer
//!   paths, size limits, the document service.
//! - [`sync`]: the sans-IO sync protocol core (fast path, repair sessions,
//!   anti-entropy digests); no I/O, no clock.
//! - [`net`]: the libp2p swarm task that carries sync messages between peers.
//! - [`api`]: the axum HTTP API and its JSON error mapping, browser safety
//!   (`api/guard.rs`) and connection limits (`api/serve.rs`).
//! - [`config`]: TOML file + `MERGEFLOW_*` env + flags, validated.
//! - [`duration`]: durations written as text (`"30s"`), read the same way by
//!   workflow definitions and the config.
//! - [`latency`]: the latency histogram the store, docs and workflows record
//!   into (a leaf; [`metrics`] renders).
//! - `origin.rs`: host and origin syntax, shared by the config check and the
//!   API's browser guard (a leaf, so that config and api do not import each
//!   other).
//! - `main.rs` and `cli/`: the CLI, a thin client of the HTTP API plus
//!   `start`; `main.rs` parses and dispatches, each command group has its
//!   file in `cli/`.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), mergeflow::Error> {
//! let node = mergeflow::Node::builder().data_dir("./data").start().await?;
//! let doc = node.doc("notes/today")?;
//! doc.patch(serde_json::json!({"title": "hello"})).await?; // durable on return
//! assert_eq!(doc.get_path("/title").await?, "hello");
//! node.shutdown().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod backup;
mod builder;
pub mod client;
pub mod config;
pub mod doc;
pub mod duration;
pub mod feed;
#[cfg(feature = "test-utils")]
pub mod fuzzing;
pub mod latency;
pub mod metrics;
pub mod net;
pub mod node;
pub mod progress;
pub mod runtime;
pub mod store;
pub mod sync;
pub mod workflow;

mod error;
mod id;
mod origin;

pub use builder::NodeBuilder;
pub use config::Config;
pub use doc::{DocError, DocId};
pub use error::Error;
pub use node::{DocHandle, Node, Status};
