//! Who may see and write which documents: doc-id scopes (lists of globs)
//! and the API's scoped tokens (`[[api.tokens]]`).
//!
//! A scope never covers a system doc (`_mergeflow/...`): those belong to
//! the node and its admins, whatever a pattern says.

use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use crate::scope::DocScope;

/// One named API token's rights.
#[derive(Debug)]
pub struct ScopedToken {
    /// Its name: recorded in the changes it makes (`by=<name>`).
    pub name: String,
    /// The docs it may read (and follow in the feed and over the
    /// automerge-repo endpoint).
    pub read: DocScope,
    /// The docs it may change.
    pub write: DocScope,
}

/// What a request may do.
#[derive(Debug, Clone)]
pub enum Access {
    /// Everything: `api.token`, or an API with no token configured.
    Admin,
    /// Only the docs a named token covers.
    Scoped(Arc<ScopedToken>),
}

impl Access {
    /// May read `doc`.
    pub fn can_read(&self, doc: &str) -> bool {
        match self {
            Access::Admin => true,
            Access::Scoped(t) => t.read.covers(doc),
        }
    }

    /// May change `doc`.
    pub fn can_write(&self, doc: &str) -> bool {
        match self {
            Access::Admin => true,
            Access::Scoped(t) => t.write.covers(doc),
        }
    }

    /// The token's name, for a scoped token.
    pub fn name(&self) -> Option<&str> {
        match self {
            Access::Admin => None,
            Access::Scoped(t) => Some(&t.name),
        }
    }
}

/// The tokens an API accepts, kept as SHA-256 digests.
#[derive(Debug, Default)]
pub struct Tokens {
    admin: Option<[u8; 32]>,
    scoped: Vec<([u8; 32], Arc<ScopedToken>)>,
}

/// The SHA-256 of `token`, as `mergeflow token hash` prints it (hex).
pub fn token_sha256(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()).into())
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// 64 hex digits as 32 bytes.
fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Tokens {
    /// The tokens of `api`.
    ///
    /// # Errors
    /// A message naming the bad `[[api.tokens]]` entry (the config's
    /// validation reports the same first).
    pub fn new(api: &crate::config::ApiConfig) -> Result<Tokens, String> {
        let admin = (!api.token.is_empty()).then(|| Sha256::digest(api.token.as_bytes()).into());
        let mut scoped = Vec::with_capacity(api.tokens.len());
        for t in &api.tokens {
            let at = |what: String| format!("api.tokens {:?}: {what}", t.name);
            let digest = match (t.token.is_empty(), t.token_sha256.is_empty()) {
                (false, true) => Sha256::digest(t.token.as_bytes()).into(),
                (true, false) => unhex(&t.token_sha256.to_ascii_lowercase())
                    .ok_or_else(|| at("token_sha256 must be 64 hex digits".into()))?,
                _ => return Err(at("set exactly one of token and token_sha256".into())),
            };
            let token = ScopedToken {
                name: t.name.clone(),
                read: DocScope::new(&t.read).map_err(|e| at(format!("read: {e}")))?,
                write: DocScope::new(&t.write).map_err(|e| at(format!("write: {e}")))?,
            };
            scoped.push((digest, Arc::new(token)));
        }
        Ok(Tokens { admin, scoped })
    }

    /// Any token is configured: requests must present one.
    pub fn required(&self) -> bool {
        self.admin.is_some() || !self.scoped.is_empty()
    }

    /// What `presented` may do: [`Access::Admin`] when no token is
    /// configured; None for a token that matches none. Compares digests, so
    /// the time taken says nothing about how much of a token matched.
    pub fn identify(&self, presented: &str) -> Option<Access> {
        if !self.required() {
            return Some(Access::Admin);
        }
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if self.admin == Some(got) {
            return Some(Access::Admin);
        }
        self.scoped
            .iter()
            .find(|(d, _)| *d == got)
            .map(|(_, t)| Access::Scoped(t.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(p: &[&str]) -> DocScope {
        DocScope::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn scopes_match_segments_and_never_system_docs() {
        let s = scope(&["homes/42/**", "config/*"]);
        assert!(s.covers("homes/42/kitchen"));
        assert!(s.covers("homes/42/a/b"));
        assert!(!s.covers("homes/420/kitchen"));
        assert!(s.covers("config/app"));
        assert!(!s.covers("config/app/x"), "* stays within a segment");
        assert!(!scope(&["**"]).covers("_mergeflow/workflows"));
        assert!(!scope(&[]).covers("anything"));
        assert!(DocScope::new(&["a/[".into()]).unwrap_err().contains("a/["));
    }

    #[test]
    fn tokens_are_told_apart_by_digest() {
        let mut api = crate::config::Config::default().api;
        let t = Tokens::new(&api).unwrap();
        assert!(!t.required());
        assert!(matches!(t.identify(""), Some(Access::Admin)));

        api.token = "admin-token-0123456789".into();
        api.tokens = vec![
            crate::config::ApiToken {
                name: "kitchen-app".into(),
                token: "kitchen-token-0123456789".into(),
                read: vec!["homes/42/**".into()],
                write: vec!["homes/42/**".into()],
                ..Default::default()
            },
            crate::config::ApiToken {
                name: "reader".into(),
                token_sha256: token_sha256("reader-token-0123456789").to_uppercase(),
                read: vec!["**".into()],
                ..Default::default()
            },
        ];
        let t = Tokens::new(&api).unwrap();
        assert!(t.required());
        assert!(matches!(
            t.identify("admin-token-0123456789"),
            Some(Access::Admin)
        ));
        let k = t.identify("kitchen-token-0123456789").unwrap();
        assert_eq!(k.name(), Some("kitchen-app"));
        assert!(k.can_write("homes/42/lights") && !k.can_read("homes/7/lights"));
        let r = t.identify("reader-token-0123456789").unwrap();
        assert!(r.can_read("homes/7/lights") && !r.can_write("homes/7/lights"));
        assert!(t.identify("").is_none());
        assert!(t.identify("kitchen-token-012345678").is_none());
    }
}
