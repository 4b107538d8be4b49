//! The vocabulary of partial replication (see `scope.rs`): the docs a node
//! asked for ([`Replicate`]) and the grants' read rules ([`ReadRule`]).

use std::sync::Arc;

use crate::scope::DocScope;

/// The docs a node asked for (`node.replicate`).
#[derive(Debug, Clone)]
pub enum Replicate {
    /// Every doc (the default).
    All,
    /// The docs these globs cover, and system docs.
    Globs(DocScope),
}

impl Replicate {
    /// The scope of `patterns`: all docs when one of them is `**`.
    ///
    /// # Errors
    /// A pattern that does not parse.
    pub fn new(patterns: &[String]) -> Result<Replicate, String> {
        if patterns.iter().any(|p| p == "**") {
            return Ok(Replicate::All);
        }
        DocScope::new(patterns).map(Replicate::Globs)
    }

    /// True if it asks for `doc` (every system doc is asked for).
    pub fn covers(&self, doc: &str) -> bool {
        match self {
            Replicate::All => true,
            Replicate::Globs(s) => crate::doc::is_system(doc) || s.covers(doc),
        }
    }

    /// True for [`Replicate::All`].
    pub fn is_all(&self) -> bool {
        matches!(self, Replicate::All)
    }

    /// The globs as a [`Message::Scope`](super::Message::Scope) carries
    /// them: `None` for all docs.
    pub fn to_wire(&self) -> Option<Vec<String>> {
        match self {
            Replicate::All => None,
            Replicate::Globs(s) => Some(s.patterns().to_vec()),
        }
    }

    /// The scope a peer's message names.
    ///
    /// # Errors
    /// A pattern that does not parse.
    pub fn from_wire(globs: Option<Vec<String>>) -> Result<Replicate, String> {
        globs.map_or(Ok(Replicate::All), |g| Replicate::new(&g))
    }
}

/// Whether a peer (by its key; the local node by `SyncConfig::local`) may
/// read a doc: the grants' read rules, the same on every node that holds
/// the same access doc.
#[derive(Clone)]
pub struct ReadRule(pub Arc<ReadFn>);

/// The function behind a [`ReadRule`]: (peer, doc) -> may read.
pub type ReadFn = dyn Fn(&str, &str) -> bool + Send + Sync;

impl ReadRule {
    /// True if `peer` may read `doc`.
    pub fn allows(&self, peer: &str, doc: &str) -> bool {
        (self.0)(peer, doc)
    }
}

impl std::fmt::Debug for ReadRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadRule(..)")
    }
}
