//! What Automerge costs us per change as a doc's history grows: a local
//! commit (a write on this node) against applying the same change on a peer
//! (`apply_changes`, what every receiver of the fast path does), one change
//! per call and all of them in one call (what a receiver does with a frame
//! of changes to one doc).
//!
//! Prints numbers; asserts nothing. Run: `cargo bench --bench apply`.
//! Env `OPS` (comma-separated history sizes, default 100,1000,5000,20000).
//!
//! With automerge 0.12 a remote apply walks every op of the object it
//! changes, so its cost grows with the object's history while a local commit
//! stays flat: a doc that one sensor updates forever gets slower to receive.

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ROOT, ReadDoc};

const MEASURED: u32 = 200;

fn commit(doc: &mut Automerge, key: String, value: i64) -> automerge::Change {
    let mut tx = doc.transaction();
    tx.put(ROOT, key, value).unwrap();
    let (hash, _) = tx.commit();
    doc.get_change_by_hash(&hash.unwrap()).unwrap().clone()
}

/// (local commit, remote apply one per call, remote apply all in one call)
/// per change, after `history` changes spread over `keys` root keys.
fn measure(history: usize, keys: usize) -> (Duration, Duration, Duration) {
    let mut writer = Automerge::new().with_actor(ActorId::from([1u8; 16]));
    for i in 0..history {
        commit(&mut writer, format!("k{}", i % keys), i as i64);
    }
    let saved = writer.save();
    let mut peer = Automerge::load(&saved).unwrap();
    let mut batch_peer = Automerge::load(&saved).unwrap();
    let t = Instant::now();
    let changes: Vec<_> = (0..MEASURED as usize)
        .map(|i| commit(&mut writer, format!("k{}", i % keys), i as i64))
        .collect();
    let local = t.elapsed() / MEASURED;
    let t = Instant::now();
    for c in changes.clone() {
        peer.apply_changes([c]).unwrap();
    }
    let one_by_one = t.elapsed() / MEASURED;
    let t = Instant::now();
    batch_peer.apply_changes(changes).unwrap();
    (local, one_by_one, t.elapsed() / MEASURED)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("OPS")
        .unwrap_or_else(|_| "100,1000,5000,20000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "history  keys  local commit  remote apply  remote apply, {MEASURED} per call  (per change)"
    );
    for &n in &sizes {
        for keys in [1, 50] {
            let (local, remote, batched) = measure(n, keys);
            println!(
                "{n:>7}  {keys:>4}  {:>9.1} us  {:>9.1} us  {:>9.1} us",
                local.as_secs_f64() * 1e6,
                remote.as_secs_f64() * 1e6,
                batched.as_secs_f64() * 1e6
            );
        }
    }
}
