//! Configuration: defaults < TOML file < `MERGEFLOW_<TABLE>_<KEY>` env < flags.
//!
//! Every key is documented in `config.example.toml` (a test parses it). An unknown
//! key or a bad value is an error that names the key and where it came from.
//!
//! One file per concern: `sections.rs` (the tables and their defaults),
//! `load.rs` (file, env and flags), `validate.rs` (ranges and cross-key
//! rules), `error.rs` ([`ConfigError`]).

mod error;
mod load;
mod mqtt;
mod sections;
mod validate;

pub use error::ConfigError;
pub use load::Overrides;
pub use mqtt::{MqttBroker, MqttIn, MqttOut};
pub use sections::{
    ApiConfig, ApiToken, AutomergeConfig, AutomergeServer, Config, DocConfig, LogConfig, LogFormat,
    NetTable, NodeConfig, PerfConfig, StoreConfig, WorkflowConfig,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::StringMode;
    use std::path::PathBuf;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../../config.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn example_file_documents_every_key() {
        let text = include_str!("../../config.example.toml");
        let table = toml::Table::try_from(Config::default()).unwrap();
        for (t, keys) in table {
            assert!(text.contains(&format!("[{t}]")), "table [{t}] missing");
            // Arrays of tables ([[mqtt]]) are documented by a commented example.
            let Some(keys) = keys.as_table() else {
                continue;
            };
            for (k, _) in keys {
                assert!(text.contains(&format!("\n{k} = ")), "key {t}.{k} missing");
            }
        }
    }

    #[test]
    fn automerge_servers_need_a_ws_url_and_a_valid_glob() {
        let ok = "[[automerge.servers]]\nurl = \"ws://127.0.0.1:3030/sync?token=x\"\n";
        let c = Config::from_toml(ok).unwrap();
        c.validate().unwrap();
        assert_eq!(c.automerge.servers[0].docs, "**", "all docs by default");
        for (bad, says) in [
            ("url = \"wss://sync.automerge.org\"", "TLS"),
            ("url = \"http://x\"", "not a ws://"),
            ("url = \"ws://\"", "no host"),
            ("url = \"ws:///x\"", "no host"),
            ("url = \"ws://x\"\ndocs = \"notes/{a\"", "docs"),
        ] {
            let text = format!("[[automerge.servers]]\n{bad}\n");
            let err = Config::from_toml(&text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("automerge.servers") && err.contains(says),
                "{bad}: {err}"
            );
        }
        let unknown = "[[automerge.servers]]\nurl = \"ws://x\"\nglob = \"a\"\n";
        assert!(
            Config::from_toml(unknown).is_err(),
            "unknown keys are refused"
        );
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
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let not_pem = not_pem.display().to_string();
        for (key, value, want) in [
            (
                "MERGEFLOW_WORKFLOW_TLS_CA",
                "/no/such/ca.pem",
                "cannot read /no/such/ca.pem",
            ),
            (
                "MERGEFLOW_WORKFLOW_TLS_CA",
                not_pem.as_str(),
                "holds no certificate",
            ),
            ("MERGEFLOW_WORKFLOW_MAX_STEP_OUTPUT", "0", "at least 1"),
        ] {
            let err = Config::load(None, env(&[(key, value)]), &Overrides::default())
                .unwrap_err()
                .to_string();
            let name = key.trim_start_matches("MERGEFLOW_WORKFLOW_").to_lowercase();
            assert!(
                err.contains(&format!("workflow.{name}")) && err.contains(want),
                "{err}"
            );
        }
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

    /// A build without the `quic` feature names the listen address it
    /// cannot serve, instead of failing when the swarm starts.
    #[test]
    fn a_quic_address_in_a_build_without_quic_is_refused_by_name() {
        let quic = vec!["/ip4/127.0.0.1/udp/0/quic-v1".to_string()];
        let e = validate::quic_available(&quic, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("net.listen") && e.contains("quic"), "{e}");
        validate::quic_available(&quic, true).unwrap();
        validate::quic_available(&["/ip4/127.0.0.1/tcp/0".to_string()], false).unwrap();
    }

    #[test]
    fn a_network_reachable_from_other_machines_needs_a_key_or_net_open() {
        let mut c = Config::default();
        assert_eq!(c.net.reachable_listen(), None, "loopback by default");
        assert!(!c.net.mdns_on(), "no mDNS on an open network by default");
        c.validate().unwrap();
        // QUIC where the build has it, first: the loop leaves the last
        // address for the checks after it (QUIC cannot carry net.key).
        let quic = cfg!(feature = "quic").then_some(("/ip4/127.8.0.1/udp/4001/quic-v1", false));
        for (addr, reachable) in quic.into_iter().chain([
            ("/ip4/127.0.0.1/tcp/4001", false),
            ("/ip6/::1/tcp/4001", false),
            ("/dns/localhost/tcp/4001", false),
            ("/ip4/0.0.0.0/tcp/4001", true),
            ("/ip6/::/tcp/4001", true),
            ("/ip4/192.168.1.20/tcp/4001", true),
            ("/dns4/gateway.example/tcp/4001", true),
        ]) {
            c.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into(), addr.into()];
            assert_eq!(c.net.reachable_listen().is_some(), reachable, "{addr}");
            let err = c.validate().err().map(|e| e.to_string());
            if reachable {
                let err = err.unwrap_or_else(|| panic!("{addr} accepted without net.key"));
                assert!(
                    err.contains("net.key") && err.contains("net.open") && err.contains(addr),
                    "{err}"
                );
                assert!(!err.contains('\n'), "one line: {err}");
            } else {
                assert_eq!(err, None, "{addr}");
            }
        }
        // Any of the three opens the door: a key, an allow list, or open.
        c.net.key = crate::net::generate_key();
        c.validate().unwrap();
        assert!(c.net.mdns_on());
        c.net.key.clear();
        c.net.allow = vec!["12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA".into()];
        c.validate().unwrap();
        c.net.allow.clear();
        c.net.open = true;
        c.validate().unwrap();
        assert!(c.net.mdns_on());
        c.net.mdns = false;
        assert!(!c.net.mdns_on());
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
