//! What peers have confirmed they store, and writers waiting for that.
//!
//! A node that merged changes from a peer answers, once they are flushed to
//! its disk, with [`Message::Have`](crate::sync::Message::Have): the doc's
//! heads it now holds. That confirmation is what `?replicas=N` on the write
//! API waits for, and what `GET /v1/docs/{id}/sync` reports. Peers confirm to
//! the peer they got the change from, so a write counts the replicas directly
//! connected to the node it was made on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use automerge::ChangeHash;
use tokio::sync::oneshot;

/// Heads a peer confirmed it holds for one doc, and when (unix ms).
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The peer's heads.
    pub heads: Vec<ChangeHash>,
    /// When it said so.
    pub at_ms: u64,
}

impl Held {
    /// True if these heads literally include every one of `want` (the peer
    /// confirmed exactly that version or a merge of it with others).
    pub fn includes(&self, want: &[ChangeHash]) -> bool {
        includes(&self.heads, want)
    }
}

fn includes(theirs: &[ChangeHash], want: &[ChangeHash]) -> bool {
    want.iter().all(|h| theirs.contains(h))
}

struct Waiter {
    heads: Vec<ChangeHash>,
    want: usize,
    confirmed: BTreeSet<String>,
    done: Option<oneshot::Sender<BTreeSet<String>>>,
}

#[derive(Default)]
struct State {
    /// doc -> peer -> what it holds.
    held: HashMap<String, BTreeMap<String, Held>>,
    /// doc -> waiters.
    waiters: HashMap<String, Vec<Waiter>>,
}

/// Confirmations from peers and writers waiting on them.
#[derive(Default)]
pub struct Replicas {
    state: Mutex<State>,
}

/// Most docs whose confirmations are remembered; beyond it the oldest
/// confirmations are forgotten (they only feed reports).
const MAX_DOCS: usize = 100_000;

impl Replicas {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `peer` holds `heads` of `doc`. `covers` tells whether the
    /// peer's heads include a given set of heads (an ancestry check the
    /// caller can do on the doc); it is asked only for waiters those heads
    /// do not include literally.
    pub fn confirm(
        &self,
        peer: &str,
        doc: &str,
        heads: Vec<ChangeHash>,
        now_ms: u64,
        mut covers: impl FnMut(&[ChangeHash], &[ChangeHash]) -> bool,
    ) {
        let mut st = self.lock();
        if let Some(waiters) = st.waiters.get_mut(doc) {
            for w in waiters.iter_mut() {
                if w.confirmed.contains(peer) {
                    continue;
                }
                if includes(&heads, &w.heads) || covers(&w.heads, &heads) {
                    w.confirmed.insert(peer.to_string());
                    if w.confirmed.len() >= w.want
                        && let Some(done) = w.done.take()
                    {
                        let _ = done.send(w.confirmed.clone());
                    }
                }
            }
            waiters.retain(|w| w.done.as_ref().is_some_and(|d| !d.is_closed()));
            if waiters.is_empty() {
                st.waiters.remove(doc);
            }
        }
        if st.held.len() >= MAX_DOCS && !st.held.contains_key(doc) {
            // Cheap bound: forget some doc's reports (they come back on its
            // next change).
            if let Some(k) = st.held.keys().next().cloned() {
                st.held.remove(&k);
            }
        }
        st.held.entry(doc.to_string()).or_default().insert(
            peer.to_string(),
            Held {
                heads,
                at_ms: now_ms,
            },
        );
    }

    /// Forgets what `peer` confirmed (it disconnected; it may lose data
    /// before it comes back).
    pub fn peer_gone(&self, peer: &str) {
        let mut st = self.lock();
        st.held.retain(|_, peers| {
            peers.remove(peer);
            !peers.is_empty()
        });
    }

    /// What each peer last confirmed for `doc`.
    pub fn held(&self, doc: &str) -> BTreeMap<String, Held> {
        self.lock().held.get(doc).cloned().unwrap_or_default()
    }

    /// Waits until `want` peers confirmed they hold `heads` of `doc` (peers
    /// that already did count at once). Returns the peers that confirmed.
    /// The receiver ends when the registration is dropped on timeout.
    pub fn wait(
        &self,
        doc: &str,
        heads: Vec<ChangeHash>,
        want: usize,
    ) -> (
        BTreeSet<String>,
        Option<oneshot::Receiver<BTreeSet<String>>>,
    ) {
        let mut st = self.lock();
        let confirmed: BTreeSet<String> = st
            .held
            .get(doc)
            .map(|peers| {
                peers
                    .iter()
                    .filter(|(_, h)| h.includes(&heads))
                    .map(|(p, _)| p.clone())
                    .collect()
            })
            .unwrap_or_default();
        if confirmed.len() >= want {
            return (confirmed, None);
        }
        let (tx, rx) = oneshot::channel();
        st.waiters.entry(doc.to_string()).or_default().push(Waiter {
            heads,
            want,
            confirmed: confirmed.clone(),
            done: Some(tx),
        });
        (confirmed, Some(rx))
    }

    /// Peers that confirmed for a waiter still registered for `doc` at
    /// `heads` (after a timeout: how far it got), and drops that waiter.
    pub fn give_up(&self, doc: &str, heads: &[ChangeHash]) -> BTreeSet<String> {
        let mut st = self.lock();
        let Some(waiters) = st.waiters.get_mut(doc) else {
            return BTreeSet::new();
        };
        let mut got = BTreeSet::new();
        if let Some(i) = waiters.iter().position(|w| w.heads == heads) {
            got = waiters.remove(i).confirmed;
        }
        if waiters.is_empty() {
            st.waiters.remove(doc);
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> ChangeHash {
        ChangeHash([b; 32])
    }

    #[tokio::test]
    async fn waits_for_enough_distinct_peers() {
        let r = Replicas::default();
        let (now, rx) = r.wait("d", vec![h(1)], 2);
        assert!(now.is_empty());
        let rx = rx.unwrap();
        r.confirm("p1", "d", vec![h(1)], 1, |_, _| false);
        r.confirm("p1", "d", vec![h(1)], 2, |_, _| false); // same peer twice
        r.confirm("p2", "d", vec![h(9)], 3, |_, _| false); // not ours, not covering
        r.confirm("p3", "d", vec![h(7)], 4, |want, theirs| {
            want == [h(1)] && theirs == [h(7)] // a later change built on ours
        });
        let got = rx.await.unwrap();
        assert_eq!(got.into_iter().collect::<Vec<_>>(), ["p1", "p3"]);
        // Later writers count what is already known.
        let (now, rx) = r.wait("d", vec![h(1)], 1);
        assert!(rx.is_none() && now.contains("p1"));
        r.peer_gone("p1");
        assert!(!r.held("d").contains_key("p1"));
    }

    #[test]
    fn giving_up_reports_partial_progress() {
        let r = Replicas::default();
        let (_, rx) = r.wait("d", vec![h(1)], 3);
        r.confirm("p1", "d", vec![h(1)], 1, |_, _| false);
        assert_eq!(r.give_up("d", &[h(1)]).len(), 1);
        drop(rx);
        assert!(r.lock().waiters.is_empty());
    }
}
