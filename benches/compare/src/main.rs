//! mergeflow, samod and raw Automerge sync, side by side on one machine.
//!
//! Each system runs two peers in this one process, connected by TCP on
//! loopback, through the same workload:
//! - propagation: `WARMUP` (200) one-key changes to one doc on A, then
//!   `WRITES` (2,000) more, one at a time, each from the write call until B
//!   has stored it (raw: until B has applied it; it stores nothing); p50 and
//!   p99 in ms, and the p50 of the first and the last tenth (flat as the
//!   doc's history grows?);
//! - stream: one doc prefilled with `PREFILL` (10,000) changes, then
//!   `STREAM_RATE` (2,000) changes/s by 4 writers for `STREAM_SECS` (10) s;
//!   each change's lag from its write call until B holds it: p50, p99, max;
//! - throughput: `TPUT` (10,000) one-key changes spread over `TPUT_DOCS` (100)
//!   docs by 32 concurrent writers on A; writes per second from the first
//!   write until B has them all;
//! - catch-up: A holds `CATCHUP` (10,000) docs of `CATCHUP_CHANGES` (10)
//!   changes each; a fresh B connects; seconds until B has every doc at A's
//!   heads;
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
//! `COMPACT_AFTER=N` sets mergeflow's `store.compact_after_changes`.

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
    warmup: usize,
    writes: usize,
    prefill: usize,
    stream_rate: usize,
    stream_writers: usize,
    stream_secs: usize,
    tput: usize,
    tput_docs: usize,
    writers: usize,
    catchup: usize,
    catchup_changes: usize,
}

/// What one system measured.
#[derive(Debug, Default)]
struct Outcome {
    p50_ms: f64,
    p99_ms: f64,
    /// p50 of the first and of the last tenth of the propagated writes.
    p50_first_ms: f64,
    p50_last_ms: f64,
    prop_bytes: u64,
    stream_p50_ms: f64,
    stream_p99_ms: f64,
    stream_max_ms: f64,
    stream_bytes: u64,
    tput_per_s: f64,
    tput_bytes: u64,
    catchup_s: f64,
    catchup_bytes: u64,
}

impl Outcome {
    /// Takes the propagation latencies, in the order the writes were made.
    fn propagation(&mut self, lat: &[Duration]) {
        let tenth = (lat.len() / 10).max(1);
        self.p50_first_ms = pct(&mut lat[..tenth].to_vec(), 0.5);
        self.p50_last_ms = pct(&mut lat[lat.len() - tenth..].to_vec(), 0.5);
        let mut all = lat.to_vec();
        self.p50_ms = pct(&mut all, 0.5);
        self.p99_ms = pct(&mut all, 0.99);
    }

    /// Takes the stream's lags.
    fn stream(&mut self, mut lags: Vec<Duration>) {
        self.stream_p50_ms = pct(&mut lags, 0.5);
        self.stream_p99_ms = pct(&mut lags, 0.99);
        self.stream_max_ms = lags.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    }
}

/// When each stream write was called, with the heads it returned (its own
/// change: one writer actor, so A's changes form one chain).
type Calls = Vec<(Instant, Vec<String>)>;

/// When B's heads were seen, and what they were.
type Seen = Vec<(Instant, Vec<String>)>;

/// Each stream write's lag: from its call until B first held it. `seq`
/// gives A's changes their place in A's chain (B holding one holds every
/// earlier one).
fn lags(calls: &Calls, seen: &Seen, seq: impl Fn(&str) -> Option<u64>) -> Vec<Duration> {
    let last = |heads: &[String]| heads.iter().filter_map(|h| seq(h)).max();
    let mut called: Vec<(u64, Instant)> = calls
        .iter()
        .filter_map(|(t, heads)| last(heads).map(|s| (s, *t)))
        .collect();
    called.sort_unstable_by_key(|(s, _)| *s);
    let mut held: Vec<(Instant, u64)> = seen
        .iter()
        .filter_map(|(t, heads)| last(heads).map(|s| (*t, s)))
        .collect();
    held.sort_unstable_by_key(|(t, _)| *t);
    let mut out = Vec::with_capacity(called.len());
    let mut next = 0;
    for (t, s) in held {
        while next < called.len() && called[next].0 <= s {
            out.push(t.saturating_duration_since(called[next].1));
            next += 1;
        }
    }
    out
}

/// Runs the stream: `w.stream_rate` writes per second by `w.stream_writers`
/// tasks for `w.stream_secs`; `write(n)` makes one and returns its heads.
async fn stream_writes<F, Fut>(w: Workload, write: F) -> Calls
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Vec<String>> + Send,
{
    let total = w.stream_rate * w.stream_secs;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let every = Duration::from_secs_f64(1.0 / w.stream_rate as f64);
    let mut tasks = Vec::new();
    for k in 0..w.stream_writers {
        let write = write.clone();
        tasks.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            for n in (k..total).step_by(w.stream_writers) {
                tokio::time::sleep_until(start + every * n as u32).await;
                let t = Instant::now();
                calls.push((t, write(n).await));
            }
            calls
        }));
    }
    let mut calls = Vec::with_capacity(total);
    for t in tasks {
        calls.extend(t.await.expect("stream writer"));
    }
    calls
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

/// Change hashes as hex, as mergeflow gives them.
fn hex(heads: &[automerge::ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| h.to_string()).collect()
}

/// Each change of `doc` (hex hash) -> its sequence number.
fn seqs(doc: &automerge::Automerge) -> HashMap<String, u64> {
    doc.get_changes(&[])
        .into_iter()
        .map(|c| (c.hash().to_string(), c.seq()))
        .collect()
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
        // For experiments: `COMPACT_AFTER=N` sets `store.compact_after_changes`.
        let default = config.store.compact_after_changes as usize;
        config.store.compact_after_changes = super::env_usize("COMPACT_AFTER", default) as u64;
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
        let mut before = 0;
        let mut lat = Vec::with_capacity(w.writes);
        for i in 1..=w.warmup + w.writes {
            if i == w.warmup + 1 {
                before = wire(&[&a, &b]).await;
            }
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
            if i > w.warmup {
                lat.push(t.elapsed());
            }
        }
        out.prop_bytes = wire(&[&a, &b]).await - before;
        out.propagation(&lat);

        // Stream into a doc with history.
        let writer = a.clone();
        spread_writes(
            Workload {
                tput: w.prefill,
                tput_docs: 1,
                ..w
            },
            move |_, n| {
                let doc = writer.doc("hot").unwrap();
                async move {
                    doc.patch(json!({"p": n})).await.unwrap();
                }
            },
        )
        .await;
        wait_all(1, |_| same_heads(&a, &b, "hot")).await;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let mut feed = Box::pin(b.subscribe("hot").unwrap());
        let watched = seen.clone();
        let watcher = tokio::spawn(async move {
            while let Some(item) = feed.next().await {
                if let FeedItem::Change(e) = item {
                    watched
                        .lock()
                        .unwrap()
                        .push((Instant::now(), e.heads.clone()));
                }
            }
        });
        let before = wire(&[&a, &b]).await;
        let writer = a.clone();
        let calls = stream_writes(w, move |n| {
            let doc = writer.doc("hot").unwrap();
            async move { doc.patch(json!({"s": n})).await.unwrap().heads }
        })
        .await;
        wait_all(1, |_| same_heads(&a, &b, "hot")).await;
        out.stream_bytes = wire(&[&a, &b]).await - before;
        watcher.abort();
        let seqs: HashMap<String, u64> = a
            .doc("hot")
            .unwrap()
            .history()
            .await
            .unwrap()
            .into_iter()
            .map(|h| (h.hash, h.seq))
            .collect();
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        out.stream(lags(&calls, &seen, |h| seqs.get(h).copied()));

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
        a.shutdown().await.unwrap();

        // Catch-up: a node holding only the catch-up docs, and a fresh one.
        let a = start(&dir.path().join("a2"), vec![]).await;
        let a_addr = addr(&a).await;
        let ids: Vec<String> = (0..w.catchup).map(|d| format!("c/{d}")).collect();
        let writer = a.clone();
        spread_writes(
            Workload {
                tput: w.catchup * w.catchup_changes,
                tput_docs: w.catchup,
                ..w
            },
            move |d, n| {
                let doc = writer.doc(&format!("c/{d}")).unwrap();
                async move {
                    doc.patch(json!({"n": n})).await.unwrap();
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
        let mut before = 0;
        let mut lat = Vec::with_capacity(w.writes);
        for i in 1..=w.warmup + w.writes {
            if i == w.warmup + 1 {
                before = sent.load(Ordering::Relaxed);
            }
            let t = Instant::now();
            let want = put(&a_doc, "i", i);
            while heads(&b_doc) != want {
                changes.next().await.expect("change stream ended");
            }
            if i > w.warmup {
                lat.push(t.elapsed());
            }
        }
        out.prop_bytes = sent.load(Ordering::Relaxed) - before;
        out.propagation(&lat);

        // Stream into a doc with history.
        let a_hot = create(&a, 0).await;
        for n in 0..w.prefill {
            put(&a_hot, "p", n);
        }
        let b_hot = found(&b, &a_hot).await;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (watched, b_watch) = (seen.clone(), b_hot.clone());
        let watcher = tokio::spawn(async move {
            let mut changes = Box::pin(b_watch.changes());
            while changes.next().await.is_some() {
                let h = hex(&heads(&b_watch));
                watched.lock().unwrap().push((Instant::now(), h));
            }
        });
        let before = sent.load(Ordering::Relaxed);
        let writer = a_hot.clone();
        let calls = stream_writes(w, move |n| {
            let h = hex(&put(&writer, "s", n));
            async move { h }
        })
        .await;
        wait_all(1, |_| {
            let same = heads(&a_hot) == heads(&b_hot);
            async move { same }
        })
        .await;
        out.stream_bytes = sent.load(Ordering::Relaxed) - before;
        watcher.abort();
        let seqs = a_hot.with_document(|d| seqs(d));
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        out.stream(lags(&calls, &seen, |h| seqs.get(h).copied()));

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
            let doc = create(&a, d).await;
            for n in 1..w.catchup_changes {
                put(&doc, "n", n);
            }
            c_docs.push(doc);
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
    use bytes::{Bytes, BytesMut};
    use futures::{FutureExt, SinkExt, StreamExt};
    use tokio::sync::{mpsc, watch};
    use tokio_util::codec::{Framed, LengthDelimitedCodec};

    struct Entry {
        doc: Automerge,
        sync: sync::State,
    }

    impl Entry {
        fn new() -> Self {
            Entry {
                doc: Automerge::new(),
                sync: sync::State::new(),
            }
        }
    }

    /// Frame kinds: an Automerge sync message (catch-up), or one change as
    /// committed (live changes).
    const SYNC: u8 = 0;
    const CHANGE: u8 = 1;

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

        /// Sends a frame: `kind` (SYNC or CHANGE), the doc id, the payload.
        fn frame(&self, kind: u8, id: &str, payload: &[u8]) {
            let out = self.out.lock().unwrap();
            let Some(tx) = out.as_ref() else { return };
            let mut frame = Vec::with_capacity(3 + id.len() + payload.len());
            frame.push(kind);
            frame.extend_from_slice(&(id.len() as u16).to_be_bytes());
            frame.extend_from_slice(id.as_bytes());
            frame.extend_from_slice(payload);
            let _ = tx.send(frame.into());
        }

        /// Sends what the peer lacks of doc `id`, if anything.
        fn send(&self, id: &str, e: &mut Entry) {
            if let Some(msg) = e.doc.generate_sync_message(&mut e.sync) {
                self.frame(SYNC, id, &msg.encode());
            }
        }

        /// Commits a one-key change and sends it as it is: the floor of a
        /// live change's trip (the receiver applies it, nothing more).
        fn put(&self, id: &str, key: &str, n: usize) -> Vec<ChangeHash> {
            let mut docs = self.docs.lock().unwrap();
            let e = docs.entry(id.to_string()).or_insert_with(Entry::new);
            let mut tx = e.doc.transaction();
            tx.put(ROOT, key, n as u64).unwrap();
            // (A put of the value already there makes no change.)
            if let (Some(hash), _) = tx.commit() {
                let change =
                    automerge::ReadDoc::get_change_by_hash(&e.doc, &hash).expect("committed");
                self.frame(CHANGE, id, change.raw_bytes());
            }
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
                    // Every frame already here, changes applied per doc in
                    // one call: Automerge's apply walks the doc's ops, so a
                    // hot doc applied change by change falls behind.
                    let mut ready = vec![frame];
                    while ready.len() < 4096 {
                        match frames.next().now_or_never() {
                            Some(Some(Ok(f))) => ready.push(f),
                            _ => break,
                        }
                    }
                    peer.receive(ready);
                    peer.applied.send_modify(|v| *v += 1);
                }
            });
        }

        /// Applies frames: changes per doc together, sync messages in turn.
        fn receive(&self, frames: Vec<BytesMut>) {
            let mut docs = self.docs.lock().unwrap();
            let mut pending: HashMap<String, Vec<automerge::Change>> = HashMap::new();
            let flush = |docs: &mut HashMap<String, Entry>, id: &str, changes: Vec<_>| {
                let e = docs.entry(id.to_string()).or_insert_with(Entry::new);
                e.doc.apply_changes(changes).expect("apply changes");
            };
            for frame in frames {
                let n = u16::from_be_bytes([frame[1], frame[2]]) as usize;
                let id = std::str::from_utf8(&frame[3..3 + n]).unwrap().to_string();
                let payload = &frame[3 + n..];
                if frame[0] == CHANGE {
                    let change = automerge::Change::from_bytes(payload.to_vec()).expect("change");
                    pending.entry(id).or_default().push(change);
                    continue;
                }
                if let Some(changes) = pending.remove(&id) {
                    flush(&mut docs, &id, changes);
                }
                let msg = sync::Message::decode(payload).expect("sync message");
                let e = docs.entry(id.clone()).or_insert_with(Entry::new);
                e.doc
                    .receive_sync_message(&mut e.sync, msg)
                    .expect("apply sync message");
                self.send(&id, e);
            }
            for (id, changes) in pending {
                flush(&mut docs, &id, changes);
            }
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
        let mut before = 0;
        let mut lat = Vec::with_capacity(w.writes);
        for i in 1..=w.warmup + w.writes {
            if i == w.warmup + 1 {
                before = sent.load(Ordering::Relaxed);
            }
            let t = Instant::now();
            let want = Some(a.put("prop", "i", i));
            applied.borrow_and_update();
            while b.heads("prop") != want {
                applied.changed().await.expect("peer gone");
            }
            if i > w.warmup {
                lat.push(t.elapsed());
            }
        }
        out.prop_bytes = sent.load(Ordering::Relaxed) - before;
        out.propagation(&lat);

        // Stream into a doc with history.
        for n in 0..w.prefill {
            a.put("hot", "p", n);
        }
        wait_all(1, |_| std::future::ready(a.same(&b, "hot"))).await;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let (watched, b_watch) = (seen.clone(), b.clone());
        let mut applied = b.applied.subscribe();
        let watcher = tokio::spawn(async move {
            while applied.changed().await.is_ok() {
                let h = hex(&b_watch.heads("hot").unwrap_or_default());
                watched.lock().unwrap().push((Instant::now(), h));
            }
        });
        let before = sent.load(Ordering::Relaxed);
        let writer = a.clone();
        let calls = stream_writes(w, move |n| {
            let h = hex(&writer.put("hot", "s", n));
            async move { h }
        })
        .await;
        wait_all(1, |_| std::future::ready(a.same(&b, "hot"))).await;
        out.stream_bytes = sent.load(Ordering::Relaxed) - before;
        watcher.abort();
        let seqs = seqs(&a.docs.lock().unwrap()["hot"].doc);
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        out.stream(lags(&calls, &seen, |h| seqs.get(h).copied()));

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

        // Catch-up: a peer holding only the catch-up docs, and a fresh one;
        // its docs are offered as it connects, by the Automerge sync
        // protocol (which sends a peer that has nothing the doc whole).
        let ids: Vec<String> = (0..w.catchup).map(|d| format!("c/{d}")).collect();
        let a = Peer::new();
        for id in &ids {
            for n in 0..w.catchup_changes {
                a.put(id, "n", n);
            }
        }
        let f = Peer::new();
        let sent = Arc::new(AtomicU64::new(0));
        let t = Instant::now();
        connect(&a, &f, &sent).await;
        wait_all(ids.len(), |i| std::future::ready(a.same(&f, &ids[i]))).await;
        out.catchup_s = t.elapsed().as_secs_f64();
        out.catchup_bytes = sent.load(Ordering::Relaxed);
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
    let stream = w.stream_rate * w.stream_secs;
    let rows: [Row; 13] = [
        ("propagation p50, ms", &|o| o.p50_ms, "lower"),
        ("propagation p99, ms", &|o| o.p99_ms, "lower"),
        ("  p50 first tenth, ms", &|o| o.p50_first_ms, "lower"),
        ("  p50 last tenth, ms", &|o| o.p50_last_ms, "lower"),
        (
            "bytes per propagated write",
            &|o| per(o.prop_bytes, w.writes),
            "lower",
        ),
        ("stream lag p50, ms", &|o| o.stream_p50_ms, "lower"),
        ("stream lag p99, ms", &|o| o.stream_p99_ms, "lower"),
        ("stream lag max, ms", &|o| o.stream_max_ms, "lower"),
        (
            "bytes per write (stream)",
            &|o| per(o.stream_bytes, stream),
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

/// The mergeflow command's allocator, for all three systems (feature
/// `mimalloc`, on by default).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let w = Workload {
        warmup: env_usize("WARMUP", 200),
        writes: env_usize("WRITES", 2000),
        prefill: env_usize("PREFILL", 10_000),
        stream_rate: env_usize("STREAM_RATE", 2000),
        stream_writers: 4,
        stream_secs: env_usize("STREAM_SECS", 10),
        tput: env_usize("TPUT", 10_000),
        tput_docs: env_usize("TPUT_DOCS", 100),
        writers: 32,
        catchup: env_usize("CATCHUP", 10_000),
        catchup_changes: env_usize("CATCHUP_CHANGES", 10),
    };
    let only = std::env::var("ONLY").unwrap_or_else(|_| "mergeflow,samod,raw".into());
    println!(
        "workload: {} propagated writes after {} warm-up; a stream of {}/s by {} writers for {} s into a doc of {} changes; {} writes over {} docs by {} writers; catch-up of {} docs of {} changes",
        w.writes,
        w.warmup,
        w.stream_rate,
        w.stream_writers,
        w.stream_secs,
        w.prefill,
        w.tput,
        w.tput_docs,
        w.writers,
        w.catchup,
        w.catchup_changes
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
