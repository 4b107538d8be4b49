//! MQTT out: doc states published onto topics, each doc by one owner node,
//! the newest state of a burst once, with its heads as a user property.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{BridgeStatus, LivePeers};
use crate::config::{MqttBroker, MqttOut};
use crate::doc::{DocId, Pointer};
use crate::feed::{DocGlob, Feed, FeedItem};
use crate::runtime::{Change, Docs};
use crate::topic;

/// How long states of one doc are folded before the newest is published.
const FOLD: Duration = Duration::from_millis(20);
/// Largest state published until the broker says what it takes.
pub(super) const DEFAULT_MAX_OUT: usize = 256 * 1024;
/// Room the packet needs besides the payload (topic, properties).
const HEADROOM: usize = 4096;

/// The out side of one bridge.
pub(super) struct Publisher {
    rules: Vec<(MqttOut, DocGlob, String)>,
    docs: Docs,
    local: String,
    live: Arc<RwLock<Option<LivePeers>>>,
    status: Arc<BridgeStatus>,
}

/// The key of rule `r` of the bridge to `url` in membership docs: nodes
/// with the same rule share its docs, one owner each.
pub(super) fn rule_key(url: &str, r: &MqttOut) -> String {
    let mut h = Sha256::new();
    for part in [url, &r.publish, &r.topic, &r.path] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Publisher {
    /// `None` when the bridge has no out rule.
    pub(super) fn new(
        cfg: &MqttBroker,
        docs: Docs,
        local: String,
        live: Arc<RwLock<Option<LivePeers>>>,
        status: Arc<BridgeStatus>,
    ) -> Option<Publisher> {
        let rules: Vec<_> = cfg
            .outbound
            .iter()
            .filter_map(|r| {
                let glob = DocGlob::new(&r.publish).ok()?; // checked with the config
                Some((r.clone(), glob, rule_key(&cfg.url, r)))
            })
            .collect();
        (!rules.is_empty()).then_some(Publisher {
            rules,
            docs,
            local,
            live,
            status,
        })
    }

    /// Publishes the states of the docs it owns until the node stops (its
    /// rules are in this node's membership doc: [`announce`]).
    pub(super) async fn run(
        self,
        client: AsyncClient,
        feed: Arc<Feed>,
        max_out: Arc<std::sync::atomic::AtomicUsize>,
        cancel: CancellationToken,
    ) {
        let mut events = Box::pin(feed.subscribe_quiet(DocGlob::new("**").expect("a valid glob")));
        // Per (rule, doc): the newest state not yet published.
        let mut due: BTreeMap<(usize, String), (Vec<String>, bool)> = BTreeMap::new();
        // Per (rule, doc): the heads last published.
        let mut sent: HashMap<(usize, String), Vec<String>> = HashMap::new();
        let mut tick = tokio::time::interval(FOLD);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                item = events.next() => match item {
                    Some(FeedItem::Change(e)) => {
                        for (i, (_, glob, _)) in self.rules.iter().enumerate() {
                            if glob.matches(&e.doc) {
                                due.insert((i, e.doc.clone()), (e.heads.clone(), e.deleted));
                            }
                        }
                    }
                    Some(FeedItem::Missed { .. }) => {
                        tracing::warn!("MQTT out fell behind the change feed; the next change of each doc is published");
                    }
                    None => return,
                },
                _ = tick.tick(), if !due.is_empty() => {
                    for ((i, doc), (heads, deleted)) in std::mem::take(&mut due) {
                        if sent.get(&(i, doc.clone())) == Some(&heads) || !self.owns(i, &doc).await {
                            continue;
                        }
                        let max = max_out.load(Ordering::Relaxed).saturating_sub(HEADROOM);
                        if self.publish(&client, i, &doc, &heads, deleted, max).await {
                            // A deleted doc's entry goes: the map holds live docs only.
                            match deleted {
                                true => sent.remove(&(i, doc)),
                                false => sent.insert((i, doc), heads),
                            };
                        }
                    }
                }
            }
        }
    }

    /// True if this node publishes `doc` for rule `i`: the rendezvous
    /// owner of the doc among this node and the connected peers with the
    /// same rule.
    async fn owns(&self, i: usize, doc: &str) -> bool {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut candidates = vec![self.local.clone()];
        let ptr = format!("/mqtt_out/{}", self.rules[i].2);
        for peer in live.map(|f| f()).unwrap_or_default() {
            let Ok(id) = DocId::new(crate::workflow::effect::member_doc(&peer)) else {
                continue;
            };
            let Ok(p) = Pointer::parse(&ptr) else {
                continue;
            };
            if self.docs.get(id, Some(p)).await.ok() == Some(Json::Bool(true)) {
                candidates.push(peer);
            }
        }
        crate::workflow::effect::owner(doc, &candidates) == Some(&self.local)
    }

    /// Publishes `doc`'s state at `heads` for rule `i` (an empty retained
    /// message for a deleted doc, which clears the topic). True once handed
    /// to the client.
    async fn publish(
        &self,
        client: &AsyncClient,
        i: usize,
        doc: &str,
        heads: &[String],
        deleted: bool,
        max: usize,
    ) -> bool {
        let rule = &self.rules[i].0;
        let Ok(topic) = topic::fill(&rule.topic, doc, &["doc"]) else {
            return false;
        };
        let payload = if deleted {
            if !rule.retain {
                return true;
            }
            Vec::new()
        } else {
            let Ok(id) = DocId::new(doc) else {
                return false;
            };
            let json = match self.docs.get_at(id, heads.to_vec(), None).await {
                Ok((j, _)) => j,
                Err(e) => {
                    tracing::debug!(doc, err = %e, "MQTT out: cannot read the doc");
                    return false;
                }
            };
            let value = match rule.path.as_str() {
                "" => json,
                p => match json.pointer(p) {
                    Some(v) => v.clone(),
                    None => return true, // nothing there to publish
                },
            };
            serde_json::to_vec(&value).expect("JSON serializes")
        };
        // A packet the broker refuses would drop the connection, and come
        // back with it: such a state is not published, and said so.
        if payload.len() > max {
            self.status.dropped.fetch_add(1, Ordering::Relaxed);
            self.status.error(format!(
                "{doc}: a state of {} bytes is more than the broker takes ({max}); not published",
                payload.len()
            ));
            return true;
        }
        let props = PublishProperties {
            user_properties: vec![
                ("heads".into(), heads.join(",")),
                ("doc".into(), doc.to_string()),
            ],
            content_type: Some("application/json".into()),
            ..Default::default()
        };
        match client
            .publish_with_properties(topic, QoS::AtLeastOnce, rule.retain, payload, props)
            .await
        {
            Ok(()) => {
                self.status.published.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.status.error(format!("publish {doc}: {e}"));
                false
            }
        }
    }
}

/// Lists this node's out rules (`keys`, of every bridge) in its membership
/// doc, as the whole map `/mqtt_out`: a rule dropped from the config leaves
/// it, so peers stop counting this node among that rule's owners. A node
/// that never had one writes nothing.
pub(super) async fn announce(docs: &Docs, local: &str, keys: Vec<String>) {
    let Ok(id) = DocId::new(crate::workflow::effect::member_doc(local)) else {
        return;
    };
    let ptr = Pointer::parse("/mqtt_out").expect("a valid pointer");
    let had = docs.get(id.clone(), Some(ptr.clone())).await.is_ok();
    if keys.is_empty() && !had {
        return;
    }
    let map: serde_json::Map<String, Json> =
        keys.into_iter().map(|k| (k, Json::Bool(true))).collect();
    if let Err(e) = docs
        .write(id, Change::SetIfDifferent(vec![(ptr, Json::Object(map))]))
        .await
    {
        tracing::warn!(err = %e, "cannot list this node's MQTT out rules in its membership doc");
    }
}
