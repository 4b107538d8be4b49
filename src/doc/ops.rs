//! Explicit operations, applied together as one change (all or nothing).
//!
//! ```json
//! [{"op": "set", "path": "/a", "value": 1},
//!  {"op": "set", "path": "/title", "value": "Hi", "as": "text"},
//!  {"op": "delete", "path": "/old"},
//!  {"op": "insert", "path": "/list/0", "value": {"x": 1}},
//!  {"op": "splice", "path": "/title", "pos": 2, "del": 0, "text": "!"},
//!  {"op": "increment", "path": "/n", "by": 2}]
//! ```
//!
//! - `set` puts a value at a map key or replaces a list element (`-` appends);
//!   missing parent objects are created (a missing list for `-`), with the
//!   deterministic identity of [`super::container`], so writers that create
//!   them at once write into the same one. `as` stores a value as `text`, a
//!   `counter` or a `timestamp` (Unix ms) instead of the default.
//! - `delete` removes a map key or list element; it must exist.
//! - `insert` inserts before a list index (`-` for the end); a missing list
//!   is created for `-` and `0`.
//! - `splice` edits a text object: from `pos` (Unicode code points) delete `del`
//!   characters and insert `text`.
//! - `increment` adds `by` (default 1) to a counter, creating it if absent
//!   (at 0, deterministically, then adding `by`); past the range of i64 it is
//!   refused.
//!
//! No op may nest objects and lists deeper than `doc.max_depth`.

use automerge::transaction::Transactable;
use automerge::{Automerge, Change, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::DocError;
use super::container::{Creator, Kind};
use super::json::{
    Slot, StringMode, check_write_depth, describe, json_depth, write_json, write_scalar,
};
use super::path::{Pointer, prop_for, resolve_obj};

/// One explicit operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Put a value at a path.
    Set {
        /// JSON Pointer.
        path: String,
        /// The value.
        value: Json,
        /// Store the value as this Automerge type.
        #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
        kind: Option<ValueKind>,
    },
    /// Remove a map key or list element.
    Delete {
        /// JSON Pointer.
        path: String,
    },
    /// Insert into a list before the index the path ends with.
    Insert {
        /// JSON Pointer ending in an index or `-`.
        path: String,
        /// The value.
        value: Json,
        /// Store the value as this Automerge type.
        #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
        kind: Option<ValueKind>,
    },
    /// Edit a text object.
    Splice {
        /// JSON Pointer to a text object.
        path: String,
        /// Start position in Unicode code points.
        pos: usize,
        /// Characters to delete.
        #[serde(default)]
        del: usize,
        /// Text to insert.
        #[serde(default)]
        text: String,
    },
    /// Add to a counter.
    Increment {
        /// JSON Pointer.
        path: String,
        /// Amount, default 1.
        #[serde(default = "one")]
        by: i64,
    },
}

fn one() -> i64 {
    1
}

/// A type to store a JSON value as, overriding the default conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    /// A string as a text object.
    Text,
    /// A string as a scalar string.
    String,
    /// An integer as a counter.
    Counter,
    /// An integer (Unix ms) as a timestamp.
    Timestamp,
}

/// Applies `ops` in order inside `tx`. On error the caller rolls `tx` back.
/// Missing containers are created plainly (see [`write_ops`] for how
/// the node gives them deterministic identity) and nesting is not limited.
///
/// # Errors
/// The first failing op's error, prefixed with its index.
pub fn apply_ops<T: Transactable>(
    tx: &mut T,
    ops: &[Op],
    strings: StringMode,
) -> Result<(), DocError> {
    apply_ops_with(tx, ops, strings, &mut Creator::plain(), usize::MAX)
}

/// Applies `ops` to `doc` as a node applies a local write, for embedders
/// that keep bare Automerge docs (and for the simulator): containers the
/// ops create implicitly get deterministic identity, so the same write made
/// concurrently elsewhere makes the same containers. Returns the changes
/// made, geneses first, each to be sent to peers; none if nothing changed.
/// On error `doc` is left as it was.
///
/// # Errors
/// The first failing op's error, as [`apply_ops`].
pub fn write_ops(
    doc: &mut Automerge,
    ops: &[Op],
    strings: StringMode,
    message: &str,
) -> Result<Vec<Change>, DocError> {
    // Applies the ops in a transaction that is committed, or (a trial run,
    // or on error) rolled back.
    let attempt = |doc: &mut Automerge, creator: &mut Creator, commit: bool| {
        let mut tx = doc.transaction();
        let applied = apply_ops_with(&mut tx, ops, strings, creator, usize::MAX);
        if applied.is_err() || !commit {
            tx.rollback();
            return applied.map(|()| None);
        }
        let opts = automerge::transaction::CommitOptions::default().with_message(message);
        Ok(tx.commit_with(opts).0)
    };
    let before = doc.get_heads();
    let mut creator = Creator::recording();
    attempt(doc, &mut creator, false)?;
    let mut made = creator.geneses(doc)?;
    doc.apply_changes(made.iter().cloned())?;
    match attempt(doc, &mut Creator::plain(), true) {
        Ok(hash) => made.extend(hash.and_then(|h| doc.get_change_by_hash(&h))),
        Err(e) => {
            // Undo the geneses: a fork at the old heads has none of them.
            let actor = doc.get_actor().clone();
            *doc = doc.fork_at(&before)?.with_actor(actor);
            return Err(e);
        }
    }
    Ok(made)
}

/// [`apply_ops`] with missing containers made by `creator`, refusing ops
/// that would nest deeper than `max_depth`.
pub(crate) fn apply_ops_with<T: Transactable>(
    tx: &mut T,
    ops: &[Op],
    strings: StringMode,
    creator: &mut Creator,
    max_depth: usize,
) -> Result<(), DocError> {
    for (i, op) in ops.iter().enumerate() {
        check_depth(op, max_depth).map_err(|e| at_index(i, e))?;
        apply_op(tx, op, strings, creator).map_err(|e| at_index(i, e))?;
    }
    Ok(())
}

/// Refuses an op whose value would sit deeper than `max`: a value at a path
/// of n tokens has n - 1 containers above it, plus those it holds itself.
fn check_depth(op: &Op, max: usize) -> Result<(), DocError> {
    let (path, value) = match op {
        Op::Set { path, value, .. } | Op::Insert { path, value, .. } => (path, Some(value)),
        Op::Increment { path, .. } => (path, None),
        Op::Delete { .. } | Op::Splice { .. } => return Ok(()),
    };
    // Count tokens without parsing: a pointer's tokens are its '/'s.
    let above = path.matches('/').count().saturating_sub(1);
    check_write_depth(above + value.map_or(0, json_depth), max)
}

fn at_index(index: usize, e: DocError) -> DocError {
    match e {
        DocError::Store(_) | DocError::Internal(_) => e,
        e => DocError::InOp {
            index,
            source: Box::new(e),
        },
    }
}

fn apply_op<T: Transactable>(
    tx: &mut T,
    op: &Op,
    strings: StringMode,
    creator: &mut Creator,
) -> Result<(), DocError> {
    match op {
        Op::Set { path, value, kind } => {
            let ptr = Pointer::parse(path)?;
            let (obj, ty, token) = parent(tx, &ptr, Some(creator), &["-"])?;
            if ty == ObjType::Text {
                return Err(mismatch(
                    &ptr,
                    "set",
                    "an object or list parent (use splice for text)",
                    "text".into(),
                ));
            }
            let prop = prop_for(&ptr, ty, tx.length(&obj), &token, true)?;
            let slot = match prop {
                Prop::Seq(i) if i == tx.length(&obj) => Slot::Insert,
                _ => Slot::Put,
            };
            write_kind(tx, &obj, prop, slot, value, *kind, strings, &ptr)
        }
        Op::Insert { path, value, kind } => {
            let ptr = Pointer::parse(path)?;
            // A missing list is created for an insert at its start or end.
            let creates = matches!(ptr.split_last(), Some((_, "-" | "0")));
            let (obj, ty, token) = parent(tx, &ptr, creates.then_some(creator), &["-", "0"])?;
            if ty != ObjType::List {
                let found = if ty == ObjType::Text {
                    "text (use splice)"
                } else {
                    "an object"
                };
                return Err(mismatch(&ptr, "insert", "a list", found.into()));
            }
            let prop = prop_for(&ptr, ty, tx.length(&obj), &token, true)?;
            write_kind(tx, &obj, prop, Slot::Insert, value, *kind, strings, &ptr)
        }
        Op::Delete { path } => {
            let ptr = Pointer::parse(path)?;
            let (obj, ty, token) = parent(tx, &ptr, None, &[])?;
            let prop =
                prop_for(&ptr, ty, tx.length(&obj), &token, false).map_err(|_| ptr.not_found())?;
            if tx.get(&obj, prop.clone())?.is_none() {
                return Err(ptr.not_found());
            }
            tx.delete(&obj, prop)?;
            Ok(())
        }
        Op::Splice {
            path,
            pos,
            del,
            text,
        } => {
            let ptr = Pointer::parse(path)?;
            let (obj, ty, token) = parent(tx, &ptr, None, &[])?;
            let prop =
                prop_for(&ptr, ty, tx.length(&obj), &token, false).map_err(|_| ptr.not_found())?;
            let text_obj = match tx.get(&obj, prop)? {
                Some((Value::Object(ObjType::Text), id)) => id,
                Some((v, _)) => return Err(mismatch(&ptr, "splice", "text", describe(&v))),
                None => return Err(ptr.not_found()),
            };
            let len = tx.length(&text_obj);
            if *pos > len || del > &(len - pos) {
                return Err(DocError::BadValue(format!(
                    "splice at {pos} deleting {del} is out of range for text of length {len} at {path:?}"
                )));
            }
            tx.splice_text(&text_obj, *pos, *del as isize, text)?;
            Ok(())
        }
        Op::Increment { path, by } => {
            let ptr = Pointer::parse(path)?;
            let (obj, ty, token) = parent(tx, &ptr, Some(creator), &[])?;
            let prop =
                prop_for(&ptr, ty, tx.length(&obj), &token, false).map_err(|_| ptr.not_found())?;
            let current = match tx.get(&obj, prop.clone())? {
                Some((Value::Scalar(s), _)) => match s.as_ref() {
                    ScalarValue::Counter(c) => i64::from(c),
                    _ => {
                        let found = describe(&Value::Scalar(s));
                        return Err(mismatch(&ptr, "increment", "a counter", found));
                    }
                },
                Some((v, _)) => return Err(mismatch(&ptr, "increment", "a counter", describe(&v))),
                None => {
                    let Prop::Map(key) = &prop else {
                        return Err(ptr.not_found());
                    };
                    creator.create(tx, &obj, key, Kind::Counter)?;
                    0
                }
            };
            if current.checked_add(*by).is_none() {
                return Err(DocError::CounterOverflow {
                    path: ptr.as_str().to_string(),
                    value: current,
                    by: *by,
                });
            }
            tx.increment(&obj, prop, *by)?;
            Ok(())
        }
    }
}

/// Resolves the parent of `ptr`'s last token. With a `creator`, missing map
/// keys on the way are created: as lists where the parent's last token is one
/// of `list_tokens` (`-` appends to a list), as maps otherwise.
fn parent<T: Transactable>(
    tx: &mut T,
    ptr: &Pointer,
    creator: Option<&mut Creator>,
    list_tokens: &[&str],
) -> Result<(ObjId, ObjType, String), DocError> {
    let (parents, last) = ptr.split_last().ok_or_else(|| {
        DocError::BadValue(
            "this op needs a path below the root (the root is always an object); \
             use a merge patch to change several keys"
                .into(),
        )
    })?;
    let last = last.to_string();
    let Some(creator) = creator else {
        let (obj, ty) = resolve_obj(tx, ptr, parents)?;
        return Ok((obj, ty, last));
    };
    let mut obj = automerge::ROOT;
    let mut ty = ObjType::Map;
    for (i, token) in parents.iter().enumerate() {
        let prop = prop_for(ptr, ty, tx.length(&obj), token, false)?;
        match tx.get(&obj, prop.clone())? {
            Some((Value::Object(t), id)) => {
                obj = id;
                ty = t;
            }
            Some((v, _)) => {
                return Err(mismatch(
                    ptr,
                    "a path step",
                    "an object or list",
                    describe(&v),
                ));
            }
            None => {
                let Prop::Map(key) = &prop else {
                    return Err(ptr.not_found());
                };
                let is_last = i + 1 == parents.len();
                (obj, ty) = if is_last && list_tokens.contains(&last.as_str()) {
                    (creator.create(tx, &obj, key, Kind::List)?, ObjType::List)
                } else {
                    (creator.create(tx, &obj, key, Kind::Map)?, ObjType::Map)
                };
            }
        }
    }
    Ok((obj, ty, last))
}

#[allow(clippy::too_many_arguments)]
fn write_kind<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    slot: Slot,
    value: &Json,
    kind: Option<ValueKind>,
    strings: StringMode,
    ptr: &Pointer,
) -> Result<(), DocError> {
    let need = |expected: &'static str| mismatch(ptr, "\"as\"", expected, describe_json(value));
    match kind {
        None => write_json(tx, obj, prop, slot, value, strings),
        Some(ValueKind::Text) if value.is_string() => {
            write_json(tx, obj, prop, slot, value, StringMode::Text)
        }
        Some(ValueKind::String) if value.is_string() => {
            write_json(tx, obj, prop, slot, value, StringMode::Scalar)
        }
        Some(ValueKind::Counter) => {
            let n = value.as_i64().ok_or_else(|| need("an integer"))?;
            write_scalar(tx, obj, prop, slot, ScalarValue::counter(n))
        }
        Some(ValueKind::Timestamp) => {
            let n = value.as_i64().ok_or_else(|| need("an integer"))?;
            write_scalar(tx, obj, prop, slot, ScalarValue::Timestamp(n))
        }
        Some(ValueKind::Text | ValueKind::String) => Err(need("a string")),
    }
}

fn mismatch(ptr: &Pointer, op: &'static str, expected: &'static str, found: String) -> DocError {
    DocError::TypeMismatch {
        path: ptr.as_str().to_string(),
        op,
        expected,
        found,
    }
}

/// "a string", "an object", ...: what a JSON value is, for error messages.
pub(crate) fn describe_json(v: &Json) -> String {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::json::to_json;
    use automerge::{Automerge, ROOT};
    use serde_json::json;

    fn run(start: Json, ops: Json) -> Result<Json, DocError> {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        crate::doc::apply_merge_patch(&mut tx, &start, StringMode::Scalar).unwrap();
        tx.commit();
        let ops: Vec<Op> = serde_json::from_value(ops).expect("ops parse");
        let mut tx = doc.transaction();
        match apply_ops(&mut tx, &ops, StringMode::Scalar) {
            Ok(()) => {
                tx.commit();
            }
            Err(e) => {
                tx.rollback();
                return Err(e);
            }
        }
        Ok(to_json(&doc, &ROOT, ObjType::Map).unwrap())
    }

    #[test]
    fn set_creates_parents_and_replaces_list_items() {
        let got = run(
            json!({"l": [1, 2]}),
            json!([
                {"op": "set", "path": "/a/b/c", "value": 1},
                {"op": "set", "path": "/l/0", "value": "x"},
                {"op": "set", "path": "/l/-", "value": 3}
            ]),
        )
        .unwrap();
        assert_eq!(got, json!({"a": {"b": {"c": 1}}, "l": ["x", 2, 3]}));
    }

    #[test]
    fn insert_delete_splice_increment() {
        let got = run(
            json!({"l": [1, 3], "gone": true}),
            json!([
                {"op": "insert", "path": "/l/1", "value": 2},
                {"op": "insert", "path": "/l/-", "value": {"k": 4}},
                {"op": "delete", "path": "/gone"},
                {"op": "set", "path": "/t", "value": "helo", "as": "text"},
                {"op": "splice", "path": "/t", "pos": 3, "text": "l"},
                {"op": "splice", "path": "/t", "pos": 0, "del": 1, "text": "H"},
                {"op": "increment", "path": "/n", "by": 2},
                {"op": "increment", "path": "/n"},
                {"op": "set", "path": "/ts", "value": 1700000000000i64, "as": "timestamp"}
            ]),
        )
        .unwrap();
        assert_eq!(
            got,
            json!({"l": [1, 2, 3, {"k": 4}], "t": "Hello", "n": 3, "ts": 1700000000000i64})
        );
    }

    #[test]
    fn dash_appends_to_a_list_and_creates_it_when_absent() {
        let got = run(
            json!({}),
            json!([{"op": "set", "path": "/list/-", "value": 1},
                   {"op": "set", "path": "/list/-", "value": 2},
                   {"op": "insert", "path": "/other/-", "value": "x"},
                   {"op": "insert", "path": "/third/0", "value": "y"},
                   {"op": "set", "path": "/m/n/-", "value": true}]),
        )
        .unwrap();
        assert_eq!(
            got,
            json!({"list": [1, 2], "other": ["x"], "third": ["y"], "m": {"n": [true]}})
        );
    }

    #[test]
    fn counters_refuse_to_overflow() {
        let start = json!({});
        let err = run(
            start.clone(),
            json!([{"op": "set", "path": "/c", "value": i64::MAX - 1, "as": "counter"},
                   {"op": "increment", "path": "/c", "by": 2}]),
        )
        .unwrap_err();
        assert!(matches!(*inner(err), DocError::CounterOverflow { .. }));
        let err = run(
            start.clone(),
            json!([{"op": "set", "path": "/c", "value": i64::MIN, "as": "counter"},
                   {"op": "increment", "path": "/c", "by": -1}]),
        )
        .unwrap_err();
        assert!(matches!(*inner(err), DocError::CounterOverflow { .. }));
        let got = run(
            start,
            json!([{"op": "set", "path": "/c", "value": i64::MAX - 1, "as": "counter"},
                   {"op": "increment", "path": "/c"}]),
        )
        .unwrap();
        assert_eq!(got, json!({"c": i64::MAX}));
        // A merge patch over a counter adds the difference, and refuses one
        // that does not fit.
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let ops: Vec<Op> = serde_json::from_value(
            json!([{"op": "set", "path": "/c", "value": i64::MIN + 5, "as": "counter"}]),
        )
        .unwrap();
        apply_ops(&mut tx, &ops, StringMode::Scalar).unwrap();
        let err =
            crate::doc::apply_merge_patch(&mut tx, &json!({"c": i64::MAX}), StringMode::Scalar)
                .unwrap_err();
        assert!(matches!(err, DocError::CounterOverflow { .. }), "{err}");
    }

    fn inner(e: DocError) -> Box<DocError> {
        match e {
            DocError::InOp { source, .. } => source,
            e => Box::new(e),
        }
    }

    #[test]
    fn every_error_case_names_the_op_and_path() {
        let start = json!({"s": "str", "l": [1], "m": {}, "n": 1});
        let cases = [
            (
                json!([{"op": "delete", "path": "/missing"}]),
                "does not exist",
            ),
            (json!([{"op": "delete", "path": "/l/5"}]), "does not exist"),
            (json!([{"op": "delete", "path": ""}]), "below the root"),
            (
                json!([{"op": "set", "path": "nope", "value": 1}]),
                "invalid path",
            ),
            (
                json!([{"op": "set", "path": "/s/x", "value": 1}]),
                "a path step",
            ),
            (
                json!([{"op": "set", "path": "/l/7", "value": 1}]),
                "out of range",
            ),
            (
                json!([{"op": "set", "path": "/l/x", "value": 1}]),
                "not a list index",
            ),
            (
                json!([{"op": "insert", "path": "/m/0", "value": 1}]),
                "needs a list",
            ),
            (
                json!([{"op": "insert", "path": "/nope/3", "value": 1}]),
                "does not exist",
            ),
            (
                json!([{"op": "splice", "path": "/s", "pos": 0, "text": "x"}]),
                "needs text",
            ),
            (
                json!([{"op": "increment", "path": "/n"}]),
                "needs a counter",
            ),
            (
                json!([{"op": "set", "path": "/c", "value": "x", "as": "counter"}]),
                "an integer",
            ),
            (
                json!([{"op": "set", "path": "/c", "value": 1, "as": "text"}]),
                "a string",
            ),
        ];
        for (ops, want) in cases {
            let err = run(start.clone(), ops.clone()).unwrap_err().to_string();
            assert!(err.contains("op 0"), "{ops}: {err}");
            assert!(err.contains(want), "{ops}: expected {want:?} in {err}");
        }
        let err = run(
            start.clone(),
            json!([{"op": "set", "path": "/t", "value": "ab", "as": "text"},
                   {"op": "splice", "path": "/t", "pos": 1, "del": 5}]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("op 1") && err.contains("out of range"),
            "{err}"
        );
    }

    #[test]
    fn set_and_insert_into_text_point_to_splice() {
        for op in ["set", "insert"] {
            let err = run(
                json!({}),
                json!([{"op": "set", "path": "/t", "value": "ab", "as": "text"},
                       {"op": op, "path": "/t/0", "value": 5}]),
            )
            .unwrap_err();
            assert!(
                matches!(&err, DocError::InOp { index: 1, source } if matches!(**source, DocError::TypeMismatch { .. })),
                "{err}"
            );
            assert!(err.to_string().contains("use splice"), "{err}");
        }
    }

    #[test]
    fn a_failing_op_rolls_back_the_whole_list() {
        let mut doc = Automerge::new();
        let ops: Vec<Op> = serde_json::from_value(json!([
            {"op": "set", "path": "/a", "value": 1},
            {"op": "delete", "path": "/missing"}
        ]))
        .unwrap();
        let mut tx = doc.transaction();
        assert!(apply_ops(&mut tx, &ops, StringMode::Scalar).is_err());
        tx.rollback();
        assert_eq!(to_json(&doc, &ROOT, ObjType::Map).unwrap(), json!({}));
    }

    #[test]
    fn unknown_ops_and_fields_do_not_parse() {
        assert!(serde_json::from_value::<Op>(json!({"op": "move", "path": "/a"})).is_err());
        assert!(
            serde_json::from_value::<Op>(json!({"op": "delete", "path": "/a", "x": 1})).is_err()
        );
        assert!(serde_json::from_value::<Op>(json!({"op": "set", "path": "/a"})).is_err());
    }
}
