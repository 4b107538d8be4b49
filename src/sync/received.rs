//! What the core does with each message from a peer: fast-path changes
//! (applied, relayed, held when their dependencies are missing), digests and
//! buckets (anti-entropy), sync messages, deletes and pushed docs.

use std::collections::HashMap;

use super::core::{Core, HOLD_MS, MAX_HELD, MAX_LACKING, SETTLE_MS, Session, add_tags};
use super::digest::{DocState, entry_hash};
use super::types::{Applied, DocAccess, FastChange, Message, Output, PeerKey};

impl Core {
    pub(super) fn received<D: DocAccess>(
        &mut self,
        now: u64,
        from: PeerKey,
        msg: Message,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        if let Some(doc) = msg.doc()
            && !self.holds(doc)
            && !matches!(msg, Message::Have { .. })
        {
            // Sent before the peer knew our scope or the grants: not ours
            // to store.
            self.stats.out_of_scope += 1;
            return;
        }
        let scope_known = self.peers.get(&from).is_some_and(|p| p.replicate.is_some());
        match msg {
            // Digests are compared over the docs both hold: not before its
            // scope is known. Its Scope message comes first on a new link;
            // if we missed it (the link was new only to us), we ask.
            Message::Digest { .. } | Message::Bucket { .. } if !scope_known => {
                out.push(self.scope_to(from, true));
            }
            Message::Digest { buckets, answer } => {
                if buckets.len() != self.digest.buckets().len() {
                    let reason = format!(
                        "digest has {} buckets, we use {}",
                        buckets.len(),
                        self.digest.buckets().len()
                    );
                    return self.reject(&from, reason, out);
                }
                let mut differing = super::digest::differing(&self.buckets_for(&from), &buckets);
                let settling = self.settle_buckets(now, &from, &mut differing);
                let period = self.cfg.anti_entropy_ms.max(1);
                if let Some(p) = self.peers.get_mut(&from) {
                    let crossed = std::mem::take(&mut p.awaiting_answer);
                    if differing.is_empty() && settling == 0 {
                        p.last_in_sync_at = Some(now);
                        p.agreed = Some(buckets);
                        // Tell it we agree, unless this answers ours or
                        // crossed it (it gets ours): no ping-pong. The
                        // exchange counts as this period's for both sides:
                        // one digest each way per period, as when each sent
                        // its own.
                        p.next_digest_at = p.next_digest_at.max(now + period);
                        if !answer && !crossed {
                            out.push(self.digest_to(from.clone(), true));
                        }
                    }
                }
                if differing.is_empty() && settling == 0 {
                    self.stats.digests_in_sync += 1;
                }
                for bucket in differing {
                    out.push(Output::Send {
                        to: from.clone(),
                        msg: Message::Bucket {
                            bucket,
                            entries: self.bucket_for(&from, bucket),
                            answer: true,
                        },
                    });
                }
            }
            Message::Bucket {
                bucket,
                entries,
                answer,
            } => {
                if bucket >= self.digest.buckets().len() as u32
                    || entries.len() > self.cfg.max_bucket_entries
                {
                    let reason = format!("bucket {bucket} with {} entries", entries.len());
                    return self.reject(&from, reason, out);
                }
                let theirs: HashMap<&str, u64> =
                    entries.iter().map(|(d, h)| (d.as_str(), *h)).collect();
                let mine = self.bucket_for(&from, bucket);
                // Docs both hold differently are synced; docs only we hold are
                // pushed whole (one message instead of a negotiation); docs
                // only they hold are left to them to push, and we send our
                // entries back if they asked, so that they know what we lack.
                let mut differing: Vec<(String, bool)> = Vec::new();
                for (doc, hash) in &mine {
                    match theirs.get(doc.as_str()) {
                        Some(h) if h == hash => {}
                        Some(_) => differing.push((doc.clone(), false)),
                        None => differing.push((doc.clone(), true)),
                    }
                }
                let mut lacking = 0;
                for (doc, _) in &entries {
                    if self.digest.entry(doc).is_none() && self.in_common(&from, doc) {
                        lacking += 1;
                        if self.lacking.len() < MAX_LACKING {
                            self.lacking.insert(doc.clone());
                        }
                    }
                }
                self.stats.docs_differing += (differing.len() + lacking) as u64;
                let deleted = |doc: &str, hash: u64| hash == entry_hash(doc, &DocState::Deleted);
                // Docs that just changed here are left to the fast path for
                // now, and compared again soon (see `SETTLE_MS`).
                let before = differing.len();
                differing.retain(|(doc, _)| !self.settling(now, &from, doc));
                let settling = before - differing.len();
                if settling > 0
                    && let Some(p) = self.peers.get_mut(&from)
                {
                    p.next_digest_at = p.next_digest_at.min(now + SETTLE_MS);
                    self.stats.docs_settling += settling as u64;
                }
                for (doc, push) in differing {
                    let Some(p) = self.peers.get_mut(&from) else {
                        break;
                    };
                    let hash = self.digest.entry(&doc).unwrap_or_default();
                    if deleted(&doc, hash) {
                        let sig = docs.tombstone_sig(&doc);
                        out.push(Output::Send {
                            to: from.clone(),
                            msg: Message::Deleted { doc, sig },
                        });
                    } else if push {
                        if p.to_push_set.insert(doc.clone()) {
                            p.to_push.push_back(doc);
                        }
                    } else if !p.sessions.contains_key(&doc) && p.pending_set.insert(doc.clone()) {
                        p.pending.push_back(doc);
                    }
                }
                // Our entries back, if they asked: they learn what they lack
                // (a new node's progress), also while it settles here.
                if (lacking > 0 || settling > 0) && answer {
                    out.push(Output::Send {
                        to: from.clone(),
                        msg: Message::Bucket {
                            bucket,
                            entries: mine,
                            answer: false,
                        },
                    });
                }
                self.start_pending(now, &from, docs, out);
                self.push_docs(now, &from, docs, out);
            }
            Message::Doc { doc, data, sigs } => {
                let before = self.digest.entry(&doc);
                docs.offer_sigs(&doc, &sigs);
                match docs.merge_doc(&doc, &data) {
                    Err(e) => self.refuse(&from, format!("doc {doc:?}"), e, out),
                    Ok(None) => {}
                    Ok(Some(state)) => {
                        self.stats.docs_pushed_in += 1;
                        if self.set_state(now, &doc, &state, false) {
                            out.push(Output::Merged {
                                doc: doc.clone(),
                                from: from.clone(),
                                state,
                            });
                        }
                        if before != self.digest.entry(&doc) {
                            // Others may lack it too, or (most often, a push
                            // racing the fast path) have it already: a digest
                            // to each soon tells, where a session per peer
                            // and pushed doc would cost N messages each.
                            self.digests_soon(now, &from);
                        }
                    }
                }
            }
            Message::Have { doc, heads } => {
                out.push(Output::Held {
                    peer: from,
                    doc,
                    heads,
                });
            }
            Message::Sync { doc, data, sigs } => {
                self.stats.sync_received += 1;
                let Some(peer) = self.peers.get_mut(&from) else {
                    return;
                };
                let session = peer
                    .sessions
                    .entry(doc.clone())
                    .or_insert_with(|| Session::resumed(now, &from, &doc, docs));
                session.used_at = now;
                let before = self.digest.entry(&doc);
                docs.offer_sigs(&doc, &sigs);
                match docs.receive_sync(&doc, &mut session.state, &data) {
                    Err(e) => {
                        peer.sessions.remove(&doc);
                        return self.refuse(&from, format!("sync message for {doc:?}"), e, out);
                    }
                    Ok(None) => {}
                    Ok(Some(state)) => {
                        if self.set_state(now, &doc, &state, false) {
                            out.push(Output::Merged {
                                doc: doc.clone(),
                                from: from.clone(),
                                state,
                            });
                        }
                    }
                }
                let after = self.digest.entry(&doc);
                self.continue_session(now, &from, &doc, before != after, docs, out);
                if before != after {
                    // Changes that came by sync did not travel the fast path:
                    // pass them on to the other peers, who may lack them too.
                    self.sync_with_others(now, &from, &doc, docs, out);
                }
            }
            Message::Change {
                doc,
                change,
                sig,
                ack,
                seen,
            } => {
                let changes = vec![FastChange {
                    change,
                    sig,
                    ack,
                    seen,
                }];
                self.received_changes(now, from, doc, changes, docs, out);
            }
            Message::Deleted { doc, sig } => {
                if docs.state(&doc) == Some(DocState::Deleted) {
                    return;
                }
                if let Err(e) = docs.delete(&doc, &sig) {
                    return self.refuse(&from, format!("delete of {doc:?}"), e, out);
                }
                self.set_state(now, &doc, &DocState::Deleted, true);
                for p in self.peers.values_mut() {
                    p.sessions.remove(&doc);
                }
                self.broadcast(
                    Message::Deleted {
                        doc: doc.clone(),
                        sig,
                    },
                    Some(from.clone()),
                    out,
                );
                out.push(Output::Merged {
                    doc,
                    from,
                    state: DocState::Deleted,
                });
            }
            // Taken by `handle` before it gets here.
            Message::Scope { .. } => {}
        }
    }

    /// Fast-path changes of `doc` from `from`: each new one is relayed to
    /// the peers it was not sent to; missing dependencies start a sync with
    /// the sender.
    pub(super) fn received_changes<D: DocAccess>(
        &mut self,
        now: u64,
        from: PeerKey,
        doc: String,
        changes: Vec<FastChange>,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        if !self.holds(&doc) {
            self.stats.out_of_scope += 1;
            return;
        }
        // Changes held for this doc (waiting on these, perhaps) go first.
        let mut changes = changes;
        let mut held_since = None;
        if let Some(p) = self.peers.get_mut(&from)
            && let Some((since, mut held)) = p.held.remove(&doc)
        {
            p.held_count -= held.len();
            held_since = Some(since);
            held.append(&mut changes);
            changes = held;
        }
        let raw: Vec<(&[u8], &[u8])> = changes
            .iter()
            .map(|c| (c.change.as_slice(), c.sig.as_slice()))
            .collect();
        let results = docs.apply_changes(&doc, &raw);
        let mut missing = Vec::new();
        let mut last = None;
        let mut error = None;
        for (c, result) in changes.iter().zip(results) {
            match result {
                // One strike per batch, not per change: a batch refused as a
                // whole (a size cap) is one bad input.
                Err(e) => error = error.or(Some(e)),
                Ok(Applied::Deleted) => {}
                Ok(Applied::MissingDeps) => missing.push(c.clone()),
                Ok(Applied::Had(state)) => last = Some(state),
                Ok(Applied::Ok(state)) => {
                    self.stats.changes_applied += 1;
                    // New to us: relay it to our other peers that it was not
                    // sent to (not connected to its origin).
                    let targets: Vec<(&PeerKey, u64)> = self
                        .peers
                        .iter()
                        .filter(|(k, p)| {
                            **k != from && !c.seen.contains(&p.tag) && self.wants(k, &doc)
                        })
                        .map(|(k, p)| (k, p.tag))
                        .collect();
                    let mut seen = c.seen.clone();
                    add_tags(&mut seen, targets.iter().map(|(_, tag)| *tag));
                    for (to, _) in targets {
                        let msg = Message::Change {
                            doc: doc.clone(),
                            change: c.change.clone(),
                            sig: c.sig.clone(),
                            ack: c.ack,
                            seen: seen.clone(),
                        };
                        out.push(Output::Send {
                            to: to.clone(),
                            msg,
                        });
                    }
                    last = Some(state);
                }
            }
        }
        if let Some(e) = error {
            self.refuse(&from, format!("change for {doc:?}"), e, out);
        }
        if let Some(state) = last
            && self.set_state(now, &doc, &state, true)
        {
            out.push(Output::Merged {
                doc: doc.clone(),
                from: from.clone(),
                state,
            });
        }
        if missing.is_empty() {
            return;
        }
        // Their dependencies are most likely in a frame still on its way:
        // hold them a while rather than start a sync at once (which, for a
        // busy doc, would start one per reordered frame).
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if p.held_count + missing.len() <= MAX_HELD {
            p.held_count += missing.len();
            p.held.insert(doc, (held_since.unwrap_or(now), missing));
        } else {
            self.stats.changes_missing_deps += missing.len() as u64;
            // From a fresh state: an open session may be waiting on an
            // answer (in flight) and would send nothing.
            self.sync_doc(now, &from, &doc, true, docs, out);
        }
    }

    /// Docs whose held changes waited [`HOLD_MS`] in vain are synced with
    /// the peer (the held changes are dropped: the sync brings them).
    pub(super) fn expire_held<D: DocAccess>(
        &mut self,
        now: u64,
        peer: &str,
        docs: &mut D,
        out: &mut Vec<Output>,
    ) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let expired: Vec<String> = p
            .held
            .iter()
            .filter(|(_, (since, _))| since + HOLD_MS <= now)
            .map(|(doc, _)| doc.clone())
            .collect();
        for doc in expired {
            let Some(p) = self.peers.get_mut(peer) else {
                return;
            };
            if let Some((_, held)) = p.held.remove(&doc) {
                p.held_count -= held.len();
                self.stats.changes_missing_deps += held.len() as u64;
            }
            self.sync_doc(now, peer, &doc, true, docs, out);
        }
    }
}
