//! Docs whose messages wait for a flush: keyed local changes (see
//! [`Unflushed`]). A leaf of the runtime: imports only the sync input.

use std::collections::HashMap;

use crate::sync::Input;

/// Docs with keyed local changes whose round is not flushed yet, and how
/// many such rounds each waits for. A sync message or pushed doc about such
/// a doc, to a peer or an automerge-repo client, could carry those
/// changes: it is sent after the flush of the round that made it (which
/// follows every earlier round's), not at once. A keyed change that left
/// the node before its flush and was then lost in a crash would come back
/// from that peer, and the keyed write, asked again, would be applied a
/// second time under the new boot's actor.
#[derive(Default)]
pub(super) struct Unflushed(HashMap<String, usize>);

impl Unflushed {
    /// The round of `later` is stored; its flush is pending.
    pub(super) fn hold(&mut self, later: &[Input]) {
        for input in later {
            if let Input::Broadcast { doc, .. } = input {
                *self.0.entry(doc.clone()).or_default() += 1;
            }
        }
    }

    /// A round holding `doc` was flushed; returns whether the doc is free
    /// now. (A round whose flush failed is never released: its changes may
    /// not be on disk, and the store refuses everything from then on.)
    pub(super) fn release(&mut self, doc: &str) -> bool {
        match self.0.get_mut(doc) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.0.remove(doc);
                true
            }
            None => true,
        }
    }

    pub(super) fn contains(&self, doc: &str) -> bool {
        self.0.contains_key(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broadcast(doc: &str) -> Input {
        Input::Broadcast {
            doc: doc.to_string(),
            changes: vec![],
            sigs: vec![],
            ack: false,
        }
    }

    #[test]
    fn a_doc_is_unflushed_until_every_round_holding_it_is_flushed() {
        let mut held = Unflushed::default();
        // Round 1: two keyed writes to a, one to b; round 2: one to a.
        held.hold(&[broadcast("a"), broadcast("b"), broadcast("a")]);
        held.hold(&[broadcast("a")]);
        assert!(held.contains("a") && held.contains("b") && !held.contains("c"));
        assert!(held.release("b"));
        assert!(!held.contains("b"));
        assert!(!held.release("a"));
        assert!(!held.release("a"));
        assert!(held.contains("a"));
        assert!(held.release("a"));
        assert!(!held.contains("a"));
        // A release nobody held (a broadcast from before a failed round).
        assert!(held.release("c"));
    }
}
