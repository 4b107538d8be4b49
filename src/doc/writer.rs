//! The writer thread: applies queued writes in batches.
//!
//! It takes every write waiting in its queue (up to `write_batch`), applies each
//! to its document under the document's lock, collects the changes into one
//! [`WriteBatch`], applies that to sled atomically and hands the writers'
//! replies to the group-commit thread, which answers them after its flush. One
//! thread means no per-write thread hand-off and one sled batch per round; the
//! Automerge work per write is tens of microseconds, so one core keeps up with
//! what the HTTP layer can deliver.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ChangeHash, ROOT, ReadDoc};
use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, oneshot};

use super::json::{Slot, write_json};
use super::ops::apply_ops;
use super::patch::apply_merge_patch;
use super::service::{Change, Inner, Loaded, SlotRef, WriteResult, live_meta, lock_slot, now_ms};
use super::{DocError, DocId};
use crate::store::{Ack, DocMeta, StoreError, WriteBatch};

/// A message to the writer thread.
pub(super) enum WriterMsg {
    Write(WriteReq),
    /// Finish the writes queued before this and exit.
    Stop,
}

/// One write and where to send its result.
pub(super) struct WriteReq {
    pub(super) id: DocId,
    pub(super) op: WriteOp,
    pub(super) reply: oneshot::Sender<Result<WriteResult, DocError>>,
}

/// What a write does.
pub(super) enum WriteOp {
    /// Create a new document with these root keys.
    Create(Map<String, Json>),
    /// Change a document, creating it if absent.
    Change(Change),
    /// Delete a document, leaving a tombstone.
    Delete,
}

/// The writer thread's loop. Returns when told to stop or when every sender is gone.
pub(super) fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriterMsg>) {
    let max = inner.cfg.write_batch.max(1);
    let mut stop = false;
    while !stop {
        let mut reqs = Vec::new();
        match rx.blocking_recv() {
            Some(WriterMsg::Write(r)) => reqs.push(r),
            Some(WriterMsg::Stop) | None => break,
        }
        while reqs.len() < max {
            match rx.try_recv() {
                Ok(WriterMsg::Write(r)) => reqs.push(r),
                Ok(WriterMsg::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        write_round(&inner, reqs);
    }
}

/// Applies one round of writes: memory, one sled batch, then the flush thread.
fn write_round(inner: &Inner, reqs: Vec<WriteReq>) {
    let mut batch = WriteBatch::default();
    let mut touched: Vec<SlotRef> = Vec::new();
    let mut live_delta = 0i64;
    let mut results = Vec::with_capacity(reqs.len());
    for req in reqs {
        let slot = inner.entry(&req.id);
        let result = {
            let mut guard = lock_slot(&slot);
            // A panic (in a library user's closure, or in Automerge) must cost
            // this write only, not the writer thread. The batch is only touched
            // after the change succeeded, so it holds nothing of this write.
            let applied = std::panic::catch_unwind(AssertUnwindSafe(|| {
                inner
                    .ensure_loaded(&req.id, &mut guard)
                    .and_then(|loaded| apply(inner, &req.id, loaded, req.op, &mut batch))
            }));
            let result = applied.unwrap_or_else(|_| {
                Err(DocError::Internal(format!(
                    "panic while writing doc {:?}",
                    req.id.as_str()
                )))
            });
            // After an internal error the doc in memory may hold a change the
            // store will never get: reload it on next use.
            if matches!(result, Err(DocError::Internal(_))) {
                *guard = None;
            }
            if let Some(loaded) = guard.as_ref() {
                inner.note_size(&req.id, loaded);
            }
            result
        };
        let result = result.map(|(r, delta)| {
            if r.changed {
                touched.push(slot);
            }
            live_delta += delta;
            r
        });
        results.push((req.reply, result));
    }
    if !batch.is_empty()
        && let Err(e) = inner.store.apply(batch)
    {
        // Nothing of the batch is stored: drop the docs it touched from memory.
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
    let mut acks: Vec<Ack> = Vec::with_capacity(results.len());
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
    if !acks.is_empty() {
        inner.commit.submit_blocking(acks);
    }
}

/// Applies one write to its loaded doc and adds what to store to `batch`.
/// Returns the result and the change in the number of live docs.
fn apply(
    inner: &Inner,
    id: &DocId,
    loaded: &mut Loaded,
    op: WriteOp,
    batch: &mut WriteBatch,
) -> Result<(WriteResult, i64), DocError> {
    let strings = inner.cfg.strings;
    let deleted = |m: &Option<DocMeta>| m.as_ref().is_some_and(|m| m.deleted_at_ms.is_some());
    match op {
        WriteOp::Create(map) => {
            if deleted(&loaded.meta) {
                return Err(DocError::Deleted(id.to_string()));
            }
            if loaded.meta.is_some() {
                return Err(DocError::AlreadyExists(id.to_string()));
            }
            commit(inner, id, loaded, "create", batch, |tx| {
                for (k, v) in &map {
                    write_json(tx, &ROOT, k.as_str().into(), Slot::Put, v, strings)?;
                }
                Ok(())
            })
        }
        WriteOp::Change(change) => {
            if deleted(&loaded.meta) {
                return Err(DocError::Deleted(id.to_string()));
            }
            match change {
                Change::Patch(p) => commit(inner, id, loaded, "patch", batch, |tx| {
                    apply_merge_patch(tx, &p, strings)
                }),
                Change::Ops(ops) => commit(inner, id, loaded, "ops", batch, |tx| {
                    apply_ops(tx, &ops, strings)
                }),
                Change::Closure(f) => commit(inner, id, loaded, "change", batch, |tx| Ok(f(tx)?)),
            }
        }
        WriteOp::Delete => {
            let old = live_meta(id, loaded)?.clone();
            let mut meta = old.clone();
            meta.deleted_at_ms = Some(now_ms());
            meta.size_bytes = 0;
            meta.tail_changes = 0;
            batch.tombstone(id.as_str(), &meta, tail_range(&old));
            loaded.doc = super::service::new_doc(&inner.actor);
            loaded.meta = Some(meta.clone());
            let result = WriteResult {
                id: id.clone(),
                heads: meta.heads,
                changed: true,
            };
            Ok((result, -1))
        }
    }
}

/// Sequence numbers of a doc's stored change tail.
fn tail_range(meta: &DocMeta) -> std::ops::Range<u64> {
    meta.next_seq.saturating_sub(meta.tail_changes)..meta.next_seq
}

/// Runs `f` in a transaction on `loaded`; on success adds the change (and a
/// compaction when due) to `batch`. On any error the doc is left as it was.
fn commit<F>(
    inner: &Inner,
    id: &DocId,
    loaded: &mut Loaded,
    message: &str,
    batch: &mut WriteBatch,
    f: F,
) -> Result<(WriteResult, i64), DocError>
where
    F: FnOnce(&mut Transaction<'_>) -> Result<(), DocError>,
{
    let creating = loaded.meta.is_none();
    let before: Vec<ChangeHash> = loaded.doc.get_heads();
    let mut tx = loaded.doc.transaction();
    if let Err(e) = f(&mut tx) {
        tx.rollback();
        return Err(e);
    }
    if tx.pending_ops() == 0 && !creating {
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
        return Ok((result, 0));
    }
    let now = now_ms();
    let opts = || {
        CommitOptions::default()
            .with_message(message)
            .with_time((now / 1000) as i64)
    };
    let hash = match tx.commit_with(opts()) {
        (Some(h), _) => h,
        // A create with no keys still gets a change, so the doc has heads.
        (None, _) => loaded.doc.empty_commit(opts()),
    };
    let change = loaded
        .doc
        .get_change_by_hash(&hash)
        .ok_or_else(|| DocError::Internal("committed change is missing".into()))?;
    let bytes = change.raw_bytes();
    let size = bytes.len() as u64;
    let mut meta = loaded.meta.clone().unwrap_or(DocMeta {
        heads: vec![],
        size_bytes: 0,
        tail_changes: 0,
        next_seq: 0,
        created_at_ms: now,
        updated_at_ms: now,
        deleted_at_ms: None,
    });
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
        // (fork_at replays the history: slow for big docs, but only on this error.)
        let mut doc = loaded.doc.fork_at(&before).map_err(|fe| {
            DocError::Internal(format!("cannot undo a change over a size cap: {fe}"))
        })?;
        doc.set_actor(inner.actor.clone());
        loaded.doc = doc;
        return Err(e);
    }
    let seq = meta.next_seq;
    meta.next_seq += 1;
    meta.tail_changes += 1;
    meta.size_bytes += size;
    meta.updated_at_ms = now;
    meta.heads = loaded
        .doc
        .get_heads()
        .iter()
        .map(|h| h.to_string())
        .collect();
    batch.append_change(id.as_str(), seq, bytes, &meta);
    if meta.tail_changes >= cfg.compact_after_changes {
        let tail = tail_range(&meta);
        let snapshot = loaded.doc.save();
        meta.size_bytes = snapshot.len() as u64;
        meta.tail_changes = 0;
        batch.compact(id.as_str(), &snapshot, &meta, tail);
    }
    let result = WriteResult {
        id: id.clone(),
        heads: meta.heads.clone(),
        changed: true,
    };
    loaded.meta = Some(meta);
    Ok((result, i64::from(creating)))
}
