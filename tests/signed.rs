//! Change signatures (issue 21, first part): every change a node makes is
//! signed with its identity and the signature is stored beside the change;
//! `/history` names the signer of each change whose signature checks out.

mod common;

use common::until;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_a_node_makes_is_signed_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let defs = dir.path().join("workflows");
    std::fs::create_dir_all(&defs).unwrap();
    std::fs::write(
        defs.join("f.toml"),
        "name = \"f\"\n[on]\ndoc = \"sensors/*\"\npath = \"/celsius\"\n[[steps]]\nid = \"c\"\nkind = \"derive\"\nset = { \"/fahrenheit\" = \"doc.celsius * 9.0 / 5.0 + 32.0\" }\n",
    )
    .unwrap();
    let node = common::api_node(dir.path(), |c| c.workflow.dir = defs.clone()).await;
    let me = node.peer_id().to_string();
    // A write that creates a nested container (a genesis change too), and
    // a workflow's derived write.
    node.doc("sensors/a")
        .unwrap()
        .patch(json!({"celsius": 20, "meta": {"room": "north"}}))
        .await
        .unwrap();
    until("the derived value", || async {
        let v = node.doc("sensors/a").unwrap().get().await.ok()?;
        (v["fahrenheit"] == json!(68.0)).then_some(())
    })
    .await;
    let history = node
        .docs()
        .history("sensors/a".parse().unwrap())
        .await
        .unwrap();
    assert!(history.len() >= 3, "{history:?}");
    for h in &history {
        assert_eq!(h.signed_by.as_deref(), Some(me.as_str()), "{h:?}");
    }
    // The same over HTTP.
    let url = format!(
        "http://{}/v1/docs/sensors%2Fa/history",
        node.api_addr().unwrap()
    );
    let body: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|h| h["signed_by"] == json!(me)),
        "{body}"
    );
    node.shutdown().await.unwrap();
}

/// Every signature of `id`'s history on `node`, as (hash, signed_by).
async fn signers(node: &mergeflow::Node, id: &str) -> Vec<(String, Option<String>)> {
    node.docs()
        .history(id.parse().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.hash, h.signed_by))
        .collect()
}

/// A signature travels with its change on every path: a doc pushed whole
/// to a node that lacked it, fast-path changes, and changes repaired by a
/// sync session after the receiver was offline. The receiver keeps the
/// writer's signature, not its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_travel_with_changes_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let fast = |c: &mut mergeflow::config::Config| c.net.anti_entropy_ms = 200;
    let a = common::p2p_node(&dir.path().join("a"), vec![], fast).await;
    let a_id = a.peer_id().to_string();
    // Written before B exists: B gets it pushed whole.
    a.doc("pushed")
        .unwrap()
        .patch(json!({"n": 1, "m": {"x": 1}}))
        .await
        .unwrap();
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr], fast).await;
    let all_by_a = |v: &Vec<(String, Option<String>)>| {
        !v.is_empty() && v.iter().all(|(_, s)| s.as_deref() == Some(a_id.as_str()))
    };
    until("the pushed doc on B, signed by A", || async {
        let v = b.docs().history("pushed".parse().unwrap()).await.ok()?;
        let v: Vec<_> = v.into_iter().map(|h| (h.hash, h.signed_by)).collect();
        (v.len() == signers(&a, "pushed").await.len() && all_by_a(&v)).then_some(())
    })
    .await;
    // Fast path.
    a.doc("pushed")
        .unwrap()
        .patch(json!({"n": 2}))
        .await
        .unwrap();
    until("the fast-path change on B, signed by A", || async {
        let v = signers(&b, "pushed").await;
        (v.len() == signers(&a, "pushed").await.len() && all_by_a(&v)).then_some(())
    })
    .await;
    // Repair: B misses two changes while offline, then syncs.
    b.set_online(false);
    for n in 3..5 {
        a.doc("pushed")
            .unwrap()
            .patch(json!({"n": n}))
            .await
            .unwrap();
    }
    b.set_online(true);
    until("the repaired changes on B, signed by A", || async {
        let v = signers(&b, "pushed").await;
        (v.len() == signers(&a, "pushed").await.len() && all_by_a(&v)).then_some(())
    })
    .await;
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A change of a fresh doc `doc`'s own, by a throwaway actor: (bytes, hash).
fn change(n: i64) -> (Vec<u8>, [u8; 32]) {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    let mut d = automerge::Automerge::new();
    let mut tx = d.transaction();
    tx.put(automerge::ROOT, "n", n).unwrap();
    let (hash, _) = tx.commit();
    let hash = hash.unwrap();
    (
        d.get_change_by_hash(&hash).unwrap().raw_bytes().to_vec(),
        hash.0,
    )
}

/// A node with the sync core and no network: the test hands it peers'
/// messages (`Node::sync_input`) and reads what it would send.
async fn sync_only_node(
    dir: &std::path::Path,
) -> (
    mergeflow::Node,
    tokio::sync::mpsc::Receiver<mergeflow::testing::sync::Output>,
) {
    let node = mergeflow::Node::builder()
        .data_dir(dir)
        .sync(Default::default())
        .start()
        .await
        .unwrap();
    let outputs = node.take_sync_outputs().unwrap();
    (node, outputs)
}

/// Injected as if from peer `x`: changes with a forged, missing, misplaced
/// or unauthorised signature are never stored and each counts against the
/// sender; a change signed by a node that may write the doc is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_without_a_valid_signature_are_refused() {
    use mergeflow::testing::sync::{Input, Message, Output};
    use mergeflow::trust::Signer;
    let dir = tempfile::tempdir().unwrap();
    let (node, mut outputs) = sync_only_node(dir.path()).await;
    let peer = Signer::new(&libp2p::identity::Keypair::generate_ed25519()).unwrap();
    // The sending peer is the one that signs (as a real peer's key would).
    let x = {
        let (_, h) = change(0);
        peer.sign("x", &h).peer_id().unwrap().to_string()
    };
    node.sync_input(Input::PeerUp(x.clone()));
    let victim = Signer::new(&libp2p::identity::Keypair::generate_ed25519()).unwrap();
    let victim_id = {
        let (_, h) = change(0);
        victim.sign("x", &h).peer_id().unwrap().to_string()
    };
    let send = |doc: &str, (bytes, _): (Vec<u8>, [u8; 32]), sig: Vec<u8>| {
        node.sync_input(Input::Received {
            from: x.clone(),
            msg: Message::Change {
                doc: doc.into(),
                change: bytes,
                sig,
                ack: false,
                seen: vec![],
            },
        });
    };
    let (_, other_hash) = change(99);
    let (c5, c6) = (change(5), change(6));
    let membership = format!("_mergeflow/nodes/{victim_id}");
    type Case<'a> = (&'a str, String, (Vec<u8>, [u8; 32]), Vec<u8>);
    let bad: Vec<Case> = vec![
        ("no signature", "s/none".into(), change(1), vec![]),
        ("garbage", "s/garbage".into(), change(2), vec![7; 96]),
        ("short", "s/short".into(), change(3), vec![7; 10]),
        (
            "another change's",
            "s/other".into(),
            change(4),
            peer.sign("s/other", &other_hash).to_bytes().to_vec(),
        ),
        (
            "another doc's",
            "s/doc".into(),
            c5.clone(),
            peer.sign("s/elsewhere", &c5.1).to_bytes().to_vec(),
        ),
        (
            "not the membership doc's owner",
            membership.clone(),
            c6.clone(),
            peer.sign(&membership, &c6.1).to_bytes().to_vec(),
        ),
    ];
    let n_bad = bad.len();
    for (_, doc, c, sig) in bad.iter().cloned() {
        send(&doc, c, sig);
    }
    // Relayed: the victim's valid signature over a doc it may not write
    // (another node's membership doc), sent by x. Refused, not stored, and
    // no strike for x, which only passed it on.
    let other_member = format!("_mergeflow/nodes/{x}");
    let c8 = change(8);
    let relayed_sig = victim.sign(&other_member, &c8.1).to_bytes().to_vec();
    send(&other_member, c8, relayed_sig);
    // A sync message and a pushed doc with unsigned changes too.
    let mut d = automerge::Automerge::new();
    {
        use automerge::transaction::Transactable;
        let mut tx = d.transaction();
        tx.put(automerge::ROOT, "n", 1).unwrap();
        tx.commit();
    }
    node.sync_input(Input::Received {
        from: x.clone(),
        msg: Message::Doc {
            doc: "s/pushed".into(),
            data: d.save(),
            sigs: vec![],
        },
    });
    let data = {
        use automerge::sync::SyncDoc;
        // As to a peer known to have nothing: the message carries the changes.
        let mut st = automerge::sync::State::new();
        st.their_heads = Some(vec![]);
        st.their_need = Some(vec![]);
        st.their_have = Some(vec![automerge::sync::Have::default()]);
        d.generate_sync_message(&mut st).unwrap().encode()
    };
    node.sync_input(Input::Received {
        from: x.clone(),
        msg: Message::Sync {
            doc: "s/synced".into(),
            data,
            sigs: vec![],
        },
    });
    // Then a good one, which is stored, signed by its signer.
    let (good, good_hash) = change(7);
    send(
        "s/good",
        (good, good_hash),
        peer.sign("s/good", &good_hash).to_bytes().to_vec(),
    );
    let peer_id = peer
        .sign("s/good", &good_hash)
        .peer_id()
        .unwrap()
        .to_string();
    until("the good change stored", || async {
        node.doc("s/good").unwrap().get().await.ok().map(|_| ())
    })
    .await;
    // Each refusal is an output of the round that refused it.
    let mut rejected = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while rejected.len() < n_bad + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "rejections so far: {rejected:#?}"
        );
        let o = tokio::time::timeout(std::time::Duration::from_secs(60), outputs.recv())
            .await
            .expect("a rejection within the deadline")
            .expect("outputs open");
        if let Output::Rejected { peer, reason } = o {
            assert_eq!(peer, x);
            rejected.push(reason);
        }
    }
    assert_eq!(rejected.len(), n_bad + 2, "one strike each: {rejected:#?}");
    // Inputs are taken in order: a strike for the relayed change would be
    // among these.
    assert!(
        !rejected.iter().any(|r| r.contains(&other_member)),
        "the relay was charged: {rejected:#?}"
    );
    assert!(
        rejected
            .iter()
            .any(|r| r.contains("only") && r.contains("membership")),
        "{rejected:#?}"
    );
    for r in &rejected {
        assert!(
            r.contains("signature") || r.contains("may not write"),
            "{r}"
        );
    }
    for (why, doc, _, _) in &bad {
        assert!(
            node.doc(doc).unwrap().get().await.is_err(),
            "{why}: {doc} was stored"
        );
    }
    assert!(node.doc("s/pushed").unwrap().get().await.is_err());
    assert!(node.doc(&other_member).unwrap().get().await.is_err());
    assert!(node.doc("s/synced").unwrap().get().await.is_err());
    // Reads see the change in memory a moment before the round's batch
    // (with its signature) is in the store.
    until("s/good's history signed by its signer", || async {
        let h = node.docs().history("s/good".parse().unwrap()).await.ok()?;
        (h.len() == 1 && h[0].signed_by.as_deref() == Some(peer_id.as_str())).then_some(())
    })
    .await;
    node.shutdown().await.unwrap();
}

/// A pushed doc of many changes (a catch-up: their signatures are checked
/// on every core before the round, see `SigBook::preverify`) is stored
/// only if every change's signature checks out: one bent signature among
/// 120, or one signed for another doc, refuses the whole doc; all good
/// stores it with each change signed by its signer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_push_is_checked_change_by_change() {
    use automerge::transaction::Transactable;
    use mergeflow::testing::sync::{Input, Message, Output};
    use mergeflow::trust::Signer;
    let dir = tempfile::tempdir().unwrap();
    let (node, mut outputs) = sync_only_node(dir.path()).await;
    let peer = Signer::new(&libp2p::identity::Keypair::generate_ed25519()).unwrap();
    let x = peer.sign("x", &[0; 32]).peer_id().unwrap().to_string();
    node.sync_input(Input::PeerUp(x.clone()));
    let mut d = automerge::Automerge::new();
    for i in 0..120 {
        let mut tx = d.transaction();
        tx.put(automerge::ROOT, format!("k{}", i % 7), i).unwrap();
        tx.commit();
    }
    let hashes: Vec<[u8; 32]> = d.get_changes(&[]).iter().map(|c| c.hash().0).collect();
    let sigs = |doc: &str, bend: Option<usize>, sign_as: &str| {
        let mut out = Vec::new();
        for (i, h) in hashes.iter().enumerate() {
            let mut sig = peer
                .sign(if bend == Some(i) { sign_as } else { doc }, h)
                .to_bytes()
                .to_vec();
            if bend == Some(i) && sign_as == doc {
                sig[50] ^= 1;
            }
            mergeflow::trust::push_entry(&mut out, h, &sig);
        }
        out
    };
    let push = |doc: &str, sigs: Vec<u8>| {
        node.sync_input(Input::Received {
            from: x.clone(),
            msg: Message::Doc {
                doc: doc.into(),
                data: d.save(),
                sigs,
            },
        });
    };
    push("p/bent", sigs("p/bent", Some(77), "p/bent"));
    push("p/elsewhere", sigs("p/elsewhere", Some(3), "p/other"));
    push("p/good", sigs("p/good", None, ""));
    let peer_id = x.clone();
    until(
        "p/good stored, every change signed by its signer",
        || async {
            let h = node.docs().history("p/good".parse().unwrap()).await.ok()?;
            (h.len() == 120
                && h.iter()
                    .all(|c| c.signed_by.as_deref() == Some(peer_id.as_str())))
            .then_some(())
        },
    )
    .await;
    let mut rejected = Vec::new();
    while rejected.len() < 2 {
        let o = tokio::time::timeout(std::time::Duration::from_secs(60), outputs.recv())
            .await
            .expect("a rejection within the deadline")
            .expect("outputs open");
        if let Output::Rejected { reason, .. } = o {
            rejected.push(reason);
        }
    }
    assert!(
        rejected.iter().all(|r| r.contains("signature")),
        "{rejected:#?}"
    );
    assert!(node.doc("p/bent").unwrap().get().await.is_err());
    assert!(node.doc("p/elsewhere").unwrap().get().await.is_err());
    node.shutdown().await.unwrap();
}

/// A node that signs nothing (a hostile or broken peer): an honest node
/// stores none of its changes and bans it, and the hostile node's peers'
/// own data still converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigning_peer_is_refused_and_banned() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_node(&dir.path().join("a"), vec![], |_| {}).await;
    let a_addr = common::listen_addr(&a).await;
    let hostile = mergeflow::Node::builder()
        .config(common::p2p_config(
            &dir.path().join("h"),
            vec![a_addr],
            |_| {},
        ))
        .network(true)
        .unsigned()
        .start()
        .await
        .unwrap();
    let hostile_id = hostile.peer_id().to_string();
    for i in 0..20 {
        hostile
            .doc(&format!("h/{i}"))
            .unwrap()
            .patch(json!({"i": i}))
            .await
            .unwrap();
    }
    until("the hostile peer banned", || async {
        let p = a.peers().into_iter().find(|p| p.peer_id == hostile_id)?;
        (p.rejected >= 10 && !p.connected).then_some(())
    })
    .await;
    for i in 0..20 {
        assert!(
            a.doc(&format!("h/{i}")).unwrap().get().await.is_err(),
            "h/{i} stored"
        );
    }
    hostile.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A backup carries each change's signature: a node restoring it keeps
/// the writer's, and signs as itself only changes that come without one
/// (a backup from before signatures) or with one that does not verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeps_the_writers_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::api_node(&dir.path().join("a"), |_| {}).await;
    let a_id = a.peer_id().to_string();
    for i in 0..3 {
        a.doc("kept")
            .unwrap()
            .patch(json!({ "i": i }))
            .await
            .unwrap();
    }
    let file = dir.path().join("a.backup");
    let manifest = a.backup_to_file(&file).await.unwrap();
    let history = signers(&a, "kept").await.len();
    assert_eq!(manifest.docs[0].signatures, history as u64, "{manifest:?}");
    // The same doc in a backup without signatures, and with garbage ones.
    let save = a.docs().saved(&"kept".parse().unwrap()).unwrap().unwrap();
    let mut w = mergeflow::backup::BackupWriter::new(Vec::new(), "old", 1).unwrap();
    w.doc("unsigned", &save).unwrap();
    let hash = signers(&a, "kept").await[0].0.clone();
    let mut bad: Vec<u8> = (0..hash.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hash[i..i + 2], 16).unwrap())
        .collect();
    bad.extend_from_slice(&[9u8; mergeflow::trust::SIG_LEN]);
    w.signed_doc("forged", &save, &bad).unwrap();
    let other = dir.path().join("other.backup");
    std::fs::write(&other, w.finish(2).unwrap().1).unwrap();
    let before = signers(&a, "kept").await;
    a.shutdown().await.unwrap();

    let b = common::api_node(&dir.path().join("b"), |_| {}).await;
    let b_id = b.peer_id().to_string();
    let report = b.restore_file(&file).await.unwrap();
    assert_eq!(report.changed, 1, "{report:?}");
    assert_eq!(signers(&b, "kept").await, before);
    assert!(
        before
            .iter()
            .all(|(_, s)| s.as_deref() == Some(a_id.as_str()))
    );
    b.restore_file(&other).await.unwrap();
    for id in ["unsigned", "forged"] {
        let got = signers(&b, id).await;
        assert_eq!(got.len(), history);
        assert!(
            got.iter().all(|(_, s)| s.as_deref() == Some(b_id.as_str())),
            "{id}: {got:?}"
        );
    }
    // Deleting a doc drops its changes' signatures with them.
    let kept: mergeflow::DocId = "kept".parse().unwrap();
    assert!(!b.docs().signatures(&kept).unwrap().is_empty());
    b.docs().delete(kept.clone()).await.unwrap();
    assert!(b.docs().signatures(&kept).unwrap().is_empty());
    b.shutdown().await.unwrap();
}

/// A data dir from before signatures (its changes stored without any):
/// after the upgrade its node vouches for them, signing each the first
/// time it sends it, so a peer stores them signed by that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stored_before_signatures_are_vouched_for_by_their_holder() {
    let dir = tempfile::tempdir().unwrap();
    let old_dir = dir.path().join("old");
    let old = mergeflow::Node::builder()
        .config(common::p2p_config(&old_dir, vec![], |_| {}))
        .unsigned()
        .start()
        .await
        .unwrap();
    for i in 0..5 {
        old.doc(&format!("legacy/{i}"))
            .unwrap()
            .patch(json!({"i": i}))
            .await
            .unwrap();
    }
    assert_eq!(
        signers(&old, "legacy/0").await[0].1,
        None,
        "stored unsigned"
    );
    // A tombstone from before deletes were signed, too.
    old.doc("legacy/4").unwrap().delete().await.unwrap();
    old.shutdown().await.unwrap();
    drop(old);

    let upgraded = common::p2p_node(&old_dir, vec![], |_| {}).await;
    let holder = upgraded.peer_id().to_string();
    let addr = common::listen_addr(&upgraded).await;
    let fresh = common::p2p_node(&dir.path().join("fresh"), vec![addr], |_| {}).await;
    until("the legacy tombstone on the fresh node", || async {
        let deleted = fresh.doc("legacy/4").unwrap().get().await.unwrap_err();
        deleted.to_string().contains("deleted").then_some(())
    })
    .await;
    for i in 0..4 {
        let id = format!("legacy/{i}");
        // Reads see a merged change a moment before its signature is in
        // the store (see above): wait for both.
        until(
            "the legacy doc on the fresh node, signed by its holder",
            || async {
                let got = fresh.docs().history(id.parse().unwrap()).await.ok()?;
                (!got.is_empty()
                    && got
                        .iter()
                        .all(|h| h.signed_by.as_deref() == Some(holder.as_str())))
                .then_some(())
            },
        )
        .await;
    }
    assert!(upgraded.peers().iter().all(|p| p.rejected == 0));
    assert!(fresh.peers().iter().all(|p| p.rejected == 0));
    fresh.shutdown().await.unwrap();
    upgraded.shutdown().await.unwrap();
}

/// A peer that lost changes it had acknowledged (its disk was rolled back,
/// or it lost what it had not flushed) and wrote since: its sync state on
/// the other node still names those changes as shared, so the changes it
/// is sent again lie before the shared heads. They must come with their
/// signatures all the same, or the peer refuses them and strikes the
/// sender (the short chaos campaign found this; the test fails before
/// 80903ee with a rejection on B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_lost_acknowledged_changes_gets_them_again_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let fast = |c: &mut mergeflow::config::Config| c.net.anti_entropy_ms = 200;
    let a = common::p2p_node(&a_dir, vec![], fast).await;
    let a_id = a.peer_id().to_string();
    let a_addr = common::listen_addr(&a).await;
    let d = || a.doc("lost").unwrap();
    d().patch(json!({"n": 1})).await.unwrap();
    let b = common::p2p_node(&b_dir, vec![a_addr.clone()], fast).await;
    let b_id = b.peer_id().to_string();
    let has = |node: &mergeflow::Node, n: i64| {
        let doc = node.doc("lost").unwrap();
        async move { (doc.get().await.ok()?["n"] == json!(n)).then_some(()) }
    };
    until("n = 1 on B", || has(&b, 1)).await;
    b.shutdown().await.unwrap();
    drop(b);
    let old_b = dir.path().join("b-old");
    common::copy_dir(&b_dir, &old_b);

    // B gets n = 2 and 3 by a sync session (it was offline), which ends in
    // agreement: A saves its sync state with B, naming them as shared.
    let b = common::p2p_node(&b_dir, vec![a_addr], fast).await;
    b.set_online(false);
    for n in 2..4 {
        d().patch(json!({"n": n})).await.unwrap();
    }
    b.set_online(true);
    until("n = 3 on B, signed by A", || async {
        has(&b, 3).await?;
        let v = signers(&b, "lost").await;
        (v.len() == signers(&a, "lost").await.len()).then_some(())
    })
    .await;
    b.shutdown().await.unwrap();
    drop(b);
    a.shutdown().await.unwrap();
    drop(a);

    // B comes back from the copy (without n = 2 and 3) and writes before it
    // meets A: its heads are ones A does not know, so A keeps the saved
    // shared heads.
    std::fs::remove_dir_all(&b_dir).unwrap();
    common::copy_dir(&old_b, &b_dir);
    let b = common::p2p_node(&b_dir, vec![], fast).await;
    assert_eq!(b.peer_id().to_string(), b_id);
    b.doc("lost")
        .unwrap()
        .patch(json!({"from_b": true}))
        .await
        .unwrap();
    let b_addr = common::listen_addr(&b).await;
    let a = common::p2p_node(&a_dir, vec![b_addr], fast).await;
    until(
        "A's n = 3 and B's write on both, every change signed",
        || async {
            for node in [&a, &b] {
                let v = node.doc("lost").unwrap().get().await.ok()?;
                if v["from_b"] != json!(true) {
                    return None;
                }
                let signed = signers(node, "lost").await;
                if signed.len() != 4 || signed.iter().any(|(_, s)| s.is_none()) {
                    return None;
                }
            }
            has(&b, 3).await
        },
    )
    .await;
    let by_a = signers(&b, "lost")
        .await
        .into_iter()
        .filter(|(_, s)| s.as_deref() == Some(a_id.as_str()))
        .count();
    assert_eq!(by_a, 3, "A's three writes signed by A on B");
    assert!(a.peers().iter().all(|p| p.rejected == 0));
    assert!(b.peers().iter().all(|p| p.rejected == 0));
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A change that arrives before its parent (a pushed doc or a sync message
/// can bring one after a Bloom filter false positive) waits in Automerge's
/// queue; when the parent comes, in a later message and write round, both
/// are stored, each with the signature its own message carried. (Before
/// the fix the child's signature was dropped with its round: the child was
/// refused as unsigned and its sender struck, and the two nodes looped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_waited_for_its_parent_keeps_its_signature() {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    use mergeflow::testing::sync::{Input, Message, Output};
    use mergeflow::trust::Signer;
    let dir = tempfile::tempdir().unwrap();
    let (node, mut outputs) = sync_only_node(dir.path()).await;
    let peer = Signer::new(&libp2p::identity::Keypair::generate_ed25519()).unwrap();
    // Parent and child, made by the peer.
    let mut d = automerge::Automerge::new();
    let mut hashes = Vec::new();
    for n in [1, 2] {
        let mut tx = d.transaction();
        tx.put(automerge::ROOT, "n", n).unwrap();
        hashes.push(tx.commit().0.unwrap());
    }
    let x = peer.sign("q", &hashes[0].0).peer_id().unwrap().to_string();
    common::sync_peer_up(&node, &x);
    let push = |h: &automerge::ChangeHash| {
        let bytes = d.get_change_by_hash(h).unwrap().raw_bytes().to_vec();
        let mut sigs = Vec::new();
        mergeflow::trust::push_entry(&mut sigs, &h.0, &peer.sign("q", &h.0).to_bytes());
        node.sync_input(Input::Received {
            from: x.clone(),
            msg: Message::Doc {
                doc: "q".into(),
                data: bytes,
                sigs,
            },
        });
    };
    // The child first, then the parent in a later round: a local write
    // queued after the child returns once the child's round is done.
    push(&hashes[1]);
    node.doc("barrier")
        .unwrap()
        .patch(json!({"b": 1}))
        .await
        .unwrap();
    push(&hashes[0]);
    until(
        "both changes stored, each with the peer's signature",
        || async {
            let h = node.docs().history("q".parse().unwrap()).await.ok()?;
            (h.len() == 2 && h.iter().all(|e| e.signed_by.as_deref() == Some(x.as_str())))
                .then_some(())
        },
    )
    .await;
    assert_eq!(node.doc("q").unwrap().get().await.unwrap(), json!({"n": 2}));
    while let Ok(out) = outputs.try_recv() {
        assert!(!matches!(out, Output::Rejected { .. }), "{out:?}");
    }
    node.shutdown().await.unwrap();
}
