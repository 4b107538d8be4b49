//! Remote input applied on the writer thread: the sync core's [`DocAccess`]
//! over the documents.
//!
//! Changes that arrive from peers (fast-path changes, sync messages, deletes)
//! are merged into the in-memory doc and added to the writer's current
//! [`Round`] batch, so they reach sled with the round and are flushed by the
//! same group commit as local writes (or, when nobody waits on them, within
//! `store.remote_flush_ms`). Automerge runs on remote bytes inside
//! `catch_unwind`: a document that makes it panic costs that message (the
//! doc is reloaded from the store), never the node.

use std::panic::AssertUnwindSafe;

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash, PatchLog, ReadDoc};

use super::state::Inner;
use crate::doc::cache::{Loaded, SlotRef, lock_slot, new_doc};
use crate::doc::{DocError, DocId, now_ms};
use crate::store::{DocMeta, WriteBatch};
use crate::sync::{Applied, DocAccess, DocState, Refusal};

/// What one writer round has collected so far.
pub(super) struct Round<'a> {
    pub(super) inner: &'a Inner,
    pub(super) batch: WriteBatch,
    /// Docs whose memory state is ahead of the store until the batch applies.
    pub(super) touched: Vec<SlotRef>,
    /// Change in the number of live docs once the batch applies.
    pub(super) live_delta: i64,
    /// Docs whose memory state is suspect (an error or panic mid-change). They
    /// are dropped from memory only after the batch is applied: reloading them
    /// mid-round would lose this round's earlier changes to them and reuse
    /// their sequence numbers. Until then they refuse further input.
    pub(super) poisoned: Vec<(DocId, SlotRef)>,
    /// Changes for the change feed, in the order applied.
    pub(super) events: Vec<PendingEvent>,
    /// The peer whose input is being applied (`None` for local writes).
    pub(super) from: Option<String>,
    /// That peer wants to hear once what it sent is durable here: it came by
    /// sync or a pushed doc, or as a change sent with `ack`.
    pub(super) confirm: bool,
    /// The signatures of its changes.
    pub(super) sigs: super::sigs::SigBook,
    /// Docs whose messages wait for a flush (the writer thread's, lent to
    /// each round).
    pub(super) unflushed: super::unflushed::Unflushed,
    /// Sync outputs about such docs, sent after this round's flush.
    pub(super) deferred: Vec<crate::sync::Output>,
}

/// What a change did to a doc, for the feed.
pub(super) enum Touch {
    /// Changed: the JSON Pointers of what changed (only while someone is
    /// subscribed to the feed; see [`super::persist::patch_log`]), and whether
    /// more changed than are listed.
    Changed(Vec<String>, bool),
    /// Deleted.
    Deleted,
}

/// A change applied in this round, published to the feed once durable.
pub(super) struct PendingEvent {
    pub(super) doc: DocId,
    pub(super) touch: Touch,
    /// Heads after (hex).
    pub(super) after: Vec<String>,
    /// The peer it came from; `None` for a local write.
    pub(super) from: Option<String>,
    /// Confirm it to that peer with a `Have` once durable.
    pub(super) confirm: bool,
    /// The workflow run that wrote it (for merged changes: the deepest
    /// cause among them, and none if any of them has none).
    pub(super) cause: Option<crate::feed::Cause>,
}

impl<'a> Round<'a> {
    pub(super) fn new(inner: &'a Inner, leftovers: super::sigs::Leftovers) -> Round<'a> {
        Round {
            inner,
            batch: WriteBatch::default(),
            touched: Vec::new(),
            live_delta: 0,
            poisoned: Vec::new(),
            events: Vec::new(),
            from: None,
            confirm: false,
            sigs: super::sigs::SigBook::with_leftovers(leftovers),
            unflushed: Default::default(),
            deferred: Vec::new(),
        }
    }

    /// True if `id` had an error earlier in this round.
    pub(super) fn is_poisoned(&self, id: &DocId) -> bool {
        self.poisoned.iter().any(|(p, _)| p == id)
    }

    /// Marks `id` suspect until the round ends (see `poisoned`).
    pub(super) fn poison(&mut self, id: &DocId, slot: SlotRef) {
        if !self.is_poisoned(id) {
            self.poisoned.push((id.clone(), slot));
        }
    }

    /// Runs `f` on doc `id`, loaded and locked, containing panics: after a panic
    /// or an internal error the doc is dropped from memory.
    fn with_loaded<R>(
        &mut self,
        id: &str,
        f: impl FnOnce(&mut Self, &DocId, &mut Loaded) -> Result<R, Refusal>,
    ) -> Result<R, Refusal> {
        let id = DocId::new(id).map_err(|e| e.to_string())?;
        if self.is_poisoned(&id) {
            return Err(Refusal::Local(format!(
                "doc {id:?} failed earlier in this round; retried later"
            )));
        }
        let slot = self.inner.cache.entry(&id);
        let mut guard = lock_slot(&slot);
        let ops_before = self.batch.len();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let loaded = self
                .inner
                .cache
                .ensure_loaded(&id, &mut guard)
                .map_err(|e| Refusal::Local(e.to_string()))?;
            f(self, &id, loaded)
        }))
        .unwrap_or_else(|_| Err("automerge panicked on this input".to_string().into()));
        if let Some(loaded) = guard.as_ref() {
            self.inner.cache.note_size(&id, loaded);
        }
        drop(guard);
        if result.is_err() {
            self.poison(&id, slot.clone());
        }
        // Only a doc this input changed must stay in memory until the batch
        // is stored, and only changes need a flush: a read (a sync message
        // that brought nothing) costs no disk write.
        if self.batch.len() != ops_before {
            self.touched.push(slot);
        }
        result
    }
}

impl Round<'_> {
    /// Merges remote input into `doc` with `apply` and stores what it added;
    /// a deleted doc ignores it. `None` if the doc still does not exist (the
    /// input carried no changes).
    fn merge(
        &mut self,
        doc: &str,
        apply: impl FnOnce(&mut Automerge, &mut PatchLog) -> Result<(), String>,
    ) -> Result<Option<DocState>, Refusal> {
        self.merge_collect(doc, false, apply)
            .map(|(state, _)| state)
    }

    /// [`merge`](Self::merge), also returning the raw changes it added when
    /// `collect` is set (in causal order).
    fn merge_collect(
        &mut self,
        doc: &str,
        collect: bool,
        apply: impl FnOnce(&mut Automerge, &mut PatchLog) -> Result<(), String>,
    ) -> Result<(Option<DocState>, Vec<Vec<u8>>), Refusal> {
        self.with_loaded(doc, |round, id, loaded| {
            if deleted(loaded) {
                return Ok((Some(DocState::Deleted), Vec::new()));
            }
            let before = loaded.doc.get_heads();
            let mut log = super::persist::patch_log(round.inner);
            apply(&mut loaded.doc, &mut log)?;
            let added = if collect {
                let changes = loaded.doc.get_changes(&before);
                changes.iter().map(|c| c.raw_bytes().to_vec()).collect()
            } else {
                Vec::new()
            };
            let merged = store_checked(round, id, loaded, &before, &mut log)?;
            Ok((loaded.meta.is_some().then_some(merged), added))
        })
    }

    /// Applies an automerge-repo client's sync message to `doc` with the
    /// connection's sync `state`, storing what it added like any merge.
    /// Returns the doc's state after (`None`: the doc does not exist and the
    /// message brought no changes) and the raw changes it added.
    pub(super) fn receive_client_sync(
        &mut self,
        doc: &DocId,
        state: &mut sync::State,
        data: &[u8],
    ) -> Result<(Option<DocState>, Vec<Vec<u8>>), Refusal> {
        let msg = decode_sync(data)?;
        // The node vouches for its client: it signs the client's changes.
        self.vouched(|round| {
            round.merge_collect(doc.as_str(), true, |am, log| {
                am.receive_sync_message_log_patches(state, msg, log)
                    .map_err(|e| e.to_string())
            })
        })
    }

    /// Runs `f` with this node vouching for what it merges (see
    /// [`SigBook::check`](super::sigs::SigBook::check)).
    pub(super) fn vouched<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.sigs.vouch = true;
        let out = f(self);
        self.sigs.vouch = false;
        out
    }
}

impl Round<'_> {
    /// Merges `data` (an Automerge save or changes, from a backup or an
    /// import) into doc `id` as a local write: the feed sees a local change.
    /// Returns the result and, if the doc changed, its state for the sync
    /// core.
    pub(super) fn merge_saved(
        &mut self,
        id: &DocId,
        data: &[u8],
        sigs: &[u8],
    ) -> Result<(super::WriteResult, Option<DocState>), DocError> {
        let ops_before = self.batch.len();
        // A restore or import: this node admits the changes and signs those
        // that do not carry a valid signature of a node that may write.
        self.sigs.offer_all(id.as_str(), sigs);
        let merged = self.vouched(|round| {
            round.merge(id.as_str(), |am, log| {
                am.load_incremental_log_patches(data, log)
                    .map(|_| ())
                    .map_err(|e| format!("the Automerge data does not load: {e}"))
            })
        });
        let state = merged.map_err(|e| match e {
            Refusal::Invalid(e) => DocError::BadValue(e),
            Refusal::Local(e) => DocError::Internal(e),
        })?;
        let changed = self.batch.len() != ops_before;
        match state {
            Some(DocState::Live(heads)) => Ok((
                super::WriteResult {
                    id: id.clone(),
                    heads: heads.iter().map(|h| h.to_string()).collect(),
                    changed,
                },
                changed.then_some(DocState::Live(heads)),
            )),
            Some(DocState::Deleted) => Err(DocError::Deleted(id.to_string())),
            None => Err(DocError::BadValue(
                "the Automerge data holds no changes".into(),
            )),
        }
    }
}

/// Decodes a change from a peer, refusing one over `max` bytes.
fn decode_change(bytes: &[u8], max: u64) -> Result<automerge::Change, String> {
    let change = std::panic::catch_unwind(|| automerge::Change::from_bytes(bytes.to_vec()))
        .map_err(|_| "automerge panicked decoding a change".to_string())?
        .map_err(|e| format!("change does not decode: {e}"))?;
    if change.raw_bytes().len() as u64 > max {
        return Err(format!(
            "change of {} bytes exceeds doc.max_change_bytes",
            change.raw_bytes().len()
        ));
    }
    Ok(change)
}

/// Decodes a peer's or client's Automerge sync message.
fn decode_sync(data: &[u8]) -> Result<sync::Message, String> {
    std::panic::catch_unwind(|| sync::Message::decode(data))
        .map_err(|_| "automerge panicked decoding a sync message".to_string())?
        .map_err(|e| format!("sync message does not decode: {e}"))
}

/// The state a loaded doc contributes to the digest.
fn doc_state(loaded: &Loaded) -> Option<DocState> {
    match &loaded.meta {
        None => None,
        Some(m) if m.deleted_at_ms.is_some() => Some(DocState::Deleted),
        Some(_) => Some(DocState::Live(loaded.doc.get_heads())),
    }
}

fn deleted(loaded: &Loaded) -> bool {
    loaded
        .meta
        .as_ref()
        .is_some_and(|m| m.deleted_at_ms.is_some())
}

/// [`store_merged`], with its refusal charged to the peer only when that
/// peer is to blame: a valid signature the rules refuse, relayed by a peer
/// that did not make it, is not the relay's fault (it may hold a grant this
/// node has not received yet).
fn store_checked(
    round: &mut Round<'_>,
    id: &DocId,
    loaded: &mut Loaded,
    before: &[ChangeHash],
    log: &mut PatchLog,
) -> Result<DocState, Refusal> {
    store_merged(round, id, loaded, before, log).map_err(|why| {
        let signer = round.sigs.refused_signer.take();
        let blamed = signer == round.from && round.inner.policy.get().blames(id.as_str());
        if signer.is_some() && !blamed {
            Refusal::Local(why)
        } else {
            Refusal::Invalid(why)
        }
    })
}

/// Adds the changes merged since `before` to the batch and updates the meta.
/// Over the doc size cap, the merge is undone in memory and refused.
fn store_merged(
    round: &mut Round<'_>,
    id: &DocId,
    loaded: &mut Loaded,
    before: &[ChangeHash],
    log: &mut PatchLog,
) -> Result<DocState, String> {
    let inner = round.inner;
    let new = loaded.doc.get_changes(before);
    if new.is_empty() {
        return Ok(doc_state(loaded).unwrap_or(DocState::Live(vec![])));
    }
    // Objects nested past the cap are refused before anything walks them
    // (the feed's changed paths cost the square of the depth).
    let max = inner.cfg.max_depth;
    if let Some(depth) = crate::doc::container::created_depth(&loaded.doc, &new)
        && depth > max
    {
        super::persist::roll_back(inner, loaded, before)
            .map_err(|e| format!("cannot undo a too deep merge: {e}"))?;
        return Err(DocError::TooDeep {
            what: format!("a change to doc {id:?}"),
            depth,
            max,
        }
        .to_string());
    }
    let now = now_ms();
    let creating = loaded.meta.is_none();
    let mut meta = loaded.meta.clone().unwrap_or_else(|| DocMeta::new(now));
    let added: u64 = new.iter().map(|c| c.raw_bytes().len() as u64).sum();
    // Raw changes are much bigger than the doc they compact into (a doc of
    // 700k small changes: 80 MB raw, ~1.5 MB saved); the cap is on what is
    // stored, so an honest peer's big merge is measured compacted.
    if meta.size_bytes + added > inner.cfg.max_doc_bytes
        && loaded.doc.save().len() as u64 > inner.cfg.max_doc_bytes
    {
        super::persist::roll_back(inner, loaded, before)
            .map_err(|e| format!("cannot undo an oversized merge: {e}"))?;
        return Err(DocError::DocTooLarge {
            size: meta.size_bytes + added,
            cap: inner.cfg.max_doc_bytes,
        }
        .to_string());
    }
    // Every change signed by a node that may write the doc, or none is
    // stored; the signatures go in before the changes.
    let sigs = match round.sigs.check(round.inner, id, &new) {
        Ok(sigs) => sigs,
        Err(why) => {
            super::persist::roll_back(inner, loaded, before)
                .map_err(|e| format!("cannot undo an unsigned merge: {e}"))?;
            return Err(why);
        }
    };
    let signed = sigs.len() == new.len();
    for (hash, sig) in sigs {
        round.batch.put_sig(id.as_str(), &hash, &sig);
        round.sigs.accept(id.as_str(), hash, sig);
    }
    let bytes = new.iter().map(|c| c.raw_bytes());
    let batch = &mut round.batch;
    super::persist::store_changes(inner, batch, id, &mut meta, loaded, now, bytes, signed);
    inner
        .changes
        .remote
        .fetch_add(new.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let (paths, truncated) = super::persist::changed_paths(&loaded.doc, log);
    for c in &new {
        if let Some(m) = c.message() {
            inner
                .clock
                .observe(crate::doc::stamp::Stamp::parse(m).hlc, now);
        }
    }
    // A merge holding any change no workflow made is a user's change as far
    // as triggers go: it must not pass for a workflow's own write.
    let causes: Option<Vec<crate::feed::Cause>> = new
        .iter()
        .map(|c| crate::feed::Cause::from_message(c.message()?))
        .collect();
    let cause = causes.and_then(|c| c.into_iter().max_by_key(|c| c.depth));
    // Before the slot is let go (see `UrlIndex`).
    inner.urls.add([id]);
    round.events.push(PendingEvent {
        doc: id.clone(),
        touch: Touch::Changed(paths, truncated),
        after: meta.heads.clone(),
        from: round.from.clone(),
        confirm: round.confirm,
        cause,
    });
    loaded.meta = Some(meta);
    if creating {
        round.live_delta += 1;
    }
    Ok(DocState::Live(loaded.doc.get_heads()))
}

impl DocAccess for Round<'_> {
    fn tombstone_sig(&mut self, doc: &str) -> Vec<u8> {
        super::sigs::tombstone_sig(self.inner, &mut self.batch, doc)
    }

    fn state(&mut self, doc: &str) -> Option<DocState> {
        self.with_loaded(doc, |_, _, loaded| Ok(doc_state(loaded)))
            .ok()
            .flatten()
    }

    fn generate_sync(&mut self, doc: &str, state: &mut sync::State) -> Option<(Vec<u8>, Vec<u8>)> {
        let (data, carried) = self
            .with_loaded(doc, |_, _, loaded| {
                let live = !(deleted(loaded) || loaded.meta.is_none());
                let msg = if live {
                    loaded.doc.generate_sync_message(state)
                } else {
                    Automerge::new().generate_sync_message(state)
                };
                let Some(msg) = msg else { return Ok(None) };
                // The changes it carries: each chunk is one change, or (a
                // whole-doc message) a document, which carries them all. Not
                // "all since the shared heads": after a peer lost what it
                // had not flushed, it asks for changes before them.
                let mut carried: Vec<[u8; 32]> = Vec::new();
                for chunk in msg.changes.iter().filter(|_| live) {
                    match automerge::Change::from_bytes(chunk.to_vec()) {
                        Ok(c) => carried.push(c.hash().0),
                        Err(_) => {
                            carried = loaded
                                .doc
                                .get_changes_meta(&[])
                                .iter()
                                .map(|c| c.hash.0)
                                .collect();
                            break;
                        }
                    }
                }
                Ok(Some((msg.encode(), carried)))
            })
            .ok()
            .flatten()?;
        let sigs = self.sigs.blob(self.inner, doc, carried.iter());
        Some((data, sigs))
    }

    fn offer_sigs(&mut self, doc: &str, sigs: &[u8]) {
        self.sigs.offer_all(doc, sigs);
    }

    fn receive_sync(
        &mut self,
        doc: &str,
        state: &mut sync::State,
        data: &[u8],
    ) -> Result<Option<DocState>, Refusal> {
        let msg = decode_sync(data)?;
        self.merge(doc, |am, log| {
            am.receive_sync_message_log_patches(state, msg, log)
                .map_err(|e| e.to_string())
        })
    }

    fn apply_change(&mut self, doc: &str, change: &[u8], sig: &[u8]) -> Result<Applied, Refusal> {
        self.apply_changes(doc, &[(change, sig)])
            .pop()
            .expect("one result per change")
    }

    fn apply_changes(
        &mut self,
        doc: &str,
        changes: &[(&[u8], &[u8])],
    ) -> Vec<Result<Applied, Refusal>> {
        let max = self.inner.cfg.max_change_bytes;
        // Each entry is overwritten below, with its verdict or an error.
        let mut results: Vec<Result<Applied, Refusal>> =
            vec![Ok(Applied::MissingDeps); changes.len()];
        let mut decoded: Vec<(usize, automerge::Change)> = Vec::new();
        for (i, (bytes, sig)) in changes.iter().enumerate() {
            match decode_change(bytes, max) {
                Ok(c) => {
                    self.sigs.offer(doc, c.hash().0, sig);
                    decoded.push((i, c));
                }
                Err(e) => results[i] = Err(e.into()),
            }
        }
        let outcome = self.with_loaded(doc, |round, id, loaded| {
            // Which are new and ready: deps in the doc or in the batch (in any
            // order: passes until nothing more becomes ready).
            let mut verdicts: Vec<(usize, Applied)> = Vec::new();
            let mut ready = Vec::new();
            let mut ready_hashes = std::collections::HashSet::new();
            let mut waiting = Vec::new();
            // The doc as it is before the batch, for changes it already has.
            let current = doc_state(loaded).unwrap_or(DocState::Live(vec![]));
            let is_deleted = deleted(loaded);
            for (i, change) in decoded {
                if is_deleted {
                    verdicts.push((i, Applied::Deleted));
                } else if loaded.doc.get_change_meta_by_hash(&change.hash()).is_some() {
                    verdicts.push((i, Applied::Had(current.clone())));
                } else {
                    waiting.push((i, change));
                }
            }
            loop {
                let before = ready.len();
                let mut still = Vec::new();
                for (i, change) in waiting {
                    if ready_hashes.contains(&change.hash()) {
                        // A duplicate within the batch.
                        verdicts.push((i, Applied::Had(current.clone())));
                    } else if loaded
                        .doc
                        .get_missing_deps(change.deps())
                        .iter()
                        .all(|d| ready_hashes.contains(d))
                    {
                        ready_hashes.insert(change.hash());
                        ready.push((i, change));
                    } else {
                        still.push((i, change));
                    }
                }
                waiting = still;
                if ready.len() == before || waiting.is_empty() {
                    break;
                }
            }
            verdicts.extend(waiting.into_iter().map(|(i, _)| (i, Applied::MissingDeps)));
            if !ready.is_empty() {
                let before = loaded.doc.get_heads();
                let mut log = super::persist::patch_log(round.inner);
                let (idx, batch): (Vec<usize>, Vec<automerge::Change>) = ready.into_iter().unzip();
                loaded
                    .doc
                    .apply_changes_log_patches(batch, &mut log)
                    .map_err(|e| e.to_string())?;
                let state = store_checked(round, id, loaded, &before, &mut log)?;
                verdicts.extend(idx.into_iter().map(|i| (i, Applied::Ok(state.clone()))));
            }
            Ok(verdicts)
        });
        match outcome {
            Ok(verdicts) => {
                for (i, v) in verdicts {
                    results[i] = Ok(v);
                }
            }
            // The doc refused the batch as a whole (a size cap, a panic):
            // every change that was not already refused shares the error.
            Err(e) => {
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(e.clone());
                }
            }
        }
        results
    }

    fn doc_bytes(&mut self, doc: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        if let Some(stored) = super::push::stored_save(self.inner, doc) {
            return Some(stored);
        }
        let (data, hashes) = self
            .with_loaded(doc, |_, _, loaded| Ok(super::push::save_of(loaded)))
            .ok()??;
        let sigs = super::push::sigs_of(self.inner, &mut self.sigs, doc, &hashes)?;
        Some((data, sigs))
    }

    fn merge_doc(&mut self, doc: &str, data: &[u8]) -> Result<Option<DocState>, Refusal> {
        self.merge(doc, |am, log| {
            am.load_incremental_log_patches(data, log)
                .map(|_| ())
                .map_err(|e| format!("pushed doc does not load: {e}"))
        })
    }

    fn saved_sync_state(&mut self, peer: &str, doc: &str) -> Option<sync::State> {
        let bytes = self.inner.store.sync_state(doc, peer).ok()??;
        // A state that does not decode (an older format, a damaged record)
        // is only a lost hint: the session starts from nothing.
        std::panic::catch_unwind(|| sync::State::decode(&bytes))
            .ok()?
            .ok()
    }

    fn save_sync_state(&mut self, peer: &str, doc: &str, state: &sync::State) {
        if state.shared_heads.is_empty() {
            return;
        }
        if let Err(e) = self.inner.store.put_sync_state(doc, peer, &state.encode()) {
            tracing::debug!(doc, peer, err = %e, "sync state not saved");
        }
    }

    fn delete(&mut self, doc: &str, sig: &[u8]) -> Result<(), Refusal> {
        // No node deletes a system doc (grants, definitions, membership):
        // a peer that sends one is refused whatever it signed.
        if crate::doc::is_system(doc) {
            return Err(Refusal::Invalid(format!(
                "a peer may not delete system doc {doc:?}"
            )));
        }
        let sig = super::sigs::check_tombstone(self.inner, self.from.as_deref(), doc, sig)?;
        self.with_loaded(doc, |round, id, loaded| {
            if deleted(loaded) {
                return Ok(());
            }
            let existed = loaded.meta.is_some();
            let mut meta = loaded
                .meta
                .clone()
                .unwrap_or_else(|| DocMeta::new(now_ms()));
            let tail = meta.tail_range();
            meta.deleted_at_ms = Some(now_ms());
            meta.size_bytes = 0;
            meta.snapshot_bytes = 0;
            meta.tail_changes = 0;
            round.batch.tombstone(id.as_str(), &meta, tail);
            super::persist::forget_side_data(round.inner, &mut round.batch, id);
            let hash = crate::trust::TOMBSTONE_HASH;
            round.batch.put_sig(id.as_str(), &hash, &sig);
            loaded.doc = new_doc(&round.inner.actor);
            loaded.meta = Some(meta);
            if existed {
                round.live_delta -= 1;
                round.events.push(PendingEvent {
                    doc: id.clone(),
                    touch: Touch::Deleted,
                    after: vec![],
                    from: Some(round.from.clone().unwrap_or_default()),
                    confirm: false,
                    cause: None,
                });
            }
            Ok(())
        })
    }
}
