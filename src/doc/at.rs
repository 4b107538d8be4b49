//! A doc as it was at some heads: a [`ReadDoc`] whose every read answers
//! as its `_at` form would at those heads, so that code written against
//! `ReadDoc` (the JSON rendering, path lookups) reads a past state without
//! a copy of the doc. Automerge computes the state's clock per read (from a
//! cache of clocks; nothing at all when the heads are the doc's current
//! ones), so a whole-doc rendering costs about what a current one does.

use std::ops::RangeBounds;

use automerge::hydrate;
use automerge::iter::{DocIter, Keys, ListRange, MapRange, Spans, Values};
use automerge::marks::{Mark, MarkSet};
use automerge::{
    Automerge, AutomergeError, Change, ChangeHash, Cursor, CursorPosition, MoveCursor, ObjId,
    ObjType, Parents, Prop, ReadDoc, Stats, TextEncoding, Value,
};

/// `doc` at `heads` (see the module doc).
#[derive(Clone, Copy)]
pub struct At<'a> {
    doc: &'a Automerge,
    heads: &'a [ChangeHash],
}

impl<'a> At<'a> {
    /// `doc` at `heads`; `None` if `heads` is empty or holds a change that
    /// is not in `doc`.
    pub fn new(doc: &'a Automerge, heads: &'a [ChangeHash]) -> Option<At<'a>> {
        let known = heads
            .iter()
            .all(|h| doc.get_change_meta_by_hash(h).is_some());
        (known && !heads.is_empty()).then_some(At { doc, heads })
    }
}

impl ReadDoc for At<'_> {
    fn parents<O: AsRef<ObjId>>(&self, obj: O) -> Result<Parents<'_>, AutomergeError> {
        self.doc.parents_at(obj, self.heads)
    }

    fn parents_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<Parents<'_>, AutomergeError> {
        self.doc.parents_at(obj, heads)
    }

    fn keys<O: AsRef<ObjId>>(&self, obj: O) -> Keys<'_> {
        self.doc.keys_at(obj, self.heads)
    }

    fn keys_at<O: AsRef<ObjId>>(&self, obj: O, heads: &[ChangeHash]) -> Keys<'_> {
        self.doc.keys_at(obj, heads)
    }

    fn iter_at<O: AsRef<ObjId>>(&self, obj: O, heads: Option<&[ChangeHash]>) -> DocIter<'_> {
        self.doc.iter_at(obj, heads.or(Some(self.heads)))
    }

    fn map_range<'b, O: AsRef<ObjId>, R: RangeBounds<String> + 'b>(
        &'b self,
        obj: O,
        range: R,
    ) -> MapRange<'b> {
        self.doc.map_range_at(obj, range, self.heads)
    }

    fn map_range_at<'b, O: AsRef<ObjId>, R: RangeBounds<String> + 'b>(
        &'b self,
        obj: O,
        range: R,
        heads: &[ChangeHash],
    ) -> MapRange<'b> {
        self.doc.map_range_at(obj, range, heads)
    }

    fn list_range<O: AsRef<ObjId>, R: RangeBounds<usize>>(
        &self,
        obj: O,
        range: R,
    ) -> ListRange<'_> {
        self.doc.list_range_at(obj, range, self.heads)
    }

    fn list_range_at<O: AsRef<ObjId>, R: RangeBounds<usize>>(
        &self,
        obj: O,
        range: R,
        heads: &[ChangeHash],
    ) -> ListRange<'_> {
        self.doc.list_range_at(obj, range, heads)
    }

    fn values<O: AsRef<ObjId>>(&self, obj: O) -> Values<'_> {
        self.doc.values_at(obj, self.heads)
    }

    fn values_at<O: AsRef<ObjId>>(&self, obj: O, heads: &[ChangeHash]) -> Values<'_> {
        self.doc.values_at(obj, heads)
    }

    fn length<O: AsRef<ObjId>>(&self, obj: O) -> usize {
        self.doc.length_at(obj, self.heads)
    }

    fn length_at<O: AsRef<ObjId>>(&self, obj: O, heads: &[ChangeHash]) -> usize {
        self.doc.length_at(obj, heads)
    }

    fn object_type<O: AsRef<ObjId>>(&self, obj: O) -> Result<ObjType, AutomergeError> {
        self.doc.object_type(obj)
    }

    fn marks<O: AsRef<ObjId>>(&self, obj: O) -> Result<Vec<Mark>, AutomergeError> {
        self.doc.marks_at(obj, self.heads)
    }

    fn marks_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<Vec<Mark>, AutomergeError> {
        self.doc.marks_at(obj, heads)
    }

    fn get_marks<O: AsRef<ObjId>>(
        &self,
        obj: O,
        index: usize,
        heads: Option<&[ChangeHash]>,
    ) -> Result<MarkSet, AutomergeError> {
        self.doc.get_marks(obj, index, heads.or(Some(self.heads)))
    }

    fn text<O: AsRef<ObjId>>(&self, obj: O) -> Result<String, AutomergeError> {
        self.doc.text_at(obj, self.heads)
    }

    fn text_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<String, AutomergeError> {
        self.doc.text_at(obj, heads)
    }

    fn spans<O: AsRef<ObjId>>(&self, obj: O) -> Result<Spans<'_>, AutomergeError> {
        self.doc.spans_at(obj, self.heads)
    }

    fn spans_at<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: &[ChangeHash],
    ) -> Result<Spans<'_>, AutomergeError> {
        self.doc.spans_at(obj, heads)
    }

    fn get_cursor<O: AsRef<ObjId>, I: Into<CursorPosition>>(
        &self,
        obj: O,
        position: I,
        at: Option<&[ChangeHash]>,
    ) -> Result<Cursor, AutomergeError> {
        self.doc.get_cursor(obj, position, at.or(Some(self.heads)))
    }

    fn get_cursor_moving<O: AsRef<ObjId>, I: Into<CursorPosition>>(
        &self,
        obj: O,
        position: I,
        at: Option<&[ChangeHash]>,
        move_cursor: MoveCursor,
    ) -> Result<Cursor, AutomergeError> {
        self.doc
            .get_cursor_moving(obj, position, at.or(Some(self.heads)), move_cursor)
    }

    fn get_cursor_position<O: AsRef<ObjId>>(
        &self,
        obj: O,
        cursor: &Cursor,
        at: Option<&[ChangeHash]>,
    ) -> Result<usize, AutomergeError> {
        self.doc
            .get_cursor_position(obj, cursor, at.or(Some(self.heads)))
    }

    fn get<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
    ) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_at(obj, prop, self.heads)
    }

    fn get_at<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
        heads: &[ChangeHash],
    ) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_at(obj, prop, heads)
    }

    fn hydrate<O: AsRef<ObjId>>(
        &self,
        obj: O,
        heads: Option<&[ChangeHash]>,
    ) -> Result<hydrate::Value, AutomergeError> {
        // Automerge has an inherent `hydrate` of another shape.
        ReadDoc::hydrate(self.doc, obj, heads.or(Some(self.heads)))
    }

    fn get_all<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
    ) -> Result<Vec<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_all_at(obj, prop, self.heads)
    }

    fn get_all_at<O: AsRef<ObjId>, P: Into<Prop>>(
        &self,
        obj: O,
        prop: P,
        heads: &[ChangeHash],
    ) -> Result<Vec<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_all_at(obj, prop, heads)
    }

    fn get_missing_deps(&self, heads: &[ChangeHash]) -> Vec<ChangeHash> {
        self.doc.get_missing_deps(heads)
    }

    fn get_change_by_hash(&self, hash: &ChangeHash) -> Option<Change> {
        self.doc.get_change_by_hash(hash)
    }

    fn stats(&self) -> Stats {
        self.doc.stats()
    }

    fn text_encoding(&self) -> TextEncoding {
        self.doc.text_encoding()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::json::{StringMode, json_at, to_json};
    use crate::doc::{Pointer, apply_merge_patch};
    use automerge::ROOT;
    use serde_json::json;

    fn patch(doc: &mut Automerge, p: serde_json::Value) -> Vec<ChangeHash> {
        let mut tx = doc.transaction();
        apply_merge_patch(&mut tx, &p, StringMode::Text).unwrap();
        tx.commit();
        doc.get_heads()
    }

    #[test]
    fn reads_the_state_at_the_heads_not_the_current_one() {
        let mut doc = Automerge::new();
        let first = patch(
            &mut doc,
            json!({"n": 1, "name": "ab", "list": [1, 2], "gone": true}),
        );
        let second = patch(
            &mut doc,
            json!({"n": 2, "name": "abc", "list": [3], "gone": null, "new": {"x": 1}}),
        );
        let at = At::new(&doc, &first).unwrap();
        assert_eq!(
            to_json(&at, &ROOT, ObjType::Map).unwrap(),
            json!({"n": 1, "name": "ab", "list": [1, 2], "gone": true})
        );
        let ptr = |p: &str| Pointer::parse(p).unwrap();
        assert_eq!(json_at(&at, &ptr("/list/1")).unwrap(), json!(2));
        assert!(json_at(&at, &ptr("/new/x")).is_err(), "not there yet");
        let now = At::new(&doc, &second).unwrap();
        assert_eq!(
            to_json(&now, &ROOT, ObjType::Map).unwrap(),
            to_json(&doc, &ROOT, ObjType::Map).unwrap()
        );
    }

    #[test]
    fn heads_the_doc_lacks_are_refused() {
        let mut doc = Automerge::new();
        let mut other = Automerge::new();
        patch(&mut doc, json!({"a": 1}));
        let foreign = patch(&mut other, json!({"b": 1}));
        assert!(At::new(&doc, &foreign).is_none());
        assert!(At::new(&doc, &[]).is_none());
    }
}
