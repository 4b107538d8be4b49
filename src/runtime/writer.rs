//! The writer thread: applies queued writes and remote input in rounds.
//!
//! It takes every message waiting in its queue (up to `write_batch`, and
//! at most `cache_docs / 2` remote inputs), applies
//! each local write to its document under the document's lock (`local.rs`)
//! and remote input through the sync core (`host.rs`, `round.rs`), collects
//! the changes into one [`WriteBatch`], applies that to sled (crash-safe per
//! doc, see [`WriteBatch`]) and hands the writers' replies to the
//! group-commit thread, which answers them after its flush. One thread means
//! no per-write thread hand-off and one store batch per round; the Automerge
//! work per write is tens of microseconds, so one core keeps up with what
//! the HTTP layer can deliver.
//!
//! A local change is handed to the sync core, and so may be sent to peers,
//! before the round's flush completes: that saves the flush time on the
//! propagation path, and is safe because every boot writes with a fresh actor
//! id, so a change lost here in a crash cannot be forked by a different change
//! with the same actor and sequence number; a peer that holds it gives it
//! back through sync.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::clients::{ClientMsg, ClientRound, Clients, Outgoing};
use super::host::SyncRuntime;
use super::round::{PendingEvent, Round, Touch};
use super::state::{Inner, WriteReq};
use super::unflushed::Unflushed;
use super::writes::LocalWrites;
use crate::doc::DocError;
use crate::doc::cache::lock_slot;
use crate::feed::ChangeEvent;
use crate::store::{Ack, StoreError};
use crate::sync::{Input, Output};

/// A message to the writer thread.
pub(super) enum WriterMsg {
    Write(WriteReq),
    /// Input for the sync core (ignored when the node does not sync), e.g.
    /// the messages of one network frame.
    Sync(Vec<Input>),
    /// An automerge-repo client connection's message.
    Client(ClientMsg),
    /// Finish the writes queued before this and exit.
    Stop,
}

/// The writer thread's loop. Returns when told to stop or when every sender is gone.
pub(super) fn run(
    inner: Arc<Inner>,
    mut rx: mpsc::Receiver<WriterMsg>,
    mut sync: Option<SyncRuntime>,
) {
    let max = inner.cfg.write_batch.max(1);
    // Remote input per round is bounded too: every doc a round changes stays
    // loaded until its batch is stored, so a catch-up's frames (a thousand
    // pushed docs each) taken 256 at a time held tens of thousands of docs in
    // memory at once, however small the doc cache.
    let max_inputs = (inner.cfg.cache_docs / 2).max(1);
    let mut stop = false;
    // Writes to a doc that remote input left suspect in the last round: they
    // go first in the next one, once the doc has been reloaded.
    let mut carried: Vec<WriteReq> = Vec::new();
    // Remote input past the last round's bound: first in the next.
    let mut carried_inputs: Vec<Input> = Vec::new();
    let mut clients = Clients::default();
    let mut unflushed = Unflushed::default();
    loop {
        let mut msgs: Vec<WriterMsg> = carried.drain(..).map(WriterMsg::Write).collect();
        let mut room = max_inputs;
        if !carried_inputs.is_empty() {
            admit(
                WriterMsg::Sync(std::mem::take(&mut carried_inputs)),
                &mut msgs,
                &mut room,
                &mut carried_inputs,
            );
        }
        if !stop {
            if msgs.is_empty() {
                match rx.blocking_recv() {
                    Some(WriterMsg::Stop) | None => break,
                    Some(m) => admit(m, &mut msgs, &mut room, &mut carried_inputs),
                }
            }
            while msgs.len() < max && room > 0 {
                match rx.try_recv() {
                    Ok(WriterMsg::Stop) => {
                        stop = true;
                        break;
                    }
                    Ok(m) => admit(m, &mut msgs, &mut room, &mut carried_inputs),
                    Err(_) => break,
                }
            }
        }
        if msgs.is_empty() {
            break;
        }
        carried = write_round(&inner, msgs, sync.as_mut(), &mut clients, &mut unflushed);
        // The round's docs are released: back under the cache's bounds now,
        // not after as many more misses as the round held docs.
        inner.cache.trim();
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
        if stop && carried.is_empty() && carried_inputs.is_empty() {
            break;
        }
    }
}

/// Adds `msg` to the round's messages; remote input only while the round
/// has `room` for it, the rest into `over` (empty when called) for the next.
fn admit(msg: WriterMsg, msgs: &mut Vec<WriterMsg>, room: &mut usize, over: &mut Vec<Input>) {
    let WriterMsg::Sync(mut inputs) = msg else {
        msgs.push(msg);
        return;
    };
    if inputs.len() > *room {
        *over = inputs.split_off(*room);
    }
    *room -= inputs.len();
    msgs.push(WriterMsg::Sync(inputs));
}

/// Applies one round: local writes and remote input in memory, one sled batch,
/// then the flush thread. Returns the writes to carry into the next round.
fn write_round(
    inner: &Inner,
    msgs: Vec<WriterMsg>,
    mut sync: Option<&mut SyncRuntime>,
    clients: &mut Clients,
    unflushed: &mut Unflushed,
) -> Vec<WriteReq> {
    let leftovers = sync
        .as_deref_mut()
        .map(|s| std::mem::take(&mut s.leftover_sigs))
        .unwrap_or_default();
    let mut round = Round::new(inner, leftovers);
    round.unflushed = std::mem::take(unflushed);
    // Saves the compaction thread made since the last round.
    for done in inner.compactor.take_done() {
        if let Some(slot) = done.store(&mut round.batch, &inner.cache) {
            round.touched.push(slot);
        }
    }
    // Remote input first, all of the round's together: fast-path changes of
    // one doc from one peer then cost one Automerge apply, however many
    // frames brought them (a receiver that falls behind catches up in
    // fewer, bigger applies instead of slowing down further).
    let mut inputs = Vec::new();
    let mut client_msgs = Vec::new();
    let mut reqs = Vec::with_capacity(msgs.len());
    for msg in msgs {
        match msg {
            WriterMsg::Write(req) => reqs.push(req),
            WriterMsg::Sync(i) => inputs.extend(i),
            WriterMsg::Client(m) => client_msgs.push(m),
            WriterMsg::Stop => {}
        }
    }
    if let Some(sync) = sync.as_deref_mut()
        && !inputs.is_empty()
    {
        round.sigs.preverify(&inputs);
        sync.handle_all(inputs, &mut round);
    }
    // Keyed writes of earlier rounds, durable now: to peers.
    let flushed = std::mem::take(&mut *inner.flushed.lock().unwrap_or_else(|p| p.into_inner()));
    for input in flushed {
        if let Input::Broadcast { doc, .. } = &input {
            round.unflushed.release(doc);
        }
        if let Some(sync) = sync.as_deref_mut() {
            sync.handle(input, &mut round);
        }
    }
    // Local changes and merges (and clients' changes) go to the sync core
    // (and so to peers) only once the store has them: if storing fails, the
    // doc is reloaded without them and its next change reuses their actor
    // and sequence numbers, which peers holding the first one would reject
    // as a duplicate sequence. (Any sync the core starts sends what the doc
    // holds, so a merge handled before the store call could carry this
    // round's changes.)
    let mut writes = LocalWrites::default();
    let mut client_work = ClientRound::default();
    if !client_msgs.is_empty() {
        clients.handle(client_msgs, &mut round, &mut client_work, &mut writes.local);
        // A client's changes are answered only once flushed.
        writes.durable |= client_work.wrote;
    }
    let clients_wait = client_work.wrote;
    writes.write_all(inner, &mut round, reqs, sync.is_some());
    let LocalWrites {
        results,
        local,
        later,
        carry,
        mut durable,
    } = writes;
    let batch = std::mem::take(&mut round.batch);
    let applied = if batch.is_empty() {
        Ok(())
    } else {
        inner.store.apply(batch)
    };
    if applied.is_ok() {
        round.unflushed.hold(&later);
        inner.compactor.submit(inner.wake.get().cloned());
    } else {
        inner.compactor.discard();
    }
    if let (Some(sync), Ok(())) = (sync.as_deref_mut(), &applied) {
        for input in local {
            sync.handle(input, &mut round);
        }
        debug_assert!(round.batch.is_empty(), "local changes store nothing more");
    }
    let mut to_clients = match &applied {
        Ok(()) if !clients.is_empty() => clients.outgoing(&mut round, client_work),
        Ok(()) => Outgoing::default(),
        Err(_) => {
            clients.failed(client_work);
            Outgoing::default()
        }
    };
    let clients_later = to_clients.held_back(&round.unflushed);
    let Round {
        touched,
        live_delta,
        poisoned,
        events,
        sigs,
        unflushed: held,
        deferred,
        ..
    } = round;
    *unflushed = held;
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
                            .map(|(id, m)| (id, super::state::stored_state(&m))),
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
        return carry;
    }
    let mut acks: Vec<Ack> = Vec::with_capacity(results.len() + 2);
    inner.live_docs.fetch_add(live_delta, Ordering::Relaxed);
    // After the live count: readers that see the batch's docs see them
    // counted as soon as this round can tell them (the scan below locks
    // slots).
    if let Some(s) = sync.as_deref_mut() {
        s.leftover_sigs = sigs.into_leftovers(inner);
    }
    if !to_clients.is_empty() {
        if clients_wait {
            acks.push(Box::new(move |flushed| match flushed {
                Ok(()) => to_clients.send(),
                Err(_) => to_clients.fail(),
            }));
        } else {
            // Changes from elsewhere go to clients as they go to peers:
            // once the store has them, before the flush.
            to_clients.send();
        }
    }
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
    // Messages that may carry keyed changes not durable before this
    // round's flush (see `Unflushed`): after it. A failed flush drops them
    // (a peer's session starts over; a client's connection closes).
    if !deferred.is_empty() || !clients_later.is_empty() {
        durable = true;
        let out = sync.as_ref().map(|s| s.out.clone());
        acks.push(Box::new(move |flushed| {
            if flushed.is_err() {
                clients_later.fail();
                return;
            }
            clients_later.send();
            if let Some(out) = out {
                for o in deferred {
                    let _ = out.try_send(o);
                }
            }
        }));
    }
    if !later.is_empty() && applied.is_ok() {
        durable = true;
        let (queue, wake) = (inner.flushed.clone(), inner.wake.get().cloned());
        acks.push(Box::new(move |flushed| {
            if flushed.is_err() {
                // Not on disk, maybe never: not sent, and its docs stay
                // held (the store refuses everything from now on).
                return;
            }
            queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(later);
            if let Some(wake) = wake {
                wake();
            }
        }));
    }
    // Merged remote changes need a flush too, even with nobody waiting on it.
    if !acks.is_empty() || !touched.is_empty() {
        inner.commit.submit_blocking(acks, durable);
    }
    carry
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
