//! JSON <-> Automerge.
//!
//! Automerge to JSON: maps -> objects (keys in Automerge's sorted order), lists ->
//! arrays, text -> strings, counters and timestamps -> numbers, bytes -> arrays of
//! numbers, null/bool/int/uint/f64 as themselves. Where concurrent writes left a
//! conflict, the value Automerge picks as the winner is shown.
//!
//! JSON to Automerge: objects -> maps, arrays -> lists, numbers -> int (i64), uint
//! (above i64::MAX) or f64, strings -> scalar strings or text objects
//! ([`StringMode`]), null/bool as themselves.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value as Json};

use super::DocError;

/// How JSON strings are stored (`doc.strings`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StringMode {
    /// Scalar strings: a write replaces the whole string (last writer wins).
    /// automerge-repo JS clients read them as `ImmutableString` objects.
    Scalar,
    /// Text objects, written whole: a write of a different string puts a
    /// new text object (last writer wins, as a JS client's `doc.key = "..."`
    /// does), and JS clients read plain strings. The default.
    #[default]
    Text,
    /// Text objects edited in place: a write is applied as a minimal text
    /// edit, so concurrent edits merge character by character (collaborative
    /// text; two concurrent rewrites of a whole value interleave).
    TextMerge,
}

impl StringMode {
    /// New strings become text objects.
    pub fn text_objects(self) -> bool {
        matches!(self, StringMode::Text | StringMode::TextMerge)
    }
}

/// The deepest nesting a document can be read at (and the largest
/// `doc.max_depth`): rendering is iterative, but what it returns is a
/// `serde_json::Value`, which serializes and drops recursively.
pub const MAX_READ_DEPTH: usize = 1000;

/// A container being rendered: its id and what is built of it so far.
struct Frame {
    obj: ObjId,
    built: Built,
    /// The key under which the child being rendered goes (maps only).
    pending: Option<String>,
}

enum Built {
    Map {
        out: Map<String, Json>,
        keys: std::vec::IntoIter<String>,
    },
    List {
        out: Vec<Json>,
        len: usize,
    },
}

impl Frame {
    fn new<R: ReadDoc>(doc: &R, obj: ObjId, ty: ObjType) -> Frame {
        let built = match ty {
            ObjType::List => Built::List {
                out: Vec::new(),
                len: doc.length(&obj),
            },
            _ => Built::Map {
                out: Map::new(),
                keys: doc.keys(&obj).collect::<Vec<_>>().into_iter(),
            },
        };
        Frame {
            obj,
            built,
            pending: None,
        }
    }

    /// The next child: its key (maps), value and id; `None` when done.
    #[allow(clippy::type_complexity)]
    fn next<'d, R: ReadDoc>(
        &mut self,
        doc: &'d R,
    ) -> Result<Option<(Option<String>, Option<(Value<'d>, ObjId)>)>, DocError> {
        match &mut self.built {
            Built::Map { keys, .. } => {
                for key in keys.by_ref() {
                    if let Some(v) = doc.get(&self.obj, key.as_str())? {
                        return Ok(Some((Some(key), Some(v))));
                    }
                }
                Ok(None)
            }
            Built::List { out, len } => {
                if out.len() == *len {
                    return Ok(None);
                }
                Ok(Some((None, doc.get(&self.obj, out.len())?)))
            }
        }
    }

    fn push(&mut self, key: Option<String>, v: Json) {
        match &mut self.built {
            Built::Map { out, .. } => {
                out.insert(key.unwrap_or_default(), v);
            }
            Built::List { out, .. } => out.push(v),
        }
    }

    fn finish(self) -> Json {
        match self.built {
            Built::Map { out, .. } => Json::Object(out),
            Built::List { out, .. } => Json::Array(out),
        }
    }
}

/// Renders the object `obj` of type `ty` as JSON. Iterative: a deep doc
/// costs heap, not stack.
///
/// # Errors
/// Automerge errors on a malformed object id; [`DocError::TooDeep`] for a doc
/// nested deeper than [`MAX_READ_DEPTH`].
pub fn to_json<R: ReadDoc>(doc: &R, obj: &ObjId, ty: ObjType) -> Result<Json, DocError> {
    if ty == ObjType::Text {
        return Ok(Json::String(doc.text(obj)?));
    }
    let mut stack = vec![Frame::new(doc, obj.clone(), ty)];
    loop {
        let depth = stack.len();
        let top = stack.last_mut().expect("the stack ends only by returning");
        match top.next(doc)? {
            Some((key, None)) => top.push(key, Json::Null),
            Some((key, Some((Value::Scalar(s), _)))) => top.push(key, scalar_to_json(&s)),
            Some((key, Some((Value::Object(ObjType::Text), id)))) => {
                top.push(key, Json::String(doc.text(&id)?));
            }
            Some((key, Some((Value::Object(ty), id)))) => {
                if depth >= MAX_READ_DEPTH {
                    return Err(DocError::TooDeep {
                        what: "the document".into(),
                        depth: depth + 1,
                        max: MAX_READ_DEPTH,
                    });
                }
                top.pending = key;
                stack.push(Frame::new(doc, id, ty));
            }
            None => {
                let done = stack.pop().expect("not empty").finish();
                match stack.last_mut() {
                    None => return Ok(done),
                    Some(parent) => {
                        let key = parent.pending.take();
                        parent.push(key, done);
                    }
                }
            }
        }
    }
}

/// Refuses a write whose deepest container would sit `depth` levels below
/// the root when the limit is `max` (`doc.max_depth`).
pub(crate) fn check_write_depth(depth: usize, max: usize) -> Result<(), DocError> {
    if depth > max {
        return Err(DocError::TooDeep {
            what: "this write".into(),
            depth,
            max,
        });
    }
    Ok(())
}

/// How many levels of objects and lists `v` nests: 0 for a scalar, 1 for
/// `{}` or `[1]`, 2 for `{"a": {}}`. Iterative.
pub(crate) fn json_depth(v: &Json) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, above)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Json>> = match v {
            Json::Object(m) => Box::new(m.values()),
            Json::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        deepest = deepest.max(above + 1);
        stack.extend(children.map(|c| (c, above + 1)));
    }
    deepest
}

/// Renders one value (scalar or object) as JSON.
pub(crate) fn value_to_json<R: ReadDoc>(
    doc: &R,
    v: Value<'_>,
    id: &ObjId,
) -> Result<Json, DocError> {
    match v {
        Value::Object(ty) => to_json(doc, id, ty),
        Value::Scalar(s) => Ok(scalar_to_json(&s)),
    }
}

/// Renders a scalar as JSON.
pub(crate) fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|x| Json::from(*x)).collect()),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Unknown { bytes, .. } => {
            Json::Array(bytes.iter().map(|x| Json::from(*x)).collect())
        }
        ScalarValue::Null => Json::Null,
    }
}

/// Converts a JSON scalar (not object, array or string in text mode) to Automerge.
pub(crate) fn json_to_scalar(v: &Json) -> ScalarValue {
    match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => unreachable!("json_to_scalar called on a container"),
    }
}

/// Where a new value goes: put at a map key or list index, or inserted into a list.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    /// Put (overwrite).
    Put,
    /// Insert before the index.
    Insert,
}

/// Writes `v` into `obj` at `prop`, creating nested objects.
pub(crate) fn write_json<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    slot: Slot,
    v: &Json,
    strings: StringMode,
) -> Result<(), DocError> {
    let new_obj = |tx: &mut T, ty: ObjType| -> Result<ObjId, DocError> {
        Ok(match (slot, &prop) {
            (Slot::Insert, Prop::Seq(i)) => tx.insert_object(obj, *i, ty)?,
            _ => tx.put_object(obj, prop.clone(), ty)?,
        })
    };
    match v {
        Json::Object(map) => {
            let child = new_obj(tx, ObjType::Map)?;
            for (k, v) in map {
                write_json(tx, &child, Prop::Map(k.clone()), Slot::Put, v, strings)?;
            }
        }
        Json::Array(items) => {
            let child = new_obj(tx, ObjType::List)?;
            for (i, v) in items.iter().enumerate() {
                write_json(tx, &child, Prop::Seq(i), Slot::Insert, v, strings)?;
            }
        }
        Json::String(s) if strings.text_objects() => {
            let child = new_obj(tx, ObjType::Text)?;
            tx.splice_text(&child, 0, 0, s)?;
        }
        scalar => write_scalar(tx, obj, prop, slot, json_to_scalar(scalar))?,
    }
    Ok(())
}

/// Puts or inserts a scalar.
pub(crate) fn write_scalar<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    slot: Slot,
    value: ScalarValue,
) -> Result<(), DocError> {
    match (slot, prop) {
        (Slot::Insert, Prop::Seq(i)) => tx.insert(obj, i, value)?,
        (_, prop) => tx.put(obj, prop, value)?,
    }
    Ok(())
}

/// A short name of what a value is, for error messages.
pub(crate) fn describe(v: &Value<'_>) -> String {
    match v {
        Value::Object(ObjType::Map | ObjType::Table) => "an object".into(),
        Value::Object(ObjType::List) => "a list".into(),
        Value::Object(ObjType::Text) => "text".into(),
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(_) => "a string".into(),
            ScalarValue::Counter(_) => "a counter".into(),
            ScalarValue::Int(_) | ScalarValue::Uint(_) | ScalarValue::F64(_) => "a number".into(),
            ScalarValue::Boolean(_) => "a boolean".into(),
            ScalarValue::Null => "null".into(),
            ScalarValue::Timestamp(_) => "a timestamp".into(),
            ScalarValue::Bytes(_) | ScalarValue::Unknown { .. } => "bytes".into(),
        },
    }
}

/// The JSON value at `ptr` (not the root) in `doc`.
///
/// # Errors
/// [`DocError::PathNotFound`] when nothing is there.
pub(crate) fn json_at<R: ReadDoc>(doc: &R, ptr: &super::path::Pointer) -> Result<Json, DocError> {
    let (parents, last) = ptr.split_last().ok_or_else(|| ptr.not_found())?;
    let (obj, ty) = super::path::resolve_obj(doc, ptr, parents)?;
    let prop = super::path::prop_for(ptr, ty, doc.length(&obj), last, false)
        .map_err(|_| ptr.not_found())?;
    match doc.get(&obj, prop)? {
        Some((v, vid)) => value_to_json(doc, v, &vid),
        None => Err(ptr.not_found()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{Automerge, ROOT};
    use serde_json::json;

    fn roundtrip(v: Json, strings: StringMode) -> Json {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        for (k, v) in v.as_object().unwrap() {
            write_json(&mut tx, &ROOT, Prop::Map(k.clone()), Slot::Put, v, strings).unwrap();
        }
        tx.commit();
        to_json(&doc, &ROOT, ObjType::Map).unwrap()
    }

    #[test]
    fn json_roundtrips_in_both_string_modes() {
        let v = json!({
            "s": "héllo", "i": -3, "u": u64::MAX, "f": 1.5, "b": true, "n": null,
            "list": [1, "two", [3], {"four": 4}], "nested": {"a": {"b": {}}}, "empty": []
        });
        assert_eq!(roundtrip(v.clone(), StringMode::Scalar), v);
        assert_eq!(roundtrip(v.clone(), StringMode::Text), v);
    }

    #[test]
    fn a_doc_deeper_than_the_stack_renders_or_is_refused_cleanly() {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let mut obj = ROOT;
        for _ in 0..MAX_READ_DEPTH - 1 {
            obj = tx.put_object(&obj, "a", ObjType::Map).unwrap();
        }
        tx.put(&obj, "leaf", 1).unwrap();
        tx.commit();
        let v = to_json(&doc, &ROOT, ObjType::Map).unwrap();
        assert_eq!(json_depth(&v), MAX_READ_DEPTH);
        let mut tx = doc.transaction();
        tx.put_object(&obj, "deeper", ObjType::List).unwrap();
        tx.commit();
        let err = to_json(&doc, &ROOT, ObjType::Map).unwrap_err();
        assert!(matches!(err, DocError::TooDeep { .. }), "{err}");
        assert_eq!(json_depth(&json!({"a": [{}], "b": 1})), 3);
        assert_eq!(json_depth(&json!(1)), 0);
    }

    #[test]
    fn scalars_render_as_json() {
        assert_eq!(scalar_to_json(&ScalarValue::counter(7)), json!(7));
        assert_eq!(scalar_to_json(&ScalarValue::Timestamp(5)), json!(5));
        assert_eq!(
            scalar_to_json(&ScalarValue::Bytes(vec![1, 2])),
            json!([1, 2])
        );
        assert_eq!(scalar_to_json(&ScalarValue::F64(f64::NAN)), json!(null));
    }
}
