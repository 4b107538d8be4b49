//! Reads: a doc's JSON, snapshot, conflicts, actors, heads and history, and
//! listings, each on a blocking thread with the doc loaded and locked.

use std::collections::{BTreeSet, HashMap};

use automerge::{ActorId, ChangeHash, ObjType, ROOT, ReadDoc};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::docs::Docs;
use super::state::blocking;
use crate::doc::at::At;
use crate::doc::cache::{live, live_meta, lock_slot};
use crate::doc::heads::{in_history, peel};
use crate::doc::json::json_at;
use crate::doc::{DocError, DocId, Pointer, to_json};

/// A document read with its heads (see [`Docs::snapshot`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The document.
    pub json: Json,
    /// Its heads (hex).
    pub heads: Vec<String>,
    /// Messages of the changes since the heads asked about.
    pub messages_since: Option<Vec<Option<String>>>,
    /// The heads with the asking workflow's own changes peeled off (each
    /// replaced by what it was written on), sorted: the state that triggered
    /// it, the same on every node whether or not it has the derived writes.
    pub trigger_heads: Vec<String>,
}

/// Which state of a doc [`Docs::get_at`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadAt {
    /// The state at the heads asked for.
    Heads,
    /// The current state: a head asked for is not in the doc.
    Current,
}

/// The doc `doc` (a JSON object), or with `paths` an object of the values
/// at those JSON Pointers, `null` where one names nothing.
fn render<R: ReadDoc>(doc: &R, paths: Option<&[String]>) -> Result<Json, DocError> {
    let Some(paths) = paths else {
        return to_json(doc, &ROOT, ObjType::Map);
    };
    let mut out = serde_json::Map::new();
    for raw in paths {
        let value = match Pointer::parse(raw) {
            Ok(p) if p.is_root() => to_json(doc, &ROOT, ObjType::Map)?,
            Ok(p) => match json_at(doc, &p) {
                Ok(v) => v,
                Err(
                    DocError::PathNotFound(_)
                    | DocError::BadPath { .. }
                    | DocError::TypeMismatch { .. },
                ) => Json::Null,
                Err(e) => return Err(e),
            },
            Err(_) => Json::Null,
        };
        out.insert(raw.clone(), value);
    }
    Ok(Json::Object(out))
}

/// A document in a listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DocInfo {
    /// The document.
    pub id: String,
    /// Current heads.
    pub heads: Vec<String>,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Unix milliseconds of the last change.
    pub updated_at: u64,
}

/// Which docs a listing page holds (see [`Docs::list_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only ids that start with this.
    pub prefix: String,
    /// Only ids after this one (the last id of the previous page).
    pub after: Option<String>,
    /// At most this many.
    pub limit: usize,
    /// Include the node's system docs (`_mergeflow/...`). A prefix inside
    /// them includes them anyway.
    pub system: bool,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct DocPage {
    /// Live docs, in id order.
    pub docs: Vec<DocInfo>,
    /// More docs follow: ask again with `after` = the last id of `docs`.
    pub more: bool,
}

impl DocInfo {
    /// The listing entry of a stored doc.
    fn from_meta((id, m): (String, crate::store::DocMeta)) -> DocInfo {
        DocInfo {
            id,
            heads: m.heads,
            size_bytes: m.size_bytes,
            updated_at: m.updated_at_ms,
        }
    }
}

/// One change in a document's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HistoryEntry {
    /// Change hash (hex).
    pub hash: String,
    /// Automerge actor id (hex).
    pub actor: String,
    /// Peer id of the node whose boot used that actor, if this node knows it.
    pub peer_id: Option<String>,
    /// Sequence number of the change for its actor.
    pub seq: u64,
    /// Unix seconds, as stamped by the writer.
    pub time: i64,
    /// Commit message.
    pub message: Option<String>,
    /// Peer id of the node that admitted the change and signed it, when
    /// this node holds a valid signature for it (see `trust`).
    #[serde(default)]
    pub signed_by: Option<String>,
    /// The scoped API token (`[[api.tokens]]` name) that made the change,
    /// as its message records (`by=<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Hashes of the changes this one depends on.
    pub deps: Vec<String>,
    /// A container's genesis: the change, the same on every node, that made
    /// a container a write created implicitly (see the README's Guarantees).
    #[serde(default)]
    pub genesis: bool,
}

impl Docs {
    /// Reads document `id`, or the subtree at `path` (a JSON Pointer).
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], [`DocError::PathNotFound`].
    pub async fn get(&self, id: DocId, path: Option<Pointer>) -> Result<Json, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            let doc = &loaded.doc;
            let Some(ptr) = path.filter(|p| !p.is_root()) else {
                return to_json(doc, &ROOT, ObjType::Map);
            };
            json_at(doc, &ptr)
        })
        .await
    }

    /// Document `id` as it was at `heads` (hex; an event's heads), whole
    /// (`paths` `None`) or as an object of the values at `paths` (JSON
    /// Pointers; `null` where a path names nothing in that state). Read as
    /// [`get`](Self::get) reads, so a deleted doc is [`DocError::Deleted`];
    /// if a head is not in the doc the current state is read instead, and
    /// [`ReadAt`] says which.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], store errors.
    pub async fn get_at(
        &self,
        id: DocId,
        heads: Vec<String>,
        paths: Option<Vec<String>>,
    ) -> Result<(Json, ReadAt), DocError> {
        self.with_doc(id, move |_, id, loaded| {
            let current = &live_meta(id, loaded)?.heads;
            let doc = &loaded.doc;
            let same = |a: &[String], b: &[String]| {
                let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
                set(a) == set(b)
            };
            if same(&heads, current) {
                return Ok((render(doc, paths.as_deref())?, ReadAt::Heads));
            }
            let hashes: Vec<ChangeHash> = heads.iter().filter_map(|h| h.parse().ok()).collect();
            match At::new(doc, &hashes).filter(|_| hashes.len() == heads.len()) {
                Some(at) => Ok((render(&at, paths.as_deref())?, ReadAt::Heads)),
                None => Ok((render(doc, paths.as_deref())?, ReadAt::Current)),
            }
        })
        .await
    }

    /// Document `id` and its heads, read together, with the messages of the
    /// changes made since `since` (hex heads; `None` if one is not in the doc).
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn snapshot(
        &self,
        id: DocId,
        since: Vec<String>,
        own: Option<String>,
    ) -> Result<Snapshot, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            let heads = live_meta(id, loaded)?.heads.clone();
            let since: Option<Vec<ChangeHash>> = since.iter().map(|h| h.parse().ok()).collect();
            let messages = since
                .filter(|s| {
                    s.iter()
                        .all(|h| loaded.doc.get_change_meta_by_hash(h).is_some())
                })
                .map(|s| {
                    loaded
                        .doc
                        .get_changes_meta(&s)
                        .into_iter()
                        .map(|c| c.message.map(|m| m.into_owned()))
                        .collect()
                });
            let trigger_heads = match &own {
                Some(w) => peel(&loaded.doc, w),
                None => heads.clone(),
            };
            Ok(Snapshot {
                json: to_json(&loaded.doc, &ROOT, ObjType::Map)?,
                heads,
                messages_since: messages,
                trigger_heads,
            })
        })
        .await
    }

    /// The conflicted places of document `id` whose JSON Pointer `wanted`
    /// accepts (see [`super::conflict`]).
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn conflicts(
        &self,
        id: DocId,
        wanted: Box<dyn Fn(&str) -> bool + Send>,
    ) -> Result<Vec<crate::doc::conflict::Conflict>, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            crate::doc::conflict::conflicts(&loaded.doc, &*wanted)
        })
        .await
    }

    /// True if every change in `older` (hex hashes) is in the history of
    /// the state `newer` (the state itself included); false if a hash is
    /// not in the doc.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn covers(
        &self,
        id: DocId,
        older: Vec<String>,
        newer: Vec<String>,
    ) -> Result<bool, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            let parse = |v: &[String]| -> Option<Vec<ChangeHash>> {
                v.iter().map(|h| h.parse().ok()).collect()
            };
            let (Some(older), Some(newer)) = (parse(&older), parse(&newer)) else {
                return Ok(false);
            };
            let doc = &loaded.doc;
            let known = older
                .iter()
                .all(|h| doc.get_change_meta_by_hash(h).is_some());
            Ok(known && in_history(doc, &older, &newer))
        })
        .await
    }

    /// The Automerge actors (hex) that wrote changes `heads` (hex hashes;
    /// one not in the doc is left out) of document `id`, or with `None`
    /// every change in its history; sorted, without repeats.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`].
    pub async fn actors(
        &self,
        id: DocId,
        heads: Option<Vec<String>>,
    ) -> Result<Vec<String>, DocError> {
        self.with_doc(id, move |_, id, loaded| {
            live_meta(id, loaded)?;
            let doc = &loaded.doc;
            let metas = match heads {
                Some(heads) => heads
                    .iter()
                    .filter_map(|h| h.parse::<ChangeHash>().ok())
                    .filter_map(|h| doc.get_change_meta_by_hash(&h))
                    .collect(),
                None => doc.get_changes_meta(&[]),
            };
            let mut out: Vec<String> = metas.iter().map(|c| c.actor.to_hex_string()).collect();
            out.sort();
            out.dedup();
            Ok(out)
        })
        .await
    }

    /// Current heads of document `id`: from memory if the doc is loaded
    /// (it may be ahead of the store), else from its stored metadata,
    /// without loading the doc (a doc not in the cache has nothing newer).
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], store errors.
    pub async fn heads(&self, id: DocId) -> Result<Vec<String>, DocError> {
        let inner = self.inner.clone();
        blocking(move || {
            if let Some(slot) = inner.cache.cached(&id)
                && let Some(loaded) = lock_slot(&slot).as_ref()
            {
                return Ok(live_meta(&id, loaded)?.heads.clone());
            }
            let meta = inner.store.doc_meta(id.as_str())?;
            Ok(live(&id, meta.as_ref())?.heads.clone())
        })
        .await
    }

    /// Every change of document `id`, in causal order.
    ///
    /// # Errors
    /// [`DocError::NotFound`], [`DocError::Deleted`], store errors.
    pub async fn history(&self, id: DocId) -> Result<Vec<HistoryEntry>, DocError> {
        self.with_doc(id, |inner, id, loaded| {
            live_meta(id, loaded)?;
            let mut peers: HashMap<ActorId, Option<String>> = HashMap::new();
            let sigs = inner.store.sigs(id.as_str())?;
            let mut out = Vec::new();
            for c in loaded.doc.get_changes_meta(&[]) {
                let actor = c.actor.into_owned();
                let peer_id = match peers.get(&actor) {
                    Some(p) => p.clone(),
                    None => {
                        let p = inner.store.actor(&actor)?.map(|r| r.peer_id);
                        peers.insert(actor.clone(), p.clone());
                        p
                    }
                };
                // Geneses carry no message and no time (`doc::container`).
                let genesis =
                    c.message.is_none() && c.timestamp == 0 && c.seq == 1 && peer_id.is_none();
                let signed_by = sigs
                    .get(&c.hash.0)
                    .and_then(|b| crate::trust::ChangeSig::from_bytes(b))
                    .filter(|s| s.verify(id.as_str(), &c.hash.0))
                    .and_then(|s| s.peer_id())
                    .map(|p| p.to_string());
                out.push(HistoryEntry {
                    signed_by,
                    genesis,
                    hash: c.hash.to_string(),
                    actor: actor.to_hex_string(),
                    peer_id,
                    seq: c.seq,
                    time: c.timestamp,
                    by: c
                        .message
                        .as_deref()
                        .and_then(|m| crate::doc::stamp::Stamp::parse(m).by),
                    message: c.message.map(|m| m.into_owned()),
                    deps: c.deps.iter().map(|h| h.to_string()).collect(),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Lists live documents in id order.
    ///
    /// # Errors
    /// Store errors.
    pub async fn list(&self) -> Result<Vec<DocInfo>, DocError> {
        let store = self.inner.store.clone();
        blocking(move || {
            Ok(store
                .list_docs()?
                .into_iter()
                .filter(|(_, m)| m.deleted_at_ms.is_none())
                .map(DocInfo::from_meta)
                .collect())
        })
        .await
    }

    /// One page of live documents, in id order (see [`ListQuery`]).
    ///
    /// # Errors
    /// Store errors.
    pub async fn list_page(&self, q: ListQuery) -> Result<DocPage, DocError> {
        let store = self.inner.store.clone();
        blocking(move || {
            let system = q.system || q.prefix.starts_with(crate::doc::SYSTEM_PREFIX);
            let keep = |id: &str, m: &crate::store::DocMeta| {
                m.deleted_at_ms.is_none() && (system || !id.starts_with(crate::doc::SYSTEM_PREFIX))
            };
            let (docs, more) =
                store.list_docs_page(&q.prefix, q.after.as_deref(), q.limit, keep)?;
            let docs = docs.into_iter().map(DocInfo::from_meta).collect();
            Ok(DocPage { docs, more })
        })
        .await
    }
}
