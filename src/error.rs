//! The library's top-level error.

use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::doc::DocError;
use crate::store::StoreError;

/// Any error from the mergeflow library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store cannot be opened or used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A document operation failed.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// The API address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The network could not start.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// A backup could not be written, or a backup file was refused.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// An argument is invalid (e.g. a doc glob); the message says which and why.
    #[error("{0}")]
    BadRequest(String),
    /// A bug or a panicked task.
    #[error("internal error: {0}")]
    Internal(String),
}
