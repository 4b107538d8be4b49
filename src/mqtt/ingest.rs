//! MQTT in: messages written into docs durably, then acknowledged, in the
//! order they came; what cannot be stored becomes a dead letter.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::v5::Publish;
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::BridgeStatus;
use crate::config::{MqttBroker, MqttIn};
use crate::doc::{DocError, DocId, Op, now_ms};
use crate::runtime::{Change, Docs, WriteOpts};
use crate::store::Store;
use crate::topic;

/// Most bytes of a dead letter's payload kept.
const KEPT_PAYLOAD: usize = 64 * 1024;
/// Longest wait between attempts at a write the store refused.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
/// Attempts at a write that failed inside the node before it is a dead letter.
const MAX_INTERNAL: u32 = 5;

/// The in side of one bridge.
pub(super) struct Ingest {
    broker: String,
    rules: Vec<MqttIn>,
    max_payload: usize,
    docs: Docs,
    store: Store,
    status: Arc<BridgeStatus>,
}

/// What a message writes: its value at `path`, or merged (no path).
struct Write {
    path: Option<String>,
    value: Json,
}

impl Write {
    fn change(&self) -> Change {
        match &self.path {
            None => Change::Patch(self.value.clone()),
            Some(path) => Change::Ops(vec![Op::Set {
                path: path.clone(),
                value: self.value.clone(),
                kind: None,
            }]),
        }
    }
}

/// What became of one message.
#[derive(Debug, PartialEq)]
enum Outcome {
    Stored,
    Duplicate,
    Dead,
}

impl Ingest {
    pub(super) fn new(
        cfg: &MqttBroker,
        docs: Docs,
        store: Store,
        status: Arc<BridgeStatus>,
    ) -> Ingest {
        Ingest {
            broker: cfg.url.clone(),
            rules: cfg.inbound.clone(),
            max_payload: cfg.max_payload,
            docs,
            store,
            status,
        }
    }

    /// The doc and the change a message on `topic` makes, or why it makes
    /// none.
    fn route(&self, topic: &str, payload: &[u8]) -> Result<(DocId, Write), String> {
        let rule = self
            .rules
            .iter()
            .find(|r| topic::matches(&r.subscribe, topic))
            .ok_or_else(|| "no [[mqtt.in]] rule takes this topic".to_string())?;
        if payload.len() > self.max_payload {
            return Err(format!(
                "the payload is {} bytes, over max_payload ({})",
                payload.len(),
                self.max_payload
            ));
        }
        let value: Json =
            serde_json::from_slice(payload).map_err(|e| format!("the payload is not JSON: {e}"))?;
        let doc = topic::fill(&rule.doc, topic, &["topic"])?;
        let id = DocId::new(doc.as_str()).map_err(|e| format!("doc {doc:?}: {e}"))?;
        if rule.merge && !value.is_object() {
            let kind = crate::doc::ops::describe_json(&value);
            return Err(format!(
                "merge takes a JSON object, and the payload is {kind}"
            ));
        }
        let path = (!rule.merge).then(|| rule.path.clone());
        Ok((id, Write { path, value }))
    }

    /// Takes one message: stores it (retrying while the store refuses, so
    /// nothing is acknowledged that is not durable) or keeps it as a dead
    /// letter. `None` when the node stops first: not to be acknowledged.
    async fn take(
        &self,
        topic: &str,
        payload: &[u8],
        cancel: &CancellationToken,
    ) -> Option<Outcome> {
        self.status.received.fetch_add(1, Ordering::Relaxed);
        let (id, change) = match self.route(topic, payload) {
            Ok(r) => r,
            Err(e) => return self.dead(topic, payload, e, cancel).await,
        };
        let key = idempotency_key(topic, payload);
        let mut wait = Duration::from_millis(100);
        let mut internal = 0;
        loop {
            // Readings of one doc that wait together share a change.
            let opts = WriteOpts {
                idem: Some(key.clone()),
                coalesce: true,
                ..WriteOpts::default()
            };
            match self
                .docs
                .write_opts(id.clone(), change.change(), opts)
                .await
            {
                Ok(r) if r.changed => {
                    self.status.stored.fetch_add(1, Ordering::Relaxed);
                    return Some(Outcome::Stored);
                }
                Ok(_) => {
                    self.status.duplicates.fetch_add(1, Ordering::Relaxed);
                    return Some(Outcome::Duplicate);
                }
                Err(DocError::Store(e)) => {
                    self.status
                        .error(format!("cannot store a reading for {id}: {e}"));
                    tracing::warn!(broker = %self.broker, doc = %id, err = %e, "MQTT reading not stored yet; retrying");
                }
                // An internal error may be this message's doing (Automerge
                // failing on it): a few tries, then a dead letter, so that
                // the messages behind it (acked in order) are not held.
                Err(DocError::Internal(e)) if internal < MAX_INTERNAL => {
                    internal += 1;
                    tracing::warn!(broker = %self.broker, doc = %id, err = %e, "MQTT reading not stored yet; retrying");
                }
                Err(e) => return self.dead(topic, payload, e.to_string(), cancel).await,
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MAX_RETRY_WAIT);
        }
    }

    /// Keeps a message that cannot be stored as a dead letter, durably.
    async fn dead(
        &self,
        topic: &str,
        payload: &[u8],
        error: String,
        cancel: &CancellationToken,
    ) -> Option<Outcome> {
        let kept = &payload[..payload.len().min(KEPT_PAYLOAD)];
        let record = json!({
            "at_ms": now_ms(),
            "broker": self.broker,
            "topic": topic,
            "error": error,
            "bytes": payload.len(),
            "payload": String::from_utf8_lossy(kept),
            "payload_cut": kept.len() < payload.len(),
        });
        let bytes = serde_json::to_vec(&record).expect("JSON serializes");
        tracing::warn!(broker = %self.broker, topic, err = %error, "MQTT message kept as a dead letter");
        let mut wait = Duration::from_millis(100);
        loop {
            let store = self.store.clone();
            let b = bytes.clone();
            match tokio::task::spawn_blocking(move || store.put_dead_letter(&b)).await {
                Ok(Ok(_)) => {
                    self.status.dead.fetch_add(1, Ordering::Relaxed);
                    return Some(Outcome::Dead);
                }
                Ok(Err(e)) => self
                    .status
                    .error(format!("cannot store a dead letter: {e}")),
                Err(e) => self
                    .status
                    .error(format!("cannot store a dead letter: {e}")),
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MAX_RETRY_WAIT);
        }
    }
}

/// The idempotency key of a message: the same for the same topic and
/// payload, so a message the broker sends again is stored once. (Readings
/// that must count twice carry something that tells them apart: a sequence
/// number or a timestamp.)
fn idempotency_key(topic: &str, payload: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0]);
    h.update(payload);
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("mqtt-{hex}")
}

/// Takes the messages of one connection, many at once, and acknowledges
/// each once taken, in the order they came (MQTT requires it), until the
/// node stops.
pub(super) async fn process(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Publish>,
    client: AsyncClient,
    ingest: Arc<Ingest>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    cap: usize,
    cancel: CancellationToken,
) {
    let mut pending = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(done) = pending.next(), if !pending.is_empty() => {
                let Some(p) = done else { return };
                if let Err(e) = client.ack(&p).await {
                    tracing::debug!(err = %e, "MQTT ack not sent (the connection is going)");
                }
            }
            // At most `cap` taken at once; the rest wait in the channel.
            msg = rx.recv(), if pending.len() < cap => {
                let Some(p) = msg else { break };
                waiting.fetch_sub(1, Ordering::Relaxed);
                let (ingest, cancel) = (ingest.clone(), cancel.clone());
                pending.push_back(async move {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    ingest.take(&topic, &p.payload, &cancel).await.map(|_| p)
                });
            }
        }
    }
    // The connection is gone: finish what was taken (acks are refused by a
    // closed client; the broker sends those again).
    while let Some(Some(p)) = pending.next().await {
        let _ = client.try_ack(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_messages_apart_by_topic_and_payload() {
        let k = idempotency_key("a/b", b"{\"n\":1}");
        assert!(k.starts_with("mqtt-") && k.len() == 37);
        assert_eq!(k, idempotency_key("a/b", b"{\"n\":1}"));
        assert_ne!(k, idempotency_key("a/c", b"{\"n\":1}"));
        assert_ne!(k, idempotency_key("a/b", b"{\"n\":2}"));
        crate::doc::stamp::check_idempotency_key(&k).unwrap();
    }
}
