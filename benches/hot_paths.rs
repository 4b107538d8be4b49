//! Criterion micro-benchmarks of the hot paths: a peer's change decoded and
//! applied, the store's group commit, the anti-entropy digest (build, update,
//! compare), workflow trigger matching, and a change's signature made and
//! checked (issue 21).
//!
//! Prints numbers; asserts nothing. Run: `cargo bench --bench hot_paths`
//! (add `-- <filter>` for one group). Results: BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ChangeHash, ROOT};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

use mergeflow::feed::ChangeEvent;
use mergeflow::testing::store::{DocMeta, Store, WriteBatch};
use mergeflow::testing::sync::Replicate;
use mergeflow::testing::sync::digest::{Digest, DocState};
use mergeflow::workflow::expr::Sandbox;
use mergeflow::workflow::plan::Plan;

/// A peer's next change to a doc with `history` earlier changes: decoded
/// from its bytes and applied, as the fast path does on every receiver.
fn apply_remote_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply remote change");
    for history in [100u32, 5_000] {
        let mut writer = Automerge::new().with_actor(ActorId::from(&[1u8; 16][..]));
        for i in 0..history {
            let mut tx = writer.transaction();
            tx.put(ROOT, format!("k{}", i % 50), i64::from(i)).unwrap();
            tx.commit();
        }
        let receiver = writer.clone().with_actor(ActorId::from(&[2u8; 16][..]));
        let mut tx = writer.transaction();
        tx.put(ROOT, "k0", -1i64).unwrap();
        tx.commit();
        let bytes = writer.get_last_local_change().unwrap().raw_bytes().to_vec();
        g.bench_function(format!("history {history}"), |b| {
            b.iter_batched(
                || receiver.clone(),
                |mut doc| {
                    let change = automerge::Change::from_bytes(bytes.clone()).unwrap();
                    doc.apply_changes([change]).unwrap();
                    doc
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// One change appended and flushed (a lone writer's acknowledgement), and
/// 32 appended with one flush (a group commit under load).
fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 64 << 20).unwrap();
    let change = vec![7u8; 120];
    let meta = DocMeta::new(0);
    let mut seq = 0u64;
    let mut g = c.benchmark_group("group commit");
    for writers in [1usize, 32] {
        g.bench_function(format!("{writers} changes, one flush"), |b| {
            b.iter(|| {
                let mut batch = WriteBatch::default();
                for w in 0..writers {
                    seq += 1;
                    batch.append_change(&format!("doc-{w}"), seq, &change, &meta);
                }
                store.apply(batch).unwrap();
                store.flush().unwrap();
            })
        });
    }
    g.finish();
}

fn state(i: usize, salt: u8) -> DocState {
    let mut h = [salt; 32];
    h[..8].copy_from_slice(&(i as u64).to_le_bytes());
    DocState::Live(vec![ChangeHash(h)])
}

/// The digest of 10,000 docs: built from scratch (a start), updated for one
/// changed doc (every write), and compared with a peer's where 10 differ.
fn digest(c: &mut Criterion) {
    const DOCS: usize = 10_000;
    let ids: Vec<String> = (0..DOCS).map(|i| format!("fill/doc-{i}")).collect();
    let build = || {
        let mut d = Digest::new(64);
        for (i, id) in ids.iter().enumerate() {
            d.set(id, &state(i, 0));
        }
        d
    };
    let mut g = c.benchmark_group("digest");
    g.bench_function("build, 10,000 docs", |b| b.iter(|| black_box(build())));
    let mut mine = build();
    let mut n = 0usize;
    g.bench_function("update one doc", |b| {
        b.iter(|| {
            n += 1;
            mine.set(&ids[n % DOCS], &state(n, 1))
        })
    });
    let mine = build();
    let mut theirs = build();
    for i in (0..DOCS).step_by(DOCS / 10) {
        theirs.set(&ids[i], &state(i, 9));
    }
    g.bench_function("compare, 10 of 10,000 docs differ", |b| {
        b.iter(|| black_box(mine.differing(black_box(theirs.buckets()))))
    });
    // Partial replication: the digest a peer that holds some docs is sent,
    // over the docs its globs cover (10 of 10,000 here; the core does this
    // per digest to such a peer).
    let scope = Replicate::new(&["fill/doc-1?".to_string(), "config/**".to_string()]).unwrap();
    g.bench_function("digest over a scope, 10 of 10,000 docs", |b| {
        b.iter(|| black_box(mine.buckets_where(|doc| scope.covers(doc))))
    });
    g.finish();
}

/// A change event tested against one workflow's trigger (doc glob and path
/// glob), and against 100 workflows of which one matches.
fn trigger_matching(c: &mut Criterion) {
    let sandbox = Sandbox::new();
    let load = |name: &str, glob: &str| -> Arc<Plan> {
        let text = format!(
            "name = \"{name}\"\n[on]\ndoc = \"{glob}\"\npath = \"/celsius\"\n\n[[steps]]\nid = \"f\"\nkind = \"derive\"\nset = {{ \"/fahrenheit\" = \"doc.celsius * 9.0 / 5.0 + 32.0\" }}\n"
        );
        Plan::load(&sandbox, "bench.toml", &text).unwrap()
    };
    let one = load("fahrenheit", "sensors/*");
    let many: Vec<Arc<Plan>> = (0..100)
        .map(|i| {
            if i == 99 {
                load("w99", "sensors/*")
            } else {
                load(&format!("w{i}"), &format!("site-{i}/**"))
            }
        })
        .collect();
    let event = ChangeEvent {
        id: "1-1".into(),
        seq: 1,
        doc: "sensors/greenhouse-3".into(),
        heads: vec![],
        origin: "local".into(),
        local: true,
        deleted: false,
        paths: vec!["/celsius".into(), "/updated".into()],
        paths_truncated: false,
        cause: None,
    };
    let mut g = c.benchmark_group("trigger matching");
    g.bench_function("one workflow", |b| {
        b.iter(|| black_box(one.matches(black_box(&event))))
    });
    g.bench_function("100 workflows, one matches", |b| {
        b.iter(|| black_box(many.iter().filter(|p| p.matches(&event)).count()))
    });
    g.finish();
}

/// A change signature: made by the admitting node, checked by every
/// receiver before it stores the change.
fn change_signature(c: &mut Criterion) {
    use mergeflow::trust::{ChangeSig, Signer};
    let mut g = c.benchmark_group("change signature");
    let signer = Signer::new(&libp2p::identity::Keypair::generate_ed25519()).unwrap();
    let hash = [42u8; 32];
    let doc = "sensors/greenhouse-3";
    g.bench_function("sign", |b| {
        b.iter(|| black_box(signer.sign(doc, black_box(&hash))))
    });
    let sig = signer.sign(doc, &hash);
    g.bench_function("verify", |b| {
        b.iter(|| assert!(black_box(&sig).verify(doc, black_box(&hash))))
    });
    let bytes = sig.to_bytes();
    g.bench_function("decode and verify", |b| {
        b.iter(|| {
            assert!(
                ChangeSig::from_bytes(black_box(&bytes))
                    .unwrap()
                    .verify(doc, &hash)
            )
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    apply_remote_change,
    group_commit,
    digest,
    trigger_matching,
    change_signature
);
criterion_main!(benches);
