//! The config's sections, one struct per TOML table, and their defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::doc::StringMode;
use crate::runtime::DocsConfig;

/// The node's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[node]`
    pub node: NodeConfig,
    /// `[store]`
    pub store: StoreConfig,
    /// `[doc]`
    pub doc: DocConfig,
    /// `[api]`
    pub api: ApiConfig,
    /// `[net]`
    pub net: NetTable,
    /// `[log]`
    pub log: LogConfig,
    /// `[perf]`
    pub perf: PerfConfig,
    /// `[workflow]`
    pub workflow: WorkflowConfig,
    /// `[automerge]`
    pub automerge: AutomergeConfig,
    /// `[[mqtt]]`: MQTT brokers this node bridges to.
    pub mqtt: Vec<super::MqttBroker>,
}

/// `[automerge]`: automerge-repo clients (JS and browser apps, samod) on
/// the API listener's `GET /v1/automerge` WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutomergeConfig {
    /// Serve `/v1/automerge`.
    pub enabled: bool,
    /// Most client connections at once (they do not count against
    /// `api.max_connections` once upgraded); more get 503.
    pub max_connections: usize,
    /// Largest WebSocket message taken from a client, in bytes; a bigger
    /// one closes the connection with an error.
    pub max_message_bytes: usize,
    /// Most docs one connection may follow.
    pub max_docs_per_connection: usize,
    /// Messages queued from the node to one client; a client that lets more
    /// pile up unread is disconnected.
    pub queue: usize,
    /// Milliseconds between pings to a client; one silent for two of them
    /// is disconnected.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub ping_ms: u64,
    /// Milliseconds a ticket from `POST /v1/tickets` stays valid.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub ticket_ttl_ms: u64,
    /// `[[automerge.servers]]`: automerge-repo sync servers this node
    /// dials and keeps its matching docs synced with.
    pub servers: Vec<AutomergeServer>,
}

/// One `[[automerge.servers]]` entry: a sync server to dial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutomergeServer {
    /// Its WebSocket URL, `ws://host:port/path` (with any token in the
    /// query, as that server wants it).
    pub url: String,
    /// The docs shared with it: a doc id glob (`notes/**`; `am/**` for
    /// docs that automerge-repo clients created).
    #[serde(default = "all_docs")]
    pub docs: String,
}

fn all_docs() -> String {
    "**".into()
}

impl Default for AutomergeConfig {
    fn default() -> Self {
        Config::default().automerge
    }
}

/// `[workflow]`: where definitions come from and how runs are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkflowConfig {
    /// Directory of workflow definitions (`*.toml`), loaded at start and
    /// re-read when its files change; empty means `<data_dir>/workflows`.
    pub dir: PathBuf,
    /// Longest chain of runs triggered by runs' own writes.
    pub max_depth: u32,
    /// Runs executing at once.
    pub concurrency: usize,
    /// Finished runs kept in the run log (older ones are pruned); dead runs
    /// are kept up to as many again.
    pub keep_runs: u64,
    /// A merge from a peer triggers its runs after this many milliseconds,
    /// so that the peer's own derived writes, usually right behind, arrive
    /// first and make the run a no-op; 0 runs at once.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub remote_delay_ms: u64,
    /// How long a node waits for the owner of an effect to deliver it
    /// before taking it over itself.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub effect_wait_ms: u64,
    /// Let definitions applied through the API (which sync from any peer)
    /// run `exec` steps on this node. Off: only workflow-dir files may.
    pub allow_applied_exec: bool,
    /// Where `http` steps of applied definitions may post: host names
    /// (`hooks.example.com`, optionally `:port`), IP addresses and CIDRs
    /// (`10.0.0.0/8`). A listed host reaches loopback and private
    /// addresses only when their range is listed too. Empty: applied
    /// definitions post nowhere; workflow-dir files are not limited.
    pub http_allow: Vec<String>,
    /// Most bytes of one step's output kept in its run record (an `http`
    /// answer's body, an `exec` command's stdout): a larger one fails the
    /// step with an error saying so, and is never cut silently.
    pub max_step_output: u64,
    /// A PEM file of CA certificates that `https://` steps trust besides
    /// the system's (an internal CA); empty: the system's only.
    pub tls_ca: PathBuf,
}

/// `[node]`: identity and where data lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Data directory (created if missing).
    pub data_dir: PathBuf,
    /// Labels workflows can select nodes by, and expressions read as `node`.
    pub labels: BTreeMap<String, String>,
    /// This node's priority: a `resolve` step with `policy = "priority"`
    /// keeps the value written by the node with the higher priority.
    pub priority: i64,
    /// Light mode, for small edge devices: the defaults of [`Config::light`]
    /// (no dashboard, smaller caches and queues, anti-entropy every two
    /// minutes) under whatever the file, environment and flags set. Flag:
    /// `--light`; env: `MERGEFLOW_NODE_LIGHT`.
    pub light: bool,
    /// The docs this node holds and is sent (doc globs; `**` for all, the
    /// default). Peers send it nothing else, and it takes no local write
    /// outside them (see the README's "Partial replication").
    pub replicate: Vec<String>,
}

/// `[store]`: sled and the document cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Documents kept loaded in memory.
    pub cache_docs: usize,
    /// Stored bytes of the documents kept loaded in memory.
    pub cache_doc_bytes: u64,
    /// Compact a document's change tail into a snapshot at this many changes
    /// (a document stored in under 16 KiB, with at most 256 changes: from 8
    /// on, if that is fewer).
    pub compact_after_changes: u64,
    /// Remote changes merged from the fast path that nobody waits on are
    /// flushed within this many milliseconds instead of one flush each; 0
    /// flushes each before its change-feed event.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub remote_flush_ms: u64,
    /// Also fsync sled's files after each flush, so that acknowledged writes
    /// survive power loss and OS crashes, not only a killed process.
    pub fsync: bool,
}

/// `[doc]`: document limits and JSON mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DocConfig {
    /// `scalar` or `text`: how JSON strings are stored.
    pub strings: StringMode,
    /// Largest change, in bytes.
    pub max_change_bytes: u64,
    /// Largest stored document, in bytes.
    pub max_doc_bytes: u64,
    /// Deepest nesting of objects and lists in a document (the root is 0,
    /// `/a` is 1). Local writes and changes from peers that would nest
    /// deeper are refused.
    pub max_depth: usize,
}

/// `[api]`: the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Bearer token every request must carry (`Authorization: Bearer
    /// <token>`), except `/healthz`; empty: none. Required (16 characters or
    /// more) when `listen` is not a loopback address. Env:
    /// `MERGEFLOW_API_TOKEN`, which the CLI sends too.
    pub token: String,
    /// Named tokens with rights over some docs only (`[[api.tokens]]`);
    /// `token` above is the admin token. With any token set, every request
    /// but `/healthz` and the dashboard page must carry one.
    pub tokens: Vec<ApiToken>,
    /// Serve the web dashboard at `/`.
    pub dashboard: bool,
    /// Web page origins (`scheme://host[:port]`, or `*` for any) whose
    /// requests the API takes, with CORS headers. Requests from other
    /// origins (a browser sends `Origin`) get 403 `origin_not_allowed`; the
    /// dashboard's own origin is always allowed. `*` needs `api.token`.
    pub allow_origins: Vec<String>,
    /// Host names (optionally `:port`) that requests may name in `Host`
    /// besides the loopback ones, when `listen` is a loopback address
    /// (against DNS rebinding); others get 403 `host_not_allowed`. When
    /// `listen` is not loopback, `Host` is checked only if this is set.
    pub allow_hosts: Vec<String>,
    /// Most HTTP connections open at once; when all are taken, new ones wait
    /// (unaccepted) until one closes.
    pub max_connections: usize,
    /// Milliseconds a connection has to send a request's head (request line
    /// and headers); also how long a keep-alive connection may sit between
    /// requests.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub header_timeout_ms: u64,
    /// Milliseconds a connection with a request in progress may go without a
    /// byte either way while the node waits on the client (a body that stops
    /// arriving, an answer not read). Time the node works, and an event
    /// stream waiting for events, do not count.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub idle_timeout_ms: u64,
}

/// `[[api.tokens]]`: a named token that may read and write the docs its
/// globs cover, and nothing else (no workflows, peers, backups or system
/// docs). The changes it makes record its name (`/history` → `by`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiToken {
    /// Its name: 1 to 64 of `A-Z a-z 0-9 . _ -`, unique.
    pub name: String,
    /// The token itself (16 printable ASCII characters or more), or empty
    /// when `token_sha256` is given instead. Shown as `"(set)"`.
    pub token: String,
    /// The SHA-256 of the token, 64 hex digits (`mergeflow token hash`), so
    /// that the config does not hold the secret.
    pub token_sha256: String,
    /// Doc globs it may read, follow in `/v1/events` and sync over
    /// `/v1/automerge`.
    pub read: Vec<String>,
    /// Doc globs it may write.
    pub write: Vec<String>,
}

/// `[net]`: peer-to-peer sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetTable {
    /// Multiaddrs to listen on. Flag: `--listen` (repeatable).
    pub listen: Vec<String>,
    /// Multiaddrs of peers to dial and keep dialing. Flag: `--peer` (repeatable).
    pub peers: Vec<String>,
    /// Discover peers on the local network with mDNS. Flag: `--no-mdns`.
    pub mdns: bool,
    /// Milliseconds between anti-entropy digests to each peer.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub anti_entropy_ms: u64,
    /// A connected peer not heard from (heartbeats, messages) for this many
    /// milliseconds counts as gone: it is disconnected and redialled.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub peer_timeout_ms: u64,
    /// Milliseconds between heartbeats to each peer (one byte each way,
    /// sent by the side with the smaller peer id; see `net::liveness`).
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub ping_interval_ms: u64,
    /// A sync request unanswered for this many milliseconds fails (its docs
    /// are synced again).
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub request_timeout_ms: u64,
    /// A connection with no open stream is closed after this many
    /// milliseconds (static peers are dialled again).
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub idle_connection_timeout_ms: u64,
    /// Most unanswered sync requests (each a stream) per peer; past it, frames
    /// are dropped and repaired by sync. Below yamux's 512 streams.
    pub max_streams_per_peer: usize,
    /// Longest wait between dials of an unreachable static peer.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub max_redial_backoff_ms: u64,
    /// Rejected inputs from a peer (bad frames, refused changes, rate-limit
    /// overruns at most one a second) after which it is disconnected and banned.
    pub max_strikes: u64,
    /// How long a banned peer is refused, in milliseconds.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub ban_ms: u64,
    /// Most disconnected peers remembered in the peer table (`/v1/peers`),
    /// static peers aside; past it, those gone longest are forgotten.
    pub max_known_peers: usize,
    /// Largest sync message, in bytes.
    pub max_message_bytes: usize,
    /// Pre-shared network key, 64 hex digits (`mergeflow keygen`); empty means
    /// an open network that any node can join.
    pub key: String,
    /// Peer ids allowed to connect; empty allows any (that has the key).
    pub allow: Vec<String>,
    /// Peer ids that may change workflow definitions and grants (the access
    /// file, `mergeflow access apply`); empty: every admitted node may.
    pub admins: Vec<String>,
    /// Run an open network: listen on addresses other machines can reach
    /// (and discover peers with mDNS) without `net.key` or `net.allow`, so
    /// that any node that reaches this one can join. Off: such a config is
    /// refused at start.
    pub open: bool,
    /// Most connections at once (in and out); more are refused.
    pub max_connections: u32,
    /// Learn of peers beyond `peers` and mDNS through Kademlia (the peers'
    /// peers), and connect to them.
    pub kademlia: bool,
    /// Carry the fast path (changes, deletes) on a gossipsub topic, forwarded
    /// through a mesh of peers, instead of sending each change straight to
    /// every connected peer (relayed once by each). Off by default: on
    /// loopback it is slower (see BENCHMARKS.md); it pays off in large meshes.
    pub gossipsub: bool,
    /// Most bytes per second this node takes from one peer; frames over it
    /// are dropped unread (the sender repairs them later) and a peer that
    /// stays over is banned. 0 means unlimited.
    pub max_peer_bytes_per_sec: u64,
    /// Most frames (sync requests) per second taken from one peer. 0 means
    /// unlimited.
    pub max_peer_frames_per_sec: u64,
}

/// `[log]`: tracing output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// An env-filter directive such as `info` or `mergeflow=debug,info`.
    /// `RUST_LOG`, when set, wins.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[perf]`: queue sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerfConfig {
    /// Writers that may wait for the group-commit flush at once; more wait for room.
    pub flush_queue: usize,
    /// Writes queued for the writer thread; more wait for room.
    pub write_queue: usize,
    /// Most writes applied together in one sled batch.
    pub write_batch: usize,
    /// Sync core outputs queued for the network; more are dropped (and repaired
    /// by anti-entropy).
    pub sync_queue: usize,
    /// Milliseconds that shutdown waits for in-flight requests before giving up.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub shutdown_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        let docs = DocsConfig::default();
        Config {
            node: NodeConfig {
                data_dir: PathBuf::from("mergeflow-data"),
                labels: BTreeMap::new(),
                priority: 0,
                light: false,
                replicate: vec!["**".into()],
            },
            store: StoreConfig {
                cache_bytes: 64 << 20,
                cache_docs: docs.cache_docs,
                cache_doc_bytes: docs.cache_doc_bytes,
                compact_after_changes: docs.compact_after_changes,
                remote_flush_ms: 100,
                fsync: false,
            },
            doc: DocConfig {
                strings: docs.strings,
                max_change_bytes: docs.max_change_bytes,
                max_doc_bytes: docs.max_doc_bytes,
                max_depth: docs.max_depth,
            },
            api: ApiConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
                max_body_bytes: 4 << 20,
                token: String::new(),
                tokens: vec![],
                dashboard: true,
                allow_origins: vec![],
                allow_hosts: vec![],
                max_connections: 1024,
                header_timeout_ms: 10_000,
                idle_timeout_ms: 60_000,
            },
            net: NetTable {
                // Loopback: closed by default. Other machines need net.key
                // (or net.open) and a listen address they can reach.
                listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
                peers: vec![],
                mdns: true,
                anti_entropy_ms: 30_000,
                peer_timeout_ms: 8_000,
                ping_interval_ms: 4_000,
                request_timeout_ms: 30_000,
                idle_connection_timeout_ms: 60_000,
                max_streams_per_peer: 256,
                max_redial_backoff_ms: 5_000,
                max_strikes: 10,
                ban_ms: 300_000,
                max_known_peers: crate::net::MAX_KNOWN_PEERS,
                max_message_bytes: 16 << 20,
                key: String::new(),
                allow: vec![],
                admins: vec![],
                open: false,
                max_connections: 256,
                kademlia: true,
                gossipsub: false,
                max_peer_bytes_per_sec: 32 << 20,
                max_peer_frames_per_sec: 5_000,
            },
            log: LogConfig {
                level: "info".into(),
                format: LogFormat::Text,
            },
            perf: PerfConfig {
                flush_queue: 4096,
                write_queue: docs.write_queue,
                write_batch: docs.write_batch,
                sync_queue: 4096,
                shutdown_timeout_ms: 10_000,
            },
            automerge: AutomergeConfig {
                enabled: true,
                max_connections: 1024,
                max_message_bytes: 16 << 20,
                max_docs_per_connection: 10_000,
                queue: 1024,
                ping_ms: 20_000,
                ticket_ttl_ms: 60_000,
                servers: Vec::new(),
            },
            workflow: WorkflowConfig {
                dir: PathBuf::new(),
                max_depth: 8,
                concurrency: 64,
                keep_runs: 10_000,
                remote_delay_ms: 100,
                effect_wait_ms: 60_000,
                allow_applied_exec: false,
                http_allow: vec![],
                max_step_output: 1 << 20,
                tls_ca: PathBuf::new(),
            },
            mqtt: Vec::new(),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Config::default().node
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Config::default().store
    }
}

impl Default for DocConfig {
    fn default() -> Self {
        Config::default().doc
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Config::default().api
    }
}

impl Default for NetTable {
    fn default() -> Self {
        Config::default().net
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Config::default().log
    }
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Config::default().workflow
    }
}

impl Default for PerfConfig {
    fn default() -> Self {
        Config::default().perf
    }
}
