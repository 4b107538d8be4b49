//! Validation: ranges and cross-key rules, and the document service view.

use super::error::ConfigError;
use super::sections::Config;
use crate::runtime::DocsConfig;

impl Config {
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
        if let Err(e) = crate::sync::Replicate::new(&self.node.replicate) {
            return invalid("node.replicate", &e);
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
        if self.api.token.is_empty()
            && self.api.tokens.is_empty()
            && !self.api.listen.ip().is_loopback()
        {
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
        if let Some(addr) = self.net.reachable_listen()
            && !self.net.closed()
            && !self.net.open
        {
            return invalid(
                "net.key",
                &format!(
                    "net.listen {addr} is reachable from other machines and the network is \
                     open: any node that reaches it could join and read and write every doc. \
                     Set net.key (`mergeflow keygen`; or MERGEFLOW_NET_KEY), or net.open = true \
                     to run an open network, or listen on 127.0.0.1"
                ),
            );
        }
        if let Err(e) = crate::http_allow::HttpAllow::new(&self.workflow.http_allow) {
            return invalid("workflow.http_allow", &e);
        }
        for (i, b) in self.mqtt.iter().enumerate() {
            let which = |e: String| format!("[[mqtt]] number {} ({}): {e}", i + 1, b.url);
            b.check().or_else(|e| invalid("mqtt", &which(e)))?;
            if !b.tls_ca.as_os_str().is_empty()
                && let Err(e) = crate::http_allow::read_ca(&b.tls_ca)
            {
                return invalid("mqtt.tls_ca", &which(e));
            }
        }
        if self.workflow.max_step_output == 0 {
            return invalid("workflow.max_step_output", "must be at least 1 (bytes)");
        }
        if !self.workflow.tls_ca.as_os_str().is_empty()
            && let Err(e) = crate::http_allow::read_ca(&self.workflow.tls_ca)
        {
            return invalid("workflow.tls_ca", &e);
        }
        if !self.api.token.is_empty() {
            check_token(&self.api.token).or_else(|e| invalid("api.token", &e))?;
        }
        self.check_api_tokens()
            .or_else(|e| invalid("api.tokens", &e))?;
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
        let am = &self.automerge;
        if am.max_message_bytes < 1024 {
            return invalid("automerge.max_message_bytes", "must be at least 1024");
        }
        for (key, v) in [
            (
                "automerge.max_docs_per_connection",
                am.max_docs_per_connection,
            ),
            ("automerge.queue", am.queue),
            ("automerge.max_connections", am.max_connections),
        ] {
            if v == 0 {
                return invalid(key, "must be at least 1");
            }
        }
        for (key, ms) in [
            ("automerge.ping_ms", am.ping_ms),
            ("automerge.ticket_ttl_ms", am.ticket_ttl_ms),
        ] {
            if !(100..=86_400_000).contains(&ms) {
                return invalid(key, "must be between 100 ms and 24 h");
            }
        }
        for (i, server) in am.servers.iter().enumerate() {
            let n = i + 1;
            if let Err(why) = check_server_url(&server.url) {
                return invalid("automerge.servers", &format!("entry {n}: url: {why}"));
            }
            if let Err(why) = crate::feed::DocGlob::new(&server.docs) {
                return invalid("automerge.servers", &format!("entry {n}: docs: {why}"));
            }
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
        if let Err(e) = crate::net::parse_peer_ids(&self.net.admins) {
            return invalid("net.admins", &e);
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
        quic_available(&self.net.listen, cfg!(feature = "quic"))?;
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
            replicate: crate::sync::Replicate::new(&self.node.replicate)
                .unwrap_or(crate::sync::Replicate::All),
        }
    }
}

/// Checks an `[[automerge.servers]]` URL: `ws://` with a host.
///
/// # Errors
/// What is wrong, for the config error.
fn check_server_url(url: &str) -> Result<(), String> {
    if url.starts_with("wss://") {
        return Err(format!(
            "{url:?}: wss:// needs TLS, which this build does not include yet; \
             use ws:// (on loopback or a private network, or through a local TLS proxy)"
        ));
    }
    let Some(rest) = url.strip_prefix("ws://") else {
        return Err(format!("{url:?} is not a ws:// URL"));
    };
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    Ok(())
}

/// A token a client can send in `Authorization: Bearer <token>`.
fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < 16 {
        return Err("must be at least 16 characters".into());
    }
    if token.trim() != token {
        // HTTP drops a header value's surrounding whitespace: such a token
        // could never match.
        return Err(
            "must not begin or end with whitespace (HTTP strips it from the \
                    Authorization header, so no client could send this token)"
                .into(),
        );
    }
    if let Some(c) = token.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "must be printable ASCII (an HTTP header cannot carry it otherwise); it holds '{}'",
            c.escape_default()
        ));
    }
    Ok(())
}

impl Config {
    /// `[[api.tokens]]`: names, secrets and globs.
    fn check_api_tokens(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for t in &self.api.tokens {
            let name_ok = (1..=64).contains(&t.name.len())
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok {
                return Err(format!(
                    "name {:?}: 1 to 64 characters of A-Z a-z 0-9 . _ -",
                    t.name
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(format!("name {:?} is used twice", t.name));
            }
            match (t.token.is_empty(), t.token_sha256.is_empty()) {
                (false, true) => {
                    check_token(&t.token).map_err(|e| format!("{:?}: token {e}", t.name))?
                }
                (true, false) => {
                    if t.token_sha256.len() != 64
                        || !t.token_sha256.bytes().all(|b| b.is_ascii_hexdigit())
                    {
                        return Err(format!(
                            "{:?}: token_sha256 must be 64 hex digits (mergeflow token hash)",
                            t.name
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "{:?}: set exactly one of token and token_sha256",
                        t.name
                    ));
                }
            }
            if t.token == self.api.token && !t.token.is_empty() {
                return Err(format!("{:?}: the same token as api.token", t.name));
            }
            for (what, globs) in [("read", &t.read), ("write", &t.write)] {
                for g in globs {
                    crate::feed::DocGlob::new(g)
                        .map_err(|e| format!("{:?}: {what}: {e}", t.name))?;
                }
            }
        }
        Ok(())
    }
}

impl super::sections::NetTable {
    /// The network is closed to strangers: a pre-shared key (`net.key`)
    /// or a list of allowed peer ids (`net.allow`, checked by noise).
    pub fn closed(&self) -> bool {
        !self.key.is_empty() || !self.allow.is_empty()
    }

    /// The first `net.listen` address another machine can reach: not a
    /// loopback address (`0.0.0.0` and `::` listen on every interface).
    /// Addresses that do not parse are left to the network's own check.
    pub fn reachable_listen(&self) -> Option<&str> {
        use libp2p::multiaddr::{Multiaddr, Protocol};
        self.listen
            .iter()
            .find(|a| {
                let Ok(addr) = a.parse::<Multiaddr>() else {
                    return false;
                };
                addr.iter().any(|p| match p {
                    Protocol::Ip4(ip) => !ip.is_loopback(),
                    Protocol::Ip6(ip) => !ip.is_loopback(),
                    Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => h != "localhost",
                    _ => false,
                })
            })
            .map(String::as_str)
    }

    /// mDNS runs: asked for, and the network is closed or explicitly open
    /// (discovery on an open network would let any device on the LAN in).
    pub fn mdns_on(&self) -> bool {
        self.mdns && (self.closed() || self.open)
    }
}

/// A `/quic-v1` listen address in a build without the `quic` feature is
/// refused by name, instead of failing when the swarm starts.
pub(super) fn quic_available(listen: &[String], built_with_quic: bool) -> Result<(), ConfigError> {
    if !built_with_quic && listen.iter().any(|a| a.contains("/quic")) {
        return Err(ConfigError::Invalid {
            key: "net.listen",
            message: "this build has no QUIC (built without the `quic` feature): \
                      listen on TCP (/ip4/.../tcp/PORT) instead"
                .to_string(),
        });
    }
    Ok(())
}
