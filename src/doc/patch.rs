//! JSON merge patch (RFC 7396) applied to an Automerge document.
//!
//! Semantics follow the RFC: `null` deletes a key, an object merges recursively,
//! anything else replaces. Two refinements keep CRDT merges useful:
//! - a value equal to what is stored writes nothing, so re-sending a patch is a
//!   no-op and does not create conflicts with concurrent writers;
//! - a string written over a text object updates it with a minimal diff, and an
//!   integer written over a counter increments it by the difference, so
//!   concurrent patches to text and counters merge instead of replacing each other.
//!
//! - an object merged where the key is absent creates it with the
//!   deterministic identity of [`super::container`], so patches from several
//!   writers that create it at once all land in one object.
//!
//! The document root is always an object, so a patch must be an object.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ROOT, ScalarValue, Value};
use serde_json::{Map, Value as Json};

use super::DocError;
use super::container::{Creator, Kind};
use super::json::{
    Slot, StringMode, check_write_depth, json_depth, json_to_scalar, scalar_to_json, to_json,
    write_json,
};

/// Applies `patch` to the document root inside `tx`, creating absent
/// objects plainly (see `apply_merge_patch_with`).
///
/// # Errors
/// [`DocError::BadValue`] if `patch` is not an object; Automerge errors.
pub fn apply_merge_patch<T: Transactable>(
    tx: &mut T,
    patch: &Json,
    strings: StringMode,
) -> Result<(), DocError> {
    apply_merge_patch_with(tx, patch, strings, &mut Creator::plain(), usize::MAX)
}

/// [`apply_merge_patch`] with absent objects made by `creator`, refusing a
/// patch that nests deeper than `max_depth`.
///
/// # Errors
/// As [`apply_merge_patch`], and [`DocError::TooDeep`].
pub(crate) fn apply_merge_patch_with<T: Transactable>(
    tx: &mut T,
    patch: &Json,
    strings: StringMode,
    creator: &mut Creator,
    max_depth: usize,
) -> Result<(), DocError> {
    let Json::Object(map) = patch else {
        return Err(DocError::BadValue(
            "a merge patch must be a JSON object: the document root is an object".into(),
        ));
    };
    // The patch object is the root itself: what it nests below it counts.
    check_write_depth(json_depth(patch).saturating_sub(1), max_depth)?;
    merge_map(tx, &ROOT, map, strings, creator)
}

/// Writes the root keys of a new document: objects are created as by a merge
/// patch (so two nodes creating one doc at once keep both), anything else as
/// given (`null` included).
pub(crate) fn create_root<T: Transactable>(
    tx: &mut T,
    map: &Map<String, Json>,
    strings: StringMode,
    creator: &mut Creator,
) -> Result<(), DocError> {
    // (object to fill, its JSON) pairs: iterative, like every walk of a value.
    let mut stack = vec![(ROOT, map)];
    while let Some((obj, map)) = stack.pop() {
        for (key, v) in map {
            match v {
                Json::Object(sub) => {
                    let id = creator.create(tx, &obj, key, Kind::Map)?;
                    stack.push((id, sub));
                }
                v => put(tx, &obj, key, v, strings)?,
            }
        }
    }
    Ok(())
}

fn merge_map<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    patch: &Map<String, Json>,
    strings: StringMode,
    creator: &mut Creator,
) -> Result<(), DocError> {
    for (key, new) in patch {
        let current = tx.get(obj, key.as_str())?;
        match (new, current) {
            (Json::Null, Some(_)) => tx.delete(obj, key.as_str())?,
            (Json::Null, None) => {}
            (Json::Object(sub), Some((Value::Object(ObjType::Map | ObjType::Table), id))) => {
                merge_map(tx, &id, sub, strings, creator)?
            }
            (Json::Object(sub), None) => {
                let id = creator.create(tx, obj, key, Kind::Map)?;
                merge_map(tx, &id, sub, strings, creator)?
            }
            (Json::Object(sub), Some(_)) => {
                let id = tx.put_object(obj, key.as_str(), ObjType::Map)?;
                merge_map(tx, &id, sub, strings, creator)?
            }
            (Json::String(s), Some((Value::Object(ObjType::Text), id))) => {
                let current = tx.text(&id)?;
                if strings == StringMode::TextMerge {
                    splice_changed_region(tx, &id, &current, s)?;
                } else if current != *s {
                    put(tx, obj, key, new, strings)?;
                }
            }
            (Json::Number(n), Some((Value::Scalar(cur), _)))
                if matches!(cur.as_ref(), ScalarValue::Counter(_)) && n.is_i64() =>
            {
                let now = match cur.as_ref() {
                    ScalarValue::Counter(c) => i64::from(c),
                    _ => unreachable!(),
                };
                let target = n.as_i64().unwrap_or(0);
                let delta = target.checked_sub(now).ok_or(DocError::CounterOverflow {
                    path: format!("/{key}"),
                    value: now,
                    by: target.wrapping_sub(now),
                })?;
                if delta != 0 {
                    tx.increment(obj, key.as_str(), delta)?;
                }
            }
            (new, Some((Value::Scalar(cur), _))) if !new.is_array() => {
                if scalar_to_json(&cur) != *new || !same_kind(&cur, new) {
                    put(tx, obj, key, new, strings)?;
                }
            }
            (new, Some((Value::Object(ty), id))) if new.is_array() && ty == ObjType::List => {
                if to_json(tx, &id, ty)? != *new {
                    put(tx, obj, key, new, strings)?;
                }
            }
            (new, _) => put(tx, obj, key, new, strings)?,
        }
    }
    Ok(())
}

/// Turns text `old` into `new` with one splice over the region between their
/// common prefix and common suffix. Linear time, unlike a full diff (Automerge's
/// `update_text` is quadratic in the worst case: seconds for 10k characters),
/// and as fine-grained as a diff for the usual single edit. Positions are
/// Unicode code points, the documents' text encoding.
fn splice_changed_region<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    old: &str,
    new: &str,
) -> Result<(), DocError> {
    if old == new {
        return Ok(());
    }
    let (o, n): (Vec<char>, Vec<char>) = (old.chars().collect(), new.chars().collect());
    let prefix = o.iter().zip(&n).take_while(|(a, b)| a == b).count();
    let suffix = o[prefix..]
        .iter()
        .rev()
        .zip(n[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let deleted = o.len() - prefix - suffix;
    let inserted: String = n[prefix..n.len() - suffix].iter().collect();
    tx.splice_text(obj, prefix, deleted as isize, &inserted)?;
    Ok(())
}

/// True when writing `new` over `cur` would store the same Automerge type (so an
/// equal-looking value really is equal: a string over a string, not text).
fn same_kind(cur: &ScalarValue, new: &Json) -> bool {
    match new {
        Json::String(_) => matches!(cur, ScalarValue::Str(_)),
        _ => *cur == json_to_scalar(new),
    }
}

fn put<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    key: &str,
    v: &Json,
    strings: StringMode,
) -> Result<(), DocError> {
    write_json(tx, obj, Prop::Map(key.to_string()), Slot::Put, v, strings)
}

/// The ops that make a doc holding `current` hold `target` (both JSON
/// objects): keys `target` lacks are deleted, differing values set (objects
/// recursively, so untouched keys keep their history; anything else whole).
/// Unlike a merge patch, this can write `null` values. Empty when they are
/// equal.
pub fn ops_to_match(current: &Json, target: &Json) -> Vec<super::Op> {
    let mut ops = Vec::new();
    diff_into(&mut String::new(), current, target, &mut ops);
    ops
}

fn diff_into(path: &mut String, current: &Json, target: &Json, ops: &mut Vec<super::Op>) {
    match (current, target) {
        (Json::Object(have), Json::Object(want)) => {
            for key in have.keys().filter(|k| !want.contains_key(*k)) {
                let len = path.len();
                super::path::push_prop(path, &Prop::Map(key.clone()));
                ops.push(super::Op::Delete { path: path.clone() });
                path.truncate(len);
            }
            for (key, value) in want {
                let len = path.len();
                super::path::push_prop(path, &Prop::Map(key.clone()));
                match have.get(key) {
                    Some(old) => diff_into(path, old, value, ops),
                    None => ops.push(set(path, value)),
                }
                path.truncate(len);
            }
        }
        (a, b) if a == b => {}
        (_, b) => ops.push(set(path, b)),
    }
}

fn set(path: &str, value: &Json) -> super::Op {
    super::Op::Set {
        path: path.to_string(),
        value: value.clone(),
        kind: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{Automerge, ReadDoc};
    use serde_json::json;

    #[test]
    fn ops_to_match_make_the_doc_equal_to_the_target() {
        let start = json!({"a": 1, "gone": true, "o": {"x": 1, "y": [1, 2]}, "s": "t/~"});
        let target =
            json!({"a": 2, "o": {"x": 1, "y": [3], "z": null}, "s": "t/~", "new/k~": {"d": 1}});
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        apply_merge_patch(&mut tx, &start, StringMode::Text).unwrap();
        tx.commit();
        let current = to_json(&doc, &ROOT, ObjType::Map).unwrap();
        let ops = ops_to_match(&current, &target);
        let mut tx = doc.transaction();
        crate::doc::apply_ops(&mut tx, &ops, StringMode::Text).unwrap();
        tx.commit();
        assert_eq!(to_json(&doc, &ROOT, ObjType::Map).unwrap(), target);
        assert!(ops_to_match(&target, &target).is_empty());
        // Only what differs is written: "o/x" and "s" are left alone.
        assert_eq!(ops.len(), 5, "{ops:?}");
    }

    fn patched(start: Json, patch: Json, strings: StringMode) -> (Json, usize) {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        apply_merge_patch(&mut tx, &start, strings).unwrap();
        tx.commit();
        let mut tx = doc.transaction();
        apply_merge_patch(&mut tx, &patch, strings).unwrap();
        let ops = tx.pending_ops();
        tx.commit();
        (to_json(&doc, &ROOT, ObjType::Map).unwrap(), ops)
    }

    /// The examples of RFC 7396 section 3 whose target and patch are objects.
    #[test]
    fn rfc7396_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for strings in [StringMode::Scalar, StringMode::Text] {
            for (start, patch, want) in &cases {
                let (got, _) = patched(start.clone(), patch.clone(), strings);
                assert_eq!(&got, want, "start {start} patch {patch} ({strings:?})");
            }
        }
    }

    #[test]
    fn equal_values_write_nothing() {
        let v = json!({"a": 1, "s": "x", "l": [1, 2], "m": {"k": true}, "f": 2.5});
        for strings in [StringMode::Scalar, StringMode::Text] {
            let (_, ops) = patched(v.clone(), v.clone(), strings);
            assert_eq!(ops, 0, "{strings:?}");
        }
    }

    #[test]
    fn number_types_are_not_confused() {
        let (got, ops) = patched(json!({"a": 1}), json!({"a": 1.0}), StringMode::Scalar);
        assert_eq!(got, json!({"a": 1.0}));
        assert_eq!(ops, 1);
    }

    #[test]
    fn non_object_patch_is_refused() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        for p in [json!(1), json!([1]), json!("x"), json!(null)] {
            let err = apply_merge_patch(&mut tx, &p, StringMode::Scalar).unwrap_err();
            assert!(matches!(err, DocError::BadValue(_)), "{err}");
        }
        assert_eq!(tx.pending_ops(), 0);
    }

    #[test]
    fn text_edits_splice_only_the_changed_region() {
        for (old, new) in [
            ("hello world", "hello brave world"),
            ("hello world", "hello"),
            ("abc", "xyz"),
            ("", "new"),
            ("gone", ""),
            ("aaa", "aaaa"),
            ("héllo wörld", "héllo, wörld!"),
        ] {
            let mut doc = Automerge::new();
            let mut tx = doc.transaction();
            apply_merge_patch(&mut tx, &json!({"t": old}), StringMode::TextMerge).unwrap();
            tx.commit();
            let mut tx = doc.transaction();
            apply_merge_patch(&mut tx, &json!({"t": new}), StringMode::TextMerge).unwrap();
            tx.commit();
            assert_eq!(
                to_json(&doc, &ROOT, ObjType::Map).unwrap(),
                json!({"t": new})
            );
        }
        // A whole rewrite of a long text is one splice.
        let big_a = "a".repeat(5_000);
        let big_b = "b".repeat(5_000);
        let (got, _) = patched(
            json!({"t": big_a}),
            json!({"t": big_b}),
            StringMode::TextMerge,
        );
        assert_eq!(got["t"].as_str().map(str::len), Some(5_000));
    }

    #[test]
    fn concurrent_rewrites_of_a_text_pick_one_unless_merging_per_character() {
        for (strings, interleave) in [(StringMode::Text, false), (StringMode::TextMerge, true)] {
            let mut base = Automerge::new();
            let mut tx = base.transaction();
            apply_merge_patch(&mut tx, &json!({"status": "idle"}), strings).unwrap();
            tx.commit();
            let mut a = base.fork();
            let mut b = base.fork();
            for (doc, v) in [(&mut a, "ok"), (&mut b, "fail")] {
                let mut tx = doc.transaction();
                apply_merge_patch(&mut tx, &json!({"status": v}), strings).unwrap();
                tx.commit();
            }
            a.merge(&mut b).unwrap();
            let got = to_json(&a, &ROOT, ObjType::Map).unwrap()["status"].clone();
            let whole = got == json!("ok") || got == json!("fail");
            assert_eq!(!whole, interleave, "{strings:?}: {got}");
            // Still a text object: JS clients read a plain string.
            let (v, _) = a.get(ROOT, "status").unwrap().unwrap();
            assert_eq!(v, Value::Object(ObjType::Text), "{strings:?}");
        }
    }

    #[test]
    fn integer_over_counter_increments() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "n", ScalarValue::counter(5)).unwrap();
        tx.commit();
        let mut tx = doc.transaction();
        apply_merge_patch(&mut tx, &json!({"n": 8}), StringMode::Scalar).unwrap();
        tx.commit();
        let (v, _) = doc.get(ROOT, "n").unwrap().unwrap();
        assert_eq!(v.as_scalar().cloned(), Some(ScalarValue::counter(8)));
    }
}
