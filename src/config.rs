//! Configuration: defaults < TOML file < `MERGEFLOW_<TABLE>_<KEY>` env < flags.
//!
//! Every key is documented in `config.example.toml` (a test parses it). An unknown
//! key or a bad value is an error that names the key and where it came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Compact a document's change tail into a snapshot at this many changes.
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
    /// A connected peer not heard from (pings, messages) for this many
    /// milliseconds counts as gone: it is disconnected and redialled.
    #[serde(deserialize_with = "crate::duration::de_ms")]
    pub peer_timeout_ms: u64,
    /// Milliseconds between pings on each connection.
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
                dashboard: true,
                allow_origins: vec![],
                allow_hosts: vec![],
                max_connections: 1024,
                header_timeout_ms: 10_000,
                idle_timeout_ms: 60_000,
            },
            net: NetTable {
                listen: vec!["/ip4/0.0.0.0/tcp/0".into()],
                peers: vec![],
                mdns: true,
                anti_entropy_ms: 30_000,
                peer_timeout_ms: 8_000,
                ping_interval_ms: 2_000,
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
            workflow: WorkflowConfig {
                dir: PathBuf::new(),
                max_depth: 8,
                concurrency: 64,
                keep_runs: 10_000,
                remote_delay_ms: 100,
                effect_wait_ms: 60_000,
                allow_applied_exec: false,
            },
        }
    }
}

/// Sets every key of `over` in `base`, descending into tables both have.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
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

/// Errors loading configuration; each names the key or file and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has a bad or unknown key.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment variable names an unknown key or has a bad value.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("config key {key}: {message}")]
    Invalid {
        /// `table.key`
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Values given as command-line flags; `None` leaves the lower layers.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--api`
    pub api_listen: Option<SocketAddr>,
    /// `--log-format`
    pub log_format: Option<LogFormat>,
    /// `--log-level`
    pub log_level: Option<String>,
    /// `--listen` (replaces `net.listen` when given)
    pub listen: Vec<String>,
    /// `--peer` (added to `net.peers`)
    pub peers: Vec<String>,
    /// `--no-mdns`
    pub no_mdns: bool,
    /// `--light`
    pub light: bool,
}

impl Config {
    /// Loads the config: defaults, then `file`, then `MERGEFLOW_*` variables from
    /// `env`, then `flags`; validates the result.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file line, variable or key at fault.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let light_env = env
            .iter()
            .any(|(k, v)| k == "MERGEFLOW_NODE_LIGHT" && matches!(v.trim(), "1" | "true"));
        let mut config = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let file_err = |message| ConfigError::File {
                    path: path.to_path_buf(),
                    message,
                };
                // Parsed alone first, for errors that name the line.
                let parsed = Config::from_toml(&text).map_err(file_err)?;
                if parsed.node.light || light_env || flags.light {
                    let file: toml::Table =
                        toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
                    let mut base =
                        toml::Table::try_from(Config::light()).expect("config serializes");
                    merge_tables(&mut base, file);
                    base.try_into()
                        .map_err(|e: toml::de::Error| file_err(e.to_string()))?
                } else {
                    parsed
                }
            }
        };
        if file.is_none() && (light_env || flags.light) {
            config = Config::light();
        }
        config.apply_env(env)?;
        if let Some(d) = &flags.data_dir {
            config.node.data_dir = d.clone();
        }
        if let Some(a) = flags.api_listen {
            config.api.listen = a;
        }
        if let Some(f) = flags.log_format {
            config.log.format = f;
        }
        if let Some(l) = &flags.log_level {
            config.log.level = l.clone();
        }
        if !flags.listen.is_empty() {
            config.net.listen = flags.listen.clone();
        }
        config.net.peers.extend(flags.peers.iter().cloned());
        if flags.no_mdns {
            config.net.mdns = false;
        }
        config.validate()?;
        Ok(config)
    }

    /// The defaults of light mode (`node.light`), for edge devices with
    /// little memory: no dashboard; an 8 MiB sled cache, 128 docs (8 MiB)
    /// in the doc cache; queues of 256; 4 workflow runs at once; anti-entropy
    /// every 120 s; at most 32 peer connections and 128 API connections.
    pub fn light() -> Config {
        let mut c = Config::default();
        c.node.light = true;
        c.api.dashboard = false;
        c.store.cache_bytes = 8 << 20;
        c.store.cache_docs = 128;
        c.store.cache_doc_bytes = 8 << 20;
        c.net.anti_entropy_ms = 120_000;
        c.net.max_connections = 32;
        c.api.max_connections = 128;
        c.perf.flush_queue = 256;
        c.perf.write_queue = 256;
        c.perf.sync_queue = 256;
        c.workflow.concurrency = 4;
        c.workflow.keep_runs = 1_000;
        c
    }

    /// The config as JSON with its secrets hidden: `api.token` and `net.key`
    /// read `"(set)"` when set (empty when not). For `/v1/status` and
    /// `mergeflow status`, which show the effective config.
    pub fn redacted(&self) -> serde_json::Value {
        let mut c = self.clone();
        for secret in [&mut c.api.token, &mut c.net.key] {
            if !secret.is_empty() {
                *secret = "(set)".to_string();
            }
        }
        serde_json::to_value(&c).expect("config serializes")
    }

    /// Parses TOML text, with the parser's message (line, column, key) on error.
    ///
    /// # Errors
    /// The message.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Applies `MERGEFLOW_<TABLE>_<KEY>=value` variables; other variables are ignored.
    fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let current = toml::Table::try_from(&*self).expect("config serializes");
        let mut tables: BTreeMap<String, toml::Table> = BTreeMap::new();
        let mut any = false;
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix("MERGEFLOW_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let Some((table, key)) = current.keys().find_map(|t| {
                Some((
                    t.as_str(),
                    rest.strip_prefix(t.as_str())?.strip_prefix('_')?,
                ))
            }) else {
                continue; // Not a config table (e.g. MERGEFLOW_API for the CLI).
            };
            let err = |message: String| ConfigError::Env {
                var: var.clone(),
                message,
            };
            let Some(old) = current[table].as_table().and_then(|t| t.get(key)) else {
                let known: Vec<_> = current[table]
                    .as_table()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.as_str())
                    .collect();
                return Err(err(format!(
                    "unknown config key {table}.{key}; [{table}] has: {}",
                    known.join(", ")
                )));
            };
            let value = match old {
                toml::Value::String(_) => toml::Value::String(raw.clone()),
                // A duration key takes "30s" as the file does (the integer
                // form, milliseconds, is parsed below).
                toml::Value::Integer(_)
                    if key.ends_with("_ms") && raw.trim().parse::<i64>().is_err() =>
                {
                    crate::duration::parse_ms(&raw).map_err(|e| {
                        err(format!(
                            "{table}.{key}: {e} (or an integer of milliseconds)"
                        ))
                    })?;
                    toml::Value::String(raw.trim().to_string())
                }
                _ => toml::from_str::<toml::Table>(&format!("v = {raw}"))
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .filter(|v| v.same_type(old))
                    .ok_or_else(|| {
                        err(format!(
                            "{table}.{key} expects a TOML {}, got {raw:?}",
                            old.type_str()
                        ))
                    })?,
            };
            tables
                .entry(table.to_string())
                .or_default()
                .insert(key.to_string(), value);
            any = true;
        }
        if !any {
            return Ok(());
        }
        let mut merged = current;
        for (table, values) in tables {
            if let Some(t) = merged.get_mut(&table).and_then(|t| t.as_table_mut()) {
                t.extend(values);
            }
        }
        *self = merged
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Env {
                var: "MERGEFLOW_*".into(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// Checks ranges and cross-key rules.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if self.store.cache_docs == 0 {
            return invalid("store.cache_docs", "must be at least 1");
        }
        if self.store.compact_after_changes == 0 {
            return invalid("store.compact_after_changes", "must be at least 1");
        }
        if self.store.remote_flush_ms > 60_000 {
            return invalid(
                "store.remote_flush_ms",
                "must be at most 60000 (one minute)",
            );
        }
        if self.workflow.max_depth == 0 {
            return invalid("workflow.max_depth", "must be at least 1");
        }
        if self.workflow.concurrency == 0 {
            return invalid("workflow.concurrency", "must be at least 1");
        }
        if self.workflow.remote_delay_ms > 60_000 {
            return invalid(
                "workflow.remote_delay_ms",
                "must be at most 60000 (one minute)",
            );
        }
        if let Some(k) = self
            .node
            .labels
            .keys()
            .find(|k| k.is_empty() || k.len() > 64)
        {
            return invalid(
                "node.labels",
                &format!("label name {k:?}: 1 to 64 characters"),
            );
        }
        if self.doc.max_change_bytes == 0 {
            return invalid("doc.max_change_bytes", "must be at least 1");
        }
        if !(1..=crate::doc::MAX_READ_DEPTH).contains(&self.doc.max_depth) {
            return invalid(
                "doc.max_depth",
                &format!("must be between 1 and {}", crate::doc::MAX_READ_DEPTH),
            );
        }
        if self.doc.max_doc_bytes < self.doc.max_change_bytes {
            return invalid("doc.max_doc_bytes", "must be at least doc.max_change_bytes");
        }
        if self.api.max_body_bytes < 1024 {
            return invalid("api.max_body_bytes", "must be at least 1024");
        }
        if self.api.token.is_empty() && !self.api.listen.ip().is_loopback() {
            return invalid(
                "api.token",
                &format!(
                    "api.listen {} is reachable from other machines: set api.token \
                     (or MERGEFLOW_API_TOKEN) so that only clients that send it can use \
                     the API, or listen on 127.0.0.1",
                    self.api.listen
                ),
            );
        }
        if !self.api.token.is_empty() && self.api.token.chars().count() < 16 {
            return invalid("api.token", "must be at least 16 characters");
        }
        if self.api.token.trim() != self.api.token {
            // HTTP drops a header value's surrounding whitespace: such a
            // token could never match.
            return invalid(
                "api.token",
                "must not begin or end with whitespace (HTTP strips it from the \
                 Authorization header, so no client could send this token)",
            );
        }
        if let Some(c) = self
            .api
            .token
            .chars()
            .find(|c| !(c.is_ascii_graphic() || *c == ' '))
        {
            return invalid(
                "api.token",
                &format!(
                    "must be printable ASCII (an HTTP header cannot carry it otherwise); \
                     it holds '{}'",
                    c.escape_default()
                ),
            );
        }
        if let Some(Err(e)) = self
            .api
            .allow_origins
            .iter()
            .filter(|o| *o != "*")
            .map(|o| crate::origin::normalise_origin(o))
            .find(Result::is_err)
        {
            return invalid(
                "api.allow_origins",
                &format!("{e} (example: \"http://localhost:5173\", or \"*\")"),
            );
        }
        if self.api.allow_origins.iter().any(|o| o == "*") && self.api.token.is_empty() {
            return invalid(
                "api.allow_origins",
                "\"*\" lets every web page the user visits read and write this node; \
                 set api.token too (pages do not have it), or list the origins you mean",
            );
        }
        if let Some(Err(e)) = self
            .api
            .allow_hosts
            .iter()
            .map(|h| crate::origin::parse_allowed_host(h))
            .find(Result::is_err)
        {
            return invalid(
                "api.allow_hosts",
                &format!("{e} (example: \"nas.local\" or \"nas.local:7700\")"),
            );
        }
        if self.api.max_connections == 0 {
            return invalid("api.max_connections", "must be at least 1");
        }
        for (key, ms) in [
            ("api.header_timeout_ms", self.api.header_timeout_ms),
            ("api.idle_timeout_ms", self.api.idle_timeout_ms),
        ] {
            if ms == 0 || ms > 86_400_000 {
                return invalid(key, "must be 1 to 86400000 (one day)");
            }
        }
        if self.perf.flush_queue == 0 {
            return invalid("perf.flush_queue", "must be at least 1");
        }
        if self.perf.write_queue == 0 {
            return invalid("perf.write_queue", "must be at least 1");
        }
        if self.perf.sync_queue == 0 {
            return invalid("perf.sync_queue", "must be at least 1");
        }
        if self.perf.write_batch == 0 {
            return invalid("perf.write_batch", "must be at least 1");
        }
        for (key, addrs) in [
            ("net.listen", &self.net.listen),
            ("net.peers", &self.net.peers),
        ] {
            if let Err(e) = crate::net::parse_addrs(key, addrs) {
                return invalid(key, &e.to_string());
            }
        }
        if !self.net.key.is_empty()
            && let Err(e) = crate::net::parse_key(&self.net.key)
        {
            return invalid("net.key", &e);
        }
        if let Err(e) = crate::net::parse_peer_ids(&self.net.allow) {
            return invalid("net.allow", &e);
        }
        if self.net.anti_entropy_ms == 0 {
            return invalid("net.anti_entropy_ms", "must be at least 1");
        }
        if !(2_000..=600_000).contains(&self.net.peer_timeout_ms) {
            return invalid("net.peer_timeout_ms", "must be 2000 to 600000");
        }
        if !(100..=60_000).contains(&self.net.ping_interval_ms)
            || self.net.ping_interval_ms * 2 > self.net.peer_timeout_ms
        {
            return invalid(
                "net.ping_interval_ms",
                "must be 100 to 60000 and at most half of net.peer_timeout_ms",
            );
        }
        if !(1_000..=600_000).contains(&self.net.request_timeout_ms) {
            return invalid("net.request_timeout_ms", "must be 1000 to 600000");
        }
        if !(1_000..=86_400_000).contains(&self.net.idle_connection_timeout_ms) {
            return invalid("net.idle_connection_timeout_ms", "must be 1000 to 86400000");
        }
        if !(1..=480).contains(&self.net.max_streams_per_peer) {
            return invalid(
                "net.max_streams_per_peer",
                "must be 1 to 480 (yamux allows 512)",
            );
        }
        if !(250..=3_600_000).contains(&self.net.max_redial_backoff_ms) {
            return invalid("net.max_redial_backoff_ms", "must be 250 to 3600000");
        }
        if !(1..=1_000_000).contains(&self.net.max_strikes) {
            return invalid("net.max_strikes", "must be 1 to 1000000");
        }
        if !(1_000..=86_400_000).contains(&self.net.ban_ms) {
            return invalid("net.ban_ms", "must be 1000 to 86400000");
        }
        if !(1..=1_000_000).contains(&self.net.max_known_peers) {
            return invalid("net.max_known_peers", "must be 1 to 1000000");
        }
        if self.net.max_message_bytes < 1024 {
            return invalid("net.max_message_bytes", "must be at least 1024");
        }
        if self.net.max_connections == 0 {
            return invalid("net.max_connections", "must be at least 1");
        }
        if !self.net.key.is_empty() && self.net.listen.iter().any(|a| a.contains("/quic")) {
            return invalid(
                "net.listen",
                "QUIC cannot carry the network key (libp2p's pnet works over TCP only): \
                 remove the /quic-v1 listen address or net.key",
            );
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return invalid("node.data_dir", "must not be empty");
        }
        #[cfg(feature = "cli")]
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid(
                "log.level",
                &format!("{:?} is not a filter: {e}", self.log.level),
            );
        }
        Ok(())
    }

    /// The document service settings.
    pub fn docs(&self) -> DocsConfig {
        DocsConfig {
            strings: self.doc.strings,
            max_change_bytes: self.doc.max_change_bytes,
            max_doc_bytes: self.doc.max_doc_bytes,
            max_depth: self.doc.max_depth,
            compact_after_changes: self.store.compact_after_changes,
            cache_docs: self.store.cache_docs,
            cache_doc_bytes: self.store.cache_doc_bytes,
            write_queue: self.perf.write_queue,
            write_batch: self.perf.write_batch,
            priority: self.node.priority,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../config.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn example_file_documents_every_key() {
        let text = include_str!("../config.example.toml");
        let table = toml::Table::try_from(Config::default()).unwrap();
        for (t, keys) in table {
            assert!(text.contains(&format!("[{t}]")), "table [{t}] missing");
            for (k, _) in keys.as_table().unwrap() {
                assert!(text.contains(&format!("\n{k} = ")), "key {t}.{k} missing");
            }
        }
    }

    #[test]
    fn light_mode_sets_defaults_under_what_the_user_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[node]\nlight = true\n[store]\ncache_docs = 500\n").unwrap();
        let c = Config::load(Some(&file), env(&[]), &Overrides::default()).unwrap();
        assert!(c.node.light && !c.api.dashboard);
        assert_eq!(c.store.cache_docs, 500, "the file's key wins");
        assert_eq!(
            c.store.cache_doc_bytes,
            Config::light().store.cache_doc_bytes
        );
        assert_eq!(c.net.anti_entropy_ms, 120_000);
        // The flag and the variable turn it on too, with or without a file.
        let flags = Overrides {
            light: true,
            ..Overrides::default()
        };
        assert_eq!(
            Config::load(None, env(&[]), &flags).unwrap(),
            Config::light()
        );
        let c = Config::load(
            None,
            env(&[("MERGEFLOW_NODE_LIGHT", "true")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c, Config::light());
        std::fs::write(&file, "[net]\nanti_entropy_ms = 5000\n").unwrap();
        let c = Config::load(Some(&file), env(&[]), &flags).unwrap();
        assert_eq!((c.node.light, c.net.anti_entropy_ms), (true, 5000));
        // Off: the ordinary defaults.
        assert!(
            Config::load(None, env(&[]), &Overrides::default())
                .unwrap()
                .api
                .dashboard
        );
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[api]\nlisten = \"127.0.0.1:1\"\n[doc]\nmax_change_bytes = 5000\nstrings = \"text\"\n",
        )
        .unwrap();
        let e = env(&[
            ("MERGEFLOW_API_LISTEN", "127.0.0.1:2"),
            ("MERGEFLOW_NODE_DATA_DIR", "/tmp/x"),
            ("MERGEFLOW_API", "http://ignored"),
            ("OTHER", "1"),
        ]);
        let c = Config::load(Some(&file), e.clone(), &Overrides::default()).unwrap();
        assert_eq!(c.api.listen.port(), 2);
        assert_eq!(c.doc.max_change_bytes, 5000);
        assert_eq!(c.doc.strings, StringMode::Text);
        assert_eq!(c.node.data_dir, PathBuf::from("/tmp/x"));
        let flags = Overrides {
            api_listen: Some("127.0.0.1:3".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            Config::load(Some(&file), e, &flags)
                .unwrap()
                .api
                .listen
                .port(),
            3
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let cases = [
            ("[api]\nlistn = \"x\"\n", "listn"),
            ("[nope]\n", "nope"),
            ("[api]\nlisten = \"not an addr\"\n", "listen"),
            ("[doc]\nmax_change_bytes = \"big\"\n", "max_change_bytes"),
            ("[doc]\nstrings = \"rope\"\n", "strings"),
            ("[api\n", "line 1"),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let err = Config::load(
            None,
            env(&[("MERGEFLOW_DOC_MAX_CHANGE_BYTE", "1")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("MERGEFLOW_DOC_MAX_CHANGE_BYTE") && err.contains("doc.max_change_byte"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[("MERGEFLOW_DOC_MAX_CHANGE_BYTES", "lots")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expects a TOML integer"), "{err}");
        let err = Config::load(
            None,
            env(&[("MERGEFLOW_API_LISTEN", "nowhere")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("MERGEFLOW_"), "{err}");
    }

    #[test]
    fn durations_take_strings_as_workflows_do() {
        // Strings name their unit; integers stay in the key's (ms).
        let c = Config::from_toml(
            "[net]\nanti_entropy_ms = \"2m\"\n[api]\nheader_timeout_ms = \"500ms\"\n\
             idle_timeout_ms = 45000\n[store]\nremote_flush_ms = \"0s\"\n\
             [workflow]\neffect_wait_ms = \"30s\"\nremote_delay_ms = \"1s\"\n\
             [perf]\nshutdown_timeout_ms = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(c.net.anti_entropy_ms, 120_000);
        assert_eq!(c.api.header_timeout_ms, 500);
        assert_eq!(c.api.idle_timeout_ms, 45_000);
        assert_eq!(c.store.remote_flush_ms, 0);
        assert_eq!(c.workflow.effect_wait_ms, 30_000);
        assert_eq!(c.workflow.remote_delay_ms, 1_000);
        assert_eq!(c.perf.shutdown_timeout_ms, 3_600_000);
        // A bad one names the key and the form.
        for bad in ["\"30\"", "\"30 s\"", "\"1.5s\"", "-1", "true"] {
            let err = Config::from_toml(&format!("[net]\nanti_entropy_ms = {bad}\n")).unwrap_err();
            assert!(err.contains("anti_entropy_ms"), "{bad}: {err}");
        }
        let err = Config::from_toml("[net]\nanti_entropy_ms = \"30sec\"\n").unwrap_err();
        assert!(err.contains("a whole number then ms, s, m or h"), "{err}");
        // Ranges are checked on the value, whatever its form.
        let err = Config::from_toml("[store]\nremote_flush_ms = \"2m\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.remote_flush_ms"), "{err}");

        // The environment and light mode take them too.
        let c = Config::load(
            None,
            env(&[
                ("MERGEFLOW_NET_ANTI_ENTROPY_MS", "45s"),
                ("MERGEFLOW_API_IDLE_TIMEOUT_MS", "2500"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            (c.net.anti_entropy_ms, c.api.idle_timeout_ms),
            (45_000, 2_500)
        );
        let err = Config::load(
            None,
            env(&[("MERGEFLOW_NET_ANTI_ENTROPY_MS", "soon")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("MERGEFLOW_NET_ANTI_ENTROPY_MS") && err.contains("ms, s, m or h"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[node]\nlight = true\n[net]\nanti_entropy_ms = \"10s\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[]), &Overrides::default()).unwrap();
        assert_eq!((c.node.light, c.net.anti_entropy_ms), (true, 10_000));
        // The effective config shows milliseconds (what /v1/status reports).
        let shown = toml::Table::try_from(&c).unwrap();
        assert_eq!(shown["net"]["anti_entropy_ms"].as_integer(), Some(10_000));
    }

    #[test]
    fn redacted_hides_the_secrets_and_nothing_else() {
        let mut c = Config::default();
        c.api.token = "sixteen-chars-token".into();
        c.net.key = "ab".repeat(32);
        let shown = c.redacted();
        assert_eq!(shown["api"]["token"], "(set)");
        assert_eq!(shown["net"]["key"], "(set)");
        assert!(
            !shown.to_string().contains("sixteen-chars") && !shown.to_string().contains("abab")
        );
        assert_eq!(shown["net"]["anti_entropy_ms"], 30_000);
        let plain = Config::default().redacted();
        assert_eq!(
            (plain["api"]["token"].as_str(), plain["net"]["key"].as_str()),
            (Some(""), Some(""))
        );
    }

    #[test]
    fn ranges_are_checked() {
        let mut c = Config::default();
        c.doc.max_doc_bytes = 1;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("doc.max_doc_bytes")
        );
        let mut c = Config::default();
        c.log.level = "=bad=".into();
        assert!(c.validate().unwrap_err().to_string().contains("log.level"));
    }

    #[test]
    fn network_tunables_load_and_are_checked() {
        let c = Config::load(
            None,
            env(&[
                ("MERGEFLOW_NET_PING_INTERVAL_MS", "1s"),
                ("MERGEFLOW_NET_MAX_STREAMS_PER_PEER", "64"),
                ("MERGEFLOW_NET_MAX_KNOWN_PEERS", "100"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            (c.net.ping_interval_ms, c.net.max_streams_per_peer),
            (1_000, 64)
        );
        assert_eq!(c.net.max_known_peers, 100);
        type Set = fn(&mut Config);
        let bad: [(&str, Set); 8] = [
            ("net.ping_interval_ms", |c| c.net.ping_interval_ms = 5_000), // > half the timeout
            ("net.request_timeout_ms", |c| c.net.request_timeout_ms = 10),
            ("net.idle_connection_timeout_ms", |c| {
                c.net.idle_connection_timeout_ms = 0
            }),
            ("net.max_streams_per_peer", |c| {
                c.net.max_streams_per_peer = 600
            }),
            ("net.max_redial_backoff_ms", |c| {
                c.net.max_redial_backoff_ms = 1
            }),
            ("net.max_strikes", |c| c.net.max_strikes = 0),
            ("net.ban_ms", |c| c.net.ban_ms = 5),
            ("net.max_known_peers", |c| c.net.max_known_peers = 0),
        ];
        for (key, set) in bad {
            let mut c = Config::default();
            set(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn browser_lists_are_checked() {
        let mut c = Config::default();
        c.api.allow_origins = vec!["null".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("api.allow_origins"), "{err}");
        let mut c = Config::default();
        c.api.allow_hosts = vec![" nas.local".into()];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("api.allow_hosts"), "{err}");
        // Lists come from the environment as TOML arrays.
        let c = Config::load(
            None,
            env(&[
                (
                    "MERGEFLOW_API_ALLOW_ORIGINS",
                    r#"["http://localhost:5173"]"#,
                ),
                ("MERGEFLOW_API_ALLOW_HOSTS", r#"["nas.local:7700"]"#),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.api.allow_origins, ["http://localhost:5173"]);
        assert_eq!(c.api.allow_hosts, ["nas.local:7700"]);
    }

    #[test]
    fn api_connection_limits_are_checked() {
        for key in ["max_connections", "header_timeout_ms", "idle_timeout_ms"] {
            let mut c = Config::default();
            match key {
                "max_connections" => c.api.max_connections = 0,
                "header_timeout_ms" => c.api.header_timeout_ms = 0,
                _ => c.api.idle_timeout_ms = 0,
            }
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("api.{key}")), "{err}");
        }
        let c = Config::load(
            None,
            env(&[("MERGEFLOW_API_MAX_CONNECTIONS", "8")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.api.max_connections, 8);
        assert_eq!(Config::light().api.max_connections, 128);
    }

    #[test]
    fn an_api_reachable_from_other_machines_needs_a_token() {
        let mut c = Config::default();
        c.api.listen = "0.0.0.0:7700".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("api.token") && err.contains("0.0.0.0:7700"),
            "{err}"
        );
        c.api.token = "short".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
        c.api.token = "0123456789abcdef".into();
        c.validate().unwrap();
        // Long enough, but HTTP trims header whitespace: it could never match.
        for bad in [
            " ".repeat(16),
            format!("{} ", c.api.token),
            "\t0123456789abcdef".into(),
        ] {
            c.api.token = bad;
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains("api.token") && err.contains("whitespace"),
                "{err}"
            );
        }
        c.api.token = "0123456789 abcdef".into();
        c.validate().unwrap();
        // Loopback needs none.
        c.api = ApiConfig::default();
        c.validate().unwrap();
    }
}
