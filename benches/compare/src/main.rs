//! mergeflow, samod and raw Automerge sync, side by side on one machine.
//!
//! Each system runs two peers in this one process, connected by TCP on
//! loopback, through the same workload:
//! - propagation: `WRITES` (1,000) one-key changes to one doc on A, one at a
//!   time, each until B has it; p50 and p99 in ms;
//! - throughput: `TPUT` (10,000) one-key changes spread over `TPUT_DOCS` (100)
//!   docs by 32 concurrent writers on A; writes per second from the first
//!   write until B has them all;
//! - catch-up: A holds `CATCHUP` (2,000) docs of one change each; a fresh B
//!   connects; seconds until B has every doc at A's heads;
//! - bytes on the wire: TCP payload bytes sent by both peers in each phase.
//!
//! The systems:
//! - mergeflow: two embedded nodes (libp2p TCP + noise + yamux, sled store in
//!   a temp dir, the default settings: a write returns once flushed to the OS);
//! - samod: two repos with `TokioFilesystemStorage` in a temp dir and its
//!   length-delimited TCP transport (a write returns once applied in memory;
//!   samod stores it afterwards);
//! - raw: the physical floor, two Automerge docs per id and one
//!   `sync::State` per doc, frames of (doc id, sync message) over one TCP
//!   socket, no storage.
//!
//! Every socket has TCP_NODELAY (libp2p sets it; the other two are given it).
//! Prints numbers; asserts nothing. `ONLY=samod,raw` runs a subset.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The one workload every system runs.
#[derive(Clone, Copy, Debug)]
struct Workload {
    writes: usize,
    tput: usize,
    tput_docs: usize,
    writers: usize,
    catchup: usize,
}

/// What one system measured.
#[derive(Debug, Default)]
struct Outcome {
    p50_ms: f64,
    p99_ms: f64,
    prop_bytes: u64,
    tput_per_s: f64,
    tput_bytes: u64,
    catchup_s: f64,
    catchup_bytes: u64,
}

/// How often the throughput and catch-up phases look whether B is done.
const POLL: Duration = Duration::from_millis(5);

/// A socket that counts the bytes written to it: counted at both ends of a
/// connection, that is every payload byte on the wire once.
struct Counted<S> {
    inner: S,
    sent: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn counted(stream: tokio::net::TcpStream, sent: &Arc<AtomicU64>) -> Counted<tokio::net::TcpStream> {
    stream.set_nodelay(true).expect("TCP_NODELAY");
    Counted {
        inner: stream,
        sent: sent.clone(),
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// Waits until `done(i)` holds for every i in 0..n, in order, polling.
async fn wait_all<F, Fut>(n: usize, mut done: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut i = 0;
    while i < n {
        if done(i).await {
            i += 1;
        } else {
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Runs `tput` writes spread over `docs` by `writers` tasks; `write(doc, n)`
/// makes one.
async fn spread_writes<F, Fut>(w: Workload, write: F)
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut tasks = Vec::new();
    for k in 0..w.writers {
        let write = write.clone();
        tasks.push(tokio::spawn(async move {
            for n in (k..w.tput).step_by(w.writers) {
                write(n % w.tput_docs, n).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
}

mod mf {
    use super::*;
    use futures::StreamExt;
    use mergeflow::Node;
    use mergeflow::config::Config;
    use mergeflow::feed::FeedItem;
    use serde_json::json;

    async fn start(dir: &std::path::Path, peers: Vec<String>) -> Node {
        let mut config = Config::default();
        config.node.data_dir = dir.to_path_buf();
        config.net.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        config.net.mdns = false;
        config.net.kademlia = false;
        config.net.peers = peers;
        config.log.level = "error".into();
        Node::builder()
            .config(config)
            .network(true)
            .start()
            .await
            .expect("start a mergeflow node")
    }

    async fn addr(node: &Node) -> String {
        loop {
            if let Some(a) = node.status().await.listen_addrs.first() {
                return a.clone();
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Bytes the nodes sent on their TCP connections: libp2p's transport
    /// counter, under noise and yamux, so every byte on the wire.
    async fn wire(nodes: &[&Node]) -> u64 {
        let mut sum = 0;
        for n in nodes {
            for line in n.metrics().await.lines() {
                if line.starts_with("libp2p_bandwidth_bytes_total")
                    && line.contains("direction=\"Outbound\"")
                {
                    sum += line
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0) as u64;
                }
            }
        }
        sum
    }

    async fn same_heads(a: &Node, b: &Node, id: &str) -> bool {
        let want = a.doc(id).unwrap().heads().await.expect("A has the doc");
        b.doc(id).unwrap().heads().await.ok() == Some(want)
    }

    pub async fn run(w: Workload) -> Outcome {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = start(&dir.path().join("a"), vec![]).await;
        let a_addr = addr(&a).await;
        let b = start(&dir.path().join("b"), vec![a_addr.clone()]).await;
        while a.status().await.peers < 1 {
            tokio::time::sleep(POLL).await;
        }
        let mut out = Outcome::default();

        // Propagation: the doc exists on both first, as in the others.
        a.doc("prop").unwrap().patch(json!({"i": 0})).await.unwrap();
        wait_all(1, |_| same_heads(&a, &b, "prop")).await;
        let mut feed = Box::pin(b.subscribe("prop").unwrap());
        let before = wire(&[&a, &b]).await;
        let mut lat = Vec::with_capacity(w.writes);
        for i in 1..=w.writes {
            let t = Instant::now();
            let mut want = a
                .doc("prop")
                .unwrap()
                .patch(json!({"i": i}))
                .await
                .unwrap()
                .heads;
            want.sort();
            loop {
                match feed.next().await.expect("feed ended") {
                    FeedItem::Change(e) => {
                        let mut got = e.heads.clone();
                        got.sort();
                        if got == want {
                            break;
                        }
                    }
                    FeedItem::Missed { .. } => panic!("the benchmark fell behind B's feed"),
                }
            }
            lat.push(t.elapsed());
        }
        out.prop_bytes = wire(&[&a, &b]).await - before;
        out.p50_ms = pct(&mut lat, 0.5);
        out.p99_ms = pct(&mut lat, 0.99);

        // Throughput.
        let ids: Vec<String> = (0..w.tput_docs).map(|d| format!("tput/{d}")).collect();
        for id in &ids {
            a.doc(id).unwrap().patch(json!({"n": -1})).await.unwrap();
        }
        wait_all(ids.len(), |i| same_heads(&a, &b, &ids[i])).await;
        let before = wire(&[&a, &b]).await;
        let t = Instant::now();
        let writer = a.clone();
        spread_writes(w, move |d, n| {
            let doc = writer.doc(&format!("tput/{d}")).unwrap();
            async move {
                doc.patch(json!({"n": n})).await.unwrap();
            }
        })
        .await;
        wait_all(ids.len(), |i| same_heads(&a, &b, &ids[i])).await;
        out.tput_per_s = w.tput as f64 / t.elapsed().as_secs_f64();
        out.tput_bytes = wire(&[&a, &b]).await - before;
        b.shutdown().await.unwrap();

        // Catch-up.
        let ids: Vec<String> = (0..w.catchup).map(|d| format!("c/{d}")).collect();
        let writer = a.clone();
        spread_writes(
            Workload {
                tput: w.catchup,
                tput_docs: w.catchup,
                ..w
            },
            move |d, _| {
                let doc = writer.doc(&format!("c/{d}")).unwrap();
                async move {
                    doc.patch(json!({"n": d})).await.unwrap();
                }
            },
        )
        .await;
        let before = wire(&[&a]).await;
        let t = Instant::now();
        let f = start(&dir.path().join("fresh"), vec![a_addr]).await;
        wait_all(ids.len(), |i| same_heads(&a, &f, &ids[i])).await;
        out.catchup_s = t.elapsed().as_secs_f64();
        out.catchup_bytes = wire(&[&a, &f]).await - before;
        f.shutdown().await.unwrap();
        a.shutdown().await.unwrap();
        out
    }
}

mod sm {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ChangeHash, ROOT};
    use futures::future::BoxFuture;
    use futures::{FutureExt, StreamExt};
    use samod::storage::TokioFilesystemStorage;
    use samod::{BackoffConfig, DialError, Dialer, DocHandle, Repo, Transport};
    use std::net::SocketAddr;

    struct TcpDial {
        addr: SocketAddr,
        sent: Arc<AtomicU64>,
    }

    impl Dialer for TcpDial {
        type Error = std::convert::Infallible;

        fn url(&self) -> url::Url {
            url::Url::parse(&format!("tcp://{}", self.addr)).unwrap()
        }

        fn connect(&self) -> BoxFuture<'static, Result<Transport, DialError<Self::Error>>> {
            let (addr, sent) = (self.addr, self.sent.clone());
            async move {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(DialError::transient)?;
                Ok(Transport::from_tokio_io(counted(s, &sent)))
            }
            .boxed()
        }
    }

    async fn repo(dir: &std::path::Path) -> Repo {
        Repo::build_tokio()
            .with_storage(TokioFilesystemStorage::new(dir))
            .load()
            .await
    }

    /// Serves `repo` on a loopback port; returns the address.
    async fn listen(repo: &Repo, sent: &Arc<AtomicU64>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = repo
            .make_acceptor(url::Url::parse(&format!("tcp://{addr}")).unwrap())
            .unwrap();
        let sent = sent.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                if acceptor
                    .accept(Transport::from_tokio_io(counted(s, &sent)))
                    .is_err()
                {
                    return;
                }
            }
        });
        addr
    }

    async fn dial(repo: &Repo, addr: SocketAddr, sent: &Arc<AtomicU64>) {
        let dialer = TcpDial {
            addr,
            sent: sent.clone(),
        };
        let handle = repo
            .dial(BackoffConfig::default(), Arc::new(dialer))
            .unwrap();
        handle.established().await.expect("samod connection");
    }

    fn put(doc: &DocHandle, key: &str, n: usize) -> Vec<ChangeHash> {
        doc.with_document(|d| {
            let mut tx = d.transaction();
            tx.put(ROOT, key, n as u64).unwrap();
            tx.commit();
            d.get_heads()
        })
    }

    fn heads(doc: &DocHandle) -> Vec<ChangeHash> {
        doc.with_document(|d| d.get_heads())
    }

    async fn create(repo: &Repo, n: usize) -> DocHandle {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "n", n as u64).unwrap();
        tx.commit();
        repo.create(doc).await.expect("samod create")
    }

    /// B's handle for A's doc, once B has A's heads.
    async fn found(b: &Repo, a_doc: &DocHandle) -> DocHandle {
        let doc = b
            .find(a_doc.document_id().clone())
            .await
            .expect("samod find")
            .expect("B finds A's doc");
        let mut changes = Box::pin(doc.changes());
        while heads(&doc) != heads(a_doc) {
            tokio::select! {
                _ = changes.next() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        doc
    }

    pub async fn run(w: Workload) -> Outcome {
        let dir = tempfile::tempdir().expect("temp dir");
        let sent = Arc::new(AtomicU64::new(0));
        let a = repo(&dir.path().join("a")).await;
        let b = repo(&dir.path().join("b")).await;
        let addr = listen(&a, &sent).await;
        dial(&b, addr, &sent).await;
        let mut out = Outcome::default();

        // Propagation.
        let a_doc = create(&a, 0).await;
        let b_doc = found(&b, &a_doc).await;
        let mut changes = Box::pin(b_doc.changes());
        let before = sent.load(Ordering::Relaxed);
        let mut lat = Vec::with_capacity(w.writes);
        for i in 1..=w.writes {
            let t = Instant::now();
            let want = put(&a_doc, "i", i);
            while heads(&b_doc) != want {
                changes.next().await.expect("change stream ended");
            }
            lat.push(t.elapsed());
        }
        out.prop_bytes = sent.load(Ordering::Relaxed) - before;
        out.p50_ms = pct(&mut lat, 0.5);
        out.p99_ms = pct(&mut lat, 0.99);

        // Throughput.
        let mut a_docs = Vec::new();
        let mut b_docs = Vec::new();
        for d in 0..w.tput_docs {
            let doc = create(&a, d).await;
            b_docs.push(found(&b, &doc).await);
            a_docs.push(doc);
        }
        let before = sent.load(Ordering::Relaxed);
        let t = Instant::now();
        let writers = Arc::new(a_docs.clone());
        spread_writes(w, move |d, n| {
            let writers = writers.clone();
            async move {
                put(&writers[d], "n", n);
            }
        })
        .await;
        wait_all(a_docs.len(), |i| {
            let same = heads(&a_docs[i]) == heads(&b_docs[i]);
            async move { same }
        })
        .await;
        out.tput_per_s = w.tput as f64 / t.elapsed().as_secs_f64();
        out.tput_bytes = sent.load(Ordering::Relaxed) - before;
        b.stop().await;

        // Catch-up: B finds every doc by id, 256 at a time (a samod peer
        // learns ids from the application; nothing lists a repo's docs).
        let mut c_docs = Vec::new();
        for d in 0..w.catchup {
            c_docs.push(create(&a, d).await);
        }
        let before = sent.load(Ordering::Relaxed);
        let t = Instant::now();
        let f = repo(&dir.path().join("fresh")).await;
        dial(&f, addr, &sent).await;
        let f = &f;
        futures::stream::iter(&c_docs)
            .map(|doc| found(f, doc))
            .buffer_unordered(256)
            .collect::<Vec<_>>()
            .await;
        out.catchup_s = t.elapsed().as_secs_f64();
        out.catchup_bytes = sent.load(Ordering::Relaxed) - before;
        f.stop().await;
        a.stop().await;
        out
    }
}

mod raw {
    use super::*;
    use automerge::sync::{self, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ChangeHash, ROOT};
    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use tokio::sync::{mpsc, watch};
    use tokio_util::codec::{Framed, LengthDelimitedCodec};

    struct Entry {
        doc: Automerge,
        sync: sync::State,
    }

    /// One peer: its docs, the sender of its one connection, and a counter
    /// bumped on every message it applies.
    #[derive(Clone)]
    struct Peer {
        docs: Arc<Mutex<HashMap<String, Entry>>>,
        out: Arc<Mutex<Option<mpsc::UnboundedSender<Bytes>>>>,
        applied: Arc<watch::Sender<u64>>,
    }

    impl Peer {
        fn new() -> Self {
            Peer {
                docs: Arc::default(),
                out: Arc::default(),
                applied: Arc::new(watch::channel(0).0),
            }
        }

        /// Sends what the peer lacks of doc `id`, if anything.
        fn send(&self, id: &str, e: &mut Entry) {
            let out = self.out.lock().unwrap();
            let Some(tx) = out.as_ref() else { return };
            if let Some(msg) = e.doc.generate_sync_message(&mut e.sync) {
                let msg = msg.encode();
                let mut frame = Vec::with_capacity(2 + id.len() + msg.len());
                frame.extend_from_slice(&(id.len() as u16).to_be_bytes());
                frame.extend_from_slice(id.as_bytes());
                frame.extend_from_slice(&msg);
                let _ = tx.send(frame.into());
            }
        }

        fn put(&self, id: &str, key: &str, n: usize) -> Vec<ChangeHash> {
            let mut docs = self.docs.lock().unwrap();
            let e = docs.entry(id.to_string()).or_insert_with(|| Entry {
                doc: Automerge::new(),
                sync: sync::State::new(),
            });
            let mut tx = e.doc.transaction();
            tx.put(ROOT, key, n as u64).unwrap();
            tx.commit();
            self.send(id, e);
            e.doc.get_heads()
        }

        fn heads(&self, id: &str) -> Option<Vec<ChangeHash>> {
            self.docs.lock().unwrap().get(id).map(|e| e.doc.get_heads())
        }

        fn same(&self, other: &Peer, id: &str) -> bool {
            let want = self.heads(id);
            want.is_some() && want == other.heads(id)
        }

        /// Runs the peer's side of `stream`: first offers every doc, then
        /// answers each message.
        fn attach(&self, stream: tokio::net::TcpStream, sent: &Arc<AtomicU64>) {
            let codec = LengthDelimitedCodec::builder()
                .max_frame_length(1 << 30)
                .new_codec();
            let (mut sink, mut frames) = Framed::new(counted(stream, sent), codec).split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
            *self.out.lock().unwrap() = Some(tx);
            {
                let mut docs = self.docs.lock().unwrap();
                for (id, e) in docs.iter_mut() {
                    e.sync = sync::State::new();
                    self.send(id, e);
                }
            }
            tokio::spawn(async move {
                while let Some(frame) = rx.recv().await {
                    if sink.feed(frame).await.is_err() {
                        return;
                    }
                    while let Ok(frame) = rx.try_recv() {
                        if sink.feed(frame).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            });
            let peer = self.clone();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = frames.next().await {
                    let n = u16::from_be_bytes([frame[0], frame[1]]) as usize;
                    let id = std::str::from_utf8(&frame[2..2 + n]).unwrap().to_string();
                    let msg = sync::Message::decode(&frame[2 + n..]).expect("sync message");
                    {
                        let mut docs = peer.docs.lock().unwrap();
                        let e = docs.entry(id.clone()).or_insert_with(|| Entry {
                            doc: Automerge::new(),
                            sync: sync::State::new(),
                        });
                        e.doc
                            .receive_sync_message(&mut e.sync, msg)
                            .expect("apply sync message");
                        peer.send(&id, e);
                    }
                    peer.applied.send_modify(|v| *v += 1);
                }
            });
        }
    }

    /// Connects `a` (listening) and `b` (dialing) on loopback.
    async fn connect(a: &Peer, b: &Peer, sent: &Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        b.attach(dialed.unwrap(), sent);
        a.attach(accepted.unwrap().0, sent);
    }

    pub async fn run(w: Workload) -> Outcome {
        let sent = Arc::new(AtomicU64::new(0));
        let (a, b) = (Peer::new(), Peer::new());
        connect(&a, &b, &sent).await;
        let mut out = Outcome::default();

        // Propagation.
        a.put("prop", "i", 0);
        wait_all(1, |_| std::future::ready(a.same(&b, "prop"))).await;
        let mut applied = b.applied.subscribe();
        let before = sent.load(Ordering::Relaxed);
        let mut lat = Vec::with_capacity(w.writes);
        for i in 1..=w.writes {
            let t = Instant::now();
            let want = Some(a.put("prop", "i", i));
            applied.borrow_and_update();
            while b.heads("prop") != want {
                applied.changed().await.expect("peer gone");
            }
            lat.push(t.elapsed());
        }
        out.prop_bytes = sent.load(Ordering::Relaxed) - before;
        out.p50_ms = pct(&mut lat, 0.5);
        out.p99_ms = pct(&mut lat, 0.99);

        // Throughput.
        let ids: Vec<String> = (0..w.tput_docs).map(|d| format!("tput/{d}")).collect();
        for (d, id) in ids.iter().enumerate() {
            a.put(id, "n", d);
        }
        wait_all(ids.len(), |i| std::future::ready(a.same(&b, &ids[i]))).await;
        let before = sent.load(Ordering::Relaxed);
        let t = Instant::now();
        let writer = a.clone();
        spread_writes(w, move |d, n| {
            writer.put(&format!("tput/{d}"), "n", n);
            std::future::ready(())
        })
        .await;
        wait_all(ids.len(), |i| std::future::ready(a.same(&b, &ids[i]))).await;
        out.tput_per_s = w.tput as f64 / t.elapsed().as_secs_f64();
        out.tput_bytes = sent.load(Ordering::Relaxed) - before;

        // Catch-up: a fresh peer; A's docs are offered as it connects.
        let ids: Vec<String> = (0..w.catchup).map(|d| format!("c/{d}")).collect();
        for (d, id) in ids.iter().enumerate() {
            a.put(id, "n", d);
        }
        let f = Peer::new();
        let before = sent.load(Ordering::Relaxed);
        let t = Instant::now();
        connect(&a, &f, &sent).await;
        wait_all(ids.len(), |i| std::future::ready(a.same(&f, &ids[i]))).await;
        out.catchup_s = t.elapsed().as_secs_f64();
        out.catchup_bytes = sent.load(Ordering::Relaxed) - before;
        out
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a whole number")),
        Err(_) => default,
    }
}

fn print(w: &Workload, results: &[(&str, Outcome)]) {
    let per = |bytes: u64, n: usize| bytes as f64 / n as f64;
    type Row<'a> = (&'a str, &'a dyn Fn(&Outcome) -> f64, &'a str);
    let rows: [Row; 7] = [
        ("propagation p50, ms", &|o| o.p50_ms, "lower"),
        ("propagation p99, ms", &|o| o.p99_ms, "lower"),
        (
            "bytes per propagated write",
            &|o| per(o.prop_bytes, w.writes),
            "lower",
        ),
        ("throughput, writes/s", &|o| o.tput_per_s, "higher"),
        (
            "bytes per write (throughput)",
            &|o| per(o.tput_bytes, w.tput),
            "lower",
        ),
        ("catch-up, s", &|o| o.catchup_s, "lower"),
        (
            "bytes per doc (catch-up)",
            &|o| per(o.catchup_bytes, w.catchup),
            "lower",
        ),
    ];
    print!("{:<30}", "");
    for (name, _) in results {
        print!("{name:>12}");
    }
    let ours = results.iter().position(|(n, _)| *n == "mergeflow");
    if ours.is_some() {
        for (name, _) in results.iter().filter(|(n, _)| *n != "mergeflow") {
            print!("{:>16}", format!("mergeflow/{name}"));
        }
    }
    println!("  better");
    for (label, f, better) in rows {
        print!("{label:<30}");
        for (_, o) in results {
            print!("{:>12.2}", f(o));
        }
        if let Some(i) = ours {
            let mine = f(&results[i].1);
            for (_, o) in results.iter().filter(|(n, _)| *n != "mergeflow") {
                print!("{:>16.2}", mine / f(o));
            }
        }
        println!("  {better}");
    }
}

#[tokio::main]
async fn main() {
    let w = Workload {
        writes: env_usize("WRITES", 1000),
        tput: env_usize("TPUT", 10_000),
        tput_docs: env_usize("TPUT_DOCS", 100),
        writers: 32,
        catchup: env_usize("CATCHUP", 2000),
    };
    let only = std::env::var("ONLY").unwrap_or_else(|_| "mergeflow,samod,raw".into());
    println!(
        "workload: {} propagated writes; {} writes over {} docs by {} writers; catch-up of {} docs",
        w.writes, w.tput, w.tput_docs, w.writers, w.catchup
    );
    let mut results = Vec::new();
    for name in only.split(',') {
        let t = Instant::now();
        let o = match name {
            "mergeflow" => mf::run(w).await,
            "samod" => sm::run(w).await,
            "raw" => raw::run(w).await,
            other => panic!("ONLY: unknown system {other:?} (mergeflow, samod, raw)"),
        };
        eprintln!("{name}: done in {:.1} s: {o:?}", t.elapsed().as_secs_f64());
        results.push((name, o));
    }
    print(&w, &results);
}
