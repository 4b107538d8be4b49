//! [`ConfigError`]: what can be wrong with a config, naming the key or file.

use std::path::PathBuf;

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
