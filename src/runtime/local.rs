//! A local write on the writer thread: the trial run and genesis of a create,
//! the change applied in an Automerge transaction under the doc's lock, the
//! caps (change and doc size, depth) checked, and the idempotency key
//! honoured.

use std::sync::atomic::Ordering;

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{Automerge, ChangeHash, ReadDoc};

use super::persist::{changed_paths, forget_side_data, patch_log, roll_back, store_changes};
use super::round::Touch;
use super::state::{Change, Inner, WriteOp, WriteResult, WriteTags};

use crate::doc::cache::{Loaded, live_meta, new_doc};
use crate::doc::container::Creator;
use crate::doc::json::{check_write_depth, json_at, json_depth};
use crate::doc::ops::apply_ops_with;
use crate::doc::patch::{apply_merge_patch_with, create_root};
use crate::doc::{DocError, DocId, now_ms};
use crate::store::{DocMeta, WriteBatch};
use crate::sync::{DocState, Input};

/// What a local write did: its result, the change in the number of live
/// docs, what to tell the sync core, and what to tell the change feed.
pub(super) type Outcome = (WriteResult, i64, Option<Input>, Option<Touch>);

/// Applies one write to its loaded doc and adds what to store to `batch`.
pub(super) fn apply(
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
    // The network's rules bind this node too: a write its peers would
    // refuse is refused here, before any change is made.
    inner
        .policy
        .get()
        .may_write(&inner.origin, id.as_str())
        .map_err(DocError::Forbidden)?;
    inner.check_holds(id)?;
    let stamp = crate::doc::stamp::Stamp {
        hlc: inner.clock.tick(now_ms()),
        prio: inner.cfg.priority,
        idem: tags.idem.clone(),
        req: tags.req.clone(),
        by: tags.by.clone(),
        also: Vec::new(),
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
                &|| message("create"),
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
                    &|| message("patch"),
                    batch,
                    true,
                    |tx, c| apply_merge_patch_with(tx, &p, strings, c, max_depth),
                ),
                Change::Ops(ops) => commit(
                    inner,
                    id,
                    loaded,
                    &|| message("ops"),
                    batch,
                    true,
                    |tx, c| apply_ops_with(tx, &ops, strings, c, max_depth),
                ),
                Change::SetIfDifferent(values) => commit(
                    inner,
                    id,
                    loaded,
                    &|| message("set"),
                    batch,
                    true,
                    |tx, c| {
                        for (ptr, value) in &values {
                            if json_at(tx, ptr).ok().as_ref() == Some(value) {
                                continue;
                            }
                            let op = crate::doc::Op::Set {
                                path: ptr.as_str().to_string(),
                                value: value.clone(),
                                kind: None,
                            };
                            apply_ops_with(tx, std::slice::from_ref(&op), strings, c, max_depth)?;
                        }
                        Ok(())
                    },
                ),
                Change::Closure(f) => {
                    // A closure runs once: the containers it makes are its own.
                    let mut f = Some(f);
                    commit(
                        inner,
                        id,
                        loaded,
                        &|| message("change"),
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
        WriteOp::Merge { .. } => Err(DocError::Internal("a merge reached the write path".into())),
        WriteOp::Delete => {
            let old = live_meta(id, loaded)?.clone();
            let mut meta = old.clone();
            meta.deleted_at_ms = Some(now_ms());
            meta.size_bytes = 0;
            meta.snapshot_bytes = 0;
            meta.tail_changes = 0;
            batch.tombstone(id.as_str(), &meta, old.tail_range());
            forget_side_data(inner, batch, id);
            // Signed like a change: peers take a delete only from a node
            // that may write the doc.
            super::sigs::sign_tombstone(inner, batch, id.as_str());
            loaded.doc = new_doc(&inner.actor);
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

/// Applies keyed writes that may share a change (see
/// `WriteOpts::coalesce`) as one change: `parts` are each write's key and
/// change, in the order they came. A write whose key the doc's history
/// holds, or an earlier part's, is skipped. Returns the outcome and, per
/// part, whether it was applied. Any part failing fails them all, leaving
/// the doc as it was (the caller then tries each alone).
pub(super) fn apply_coalesced(
    inner: &Inner,
    id: &DocId,
    loaded: &mut Loaded,
    parts: &[(&str, &Change)],
    by: Option<&str>,
    batch: &mut WriteBatch,
) -> Result<(Outcome, Vec<bool>), DocError> {
    if loaded
        .meta
        .as_ref()
        .is_some_and(|m| m.deleted_at_ms.is_some())
    {
        return Err(DocError::Deleted(id.to_string()));
    }
    let mut seen = std::collections::HashSet::new();
    let fresh: Vec<bool> = parts
        .iter()
        .map(|(key, _)| {
            seen.insert(*key)
                && (loaded.meta.is_none() || loaded.idem.lookup(&loaded.doc, key).is_none())
        })
        .collect();
    let mut keys = parts
        .iter()
        .zip(&fresh)
        .filter(|(_, f)| **f)
        .map(|((k, _), _)| k.to_string());
    let Some(first) = keys.next() else {
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
        return Ok(((result, 0, None, None), fresh));
    };
    inner
        .policy
        .get()
        .may_write(&inner.origin, id.as_str())
        .map_err(DocError::Forbidden)?;
    inner.check_holds(id)?;
    let also: Vec<String> = keys.collect();
    let (hlc, prio) = (inner.clock.tick(now_ms()), inner.cfg.priority);
    // Where each write's ops start in the change (of the run that commits).
    let starts = std::cell::RefCell::new(Vec::with_capacity(parts.len()));
    let message = || {
        let stamp = crate::doc::stamp::Stamp {
            hlc,
            prio,
            idem: Some(first.clone()),
            also: also
                .iter()
                .cloned()
                .zip(starts.borrow().iter().skip(1).copied())
                .collect(),
            req: None,
            by: by.map(str::to_string),
        };
        stamp.message("ops")
    };
    let (strings, max_depth) = (inner.cfg.strings, inner.cfg.max_depth);
    let applied = parts.iter().zip(&fresh).filter(|(_, f)| **f);
    let outcome = commit(inner, id, loaded, &message, batch, true, |tx, c| {
        starts.borrow_mut().clear();
        for ((_, change), _) in applied.clone() {
            starts.borrow_mut().push(tx.pending_ops() as u64);
            match change {
                Change::Patch(p) => apply_merge_patch_with(tx, p, strings, c, max_depth)?,
                Change::Ops(ops) => apply_ops_with(tx, ops, strings, c, max_depth)?,
                _ => {
                    return Err(DocError::Internal(
                        "only patches and ops are coalesced".into(),
                    ));
                }
            }
        }
        Ok(())
    })?;
    Ok((outcome, fresh))
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
    loaded: &mut Loaded,
    key: &str,
    req: Option<&str>,
) -> Result<Option<WriteResult>, DocError> {
    if loaded.meta.is_none() {
        return Ok(None);
    }
    let Some(earlier_req) = loaded.idem.lookup(&loaded.doc, key) else {
        return Ok(None);
    };
    if let (Some(then), Some(now)) = (earlier_req.as_deref(), req)
        && then != now
    {
        return Err(DocError::IdempotencyKeyReused {
            doc: id.to_string(),
            key: key.to_string(),
        });
    }
    let heads = loaded
        .meta
        .as_ref()
        .map(|m| m.heads.clone())
        .unwrap_or_default();
    Ok(Some(WriteResult {
        id: id.clone(),
        heads,
        changed: false,
    }))
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
    message: &dyn Fn() -> String,
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
    let message = message();
    let opts = || {
        CommitOptions::default()
            .with_message(message.clone())
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
    // Signed with this node's identity, stored before the changes.
    let mut sigs = Vec::with_capacity(geneses.len() + 1);
    for h in geneses.iter().map(|g| g.hash()).chain([hash]) {
        let sig = inner
            .signer
            .as_ref()
            .map(|s| s.sign(id.as_str(), &h.0).to_bytes().to_vec())
            .unwrap_or_default();
        if !sig.is_empty() {
            batch.put_sig(id.as_str(), &h.0, &sig);
        }
        sigs.push(sig);
    }
    let all = geneses.iter().map(|g| g.raw_bytes()).chain([bytes]);
    let signed = sigs.iter().all(|s| !s.is_empty());
    store_changes(
        inner,
        batch,
        id,
        &mut meta,
        loaded,
        now,
        all.clone(),
        signed,
    );
    inner.changes.local.fetch_add(1, Ordering::Relaxed);
    let input = Input::LocalChange {
        doc: id.to_string(),
        changes: all.map(<[u8]>::to_vec).collect(),
        sigs,
        state: DocState::Live(loaded.doc.get_heads()),
        ack: false, // set by the caller, which knows the request
    };
    let result = WriteResult {
        id: id.clone(),
        heads: meta.heads.clone(),
        changed: true,
    };
    loaded.meta = Some(meta);
    let (mut paths, truncated) = changed_paths(&loaded.doc, &mut log);
    if !geneses.is_empty() {
        paths.extend(crate::doc::container::genesis_paths(&loaded.doc, &geneses));
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
