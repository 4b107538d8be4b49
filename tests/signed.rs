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
