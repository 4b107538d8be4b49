//! mergeflow: a peer-to-peer sync node that stores JSON documents as Automerge
//! CRDTs in sled.
//!
//! # Embedding
//!
//! An embedder starts a [`Node`] with [`NodeBuilder`] (from a [`Config`]),
//! reads and writes documents through [`DocHandle`]s ([`Node::doc`]),
//! follows changes with [`Node::subscribe`] ([`feed::FeedItem`]), runs
//! workflows ([`workflow`], [`Node::workflows`]) and backups ([`backup`]),
//! and talks to a running node over HTTP with [`client::Client`]. Every type
//! those meet is public: the modules below marked public, and at the root
//! [`Error`], [`DocError`], [`StoreError`], [`NetError`], [`WriteResult`],
//! [`HistoryEntry`], [`DocInfo`], [`PeerInfo`], [`Status`] and [`Task`].
//! The store, the sync core, the network shell and the writer are not.
//!
//! Features: `cli` (default) builds the `mergeflow` command and what only it
//! needs (clap, indicatif, tracing-subscriber, anyhow); turn it off for the
//! library alone. `test-utils` adds the crate's test machinery: the fuzz
//! entry points (`mergeflow::fuzzing`), store fault injection, and the
//! internals its own tests reach (`mergeflow::testing`). Neither is needed by
//! an embedder.
//!
//! TLS: the node's HTTPS clients (`http` steps, HTTP pulls, [`client`]) and
//! its `mqtts://` bridge use rustls with ring. Before it builds its first
//! HTTPS client, the node makes ring rustls' process-wide default provider
//! ([`http_allow::install_tls_provider`]) unless the application has set
//! one: an application that calls `CryptoProvider::install_default` itself
//! should do so before it starts a node (afterwards it gets an error back,
//! and the node's choice stands).
//!
//! # Layout
//!
//! One line per module of `src/` (public ones linked):
//!
//! - [`access`]: who may see and write which docs: doc-glob scopes and the
//!   API's scoped tokens (`[[api.tokens]]`).
//! - [`api`]: the axum HTTP API and its JSON error mapping, browser safety
//!   (`api/guard.rs`), connection limits (`api/serve.rs`), history and
//!   workflow routes.
//! - [`backup`]: the backup file format and `Node::backup` / restore.
//! - `builder.rs`: [`NodeBuilder`]: opens the store and starts the document
//!   service, workflows, network and HTTP API (above both `node` and `api`,
//!   so the node does not import the API that serves it).
//! - `cli_support.rs` (feature `cli`): what the `mergeflow` and
//!   `mergeflow-tools` commands share: an async main that prints its error
//!   once, progress bars.
//! - [`client`]: the typed HTTP client of a node's API (the CLI, tools and
//!   tests use it).
//! - [`config`]: TOML file + `MERGEFLOW_*` env + flags, validated.
//! - [`doc`]: doc ids, JSON <-> Automerge, merge patches, ops, JSON Pointer
//!   paths, conflict stamps, size limits, the cache of loaded documents.
//! - [`duration`]: durations written as text (`"30s"`), read the same way by
//!   workflow definitions and the config.
//! - `error.rs`: [`Error`], the library's top-level error.
//! - [`feed`]: the change feed behind [`Node::subscribe`] and run events.
//! - `fuzzing.rs` (`test-utils` only): one fuzz target per decoder of
//!   outside input, for `fuzz/` and `tests/fuzz.rs`.
//! - [`trust`]: change signatures: a node signs every change it admits
//!   with its ed25519 identity, bound to the doc (a leaf).
//! - [`http_allow`]: where `http` steps of applied workflow definitions may
//!   post (`workflow.http_allow`), and the client that holds them to it.
//! - `amrepo/`: the automerge-repo sync protocol's messages (CBOR) and the
//!   mapping of its document URLs to named docs (issue 20, not yet served).
//! - `id.rs`: the syntax of a doc id, shared by [`DocId`] and the wire codec
//!   (a leaf).
//! - `latency.rs`: the latency histogram the store, docs and workflows
//!   record into (a leaf).
//! - `metrics.rs`: the node's one Prometheus registry, encoded at
//!   `/metrics`, and the work queues that show their depth there (a leaf).
//! - `net/`: the libp2p swarm task that carries sync messages between
//!   peers: links, rate limits, liveness, bans.
//! - `node.rs`: [`Node`] and [`DocHandle`]: the running node's handles,
//!   lifecycle and shutdown.
//! - `origin.rs`: host and origin syntax, shared by the config check and the
//!   API's browser guard (a leaf, so that config and api do not import each
//!   other).
//! - `status.rs`: [`Status`] (`/v1/status`) and the numbers `/metrics`
//!   reads from the same sources at scrape time.
//! - `progress.rs`: long operations in progress ([`Tasks`], in [`Status`]).
//! - `runtime/`: the writer thread that applies local writes and remote
//!   changes durably, the sync host on that thread, its `Inbox`,
//!   replica confirmations and the tick; the document service (`Docs`).
//! - `store/`: the only code that touches sled: trees, key encoding, group
//!   commit, schema version, node identity, the workflow run log.
//! - `sync/`: the sans-IO sync protocol core (fast path, repair sessions,
//!   anti-entropy digests, wire codec); no I/O, no clock.
//! - [`workflow`]: workflows triggered by merges: definitions, expressions,
//!   the engine, effects, the run log.
//! - `main.rs` and `cli/` (feature `cli`): the `mergeflow` command, a thin
//!   client of the HTTP API plus `start`; `main.rs` parses and dispatches,
//!   each command group has its file in `cli/`.
//!
//! The fault campaign's pieces and the load generator are the workspace
//! member `tools/mergeflow-tools`, not part of this crate.
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

pub mod access;
pub mod api;
pub mod backup;
mod builder;
#[cfg(feature = "cli")]
pub mod cli_support;
pub mod client;
pub mod config;
pub mod doc;
pub mod duration;
pub mod feed;
#[cfg(feature = "test-utils")]
pub mod fuzzing;
pub mod grants;
pub mod http_allow;
mod latency;
mod metrics;
pub mod mqtt;
#[cfg_attr(not(feature = "test-utils"), allow(dead_code, unused_imports))]
mod net;
mod node;
mod progress;
#[cfg_attr(not(feature = "test-utils"), allow(dead_code, unused_imports))]
mod runtime;
pub mod scope;
#[cfg_attr(not(feature = "test-utils"), allow(dead_code, unused_imports))]
mod store;
#[cfg_attr(not(feature = "test-utils"), allow(dead_code, unused_imports))]
mod sync;
pub mod topic;
pub mod trust;
pub mod workflow;

mod amrepo;
mod error;
mod id;
mod origin;
mod status;

pub use builder::NodeBuilder;
pub use config::Config;
pub use doc::{DocError, DocId};
pub use error::Error;
pub use net::{NetError, PeerInfo, PeerTraffic, generate_key};
pub use node::{DocHandle, Node};
pub use progress::{Task, TaskGuard, Tasks};
pub use runtime::{DocInfo, DocsConfig, HistoryEntry, WriteResult};
pub use status::Status;
pub use store::StoreError;

/// The crate's internals, for its own tests, benches and fuzz targets (the
/// `test-utils` feature): the store, the sync core and its wire codec, the
/// document service and the network shell's helpers. Not an API: an
/// embedder has [`Node`], [`DocHandle`] and the public modules.
#[cfg(feature = "test-utils")]
#[doc(hidden)]
pub mod testing {
    /// The store (`src/store`).
    pub mod store {
        pub use crate::store::*;
    }
    /// The sans-IO sync core, its digests and wire codec (`src/sync`).
    pub mod sync {
        pub use crate::sync::*;
    }
    /// The document service and the writer (`src/runtime`).
    pub mod runtime {
        pub use crate::runtime::*;
    }
    /// The automerge-repo protocol's messages and URLs (`src/amrepo`).
    pub mod amrepo {
        pub use crate::amrepo::{url, wire};
    }
    /// The libp2p shell's helpers (`src/net`).
    pub mod net {
        pub use crate::net::*;
    }
}
