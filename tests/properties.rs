//! Properties over generated inputs (proptest; a failure prints the
//! shrunk input and proptest saves its seed under `proptest-regressions/`):
//! JSON round trips through Automerge, merge patches follow RFC 7396,
//! digests are equal exactly when docs and heads are, and every conflict
//! policy picks the same winner whatever order the changes arrived in.

use std::collections::BTreeMap;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ChangeHash, ObjType, ROOT};
use mergeflow::doc::stamp::Stamp;
use mergeflow::doc::{Op, StringMode, apply_merge_patch, apply_ops, to_json};
use mergeflow::testing::sync::DocState;
use mergeflow::testing::sync::digest::Digest;
use mergeflow::workflow::def::Policy;
use proptest::prelude::*;
use serde_json::{Map, Value as Json, json};

/// JSON values: null, bools, integers, finite floats, strings, and nested
/// arrays and objects (keys may hold `/` and `~`).
fn json_value() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        (-1.0e12f64..1.0e12).prop_map(|f| json!(f)),
        "[a-z/~ é]{0,8}".prop_map(Json::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map("[a-z/~]{1,4}", inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Json>> {
    prop::collection::btree_map("[a-z/~]{1,4}", json_value(), 0..5)
        .prop_map(|m| m.into_iter().collect())
}

fn pointer(key: &str) -> String {
    format!("/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// A doc holding `obj`, written key by key with `set` ops (which, unlike a
/// merge patch, can store nulls).
fn doc_of(obj: &Map<String, Json>, strings: StringMode) -> Automerge {
    let mut doc = Automerge::new();
    let ops: Vec<Op> = obj
        .iter()
        .map(|(k, v)| Op::Set {
            path: pointer(k),
            value: v.clone(),
            kind: None,
        })
        .collect();
    let mut tx = doc.transaction();
    apply_ops(&mut tx, &ops, strings).expect("set ops apply");
    tx.commit();
    doc
}

/// RFC 7396, as the RFC's pseudocode states it.
fn rfc7396(target: &Json, patch: &Json) -> Json {
    let Json::Object(p) = patch else {
        return patch.clone();
    };
    let mut out = match target {
        Json::Object(t) => t.clone(),
        _ => Map::new(),
    };
    for (k, v) in p {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = rfc7396(out.get(k).unwrap_or(&Json::Null), v);
            out.insert(k.clone(), merged);
        }
    }
    Json::Object(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn json_round_trips_through_automerge(obj in json_object(), text in any::<bool>()) {
        let strings = if text { StringMode::Text } else { StringMode::Scalar };
        let doc = doc_of(&obj, strings);
        let back = to_json(&doc, &ROOT, ObjType::Map).unwrap();
        prop_assert_eq!(back, Json::Object(obj.clone()));
        // And through a save and load.
        let loaded = Automerge::load(&doc.save()).unwrap();
        prop_assert_eq!(to_json(&loaded, &ROOT, ObjType::Map).unwrap(), Json::Object(obj));
    }

    #[test]
    fn merge_patches_follow_rfc_7396(target in json_object(), patch in json_object(), text in any::<bool>()) {
        let strings = if text { StringMode::Text } else { StringMode::Scalar };
        let mut doc = doc_of(&target, strings);
        let patch = Json::Object(patch);
        let mut tx = doc.transaction();
        apply_merge_patch(&mut tx, &patch, strings).unwrap();
        tx.commit();
        let want = rfc7396(&Json::Object(target), &patch);
        prop_assert_eq!(to_json(&doc, &ROOT, ObjType::Map).unwrap(), want);
    }

    #[test]
    fn digests_are_equal_exactly_when_docs_and_heads_are(
        docs in prop::collection::btree_map("[a-z]{1,6}", prop::collection::vec(any::<[u8; 32]>(), 0..3), 1..30),
        change in 0usize..4,
        pick in any::<prop::sample::Index>(),
        order_seed in any::<u64>(),
    ) {
        let state = |heads: &Vec<[u8; 32]>| DocState::Live(heads.iter().map(|h| ChangeHash(*h)).collect());
        let build = |docs: &BTreeMap<String, Vec<[u8; 32]>>, seed: u64| {
            let mut entries: Vec<_> = docs.iter().collect();
            // Insertion order must not matter.
            entries.sort_by_key(|(k, _)| (seed ^ k.bytes().map(u64::from).sum::<u64>()).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut d = Digest::new(64);
            for (k, heads) in entries {
                d.set(k, &state(heads));
            }
            d
        };
        let mut other = docs.clone();
        let key = other.keys().nth(pick.index(other.len())).unwrap().clone();
        match change {
            0 => {}
            1 => { other.remove(&key); }
            2 => { other.get_mut(&key).unwrap().push([7; 32]); }
            _ => { other.insert(format!("{key}-new"), vec![[1; 32]]); }
        }
        let (a, b) = (build(&docs, 0), build(&other, order_seed));
        prop_assert_eq!(a.buckets() == b.buckets(), docs == other);
    }

    #[test]
    fn conflict_policies_pick_the_same_winner_in_any_delivery_order(
        writes in prop::collection::vec((any::<u16>(), -3i64..3, 0u8..3, prop::option::of(0u8..2)), 2..5),
        orders in prop::collection::vec(any::<u64>(), 3),
    ) {
        let base = Automerge::new();
        let mut changes = Vec::new();
        for (i, (clock, prio, version, idem)) in writes.iter().enumerate() {
            let mut doc = base.fork().with_actor(ActorId::from(vec![i as u8 + 1; 16]));
            let stamp = Stamp {
                hlc: u64::from(*clock) << 16,
                prio: *prio,
                idem: idem.map(|k| format!("key-{k}")),
                ..Stamp::default()
            };
            let mut tx = doc.transaction();
            let v = tx.put_object(ROOT, "v", ObjType::Map).unwrap();
            tx.put(&v, "version", i64::from(*version)).unwrap();
            tx.put(&v, "writer", i as i64).unwrap();
            tx.commit_with(CommitOptions::default().with_message(stamp.message("patch")));
            changes.extend(doc.get_changes(&[]));
        }
        for policy in [Policy::Timestamp, Policy::Priority, Policy::Version, Policy::Idempotent] {
            let mut winners = Vec::new();
            for seed in &orders {
                let mut order = changes.clone();
                // A delivery order from the seed.
                order.sort_by_key(|c| (c.hash().0[0] as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let mut doc = base.fork();
                for c in order {
                    doc.apply_changes([c]).unwrap();
                }
                let found = mergeflow::doc::conflict::conflicts(&doc, &|p| p == "/v").unwrap();
                let values = found.first().map(|c| c.values.clone()).unwrap_or_default();
                prop_assert_eq!(values.len(), writes.len(), "every concurrent write is a candidate");
                let winner = policy.pick(&values).map(|w| (w.value.clone(), w.actor.clone()));
                winners.push(winner);
            }
            prop_assert!(winners.windows(2).all(|w| w[0] == w[1]), "{policy:?}: {winners:?}");
        }
    }
}
