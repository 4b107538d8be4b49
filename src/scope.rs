//! Doc-id scopes: lists of globs that never cover a system doc. A leaf
//! module: API tokens (`crate::access`) and grants (`crate::grants`) both
//! build on it.

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A set of doc-id globs (`*` within a `/`-separated segment, `**` across
/// segments, `?` one character, `{a,b}` alternatives).
#[derive(Debug, Clone)]
pub struct DocScope {
    patterns: Vec<String>,
    set: GlobSet,
}

impl DocScope {
    /// The scope of `patterns`; an empty list covers nothing.
    ///
    /// # Errors
    /// A message naming the first pattern that does not parse.
    pub fn new(patterns: &[String]) -> Result<DocScope, String> {
        let mut set = GlobSetBuilder::new();
        for p in patterns {
            let glob = GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("invalid doc glob {p:?}: {e}"))?;
            set.add(glob);
        }
        Ok(DocScope {
            patterns: patterns.to_vec(),
            set: set
                .build()
                .map_err(|e| format!("invalid doc globs {patterns:?}: {e}"))?,
        })
    }

    /// True if `doc` is covered (never for a system doc).
    pub fn covers(&self, doc: &str) -> bool {
        !crate::doc::is_system(doc) && self.set.is_match(doc)
    }

    /// The patterns, as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}
