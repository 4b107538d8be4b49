//! Serving the API: the accept loop, and each connection's limits.
//!
//! `axum::serve` bounds nothing: every connection is accepted, and one that
//! sends half a request header, or nothing, stays open forever (before the
//! token check could refuse it), holding a file descriptor and its buffers.
//! This loop serves HTTP/1.1 with hyper directly and bounds three things:
//!
//! - **Connections** (`api.max_connections`): each holds a semaphore permit.
//!   When all are taken the loop stops accepting until one frees; new clients
//!   wait in the kernel's listen backlog (rather than being accepted and
//!   closed at once), so a burst of honest clients is served late, not
//!   refused.
//! - **Header time** (`api.header_timeout_ms`): hyper's header read timeout.
//!   It runs from the moment the connection waits for a request head, so it
//!   also closes a keep-alive connection that sends no next request.
//! - **Idle time** (`api.idle_timeout_ms`): a connection whose request is in
//!   progress but on which no byte moved either way for this long, while the
//!   node waits on the client (a body that stopped arriving, an answer the
//!   client does not read), is closed. Time the node itself works (a handler
//!   running, a replica wait, a restore, an event stream waiting for its next
//!   event) is not idle: a quiet `/v1/events` stream stays open.
//!
//! Shutdown: on the node's cancellation token the loop stops accepting and
//! each connection gets hyper's graceful shutdown (idle ones close, in-flight
//! requests finish); connections run on the node's task tracker, so
//! `Node::shutdown` waits for them within `perf.shutdown_timeout_ms`.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use futures_util::task::AtomicWaker;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ApiConfig;

/// How long a connection closed for idleness gets to finish its request's
/// error path before it is dropped.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The connection limits, from `[api]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time to receive a request head.
    pub header_timeout: Duration,
    /// Time without a byte while the node waits on the client.
    pub idle_timeout: Duration,
}

impl Limits {
    /// From a validated `[api]`.
    pub(crate) fn new(api: &ApiConfig) -> Limits {
        Limits {
            max_connections: api.max_connections,
            header_timeout: Duration::from_millis(api.header_timeout_ms),
            idle_timeout: Duration::from_millis(api.idle_timeout_ms),
        }
    }
}

/// Serves `app` on `listener` until `cancel`; see the module doc. Each
/// connection runs on `tasks`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut full_logged = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !full_logged {
                    tracing::warn!(
                        max = limits.max_connections,
                        "API connection limit reached (api.max_connections): new \
                         connections wait until one closes"
                    );
                    full_logged = true;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to free.
                tracing::error!(err = %e, "API accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        if permits.available_permits() > 0 {
            full_logged = false;
        }
        tasks.spawn(connection(
            stream,
            app.clone(),
            http.clone(),
            limits.idle_timeout,
            cancel.clone(),
            permit,
        ));
    }
}

/// Errors of one connection, which say nothing about the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection, holding `_permit` until it closes.
async fn connection(
    stream: TcpStream,
    app: Router,
    http: hyper::server::conn::http1::Builder,
    idle_timeout: Duration,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let watch = Arc::new(Watch::new());
    let io = TokioIo::new(Watched {
        io: stream,
        watch: watch.clone(),
    });
    let inner = TowerToHyperService::new(app);
    let w = watch.clone();
    let service = hyper::service::service_fn(move |req: axum::http::Request<Incoming>| {
        let busy = Busy::new(w.clone());
        let req = req.map(|b| Body::new(InBody::new(b, w.clone())));
        let answer = inner.call(req);
        let w = w.clone();
        async move {
            let resp = answer.await?;
            drop(busy);
            Ok::<_, Infallible>(resp.map(|b| Body::new(OutBody::new(b, w))))
        }
    });
    let conn = http.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let idle = idle(&watch, idle_timeout);
    tokio::pin!(idle);
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(err = %e, "API connection ended with an error");
                }
                return;
            }
            _ = cancel.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle => {
                tracing::debug!(?idle_timeout, "closing an idle API connection (api.idle_timeout_ms)");
                // Reads now see the end and writes fail, so the request's
                // body ends in an error its handler sees and cleans up after.
                watch.kill();
                let _ = tokio::time::timeout(KILL_GRACE, conn.as_mut()).await;
                return;
            }
        }
    }
}

/// Ends when no byte moved on the connection for `timeout` while nothing of
/// the node worked for it.
async fn idle(watch: &Watch, timeout: Duration) {
    loop {
        let seen = watch.last_ms.load(Ordering::Relaxed);
        tokio::time::sleep_until(watch.start + Duration::from_millis(seen) + timeout).await;
        if watch.working.load(Ordering::Relaxed) > 0 {
            watch.touch();
        } else if watch.last_ms.load(Ordering::Relaxed) == seen {
            return;
        }
    }
}

/// What one connection is doing, shared by its I/O, its bodies and its
/// watchdog.
struct Watch {
    start: Instant,
    /// Milliseconds after `start` of the last byte moved or change of work.
    last_ms: AtomicU64,
    /// Handlers running (not waiting on their request body), plus answer
    /// bodies waiting on the node (an event stream between events).
    working: AtomicI64,
    /// Closed for idleness: reads end, writes fail.
    dead: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            working: AtomicI64::new(0),
            dead: AtomicBool::new(false),
            read: AtomicWaker::new(),
            write: AtomicWaker::new(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn work(&self, delta: i64) {
        self.working.fetch_add(delta, Ordering::Relaxed);
        self.touch();
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.read.wake();
        self.write.wake();
    }

    fn dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

/// Counts as work while a handler runs.
struct Busy(Arc<Watch>);

impl Busy {
    fn new(watch: Arc<Watch>) -> Busy {
        watch.work(1);
        Busy(watch)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.work(-1);
    }
}

/// A request body: while its handler waits for it, the handler does not
/// count as work (it waits on the client).
struct InBody {
    inner: Incoming,
    watch: Arc<Watch>,
    waiting: bool,
}

impl InBody {
    fn new(inner: Incoming, watch: Arc<Watch>) -> InBody {
        InBody {
            inner,
            watch,
            waiting: false,
        }
    }
}

impl HttpBody for InBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match (r.is_pending(), this.waiting) {
            (true, false) => {
                this.waiting = true;
                this.watch.work(-1);
            }
            (false, true) => {
                this.waiting = false;
                this.watch.work(1);
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for InBody {
    fn drop(&mut self) {
        if self.waiting {
            self.watch.work(1);
        }
    }
}

/// An answer body: while it waits for its next frame from the node (an event
/// stream between events, a backup being taken) the connection is working.
struct OutBody {
    inner: Body,
    watch: Arc<Watch>,
    pending: bool,
}

impl OutBody {
    fn new(inner: Body, watch: Arc<Watch>) -> OutBody {
        OutBody {
            inner,
            watch,
            pending: false,
        }
    }
}

impl HttpBody for OutBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match (r.is_pending(), this.pending) {
            (true, false) => {
                this.pending = true;
                this.watch.work(1);
            }
            (false, true) => {
                this.pending = false;
                this.watch.work(-1);
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for OutBody {
    fn drop(&mut self) {
        if self.pending {
            self.watch.work(-1);
        }
    }
}

/// The connection's socket, noting when bytes move; once killed, reads end
/// and writes fail.
struct Watched {
    io: TcpStream,
    watch: Arc<Watch>,
}

fn idle_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection idle longer than api.idle_timeout_ms",
    )
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.watch.read.register(cx.waker());
        if this.watch.dead() {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.watch.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.watch.write.register(cx.waker());
        if this.watch.dead() {
            return Poll::Ready(Err(idle_error()));
        }
        let r = Pin::new(&mut this.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.watch.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.watch.write.register(cx.waker());
        if this.watch.dead() {
            return Poll::Ready(Err(idle_error()));
        }
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.watch.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
