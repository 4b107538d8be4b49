//! Keeping the node's [`Policy`] current, and applying an access file.
//!
//! The policy is built from `net.admins`, the access doc and the labels and
//! workflows of every membership doc, and rebuilt whenever one of those docs changes
//! (locally or merged from a peer). Between a grant arriving and the
//! rebuild a change may still be checked against the old rules; a refused
//! change comes back with the next sync repair.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures_util::StreamExt;

use super::Node;
use crate::Error;
use crate::doc::{DocError, DocId, Pointer};
use crate::feed::DocGlob;
use crate::grants::{ACCESS_DOC, AccessFile, Policy, PolicySlot};
use crate::runtime::{Change, Docs, ListQuery, WriteResult};

/// The docs the policy is built from.
const POLICY_DOCS: &str = "_mergeflow/{access,nodes/*}";

/// Most membership docs read for labels.
const MAX_MEMBERS: usize = 100_000;

/// Builds the policy from what `docs` holds now; `me` is this node's peer
/// id and labels (from its config: its membership doc may not be written
/// yet).
pub(crate) async fn load(
    docs: &Docs,
    admins: &[String],
    me: (&str, &BTreeMap<String, String>),
) -> Policy {
    // Fails closed: an access doc this node cannot read or parse grants
    // nothing (only admins write data docs) until a good one arrives.
    let closed = |why: String| {
        tracing::error!(
            doc = ACCESS_DOC,
            err = %why,
            "the access doc is unusable: only net.admins may write data docs until an admin applies a good one"
        );
        Some(AccessFile::default())
    };
    let access = match docs.get(access_id(), None).await {
        Ok(v) => match v.get("grant").cloned() {
            Some(g) => {
                match serde_json::from_value::<AccessFile>(serde_json::json!({ "grant": g })) {
                    Ok(file) => Some(file),
                    Err(e) => closed(format!("it does not parse: {e}")),
                }
            }
            None => None,
        },
        Err(DocError::NotFound(_)) => None,
        Err(e) => closed(e.to_string()),
    };
    let mut labels: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut ran: HashMap<String, BTreeSet<String>> = HashMap::new();
    let members = docs
        .list_page(ListQuery {
            prefix: "_mergeflow/nodes/".into(),
            limit: MAX_MEMBERS,
            system: true,
            ..ListQuery::default()
        })
        .await
        .map(|p| p.docs)
        .unwrap_or_default();
    for m in members {
        let Some(peer) = m.id.strip_prefix("_mergeflow/nodes/") else {
            continue;
        };
        let Ok(id) = DocId::new(m.id.as_str()) else {
            continue;
        };
        let Ok(member) = docs.get(id, None).await else {
            continue;
        };
        let l = serde_json::from_value(member["labels"].clone()).unwrap_or_default();
        labels.insert(peer.to_string(), l);
        // Every workflow it has run (`/ran`), and those it runs now (a
        // membership doc written before `/ran` existed has only these).
        let keys = |v: &serde_json::Value| {
            v.as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let workflows = keys(&member["ran"])
            .into_iter()
            .chain(keys(&member["workflows"]));
        ran.insert(peer.to_string(), workflows.collect());
    }
    labels.insert(me.0.to_string(), me.1.clone());
    Policy::new(admins, access, &labels).with_runs(me.0, ran)
}

/// Rebuilds `slot` whenever the access doc or a membership doc changes,
/// until the node stops.
pub(crate) fn spawn_watch(node: &Node, slot: Arc<PolicySlot>) {
    let docs = node.inner.docs.clone();
    let admins = node.inner.config.net.admins.clone();
    let me = node.peer_id().to_string();
    let labels = node.inner.config.node.labels.clone();
    let glob = DocGlob::new(POLICY_DOCS).expect("a valid glob");
    let mut changes = Box::pin(node.inner.feed.subscribe_quiet(glob));
    let cancel = node.inner.cancel.clone();
    node.inner.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                next = changes.next() => if next.is_none() { return },
            }
            // Changes that arrived meanwhile are covered by one rebuild.
            while let Some(Some(_)) = futures_util::FutureExt::now_or_never(changes.next()) {}
            slot.set(load(&docs, &admins, (&me, &labels)).await);
        }
    });
}

fn access_id() -> DocId {
    DocId::new(ACCESS_DOC).expect("a valid id")
}

impl Node {
    /// The rules this node holds now: admins and applied grants.
    pub fn policy(&self) -> Arc<Policy> {
        self.inner.policy.get()
    }

    /// Refuses `what` (a change to workflow definitions or grants) on a
    /// node that is not an admin: its peers would refuse the change.
    ///
    /// # Errors
    /// [`DocError::Forbidden`] unless this node is in `net.admins` (or that
    /// list is empty).
    pub fn require_admin(&self, what: &str) -> Result<(), DocError> {
        let me = self.peer_id().to_string();
        if self.policy().is_admin(&me) {
            return Ok(());
        }
        Err(DocError::Forbidden(format!(
            "this node ({me}) is not in net.admins: only admins {what}"
        )))
    }

    /// Applies an access file for the whole network: stores it in the
    /// access doc, which every node receives by sync and enforces.
    ///
    /// # Errors
    /// [`DocError::Forbidden`] unless this node is in `net.admins` (or that
    /// list is empty); what is wrong with the file; store errors.
    pub async fn apply_access(&self, file: &AccessFile) -> Result<WriteResult, Error> {
        file.check().map_err(DocError::BadValue)?;
        self.require_admin("apply access files")?;
        let me = self.peer_id().to_string();
        let grants = serde_json::to_value(&file.grant)
            .map_err(|e| Error::Internal(format!("grants do not serialize: {e}")))?;
        let values = vec![(Pointer::parse("/grant")?, grants)];
        let written = self
            .inner
            .docs
            .write(access_id(), Change::SetIfDifferent(values))
            .await?;
        // This node enforces it at once; peers as the doc reaches them.
        let labels = &self.inner.config.node.labels;
        let policy = load(
            &self.inner.docs,
            &self.inner.config.net.admins,
            (&me, labels),
        )
        .await;
        self.inner.policy.set(policy);
        Ok(written)
    }
}
