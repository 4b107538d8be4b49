//! The writer thread: applies queued writes in batches.
//!
//! It takes every write waiting in its queue (up to `write_batch`), applies each
//! to its document under the document's lock, collects the changes into one
//! [`WriteBatch`], applies that to sled (crash-safe per doc, see
//! [`WriteBatch`]) and hands the writers' replies to the group-commit thread,
//! which answers them after its flush. One thread means no per-write thread
//! hand-off and one store batch per round; the
//! Automerge work per write is tens of microseconds, so one core keeps up with
//! what the HTTP layer can deliver.
//!
//! When the node syncs with peers, the writer also hosts the sync core
//! ([`crate::sync::Core`]): remote input is applied in the same rounds and
//! batches as local writes (see `remote.rs`), and the core's outputs go to the
//! network shell over a bounded channel. A local change is handed to the core,
//! and so may be sent to peers, before the round's flush completes: that saves
//! the flush time on the propagation path, and is safe because every boot
//! writes with a fresh actor id, so a change lost here in a crash cannot be
//! forked by a different change with the same actor and sequence number; a peer
//! that holds it gives it back through sync.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{Automerge, ChangeHash, PatchLog, ReadDoc};
use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, oneshot};

use super::container::Creator;
use super::json::{check_write_depth, json_depth};
use super::ops::apply_ops_with;
use super::patch::{apply_merge_patch_with, create_root};
use super::path::push_prop;
use super::remote::{PendingEvent, Round, Touch};
use super::service::{Change, Inner, Loaded, WriteResult, live_meta, lock_slot, now_ms};
use super::{DocError, DocId};
use crate::feed::ChangeEvent;
use crate::store::{Ack, DocMeta, StoreError, WriteBatch};
use crate::sync::{Core, DocState, FastChange, Input, Message, Output};

/// A message to the writer thread.
pub(super) enum WriterMsg {
    Write(WriteReq),
    /// Input for the sync core (ignored when the node does not sync), e.g.
    /// the messages of one network frame.
    Sync(Vec<Input>),
    /// Finish the writes queued before this and exit.
    Stop,
}

/// What the API shows about one peer's sync, published by the writer thread.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSyncView {
    /// Unix ms when a digest from the peer last matched ours.
    pub last_in_sync_at: Option<u64>,
    /// Docs with a sync session open to the peer.
    pub docs_syncing: usize,
}

/// The sync core and where its outputs go, owned by the writer thread.
pub(crate) struct SyncRuntime {
    pub(crate) core: Core,
    pub(crate) out: mpsc::Sender<Output>,
    pub(crate) rng: rand::rngs::StdRng,
    pub(crate) started: std::time::Instant,
    pub(crate) dropped_outputs: u64,
}

impl SyncRuntime {
    /// Handles a round's remote input (every frame it took from the queue).
    /// Fast-path changes of one doc from one peer go to the core together,
    /// so they cost one Automerge apply (which walks the doc's ops once per
    /// call); everything else follows in order.
    fn handle_all(&mut self, inputs: Vec<Input>, round: &mut Round<'_>) {
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
                            ack,
                            seen,
                        },
                } => {
                    let c = FastChange { change, ack, seen };
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

    fn handle(&mut self, input: Input, round: &mut Round<'_>) {
        let now = self.started.elapsed().as_millis() as u64;
        let tick = matches!(input, Input::Tick);
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
        let Some(slot) = inner.cached(&id) else {
            return false;
        };
        let guard = lock_slot(&slot);
        let Some(loaded) = guard.as_ref() else {
            return false;
        };
        super::service::in_history(&loaded.doc, want, theirs)
    };
    inner.replicas.confirm(peer, doc, heads, now_ms(), covers);
}

/// One write and where to send its result.
pub(super) struct WriteReq {
    pub(super) id: DocId,
    pub(super) op: WriteOp,
    /// Peers that get the change confirm once they stored it.
    pub(super) ack: bool,
    /// Who wrote it and its idempotency key.
    pub(super) tags: WriteTags,
    pub(super) reply: oneshot::Sender<Result<WriteResult, DocError>>,
}

/// What a write says about itself beyond its content.
#[derive(Default)]
pub(super) struct WriteTags {
    /// The workflow run writing it, if one is.
    pub(super) cause: Option<crate::feed::Cause>,
    /// Apply at most once per doc with this key.
    pub(super) idem: Option<String>,
    /// The fingerprint of the request that carries `idem`, when it has one
    /// (see [`super::stamp::fingerprint`]).
    pub(super) req: Option<String>,
    /// Answer without waiting for a flush (the next flush, within
    /// `store.remote_flush_ms`, covers it): for writes whose writer can
    /// redo them after a crash, like a workflow run's.
    pub(super) lazy: bool,
}

/// What a write does.
pub(super) enum WriteOp {
    /// Create a new document with these root keys.
    Create(Map<String, Json>),
    /// Change a document, creating it if absent.
    Change(Change),
    /// Delete a document, leaving a tombstone.
    Delete,
    /// Merge an Automerge save (or changes) into a document, creating it if
    /// absent: a restore or an import. A deleted document refuses it.
    Merge(Vec<u8>),
}

/// The writer thread's loop. Returns when told to stop or when every sender is gone.
pub(super) fn run(
    inner: Arc<Inner>,
    mut rx: mpsc::Receiver<WriterMsg>,
    mut sync: Option<SyncRuntime>,
) {
    let max = inner.cfg.write_batch.max(1);
    let mut stop = false;
    while !stop {
        let mut msgs = Vec::new();
        match rx.blocking_recv() {
            Some(WriterMsg::Stop) | None => break,
            Some(m) => msgs.push(m),
        }
        while msgs.len() < max {
            match rx.try_recv() {
                Ok(WriterMsg::Stop) => {
                    stop = true;
                    break;
                }
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        write_round(&inner, msgs, sync.as_mut());
        if let Some(sync) = &sync {
            let fp = sync.core.digest().fingerprint();
            *inner
                .sync_fingerprint
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(fp);
            let mut stats = sync.core.stats().clone();
            stats.docs_lacking = sync.core.lacking() as u64;
            *inner.sync_stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
        }
    }
}

/// Applies one round: local writes and remote input in memory, one sled batch,
/// then the flush thread.
fn write_round(inner: &Inner, msgs: Vec<WriterMsg>, mut sync: Option<&mut SyncRuntime>) {
    let mut round = Round::new(inner);
    let mut results = Vec::with_capacity(msgs.len());
    // Whether a write that succeeded waits for the flush.
    let mut durable = false;
    // Remote input first, all of the round's together: fast-path changes of
    // one doc from one peer then cost one Automerge apply, however many
    // frames brought them (a receiver that falls behind catches up in
    // fewer, bigger applies instead of slowing down further).
    let mut inputs = Vec::new();
    let mut reqs = Vec::with_capacity(msgs.len());
    for msg in msgs {
        match msg {
            WriterMsg::Write(req) => reqs.push(req),
            WriterMsg::Sync(i) => inputs.extend(i),
            WriterMsg::Stop => {}
        }
    }
    if let Some(sync) = sync.as_deref_mut()
        && !inputs.is_empty()
    {
        sync.handle_all(inputs, &mut round);
    }
    // Local changes and merges go to the sync core (and so to peers) only
    // once the store has them: if storing fails, the doc is reloaded without
    // them and its next change reuses their actor and sequence numbers,
    // which peers holding the first one would reject as a duplicate
    // sequence. (Any sync the core starts sends what the doc holds, so a
    // merge handled before the store call could carry this round's changes.)
    let mut local: Vec<Input> = Vec::new();
    for req in reqs {
        if round.is_poisoned(&req.id) {
            let e = DocError::Internal(format!(
                "doc {:?} failed earlier in this write round; retry",
                req.id.as_str()
            ));
            results.push((req.reply, Err(e)));
            continue;
        }
        if let WriteOp::Merge(data) = &req.op {
            let merged = round.merge_saved(&req.id, data);
            if let (Some(_), Ok((_, Some(state)))) = (&sync, &merged) {
                local.push(Input::LocalMerge {
                    doc: req.id.to_string(),
                    state: state.clone(),
                });
            }
            let merged = merged.map(|(r, _)| r);
            durable |= merged.is_ok();
            results.push((req.reply, merged));
            continue;
        }
        let slot = inner.entry(&req.id);
        let result = {
            let mut guard = lock_slot(&slot);
            // A panic (in a library user's closure, or in Automerge) must cost
            // this write only, not the writer thread. The batch is only touched
            // after the change succeeded, so it holds nothing of this write.
            let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
                inner.ensure_loaded(&req.id, &mut guard).and_then(|loaded| {
                    apply(inner, &req.id, loaded, req.op, &req.tags, &mut round.batch)
                })
            }));
            let result = applied.unwrap_or_else(|_| {
                Err(DocError::Internal(format!(
                    "panic while writing doc {:?}",
                    req.id.as_str()
                )))
            });
            if let Some(loaded) = guard.as_ref() {
                inner.note_size(&req.id, loaded);
            }
            result
        };
        // After an internal error the doc in memory may hold a change the
        // store will never get: reload it, once this round's batch is stored.
        if matches!(result, Err(DocError::Internal(_))) {
            round.poison(&req.id, slot.clone());
        }
        let result = result.map(|(r, delta, input, touch)| {
            if let Some(touch) = touch {
                round.events.push(PendingEvent {
                    doc: req.id.clone(),
                    touch,
                    after: r.heads.clone(),
                    from: None,
                    confirm: false,
                    cause: req.tags.cause.clone(),
                });
            }
            if r.changed {
                round.touched.push(slot);
            }
            round.live_delta += delta;
            if let Some(mut input) = input.filter(|_| sync.is_some()) {
                if let Input::LocalChange { ack, .. } = &mut input {
                    *ack = req.ack;
                }
                local.push(input);
            }
            durable |= !req.tags.lazy;
            r
        });
        results.push((req.reply, result));
    }
    let batch = std::mem::take(&mut round.batch);
    let applied = if batch.is_empty() {
        Ok(())
    } else {
        inner.store.apply(batch)
    };
    if let (Some(sync), Ok(())) = (sync.as_deref_mut(), &applied) {
        for input in local {
            sync.handle(input, &mut round);
        }
        debug_assert!(round.batch.is_empty(), "local changes store nothing more");
    }
    let Round {
        touched,
        live_delta,
        poisoned,
        events,
        ..
    } = round;
    for (_, slot) in poisoned {
        *lock_slot(&slot) = None;
    }
    if let Err(e) = applied {
        // A prefix of the batch may be stored (each doc at a state it passed
        // through, see `WriteBatch`): the digest, the live count and the docs
        // in memory are rebuilt from what the store holds.
        match inner.store.list_docs() {
            Ok(metas) => {
                let live = metas
                    .iter()
                    .filter(|(_, m)| m.deleted_at_ms.is_none())
                    .count();
                inner.live_docs.store(live as i64, Ordering::Relaxed);
                if let Some(sync) = sync {
                    sync.core.reset_digest(
                        metas
                            .into_iter()
                            .map(|(id, m)| (id, super::service::stored_state(&m))),
                    );
                }
            }
            Err(le) => tracing::error!(err = %le, "cannot re-read the docs after a failed write"),
        }
        tracing::error!(err = %e, "store write failed");
        for slot in touched {
            *lock_slot(&slot) = None;
        }
        let msg = e.to_string();
        for (reply, result) in results {
            let _ = reply.send(result.and(Err(DocError::Store(StoreError::Write(msg.clone())))));
        }
        return;
    }
    inner.live_docs.fetch_add(live_delta, Ordering::Relaxed);
    let mut acks: Vec<Ack> = Vec::with_capacity(results.len() + 1);
    // A round that only merged remote changes nobody waits on and made
    // lazy local writes (no other local write, no peer asking for a
    // confirmation) need not wait for a flush before its answers and feed
    // events: the flush thread flushes it within `store.remote_flush_ms`. A
    // crash in that window loses remote changes that their origin still
    // holds (it acknowledged none of them before its own flush) and that
    // sync brings back, and lazy writes that their writer redoes (see
    // `Docs::write_caused`).
    if !events.is_empty() {
        // Published in the order the round applied them, once durable (or,
        // for a lazy round, once every earlier round's were); the peers whose
        // changes were merged are told we hold them, after the flush.
        let confirms = confirmations(&events);
        durable |= !confirms.is_empty();
        let out = sync.as_ref().map(|s| s.out.clone());
        let events = feed_events(inner, events);
        let feed = inner.feed.clone();
        acks.push(Box::new(move |flushed| {
            if flushed.is_err() {
                return;
            }
            feed.publish(events);
            if let Some(out) = out {
                for (to, msg) in confirms {
                    let _ = out.try_send(Output::Send { to, msg });
                }
            }
        }));
    }
    for (reply, result) in results {
        match result {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            // Even a write that changed nothing waits for the flush: the heads
            // it returns may include an earlier write not yet flushed.
            Ok(r) => acks.push(Box::new(move |flushed| {
                let _ = reply.send(flushed.map(|()| r).map_err(|m| DocError::Store(m.into())));
            })),
        }
    }
    // Merged remote changes need a flush too, even with nobody waiting on it.
    if !acks.is_empty() || !touched.is_empty() {
        inner.commit.submit_blocking(acks, durable);
    }
}

/// What a local write did: its result, the change in the number of live
/// docs, what to tell the sync core, and what to tell the change feed.
type Outcome = (WriteResult, i64, Option<Input>, Option<Touch>);

/// Applies one write to its loaded doc and adds what to store to `batch`.
fn apply(
    inner: &Inner,
    id: &DocId,
    loaded: &mut Loaded,
    op: WriteOp,
    tags: &WriteTags,
    batch: &mut WriteBatch,
) -> Result<Outcome, DocError> {
    if let Some(key) = &tags.idem
        && let Some(result) = applied_before(id, loaded, key, tags.req.as_deref())?
    {
        return Ok((result, 0, None, None));
    }
    let stamp = super::stamp::Stamp {
        hlc: inner.clock.tick(now_ms()),
        prio: inner.cfg.priority,
        idem: tags.idem.clone(),
        req: tags.req.clone(),
    };
    let caused = tags.cause.as_ref().map(|c| c.message());
    let message = |kind: &'static str| stamp.message(caused.as_deref().unwrap_or(kind));
    let strings = inner.cfg.strings;
    let max_depth = inner.cfg.max_depth;
    let deleted = |m: &Option<DocMeta>| m.as_ref().is_some_and(|m| m.deleted_at_ms.is_some());
    match op {
        WriteOp::Create(map) => {
            if deleted(&loaded.meta) {
                return Err(DocError::Deleted(id.to_string()));
            }
            if loaded.meta.is_some() {
                return Err(DocError::AlreadyExists(id.to_string()));
            }
            // The new doc's root holds `map`: its values' nesting is the doc's.
            let depth = map.values().map(json_depth).max().unwrap_or(0);
            check_write_depth(depth, max_depth)?;
            commit(
                inner,
                id,
                loaded,
                &message("create"),
                batch,
                true,
                |tx, c| create_root(tx, &map, strings, c),
            )
        }
        WriteOp::Change(change) => {
            if deleted(&loaded.meta) {
                return Err(DocError::Deleted(id.to_string()));
            }
            match change {
                Change::Patch(p) => commit(
                    inner,
                    id,
                    loaded,
                    &message("patch"),
                    batch,
                    true,
                    |tx, c| apply_merge_patch_with(tx, &p, strings, c, max_depth),
                ),
                Change::Ops(ops) => {
                    commit(inner, id, loaded, &message("ops"), batch, true, |tx, c| {
                        apply_ops_with(tx, &ops, strings, c, max_depth)
                    })
                }
                Change::SetIfDifferent(values) => {
                    commit(inner, id, loaded, &message("set"), batch, true, |tx, c| {
                        for (ptr, value) in &values {
                            if super::service::json_at(tx, ptr).ok().as_ref() == Some(value) {
                                continue;
                            }
                            let op = super::Op::Set {
                                path: ptr.as_str().to_string(),
                                value: value.clone(),
                                kind: None,
                            };
                            apply_ops_with(tx, std::slice::from_ref(&op), strings, c, max_depth)?;
                        }
                        Ok(())
                    })
                }
                Change::Closure(f) => {
                    // A closure runs once: the containers it makes are its own.
                    let mut f = Some(f);
                    commit(
                        inner,
                        id,
                        loaded,
                        &message("change"),
                        batch,
                        false,
                        |tx, _| {
                            let f = f.take().ok_or_else(|| {
                                DocError::Internal("a change closure ran twice".into())
                            })?;
                            Ok(f(tx)?)
                        },
                    )
                }
            }
        }
        // Merged by the round (`Round::merge_saved`), never here.
        WriteOp::Merge(_) => Err(DocError::Internal("a merge reached the write path".into())),
        WriteOp::Delete => {
            let old = live_meta(id, loaded)?.clone();
            let mut meta = old.clone();
            meta.deleted_at_ms = Some(now_ms());
            meta.size_bytes = 0;
            meta.snapshot_bytes = 0;
            meta.tail_changes = 0;
            batch.tombstone(id.as_str(), &meta, tail_range(&old));
            forget_sync_states(inner, id);
            loaded.doc = super::service::new_doc(&inner.actor);
            loaded.meta = Some(meta.clone());
            let result = WriteResult {
                id: id.clone(),
                heads: meta.heads,
                changed: true,
            };
            let input = Input::LocalDelete {
                doc: id.to_string(),
            };
            Ok((result, -1, Some(input), Some(Touch::Deleted)))
        }
    }
}

/// The result of a write with idempotency key `key` if one is already in
/// the doc's history: nothing to apply again.
///
/// # Errors
/// [`DocError::IdempotencyKeyReused`] when that change was asked for by a
/// request with another fingerprint than `req` (a change without one, from
/// an older node, counts as the same request).
fn applied_before(
    id: &DocId,
    loaded: &Loaded,
    key: &str,
    req: Option<&str>,
) -> Result<Option<WriteResult>, DocError> {
    let Some(meta) = loaded.meta.as_ref() else {
        return Ok(None);
    };
    let earlier = loaded.doc.get_changes_meta(&[]).iter().find_map(|c| {
        let stamp = super::stamp::Stamp::parse(c.message.as_deref()?);
        (stamp.idem.as_deref() == Some(key)).then_some(stamp)
    });
    let Some(earlier) = earlier else {
        return Ok(None);
    };
    if let (Some(then), Some(now)) = (earlier.req.as_deref(), req)
        && then != now
    {
        return Err(DocError::IdempotencyKeyReused {
            doc: id.to_string(),
            key: key.to_string(),
        });
    }
    Ok(Some(WriteResult {
        id: id.clone(),
        heads: meta.heads.clone(),
        changed: false,
    }))
}

/// Drops the sync states kept for a doc being deleted (hints only: an error
/// is logged, not returned).
pub(super) fn forget_sync_states(inner: &Inner, id: &DocId) {
    if let Err(e) = inner.store.remove_sync_states(id.as_str()) {
        tracing::debug!(doc = %id.as_str(), err = %e, "sync states of a deleted doc not removed");
    }
}

/// A [`Message::Have`](crate::sync::Message::Have) for each (peer, doc)
/// whose changes this round merged and that asked to hear of it (see
/// `Round::confirm`), with the doc's last heads.
fn confirmations(events: &[PendingEvent]) -> Vec<(String, crate::sync::Message)> {
    let mut last: std::collections::BTreeMap<(&str, &str), &[String]> = Default::default();
    for e in events {
        if let (Some(from), Touch::Changed(..), true) = (&e.from, &e.touch, e.confirm)
            && !from.is_empty()
        {
            last.insert((from.as_str(), e.doc.as_str()), &e.after);
        }
    }
    last.into_iter()
        .map(|((peer, doc), heads)| {
            let msg = crate::sync::Message::Have {
                doc: doc.to_string(),
                heads: heads.iter().filter_map(|h| h.parse().ok()).collect(),
            };
            (peer.to_string(), msg)
        })
        .collect()
}

/// Turns a round's changes into feed events.
fn feed_events(inner: &Inner, events: Vec<PendingEvent>) -> Vec<ChangeEvent> {
    events
        .into_iter()
        .map(|e| {
            let (paths, truncated, deleted) = match e.touch {
                Touch::Changed(paths, truncated) => (paths, truncated, false),
                Touch::Deleted => (vec![], false, true),
            };
            ChangeEvent {
                id: String::new(), // the feed numbers events as it publishes
                seq: 0,
                doc: e.doc.to_string(),
                heads: if deleted { vec![] } else { e.after },
                local: e.from.is_none(),
                origin: e.from.unwrap_or_else(|| inner.origin.clone()),
                deleted,
                paths,
                paths_truncated: truncated,
                cause: e.cause,
            }
        })
        .collect()
}

/// A patch log for one change: active (Automerge records what the change
/// does, at a cost proportional to the change) only while someone is
/// subscribed to the feed, since only subscribers read changed paths.
pub(super) fn patch_log(inner: &Inner) -> PatchLog {
    PatchLog::new(inner.feed.has_subscribed())
}

/// JSON Pointers of what the changes recorded in `log` changed in `doc` (at
/// most [`crate::feed::MAX_PATHS`]; the flag says the list may be incomplete).
/// Nothing, flagged, for an inactive log (it records nothing). Computed right after the changes
/// applied, while the doc is still at the state the log describes.
pub(super) fn changed_paths(doc: &Automerge, log: &mut PatchLog) -> (Vec<String>, bool) {
    let patches = std::panic::catch_unwind(AssertUnwindSafe(|| doc.make_patches(log)));
    let Ok(patches) = patches else {
        return (vec![], true);
    };
    let mut paths = std::collections::BTreeSet::new();
    let mut truncated = false;
    for patch in patches {
        let mut pointer = String::new();
        for (_, prop) in &patch.path {
            push_prop(&mut pointer, prop);
        }
        if let Some(prop) = patch_prop(&patch.action) {
            push_prop(&mut pointer, &prop);
        }
        if paths.len() == crate::feed::MAX_PATHS && !paths.contains(&pointer) {
            truncated = true;
            break;
        }
        paths.insert(pointer);
    }
    // No paths at all: the log was inactive (nobody followed the feed when
    // the change was made; a subscriber may have arrived since) or the change
    // shows nothing. Either way the list cannot be trusted to be complete.
    let truncated = truncated || paths.is_empty();
    (paths.into_iter().collect(), truncated)
}

/// The map key or list index a patch acts on, when it names one.
fn patch_prop(action: &automerge::PatchAction) -> Option<automerge::Prop> {
    use automerge::{PatchAction as A, Prop};
    match action {
        A::PutMap { key, .. } | A::DeleteMap { key } => Some(Prop::Map(key.clone())),
        A::PutSeq { index, .. } | A::Insert { index, .. } | A::DeleteSeq { index, .. } => {
            Some(Prop::Seq(*index))
        }
        A::Increment { prop, .. } | A::Conflict { prop } => Some(prop.clone()),
        // Text splices and marks: the path of the text is what changed.
        _ => None,
    }
}

/// Sequence numbers of a doc's stored change tail.
pub(super) fn tail_range(meta: &DocMeta) -> std::ops::Range<u64> {
    meta.next_seq.saturating_sub(meta.tail_changes)..meta.next_seq
}

fn begin<'a>(inner: &Inner, doc: &'a mut Automerge) -> Result<Transaction<'a>, DocError> {
    doc.transaction_log_patches(patch_log(inner))
        .map_err(|e| DocError::Internal(e.to_string()))
}

/// Runs `f` in a transaction on `loaded`; on success adds the change (and a
/// compaction when due) to `batch`. On any error the doc is left as it was.
///
/// Containers `f` creates through its [`Creator`] get deterministic identity
/// (see [`super::container`]): when `repeatable`, `f` first runs on a
/// transaction that is rolled back while the creator records them; their
/// genesis changes are applied; then `f` runs again for real, and the write
/// stores the geneses before its own change. A write that creates no
/// container runs once.
fn commit<F>(
    inner: &Inner,
    id: &DocId,
    loaded: &mut Loaded,
    message: &str,
    batch: &mut WriteBatch,
    repeatable: bool,
    mut f: F,
) -> Result<Outcome, DocError>
where
    F: FnMut(&mut Transaction<'_>, &mut Creator) -> Result<(), DocError>,
{
    let creating = loaded.meta.is_none();
    let before: Vec<ChangeHash> = loaded.doc.get_heads();
    let mut creator = if repeatable {
        Creator::recording()
    } else {
        Creator::plain()
    };
    let mut tx = begin(inner, &mut loaded.doc)?;
    if let Err(e) = f(&mut tx, &mut creator) {
        tx.rollback();
        return Err(e);
    }
    let mut geneses: Vec<automerge::Change> = Vec::new();
    if !creator.is_empty() {
        tx.rollback();
        geneses = creator.geneses(&loaded.doc)?;
        loaded
            .doc
            .apply_changes(geneses.iter().cloned())
            .map_err(|e| DocError::Internal(format!("a container's genesis: {e}")))?;
        tx = begin(inner, &mut loaded.doc)?;
        if let Err(e) = f(&mut tx, &mut Creator::plain()) {
            tx.rollback();
            roll_back(inner, loaded, &before)
                .map_err(|fe| DocError::Internal(format!("cannot undo geneses: {fe}")))?;
            return Err(e);
        }
    }
    if tx.pending_ops() == 0 && !creating && geneses.is_empty() {
        tx.rollback();
        let heads = loaded
            .meta
            .as_ref()
            .map(|m| m.heads.clone())
            .unwrap_or_default();
        let result = WriteResult {
            id: id.clone(),
            heads,
            changed: false,
        };
        return Ok((result, 0, None, None));
    }
    let now = now_ms();
    let opts = || {
        CommitOptions::default()
            .with_message(message)
            .with_time((now / 1000) as i64)
    };
    let (hash, mut log) = match tx.commit_with(opts()) {
        (Some(h), log) => (h, log),
        // A create with no keys still gets a change, so the doc has heads.
        (None, log) => (loaded.doc.empty_commit(opts()), log),
    };
    let change = loaded
        .doc
        .get_change_by_hash(&hash)
        .ok_or_else(|| DocError::Internal("committed change is missing".into()))?;
    let bytes = change.raw_bytes();
    let size = bytes.len() as u64
        + geneses
            .iter()
            .map(|g| g.raw_bytes().len() as u64)
            .sum::<u64>();
    let mut meta = loaded.meta.clone().unwrap_or_else(|| DocMeta::new(now));
    let cfg = &inner.cfg;
    let cap_error = if size > cfg.max_change_bytes {
        Some(DocError::ChangeTooLarge {
            size,
            cap: cfg.max_change_bytes,
        })
    } else if meta.size_bytes + size > cfg.max_doc_bytes {
        Some(DocError::DocTooLarge {
            size: meta.size_bytes + size,
            cap: cfg.max_doc_bytes,
        })
    } else {
        None
    };
    if let Some(e) = cap_error {
        // The change is committed in memory only: go back to the heads before it.
        roll_back(inner, loaded, &before).map_err(|fe| {
            DocError::Internal(format!("cannot undo a change over a size cap: {fe}"))
        })?;
        return Err(e);
    }
    let all = geneses.iter().map(|g| g.raw_bytes()).chain([bytes]);
    append_changes(batch, id, &mut meta, loaded, now, all.clone());
    inner.changes.local.fetch_add(1, Ordering::Relaxed);
    let input = Input::LocalChange {
        doc: id.to_string(),
        changes: all.map(<[u8]>::to_vec).collect(),
        state: DocState::Live(loaded.doc.get_heads()),
        ack: false, // set by the caller, which knows the request
    };
    maybe_compact(inner, id, loaded, &mut meta, batch);
    let result = WriteResult {
        id: id.clone(),
        heads: meta.heads.clone(),
        changed: true,
    };
    loaded.meta = Some(meta);
    let (mut paths, truncated) = changed_paths(&loaded.doc, &mut log);
    if !geneses.is_empty() {
        paths.extend(super::container::genesis_paths(&loaded.doc, &geneses));
        paths.sort();
        paths.dedup();
    }
    Ok((
        result,
        i64::from(creating),
        Some(input),
        Some(Touch::Changed(paths, truncated)),
    ))
}

/// Adds `changes` to the batch as the doc's next tail entries, with its meta
/// (new heads, update time, sequence, tail and size) written alongside.
pub(super) fn append_changes<'a>(
    batch: &mut WriteBatch,
    id: &DocId,
    meta: &mut DocMeta,
    loaded: &Loaded,
    now: u64,
    changes: impl IntoIterator<Item = &'a [u8]>,
) {
    meta.heads = loaded
        .doc
        .get_heads()
        .iter()
        .map(|h| h.to_string())
        .collect();
    meta.updated_at_ms = now;
    let first = meta.next_seq;
    let changes: Vec<&[u8]> = changes.into_iter().collect();
    for bytes in &changes {
        meta.next_seq += 1;
        meta.tail_changes += 1;
        meta.size_bytes += bytes.len() as u64;
    }
    // The meta carries the heads after all of them, so they are stored
    // together (see `WriteBatch::append_changes`).
    batch.append_changes(id.as_str(), first, &changes, meta);
}

/// Undoes in memory every change after `before`: for a change refused after
/// Automerge applied it. (fork_at replays the history: slow for big docs, but
/// only on this error path.)
pub(super) fn roll_back(
    inner: &Inner,
    loaded: &mut Loaded,
    before: &[ChangeHash],
) -> Result<(), automerge::AutomergeError> {
    let mut doc = loaded.doc.fork_at(before)?;
    doc.set_actor(inner.actor.clone());
    loaded.doc = doc;
    Ok(())
}

/// Compacts the doc's change tail into a snapshot when it is due.
pub(super) fn maybe_compact(
    inner: &Inner,
    id: &DocId,
    loaded: &Loaded,
    meta: &mut DocMeta,
    batch: &mut WriteBatch,
) {
    // A compaction rewrites the whole doc, so a big doc waits until its tail
    // is a quarter of its snapshot (amortised O(1) per change; a 100,000-
    // change doc compacted every 256 changes wrote 290 MiB for 220 KiB), but
    // never past 16x the change count, which bounds load time. Also when the
    // raw changes alone would put the doc over its cap (a big merge from a
    // peer): what is stored then is the compact save.
    let n = inner.cfg.compact_after_changes;
    let tail_bytes = meta.size_bytes.saturating_sub(meta.snapshot_bytes);
    let due = meta.tail_changes >= n
        && (tail_bytes.saturating_mul(4) >= meta.snapshot_bytes
            || meta.tail_changes >= n.saturating_mul(16));
    if due || meta.size_bytes > inner.cfg.max_doc_bytes {
        let tail = tail_range(meta);
        let snapshot = loaded.doc.save();
        meta.size_bytes = snapshot.len() as u64;
        meta.snapshot_bytes = meta.size_bytes;
        meta.tail_changes = 0;
        batch.compact(id.as_str(), &snapshot, meta, tail);
    }
}
