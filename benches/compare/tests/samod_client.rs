//! samod 0.16, the Rust automerge-repo, as a client of mergeflow's
//! automerge-repo endpoint (`GET /v1/automerge`): the same protocol the JS
//! clients in tests/interop/ speak, from the other implementation of it.
//! Lives in this crate so that samod stays out of mergeflow's own build;
//! `.ci/run` runs it with `cargo test --manifest-path benches/compare/Cargo.toml`.
//!
//! Two meshed nodes A and B, one samod repo on each node's endpoint:
//! - a doc written in-process on B is found by its URL through A, and its
//!   string reads as an Automerge string (not text);
//! - an edit from the client on A (a scalar string and a text object)
//!   reaches B over the mesh as JSON strings;
//! - a doc the client on A creates appears on B as `am/<id>`, and the client
//!   on B finds it there and edits it; the client on A sees that edit;
//! - an id no node has is not found.

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt, TryStreamExt};
use samod::{BackoffConfig, DialError, Dialer, DocHandle, DocumentId, Repo, Transport};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Polls `check` until it returns `Some`; panics naming `what` after a
/// generous deadline (debug build, loaded CI machine).
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain `ws://` dialer on tokio-tungstenite. samod's own (feature
/// `tungstenite`) pulls in native-tls and OpenSSL, which a loopback test
/// has no use for.
struct WsDial(url::Url);

impl Dialer for WsDial {
    type Error = std::convert::Infallible;

    fn url(&self) -> url::Url {
        self.0.clone()
    }

    fn connect(&self) -> BoxFuture<'static, Result<Transport, DialError<Self::Error>>> {
        let url = self.0.clone();
        async move {
            let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .map_err(DialError::transient)?;
            let (sink, stream) = ws.split();
            let stream = stream
                .try_filter_map(|m| async move {
                    Ok(match m {
                        Message::Binary(b) => Some(b.to_vec()),
                        _ => None,
                    })
                })
                .boxed();
            let sink = sink.with(|b: Vec<u8>| async move {
                Ok::<_, tokio_tungstenite::tungstenite::Error>(Message::Binary(b.into()))
            });
            Ok(Transport::new(stream, Box::pin(sink)))
        }
        .boxed()
    }
}

async fn node(dir: &std::path::Path, peers: Vec<String>) -> mergeflow::Node {
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.net.mdns = false;
    config.net.kademlia = false;
    config.net.peers = peers;
    config.log.level = "error".into();
    mergeflow::Node::builder()
        .config(config)
        .network(true)
        .api("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .expect("start a mergeflow node")
}

/// An in-memory samod repo connected to `node`'s endpoint.
async fn client(node: &mergeflow::Node) -> Repo {
    let repo = Repo::build_tokio().load().await;
    let url = format!("ws://{}/v1/automerge", node.api_addr().unwrap());
    let handle = repo
        .dial(
            BackoffConfig::default(),
            std::sync::Arc::new(WsDial(url.parse().unwrap())),
        )
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), handle.established())
        .await
        .expect("samod joins within the deadline")
        .expect("samod joins the node");
    repo
}

/// The doc's automerge id as the node reports it (`GET /v1/docs/{id}/url`).
async fn id_of(node: &mergeflow::Node, name: &str) -> DocumentId {
    let api = mergeflow::client::Client::new(&format!("http://{}", node.api_addr().unwrap()));
    let url = api
        .automerge_url(name)
        .await
        .expect("GET /v1/docs/{id}/url");
    url.strip_prefix("automerge:").unwrap().parse().unwrap()
}

/// The string at `key`: a text object (what the node writes for a JSON
/// string by default, `docs.strings = "text"`) or a scalar string.
fn read(doc: &DocHandle, key: &str) -> Option<String> {
    doc.with_document(|d| match d.get(ROOT, key).unwrap() {
        Some((Value::Object(ObjType::Text), obj)) => Some(d.text(obj).unwrap()),
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    })
}

async fn find(repo: &Repo, id: &DocumentId) -> Option<DocHandle> {
    tokio::time::timeout(Duration::from_secs(60), repo.find(id.clone()))
        .await
        .expect("find answers within the deadline")
        .expect("repo running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samod_syncs_with_the_mesh_through_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(&dir.path().join("a"), vec![]).await;
    let a_addr = until("A's p2p address", || async {
        a.status().await.listen_addrs.first().cloned()
    })
    .await;
    let b = node(&dir.path().join("b"), vec![a_addr]).await;
    until("A and B connected", || async {
        (a.status().await.peers >= 1).then_some(())
    })
    .await;

    // A doc written on B, found by its URL through A.
    b.doc("notes/shared")
        .unwrap()
        .patch(json!({"title": "from B", "n": 1}))
        .await
        .unwrap();
    let on_a = client(&a).await;
    let id = id_of(&b, "notes/shared").await;
    until("A to have B's doc", || async {
        a.doc("notes/shared").unwrap().get().await.ok().map(|_| ())
    })
    .await;
    let doc = find(&on_a, &id)
        .await
        .expect("samod finds notes/shared by URL");
    let title = doc.with_document(|d| d.get(ROOT, "title").unwrap().map(|(v, _)| v.to_owned()));
    assert_eq!(
        title,
        Some(Value::Object(ObjType::Text)),
        "a JSON string written over the API is a text object (JS reads a plain string)"
    );
    assert_eq!(read(&doc, "title").as_deref(), Some("from B"));

    // samod's edit reaches B over the mesh.
    doc.with_document(|d| {
        let mut tx = d.transaction();
        tx.put(ROOT, "from_samod", "hello").unwrap();
        let text = tx.put_object(ROOT, "note", ObjType::Text).unwrap();
        tx.splice_text(&text, 0, 0, "typed in samod").unwrap();
        tx.commit();
    });
    until("samod's edit on B", || async {
        let v = b.doc("notes/shared").unwrap().get().await.ok()?;
        (v["from_samod"] == json!("hello") && v["note"] == json!("typed in samod")).then_some(())
    })
    .await;

    // A doc samod creates appears on B as am/<id>.
    let mut fresh = Automerge::new();
    let mut tx = fresh.transaction();
    tx.put(ROOT, "made_by", "samod").unwrap();
    tx.commit();
    let created = on_a.create(fresh).await.unwrap();
    let name = format!("am/{}", created.document_id());
    until("samod's doc on B", || async {
        let v = b.doc(&name).unwrap().get().await.ok()?;
        (v["made_by"] == json!("samod")).then_some(())
    })
    .await;

    // A client on B finds it and edits it; the client on A sees the edit.
    let on_b = client(&b).await;
    let there = find(&on_b, created.document_id())
        .await
        .expect("samod on B finds the doc made through A");
    there.with_document(|d| {
        let mut tx = d.transaction();
        tx.put(ROOT, "seen_on", "B").unwrap();
        tx.commit();
    });
    until("B's client's edit at A's client", || async {
        (read(&created, "seen_on").as_deref() == Some("B")).then_some(())
    })
    .await;

    // An id no node has: the node answers doc-unavailable, find gives None.
    assert!(
        find(&on_a, &id_of(&a, "notes/never-written").await)
            .await
            .is_none()
    );

    on_a.stop().await;
    on_b.stop().await;
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
