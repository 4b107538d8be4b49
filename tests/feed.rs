//! The change feed: `Node::subscribe` in the library and `GET /v1/events`
//! (Server-Sent Events) over HTTP, for local writes, deletes, and changes
//! merged from a peer, with resume from an event id.

mod common;

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use mergeflow::feed::{ChangeEvent, FeedItem};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Generous: only a broken feed waits this long.
const DEADLINE: Duration = Duration::from_secs(60);

async fn next_change(feed: &mut (impl Stream<Item = FeedItem> + Unpin)) -> ChangeEvent {
    match tokio::time::timeout(DEADLINE, feed.next()).await {
        Ok(Some(FeedItem::Change(e))) => (*e).clone(),
        other => panic!("expected a change event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_writes_and_deletes_reach_subscribers_with_paths() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::p2p_node(dir.path(), vec![], |_| {}).await;
    let mut feed = Box::pin(node.subscribe("sensors/*").unwrap());

    node.doc("other/x")
        .unwrap()
        .patch(json!({"a": 1}))
        .await
        .unwrap();
    let w = node
        .doc("sensors/t1")
        .unwrap()
        .patch(json!({"celsius": 21, "meta": {"room": "lab"}}))
        .await
        .unwrap();
    let e = next_change(&mut feed).await;
    assert_eq!(e.doc, "sensors/t1", "other/x does not match the glob");
    assert!(e.local && !e.deleted);
    assert_eq!(e.origin, node.peer_id().to_string());
    assert_eq!(e.heads, w.heads);
    assert_eq!(e.paths, vec!["/celsius", "/meta", "/meta/room"]);

    node.doc("sensors/t1")
        .unwrap()
        .patch(json!({"meta": {"room": "hall"}}))
        .await
        .unwrap();
    let second = next_change(&mut feed).await;
    assert_eq!(second.paths, vec!["/meta/room"]);
    // A write that changes nothing is not an event; a delete is.
    node.doc("sensors/t1")
        .unwrap()
        .patch(json!({"meta": {"room": "hall"}}))
        .await
        .unwrap();
    node.doc("sensors/t1").unwrap().delete().await.unwrap();
    let del = next_change(&mut feed).await;
    assert!(del.deleted && del.heads.is_empty());

    // Resuming after the first event replays the rest, in order.
    let mut resumed = Box::pin(node.subscribe_after("sensors/*", Some(&e.id)).unwrap());
    assert_eq!(next_change(&mut resumed).await.id, second.id);
    assert_eq!(next_change(&mut resumed).await.id, del.id);
    // An id from another boot cannot be resumed: the subscriber is told.
    let mut stale = Box::pin(node.subscribe_after("**", Some("999-1")).unwrap());
    let item = tokio::time::timeout(DEADLINE, stale.next()).await.unwrap();
    assert_eq!(item, Some(FeedItem::Missed { count: None }));
    assert!(
        node.subscribe("sensors/[").is_err(),
        "a bad glob is refused"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_merged_from_a_peer_name_their_origin() {
    let dir = tempfile::tempdir().unwrap();
    let a = common::p2p_node(&dir.path().join("a"), vec![], |_| {}).await;
    let a_addr = common::listen_addr(&a).await;
    let b = common::p2p_node(&dir.path().join("b"), vec![a_addr], |_| {}).await;
    let mut feed = Box::pin(b.subscribe("**").unwrap());
    let w = a
        .doc("shared/doc")
        .unwrap()
        .patch(json!({"v": 1, "meta": {"room": "k"}}))
        .await
        .unwrap();
    // A write before the peers connected arrives by anti-entropy (a pushed
    // doc), after by the fast path; either way one event says so, with the
    // paths it changed on b.
    let e = next_change(&mut feed).await;
    assert_eq!(e.doc, "shared/doc");
    assert!(!e.local);
    assert_eq!(e.origin, a.peer_id().to_string());
    assert_eq!(e.heads, w.heads);
    assert_eq!(e.paths, ["/meta", "/meta/room", "/v"]);
    let w = a
        .doc("shared/doc")
        .unwrap()
        .patch(json!({"meta": {"room": "j"}}))
        .await
        .unwrap();
    let e = next_change(&mut feed).await;
    assert_eq!(e.heads, w.heads);
    assert_eq!(e.paths, ["/meta/room"]);
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// Reads SSE events (`event`, `id`, `data` lines) from a raw HTTP response.
async fn sse_events(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
    n: usize,
) -> Vec<(String, String, serde_json::Value)> {
    let mut out = Vec::new();
    let (mut event, mut id) = (String::new(), String::new());
    while out.len() < n {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("stream open");
        if let Some(v) = line.strip_prefix("event: ") {
            event = v.to_string();
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            out.push((event.clone(), id.clone(), serde_json::from_str(v).unwrap()));
        }
    }
    out
}

async fn open_events(
    api: std::net::SocketAddr,
    query: &str,
    last_id: Option<&str>,
) -> tokio::io::Lines<BufReader<tokio::net::TcpStream>> {
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    let resume = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    let req = format!("GET /v1/events{query} HTTP/1.1\r\nHost: {api}\r\n{resume}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(status.contains("200"), "{status}");
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_stream_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = mergeflow::config::Config::default();
    config.node.data_dir = dir.path().join("data");
    let node = mergeflow::Node::builder()
        .config(config)
        .api("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let api = node.api_addr().unwrap();
    let mut lines = open_events(api, "?doc=feed/*", None).await;
    // The subscription exists once the response headers are out.
    for i in 0..3 {
        node.doc(&format!("feed/{i}"))
            .unwrap()
            .patch(json!({"i": i}))
            .await
            .unwrap();
    }
    let got = sse_events(&mut lines, 3).await;
    let docs: Vec<&str> = got
        .iter()
        .map(|(_, _, d)| d["doc"].as_str().unwrap())
        .collect();
    assert_eq!(docs, ["feed/0", "feed/1", "feed/2"]);
    assert!(
        got.iter()
            .all(|(ev, id, d)| ev == "change" && d["id"] == **id)
    );

    // A client that saw only the first event resumes with Last-Event-ID.
    let mut again = open_events(api, "?doc=feed/*", Some(&got[0].1)).await;
    let replay = sse_events(&mut again, 2).await;
    assert_eq!(replay[0].1, got[1].1);
    assert_eq!(replay[1].1, got[2].1);

    // Bad input gets a JSON error.
    let client = reqwest::Client::new();
    let r = client
        .get(format!("http://{api}/v1/events?doc=%5B"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    // Shutdown ends open streams rather than waiting on them.
    node.shutdown().await.unwrap();
}

/// An open `GET /v1/events` response, read event by event.
struct Sse {
    resp: reqwest::Response,
    parser: mergeflow::client::SseParser,
    queued: std::collections::VecDeque<(String, String, serde_json::Value)>,
}

impl Sse {
    /// `GET /v1/events` with `query`, resuming after `last_id` if given, as
    /// `token` if given; asserts 200.
    async fn open(
        api: std::net::SocketAddr,
        query: &str,
        last_id: Option<&str>,
        token: Option<&str>,
    ) -> Sse {
        let mut req = reqwest::Client::new().get(format!("http://{api}/v1/events{query}"));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        Sse {
            resp,
            parser: Default::default(),
            queued: Default::default(),
        }
    }

    /// The next `n` events: (event, id, data).
    async fn next(&mut self, n: usize) -> Vec<(String, String, serde_json::Value)> {
        while self.queued.len() < n {
            let chunk = tokio::time::timeout(DEADLINE, self.resp.chunk())
                .await
                .expect("an event in time")
                .unwrap()
                .expect("stream open");
            for e in self.parser.push(&chunk) {
                let data = serde_json::from_str(&e.data).unwrap();
                let event = (e.name.unwrap_or_default(), e.id.unwrap_or_default(), data);
                self.queued.push_back(event);
            }
        }
        self.queued.drain(..n).collect()
    }
}

/// The values `include=paths` should carry for change event `data`: each of
/// its paths looked up in `doc`, null where it names nothing.
fn values_in(doc: &serde_json::Value, data: &serde_json::Value) -> serde_json::Value {
    let paths = data["paths"].as_array().unwrap();
    assert!(!paths.is_empty(), "the change lists its paths: {data}");
    paths
        .iter()
        .map(|p| {
            let p = p.as_str().unwrap();
            (p.to_string(), doc.pointer(p).cloned().unwrap_or_default())
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `include=doc` carries the doc as it was right after each change (read
/// at the event's heads, also when later changes exist: on resume),
/// `include=paths` the values at its changed paths; a deleted doc is said
/// to be so rather than dropped; any other `include` is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_include_the_doc_or_the_values_at_its_paths() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::api_node(dir.path(), |_| {}).await;
    let api = node.api_addr().unwrap();
    let mut live = Sse::open(api, "?doc=inc/*&include=doc", None, None).await;
    // Subscribed (the response is out): the changes record their paths.
    let doc = node.doc("inc/a").unwrap();
    let mut states = Vec::new();
    for patch in [
        json!({"n": 1, "m": {"x": 1, "y": "a"}, "list": [1, 2]}),
        json!({"n": 2, "list": [3], "new": true}),
        json!({"m": null}),
    ] {
        doc.patch(patch).await.unwrap();
        states.push(doc.get().await.unwrap());
    }
    let got = live.next(3).await;
    for ((event, id, data), state) in got.iter().zip(&states) {
        assert_eq!(event, "change");
        assert_eq!(data["id"], **id);
        assert_eq!(data["doc"], "inc/a", "the doc's id stays in `doc`");
        assert_eq!(data["value"], *state, "{data}");
        assert_eq!(data["read_at"], "heads");
        assert!(data.get("values").is_none() && data.get("read_error").is_none());
    }

    // Resumed after the first event, when the doc has moved on: the second
    // and third still carry the doc as it was right after them.
    let mut again = Sse::open(api, "?doc=inc/*&include=doc", Some(&got[0].1), None).await;
    let replay = again.next(2).await;
    assert_eq!((&replay[0].1, &replay[1].1), (&got[1].1, &got[2].1));
    assert_eq!(replay[0].2["value"], states[1]);
    assert_eq!(replay[0].2["read_at"], "heads");
    assert_eq!(replay[1].2["value"], states[2]);

    // include=paths, resumed with ?after: values at the changed paths,
    // null where the change removed what was there.
    let query = format!("?doc=inc/*&include=paths&after={}", got[0].1);
    let mut paths = Sse::open(api, &query, None, None).await;
    let replay = paths.next(2).await;
    assert_eq!(replay[0].1, got[1].1);
    for ((_, _, data), state) in replay.iter().zip(&states[1..]) {
        assert_eq!(data["values"], values_in(state, data), "{data}");
        assert!(data.get("value").is_none());
    }
    assert_eq!(replay[1].2["values"]["/m"], serde_json::Value::Null);
    assert_eq!(replay[0].2["values"]["/new"], true);

    // A delete is an event like any other, with no doc to carry; and the
    // earlier changes, sent once the doc is deleted, say so.
    doc.delete().await.unwrap();
    let (_, _, del) = live.next(1).await.remove(0);
    assert_eq!(del["deleted"], true);
    assert_eq!(del["value"], serde_json::Value::Null);
    assert_eq!(del["read_error"]["code"], "deleted", "{del}");
    let mut after = Sse::open(api, &query, None, None).await;
    let replay = after.next(3).await;
    assert_eq!(replay[0].2["values"], serde_json::Value::Null);
    assert_eq!(replay[0].2["read_error"]["code"], "deleted");

    // Anything but doc or paths is refused, as other bad queries are.
    let r = reqwest::Client::new()
        .get(format!("http://{api}/v1/events?include=body"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("include") && message.contains("\"body\""),
        "{message}"
    );
    node.shutdown().await.unwrap();
}

/// A scoped token's feed carries the docs it may read, with their JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_tokens_feed_includes_only_docs_it_may_read() {
    const ADMIN: &str = "admin-token-0123456789";
    const KITCHEN: &str = "kitchen-token-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let node = common::api_node(dir.path(), |c| {
        c.api.token = ADMIN.into();
        c.api.tokens = vec![mergeflow::config::ApiToken {
            name: "kitchen-app".into(),
            token: KITCHEN.into(),
            read: vec!["homes/42/**".into()],
            ..Default::default()
        }];
    })
    .await;
    let api = node.api_addr().unwrap();
    let mut resp = Sse::open(api, "?include=doc", None, Some(KITCHEN)).await;
    for id in ["homes/7/kitchen", "homes/42/kitchen"] {
        node.doc(id)
            .unwrap()
            .patch(json!({"room": id}))
            .await
            .unwrap();
    }
    let (_, _, data) = resp.next(1).await.remove(0);
    assert_eq!(data["doc"], "homes/42/kitchen");
    assert_eq!(data["value"], json!({"room": "homes/42/kitchen"}));
    node.shutdown().await.unwrap();
}
