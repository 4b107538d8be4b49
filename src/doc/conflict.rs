//! Conflicts: where concurrent writes left more than one value at a place
//! in a doc, each value with what its change says about itself (see
//! [`super::stamp`]). Read by `resolve` workflow steps, which pick a winner
//! by policy.

use std::collections::HashMap;

use automerge::{ActorId, Automerge, ObjId, ObjType, Prop, ROOT, ReadDoc, Value};
use serde_json::Value as Json;

use super::DocError;
use super::json::value_to_json;
use super::path::push_prop;
use super::stamp::Stamp;

/// Deepest level searched for conflicts.
const MAX_DEPTH: usize = 32;

/// The values concurrent writes left at one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// JSON Pointer of the place.
    pub path: String,
    /// The value reads return now (Automerge's own pick).
    pub visible: Json,
    /// Every value, with who wrote it.
    pub values: Vec<ConflictValue>,
}

/// One of the values at a conflicted place.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictValue {
    /// The value.
    pub value: Json,
    /// Actor (hex) of the change that wrote it.
    pub actor: String,
    /// Op counter of the write.
    pub counter: u64,
    /// What that change says about itself.
    pub stamp: Stamp,
}

/// Every conflicted place in `doc` whose JSON Pointer `wanted` accepts.
///
/// # Errors
/// Automerge read errors.
pub fn conflicts(
    doc: &Automerge,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Vec<Conflict>, DocError> {
    let mut found = Vec::new();
    walk(
        doc,
        &ROOT,
        ObjType::Map,
        String::new(),
        0,
        wanted,
        &mut found,
    )?;
    if found.is_empty() {
        return Ok(vec![]);
    }
    // Which change made each op: (actor, first op counter, op count) -> stamp.
    let mut by_actor: HashMap<ActorId, Vec<(u64, u64, Stamp)>> = HashMap::new();
    for c in doc.get_changes_meta(&[]) {
        let stamp = c.message.as_deref().map(Stamp::parse).unwrap_or_default();
        let ops = (c.max_op + 1).saturating_sub(c.start_op);
        by_actor
            .entry(c.actor.into_owned())
            .or_default()
            .push((c.start_op, ops, stamp));
    }
    let mut out = Vec::with_capacity(found.len());
    for (path, visible, raw) in found {
        let values = raw
            .into_iter()
            .map(|(value, actor, counter)| {
                let stamp = by_actor
                    .get(&actor)
                    .and_then(|v| {
                        v.iter()
                            .find(|(start, len, _)| (*start..start + len).contains(&counter))
                    })
                    .map(|(start, _, s)| {
                        // A coalesced change: the key of the write that made
                        // this op (see `Stamp::key_at`).
                        let mut s = s.clone();
                        if !s.also.is_empty() {
                            s.idem = s.key_at(counter - start).map(str::to_string);
                        }
                        s
                    })
                    .unwrap_or_default();
                ConflictValue {
                    value,
                    actor: actor.to_hex_string(),
                    counter,
                    stamp,
                }
            })
            .collect();
        out.push(Conflict {
            path,
            visible,
            values,
        });
    }
    Ok(out)
}

type Found = Vec<(String, Json, Vec<(Json, ActorId, u64)>)>;

fn walk(
    doc: &Automerge,
    obj: &ObjId,
    ty: ObjType,
    at: String,
    depth: usize,
    wanted: &dyn Fn(&str) -> bool,
    found: &mut Found,
) -> Result<(), DocError> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let props: Vec<Prop> = match ty {
        ObjType::Map | ObjType::Table => doc.keys(obj).map(Prop::Map).collect(),
        ObjType::List => (0..doc.length(obj)).map(Prop::Seq).collect(),
        ObjType::Text => return Ok(()),
    };
    for prop in props {
        let mut path = at.clone();
        push_prop(&mut path, &prop);
        let all = doc.get_all(obj, prop.clone())?;
        if all.len() > 1 && wanted(&path) {
            let mut raw = Vec::with_capacity(all.len());
            for (v, id) in &all {
                let value = value_to_json(doc, v.clone(), id)?;
                if let ObjId::Id(counter, actor, _) = id {
                    raw.push((value, actor.clone(), *counter));
                }
            }
            let visible = match doc.get(obj, prop.clone())? {
                Some((v, id)) => value_to_json(doc, v, &id)?,
                None => Json::Null,
            };
            found.push((path.clone(), visible, raw));
        }
        if let Some((Value::Object(child_ty), child)) = doc.get(obj, prop)? {
            walk(doc, &child, child_ty, path, depth + 1, wanted, found)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::{CommitOptions, Transactable};

    #[test]
    fn a_coalesced_change_gives_each_value_the_key_of_the_write_that_made_it() {
        // Node A coalesced writes k1 (/a = 1) and k2 (/t = 20); node B wrote
        // /t = 21 under k3 at the same time.
        let mut a = Automerge::new();
        a.set_actor(ActorId::from(&[1u8; 16][..]));
        let mut b = a.fork();
        b.set_actor(ActorId::from(&[2u8; 16][..]));
        let mut tx = a.transaction();
        tx.put(ROOT, "a", 1).unwrap();
        tx.put(ROOT, "t", 20).unwrap();
        tx.commit_with(
            CommitOptions::default()
                .with_message("ops hlc=5 prio=0 idem=k1 idem=k2 at=1".to_string()),
        );
        let mut tx = b.transaction();
        tx.put(ROOT, "t", 21).unwrap();
        tx.commit_with(
            CommitOptions::default().with_message("ops hlc=6 prio=0 idem=k3".to_string()),
        );
        a.merge(&mut b).unwrap();
        let found = conflicts(&a, &|_| true).unwrap();
        assert_eq!(found.len(), 1);
        let mut keys: Vec<(Json, Option<String>)> = found[0]
            .values
            .iter()
            .map(|v| (v.value.clone(), v.stamp.idem.clone()))
            .collect();
        keys.sort_by_key(|(v, _)| v.as_i64());
        assert_eq!(
            keys,
            [
                (Json::from(20), Some("k2".to_string())),
                (Json::from(21), Some("k3".to_string()))
            ]
        );
    }
}
