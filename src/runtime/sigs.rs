//! Change signatures on the writer thread (see `crate::trust`): checking
//! those peers send with their changes before anything is stored, signing
//! what this node vouches for, and finding the signatures of the changes
//! it sends.

use std::collections::{HashMap, HashSet};

use super::state::Inner;
use crate::doc::DocId;

/// A change hash and its encoded signature.
pub(super) type HashSig = ([u8; 32], Vec<u8>);

/// A round's signatures.
#[derive(Default)]
pub(super) struct SigBook {
    /// Signatures peers sent with the changes of this round, by (doc,
    /// change hash); kept with a change that is stored if they verify.
    offered: HashMap<(String, [u8; 32]), Vec<u8>>,
    /// Signatures of the changes stored this round (not in sled until the
    /// batch applies), by (doc, change hash).
    accepted: HashMap<(String, [u8; 32]), Vec<u8>>,
    /// This node vouches for what it merges now (a restore or import, an
    /// automerge-repo client's changes): a change without a valid offered
    /// signature is signed with this node's identity.
    pub(super) vouch: bool,
    /// The signer of the last change refused by the rules (a valid
    /// signature by a node that may not write the doc).
    pub(super) refused_signer: Option<String>,
    /// Signatures offered in earlier rounds that no stored change used yet
    /// (see [`Leftovers`]).
    pub(super) leftovers: Leftovers,
    /// Signers' decoded keys and peer ids.
    signers: crate::trust::SignerCache,
    /// Offered signatures already checked this round (see
    /// [`SigBook::preverify`]): (doc, change hash, encoded signature).
    preverified: HashSet<(String, [u8; 32], [u8; crate::trust::SIG_LEN])>,
}

/// True if the copy of `doc` in memory has change `hash` (false when the
/// doc is not in memory: the signature is kept, to be safe).
fn in_doc(inner: &Inner, doc: &str, hash: &[u8; 32]) -> bool {
    use automerge::ReadDoc;
    let Ok(id) = DocId::new(doc) else {
        return false;
    };
    let Some(slot) = inner.cache.cached(&id) else {
        return false;
    };
    let guard = crate::doc::cache::lock_slot(&slot);
    guard.as_ref().is_some_and(|loaded| {
        loaded
            .doc
            .get_change_by_hash(&automerge::ChangeHash(*hash))
            .is_some()
    })
}

/// Fewer signatures than this in a round are checked one by one where
/// they are used (see [`SigBook::preverify`]).
const PREVERIFY_MIN: usize = 64;

/// How long an offered signature that no change used waits for its change.
const LEFTOVER_TTL: std::time::Duration = std::time::Duration::from_secs(120);
/// Most offered signatures kept waiting.
const MAX_LEFTOVERS: usize = 16_384;

/// Offered signatures kept from round to round: Automerge queues a change
/// whose dependencies have not arrived (a sync message can bring a change
/// before its parent, after a Bloom filter false positive) and applies it
/// later, with them, in another message and round. Its signature came with
/// the first message; without it the change would be refused then, and the
/// sender struck. Bounded in number and age; each is verified when used.
#[derive(Default)]
pub(crate) struct Leftovers(HashMap<(String, [u8; 32]), (Vec<u8>, std::time::Instant)>);

impl Leftovers {
    fn take(&mut self, key: &(String, [u8; 32])) -> Option<Vec<u8>> {
        self.0.remove(key).map(|(sig, _)| sig)
    }

    /// Keeps `unused` (this round's offered signatures no change used),
    /// dropping those past their time or over the cap.
    fn keep(&mut self, unused: HashMap<(String, [u8; 32]), Vec<u8>>) {
        let now = std::time::Instant::now();
        self.0
            .retain(|_, (_, at)| now.duration_since(*at) < LEFTOVER_TTL);
        for (key, sig) in unused {
            if self.0.len() >= MAX_LEFTOVERS {
                break;
            }
            self.0.entry(key).or_insert((sig, now));
        }
    }
}

impl SigBook {
    /// A round's book, with the signatures earlier rounds left waiting.
    pub(super) fn with_leftovers(leftovers: Leftovers) -> SigBook {
        SigBook {
            leftovers,
            ..SigBook::default()
        }
    }

    /// Ends the round: what was offered and not used waits for the next,
    /// unless its change is already in the doc (a duplicate delivery: its
    /// signature is stored, and would only fill the cap).
    pub(super) fn into_leftovers(mut self, inner: &Inner) -> Leftovers {
        let mut unused = std::mem::take(&mut self.offered);
        unused.retain(|(doc, hash), _| !in_doc(inner, doc, hash));
        self.leftovers.keep(unused);
        self.leftovers
    }

    /// Checks, on every core, the signatures that the round's sync
    /// messages and pushed docs carry, when there are many (a catch-up):
    /// [`check`](Self::check) then only looks up those that passed. A
    /// few (the fast path's) are checked where they are used, as before.
    pub(super) fn preverify(&mut self, inputs: &[crate::sync::Input]) {
        use crate::sync::{Input, Message};
        let mut items: Vec<(&str, [u8; 32], &[u8])> = Vec::new();
        for input in inputs {
            if let Input::Received {
                msg: Message::Sync { doc, sigs, .. } | Message::Doc { doc, sigs, .. },
                ..
            } = input
            {
                items.extend(crate::trust::entries(sigs).map(|(h, sig)| (doc.as_str(), h, sig)));
            }
        }
        if items.len() < PREVERIFY_MIN {
            return;
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let ok = crate::trust::verify_many(&items, threads);
        for ((doc, hash, sig), ok) in items.into_iter().zip(ok) {
            if let (true, Ok(sig)) = (ok, sig.try_into()) {
                self.preverified.insert((doc.to_string(), hash, sig));
            }
        }
    }

    /// A peer sent `sig` with change `hash` of `doc`.
    pub(super) fn offer(&mut self, doc: &str, hash: [u8; 32], sig: &[u8]) {
        if !sig.is_empty() {
            self.offered.insert((doc.to_string(), hash), sig.to_vec());
        }
    }

    /// A peer sent `sigs` (entries of a hash and a signature) for `doc`.
    pub(super) fn offer_all(&mut self, doc: &str, sigs: &[u8]) {
        for (hash, sig) in crate::trust::entries(sigs) {
            self.offer(doc, hash, sig);
        }
    }

    /// Change `hash` of `doc` is stored this round with `sig`.
    pub(super) fn accept(&mut self, doc: &str, hash: [u8; 32], sig: Vec<u8>) {
        self.accepted.insert((doc.to_string(), hash), sig);
    }

    /// The signature of change `hash` of `doc`: stored this round, or in
    /// the store; else (a change stored before signatures, which this node
    /// held when it was upgraded) this node vouches for it now: it signs it
    /// and keeps the signature.
    pub(super) fn sig_of(&mut self, inner: &Inner, doc: &str, hash: &[u8; 32]) -> Option<Vec<u8>> {
        let key = (doc.to_string(), *hash);
        if let Some(s) = self.accepted.get(&key) {
            return Some(s.clone());
        }
        if let Some(s) = inner.store.sig(doc, hash).ok().flatten() {
            return Some(s);
        }
        let sig = inner.signer.as_ref()?.sign(doc, hash).to_bytes().to_vec();
        // Like a sync state, a hint: written without waiting for a flush
        // (if it is lost, the next send signs again).
        if let Err(e) = inner.store.put_sig(doc, hash, &sig) {
            tracing::debug!(doc, err = %e, "signature of an earlier change not kept");
        }
        self.accepted.insert(key, sig.clone());
        Some(sig)
    }

    /// The signatures of `hashes` of `doc`, as
    /// [`crate::sync::Message::Sync`] carries them.
    pub(super) fn blob<'h>(
        &mut self,
        inner: &Inner,
        doc: &str,
        hashes: impl Iterator<Item = &'h [u8; 32]>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for h in hashes {
            if let Some(sig) = self.sig_of(inner, doc, h) {
                crate::trust::push_entry(&mut out, h, &sig);
            }
        }
        out
    }

    /// The signatures of `changes` (raw) of `doc`, in order (empty where
    /// none).
    pub(super) fn sigs_for(
        &mut self,
        inner: &Inner,
        doc: &str,
        changes: &[Vec<u8>],
    ) -> Vec<Vec<u8>> {
        changes
            .iter()
            .map(|c| {
                automerge::Change::from_bytes(c.clone())
                    .ok()
                    .and_then(|c| self.sig_of(inner, doc, &c.hash().0))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The signature of each change in `new`: the one a peer offered, if
    /// it verifies and its signer may write doc `id`; else, when this node
    /// vouches for the merge (a restore or import, its automerge-repo
    /// client), its own.
    ///
    /// # Errors
    /// A change with neither: nothing of the merge may be stored.
    pub(super) fn check(
        &mut self,
        inner: &Inner,
        id: &DocId,
        new: &[automerge::Change],
    ) -> Result<Vec<HashSig>, String> {
        use crate::trust::ChangeSig;
        let policy = inner.policy.get();
        self.refused_signer = None;
        let mut out = Vec::with_capacity(new.len());
        for c in new {
            let hash = c.hash().0;
            let key = (id.as_str().to_string(), hash);
            let offered = self
                .offered
                .remove(&key)
                .or_else(|| self.leftovers.take(&key));
            let verified = offered
                .as_deref()
                .and_then(ChangeSig::from_bytes)
                .and_then(|sig| {
                    // (No key built when nothing was checked before: the
                    // fast path's few signatures.)
                    let checked = !self.preverified.is_empty()
                        && self.preverified.remove(&(
                            id.as_str().to_string(),
                            hash,
                            sig.to_bytes(),
                        ));
                    let signer = if checked {
                        self.signers.signer(&sig)?
                    } else {
                        self.signers.verify(&sig, id.as_str(), &hash)?
                    };
                    Some((sig, signer))
                });
            let allowed = verified
                .as_ref()
                .map(|(_, signer)| policy.may_write(signer, id.as_str()));
            let sig = match (verified, allowed) {
                (Some((sig, _)), Some(Ok(()))) => sig.to_bytes().to_vec(),
                // When vouching, this node signs in its place (below).
                (Some((_, signer)), Some(Err(why))) if !self.vouch => {
                    self.refused_signer = Some(signer);
                    return Err(format!(
                        "change {} of doc {:?}: {why}",
                        c.hash(),
                        id.as_str()
                    ));
                }
                _ => match inner.signer.as_ref().filter(|_| self.vouch) {
                    Some(signer) => {
                        policy.may_write(&inner.origin, id.as_str())?;
                        inner.check_holds(id).map_err(|e| e.to_string())?;
                        signer.sign(id.as_str(), &hash).to_bytes().to_vec()
                    }
                    None => {
                        let what = if offered.is_some() {
                            "an invalid"
                        } else {
                            "no"
                        };
                        return Err(format!(
                            "change {} of doc {:?} carries {what} signature: every change must be \
                             signed by the node that admitted it",
                            c.hash(),
                            id.as_str()
                        ));
                    }
                },
            };
            out.push((hash, sig));
        }
        Ok(out)
    }
}

/// The tombstone signature a peer sent with its delete of `doc`, once it
/// checks out: valid over (doc, [`TOMBSTONE_HASH`](crate::trust::TOMBSTONE_HASH)),
/// by a node that may write the doc. A relay (`from` is not the signer) is
/// not charged for a signer the rules refuse.
///
/// # Errors
/// Why the delete is not taken.
pub(super) fn check_tombstone(
    inner: &Inner,
    from: Option<&str>,
    doc: &str,
    sig: &[u8],
) -> Result<Vec<u8>, crate::sync::Refusal> {
    use crate::sync::Refusal;
    use crate::trust::{ChangeSig, TOMBSTONE_HASH};
    let Some(valid) = ChangeSig::from_bytes(sig).filter(|s| s.verify(doc, &TOMBSTONE_HASH)) else {
        let what = if sig.is_empty() { "no" } else { "an invalid" };
        return Err(Refusal::Invalid(format!(
            "delete of doc {doc:?} carries {what} signature: a delete must be signed by the node \
             that made it"
        )));
    };
    let signer = valid.peer_id().map(|p| p.to_string()).unwrap_or_default();
    match inner.policy.get().may_write(&signer, doc) {
        Ok(()) => Ok(valid.to_bytes().to_vec()),
        Err(why) if from == Some(signer.as_str()) => Err(Refusal::Invalid(why)),
        Err(why) => Err(Refusal::Local(why)),
    }
}

/// The signature to send with `doc`'s tombstone: the stored one, else (a
/// tombstone from before deletes were signed) this node's, if it may
/// delete the doc, added to `batch` so it is signed once.
pub(super) fn tombstone_sig(
    inner: &Inner,
    batch: &mut crate::store::WriteBatch,
    doc: &str,
) -> Vec<u8> {
    let hash = crate::trust::TOMBSTONE_HASH;
    if let Ok(Some(sig)) = inner.store.sig(doc, &hash) {
        return sig;
    }
    if inner.policy.get().may_write(&inner.origin, doc).is_err() {
        return Vec::new();
    }
    sign_tombstone(inner, batch, doc).unwrap_or_default()
}

/// Signs `doc`'s tombstone with this node's key (none on an unsigned node)
/// and adds the signature to `batch`, beside the tombstone.
pub(super) fn sign_tombstone(
    inner: &Inner,
    batch: &mut crate::store::WriteBatch,
    doc: &str,
) -> Option<Vec<u8>> {
    let hash = crate::trust::TOMBSTONE_HASH;
    let sig = inner.signer.as_ref()?.sign(doc, &hash).to_bytes().to_vec();
    batch.put_sig(doc, &hash, &sig);
    Some(sig)
}
