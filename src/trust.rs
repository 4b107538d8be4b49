//! Change signatures: every change a node admits (its own writes, its
//! workflows', restores and imports, its automerge-repo clients' changes)
//! is signed with the node's ed25519 identity, and the signature travels
//! with the change so that every receiver can tell which node admitted it
//! and check that node's right to write the doc (issue 21).
//!
//! What is signed binds the change to its doc: `mergeflow-change-v1`, the
//! doc id's length (u16, big endian), the doc id, the change hash. A
//! signed change cannot be replayed into another doc.
//!
//! A [`ChangeSig`] is the signer's public key (32 bytes; the peer id
//! derives from it) and the signature (64 bytes): 96 bytes per change.
//! (A leaf: imports nothing of the crate.)

use libp2p::identity::{Keypair, PeerId, ed25519};

/// The domain separator of a change signature.
const DOMAIN: &[u8] = b"mergeflow-change-v1";

/// What a tombstone's signature signs in place of a change hash: a doc's
/// deletion is signed as (doc, this), by the node that deleted it. No
/// Automerge change has this hash (it would take a SHA-256 preimage).
pub const TOMBSTONE_HASH: [u8; 32] = [0xff; 32];

/// Bytes of an encoded [`ChangeSig`].
pub const SIG_LEN: usize = 96;

/// Bytes of one entry of a signature list, as sync messages, pushed docs
/// and backups carry them: a change hash, then its encoded signature.
pub const SIG_ENTRY_LEN: usize = 32 + SIG_LEN;

/// Appends the entry of change `hash` and its encoded `sig` to a list.
pub fn push_entry(list: &mut Vec<u8>, hash: &[u8; 32], sig: &[u8]) {
    list.extend_from_slice(hash);
    list.extend_from_slice(sig);
}

/// The entries of a signature list: each change hash and its encoded
/// signature (a trailing partial entry is ignored).
pub fn entries(list: &[u8]) -> impl Iterator<Item = ([u8; 32], &[u8])> {
    list.chunks_exact(SIG_ENTRY_LEN)
        .map(|e| (e[..32].try_into().expect("32 bytes"), &e[32..]))
}

/// A node's signature over one change of one doc.
#[derive(Clone, PartialEq, Eq)]
pub struct ChangeSig {
    /// The signer's ed25519 public key.
    pub signer: [u8; 32],
    /// The signature.
    pub sig: [u8; 64],
}

impl std::fmt::Debug for ChangeSig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChangeSig(by {})",
            self.peer_id().map_or_else(|| "?".into(), |p| p.to_string())
        )
    }
}

/// What a node signs for change `hash` of doc `doc`.
fn message(doc: &str, hash: &[u8; 32]) -> Vec<u8> {
    let len = u16::try_from(doc.len()).unwrap_or(u16::MAX);
    let mut m = Vec::with_capacity(DOMAIN.len() + 2 + doc.len() + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(doc.as_bytes());
    m.extend_from_slice(hash);
    m
}

impl ChangeSig {
    /// The 96 bytes: signer, then signature.
    pub fn to_bytes(&self) -> [u8; SIG_LEN] {
        let mut out = [0u8; SIG_LEN];
        out[..32].copy_from_slice(&self.signer);
        out[32..].copy_from_slice(&self.sig);
        out
    }

    /// Reads [`ChangeSig::to_bytes`]; None if `b` is not 96 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<ChangeSig> {
        if b.len() != SIG_LEN {
            return None;
        }
        let mut signer = [0u8; 32];
        let mut sig = [0u8; 64];
        signer.copy_from_slice(&b[..32]);
        sig.copy_from_slice(&b[32..]);
        Some(ChangeSig { signer, sig })
    }

    /// The signer's peer id; None if the key is not a valid ed25519 point.
    pub fn peer_id(&self) -> Option<PeerId> {
        let key = ed25519::PublicKey::try_from_bytes(&self.signer).ok()?;
        Some(libp2p::identity::PublicKey::from(key).to_peer_id())
    }

    /// True if this is a valid signature, by its signer, of change `hash`
    /// of doc `doc`.
    pub fn verify(&self, doc: &str, hash: &[u8; 32]) -> bool {
        ed25519::PublicKey::try_from_bytes(&self.signer)
            .is_ok_and(|key| key.verify(&message(doc, hash), &self.sig))
    }
}

/// Most signers a [`SignerCache`] remembers; past it, it starts over.
const MAX_CACHED_SIGNERS: usize = 4096;

/// Signers' decoded keys and peer ids: checking many changes by a few
/// signers (a catch-up brings thousands) decodes each key and spells each
/// peer id once, not once per change.
#[derive(Default)]
pub struct SignerCache(std::collections::HashMap<[u8; 32], Option<(ed25519::PublicKey, String)>>);

impl SignerCache {
    /// The peer id (as text) of `sig`'s signer if `sig` is a valid
    /// signature of change `hash` of doc `doc` (as [`ChangeSig::verify`]).
    pub fn verify(&mut self, sig: &ChangeSig, doc: &str, hash: &[u8; 32]) -> Option<String> {
        let (key, peer) = self.decoded(&sig.signer)?;
        key.verify(&message(doc, hash), &sig.sig)
            .then(|| peer.clone())
    }

    /// The peer id (as text) of `sig`'s signer, without checking the
    /// signature: for a signature [`verify_many`] already checked.
    pub fn signer(&mut self, sig: &ChangeSig) -> Option<String> {
        self.decoded(&sig.signer).map(|(_, peer)| peer.clone())
    }

    /// `signer`'s decoded key and peer id (`None` if it is not a key),
    /// decoded once.
    fn decoded(&mut self, signer: &[u8; 32]) -> Option<&(ed25519::PublicKey, String)> {
        if self.0.len() >= MAX_CACHED_SIGNERS && !self.0.contains_key(signer) {
            self.0.clear();
        }
        self.0
            .entry(*signer)
            .or_insert_with(|| decode_signer(signer))
            .as_ref()
    }
}

fn decode_signer(signer: &[u8; 32]) -> Option<(ed25519::PublicKey, String)> {
    let key = ed25519::PublicKey::try_from_bytes(signer).ok()?;
    let peer = libp2p::identity::PublicKey::from(key.clone()).to_peer_id();
    Some((key, peer.to_string()))
}

/// Signatures checked on one thread; [`verify_many`] splits more than
/// twice this over threads.
const PER_THREAD: usize = 64;

/// Whether each `(doc, change hash, encoded signature)` is a valid
/// signature (as [`ChangeSig::verify`]), checked on up to `threads`
/// threads (the caller's among them) when there are enough: a catch-up
/// brings thousands at once, and ed25519 checks were half of what the
/// receiving writer thread did. Each is checked alone, as strictly as
/// one by one (no batch equation, which could accept what a single
/// check refuses).
pub fn verify_many(items: &[(&str, [u8; 32], &[u8])], threads: usize) -> Vec<bool> {
    // Keys decoded once each: a catch-up's changes come from few signers.
    let mut keys: std::collections::HashMap<[u8; 32], Option<ed25519::PublicKey>> =
        Default::default();
    let sigs: Vec<Option<ChangeSig>> = items
        .iter()
        .map(|(_, _, b)| ChangeSig::from_bytes(b))
        .collect();
    for sig in sigs.iter().flatten() {
        keys.entry(sig.signer)
            .or_insert_with(|| ed25519::PublicKey::try_from_bytes(&sig.signer).ok());
    }
    let check = |i: usize| -> bool {
        let Some(sig) = &sigs[i] else { return false };
        let (doc, hash, _) = &items[i];
        keys.get(&sig.signer)
            .and_then(Option::as_ref)
            .is_some_and(|key| key.verify(&message(doc, hash), &sig.sig))
    };
    let threads = threads.clamp(1, items.len().div_ceil(PER_THREAD).max(1));
    if threads == 1 {
        return (0..items.len()).map(check).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let mut out = vec![false; items.len()];
    std::thread::scope(|scope| {
        let check = &check;
        let mut parts = out.chunks_mut(chunk).enumerate();
        let mine = parts.next();
        for (n, part) in parts {
            scope.spawn(move || {
                for (j, ok) in part.iter_mut().enumerate() {
                    *ok = check(n * chunk + j);
                }
            });
        }
        if let Some((_, part)) = mine {
            for (j, ok) in part.iter_mut().enumerate() {
                *ok = check(j);
            }
        }
    });
    out
}

/// Signs changes with a node's identity.
#[derive(Clone)]
pub struct Signer {
    key: ed25519::Keypair,
    public: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// The signer of the node whose identity is `key`; None if it is not
    /// an ed25519 key (a node's always is).
    pub fn new(key: &Keypair) -> Option<Signer> {
        let key = key.clone().try_into_ed25519().ok()?;
        let public = key.public().to_bytes();
        Some(Signer { key, public })
    }

    /// Signs change `hash` of doc `doc`.
    pub fn sign(&self, doc: &str, hash: &[u8; 32]) -> ChangeSig {
        let sig = self.key.sign(&message(doc, hash));
        let mut out = [0u8; 64];
        out.copy_from_slice(&sig);
        ChangeSig {
            signer: self.public,
            sig: out,
        }
    }

    /// The public key changes signed here carry.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_the_change_its_doc_and_its_signer() {
        let key = Keypair::generate_ed25519();
        let s = Signer::new(&key).unwrap();
        let h = [7u8; 32];
        let sig = s.sign("sensors/a", &h);
        assert!(sig.verify("sensors/a", &h));
        assert_eq!(sig.peer_id(), Some(key.public().to_peer_id()));
        assert!(!sig.verify("sensors/b", &h), "another doc");
        assert!(!sig.verify("sensors/a", &[8u8; 32]), "another change");
        let mut forged = sig.clone();
        forged.signer = Signer::new(&Keypair::generate_ed25519()).unwrap().public();
        assert!(!forged.verify("sensors/a", &h), "another signer");
        let mut bent = sig.clone();
        bent.sig[10] ^= 1;
        assert!(!bent.verify("sensors/a", &h));
        assert_eq!(ChangeSig::from_bytes(&sig.to_bytes()), Some(sig.clone()));
        assert_eq!(ChangeSig::from_bytes(&[0u8; 95]), None);
        // Garbage never panics.
        let junk = ChangeSig::from_bytes(&[0xffu8; 96]).unwrap();
        assert!(!junk.verify("sensors/a", &h));

        // The cache answers as `verify` does, with the signer's peer id,
        // the second time from its decoded key.
        let mut cache = SignerCache::default();
        let id = key.public().to_peer_id().to_string();
        for _ in 0..2 {
            assert_eq!(cache.verify(&sig, "sensors/a", &h), Some(id.clone()));
            assert_eq!(cache.verify(&sig, "sensors/b", &h), None, "another doc");
            assert_eq!(
                cache.verify(&forged, "sensors/a", &h),
                None,
                "another signer"
            );
            assert_eq!(cache.verify(&bent, "sensors/a", &h), None);
            assert_eq!(cache.verify(&junk, "sensors/a", &h), None);
        }
    }

    /// `verify_many` answers as `verify` does for each item, in order, on
    /// one thread or several, whatever the mix of valid and invalid ones.
    #[test]
    fn many_signatures_are_checked_as_one_by_one() {
        let signers: Vec<Signer> = (0..3)
            .map(|_| Signer::new(&Keypair::generate_ed25519()).unwrap())
            .collect();
        let docs: Vec<String> = (0..500).map(|i| format!("d/{i}")).collect();
        let mut sigs: Vec<Vec<u8>> = Vec::new();
        let mut want = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            let h = [(i % 251) as u8; 32];
            let mut sig = signers[i % 3].sign(doc, &h).to_bytes().to_vec();
            match i % 7 {
                0 => sig[40] ^= 1,         // a bent signature
                1 => sig.truncate(95),     // the wrong length
                2 => sig[..32].fill(0xff), // not a key
                _ => {}
            }
            want.push(i % 7 > 2);
            sigs.push(sig);
        }
        let items: Vec<(&str, [u8; 32], &[u8])> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.as_str(), [(i % 251) as u8; 32], sigs[i].as_slice()))
            .collect();
        for threads in [1, 2, 3, 8] {
            assert_eq!(verify_many(&items, threads), want, "{threads} threads");
            assert_eq!(
                verify_many(&items[..10], threads),
                want[..10],
                "{threads} threads"
            );
        }
        assert!(verify_many(&[], 2).is_empty());
    }
}
