//! Containers with deterministic identity: why two nodes that create the same
//! missing object, list or counter at once keep both of their writes.
//!
//! In Automerge an object's identity is the id of the operation that made it
//! (a counter and the writing actor). When two nodes each find `/readings`
//! missing and create it, they make two different lists at one key: a
//! conflict, of which Automerge shows one, so everything written into the
//! other vanishes from view. The same holds for a counter two nodes create by
//! incrementing an absent key, and for the objects a merge patch creates.
//!
//! So a container that a write creates *implicitly* (a missing parent of an
//! op's path, an absent counter that `increment` creates, an absent list that
//! `-` appends to, an object a merge patch merges into where none exists) is
//! not made by the write's own change. It is made by a *genesis change* whose
//! every byte is a function of where the container goes:
//!
//! - actor: the first 16 bytes of SHA-256 over the parent's object id, the
//!   key, the kind (map, list, counter) and a generation number;
//! - seq 1, time 0, no message; one op (`make` the map or list, or put a
//!   counter of 0) with no predecessors;
//! - deps: the change that made the parent (none for the root), and start op
//!   one past that change's last op.
//!
//! Every node that creates that container computes the same change, with the
//! same hash, and Automerge stores a change once: the nodes' writes land in
//! one container. The write's own change follows its geneses and depends on
//! them. A container that was deleted and is created again takes the next
//! generation (the first whose genesis the doc does not hold yet).
//!
//! Values a write sets explicitly (`set /a {"x": 1}`, a merge patch's arrays)
//! are new values, not implicit containers: two nodes setting one key at once
//! is a real conflict, and the value with the greater op id wins everywhere.
//!
//! The writer finds out which containers a write needs by running it once on
//! a transaction that it then rolls back, while a [`Creator`] records what it
//! created; then it applies the geneses and runs the write again for real.
//! Writes that create no container run once.

use std::collections::HashMap;

use automerge::legacy::{self, ObjectId, OpId, OpType};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue};
use sha2::{Digest, Sha256};

use super::DocError;

/// What kind of container a write creates implicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An object.
    Map,
    /// A list.
    List,
    /// A counter (starting at 0).
    Counter,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Map => "map",
            Kind::List => "list",
            Kind::Counter => "counter",
        }
    }
}

/// Where a recorded container's parent is.
enum Parent {
    /// An object the doc already holds.
    Existing(ObjId),
    /// Another container this write creates (an index into `needed`).
    New(usize),
}

struct Needed {
    parent: Parent,
    key: String,
    kind: Kind,
}

/// Creates the containers a write needs; while recording, remembers them so
/// that [`Creator::geneses`] can give them deterministic identities.
pub(crate) struct Creator {
    recording: bool,
    needed: Vec<Needed>,
    /// Object ids made in the trial run -> their index in `needed`.
    made: HashMap<ObjId, usize>,
}

impl Creator {
    /// For the trial run: creates and records.
    pub(crate) fn recording() -> Creator {
        Creator {
            recording: true,
            needed: Vec::new(),
            made: HashMap::new(),
        }
    }

    /// Creates without recording: for writes that cannot be run twice (a
    /// library closure) and for the second run, where every container exists.
    pub(crate) fn plain() -> Creator {
        Creator {
            recording: false,
            ..Creator::recording()
        }
    }

    /// True when nothing was recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.needed.is_empty()
    }

    /// Creates the missing container `kind` at map key `key` of `obj` and
    /// returns its id (for a counter: `obj`; the counter is at `key`).
    ///
    /// # Errors
    /// Automerge errors.
    pub(crate) fn create<T: Transactable>(
        &mut self,
        tx: &mut T,
        obj: &ObjId,
        key: &str,
        kind: Kind,
    ) -> Result<ObjId, DocError> {
        let id = match kind {
            Kind::Map => tx.put_object(obj, key, ObjType::Map)?,
            Kind::List => tx.put_object(obj, key, ObjType::List)?,
            Kind::Counter => {
                tx.put(obj, key, ScalarValue::counter(0))?;
                obj.clone()
            }
        };
        if self.recording {
            let parent = match self.made.get(obj) {
                Some(&i) => Parent::New(i),
                None => Parent::Existing(obj.clone()),
            };
            self.needed.push(Needed {
                parent,
                key: key.to_string(),
                kind,
            });
            if kind != Kind::Counter {
                self.made.insert(id.clone(), self.needed.len() - 1);
            }
        }
        Ok(id)
    }

    /// The genesis changes of the recorded containers, in dependency order,
    /// for `doc` as it was before the trial run.
    ///
    /// # Errors
    /// [`DocError::Internal`] if a parent's change cannot be found.
    pub(crate) fn geneses(&self, doc: &Automerge) -> Result<Vec<Change>, DocError> {
        let mut out: Vec<Change> = Vec::with_capacity(self.needed.len());
        // Per recorded container: its object id as text, and its op id.
        let mut ids: Vec<(String, u64, ActorId)> = Vec::with_capacity(self.needed.len());
        for need in &self.needed {
            let (parent_text, parent_obj, deps, start_op) = match &need.parent {
                Parent::Existing(ObjId::Root) => ("_root".to_string(), ObjectId::Root, vec![], 1),
                Parent::Existing(obj @ ObjId::Id(counter, actor, _)) => {
                    let missing = || DocError::Internal(format!("no change made object {obj}"));
                    let hash = doc.hash_for_opid(obj).ok_or_else(missing)?;
                    let change = doc.get_change_by_hash(&hash).ok_or_else(missing)?;
                    (
                        obj.to_string(),
                        ObjectId::Id(OpId(*counter, actor.clone())),
                        vec![hash],
                        change.max_op() + 1,
                    )
                }
                Parent::New(i) => {
                    let (text, counter, actor) = &ids[*i];
                    let hash = out[*i].hash();
                    (
                        text.clone(),
                        ObjectId::Id(OpId(*counter, actor.clone())),
                        vec![hash],
                        counter + 1,
                    )
                }
            };
            let mut generation = 0u32;
            let change = loop {
                let actor = genesis_actor(&parent_text, &need.key, need.kind, generation);
                let change = genesis_change(
                    actor,
                    parent_obj.clone(),
                    &need.key,
                    need.kind,
                    deps.clone(),
                    start_op,
                );
                let hash = change.hash();
                if doc.get_change_by_hash(&hash).is_none() && out.iter().all(|c| c.hash() != hash) {
                    break change;
                }
                generation += 1;
            };
            let actor = change.actor_id().clone();
            ids.push((format!("{start_op}@{actor}"), start_op, actor));
            out.push(change);
        }
        Ok(out)
    }
}

/// The actor of a genesis change: a function of where the container goes.
fn genesis_actor(parent: &str, key: &str, kind: Kind, generation: u32) -> ActorId {
    let mut h = Sha256::new();
    h.update(b"mergeflow/container/1\0");
    h.update(parent.as_bytes());
    h.update(b"\0");
    h.update(key.as_bytes());
    h.update(b"\0");
    h.update(kind.tag().as_bytes());
    h.update(generation.to_be_bytes());
    ActorId::from(&h.finalize()[..16])
}

fn genesis_change(
    actor: ActorId,
    obj: ObjectId,
    key: &str,
    kind: Kind,
    deps: Vec<ChangeHash>,
    start_op: u64,
) -> Change {
    let action = match kind {
        Kind::Map => OpType::Make(ObjType::Map),
        Kind::List => OpType::Make(ObjType::List),
        Kind::Counter => OpType::Put(ScalarValue::counter(0)),
    };
    let op = legacy::Op {
        action,
        obj,
        key: legacy::Key::Map(key.into()),
        pred: legacy::SortedVec::new(),
        insert: false,
    };
    let expanded = automerge::ExpandedChange {
        operations: vec![op],
        actor_id: actor,
        hash: None,
        seq: 1,
        start_op: std::num::NonZeroU64::new(start_op).unwrap_or(std::num::NonZeroU64::MIN),
        time: 0,
        message: None,
        deps,
        extra_bytes: vec![],
        author: None,
    };
    Change::from(expanded)
}

/// The JSON Pointers of the containers `geneses` made in `doc` (which holds
/// them), for the change feed: the write's own patch log does not see them.
pub(crate) fn genesis_paths(doc: &Automerge, geneses: &[Change]) -> Vec<String> {
    let mut out = Vec::new();
    for change in geneses {
        let expanded = change.decode();
        let Some(op) = expanded.operations.first() else {
            continue;
        };
        let legacy::Key::Map(key) = &op.key else {
            continue;
        };
        let mut pointer = String::new();
        if let ObjectId::Id(OpId(counter, actor)) = &op.obj {
            let Some(parents) = doc
                .import_obj(&format!("{counter}@{actor}"))
                .ok()
                .and_then(|obj| doc.parents(obj).ok())
            else {
                continue;
            };
            let mut steps: Vec<_> = parents.map(|p| p.prop).collect();
            steps.reverse();
            for prop in &steps {
                super::path::push_prop(&mut pointer, prop);
            }
        }
        super::path::push_prop(&mut pointer, &automerge::Prop::Map(key.to_string()));
        out.push(pointer);
    }
    out
}

/// How deep the objects created by `changes` nest in `doc` (which holds
/// them): the deepest, or `None` when they create none. Each object's depth
/// is its parent's plus one; parents made by earlier changes of the list are
/// looked up in a map, others in the doc (their path to the root).
pub(crate) fn created_depth(doc: &Automerge, changes: &[Change]) -> Option<usize> {
    let mut depths: HashMap<(u64, ActorId), usize> = HashMap::new();
    let mut deepest = None;
    for change in changes {
        let expanded = change.decode();
        let start = expanded.start_op.get();
        for (i, op) in expanded.operations.iter().enumerate() {
            if !matches!(op.action, OpType::Make(_)) {
                continue;
            }
            let parent = match &op.obj {
                ObjectId::Root => 0,
                ObjectId::Id(OpId(counter, actor)) => {
                    match depths.get(&(*counter, actor.clone())) {
                        Some(d) => *d,
                        None => existing_depth(doc, *counter, actor),
                    }
                }
            };
            let depth = parent + 1;
            depths.insert((start + i as u64, expanded.actor_id.clone()), depth);
            deepest = deepest.max(Some(depth));
        }
    }
    deepest
}

/// The depth of an object the doc holds (0 if it cannot be found).
fn existing_depth(doc: &Automerge, counter: u64, actor: &ActorId) -> usize {
    doc.import_obj(&format!("{counter}@{actor}"))
        .ok()
        .and_then(|obj| doc.parents(obj).ok())
        .map_or(0, |parents| parents.count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ROOT;

    fn trial(doc: &mut Automerge, key: &str, kind: Kind) -> Vec<Change> {
        let mut creator = Creator::recording();
        let mut tx = doc.transaction();
        let a = creator.create(&mut tx, &ROOT, key, Kind::Map).unwrap();
        creator.create(&mut tx, &a, "inner", kind).unwrap();
        tx.rollback();
        creator.geneses(doc).unwrap()
    }

    #[test]
    fn two_docs_make_the_same_container() {
        let mut a = Automerge::new();
        let mut b = Automerge::new();
        let ga = trial(&mut a, "x", Kind::List);
        let gb = trial(&mut b, "x", Kind::List);
        assert_eq!(ga.len(), 2);
        let hashes = |g: &[Change]| g.iter().map(|c| c.hash()).collect::<Vec<_>>();
        assert_eq!(hashes(&ga), hashes(&gb));
        a.apply_changes(ga).unwrap();
        b.apply_changes(gb).unwrap();
        let (_, x) = a.get(ROOT, "x").unwrap().unwrap();
        let (_, inner) = a.get(&x, "inner").unwrap().unwrap();
        a.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.insert(&inner, 0, "from a")?;
            Ok(())
        })
        .unwrap();
        let (_, inner_b) = b
            .get(&b.get(ROOT, "x").unwrap().unwrap().1, "inner")
            .unwrap()
            .unwrap();
        b.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.insert(&inner_b, 0, "from b")?;
            Ok(())
        })
        .unwrap();
        a.merge(&mut b).unwrap();
        assert_eq!(a.length(&inner), 2);
        assert_eq!(created_depth(&a, &a.get_changes(&[])), Some(2));
    }

    #[test]
    fn a_deleted_container_comes_back_with_a_new_identity() {
        let mut doc = Automerge::new();
        let first = trial(&mut doc, "x", Kind::Map);
        doc.apply_changes(first.clone()).unwrap();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| tx.delete(ROOT, "x"))
            .unwrap();
        let again = trial(&mut doc, "x", Kind::Map);
        assert_ne!(first[0].hash(), again[0].hash());
        doc.apply_changes(again).unwrap();
        assert!(doc.get(ROOT, "x").unwrap().is_some());
    }
}
