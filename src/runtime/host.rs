//! The sync host: the sans-IO sync core ([`Core`]) run on the writer thread,
//! fed the inbox's input with a [`Round`] as its document access, its outputs
//! sent on the bounded channel to the transport; and replica confirmations.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use automerge::ChangeHash;
use tokio::sync::mpsc;

use super::round::Round;
use super::state::{Inner, PeerSyncView};
use crate::doc::cache::lock_slot;
use crate::doc::heads::in_history;
use crate::doc::{DocId, now_ms};
use crate::sync::{Core, FastChange, Input, Message, Output, ReadRule};

/// The sync core and where its outputs go, owned by the writer thread.
pub(crate) struct SyncRuntime {
    pub(crate) core: Core,
    pub(crate) out: mpsc::Sender<Output>,
    pub(crate) rng: rand::rngs::StdRng,
    pub(crate) started: std::time::Instant,
    pub(crate) dropped_outputs: u64,
    /// Signatures peers offered that no stored change used yet (see
    /// [`Leftovers`](super::sigs::Leftovers)).
    pub(crate) leftover_sigs: super::sigs::Leftovers,
    /// The policy the core's read rules were last taken from.
    pub(crate) policy_seen: Option<std::sync::Arc<crate::grants::Policy>>,
}

impl SyncRuntime {
    /// Handles a round's remote input (every frame it took from the queue).
    /// Fast-path changes of one doc from one peer go to the core together,
    /// so they cost one Automerge apply (which walks the doc's ops once per
    /// call); everything else follows in order.
    pub(super) fn handle_all(&mut self, inputs: Vec<Input>, round: &mut Round<'_>) {
        self.follow_policy(round);
        let mut groups: Vec<(String, String, Vec<FastChange>)> = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        let mut rest = Vec::new();
        for input in inputs {
            match input {
                Input::Received {
                    from,
                    msg:
                        Message::Change {
                            doc,
                            change,
                            sig,
                            ack,
                            seen,
                        },
                } => {
                    let c = FastChange {
                        change,
                        sig,
                        ack,
                        seen,
                    };
                    match index.entry((from, doc)) {
                        Entry::Occupied(e) => groups[*e.get()].2.push(c),
                        Entry::Vacant(e) => {
                            let (from, doc) = e.key().clone();
                            e.insert(groups.len());
                            groups.push((from, doc, vec![c]));
                        }
                    }
                }
                other => rest.push(other),
            }
        }
        for (from, doc, changes) in groups {
            self.handle(Input::ReceivedChanges { from, doc, changes }, round);
        }
        for input in rest {
            self.handle(input, round);
        }
    }

    /// Hands the core the grants' read rules when the policy changed since
    /// it last looked (an access doc or membership doc arrived).
    fn follow_policy(&mut self, round: &mut Round<'_>) {
        let policy = round.inner.policy.get();
        if let Some(seen) = &self.policy_seen
            && std::sync::Arc::ptr_eq(seen, &policy)
        {
            return;
        }
        let had_grants = self.policy_seen.as_ref().is_some_and(|p| p.has_grants());
        self.policy_seen = Some(policy.clone());
        if !had_grants && !policy.has_grants() {
            return; // everyone reads everything, as before
        }
        let reads = policy.has_grants().then(|| {
            ReadRule(std::sync::Arc::new(move |peer: &str, doc: &str| {
                policy.may_read(peer, doc)
            }))
        });
        self.handle(Input::Reads(reads), round);
    }

    pub(super) fn handle(&mut self, input: Input, round: &mut Round<'_>) {
        let now = self.started.elapsed().as_millis() as u64;
        let tick = matches!(input, Input::Tick);
        if tick {
            self.follow_policy(round);
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            match &input {
                Input::Received { from, msg } => {
                    tracing::trace!(peer = %from, kind = msg.kind(), doc = ?msg.doc(), "sync input");
                }
                Input::ReceivedChanges { from, doc, changes } => {
                    tracing::trace!(peer = %from, kind = "change", doc, n = changes.len(), "sync input");
                }
                _ => {}
            }
        }
        round.confirm = match &input {
            Input::Received { msg, .. } => match msg {
                Message::Change { ack, .. } => *ack,
                _ => true,
            },
            Input::ReceivedChanges { changes, .. } => changes.iter().any(|c| c.ack),
            _ => false,
        };
        round.from = match &input {
            Input::Received { from, .. } | Input::ReceivedChanges { from, .. } => {
                Some(from.clone())
            }
            Input::PeerDown(peer) => {
                round.inner.replicas.peer_gone(peer);
                None
            }
            _ => None,
        };
        let outputs = self.core.handle(now, &mut self.rng, input, round);
        round.from = None;
        round.confirm = false;
        for out in outputs {
            if matches!(out, Output::Merged { .. }) {
                continue; // the round's events carry merges to the feed
            }
            if let Output::Held { peer, doc, heads } = out {
                confirm(round.inner, &peer, &doc, heads);
                continue;
            }
            if let Output::Send { msg, .. } | Output::Broadcast { msg, .. } = &out
                && matches!(msg, Message::Sync { .. } | Message::Doc { .. })
                && msg.doc().is_some_and(|d| round.unflushed.contains(d))
            {
                // It may carry keyed changes not durable yet: sent after
                // this round's flush (see `Unflushed`).
                round.deferred.push(out);
                continue;
            }
            if let Output::Send { to, msg } = &out {
                tracing::trace!(peer = %to, kind = msg.kind(), doc = ?msg.doc(), "sync output");
            }
            // Never block the writer on the network: a full queue drops the
            // output, and anti-entropy repairs whatever that loses.
            if self.out.try_send(out).is_err() {
                self.dropped_outputs += 1;
                if self.dropped_outputs.is_power_of_two() {
                    tracing::debug!(
                        dropped = self.dropped_outputs,
                        "network queue full: sync output dropped"
                    );
                }
            }
        }
        if tick {
            // Publish what the API shows about each peer's sync.
            let unix_now = now_ms();
            let view = self
                .core
                .peers()
                .map(|p| {
                    let last = self
                        .core
                        .last_in_sync(p)
                        .map(|t| unix_now.saturating_sub(now.saturating_sub(t)));
                    let v = PeerSyncView {
                        last_in_sync_at: last,
                        docs_syncing: self.core.open_sessions(p),
                    };
                    (p.clone(), v)
                })
                .collect();
            *round
                .inner
                .sync_view
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = view;
        }
    }
}

/// Records a peer's confirmation; whether its heads include a waiting
/// writer's is checked on the doc when they are not literally among them.
pub(super) fn confirm(inner: &Inner, peer: &str, doc: &str, heads: Vec<ChangeHash>) {
    let Ok(id) = DocId::new(doc) else {
        return;
    };
    let covers = |want: &[ChangeHash], theirs: &[ChangeHash]| {
        let Some(slot) = inner.cache.cached(&id) else {
            return false;
        };
        let guard = lock_slot(&slot);
        let Some(loaded) = guard.as_ref() else {
            return false;
        };
        in_history(&loaded.doc, want, theirs)
    };
    inner.replicas.confirm(peer, doc, heads, now_ms(), covers);
}
