//! A hostile peer speaking raw libp2p to a node: garbage, oversized frames,
//! malformed and invalid messages. The node must keep serving its honest
//! peer, count the bad input against the hostile one, and finally ban it.
//! And a hostile HTTP client (module `http`): connections that hold the API
//! open without finishing a request.

use std::io;
use std::time::{Duration, Instant};

use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};
mod common;

use common::{listen_addr, p2p_node};
use mergeflow::Node;
use mergeflow::testing::sync::{Message, codec};
use serde_json::json;

/// Sends its request bytes verbatim (so it can lie about frame lengths).
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.read_to_end(&mut v).await?;
        Ok(v)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<()> {
        let mut v = Vec::new();
        io.take(1024).read_to_end(&mut v).await?;
        Ok(())
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        _: (),
    ) -> io::Result<()> {
        io.close().await
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A bare libp2p peer (TCP, noise, yamux) running `behaviour` only.
fn raw_swarm<B: libp2p::swarm::NetworkBehaviour>(
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> libp2p::Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(behaviour)
        .unwrap()
        .build()
}

/// A bare peer speaking mergeflow's sync protocol with raw bytes.
fn raw_sync_peer() -> libp2p::Swarm<request_response::Behaviour<RawCodec>> {
    raw_swarm(|_| {
        request_response::Behaviour::with_codec(
            RawCodec,
            [(
                StreamProtocol::new("/mergeflow/sync/1"),
                ProtocolSupport::Full,
            )],
            request_response::Config::default(),
        )
    })
}

/// Every kind of bad frame: garbage, a length over the cap, unknown kinds and
/// versions, messages whose payload is not Automerge, invalid ids, nesting.
fn bad_frames() -> Vec<Vec<u8>> {
    vec![
        framed(b"\xde\xad\xbe\xef garbage"),
        (100u32 << 20).to_le_bytes().to_vec(), // claims a 100 MiB frame
        framed(&[codec::VERSION, 99, 0, 0]),   // unknown kind
        framed(&[7, 1]),                       // unknown version
        framed(&codec::encode(&Message::Sync {
            doc: "d".into(),
            data: b"not automerge".to_vec(),
            sigs: vec![],
        })),
        framed(&codec::encode(&Message::Change {
            doc: "d".into(),
            change: vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3],
            sig: vec![],
            ack: true,
            seen: vec![],
        })),
        framed(&codec::encode(&Message::Bucket {
            bucket: 9999,
            answer: true,
            entries: vec![],
        })),
        framed(&codec::encode(&Message::Deleted {
            doc: "bad id!".into(),
            sig: vec![],
        })),
        framed(&codec::encode(&Message::Doc {
            doc: "d".into(),
            data: b"not an automerge doc".to_vec(),
            sigs: vec![],
        })),
        // A batch inside a batch.
        framed(&codec::encode_batch(&[
            codec::encode_batch(&[vec![1, 5], vec![1, 5]]),
            vec![1, 5],
        ])),
    ]
}

/// True once `a` has banned `hostile` (10 strikes, disconnected) and holds
/// a recent value of the honest peer's counter on `honest/doc` (its writes
/// keep arriving during the attack; the latest may still be in flight, so
/// "recent enough" is the check). Fails the test past `deadline`.
async fn banned_while_honest_syncs(
    a: &Node,
    hostile: &str,
    honest_i: i64,
    deadline: Instant,
) -> bool {
    let peers = a.peers();
    let banned = peers
        .iter()
        .find(|p| p.peer_id == hostile)
        .is_some_and(|p| p.rejected >= 10 && !p.connected);
    let seen = a.doc("honest/doc").unwrap().get().await.ok();
    let synced = seen
        .and_then(|v| v["i"].as_i64())
        .is_some_and(|i| i >= 5 && i + 50 >= honest_i - 1);
    assert!(
        banned && synced || Instant::now() < deadline,
        "not banned or not synced: {peers:?}"
    );
    banned && synced
}

/// Checks that `a` counted nothing against `honest`, then stops both.
async fn honest_not_blamed_then_stop(a: Node, honest: Node) {
    let info = a
        .peers()
        .into_iter()
        .find(|p| p.peer_id == honest.peer_id().to_string())
        .unwrap();
    assert_eq!(info.rejected, 0, "the honest peer was blamed");
    a.shutdown().await.unwrap();
    honest.shutdown().await.unwrap();
}

async fn start(dir: &std::path::Path, peers: Vec<String>) -> Node {
    p2p_node(dir, peers, |c| c.net.max_message_bytes = 64 * 1024).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_is_rejected_and_banned_while_honest_peers_sync() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr: Multiaddr = listen_addr(&a).await.parse().unwrap();
    let honest = start(&dir.path().join("honest"), vec![a_addr.to_string()]).await;

    let mut hostile = raw_sync_peer();
    let hostile_id = *hostile.local_peer_id();
    hostile.dial(a_addr.clone()).unwrap();
    let a_peer = a.peer_id();

    // Every kind of bad input, again and again.
    let bad = bad_frames();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut honest_i = 0;
    let mut connected = false;
    // An interval, not a sleep per loop: the hostile swarm's events (the node's
    // own sync traffic to it) would keep restarting a fresh sleep.
    let mut every = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            ev = hostile.select_next_some() => {
                if let SwarmEvent::ConnectionEstablished { .. } = ev {
                    connected = true;
                }
                if let SwarmEvent::ConnectionClosed { .. } = ev {
                    connected = false;
                }

            }
            _ = every.tick() => {
                if connected {
                    for b in &bad {
                        hostile.behaviour_mut().send_request(&a_peer, b.clone());
                    }
                }
                // The honest peer keeps writing and a keeps serving it.
                honest.doc("honest/doc").unwrap().patch(json!({ "i": honest_i })).await.unwrap();
                honest_i += 1;
            }
        }
        if banned_while_honest_syncs(&a, &hostile_id.to_string(), honest_i, deadline).await {
            break;
        }
    }
    // a still serves its honest peer after the attack.
    honest
        .doc("honest/after")
        .unwrap()
        .patch(json!({"ok": true}))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.doc("honest/after").unwrap().get().await.ok() != Some(json!({"ok": true})) {
        assert!(
            Instant::now() < deadline,
            "a stopped serving its honest peer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    honest_not_blamed_then_stop(a, honest).await;
}

/// A peer that does not speak the frame-stream protocol (an older node, or
/// a minimal client) still gets everything, by request-response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_frame_streams_gets_frames_by_request_response() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr: Multiaddr = listen_addr(&a).await.parse().unwrap();
    let mut peer = raw_sync_peer();
    let peer_id = peer.local_peer_id().to_string();
    peer.dial(a_addr).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let mut i = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => panic!("no frame about the doc reached the peer"),
            // Once the node counts the peer as connected, every write's fast
            // path goes to it (the first ones may race the connection).
            _ = every.tick() => {
                if a.peers().iter().any(|p| p.peer_id == peer_id && p.connected) {
                    a.doc("fallback/doc").unwrap().patch(json!({"v": i})).await.unwrap();
                    i += 1;
                }
            }
            ev = peer.select_next_some() => {
                // Its scope first, as every peer's first message: all docs.
                if let SwarmEvent::ConnectionEstablished { .. } = ev {
                    let scope = framed(&codec::encode(&Message::Scope {
                        replicate: None,
                        ask: false,
                    }));
                    peer.behaviour_mut().send_request(&a.peer_id(), scope);
                }
                if let SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Request { request, .. },
                    ..
                }) = ev
                {
                    // RawCodec keeps the 4-byte length prefix.
                    let msgs = codec::decode_frame(&request[4..], usize::MAX).unwrap();
                    if msgs.iter().any(|m| m.doc() == Some("fallback/doc")) {
                        break;
                    }
                }
            }
        }
    }
    a.shutdown().await.unwrap();
}

/// The same bad frames over the long-lived frame stream (`/mergeflow/frames/1`),
/// a new stream each round because the node closes one at a frame over the
/// cap: the peer is struck and banned, the honest peer keeps syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_streaming_bad_frames_is_rejected_and_banned() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), vec![]).await;
    let a_addr: Multiaddr = listen_addr(&a).await.parse().unwrap();
    let honest = start(&dir.path().join("honest"), vec![a_addr.to_string()]).await;

    let mut hostile = raw_swarm(|_| libp2p_stream::Behaviour::new());
    let hostile_id = *hostile.local_peer_id();
    let mut control = hostile.behaviour().new_control();
    hostile.dial(a_addr).unwrap();
    // The swarm runs on its own; the attack opens streams through `control`.
    let swarm = tokio::spawn(async move {
        loop {
            hostile.select_next_some().await;
        }
    });
    let a_peer = a.peer_id();
    let protocol = StreamProtocol::new("/mergeflow/frames/1");
    let bad = bad_frames();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let mut honest_i = 0;
    loop {
        every.tick().await;
        let open = control.open_stream(a_peer, protocol.clone());
        if let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(5), open).await {
            for b in &bad {
                if stream.write_all(b).await.is_err() {
                    break;
                }
            }
            let _ = stream.flush().await;
        }
        honest
            .doc("honest/doc")
            .unwrap()
            .patch(json!({ "i": honest_i }))
            .await
            .unwrap();
        honest_i += 1;
        if banned_while_honest_syncs(&a, &hostile_id.to_string(), honest_i, deadline).await {
            break;
        }
    }
    swarm.abort();
    honest_not_blamed_then_stop(a, honest).await;
}

/// A peer publishing garbage on the gossip topic (with `net.gossipsub` on):
/// its messages are rejected, it is struck for each and finally banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gossiping_garbage_is_rejected_and_banned() {
    use libp2p::gossipsub;
    let dir = tempfile::tempdir().unwrap();
    let a = p2p_node(&dir.path().join("a"), vec![], |c| c.net.gossipsub = true).await;
    let a_addr: Multiaddr = listen_addr(&a).await.parse().unwrap();
    let a_peer = a.peer_id();
    let mut hostile = raw_swarm(|key| {
        gossipsub::Behaviour::<gossipsub::IdentityTransform, gossipsub::AllowAllSubscriptionFilter>::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossipsub::Config::default(),
        )
        .unwrap()
    });
    let topic = gossipsub::IdentTopic::new("mergeflow/changes/1");
    hostile.behaviour_mut().subscribe(&topic).unwrap();
    let hostile_id = hostile.local_peer_id().to_string();
    hostile.dial(a_addr).unwrap();
    // Each round's messages differ (a counter), so none is a duplicate.
    let bad = |n: u64| -> Vec<Vec<u8>> {
        vec![
            format!("garbage {n}").into_bytes(),
            codec::encode(&Message::Digest {
                buckets: vec![n; 64],
                answer: false,
            }), // not for gossip
            codec::encode(&Message::Change {
                doc: "bad id!".into(),
                change: n.to_le_bytes().to_vec(),
                sig: vec![],
                ack: false,
                seen: vec![],
            }),
        ]
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut a_subscribed = false;
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let mut n = 0u64;
    loop {
        tokio::select! {
            ev = hostile.select_next_some() => {
                if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, .. }) = ev
                    && peer_id == a_peer
                {
                    a_subscribed = true;
                }
            }
            _ = every.tick() => {
                if a_subscribed {
                    n += 1;
                    for data in bad(n) {
                        let _ = hostile.behaviour_mut().publish(topic.clone(), data);
                    }
                }
            }
        }
        let peers = a.peers();
        let banned = peers
            .iter()
            .find(|p| p.peer_id == hostile_id)
            .is_some_and(|p| p.rejected >= 10 && !p.connected);
        if banned {
            break;
        }
        assert!(Instant::now() < deadline, "not banned: {peers:?}");
    }
    // a is fine: it still takes writes.
    a.doc("after/gossip")
        .unwrap()
        .patch(json!({"ok": 1}))
        .await
        .unwrap();
    a.shutdown().await.unwrap();
}

/// A peer that floods valid frames (digests, each of which would make the
/// node answer) is held to its rate limit: frames over it are dropped
/// unread and counted, it gets strikes, and the honest peer keeps syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let a = p2p_node(&dir.path().join("a"), vec![], |c| {
        c.net.max_peer_frames_per_sec = 100;
    })
    .await;
    let a_addr: Multiaddr = listen_addr(&a).await.parse().unwrap();
    let honest = start(&dir.path().join("honest"), vec![a_addr.to_string()]).await;
    let mut flooder = raw_sync_peer();
    let flooder_id = flooder.local_peer_id().to_string();
    flooder.dial(a_addr).unwrap();
    let digest = framed(&codec::encode(&Message::Digest {
        buckets: vec![7; 64],
        answer: false,
    }));
    const FLOOD: u64 = 3_000;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = a.peers().into_iter().find(|p| p.peer_id == flooder_id);
        // 100 frames of burst, then 100 a second: most of the flood is
        // dropped, and going over the limit is a strike.
        if info
            .as_ref()
            .is_some_and(|p| p.rate_limited >= FLOOD / 6 && p.rejected > 0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "flood not limited: {info:?}");
        tokio::select! {
            ev = flooder.select_next_some() => {
                if let SwarmEvent::ConnectionEstablished { .. } = ev {
                    for _ in 0..FLOOD {
                        flooder.behaviour_mut().send_request(&a.peer_id(), digest.clone());
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // The honest peer is not held back by the flooder's limit.
    let w = honest
        .doc("honest/doc")
        .unwrap()
        .patch(json!({"ok": 1}))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.doc("honest/doc").unwrap().heads().await.ok() != Some(w.heads.clone()) {
        assert!(Instant::now() < deadline, "the honest peer stopped syncing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let honest_info = a
        .peers()
        .into_iter()
        .find(|p| p.peer_id == honest.peer_id().to_string())
        .unwrap();
    assert_eq!(honest_info.rate_limited, 0);
    honest.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// Hostile HTTP clients: idle and half-sent connections, and more of them
/// than `api.max_connections`.
mod http {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::common;
    use mergeflow::Node;

    /// Generous: a loaded CI machine may be slow; the tests never wait this
    /// long unless they fail.
    const DEADLINE: Duration = Duration::from_secs(60);

    const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

    async fn connect(node: &Node) -> TcpStream {
        TcpStream::connect(node.api_addr().unwrap()).await.unwrap()
    }

    /// Reads one `/healthz` answer (its JSON body ends it), within DEADLINE.
    async fn read_healthz(conn: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = Instant::now() + DEADLINE;
        while !got.ends_with(b"{\"ok\":true}") {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, conn.read(&mut buf))
                .await
                .expect("no answer within the deadline")
                .unwrap();
            assert!(
                n > 0,
                "closed before the answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// Waits (up to DEADLINE) for the node to close `conn`, discarding
    /// whatever it sends first; panics if it stays open.
    async fn closed_by_node(conn: &mut TcpStream, what: &str) {
        let mut buf = [0u8; 1024];
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, conn.read(&mut buf)).await {
                Err(_) => panic!("{what}: still open after {DEADLINE:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// More connections than `api.max_connections`: the extra one is not
    /// served while the others stay open, and is served once one closes.
    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_one() {
        let dir = tempfile::tempdir().unwrap();
        let node = common::api_node(dir.path(), |c| {
            c.api.max_connections = 2;
            // Long enough that the held connections stay open through the test.
            c.api.header_timeout_ms = 600_000;
            c.api.idle_timeout_ms = 600_000;
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut conn = connect(&node).await;
            conn.write_all(HEALTHZ).await.unwrap();
            read_healthz(&mut conn).await;
            held.push(conn); // open and idle (keep-alive)
        }
        // The kernel completes the handshake (the listen backlog); the node
        // does not take the connection while both permits are held.
        let mut extra = connect(&node).await;
        extra.write_all(HEALTHZ).await.unwrap();
        let mut buf = [0u8; 64];
        // Only a wrong answer could end this wait early; a slow machine
        // cannot make it fail.
        let early = tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "served beyond api.max_connections: {early:?}"
        );
        // The held ones still work.
        held[1].write_all(HEALTHZ).await.unwrap();
        read_healthz(&mut held[1]).await;
        // One closes: the waiting one is served.
        drop(held.remove(0));
        let answer = read_healthz(&mut extra).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        node.shutdown().await.unwrap();
    }

    /// A connection that sends half a request head, or nothing, is closed
    /// after `api.header_timeout_ms`; one whose body stops arriving after
    /// `api.idle_timeout_ms`. Today's honest clients are unaffected.
    #[tokio::test]
    async fn half_sent_requests_are_closed_after_their_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let node = common::api_node(dir.path(), |c| {
            c.api.header_timeout_ms = 300;
            c.api.idle_timeout_ms = 300;
        })
        .await;
        let mut silent = connect(&node).await;
        let mut half = connect(&node).await;
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await
            .unwrap();
        let mut stalled = connect(&node).await;
        stalled
            .write_all(
                b"POST /v1/docs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                  Content-Length: 1000\r\n\r\n{\"value\": ",
            )
            .await
            .unwrap();
        closed_by_node(&mut silent, "a connection that sent nothing").await;
        closed_by_node(&mut half, "a half-sent header").await;
        closed_by_node(&mut stalled, "a stalled body").await;
        // Nothing was written, and a normal request is served.
        let mut conn = connect(&node).await;
        conn.write_all(HEALTHZ).await.unwrap();
        read_healthz(&mut conn).await;
        assert!(node.docs().list().await.unwrap().is_empty());
        node.shutdown().await.unwrap();
    }

    /// A quiet `/v1/events` stream is not idle: it outlives
    /// `api.idle_timeout_ms` (shown by a stalled connection opened after it
    /// being closed first) and then still carries the next change.
    #[tokio::test]
    async fn a_quiet_event_stream_outlives_the_idle_timeout() {
        use futures_util::StreamExt as _;
        let dir = tempfile::tempdir().unwrap();
        let node = common::api_node(dir.path(), |c| {
            c.api.header_timeout_ms = 600_000;
            c.api.idle_timeout_ms = 300;
        })
        .await;
        let base = format!("http://{}", node.api_addr().unwrap());
        let resp = reqwest::get(format!("{base}/v1/events")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut events = resp.bytes_stream();
        let mut stalled = connect(&node).await;
        stalled
            .write_all(
                b"POST /v1/docs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                  Content-Length: 1000\r\n\r\n{",
            )
            .await
            .unwrap();
        closed_by_node(&mut stalled, "a stalled body").await;
        let client = mergeflow::client::Client::new(&base);
        client
            .create(Some("after-idle"), serde_json::json!({"x": 1}))
            .await
            .unwrap();
        let mut got = String::new();
        let deadline = Instant::now() + DEADLINE;
        while !got.contains("after-idle") {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, events.next())
                .await
                .expect("no event within the deadline")
                .expect("the event stream ended")
                .unwrap();
            got.push_str(&String::from_utf8_lossy(&chunk));
        }
        // Shutdown still ends the stream.
        node.shutdown().await.unwrap();
        let end = tokio::time::timeout(DEADLINE, async {
            while let Some(Ok(_)) = events.next().await {}
        })
        .await;
        assert!(end.is_ok(), "the event stream outlived shutdown");
    }
}
