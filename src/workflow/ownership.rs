//! Effect ownership across the cluster: which node runs an effect (the
//! rendezvous owner among the live nodes running the workflow), how the
//! others wait for it and learn what became of it (the marker doc, see
//! [`super::effect::Marker`]), and this node's membership doc, through
//! which peers count it among the owners.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::def::Origin;
use super::effect::Marker;
use super::run::Run;
use super::shared::Shared;
use crate::doc::{DocId, Op, Pointer, now_ms};
use crate::runtime::Change;

/// Writes this node's membership doc: the workflows it runs, so that
/// peers count it among the owners of their effects.
pub(super) async fn announce(shared: &Arc<Shared>) {
    let names: serde_json::Map<String, Json> = shared
        .catalog()
        .plans
        .keys()
        .map(|n| (n.clone(), Json::Bool(true)))
        .collect();
    let Ok(id) = DocId::new(super::effect::member_doc(&shared.local)) else {
        return;
    };
    // Every workflow it ever ran, never removed: peers take its effect
    // markers for those (`crate::grants`), old ones included.
    let ran: Vec<(Pointer, Json)> = names
        .keys()
        .filter_map(|n| Pointer::parse(&format!("/ran/{n}")).ok())
        .map(|p| (p, Json::Bool(true)))
        .collect();
    let mut values = vec![
        (
            Pointer::parse("/workflows").expect("valid"),
            Json::Object(names),
        ),
        (
            Pointer::parse("/labels").expect("valid"),
            serde_json::to_value(&shared.labels).expect("labels serialize"),
        ),
        // New with every boot, so every boot's actor is in this doc's
        // history: peers tell which node wrote a change by it.
        (
            Pointer::parse("/actor").expect("valid"),
            Json::String(shared.docs.actor().to_hex_string()),
        ),
    ];
    values.extend(ran);
    if let Err(e) = shared.docs.write(id, Change::SetIfDifferent(values)).await {
        tracing::warn!(err = %e, "cannot write this node's workflow membership doc");
    }
}

/// The actors (hex) that `peer`'s boots wrote with, as far as its
/// membership doc's history tells (each boot writes its actor there).
async fn boots_of(shared: &Arc<Shared>, peer: &str) -> Vec<String> {
    match DocId::new(super::effect::member_doc(peer)) {
        Ok(id) => shared.docs.actors(id, None).await.unwrap_or_default(),
        Err(_) => vec![],
    }
}

/// The nodes an effect of `workflow` may run on: this one, and each
/// connected peer whose membership doc lists the workflow.
pub(super) async fn candidates(shared: &Arc<Shared>, workflow: &str) -> Vec<String> {
    let live = shared
        .live
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut out = vec![shared.local.clone()];
    for peer in live.map(|f| f()).unwrap_or_default() {
        let Ok(id) = DocId::new(super::effect::member_doc(&peer)) else {
            continue;
        };
        let ptr = Pointer::parse(&format!("/workflows/{workflow}")).expect("a valid pointer");
        if shared.docs.get(id, Some(ptr)).await.ok() == Some(Json::Bool(true)) {
            out.push(peer);
        }
    }
    out
}

/// How often a node that does not own an effect checks for its delivery
/// and for its owner's liveness.
const TURN_POLL: Duration = Duration::from_millis(200);

/// What a node waiting for an effect's owner learnt.
pub(super) enum Turn {
    /// This node executes the effect.
    Mine,
    /// Another node handled it or decided about it.
    Seen(Seen),
}

/// A marker that ends the wait for an effect (see [`Marker`]).
pub(super) enum Seen {
    /// Delivered (or skipped, its `when` false) by this node (text).
    Handled(String),
    /// Dead-lettered by `by` with `error`, under marker key `marker`.
    Dead {
        by: String,
        error: String,
        marker: String,
    },
    /// Dead-lettered, then skipped by a user on `by`.
    Skipped { by: String, marker: String },
}

/// Waits until this node owns the effect `key` of step `i` or another node
/// recorded what became of it. A node that waited
/// `workflow.effect_wait_ms` for a live owner takes the effect over (the
/// owner may have coalesced this trigger into a later state and never run
/// this key; at-least-once: the receiver sees the key twice at worst),
/// unless the owner's marker says it is retrying it: then it waits as long
/// as that node is connected.
pub(super) async fn await_turn(
    shared: &Arc<Shared>,
    origin: Origin,
    run: &mut Run,
    i: usize,
    key: &str,
) -> Turn {
    let started = Instant::now();
    let wait = Duration::from_millis(shared.cfg.effect_wait_ms);
    let mut shown: Option<String> = None;
    let step = run.steps[i].id.clone();
    loop {
        let (seen, trying) = look(shared, run, &step, key).await;
        if let Some(seen) = seen {
            return Turn::Seen(seen);
        }
        let (mine, owner, claimed) = owns_effects(shared, origin, run, trying.as_deref()).await;
        if mine {
            return Turn::Mine;
        }
        if !claimed && started.elapsed() >= wait {
            tracing::warn!(run = run.id, key, owner = ?owner, "effect not delivered by its owner in time; taking it over");
            return Turn::Mine;
        }
        if shown != owner {
            run.steps[i].output = Some(serde_json::json!({ "waiting_for": owner }));
            run.updated_ms = now_ms();
            if let Err(e) = shared.put_run(run, None).await {
                tracing::warn!(err = %e, "cannot write the run log");
            }
            shown = owner;
        }
        tokio::time::sleep(TURN_POLL).await;
    }
}

/// The markers of `run`'s (workflow, doc), by effect key.
async fn markers(shared: &Arc<Shared>, run: &Run) -> serde_json::Map<String, Json> {
    let Ok(id) = DocId::new(super::effect::marker_doc(&run.workflow, &run.doc)) else {
        return Default::default();
    };
    match shared.docs.get(id, None).await {
        Ok(Json::Object(m)) => m,
        _ => Default::default(),
    }
}

/// What the markers say about effect `key` of `run`'s step `step`: handled
/// or decided (dead, skipped) by a node, for this state or for a later
/// state of the doc (one whose history holds this run's state: another
/// node coalesced this trigger into that one, and triggers fire on state,
/// so what became of it stands for this one too). Also the node retrying
/// this key, if its marker says one is.
async fn look(
    shared: &Arc<Shared>,
    run: &Run,
    step: &str,
    key: &str,
) -> (Option<Seen>, Option<String>) {
    let markers = markers(shared, run).await;
    let seen = |m: Marker, marker: &str, later: bool| -> Option<Seen> {
        let tail = if later { " for a later state" } else { "" };
        match m {
            Marker::Handled { by, when_false } => Some(Seen::Handled(if when_false {
                format!("{by} (skipped: its when was false){tail}")
            } else {
                format!("{by}{tail}")
            })),
            Marker::Trying { .. } => None,
            Marker::Dead { by, error } => Some(Seen::Dead {
                by: format!("{by}{tail}"),
                error,
                marker: marker.to_string(),
            }),
            Marker::Skipped { by } => Some(Seen::Skipped {
                by: format!("{by}{tail}"),
                marker: marker.to_string(),
            }),
        }
    };
    let mut trying = None;
    if let Some(m) = markers.get(key).and_then(Marker::parse) {
        if let Marker::Trying { by } = &m {
            trying = Some(by.clone());
        } else {
            return (seen(m, key, false), None);
        }
    }
    let Ok(doc) = DocId::new(run.doc.as_str()) else {
        return (None, trying);
    };
    for (k, m) in markers.iter().filter(|(_, m)| m["step"] == step) {
        let Some(heads) = m["heads"].as_array() else {
            continue;
        };
        let heads: Vec<String> = heads
            .iter()
            .filter_map(|h| h.as_str().map(str::to_string))
            .collect();
        if heads != run.heads
            && let Some(m) = Marker::parse(m)
            && matches!(
                shared
                    .docs
                    .covers(doc.clone(), run.heads.clone(), heads)
                    .await,
                Ok(true)
            )
        {
            match m {
                // Someone retries the later state: wait for it like for
                // this one.
                Marker::Trying { by } => {
                    trying.get_or_insert(by);
                }
                m => return (seen(m, k, true), trying),
            }
        }
    }
    (None, trying)
}

/// Records `what` this node did or decided about effect `key` of `run` in
/// the marker doc (see [`Marker`]), so the other nodes follow it. A marker
/// already there keeps its `step` and `heads` (a decision about the key of
/// a later state). Keeps the newest [`super::effect::MAX_MARKERS`].
pub(super) async fn mark(shared: &Arc<Shared>, run: &Run, key: &str, what: Marker) {
    if run.doc.is_empty() {
        return; // scheduled: nobody waits
    }
    let marker = super::effect::marker_doc(&run.workflow, &run.doc);
    if let Ok(id) = DocId::new(marker) {
        let old = match shared.docs.get(id.clone(), None).await {
            Ok(Json::Object(old)) => old,
            _ => Default::default(),
        };
        let mut value = serde_json::json!({
            "by": shared.local,
            "at": now_ms(),
            "step": key.split_once('-').map_or("", |(_, s)| s),
            "heads": run.heads,
        });
        if let Some(was) = old.get(key) {
            for k in ["step", "heads"] {
                if let Some(v) = was.get(k) {
                    value[k] = v.clone();
                }
            }
        }
        for (k, v) in what.fields() {
            value[k.as_str()] = v;
        }
        let mut ops = vec![Op::Set {
            path: format!("/{key}"),
            value,
            kind: None,
        }];
        if !old.contains_key(key) && old.len() >= super::effect::MAX_MARKERS {
            let mut by_age: Vec<(u64, &String)> = old
                .iter()
                .map(|(k, v)| (v["at"].as_u64().unwrap_or(0), k))
                .collect();
            by_age.sort();
            let excess = old.len() + 1 - super::effect::MAX_MARKERS;
            for (_, k) in by_age.into_iter().take(excess) {
                ops.push(Op::Delete {
                    path: format!("/{k}"),
                });
            }
        }
        if let Err(e) = shared.docs.write(id, Change::Ops(ops)).await {
            tracing::warn!(err = %e, key, "effect handled, but its marker was not written; other nodes may deliver it again");
        }
    }
}

/// True if this node owns the effects of `run`'s (workflow, doc): the
/// rendezvous winner of that pair among the live nodes running the
/// workflow. Per doc, not per state: nodes may fold states differently
/// (triggers fire on state), and the owner's handling of a later state
/// stands for the earlier ones.
///
/// `trying` is the node a marker says retries the effect: while it is
/// connected it is the owner, and the third value is true (nobody takes
/// over from it).
pub(super) async fn owns_effects(
    shared: &Arc<Shared>,
    origin: Origin,
    run: &Run,
    trying: Option<&str>,
) -> (bool, Option<String>, bool) {
    // Only this node runs it: a scheduled run (started by the tick's owner),
    // a state written here that only local writes trigger.
    if run.doc.is_empty() || origin == Origin::Local {
        return (true, None, false);
    }
    let mut candidates = candidates(shared, &run.workflow).await;
    if let Some(by) = trying
        && candidates.iter().any(|c| c == by)
    {
        return (by == shared.local, Some(by.to_string()), true);
    }
    // A retry asked for here (its marker not written, or its node gone).
    if run.trigger == "retry" {
        return (true, None, false);
    }
    if origin == Origin::Remote {
        // The nodes that wrote the state are not triggered by it.
        let wrote = match DocId::new(run.doc.as_str()) {
            Ok(id) => shared.docs.actors(id, Some(run.heads.clone())).await,
            Err(e) => Err(e),
        };
        let wrote = wrote.unwrap_or_default();
        let mut writers = Vec::new();
        for c in &candidates {
            if boots_of(shared, c).await.iter().any(|a| wrote.contains(a)) {
                writers.push(c.clone());
            }
        }
        candidates.retain(|c| !writers.contains(c));
    }
    let owner = super::effect::owner(&effect_owner_key(run), &candidates).cloned();
    (
        owner.is_none() || owner.as_deref() == Some(shared.local.as_str()),
        owner,
        false,
    )
}

fn effect_owner_key(run: &Run) -> String {
    format!("{}\0{}", run.workflow, run.doc)
}
