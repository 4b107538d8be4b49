//! Loading: defaults < TOML file < `MERGEFLOW_*` env < flags ([`Overrides`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::error::ConfigError;
use super::sections::{Config, LogFormat};

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

    /// The config as JSON with its secrets hidden: `api.token`, each
    /// `api.tokens` entry's `token` and `net.key` read `"(set)"` when set
    /// (empty when not). For `/v1/status` and
    /// `mergeflow status`, which show the effective config.
    pub fn redacted(&self) -> serde_json::Value {
        let mut c = self.clone();
        let named = c.api.tokens.iter_mut().map(|t| &mut t.token);
        for secret in [&mut c.api.token, &mut c.net.key].into_iter().chain(named) {
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
