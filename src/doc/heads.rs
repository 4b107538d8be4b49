//! Where a doc's heads stand in its history: whether one set of heads is
//! in the history of another, and the heads a doc had before its own last
//! local changes.

use automerge::{Automerge, ChangeHash};

/// `doc`'s heads, with every head that workflow `own` wrote replaced by its
/// deps until none is (at most 1,000 steps; a long chain stops there).
pub(crate) fn peel(doc: &Automerge, own: &str) -> Vec<String> {
    let mut heads: std::collections::BTreeSet<ChangeHash> = doc.get_heads().into_iter().collect();
    for _ in 0..1000 {
        let mine = heads.iter().copied().find(|h| {
            doc.get_change_meta_by_hash(h)
                .and_then(|c| {
                    c.message
                        .as_deref()
                        .and_then(crate::feed::Cause::from_message)
                })
                .is_some_and(|c| c.workflow == own)
        });
        let Some(h) = mine else { break };
        heads.remove(&h);
        if let Some(c) = doc.get_change_meta_by_hash(&h) {
            heads.extend(c.deps.iter().copied());
        }
    }
    heads.iter().map(|h| h.to_string()).collect()
}

/// True if every change in `older` is in the history of state `newer` (the
/// state included): none is among the changes `newer` lacks. False if a
/// hash of `newer` is not in `doc` (then nobody can tell).
pub(crate) fn in_history(doc: &Automerge, older: &[ChangeHash], newer: &[ChangeHash]) -> bool {
    if newer
        .iter()
        .any(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        return false;
    }
    let outside: std::collections::HashSet<ChangeHash> =
        doc.get_changes_meta(newer).iter().map(|c| c.hash).collect();
    older.iter().all(|h| !outside.contains(h))
}
