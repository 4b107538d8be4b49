//! Repair: Automerge sync sessions with a peer, per doc (started, continued,
//! queued while a peer is busy), and whole docs pushed to peers that lack
//! them.

use automerge::sync;

use super::core::{Core, Session, sync_message, they_know_we_agree};
use super::digest::DocState;
use super::types::{DocAccess, Message, Output, PeerKey};

impl Core {
    /// Queues a sync of `doc` with every connected peer but `except`.
    pub(super) fn sync_with_others<D: DocAccess>(
        &mut self,
        now: u64,
        except: &str,
        doc: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let others: Vec<PeerKey> = self
            .peers
            .keys()
            .filter(|k| k.as_str() != except && self.wants(k, doc))
            .cloned()
            .collect();
        for peer in others {
            if let Some(p) = self.peers.get_mut(&peer)
                && !p.sessions.contains_key(doc)
                && p.pending_set.insert(doc.to_string())
            {
                p.pending.push_back(doc.to_string());
            }
            self.start_pending(now, &peer, docs, out);
        }
    }

    /// Pushes docs `peer` lacks, whole, while this tick's budget lasts; one
    /// too big for a message goes to a primed session instead.
    pub(super) fn push_docs<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let mut big = false;
        while self.push_budget > 0 {
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            let Some(doc) = p.to_push.pop_front() else {
                break;
            };
            p.to_push_set.remove(&doc);
            if !self.wants(peer, &doc) {
                continue;
            }
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            match docs.doc_bytes(&doc) {
                Some((data, sigs)) if data.len() <= self.cfg.max_push_bytes => {
                    self.push_budget -= 1;
                    self.stats.docs_pushed_out += 1;
                    out.push(Output::Send {
                        to: peer.to_string(),
                        msg: Message::Doc { doc, data, sigs },
                    });
                }
                Some(_) if !p.sessions.contains_key(&doc) && p.pending_set.insert(doc.clone()) => {
                    p.push.insert(doc.clone());
                    p.pending.push_back(doc);
                    big = true;
                }
                Some(_) => {}
                // Deleted or gone since: the digest exchange sorts it out.
                None => {}
            }
        }
        if big {
            self.start_pending(now, peer, docs, out);
        }
    }

    /// Starts sessions for pending docs while `peer` has free session slots.
    /// Each starts from a fresh state: a difference found by anti-entropy
    /// after a loss may mean a stale one.
    pub(super) fn start_pending<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let max = self.cfg.max_sessions_per_peer.max(1);
        loop {
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            if p.sessions.len() >= max {
                return;
            }
            let Some(doc) = p.pending.pop_front() else {
                return;
            };
            p.pending_set.remove(&doc);
            if !self.sync_doc(now, peer, &doc, true, docs, out)
                && let Some(p) = self.peers.get_mut(peer)
            {
                // Nothing to send: the session is done before it began.
                p.sessions.remove(&doc);
            }
        }
    }

    /// Starts (or, with `reset`, restarts from a fresh state) a sync session for
    /// `doc` with `peer` and sends its first message; returns whether it sent one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sync_doc<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        doc: &str,
        reset: bool,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) -> bool {
        if !self.wants(peer, doc) {
            return false;
        }
        let Some(p) = self.peers.get_mut(peer) else {
            return false;
        };
        let fresh = reset || !p.sessions.contains_key(doc);
        let session = p
            .sessions
            .entry(doc.to_string())
            .or_insert_with(|| Session::new(now));
        if fresh {
            *session = Session::resumed(now, peer, doc, docs);
        }
        if p.push.remove(doc) {
            // The peer has none of this doc: tell the sync state so, and the
            // first message carries every change.
            session.state.their_heads = Some(vec![]);
            session.state.their_need = Some(vec![]);
            session.state.their_have = Some(vec![sync::Have::default()]);
        }
        match docs.generate_sync(doc, &mut session.state) {
            Some(data) => {
                out.push(sync_message(peer, doc, data));
                true
            }
            None => false,
        }
    }

    /// After a sync message was applied: send the next one, close the session
    /// when there is nothing to send, reset it when it stopped making progress.
    pub(super) fn continue_session<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        doc: &str,
        progressed: bool,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let wanted = self.wants(peer, doc);
        let max_idle = self.cfg.max_idle_rounds;
        let entry = self.digest.entry(doc);
        let ours = match docs.state(doc) {
            Some(DocState::Live(mut heads)) => {
                heads.sort();
                Some(heads)
            }
            _ => None,
        };
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let Some(session) = p.sessions.get_mut(doc) else {
            return;
        };
        if let Some(ours) = &ours
            && they_know_we_agree(&session.state, ours)
        {
            docs.save_sync_state(peer, doc, &session.state);
            // Their heads are ours and their message names ours as shared:
            // they need nothing and know we need nothing. Answering would
            // make them (their session closed) open a new one and answer in
            // turn, and so on forever.
            p.sessions.remove(doc);
            self.start_pending(now, peer, docs, out);
            return;
        }
        if !wanted {
            // Not sent to it (its scope is not known yet, the grants
            // changed, or it asks for docs it may not read): the session
            // ends without an answer. (Agreement is still kept above: a
            // peer whose link restarted may finish a session it began.)
            p.sessions.remove(doc);
            return;
        }
        if progressed || session.last_entry != entry {
            session.idle_rounds = 0;
            session.last_entry = entry;
        } else {
            session.idle_rounds += 1;
        }
        if session.idle_rounds > max_idle {
            // Stuck: start over from a fresh state (anti-entropy would too).
            *session = Session::new(now);
            self.stats.sessions_reset += 1;
        }
        let done = match docs.generate_sync(doc, &mut session.state) {
            Some(data) => {
                out.push(sync_message(peer, doc, data));
                // The peer told us its heads and we just sent ours: if they are
                // the same, both sides are in sync and the peer will have nothing
                // to answer, so the session ends here rather than idling until
                // it goes stale (it would hold a session slot meanwhile).
                let mut theirs = session.state.their_heads.clone().unwrap_or_default();
                let mut ours = session.state.last_sent_heads.clone();
                theirs.sort();
                ours.sort();
                let agreed = session.state.their_heads.is_some() && theirs == ours;
                if agreed {
                    docs.save_sync_state(peer, doc, &session.state);
                }
                agreed
            }
            None => true,
        };
        if done {
            p.sessions.remove(doc);
            self.start_pending(now, peer, docs, out);
        }
    }
}
