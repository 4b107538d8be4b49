//! `[[mqtt]]`: MQTT brokers this node bridges to, with rules for what
//! flows in (topics into docs) and out (docs onto topics).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One `[[mqtt]]` entry: a broker, and the rules of its bridge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttBroker {
    /// `mqtt://host:port` (1883 by default) or `mqtts://host:port` (TLS,
    /// 8883 by default).
    pub url: String,
    /// The client id, the broker's key for this node's session (the
    /// readings it holds while the node is away); empty:
    /// `mergeflow-<peer id>`. Give each node its own.
    #[serde(default)]
    pub client_id: String,
    /// User name; empty: none.
    #[serde(default)]
    pub username: String,
    /// The environment variable holding the password (never the password
    /// itself: configs get copied and shown).
    #[serde(default)]
    pub password_env: String,
    /// For `mqtts://`: a PEM file of CA certificates trusted besides the
    /// system's.
    #[serde(default)]
    pub tls_ca: PathBuf,
    /// Keep-alive, in milliseconds.
    #[serde(default = "keep_alive", deserialize_with = "crate::duration::de_ms")]
    pub keep_alive_ms: u64,
    /// Largest payload taken in, in bytes; a larger one is a dead letter.
    #[serde(default = "max_payload")]
    pub max_payload: usize,
    /// Readings the broker may send before this node acknowledges them
    /// (MQTT 5 receive maximum); each is acknowledged once durable.
    #[serde(default = "inflight")]
    pub inflight: u16,
    /// Topics into docs.
    #[serde(default, rename = "in")]
    pub inbound: Vec<MqttIn>,
    /// Docs onto topics.
    #[serde(default, rename = "out")]
    pub outbound: Vec<MqttOut>,
}

/// One `[[mqtt.in]]` rule: messages on matching topics written into docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttIn {
    /// The topic filter subscribed to (`+` one level, `#` the rest).
    pub subscribe: String,
    /// The doc written, a template: `{N}` is level N of the topic (from 0),
    /// `{topic}` the whole topic.
    pub doc: String,
    /// Where the JSON payload goes: a JSON Pointer (`/readings/-` appends
    /// to a list, made if missing); empty with `merge`.
    #[serde(default)]
    pub path: String,
    /// Merge the payload (a JSON object) into the doc as a merge patch.
    #[serde(default)]
    pub merge: bool,
}

/// One `[[mqtt.out]]` rule: docs published when they change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttOut {
    /// The docs published, a doc id glob.
    pub publish: String,
    /// The topic, a template: `{doc}` is the doc id, `{N}` its level N.
    pub topic: String,
    /// A JSON Pointer: publish only the value there; empty: the whole doc.
    #[serde(default)]
    pub path: String,
    /// Published as retained messages (a new subscriber gets the last).
    #[serde(default)]
    pub retain: bool,
}

fn keep_alive() -> u64 {
    30_000
}

fn max_payload() -> usize {
    256 * 1024
}

fn inflight() -> u16 {
    1000
}

impl MqttBroker {
    /// Checks the entry: its URL, its rules' filters, templates, pointers
    /// and globs.
    ///
    /// # Errors
    /// What is wrong, naming the rule.
    pub fn check(&self) -> Result<(), String> {
        self.address()?;
        if self.inflight == 0 {
            return Err("inflight: at least 1".into());
        }
        if self.max_payload == 0 {
            return Err("max_payload: at least 1 byte".into());
        }
        if self.inbound.is_empty() && self.outbound.is_empty() {
            return Err("no [[mqtt.in]] or [[mqtt.out]] rule: the bridge would do nothing".into());
        }
        use crate::topic;
        for (i, r) in self.inbound.iter().enumerate() {
            let at = |e: String| format!("in[{i}] ({:?}): {e}", r.subscribe);
            topic::check_filter(&r.subscribe).map_err(at)?;
            topic::check_template(&r.doc, topic::levels(&r.subscribe), &["topic"]).map_err(at)?;
            match (r.path.as_str(), r.merge) {
                ("", false) => return Err(at("set path (a JSON Pointer) or merge = true".into())),
                ("", true) => {}
                (_, true) => return Err(at("path or merge, not both".into())),
                (p, false) => {
                    crate::doc::Pointer::parse(p).map_err(|e| at(format!("path: {e}")))?;
                    if p == "/" || !p.starts_with('/') {
                        return Err(at(format!("path {p:?}: a JSON Pointer below the root")));
                    }
                }
            }
        }
        for (i, r) in self.outbound.iter().enumerate() {
            let at = |e: String| format!("out[{i}] ({:?}): {e}", r.publish);
            crate::feed::DocGlob::new(&r.publish).map_err(|e| at(e.to_string()))?;
            topic::check_template(&r.topic, None, &["doc"]).map_err(at)?;
            let sample = topic::fill(&r.topic, "a/b/c/d/e/f/g/h/i/j", &["doc"]).unwrap_or_default();
            topic::check_topic(&sample).map_err(at)?;
            if !r.path.is_empty() {
                crate::doc::Pointer::parse(&r.path).map_err(|e| at(format!("path: {e}")))?;
            }
        }
        Ok(())
    }

    /// Host, port and whether to use TLS, from the URL.
    ///
    /// # Errors
    /// A URL that is not `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub fn address(&self) -> Result<(String, u16, bool), String> {
        let url = &self.url;
        let (rest, tls, port) = if let Some(r) = url.strip_prefix("mqtt://") {
            (r, false, 1883)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (r, true, 8883)
        } else {
            return Err(format!(
                "url {url:?}: mqtt://host:port or mqtts://host:port"
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(format!(
                "url {url:?}: host and port only (credentials go in username and password_env)"
            ));
        }
        // [v6]:port, host:port, host
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')) => {
                let p = p
                    .parse::<u16>()
                    .map_err(|_| format!("url {url:?}: port {p:?} is not a number"))?;
                (h.trim_start_matches('[').trim_end_matches(']'), p)
            }
            _ => (rest, port),
        };
        Ok((host.to_string(), port, tls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(toml_text: &str) -> Result<MqttBroker, String> {
        let b: MqttBroker = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        b.check()?;
        Ok(b)
    }

    #[test]
    fn brokers_and_rules_are_checked_with_the_rule_named() {
        let ok = "url = \"mqtt://127.0.0.1:1884\"\n[[in]]\nsubscribe = \"sensors/+/reading\"\n\
                  doc = \"sensors/{1}\"\npath = \"/readings/-\"\n[[out]]\npublish = \"alerts/*\"\n\
                  topic = \"alerts/{1}\"\nretain = true\n";
        let b = broker(ok).unwrap();
        assert_eq!(b.address().unwrap(), ("127.0.0.1".into(), 1884, false));
        assert_eq!(b.inflight, 1000);
        let bad = [
            (
                ok.replace("mqtt://127.0.0.1:1884", "http://x"),
                "mqtt://host",
            ),
            (ok.replace("1884", "port"), "not a number"),
            (ok.replace("127.0.0.1", "u:p@h"), "host and port only"),
            (ok.replace("sensors/+/reading", "sensors/#/x"), "in[0]"),
            (ok.replace("sensors/{1}", "sensors/{3}"), "level 3"),
            (
                ok.replace("path = \"/readings/-\"\n", ""),
                "path (a JSON Pointer) or merge",
            ),
            (ok.replace("alerts/{1}\"", "alerts/+\""), "out[0]"),
            (
                ok.replace("publish = \"alerts/*\"", "publish = \"[\""),
                "out[0]",
            ),
        ];
        for (text, want) in bad {
            let e = broker(&text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let v6 = MqttBroker {
            url: "mqtts://[::1]:8884".into(),
            ..b.clone()
        };
        assert_eq!(v6.address().unwrap(), ("::1".into(), 8884, true));
        let plain = MqttBroker {
            url: "mqtt://broker.local".into(),
            ..b
        };
        assert_eq!(
            plain.address().unwrap(),
            ("broker.local".into(), 1883, false)
        );
    }
}
