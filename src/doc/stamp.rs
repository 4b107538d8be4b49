//! What every change this node makes says about itself, in its Automerge
//! change message, so that every peer reads the same: a hybrid logical
//! clock, the writing node's priority, and the idempotency key of the write
//! if it had one. Conflict policies (`resolve` steps) choose winners by them.
//!
//! Format: `<what> hlc=<u64> prio=<i64>[ idem=<key>][ req=<fp>][ by=<token>]`, where `<what>` is
//! the kind of write (`patch`, `ops`, ...) or a workflow cause
//! (`workflow <name> depth <n>`).
//!
//! The clock: a u64 of Unix milliseconds << 16 | a 16-bit logical counter.
//! A local change takes `T_new = max(T_old + 1, now)`; every change merged
//! from a peer moves it to `T_new = max(T_old, T_peer) + 1`, so a change
//! made after seeing another always carries a higher stamp, whatever the
//! wall clocks say.

use std::sync::atomic::{AtomicU64, Ordering};

/// Furthest ahead of this node's wall clock a peer's stamp is believed.
pub const MAX_DRIFT_MS: u64 = 60 * 60 * 1000;

/// A node's hybrid logical clock.
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// The stamp of a local change made at `now_ms`.
    pub fn tick(&self, now_ms: u64) -> u64 {
        let physical = now_ms << 16;
        let mut old = self.0.load(Ordering::Relaxed);
        loop {
            let new = physical.max(old.saturating_add(1));
            match self
                .0
                .compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return new,
                Err(seen) => old = seen,
            }
        }
    }

    /// Takes in the stamp of a change merged from a peer, made at most
    /// [`MAX_DRIFT_MS`] ahead of `now_ms` (a stamp further ahead is taken as
    /// that far: one peer with a wrong clock must not drag every node's
    /// clock into the future for good).
    pub fn observe(&self, peer: u64, now_ms: u64) {
        let peer = peer.min(now_ms.saturating_add(MAX_DRIFT_MS) << 16);
        let mut old = self.0.load(Ordering::Relaxed);
        loop {
            let new = old.max(peer).saturating_add(1);
            match self
                .0
                .compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => old = seen,
            }
        }
    }

    /// The current value.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a change message says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    /// Hybrid logical clock (0 when the change carries none).
    pub hlc: u64,
    /// Priority of the node that wrote it (0 when none).
    pub prio: i64,
    /// The write's idempotency key.
    pub idem: Option<String>,
    /// The keys of further writes that share this change (writes that may
    /// be coalesced, see `WriteOpts::coalesce`), each with the offset of its
    /// first op in the change (the ops before it are the earlier writes').
    /// Such a change carries no request fingerprint.
    pub also: Vec<(String, u64)>,
    /// Fingerprint of the request that carried the key (see
    /// [`fingerprint`]): a later write with the same key and another
    /// fingerprint is a reuse, not a repeat.
    pub req: Option<String>,
    /// The name of the scoped API token (`[[api.tokens]]`) that made the
    /// write, when one did.
    pub by: Option<String>,
}

impl Stamp {
    /// The change message for a change of kind `what`.
    pub fn message(&self, what: &str) -> String {
        let mut m = format!("{what} hlc={} prio={}", self.hlc, self.prio);
        if let Some(k) = &self.idem {
            m.push_str(" idem=");
            m.push_str(k);
        }
        if let Some(r) = &self.req {
            m.push_str(" req=");
            m.push_str(r);
        }
        // A coalesced change has no `req` (see `WriteOpts::coalesce`): a
        // node that reads one key per change (the last) pairs none with it.
        for (k, _) in &self.also {
            m.push_str(" idem=");
            m.push_str(k);
        }
        if !self.also.is_empty() {
            let at: Vec<String> = self.also.iter().map(|(_, o)| o.to_string()).collect();
            m.push_str(" at=");
            m.push_str(&at.join(","));
        }
        if let Some(b) = &self.by {
            m.push_str(" by=");
            m.push_str(b);
        }
        m
    }

    /// Reads a change message; missing fields stay at their defaults (a
    /// change from a node that did not stamp, or made by hand).
    pub fn parse(message: &str) -> Stamp {
        let mut s = Stamp::default();
        let mut at: Vec<u64> = Vec::new();
        for word in message.split(' ') {
            if let Some(v) = word.strip_prefix("hlc=") {
                s.hlc = v.parse().unwrap_or(0);
            } else if let Some(v) = word.strip_prefix("prio=") {
                s.prio = v.parse().unwrap_or(0);
            } else if let Some(v) = word.strip_prefix("idem=") {
                if s.idem.is_none() {
                    s.idem = Some(v.to_string());
                } else {
                    s.also.push((v.to_string(), 0));
                }
            } else if let Some(v) = word.strip_prefix("req=") {
                s.req = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("by=") {
                s.by = Some(v.to_string());
            } else if let Some(v) = word.strip_prefix("at=") {
                at = v.split(',').map(|o| o.parse().unwrap_or(0)).collect();
            }
        }
        for ((_, o), at) in s.also.iter_mut().zip(at) {
            *o = at;
        }
        s
    }

    /// The idempotency key of the write that made the change's op at
    /// `offset` (counted from the change's first op): in a coalesced change,
    /// the key of the write whose ops start at or before it.
    pub fn key_at(&self, offset: u64) -> Option<&str> {
        self.also
            .iter()
            .rev()
            .find(|(_, start)| *start <= offset)
            .map(|(k, _)| k.as_str())
            .or(self.idem.as_deref())
    }
}

/// A short fingerprint (16 hex digits of SHA-256) of what a write asks
/// for: `kind` and the request's canonical JSON. Two requests with the same
/// fingerprint ask for the same change.
pub fn fingerprint(kind: &str, canonical: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(canonical);
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks an idempotency key: 1 to 128 printable ASCII characters, no spaces.
///
/// # Errors
/// What is wrong with it.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "idempotency key {key:?}: 1 to 128 printable ASCII characters, no spaces"
        ));
    }
    Ok(())
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The idempotency keys in one doc's history, each with the request
/// fingerprint of its first use: built from the changes' messages the first
/// time a keyed write asks, then brought up to date from the changes since
/// (local writes and merges alike), so a keyed write costs the changes new
/// since the last one, not the whole history.
#[derive(Debug, Default)]
pub struct IdemIndex {
    /// The heads the index covers.
    heads: Vec<automerge::ChangeHash>,
    /// Key -> the fingerprint of the request that first used it.
    keys: std::collections::HashMap<String, Option<String>>,
}

impl IdemIndex {
    /// Whether `key` is in `doc`'s history: `Some(fingerprint)` if it is.
    pub fn lookup(&mut self, doc: &automerge::Automerge, key: &str) -> Option<Option<String>> {
        let heads = doc.get_heads();
        if heads != self.heads {
            // Heads this doc does not know (it was replaced): start over.
            if self
                .heads
                .iter()
                .any(|h| doc.get_change_meta_by_hash(h).is_none())
            {
                self.keys.clear();
                self.heads.clear();
            }
            for c in doc.get_changes_meta(&self.heads) {
                let Some(message) = c.message.as_deref() else {
                    continue;
                };
                let stamp = Stamp::parse(message);
                if let Some(k) = stamp.idem {
                    self.keys.entry(k).or_insert(stamp.req);
                }
                for (k, _) in stamp.also {
                    self.keys.entry(k).or_insert(None);
                }
            }
            self.heads = heads;
        }
        self.keys.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_never_goes_back_and_passes_what_it_saw() {
        let c = Clock::default();
        let a = c.tick(1000);
        let b = c.tick(1000);
        assert!(b > a);
        let back = c.tick(10); // the wall clock stepped back
        assert!(back > b);
        c.observe(5000 << 16, 1000);
        let after = c.tick(1000);
        assert!(after > 5000 << 16, "T_new = max(T_old, T_peer) + tick");
        // A stamp from far in the future counts as MAX_DRIFT_MS ahead.
        let d = Clock::default();
        d.observe(u64::MAX, 1000);
        assert_eq!(d.now(), ((1000 + MAX_DRIFT_MS) << 16) + 1);
        assert!(d.tick(1000) > d.now() - 1);
    }

    #[test]
    fn messages_round_trip() {
        let s = Stamp {
            hlc: 42,
            prio: -3,
            idem: Some("req-1".into()),
            req: Some("00ff".into()),
            by: Some("kitchen-app".into()),
            also: vec![],
        };
        let m = s.message("workflow w depth 2");
        assert_eq!(
            m,
            "workflow w depth 2 hlc=42 prio=-3 idem=req-1 req=00ff by=kitchen-app"
        );
        assert_eq!(Stamp::parse(&m), s);
        assert_eq!(Stamp::parse("patch"), Stamp::default());
        // A coalesced change: every key, the first one's fingerprint.
        let many = Stamp {
            also: vec![("k2".into(), 3), ("k3".into(), 5)],
            ..s.clone()
        };
        let m = many.message("ops");
        assert_eq!(
            m,
            "ops hlc=42 prio=-3 idem=req-1 req=00ff idem=k2 idem=k3 at=3,5 by=kitchen-app"
        );
        assert_eq!(Stamp::parse(&m), many);
        let keys: Vec<_> = (0..7).map(|o| many.key_at(o).unwrap()).collect();
        assert_eq!(keys, ["req-1", "req-1", "req-1", "k2", "k2", "k3", "k3"]);
        assert_eq!(s.key_at(9), Some("req-1"));
        assert!(check_idempotency_key("abc-123").is_ok());
        assert!(check_idempotency_key("a b").is_err());
        assert!(check_idempotency_key("").is_err());
    }

    #[test]
    fn the_idempotency_index_follows_the_history_as_it_grows() {
        use automerge::transaction::{CommitOptions, Transactable};
        let mut doc = automerge::Automerge::new();
        let write = |doc: &mut automerge::Automerge, msg: &str| {
            let mut tx = doc.transaction();
            tx.put(automerge::ROOT, "k", msg).unwrap();
            tx.commit_with(CommitOptions::default().with_message(msg.to_string()));
        };
        write(&mut doc, "patch hlc=1 prio=0 idem=a req=r1");
        let mut index = IdemIndex::default();
        assert_eq!(index.lookup(&doc, "a"), Some(Some("r1".into())));
        assert_eq!(index.lookup(&doc, "b"), None);
        write(&mut doc, "patch hlc=2 prio=0");
        write(&mut doc, "patch hlc=3 prio=0 idem=b");
        write(&mut doc, "patch hlc=4 prio=0 idem=a req=r2");
        write(&mut doc, "ops hlc=5 prio=0 idem=c idem=d idem=e at=1,2");
        assert_eq!(
            index.lookup(&doc, "b"),
            Some(None),
            "learnt from the new changes"
        );
        assert_eq!(
            index.lookup(&doc, "a"),
            Some(Some("r1".into())),
            "the first use counts"
        );
        for k in ["c", "d", "e"] {
            assert_eq!(
                index.lookup(&doc, k),
                Some(None),
                "every key of a coalesced change"
            );
        }
        // A doc that does not hold the heads it was built at starts over.
        let mut other = automerge::Automerge::new();
        write(&mut other, "patch hlc=9 prio=0 idem=c");
        assert_eq!(index.lookup(&other, "a"), None);
        assert_eq!(index.lookup(&other, "c"), Some(None));
    }
}
