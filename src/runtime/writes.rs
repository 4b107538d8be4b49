//! A write round's local writes: each applied to its doc under the doc's
//! lock (`local.rs`), and writes that may coalesce
//! ([`WriteOpts::coalesce`](super::WriteOpts::coalesce)) to one doc applied
//! as one change.
//!
//! Coalescing is what lets a node take a stream of small keyed writes to a
//! few docs (an MQTT bridge's readings) faster than one change each: the
//! writes that queue up while the writer thread is busy share one change,
//! one signature, one store entry and one apply on every peer, so the
//! busier the node, the bigger (and cheaper per write) its changes. Each
//! write keeps its own key (all of them are in the change's message) and its
//! own answer.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use tokio::sync::oneshot;

use super::local::{Outcome, apply, apply_coalesced};
use super::round::{PendingEvent, Round};
use super::state::{Change, Inner, WriteOp, WriteReq, WriteResult, WriteTags};
use crate::doc::cache::{Loaded, SlotRef, lock_slot};
use crate::doc::{DocError, DocId};
use crate::store::WriteBatch;
use crate::sync::Input;

/// Rounds a local write waits for its doc to be reloaded before it fails.
const MAX_CARRIED: u32 = 3;

type Reply = oneshot::Sender<Result<WriteResult, DocError>>;

/// What the round's local writes leave for after the store call.
#[derive(Default)]
pub(super) struct LocalWrites {
    /// Each write's answer, sent after the flush (errors at once).
    pub(super) results: Vec<(Reply, Result<WriteResult, DocError>)>,
    /// Changes for the sync core once the store has them.
    pub(super) local: Vec<Input>,
    /// Keyed writes' changes, for peers once this round is flushed (see
    /// `Input::Broadcast`).
    pub(super) later: Vec<Input>,
    /// Writes waiting for their doc to be reloaded: the next round's.
    pub(super) carry: Vec<WriteReq>,
    /// Whether a write that succeeded waits for the flush.
    pub(super) durable: bool,
}

/// One write, or coalescing writes to one doc.
enum Unit {
    One(WriteReq),
    Together(Vec<WriteReq>),
}

/// A coalescing write's key and change; `None` for any other write.
fn part(req: &WriteReq) -> Option<(&str, &Change)> {
    let t = &req.tags;
    if !t.coalesce || req.ack || t.lazy || t.cause.is_some() || t.req.is_some() {
        return None;
    }
    match (&t.idem, &req.op) {
        (Some(key), WriteOp::Change(c @ (Change::Patch(_) | Change::Ops(_)))) => Some((key, c)),
        _ => None,
    }
}

/// The round's writes in order, coalescing ones to one doc (by the same
/// token) together at the place of the first. Writes in one round were
/// queued concurrently, so no order among them is promised to anyone.
fn units(reqs: Vec<WriteReq>) -> Vec<Unit> {
    let mut out = Vec::with_capacity(reqs.len());
    let mut open: HashMap<(DocId, Option<String>), usize> = HashMap::new();
    for req in reqs {
        if part(&req).is_none() {
            out.push(Unit::One(req));
            continue;
        }
        let key = (req.id.clone(), req.tags.by.clone());
        match open.get(&key).and_then(|&i| match &mut out[i] {
            Unit::Together(v) => Some(v),
            Unit::One(_) => None,
        }) {
            Some(v) => v.push(req),
            None => {
                open.insert(key, out.len());
                out.push(Unit::Together(vec![req]));
            }
        }
    }
    out
}

/// Runs `f` on doc `id`, loaded, under its lock. A panic (in a library
/// user's closure, or in Automerge) costs this write only, not the writer
/// thread: `f` adds to the batch only once its change succeeded.
fn apply_locked<X>(
    inner: &Inner,
    id: &DocId,
    batch: &mut WriteBatch,
    f: impl FnOnce(&mut Loaded, &mut WriteBatch) -> Result<(Outcome, X), DocError>,
) -> (Result<(Outcome, X), DocError>, SlotRef) {
    let slot = inner.cache.entry(id);
    let mut guard = lock_slot(&slot);
    let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
        inner
            .cache
            .ensure_loaded(id, &mut guard)
            .and_then(|loaded| f(loaded, batch))
    }));
    let result = applied.unwrap_or_else(|_| {
        Err(DocError::Internal(format!(
            "panic while writing doc {:?}",
            id.as_str()
        )))
    });
    if let Some(loaded) = guard.as_ref() {
        inner.cache.note_size(id, loaded);
    }
    if let Ok(((_, _, _, Some(_)), _)) = &result {
        // Before the slot is let go (see `UrlIndex`).
        inner.urls.add([id]);
    }
    drop(guard);
    (result, slot)
}

impl LocalWrites {
    /// Applies the round's local writes, in order.
    pub(super) fn write_all(
        &mut self,
        inner: &Inner,
        round: &mut Round,
        reqs: Vec<WriteReq>,
        syncing: bool,
    ) {
        for unit in units(reqs) {
            match unit {
                Unit::One(req) => self.write_one(inner, round, req, syncing),
                Unit::Together(reqs) => self.write_together(inner, round, reqs, syncing),
            }
        }
    }

    fn write_one(&mut self, inner: &Inner, round: &mut Round, req: WriteReq, syncing: bool) {
        if round.is_poisoned(&req.id) {
            // Remote input (or an earlier write) left the doc suspect; it is
            // reloaded when this round ends. The write waits for the next
            // round rather than fail, a few times: a peer that sends a bad
            // change every round must not keep a local write waiting.
            if req.carried < MAX_CARRIED {
                let mut req = req;
                req.carried += 1;
                self.carry.push(req);
                return;
            }
            let e = DocError::Internal(format!(
                "doc {:?} failed earlier in this write round; retry",
                req.id.as_str()
            ));
            self.results.push((req.reply, Err(e)));
            return;
        }
        let WriteReq {
            id,
            op,
            ack,
            tags,
            reply,
            ..
        } = req;
        if let WriteOp::Merge { data, sigs } = &op {
            let merged = round.merge_saved(&id, data, sigs);
            if let (true, Ok((_, Some(state)))) = (syncing, &merged) {
                self.local.push(Input::LocalMerge {
                    doc: id.to_string(),
                    state: state.clone(),
                });
            }
            let merged = merged.map(|(r, _)| r);
            self.durable |= merged.is_ok();
            self.results.push((reply, merged));
            return;
        }
        let (result, slot) = apply_locked(inner, &id, &mut round.batch, |loaded, batch| {
            apply(inner, &id, loaded, op, &tags, batch).map(|o| (o, ()))
        });
        // After an internal error the doc in memory may hold a change the
        // store will never get: reload it, once this round's batch is stored.
        if matches!(result, Err(DocError::Internal(_))) {
            round.poison(&id, slot.clone());
        }
        let result =
            result.map(|(outcome, ())| self.record(round, &id, slot, outcome, ack, &tags, syncing));
        self.results.push((reply, result));
    }

    /// Applies coalescing writes to one doc as one change; when that fails,
    /// each alone, so that each gets its own answer.
    fn write_together(
        &mut self,
        inner: &Inner,
        round: &mut Round,
        reqs: Vec<WriteReq>,
        syncing: bool,
    ) {
        let Some(first) = reqs.first() else { return };
        let parts: Option<Vec<(&str, &Change)>> = reqs.iter().map(part).collect();
        let parts = match parts {
            Some(p) if p.len() > 1 && !round.is_poisoned(&first.id) => p,
            _ => return self.each(inner, round, reqs, syncing),
        };
        let id = first.id.clone();
        let by = first.tags.by.as_deref();
        let (result, slot) = apply_locked(inner, &id, &mut round.batch, |loaded, batch| {
            apply_coalesced(inner, &id, loaded, &parts, by, batch)
        });
        match result {
            Ok((outcome, fresh)) => {
                let tags = WriteTags {
                    idem: first.tags.idem.clone(),
                    by: first.tags.by.clone(),
                    ..WriteTags::default()
                };
                let r = self.record(round, &id, slot, outcome, false, &tags, syncing);
                for (req, fresh) in reqs.into_iter().zip(fresh) {
                    let mine = WriteResult {
                        changed: fresh && r.changed,
                        ..r.clone()
                    };
                    self.results.push((req.reply, Ok(mine)));
                }
            }
            Err(e) => {
                tracing::debug!(doc = %id, err = %e, writes = reqs.len(), "coalesced writes failed together; each is tried alone");
                if matches!(e, DocError::Internal(_)) {
                    round.poison(&id, slot);
                }
                // Alone from here on, in this round or (carried while the
                // doc is reloaded) the next: one write that fails inside
                // Automerge must not fail the writes it shared a change with.
                let mut reqs = reqs;
                for req in &mut reqs {
                    req.tags.coalesce = false;
                }
                self.each(inner, round, reqs, syncing);
            }
        }
    }

    fn each(&mut self, inner: &Inner, round: &mut Round, reqs: Vec<WriteReq>, syncing: bool) {
        for req in reqs {
            self.write_one(inner, round, req, syncing);
        }
    }

    /// Notes a write's change in the round (feed event, touched slot, live
    /// count) and for the sync core, and returns its result.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        round: &mut Round,
        id: &DocId,
        slot: SlotRef,
        (r, delta, input, touch): Outcome,
        ack: bool,
        tags: &WriteTags,
        syncing: bool,
    ) -> WriteResult {
        if let Some(touch) = touch {
            round.events.push(PendingEvent {
                doc: id.clone(),
                touch,
                after: r.heads.clone(),
                from: None,
                confirm: false,
                cause: tags.cause.clone(),
            });
        }
        if r.changed {
            round.touched.push(slot);
        }
        round.live_delta += delta;
        if let Some(mut input) = input {
            if let Input::LocalChange { ack: a, .. } = &mut input {
                *a = ack;
            }
            if tags.idem.is_some() {
                // Sent once durable (see `Input::Broadcast`); the digest
                // takes its state now. Without the sync core too: the
                // flush also lets go of the doc (see `Unflushed`).
                if let Input::LocalChange {
                    doc,
                    changes,
                    sigs,
                    ack,
                    ..
                } = &mut input
                {
                    self.later.push(Input::Broadcast {
                        doc: doc.clone(),
                        changes: std::mem::take(changes),
                        sigs: std::mem::take(sigs),
                        ack: *ack,
                    });
                }
            }
            if syncing {
                self.local.push(input);
            }
        }
        self.durable |= !tags.lazy;
        r
    }
}
