//! Who may write which documents across the network: `net.admins` (config)
//! and the grants of the access file an admin applies
//! (`mergeflow access apply access.toml`), which every node receives by sync
//! in the system doc [`ACCESS_DOC`].
//!
//! A node checks every change it stores against the [`Policy`] it holds:
//! a change from a peer by the signature's signer (`runtime::sigs`), a
//! local write by this node's own peer id, before any change is made.
//!
//! - `_mergeflow/nodes/<peer>` (membership): only that peer.
//! - [`ACCESS_DOC`] and `_mergeflow/workflows/...` (definitions, enable and
//!   disable): only admins. With `net.admins` empty every node is an admin,
//!   as before admins existed.
//! - Effect markers (`_mergeflow/effects/<workflow>/...`): the nodes that
//!   run that workflow, as their membership docs' `/ran` shows (every
//!   workflow a node has run; entries are never removed, so a node's old
//!   markers stay valid after it stops running one). The node itself may
//!   always write its own (its membership doc may not be read back yet). A
//!   marker refused by this rule is not charged to the sender: the signer's
//!   membership doc may simply not have arrived yet (see [`Policy::blames`]).
//! - Other system docs: every admitted node.
//! - Data docs: with no access file, every admitted node. With one, admins
//!   and the peers a grant's `write` globs cover (`{peer}` stands for the
//!   peer's id). A grant names peers by id, or by `labels` that the peer's
//!   membership doc shows (`node.labels`): labels are what a node says
//!   about itself, so grant by label only what any admitted node may have.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::scope::DocScope;

/// The system doc holding the applied access file.
pub const ACCESS_DOC: &str = "_mergeflow/access";

/// An access file (TOML), as an admin applies it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessFile {
    /// The grants; a peer may write what any grant covering it allows.
    #[serde(default)]
    pub grant: Vec<Grant>,
}

/// One grant: who, and which docs they may write and read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Peer ids this grant is for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Or: every node whose `node.labels` include all of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Doc globs they may write; `{peer}` is the peer's own id.
    #[serde(default)]
    pub write: Vec<String>,
    /// Doc globs they may read (and receive); `{peer}` as in `write`.
    #[serde(default)]
    pub read: Vec<String>,
}

impl AccessFile {
    /// Parses and checks an access file; `source` names it in errors.
    ///
    /// # Errors
    /// What is wrong and where: TOML syntax, an unknown key, a grant that
    /// names nobody, a peer id or glob that does not parse, a glob that
    /// reaches for system docs.
    pub fn parse(text: &str, source: &str) -> Result<AccessFile, String> {
        let file: AccessFile =
            toml::from_str(text).map_err(|e| format!("{source}: {}", e.to_string().trim()))?;
        file.check().map_err(|e| format!("{source}: {e}"))?;
        Ok(file)
    }

    /// What in a valid file probably does not do what its author meant: a
    /// `write` glob that is not among the same grant's `read` globs (a node
    /// holds, and so writes, only docs it may read; another grant may still
    /// give the same nodes the read).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, g) in self.grant.iter().enumerate() {
            if g.read.iter().any(|r| r == "**") {
                continue;
            }
            for w in g.write.iter().filter(|w| !g.read.contains(w)) {
                out.push(format!(
                    "grant {}: write {w:?} is not among its read globs: its nodes write only \
                     docs they may also read (add it to read, unless another grant does)",
                    i + 1
                ));
            }
        }
        out
    }

    /// Checks a parsed file (see [`parse`](Self::parse)).
    ///
    /// # Errors
    /// As [`parse`](Self::parse), naming the grant by its position.
    pub fn check(&self) -> Result<(), String> {
        for (i, g) in self.grant.iter().enumerate() {
            let at = format!("grant {}", i + 1);
            if g.peers.is_empty() && g.labels.is_empty() {
                return Err(format!("{at}: names nobody (give peers or labels)"));
            }
            for p in &g.peers {
                p.parse::<libp2p::PeerId>()
                    .map_err(|e| format!("{at}: peers: {p:?} is not a peer id ({e})"))?;
            }
            for (key, globs) in [("write", &g.write), ("read", &g.read)] {
                for glob in globs {
                    if glob.starts_with(crate::doc::SYSTEM_PREFIX) {
                        return Err(format!(
                            "{at}: {key}: {glob:?} names system docs, which grants never cover"
                        ));
                    }
                    DocScope::new(&[expand(glob, "12D3KooWpeer")])
                        .map_err(|e| format!("{at}: {key}: {e}"))?;
                }
            }
        }
        Ok(())
    }
}

fn expand(glob: &str, peer: &str) -> String {
    glob.replace("{peer}", peer)
}

/// The workflow whose effect markers doc `id` holds, if it is a marker doc
/// (`_mergeflow/effects/<workflow>/<hash>`; see `workflow::effect`).
fn marker_workflow(id: &str) -> Option<&str> {
    let rest = id
        .strip_prefix(crate::doc::SYSTEM_PREFIX)?
        .strip_prefix("effects/")?;
    Some(rest.split_once('/')?.0)
}

/// What this node holds as the rules: admins, the applied grants, and the
/// labels each node's membership doc shows.
#[derive(Debug, Default)]
pub struct Policy {
    admins: BTreeSet<String>,
    /// `None`: no access file applied.
    grants: Option<Vec<Grant>>,
    /// Write and read scopes per peer, built once for every peer known.
    scopes: HashMap<String, (DocScope, DocScope)>,
    /// Allows everything: a hostile node in tests.
    anything: bool,
    /// The workflows each node has run (its membership doc's `/ran`).
    ran: HashMap<String, BTreeSet<String>>,
    /// This node's peer id (it writes its own effect markers).
    me: String,
}

impl Policy {
    /// The rules from `admins` (`net.admins`), the applied access file if
    /// any, and each known node's labels.
    pub fn new(
        admins: &[String],
        access: Option<AccessFile>,
        labels: &HashMap<String, BTreeMap<String, String>>,
    ) -> Policy {
        let grants = access.map(|a| a.grant);
        let mut scopes = HashMap::new();
        if let Some(grants) = &grants {
            let peers: BTreeSet<&String> = labels
                .keys()
                .chain(grants.iter().flat_map(|g| &g.peers))
                .collect();
            for peer in peers {
                let theirs = labels.get(peer.as_str());
                let (mut write, mut read) = (Vec::new(), Vec::new());
                for g in grants {
                    let by_label = !g.labels.is_empty()
                        && theirs
                            .is_some_and(|l| g.labels.iter().all(|(k, v)| l.get(k) == Some(v)));
                    if g.peers.contains(peer) || by_label {
                        write.extend(g.write.iter().map(|p| expand(p, peer)));
                        read.extend(g.read.iter().map(|p| expand(p, peer)));
                    }
                }
                // Checked when applied; a pattern that does not parse covers nothing.
                let scope = |p: &[String]| {
                    DocScope::new(p).unwrap_or_else(|_| DocScope::new(&[]).expect("empty scope"))
                };
                scopes.insert(peer.clone(), (scope(&write), scope(&read)));
            }
        }
        Policy {
            admins: admins.iter().cloned().collect(),
            grants,
            scopes,
            anything: false,
            ran: HashMap::new(),
            me: String::new(),
        }
    }

    /// The same rules, knowing which workflows each node has run (effect
    /// markers) and which node this is.
    pub fn with_runs(mut self, me: &str, ran: HashMap<String, BTreeSet<String>>) -> Policy {
        self.me = me.to_string();
        self.ran = ran;
        self
    }

    /// Whether a peer that sent a change to `doc` the rules refuse is to
    /// blame (a strike). Not for effect markers: the signer's membership
    /// doc, which says it runs the workflow, may still be on its way.
    pub fn blames(&self, doc: &str) -> bool {
        marker_workflow(doc).is_none()
    }

    /// A policy that allows every write: a node with its checks switched
    /// off, to play a hostile peer in tests.
    #[doc(hidden)]
    #[cfg(feature = "test-utils")]
    pub fn anything() -> Policy {
        Policy {
            anything: true,
            ..Policy::default()
        }
    }

    /// True if `peer` may change workflow definitions and grants: it is in
    /// `net.admins`, or that list is empty.
    pub fn is_admin(&self, peer: &str) -> bool {
        self.admins.is_empty() || self.admins.contains(peer)
    }

    /// True once an access file was applied.
    pub fn has_grants(&self) -> bool {
        self.grants.is_some()
    }

    /// The applied grants, if any.
    pub fn grants(&self) -> Option<&[Grant]> {
        self.grants.as_deref()
    }

    /// The admins (`net.admins`).
    pub fn admins(&self) -> &BTreeSet<String> {
        &self.admins
    }

    /// Whether `peer` may write `doc` (see the module docs).
    ///
    /// # Errors
    /// Why not, naming the doc and the rule.
    pub fn may_write(&self, peer: &str, doc: &str) -> Result<(), String> {
        if self.anything {
            return Ok(());
        }
        if let Some(rest) = doc.strip_prefix(crate::doc::SYSTEM_PREFIX) {
            if let Some(owner) = rest.strip_prefix("nodes/") {
                return if owner == peer {
                    Ok(())
                } else {
                    Err(format!(
                        "{peer} may not write {doc:?}: only {owner} writes its own membership doc"
                    ))
                };
            }
            if let Some(workflow) = marker_workflow(doc) {
                let runs =
                    peer == self.me || self.ran.get(peer).is_some_and(|r| r.contains(workflow));
                return if runs {
                    Ok(())
                } else {
                    Err(format!(
                        "{peer} may not write {doc:?}: only nodes that run workflow \
                         {workflow:?} write its effect markers"
                    ))
                };
            }
            let admin_only = doc == ACCESS_DOC || rest.starts_with("workflows/");
            return if !admin_only || self.is_admin(peer) {
                Ok(())
            } else {
                Err(format!(
                    "{peer} may not write {doc:?}: only the peers in net.admins change \
                     workflow definitions and grants"
                ))
            };
        }
        if self.grants.is_none() || self.admins.contains(peer) {
            return Ok(());
        }
        match self.scopes.get(peer) {
            Some((write, _)) if write.covers(doc) => Ok(()),
            Some((write, _)) => Err(format!(
                "{peer} may not write {doc:?}: its grants allow {:?}",
                write.patterns()
            )),
            None => Err(format!(
                "{peer} may not write {doc:?}: no grant covers it (peers or labels)"
            )),
        }
    }

    /// Whether `peer` may read (and receive) data doc `doc`: always with no
    /// access file, for admins and for what its grants' `read` globs cover.
    pub fn may_read(&self, peer: &str, doc: &str) -> bool {
        if crate::doc::is_system(doc) || self.grants.is_none() || self.admins.contains(peer) {
            return true;
        }
        self.scopes
            .get(peer)
            .is_some_and(|(_, read)| read.covers(doc))
    }
}

/// The policy a node holds now, replaced as the access doc and membership
/// docs change.
#[derive(Debug, Default)]
pub struct PolicySlot(RwLock<Arc<Policy>>);

impl PolicySlot {
    /// A slot holding `policy`.
    pub fn new(policy: Policy) -> PolicySlot {
        PolicySlot(RwLock::new(Arc::new(policy)))
    }

    /// The policy now.
    pub fn get(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the policy.
    pub fn set(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    const B: &str = "12D3KooWRBhwfeP2Y9CDkFRBAZ1pmxUadH36TNuDAVK7fwhDMyRL";

    fn policy(admins: &[&str], toml: Option<&str>, labels: &[(&str, &str, &str)]) -> Policy {
        let admins: Vec<String> = admins.iter().map(|s| s.to_string()).collect();
        let access = toml.map(|t| AccessFile::parse(t, "access.toml").unwrap());
        let mut l: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        for (peer, k, v) in labels {
            l.entry(peer.to_string())
                .or_default()
                .insert(k.to_string(), v.to_string());
        }
        Policy::new(&admins, access, &l)
    }

    #[test]
    fn without_an_access_file_every_node_writes_data_and_admins_write_definitions() {
        let p = policy(&[], None, &[]);
        assert!(p.may_write(A, "anything/at/all").is_ok());
        assert!(
            p.may_write(A, "_mergeflow/workflows/w").is_ok(),
            "no admins: all are"
        );
        let p = policy(&[A], None, &[]);
        assert!(p.may_write(B, "anything").is_ok());
        let err = p.may_write(B, "_mergeflow/workflows/w").unwrap_err();
        assert!(err.contains("net.admins"), "{err}");
        assert!(p.may_write(B, ACCESS_DOC).is_err());
        assert!(p.may_write(A, ACCESS_DOC).is_ok());
        assert!(p.may_write(B, &format!("_mergeflow/nodes/{A}")).is_err());
        assert!(p.may_write(B, &format!("_mergeflow/nodes/{B}")).is_ok());
        assert!(p.may_write(B, "_mergeflow/effects/w/00").is_err());
        let ran = HashMap::from([(B.to_string(), BTreeSet::from(["w".to_string()]))]);
        let p = p.with_runs(A, ran);
        assert!(p.may_write(B, "_mergeflow/effects/w/00").is_ok());
        assert!(p.may_write(B, "_mergeflow/effects/other/00").is_err());
        assert!(
            p.may_write(A, "_mergeflow/effects/other/00").is_ok(),
            "its own"
        );
        assert!(!p.blames("_mergeflow/effects/other/00") && p.blames("x"));
    }

    #[test]
    fn grants_cover_peers_by_id_and_by_label_with_their_own_id() {
        let toml = format!(
            "[[grant]]\npeers = [\"{A}\"]\nwrite = [\"sensors/{{peer}}/**\"]\nread = [\"config/**\"]\n\
             [[grant]]\nlabels = {{ role = \"gateway\" }}\nwrite = [\"alerts/**\"]\n"
        );
        let p = policy(&[], Some(&toml), &[(B, "role", "gateway")]);
        assert!(p.may_write(A, &format!("sensors/{A}/t")).is_ok());
        let err = p.may_write(A, &format!("sensors/{B}/t")).unwrap_err();
        assert!(err.contains("sensors/"), "{err}");
        assert!(p.may_write(B, "alerts/x").is_ok());
        assert!(p.may_write(B, &format!("sensors/{B}/t")).is_err());
        assert!(p.may_read(A, "config/x") && !p.may_read(A, "alerts/x"));
        let stranger = "12D3KooWGzh4NaWz9CWKuyGQzXcgYBAFN5oEBZVmRQRG5Hf1f7Zo";
        assert!(p.may_write(stranger, "alerts/x").is_err());
    }

    #[test]
    fn a_write_glob_without_its_read_is_warned_about() {
        let file = |t: &str| AccessFile::parse(t, "access.toml").unwrap();
        let w = file("[[grant]]\nlabels = { a = \"b\" }\nwrite = [\"s/{peer}/**\"]\n").warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("grant 1") && w[0].contains("s/{peer}/**"),
            "{w:?}"
        );
        let ok = file(
            "[[grant]]\nlabels = { a = \"b\" }\nwrite = [\"s/{peer}/**\"]\nread = [\"s/{peer}/**\", \"c/**\"]\n",
        );
        assert!(ok.warnings().is_empty());
    }

    #[test]
    fn bad_access_files_say_what_and_where() {
        for (text, want) in [
            ("[[grant]]\nwrite = [\"a/**\"]\n", "grant 1: names nobody"),
            ("[[grant]]\npeers = [\"nope\"]\n", "is not a peer id"),
            (
                "[[grant]]\nlabels = { a = \"b\" }\nwrite = [\"_mergeflow/**\"]\n",
                "system docs",
            ),
            (
                "[[grant]]\nlabels = { a = \"b\" }\nwrite = [\"a/[\"]\n",
                "invalid doc glob",
            ),
            ("[[grants]]\n", "unknown field"),
        ] {
            let err = AccessFile::parse(text, "access.toml").unwrap_err();
            assert!(
                err.starts_with("access.toml") && err.contains(want),
                "{text}: {err}"
            );
        }
    }
}
