//! The MQTT bridge (`[[mqtt]]`): one connection per broker, over which
//! readings flow into docs (`[[mqtt.in]]`) and doc states flow out onto
//! topics (`[[mqtt.out]]`).
//!
//! In: every message on a subscribed topic is written into the doc its
//! rule names, durably, before it is acknowledged to the broker (QoS 1,
//! manual acks, in the order received, as MQTT requires). The session is
//! persistent (clean start off, a week's expiry), so the broker keeps what
//! arrives while the node is away and sends again what was not
//! acknowledged. Each write carries an idempotency key made from the topic
//! and the payload, so a message the broker sends again after a crash is
//! stored once. A message that cannot be stored (not JSON, too big, on a
//! topic no rule takes, refused by the doc) is kept as a dead letter
//! (`GET /v1/mqtt/dead`) and acknowledged: never dropped unseen.
//!
//! Out: a change to a doc an out rule names is published (its JSON, or the
//! value at a path) by one node per doc, the rendezvous owner among the
//! connected nodes with that rule (the workflow effect rule), with the
//! doc's heads in the MQTT 5 user property `heads` so consumers can drop a
//! state they have seen. States that follow each other quickly are folded:
//! the newest is published.
//!
//! Client: rumqttc (MQTT 5, tokio, rustls), chosen over paho-mqtt (a C
//! library behind bindings) and mqtt-async-client (unmaintained): pure
//! Rust, async on the runtime the node already runs, and manual
//! acknowledgements, which the durable-before-ack rule needs.

mod ingest;
mod publish;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::MqttBroker;
use crate::feed::Feed;
use crate::runtime::Docs;
use crate::store::Store;

/// How long the broker keeps this node's session while it is away: the
/// readings sent meanwhile wait for it that long.
const SESSION_EXPIRY_SECS: u32 = 7 * 24 * 3600;
/// Longest wait before connecting again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The connected peers' ids (set once the network runs).
pub type LivePeers = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// What one bridge has done, for `/v1/mqtt`, `/v1/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct BridgeStatus {
    url: String,
    client_id: String,
    connected: AtomicBool,
    received: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    dead: AtomicU64,
    published: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A bridge's numbers, as the API shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeInfo {
    /// The broker.
    pub url: String,
    /// This node's client id there.
    pub client_id: String,
    /// Connected now.
    pub connected: bool,
    /// Messages taken from the broker (a message sent again counts again).
    pub received: u64,
    /// Messages written into docs.
    pub stored: u64,
    /// Messages sent again that were already stored.
    pub duplicates: u64,
    /// Messages kept as dead letters.
    pub dead_letters: u64,
    /// Doc states published.
    pub published: u64,
    /// QoS 0 messages dropped because too many were waiting to be stored
    /// (QoS 0 is at most once), and doc states too big for the broker.
    #[serde(default)]
    pub dropped: u64,
    /// The last connection error, if any since start.
    pub last_error: Option<String>,
}

impl BridgeStatus {
    /// The numbers now.
    pub fn info(&self) -> BridgeInfo {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BridgeInfo {
            url: self.url.clone(),
            client_id: self.client_id.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            received: n(&self.received),
            stored: n(&self.stored),
            duplicates: n(&self.duplicates),
            dead_letters: n(&self.dead),
            published: n(&self.published),
            dropped: n(&self.dropped),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// The node's bridges.
#[derive(Default, Clone)]
pub struct Bridges {
    status: Arc<RwLock<Vec<Arc<BridgeStatus>>>>,
    live: Arc<RwLock<Option<LivePeers>>>,
}

impl Bridges {
    /// Each bridge's numbers.
    pub fn info(&self) -> Vec<BridgeInfo> {
        let status = self.status.read().unwrap_or_else(|p| p.into_inner());
        status.iter().map(|s| s.info()).collect()
    }

    /// Tells the bridges who is connected (for the owners of out rules).
    pub fn set_live_peers(&self, live: LivePeers) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Some(live);
    }
}

/// What the bridges work with.
pub(crate) struct Parts<'a> {
    pub docs: &'a Docs,
    pub store: &'a Store,
    pub feed: &'a Arc<Feed>,
    pub local: &'a str,
    pub cancel: &'a CancellationToken,
    pub tasks: &'a tokio_util::task::TaskTracker,
}

/// Starts one bridge per `[[mqtt]]` entry, into `bridges`.
pub(crate) fn spawn(brokers: &[MqttBroker], parts: Parts<'_>, bridges: &Bridges) {
    let keys: Vec<String> = brokers
        .iter()
        .flat_map(|b| b.outbound.iter().map(|r| publish::rule_key(&b.url, r)))
        .collect();
    let (docs, local) = (parts.docs.clone(), parts.local.to_string());
    parts
        .tasks
        .spawn(async move { publish::announce(&docs, &local, keys).await });
    for cfg in brokers {
        let client_id = match cfg.client_id.as_str() {
            "" => format!("mergeflow-{}", parts.local),
            id => id.to_string(),
        };
        let status = Arc::new(BridgeStatus {
            url: cfg.url.clone(),
            client_id: client_id.clone(),
            ..Default::default()
        });
        bridges
            .status
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(status.clone());
        let ingest = Arc::new(ingest::Ingest::new(
            cfg,
            parts.docs.clone(),
            parts.store.clone(),
            status.clone(),
        ));
        let out = publish::Publisher::new(
            cfg,
            parts.docs.clone(),
            parts.local.to_string(),
            bridges.live.clone(),
            status.clone(),
        );
        let (cfg, feed, cancel) = (cfg.clone(), parts.feed.clone(), parts.cancel.clone());
        let tasks = parts.tasks.clone();
        parts.tasks.spawn(async move {
            run(cfg, client_id, ingest, out, feed, status, cancel, tasks).await;
        });
    }
}

/// The client options for `cfg`.
fn options(cfg: &MqttBroker, client_id: &str) -> Result<MqttOptions, String> {
    let (host, port, tls) = cfg.address()?;
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_millis(cfg.keep_alive_ms.max(1000)));
    o.set_clean_start(false);
    o.set_manual_acks(true);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(SESSION_EXPIRY_SECS);
    props.receive_maximum = Some(cfg.inflight);
    // Room for a payload over max_payload, so that it arrives and becomes
    // a dead letter instead of being dropped by the broker unseen.
    props.max_packet_size =
        Some((cfg.max_payload.saturating_mul(4)).clamp(1 << 20, 64 << 20) as u32);
    o.set_connect_properties(props);
    if !cfg.username.is_empty() {
        let password = match cfg.password_env.as_str() {
            "" => String::new(),
            var => std::env::var(var)
                .map_err(|_| format!("password_env: environment variable {var} is not set"))?,
        };
        o.set_credentials(cfg.username.clone(), password);
    }
    if tls {
        o.set_transport(rumqttc::Transport::tls_with_config(tls_config(cfg)?));
    }
    Ok(o)
}

/// TLS for `mqtts://`: the system's CAs and `tls_ca`'s.
fn tls_config(cfg: &MqttBroker) -> Result<rumqttc::TlsConfiguration, String> {
    use rumqttc::tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if !cfg.tls_ca.as_os_str().is_empty() {
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(&cfg.tls_ca)
            .map_err(|e| format!("tls_ca {}: {e}", cfg.tls_ca.display()))?;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("tls_ca {}: {e}", cfg.tls_ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("tls_ca {}: {e}", cfg.tls_ca.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}

/// One bridge: connects, reconnects, and hands messages to the ingest and
/// doc states to the broker, until the node stops.
#[allow(clippy::too_many_arguments)]
async fn run(
    cfg: MqttBroker,
    client_id: String,
    ingest: Arc<ingest::Ingest>,
    out: Option<publish::Publisher>,
    feed: Arc<Feed>,
    status: Arc<BridgeStatus>,
    cancel: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
) {
    let options = match options(&cfg, &client_id) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(broker = %cfg.url, err = %e, "MQTT bridge not started");
            status.error(e);
            return;
        }
    };
    let cap = usize::from(cfg.inflight) + 16;
    let (client, mut eventloop) = AsyncClient::new(options, cap);
    // This task only polls the connection and never waits on anything
    // else: requests (acks, subscriptions, publishes) queue up in the
    // client until it polls again. So messages go on unbounded; QoS 1 ones
    // are bounded by the receive maximum, QoS 0 ones past `cap` waiting are
    // dropped (at most once is what QoS 0 promises) and counted.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tasks.spawn(ingest::process(
        rx,
        client.clone(),
        ingest,
        waiting.clone(),
        cap,
        cancel.clone(),
    ));
    let max_out = Arc::new(std::sync::atomic::AtomicUsize::new(
        publish::DEFAULT_MAX_OUT,
    ));
    if let Some(out) = out {
        tasks.spawn(out.run(client.clone(), feed, max_out.clone(), cancel.clone()));
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.qos == QoS::AtMostOnce && waiting.load(Ordering::Relaxed) >= cap {
                    status.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                waiting.fetch_add(1, Ordering::Relaxed);
                if tx.send(p).is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                status.connected.store(true, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                tracing::info!(broker = %cfg.url, session = ack.session_present, "MQTT bridge connected");
                // Every rule, on every connection: a new session (the broker
                // forgot us) has none, an old one may predate a rule added
                // to the config. Subscribing again is harmless. From another
                // task: this one must keep polling for the requests to go.
                let (client, filters, status) = (
                    client.clone(),
                    cfg.inbound
                        .iter()
                        .map(|r| r.subscribe.clone())
                        .collect::<Vec<_>>(),
                    status.clone(),
                );
                tokio::spawn(async move {
                    for f in filters {
                        if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                            status.error(format!("subscribe {f}: {e}"));
                        }
                    }
                });
                // What the broker takes in one packet bounds what goes out.
                if let Some(max) = ack.properties.as_ref().and_then(|p| p.max_packet_size) {
                    max_out.store(max as usize, Ordering::Relaxed);
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                status.connected.store(false, Ordering::Relaxed);
                status.error(format!("the broker disconnected: {:?}", d.reason_code));
            }
            Ok(_) => {}
            Err(e) => {
                if status.connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(broker = %cfg.url, err = %e, "MQTT bridge disconnected; reconnecting");
                }
                status.error(e.to_string());
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    // Leave cleanly: the session stays, what was not acknowledged is sent
    // again next time.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
}
