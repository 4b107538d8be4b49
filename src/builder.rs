//! Building and starting a [`Node`]: opens the store, starts the document
//! service, the workflow engine, the network and the HTTP API. It sits above
//! both `node.rs` and `api/`, so that the node does not import the API that
//! serves it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::ActorId;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::config::Config;
use crate::feed::Feed;
use crate::node::{Node, NodeInner, SealOnDrop};
use crate::runtime::Docs;
use crate::store::{GroupCommit, Store};
use crate::sync::SyncConfig;

impl Node {
    /// A builder with default configuration.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }
}

/// Builds a [`Node`].
///
/// # Examples
/// ```no_run
/// # async fn demo() -> Result<(), mergeflow::Error> {
/// let node = mergeflow::Node::builder().data_dir("./my-data").start().await?;
/// let doc = node.doc("sensors/greenhouse-3")?;
/// doc.patch(serde_json::json!({"celsius": 21.5})).await?;
/// node.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct NodeBuilder {
    config: Config,
    serve_api: bool,
    sync: Option<SyncConfig>,
    network: bool,
    no_workflows: bool,
    unsigned: bool,
    unchecked: bool,
    new_identity: bool,
}

impl NodeBuilder {
    /// Uses `config` (replacing anything set before).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Sets the data directory.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.node.data_dir = dir.into();
        self
    }

    /// Serves the HTTP API on `addr` (port 0 picks a free port; see
    /// [`Node::api_addr`]). Without this the node serves no API.
    pub fn api(mut self, addr: SocketAddr) -> Self {
        self.config.api.listen = addr;
        self.serve_api = true;
        self
    }

    /// Serves the HTTP API on the configured `api.listen`.
    pub fn serve_api(mut self, on: bool) -> Self {
        self.serve_api = on;
        self
    }

    /// Runs the sync core: the node then takes [`Input`]s with
    /// [`Node::sync_input`] and yields [`Output`](crate::sync::Output)s from
    /// [`Node::take_sync_outputs`], for a network shell to carry.
    #[doc(hidden)]
    pub fn sync(mut self, cfg: SyncConfig) -> Self {
        self.sync = Some(cfg);
        self
    }

    /// Joins the peer-to-peer network as configured in `[net]` (listen
    /// addresses, peers, mDNS): runs the sync core and the libp2p swarm.
    pub fn network(mut self, on: bool) -> Self {
        self.network = on;
        self
    }

    /// A hostile node for tests: it signs none of its changes, so honest
    /// peers refuse them (`test-utils` only).
    #[doc(hidden)]
    #[cfg(feature = "test-utils")]
    pub fn unsigned(mut self) -> Self {
        self.unsigned = true;
        self
    }

    /// A hostile node for tests: it checks nothing it writes or merges
    /// against grants, so it writes other nodes' membership docs, grants and
    /// workflow definitions (`test-utils` only). Its changes are signed.
    #[doc(hidden)]
    #[cfg(feature = "test-utils")]
    pub fn unchecked(mut self) -> Self {
        self.unchecked = true;
        self
    }

    /// Runs the workflow engine (the default). Off, no workflow runs, and
    /// the changes made meanwhile are run through the workflows at the next
    /// start with it on: for maintenance such as an offline restore.
    pub fn workflows(mut self, on: bool) -> Self {
        self.no_workflows = !on;
        self
    }

    /// Gives the node a new identity (ed25519 key, so a new peer id) before
    /// it starts: key rotation. Its changes so far keep the old key's
    /// signatures; peers that name it by peer id (`net.allow`,
    /// `net.admins`, grants) must be told the new one.
    pub fn new_identity(mut self) -> Self {
        self.new_identity = true;
        self
    }

    /// Opens the store and starts the node.
    ///
    /// # Errors
    /// Invalid config, a data dir of another schema version or a corrupt one
    /// ([`Error::Store`]), or an API address that cannot be bound.
    pub async fn start(self) -> Result<Node, Error> {
        self.config.validate()?;
        let config = self.config;
        let dir = config.node.data_dir.clone();
        let cache = config.store.cache_bytes;
        let new_identity = self.new_identity;
        let (store, key) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&dir, cache)?;
            let key = if new_identity {
                store.new_identity()?
            } else {
                store.identity()?
            };
            // The data dir is ours now (sled's lock) and the API does not
            // serve yet: no restore is in flight, so any spool is a leftover.
            crate::backup::clean_restore_spool(&dir);
            Ok::<_, crate::store::StoreError>((store, key))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let peer_id = key.public().to_peer_id();
        let net_key = self.network.then(|| key.clone());
        let actor = ActorId::random();
        let boot = {
            let (store, actor, peer) = (store.clone(), actor.clone(), peer_id.to_string());
            tokio::task::spawn_blocking(move || {
                store.record_boot(&actor, &peer, crate::doc::now_ms())
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
        };
        let (commit, flush_thread) = GroupCommit::start(
            store.clone(),
            config.perf.flush_queue,
            std::time::Duration::from_millis(config.store.remote_flush_ms),
            config.store.fsync,
        );
        let sync_cfg = self
            .sync
            .or_else(|| {
                self.network.then(|| SyncConfig {
                    anti_entropy_ms: config.net.anti_entropy_ms,
                    ..SyncConfig::default()
                })
            })
            .map(|cfg| SyncConfig {
                local: peer_id.to_string(),
                replicate: config.docs().replicate,
                ..cfg
            });
        let queues = crate::metrics::Queues::default();
        let (sync, sync_rx) = match sync_cfg {
            Some(cfg) => {
                let (tx, rx) = queues.channel("sync_out", config.perf.sync_queue);
                (Some((cfg, tx)), Some(rx))
            }
            None => (None, None),
        };
        let feed = Arc::new(Feed::new(boot));
        let policy = Arc::new(crate::grants::PolicySlot::new(
            crate::grants::Policy::new(&config.net.admins, None, &Default::default())
                .with_runs(&peer_id.to_string(), Default::default()),
        ));
        let local_policy = checked(self.unchecked, &policy);
        let docs = {
            let parts = crate::runtime::Parts {
                store: store.clone(),
                commit: commit.clone(),
                actor: actor.clone(),
                feed: feed.clone(),
                origin: peer_id.to_string(),
                queues: queues.clone(),
                signer: crate::trust::Signer::new(&key).filter(|_| !self.unsigned),
                policy: local_policy.clone(),
            };
            let cfg = config.docs();
            tokio::task::spawn_blocking(move || Docs::new(parts, cfg, sync))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??
        };
        // The stored grants bind before anything is written or merged.
        let me = peer_id.to_string();
        let labels = &config.node.labels;
        policy.set(crate::node::grants::load(&docs, &config.net.admins, (&me, labels)).await);
        let seal_dir = config.node.data_dir.clone();
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut workflow_cfg = config.workflow.clone();
        if workflow_cfg.dir.as_os_str().is_empty() {
            workflow_cfg.dir = config.node.data_dir.join("workflows");
        }
        let workflows = crate::workflow::Engine::start(
            docs.clone(),
            store.clone(),
            feed.clone(),
            (peer_id.to_string(), config.node.labels.clone()),
            workflow_cfg,
            (!self.no_workflows).then(|| (cancel.clone(), &tasks)),
        );
        let metrics = crate::metrics::Metrics::new(
            vec![
                (
                    "write_duration",
                    "Local writes, from the call to the answer",
                    docs.write_latency(),
                ),
                (
                    "workflow_run_duration",
                    "Workflow runs: time spent running their steps",
                    workflows.run_latency(),
                ),
                (
                    "flush_duration",
                    "Group-commit flushes of the store",
                    commit.stats().duration.clone(),
                ),
            ],
            queues.clone(),
        );
        let inner = Arc::new(NodeInner {
            metrics,
            docs,
            feed,
            store,
            commit,
            flush_thread: Mutex::new(Some(flush_thread)),
            peer_id,
            boot,
            started: Instant::now(),
            config,
            cancel,
            tasks,
            workflows,
            api_addr: Mutex::new(None),
            sync_out: Mutex::new(sync_rx),
            net: Mutex::new(None),
            progress: Arc::default(),
            server_links: Arc::default(),
            mqtt: Default::default(),
            policy: policy.clone(),
            seal: SealOnDrop {
                data_dir: seal_dir,
                armed: false.into(),
            },
        });
        let node = Node { inner };
        crate::node::grants::spawn_watch(&node, policy);
        if node.inner.sync_out.lock().expect("not poisoned").is_some() {
            crate::runtime::spawn_tick(
                node.inner.docs.inbox(),
                node.inner.cancel.clone(),
                &node.inner.tasks,
            );
        }
        if let Some(key) = net_key {
            let outputs = node
                .take_sync_outputs()
                .expect("sync is on with the network");
            let net = &node.inner.config.net;
            let cfg = crate::net::NetConfig {
                listen: crate::net::parse_addrs("net.listen", &net.listen)?,
                peers: crate::net::parse_addrs("net.peers", &net.peers)?,
                mdns: net.mdns_on(),
                max_message_bytes: net.max_message_bytes,
                // Both were validated with the config.
                key: (!net.key.is_empty())
                    .then(|| crate::net::parse_key(&net.key).ok())
                    .flatten(),
                allow: crate::net::parse_peer_ids(&net.allow).unwrap_or_default(),
                max_connections: net.max_connections,
                kademlia: net.kademlia,
                // The topic carries every doc's changes: a node that holds
                // only some stays off it (its peers send it what it holds).
                gossipsub: net.gossipsub && node.inner.config.docs().replicate.is_all(),
                max_peer_bytes_per_sec: net.max_peer_bytes_per_sec,
                max_peer_frames_per_sec: net.max_peer_frames_per_sec,
                peer_timeout: Duration::from_millis(net.peer_timeout_ms),
                ping_interval: Duration::from_millis(net.ping_interval_ms),
                request_timeout: Duration::from_millis(net.request_timeout_ms),
                idle_connection_timeout: Duration::from_millis(net.idle_connection_timeout_ms),
                max_streams_per_peer: net.max_streams_per_peer,
                max_redial_backoff: Duration::from_millis(net.max_redial_backoff_ms),
                max_strikes: net.max_strikes,
                ban: Duration::from_millis(net.ban_ms),
                max_known_peers: net.max_known_peers,
            };
            if net.open && !net.closed() {
                tracing::warn!(
                    "net.open = true: any node that can reach this one can join and read \
                     and write every document; set net.key (mergeflow keygen) and/or net.allow"
                );
            } else if net.mdns && !net.mdns_on() {
                tracing::info!("mDNS off: it runs only with net.key, net.allow or net.open = true");
            }
            let net = crate::net::spawn(
                key,
                cfg,
                node.inner.docs.inbox(),
                outputs,
                &mut node.inner.metrics.registry(),
                &queues,
                node.inner.cancel.clone(),
                &node.inner.tasks,
            )?;
            let live = net.state.clone();
            let live: crate::mqtt::LivePeers = Arc::new(move || match live.lock() {
                Ok(net) => net
                    .peers
                    .values()
                    .filter(|p| p.connected)
                    .map(|p| p.peer_id.clone())
                    .collect(),
                Err(_) => vec![],
            });
            node.inner.workflows.set_live_peers(live.clone());
            node.inner.mqtt.set_live_peers(live);
            *node.inner.net.lock().expect("not poisoned") = Some(net);
        }
        crate::mqtt::spawn(
            &node.inner.config.mqtt,
            crate::mqtt::Parts {
                docs: &node.inner.docs,
                store: &node.inner.store,
                feed: &node.inner.feed,
                local: &node.inner.peer_id.to_string(),
                cancel: &node.inner.cancel,
                tasks: &node.inner.tasks,
            },
            &node.inner.mqtt,
        );
        crate::amrepo::dial::spawn(
            &node.inner.docs,
            &node.inner.feed,
            &node.inner.config.automerge,
            &node.inner.peer_id.to_string(),
            &node.inner.server_links,
            &node.inner.cancel,
            &node.inner.tasks,
        );
        if self.serve_api {
            let listener = tokio::net::TcpListener::bind(node.inner.config.api.listen)
                .await
                .map_err(|source| Error::Bind {
                    addr: node.inner.config.api.listen,
                    source,
                })?;
            let addr = listener.local_addr().map_err(|source| Error::Bind {
                addr: node.inner.config.api.listen,
                source,
            })?;
            *node.inner.api_addr.lock().expect("not poisoned") = Some(addr);
            let app = crate::api::router(node.clone());
            let limits = crate::api::serve::Limits::new(&node.inner.config.api);
            node.inner.tasks.spawn(crate::api::serve::serve(
                listener,
                app,
                limits,
                node.inner.cancel.clone(),
                node.inner.tasks.clone(),
            ));
        }
        tracing::info!(
            peer = %node.inner.peer_id,
            actor = %node.inner.docs.actor(),
            boot,
            docs = node.inner.docs.count(),
            data_dir = %node.inner.config.node.data_dir.display(),
            "node started"
        );
        Ok(node)
    }
}

/// The policy a node's own writes and merges are checked against: the
/// network's, unless [`NodeBuilder::unchecked`].
fn checked(
    unchecked: bool,
    policy: &Arc<crate::grants::PolicySlot>,
) -> Arc<crate::grants::PolicySlot> {
    #[cfg(feature = "test-utils")]
    if unchecked {
        return Arc::new(crate::grants::PolicySlot::new(
            crate::grants::Policy::anything(),
        ));
    }
    let _ = unchecked;
    policy.clone()
}
