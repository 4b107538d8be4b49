//! Grants (issue 21): `net.admins` and the access file an admin applies.
//! Every node enforces them on its own writes (403 before a change is made)
//! and on every change a peer sends (refused, not stored, a strike).

mod common;

use std::path::Path;

use common::until;
use mergeflow::grants::AccessFile;
use serde_json::json;

/// The peer id a data dir's node will have.
async fn identity(dir: &Path) -> String {
    let node = common::p2p_node(dir, vec![], |_| {}).await;
    let id = node.peer_id().to_string();
    node.shutdown().await.unwrap();
    id
}

fn sensor(c: &mut mergeflow::config::Config, admins: &[String]) {
    c.net.admins = admins.to_vec();
    // Only the links a test dials: what reaches A from H is relayed by B.
    c.net.kademlia = false;
    c.net.anti_entropy_ms = 200;
    c.node.labels.insert("role".into(), "sensor".into());
}

/// Sends `req` and checks the answer is 403 `forbidden`.
async fn assert_forbidden(req: reqwest::RequestBuilder) {
    let r = req.send().await.unwrap();
    let (url, status) = (r.url().to_string(), r.status().as_u16());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{url}: {v}"
    );
}

async fn exists(node: &mergeflow::Node, id: &str) -> bool {
    node.doc(id).unwrap().get().await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_bind_local_writes_and_peers_and_only_admins_change_them() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db, dh) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("h"),
    );
    let a_id = identity(&da).await;
    let h_id = identity(&dh).await;
    let admins = vec![a_id.clone()];
    let a = common::p2p_api_node(&da, vec![], |c| {
        c.net.admins = admins.clone();
        c.net.anti_entropy_ms = 200;
        c.net.kademlia = false;
    })
    .await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_api_node(&db, vec![a_addr.clone()], |c| sensor(c, &admins)).await;
    let b_id = b.peer_id().to_string();
    let b_api = format!("http://{}", b.api_addr().unwrap());
    let http = reqwest::Client::new();

    // Only admins change grants and workflow definitions.
    let file = AccessFile::parse(
        "[[grant]]\nlabels = { role = \"sensor\" }\nwrite = [\"sensors/{peer}/**\"]\nread = [\"sensors/**\"]\n",
        "access.toml",
    )
    .unwrap();
    let err = b.apply_access(&file).await.unwrap_err().to_string();
    assert!(err.contains("not in net.admins"), "{err}");
    for (method, path, body) in [
        (
            "PUT",
            "/v1/access",
            "[[grant]]\npeers = []\nlabels = { a = \"b\" }\n",
        ),
        (
            "POST",
            "/v1/workflows",
            "name = \"w\"\n[on]\ndoc = \"x/*\"\n[[steps]]\nid = \"s\"\nkind = \"derive\"\nset = { \"/y\" = \"1\" }\n",
        ),
    ] {
        let req = http
            .request(method.parse().unwrap(), format!("{b_api}{path}"))
            .header("content-type", "application/toml")
            .body(body);
        assert_forbidden(req).await;
    }

    // The admin applies grants; they reach B by sync.
    a.apply_access(&file).await.unwrap();
    until("B holds the grants", || async {
        b.policy().has_grants().then_some(())
    })
    .await;
    let shown: serde_json::Value = http
        .get(format!("{b_api}/v1/access"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["admins"], json!([a_id]), "{shown}");
    assert_eq!(shown["this_node_is_admin"], json!(false));
    assert_eq!(shown["grant"][0]["write"], json!(["sensors/{peer}/**"]));

    // B writes within its grant; outside it, 403 before any change.
    let own = format!("sensors/{b_id}/t");
    b.doc(&own).unwrap().patch(json!({"c": 21})).await.unwrap();
    for other in [format!("sensors/{h_id}/t"), "elsewhere/x".to_string()] {
        let req = http
            .patch(format!("{b_api}/v1/docs/{}", other.replace('/', "%2F")))
            .json(&json!({"c": 1}));
        assert_forbidden(req).await;
        assert!(!exists(&b, &other).await, "{other} made anyway");
    }
    until("B's write on A", || async {
        exists(&a, &own).await.then_some(())
    })
    .await;

    // A node that calls itself an admin (its own net.admins), linked to B
    // only: what it may write by the grants reaches A through B; the rest
    // is refused by B, so never relayed, and it is banned.
    let b_addr = common::listen_addr(&b).await;
    let h = common::p2p_node(&dh, vec![b_addr], |c| {
        sensor(c, std::slice::from_ref(&h_id));
    })
    .await;
    let legit = format!("sensors/{h_id}/ok");
    h.doc(&legit)
        .unwrap()
        .patch(json!({"ok": true}))
        .await
        .unwrap();
    until("H's granted write on B and, relayed, on A", || async {
        (exists(&a, &legit).await && exists(&b, &legit).await).then_some(())
    })
    .await;
    let mut refused = vec![format!("sensors/{b_id}/forged")];
    refused.extend((0..12).map(|i| format!("elsewhere/{i}")));
    for id in &refused {
        h.doc(id)
            .unwrap()
            .patch(json!({"evil": true}))
            .await
            .unwrap();
    }
    h.workflows()
        .apply("name = \"evil\"\n[on]\ndoc = \"**\"\n[[steps]]\nid = \"s\"\nkind = \"derive\"\nset = { \"/pwned\" = \"1\" }\n")
        .await
        .unwrap();
    until("H banned by B", || async {
        let p = b.peers().into_iter().find(|p| p.peer_id == h_id)?;
        (p.rejected >= 10 && !p.connected).then_some(())
    })
    .await;
    assert!(
        a.peers().iter().all(|p| p.peer_id != h_id),
        "A and H were linked"
    );
    until("H's write on A signed by H", || async {
        let got = signer_of(&a, &legit).await;
        got.iter()
            .all(|s| s.as_deref() == Some(h_id.as_str()))
            .then_some(())
    })
    .await;
    for node in [&a, &b] {
        for id in &refused {
            assert!(!exists(node, id).await, "{id} stored");
        }
        assert!(
            node.workflows().get("evil").is_err()
                && !exists(node, "_mergeflow/workflows/evil").await,
            "the definition was stored"
        );
    }
    h.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

fn grant_to(peer: &str) -> AccessFile {
    AccessFile::parse(
        &format!("[[grant]]\npeers = [\"{peer}\"]\nwrite = [\"b/**\"]\nread = [\"b/**\"]\n"),
        "access.toml",
    )
    .unwrap()
}

async fn signer_of(node: &mergeflow::Node, id: &str) -> Vec<Option<String>> {
    let history = node.docs().history(id.parse().unwrap()).await.unwrap();
    history.into_iter().map(|h| h.signed_by).collect()
}

/// Revoking a grant stops the peer's next writes (its earlier ones stay);
/// a rotated key is a new peer id that needs its own grant, and the
/// node's earlier changes keep the old key's signatures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_stops_new_writes_and_a_rotated_key_needs_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a_id = identity(&da).await;
    let admins = vec![a_id];
    let tweak = |c: &mut mergeflow::config::Config| {
        c.net.admins = admins.clone();
        c.net.anti_entropy_ms = 200;
    };
    let a = common::p2p_node(&da, vec![], tweak).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&db, vec![a_addr.clone()], tweak).await;
    let old_id = b.peer_id().to_string();
    a.apply_access(&grant_to(&old_id)).await.unwrap();
    until("B holds the grant", || async {
        b.policy().may_write(&old_id, "b/1").is_ok().then_some(())
    })
    .await;
    b.doc("b/1").unwrap().patch(json!({"v": 1})).await.unwrap();
    // Signed: its signature is in A's store, not only the change in memory.
    let signed = |id: &'static str, by: String| {
        let a = &a;
        async move {
            let got = a.docs().history(id.parse().unwrap()).await.ok()?;
            (!got.is_empty()
                && got
                    .iter()
                    .all(|h| h.signed_by.as_deref() == Some(by.as_str())))
            .then_some(())
        }
    };
    until("b/1 on A, signed by B", || signed("b/1", old_id.clone())).await;

    // Revoked: a file that grants B nothing.
    a.apply_access(&AccessFile::parse("", "empty").unwrap())
        .await
        .unwrap();
    until("B holds the revocation", || async {
        b.policy().may_write(&old_id, "b/2").is_err().then_some(())
    })
    .await;
    let err = b
        .doc("b/2")
        .unwrap()
        .patch(json!({"v": 2}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("may not write"), "{err}");
    assert!(
        exists(&a, "b/1").await && exists(&b, "b/1").await,
        "earlier writes stay"
    );

    // Rotate B's key with the CLI while it is stopped.
    b.shutdown().await.unwrap();
    drop(b);
    let out = std::process::Command::new(common::bin())
        .args(["access", "rotate-key", "--json", "--data-dir"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids["old"], json!(old_id));
    let b = common::p2p_node(&db, vec![a_addr], tweak).await;
    let new_id = b.peer_id().to_string();
    assert_eq!(ids["new"], json!(new_id));
    assert_ne!(new_id, old_id);
    assert_eq!(signer_of(&b, "b/1").await, vec![Some(old_id.clone())]);
    assert!(b.doc("b/3").unwrap().patch(json!({"v": 3})).await.is_err());
    a.apply_access(&grant_to(&new_id)).await.unwrap();
    until("B holds its new grant", || async {
        b.policy().may_write(&new_id, "b/3").is_ok().then_some(())
    })
    .await;
    b.doc("b/3").unwrap().patch(json!({"v": 3})).await.unwrap();
    until("b/3 on A, signed by B's new key", || {
        signed("b/3", new_id.clone())
    })
    .await;
    assert_eq!(signer_of(&a, "b/1").await, vec![Some(old_id)]);
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// A node with its own checks switched off (`test-utils`), its changes
/// signed: it writes another node's membership doc, the access doc and a
/// workflow definition, and a doc outside its grant. No honest node stores
/// any of it, and it is banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_its_checks_off_forges_no_system_doc() {
    use mergeflow::doc::Pointer;
    use mergeflow::testing::runtime::Change;
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a_id = identity(&da).await;
    let admins = vec![a_id.clone()];
    let a = common::p2p_node(&da, vec![], |c| sensor(c, &admins)).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&db, vec![a_addr.clone()], |c| sensor(c, &admins)).await;
    let b_id = b.peer_id().to_string();
    let b_addr = common::listen_addr(&b).await;
    a.apply_access(
        &AccessFile::parse(
            "[[grant]]\nlabels = { role = \"sensor\" }\nwrite = [\"sensors/{peer}/**\"]\n",
            "access.toml",
        )
        .unwrap(),
    )
    .await
    .unwrap();
    until("B holds the grants", || async {
        b.policy().has_grants().then_some(())
    })
    .await;
    let b_member = format!("_mergeflow/nodes/{b_id}");
    until("B's membership on A", || async {
        exists(&a, &b_member).await.then_some(())
    })
    .await;

    a.doc("shared/keep")
        .unwrap()
        .patch(json!({"kept": true}))
        .await
        .unwrap();
    let h = mergeflow::Node::builder()
        .config(common::p2p_config(
            &dir.path().join("h"),
            vec![a_addr, b_addr],
            |c| sensor(c, &admins),
        ))
        .network(true)
        .unchecked()
        .start()
        .await
        .unwrap();
    let h_id = h.peer_id().to_string();
    let set = |path: &str, v: serde_json::Value| {
        Change::SetIfDifferent(vec![(Pointer::parse(path).unwrap(), v)])
    };
    let forged: Vec<(String, Change)> = vec![
        (b_member.clone(), set("/labels", json!({"role": "gateway"}))),
        (
            "_mergeflow/access".into(),
            set("/grant", json!([{"peers": [h_id], "write": ["**"]}])),
        ),
        (
            "_mergeflow/workflows/evil".into(),
            set("/text", json!("name = \"evil\"")),
        ),
        (format!("sensors/{b_id}/forged"), set("/x", json!(1))),
        // An effect marker of a workflow H does not run: it would make the
        // nodes that do run it skip the effect.
        (
            "_mergeflow/effects/w/00".into(),
            set("/k", json!({"by": h_id})),
        ),
    ];
    for (id, change) in forged {
        h.docs().write(id.parse().unwrap(), change).await.unwrap();
    }
    // And deletes the access doc and B's membership doc (no peer's delete
    // of a system doc is taken), and a data doc it may not write: its
    // delete is signed by H, whom the rules refuse.
    for id in ["_mergeflow/access", b_member.as_str()] {
        h.docs().delete(id.parse().unwrap()).await.unwrap();
    }
    h.doc("shared/keep")
        .unwrap()
        .patch(json!({"h": 1}))
        .await
        .unwrap();
    h.doc("shared/keep").unwrap().delete().await.unwrap();
    until("H banned by A and B", || async {
        let banned = |n: &mergeflow::Node| {
            n.peers()
                .into_iter()
                .any(|p| p.peer_id == h_id && p.rejected >= 10 && !p.connected)
        };
        (banned(&a) && banned(&b)).then_some(())
    })
    .await;
    assert_eq!(
        a.doc("shared/keep").unwrap().get().await.unwrap(),
        json!({"kept": true}),
        "H's signed delete of a doc it may not write is refused"
    );
    for node in [&a, &b] {
        let labels = node.doc(&b_member).unwrap().get().await.unwrap()["labels"].clone();
        assert_eq!(labels, json!({"role": "sensor"}));
        let signers = signer_of(node, &b_member).await;
        assert!(signers.iter().all(|s| s.as_deref() == Some(b_id.as_str())));
        assert!(node.policy().has_grants(), "the grants are gone");
        let access = signer_of(node, "_mergeflow/access").await;
        assert!(access.iter().all(|s| s.as_deref() == Some(a_id.as_str())));
        assert!(!exists(node, "_mergeflow/workflows/evil").await);
        assert!(!exists(node, &format!("sensors/{b_id}/forged")).await);
        assert!(!exists(node, "_mergeflow/effects/w/00").await);
        assert!(node.policy().may_write(&h_id, "anything").is_err());
    }
    h.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
