//! The MQTT bridge against a real Mosquitto (issue 22): readings land in
//! docs once each while the bridging node is killed and restarted; bad
//! messages become dead letters; a broker that goes away is reconnected
//! to; doc changes are published once per state.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::mosquitto::Mosquitto;
use common::until;
use mergeflow::client::Client;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::{Value, json};

/// Messages a device received: topic, JSON payload, `heads` property.
type Received = Arc<Mutex<Vec<(String, Value, Option<String>)>>>;

/// A device: an MQTT client of the broker, and how many of its QoS 1
/// publishes the broker acknowledged.
struct Device {
    client: AsyncClient,
    acked: Arc<Mutex<u64>>,
    got: Received,
}

impl Device {
    fn connect(broker: &Mosquitto, id: &str) -> Device {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = AsyncClient::new(o, 1000);
        let acked = Arc::new(Mutex::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(poll(eventloop, acked.clone(), got.clone()));
        Device { client, acked, got }
    }

    fn acked(&self) -> u64 {
        *self.acked.lock().unwrap()
    }
}

async fn poll(mut eventloop: EventLoop, acked: Arc<Mutex<u64>>, got: Received) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => *acked.lock().unwrap() += 1,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                let heads = p.properties.as_ref().and_then(|pr| {
                    pr.user_properties
                        .iter()
                        .find(|(k, _)| k == "heads")
                        .map(|(_, v)| v.clone())
                });
                got.lock().unwrap().push((topic, value, heads));
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn bridge_config(broker: &Mosquitto, client_id: &str, extra: &str) -> String {
    format!(
        "[[mqtt]]\nurl = \"{}\"\nclient_id = \"{client_id}\"\n{extra}\
         [[mqtt.in]]\nsubscribe = \"sensors/+/reading\"\ndoc = \"sensors/{{1}}\"\npath = \"/readings/-\"\n\
         [[mqtt.in]]\nsubscribe = \"status/#\"\ndoc = \"status/{{1}}\"\nmerge = true\n\
         [[mqtt.out]]\npublish = \"alerts/*\"\ntopic = \"out/{{doc}}\"\n",
        broker.url()
    )
}

/// The `[[mqtt]]` brokers of a config text.
fn brokers(cfg: &str) -> Vec<mergeflow::config::MqttBroker> {
    #[derive(serde::Deserialize)]
    struct Only {
        mqtt: Vec<mergeflow::config::MqttBroker>,
    }
    toml::from_str::<Only>(cfg).unwrap().mqtt
}

/// `GET /v1/mqtt` of the node at `api`, if it answers with JSON.
async fn mqtt_status(api: &str) -> Option<Value> {
    reqwest::get(format!("{api}/v1/mqtt"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// Polls `GET /v1/mqtt` of the node at `api` until its first bridge is
/// connected (or, with `false`, is not).
async fn bridge_connected(api: &str, connected: bool) {
    until("the bridge's connection state", || async {
        let s = mqtt_status(api).await?;
        (s["bridges"][0]["connected"] == json!(connected)).then_some(())
    })
    .await;
}

/// The `seq`s of the readings of `doc` as `get` returns it.
fn seqs(doc: &Value) -> Vec<u64> {
    doc["readings"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["seq"].as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_acknowledged_by_the_broker_land_once_on_every_node_across_a_kill() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let seed = common::seed(22);
    const READINGS: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    // B: a node without a bridge, which A syncs to.
    let b = common::p2p_node(&dir.path().join("b"), vec![], |_| {}).await;
    let b_addr = common::listen_addr(&b).await;
    // A: the bridging node, a process (so it can be killed with -9).
    let conf = dir.path().join("a.toml");
    std::fs::write(&conf, bridge_config(&broker, "bridge-a", "")).unwrap();
    let a_dir = dir.path().join("a");
    let args = ["--config", conf.to_str().unwrap(), "--peer", &b_addr];
    let a = common::NodeProc::try_start(&a_dir, &args).unwrap();
    bridge_connected(&a.api, true).await;

    let device = Device::connect(&broker, "device-1");
    let publisher = {
        let client = device.client.clone();
        tokio::spawn(async move {
            for seq in 0..READINGS {
                let payload = serde_json::to_vec(&json!({ "seq": seq, "c": seq % 40 })).unwrap();
                client
                    .publish("sensors/dev1/reading", QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
        })
    };
    // Kill A once a third of the readings were taken by the broker, then
    // bring it back while the device keeps publishing.
    let kill_at = READINGS / 3 + seed % 1000;
    while device.acked() < kill_at {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill9();
    let a = common::NodeProc::try_start(&a_dir, &args).unwrap();
    publisher.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    while device.acked() < READINGS {
        assert!(
            Instant::now() < deadline,
            "the broker acknowledged {} of {READINGS}",
            device.acked()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every acknowledged reading, once, on both nodes: once B holds as
    // many (reading the whole doc is costly in a debug build: every 0.5 s)
    // and the two agree on the doc's heads.
    let a_client = Client::new(&a.api);
    let deadline = Instant::now() + Duration::from_secs(240);
    let doc = || b.doc("sensors/dev1").unwrap();
    loop {
        let on_b = doc().get().await.map(|d| seqs(&d).len()).unwrap_or(0);
        if on_b as u64 >= READINGS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B holds {on_b} of {READINGS} (seed {seed})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    until("A and B to agree on the doc", || async {
        let on_a = a_client.heads("sensors/dev1").await.ok()?;
        let on_b = doc().heads().await.ok()?;
        (on_a == on_b).then_some(())
    })
    .await;
    let want: Vec<u64> = (0..READINGS).collect();
    let on_a = seqs(&a_client.get("sensors/dev1", None).await.unwrap());
    let on_b = seqs(&doc().get().await.unwrap());
    for (node, got) in [("A", on_a), ("B", on_b)] {
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted.len(),
            want.len(),
            "{node}: {} readings (seed {seed})",
            got.len()
        );
        assert!(sorted == want, "{node}: every reading once (seed {seed})");
    }
    let s: Value = reqwest::get(format!("{}/v1/mqtt", a.api))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["dead_letters"], json!(0), "{s}");
    drop(a_client);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_become_dead_letters_and_a_broker_that_goes_away_is_reconnected_to() {
    let Some(mut broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = bridge_config(&broker, "bridge-bad", "max_payload = 1024\n");
    let node = common::api_node(dir.path(), |c| c.mqtt = brokers(&cfg)).await;
    let api = format!("http://{}", node.api_addr().unwrap());
    let status = || async { mqtt_status(&api).await.expect("GET /v1/mqtt") };
    bridge_connected(&api, true).await;
    let device = Device::connect(&broker, "device-bad");
    let sends: Vec<(&str, Vec<u8>)> = vec![
        ("sensors/d/reading", b"<not json>".to_vec()),
        ("sensors/d/reading", vec![b' '; 4096]),
        ("status", b"{\"up\": true}".to_vec()), // status/# with no level 1
        ("status/d", b"[1, 2]".to_vec()),       // merge takes an object
        ("sensors/d/reading", b"{\"seq\": 1}".to_vec()),
        ("status/d", b"{\"up\": true}".to_vec()),
    ];
    for (topic, payload) in &sends {
        device
            .client
            .publish(*topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    until("the good messages stored", || async {
        let d = node.doc("sensors/d").unwrap().get().await.ok()?;
        let s = node.doc("status/d").unwrap().get().await.ok()?;
        (seqs(&d) == [1] && s == json!({"up": true})).then_some(())
    })
    .await;
    let dead: Value = until("four dead letters", || async {
        let d: Value = reqwest::get(format!("{api}/v1/mqtt/dead"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (d["count"] == json!(4)).then_some(d)
    })
    .await;
    let errors: Vec<String> = dead["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("{} {}", l["topic"], l["error"]))
        .collect();
    let has = |topic: &str, what: &str| {
        errors
            .iter()
            .any(|e| e.starts_with(&format!("\"{topic}\"")) && e.contains(what))
    };
    assert!(has("sensors/d/reading", "not JSON"), "{errors:?}");
    assert!(
        has("sensors/d/reading", "over max_payload (1024)"),
        "{errors:?}"
    );
    assert!(has("status", "no level 1"), "{errors:?}");
    assert!(has("status/d", "merge takes a JSON object"), "{errors:?}");
    // The same in /metrics and /v1/status.
    let text = reqwest::get(format!("{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = common::samples(&text);
    let series = |result: &str| {
        format!(
            "mergeflow_mqtt_messages_total{{broker=\"{}\",result=\"{result}\"}}",
            broker.url()
        )
    };
    assert_eq!(m.get(&series("dead")), Some(&4.0), "{text}");
    assert_eq!(m.get(&series("stored")), Some(&2.0), "{text}");
    let st: Value = reqwest::get(format!("{api}/v1/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["mqtt"][0]["dead_letters"], json!(4), "{st}");
    let first = dead["dead_letters"][0]["id"].as_u64().unwrap();
    let gone = reqwest::Client::new()
        .delete(format!("{api}/v1/mqtt/dead/{first}"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 200);

    // The broker goes away (and forgets every session: no persistence),
    // comes back; the bridge reconnects, subscribes again, and takes more.
    broker.stop();
    bridge_connected(&api, false).await;
    // Down for longer than the bridge's longest wait between attempts (5 s):
    // the outage itself, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(status().await["bridges"][0]["connected"], json!(false));
    broker.restart();
    bridge_connected(&api, true).await;
    let device = Device::connect(&broker, "device-bad-2");
    // Published until stored: the bridge's subscription may follow the
    // device's first publish by a moment (the broker forgot it).
    until("a reading after the broker came back", || async {
        device
            .client
            .publish(
                "sensors/d/reading",
                QoS::AtLeastOnce,
                false,
                b"{\"seq\": 2}".to_vec(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let d = node.doc("sensors/d").unwrap().get().await.ok()?;
        seqs(&d).contains(&2).then_some(())
    })
    .await;
    let s = status().await;
    assert!(s["bridges"][0]["last_error"].is_string(), "{s}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doc_changes_are_published_once_per_state_with_their_heads() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = bridge_config(&broker, "bridge-out", "");
    let node = common::api_node(dir.path(), |c| c.mqtt = brokers(&cfg)).await;
    let api = format!("http://{}", node.api_addr().unwrap());
    bridge_connected(&api, true).await;
    let watcher = Device::connect(&broker, "watcher");
    watcher
        .client
        .subscribe("out/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    // The subscription is in place once a probe comes back.
    until("the watcher subscribed", || async {
        watcher
            .client
            .publish("out/probe", QoS::AtLeastOnce, false, b"1".to_vec())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = watcher.got.lock().unwrap();
        got.iter().any(|(t, _, _)| t == "out/probe").then_some(())
    })
    .await;
    let mut states = Vec::new();
    for level in 1..=5 {
        let w = node
            .doc("alerts/boiler")
            .unwrap()
            .patch(json!({ "level": level }))
            .await
            .unwrap();
        states.push((level, w.heads.join(",")));
        until("the state published", || async {
            let got = watcher.got.lock().unwrap();
            got.iter()
                .any(|(t, v, _)| t == "out/alerts/boiler" && v["level"] == json!(level))
                .then_some(())
        })
        .await;
    }
    // A doc outside the rule's glob is not published.
    node.doc("other/x")
        .unwrap()
        .patch(json!({"a": 1}))
        .await
        .unwrap();
    node.doc("alerts/boiler")
        .unwrap()
        .patch(json!({"level": 6}))
        .await
        .unwrap();
    until("the last state", || async {
        let got = watcher.got.lock().unwrap();
        got.iter()
            .any(|(_, v, _)| v["level"] == json!(6))
            .then_some(())
    })
    .await;
    let got = watcher.got.lock().unwrap().clone();
    let mut per_heads: BTreeMap<String, u32> = BTreeMap::new();
    for (topic, value, heads) in &got {
        if topic == "out/probe" {
            continue;
        }
        assert_eq!(topic, "out/alerts/boiler", "only the rule's docs: {got:?}");
        let heads = heads.clone().expect("each state carries its heads");
        *per_heads.entry(heads.clone()).or_default() += 1;
        if let Some((level, _)) = states.iter().find(|(_, h)| *h == heads) {
            assert_eq!(value["level"], json!(level), "the doc at those heads");
        }
    }
    assert!(
        per_heads.values().all(|n| *n == 1),
        "once per state: {per_heads:?}"
    );
    assert_eq!(per_heads.len(), 6, "{per_heads:?}");
    // Peers count this node among the rule's owners by its membership doc,
    // which lists exactly its out rules.
    let member = format!("_mergeflow/nodes/{}", node.peer_id());
    let listed = node
        .doc(&member)
        .unwrap()
        .get_path("/mqtt_out")
        .await
        .unwrap();
    assert_eq!(listed.as_object().map(|m| m.len()), Some(1), "{listed}");
    node.shutdown().await.unwrap();
}

/// `mqtts://`: the bridge trusts a broker whose certificate `tls_ca`
/// names, and readings arrive over TLS; without `tls_ca` the same broker
/// is refused, and the bridge says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtts_broker_is_trusted_through_tls_ca_and_refused_without() {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let Some(broker) = Mosquitto::start_tls(&ck.cert.pem(), &ck.key_pair.serialize_pem()) else {
        return;
    };
    let tls_port = broker.tls_port.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let bridge = |name: &str, tls_ca: &str| -> Vec<mergeflow::config::MqttBroker> {
        brokers(&format!(
            "[[mqtt]]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nclient_id = \"{name}\"\n{tls_ca}\
             [[mqtt.in]]\nsubscribe = \"sensors/+/reading\"\ndoc = \"sensors/{{1}}\"\n\
             path = \"/readings/-\"\n"
        ))
    };
    let trusting = bridge("tls-trusting", &format!("tls_ca = \"{}\"\n", ca.display()));
    let node = common::api_node(&dir.path().join("a"), |c| c.mqtt = trusting).await;
    let api = format!("http://{}", node.api_addr().unwrap());
    bridge_connected(&api, true).await;
    // The device publishes on the plain listener; the bridge reads over TLS.
    let device = Device::connect(&broker, "device-tls");
    device
        .client
        .publish(
            "sensors/t/reading",
            QoS::AtLeastOnce,
            false,
            b"{\"seq\": 1}".to_vec(),
        )
        .await
        .unwrap();
    until("the reading over TLS", || async {
        let d = node.doc("sensors/t").unwrap().get().await.ok()?;
        (seqs(&d) == [1]).then_some(())
    })
    .await;
    node.shutdown().await.unwrap();

    let doubting = bridge("tls-doubting", "");
    let node = common::api_node(&dir.path().join("b"), |c| c.mqtt = doubting).await;
    let api = format!("http://{}", node.api_addr().unwrap());
    let error = until("the bridge's TLS error", || async {
        let s = mqtt_status(&api).await?;
        let bridge = &s["bridges"][0];
        assert_eq!(bridge["connected"], json!(false), "{s}");
        bridge["last_error"].as_str().map(str::to_string)
    })
    .await;
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error should name the certificate: {error}"
    );
    node.shutdown().await.unwrap();
}
