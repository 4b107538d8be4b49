//! Group commit: many writers, one flush.
//!
//! A writer first applies its batch to sled (in memory, fast), then calls
//! [`GroupCommit::flush`] and is acknowledged when that returns. A dedicated
//! thread takes every waiting request, calls `sled::Db::flush` once and answers
//! them all. A request that arrives during a flush waits for the next one, so the
//! flush that answers it always started after the writer's batch was applied:
//! the flush covers the write.
//!
//! Batches that nobody waits on (remote changes merged from the fast path,
//! see `doc::writer`) can be submitted *lazily*: their acks run in order with
//! everyone else's but without waiting for a flush, and the thread flushes
//! them within the lazy window (`store.remote_flush_ms`), or sooner with the
//! next write that does wait. A sled flush costs ~0.4 ms of CPU, more than
//! applying a small remote change, so a receiver that flushed each one spent
//! most of its time there.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};

/// The message acks get when the flush thread is gone.
pub(super) const CLOSED: &str = "the store is closed";

/// Called once with the result of the flush that covers a write.
pub type Ack = Box<dyn FnOnce(Result<(), Arc<str>>) + Send>;

enum Msg {
    /// Acks to run after a flush that starts after this message.
    Flush(Vec<Ack>),
    /// Acks to run in order with the others, flushed or not; a flush follows
    /// within the lazy window.
    Lazy(Vec<Ack>),
    Stop,
}

/// Handle to the flush thread. Cloning shares the thread.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Msg>,
    stats: Arc<FlushStats>,
}

/// Counters of the flush thread.
#[derive(Debug)]
pub struct FlushStats {
    /// How long each flush took.
    pub duration: prometheus_client::metrics::histogram::Histogram,
    /// Flushes done.
    pub flushes: AtomicU64,
    /// Writes acknowledged by those flushes.
    pub writes: AtomicU64,
    /// Lazy batches answered before their flush.
    pub lazy: AtomicU64,
}

impl GroupCommit {
    /// Starts the flush thread for `store`. `queue` bounds the writers waiting for a
    /// flush; more wait for room. Lazy batches are flushed at most `lazy` after
    /// the first of them was answered; with `lazy` zero they wait for a flush
    /// like any other.
    ///
    /// The thread exits after [`GroupCommit::stop`] or when every clone is dropped,
    /// answering the requests queued before; join it with the returned handle.
    /// With `fsync`, every flush is followed by [`Store::sync_files`].
    pub fn start(
        store: Store,
        queue: usize,
        lazy: Duration,
        fsync: bool,
    ) -> (GroupCommit, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Msg>(queue);
        let stats = Arc::new(FlushStats {
            duration: crate::latency::histogram(),
            flushes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            lazy: AtomicU64::new(0),
        });
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("mergeflow-flush".into())
            .spawn(move || flush_loop(&store, rx, queue, lazy, fsync, &thread_stats))
            .expect("spawn flush thread");
        (GroupCommit { tx, stats }, handle)
    }

    /// Waits until a flush that started after this call has completed.
    ///
    /// Cancel safe: dropping the future only gives up the wait; the flush happens.
    ///
    /// # Errors
    /// [`StoreError::Closed`] if the flush thread is gone, [`StoreError::Flush`]
    /// carrying sled's message if the flush failed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        let ack: Ack = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.tx
            .send(Msg::Flush(vec![ack]))
            .await
            .map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(msg.into()),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// From a blocking thread: calls every ack with the result of a flush that
    /// starts after this call (or with an error if the thread is gone). Waits only
    /// for room in the queue, not for the flush.
    ///
    /// With `durable` false the acks run as soon as the acks queued before them
    /// have, with `Ok` and possibly before a flush; the batch is flushed within
    /// the lazy window. For writes nobody is told are durable.
    pub fn submit_blocking(&self, acks: Vec<Ack>, durable: bool) {
        let msg = if durable {
            Msg::Flush(acks)
        } else {
            Msg::Lazy(acks)
        };
        if let Err(mpsc::error::SendError(Msg::Flush(acks) | Msg::Lazy(acks))) =
            self.tx.blocking_send(msg)
        {
            for ack in acks {
                ack(Err(Arc::from(CLOSED)));
            }
        }
    }

    /// Asks the thread to do a last flush for the writers already queued and exit.
    /// Later flushes fail with [`StoreError::Closed`].
    pub async fn stop(&self) {
        let _ = self.tx.send(Msg::Stop).await;
    }

    /// Flush counters.
    pub fn stats(&self) -> &FlushStats {
        &self.stats
    }
}

/// The flush thread: answers acks in the order they came, flushing first when
/// one of them waits for a flush or the lazy window has run out.
fn flush_loop(
    store: &Store,
    mut rx: mpsc::Receiver<Msg>,
    queue: usize,
    mut lazy: Duration,
    fsync: bool,
    stats: &FlushStats,
) {
    // A clock for the lazy window; the thread runs nothing else on it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .inspect_err(|e| {
            // Then every batch waits for a flush: slower, still correct.
            tracing::error!(err = %e, "flush thread has no timer; lazy flushes are off");
        })
        .ok();
    if rt.is_none() {
        lazy = Duration::ZERO;
    }
    let mut flusher = Flusher::start(store.clone(), fsync, FLUSH_STUCK);
    let mut waiters: Vec<Ack> = Vec::with_capacity(queue);
    // When the oldest batch that was answered before its flush was answered.
    let mut unflushed: Option<Instant> = None;
    let mut stop = false;
    while !stop {
        let mut must_flush = false;
        let mut lazy_batches = 0u64;
        let first = match (&rt, unflushed) {
            (Some(rt), Some(since)) => {
                let deadline = tokio::time::Instant::from_std(since + lazy);
                // `None` when the window ran out first.
                rt.block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await })
                    .ok()
            }
            _ => Some(rx.blocking_recv()),
        };
        // `first` is `None` when the lazy window ran out with nothing new:
        // then only the flush is due.
        let mut msgs: Vec<Option<Msg>> = first.into_iter().collect();
        must_flush |= msgs.is_empty();
        while let Ok(msg) = rx.try_recv() {
            msgs.push(Some(msg));
        }
        for msg in msgs {
            match msg {
                Some(Msg::Flush(acks)) => {
                    must_flush = true;
                    waiters.extend(acks);
                }
                Some(Msg::Lazy(acks)) => {
                    lazy_batches += 1;
                    waiters.extend(acks);
                }
                Some(Msg::Stop) | None => {
                    stop = true;
                    must_flush = true;
                }
            }
        }
        must_flush |= lazy_batches > 0 && lazy.is_zero();
        // A steady stream of lazy batches must not put the flush off: the
        // wait above returns a queued message before checking its deadline.
        must_flush |= unflushed.is_some_and(|since| since.elapsed() >= lazy);
        let result = if must_flush {
            unflushed = None;
            stats.flushes.fetch_add(1, Ordering::Relaxed);
            store.wait_unpaused();
            let started = Instant::now();
            let flushed = flusher.flush().map_err(|e| {
                tracing::error!(err = %e, "store flush failed");
                Arc::<str>::from(e.to_string())
            });
            stats.duration.observe(started.elapsed().as_secs_f64());
            flushed
        } else {
            stats.lazy.fetch_add(lazy_batches, Ordering::Relaxed);
            unflushed.get_or_insert_with(Instant::now);
            Ok(())
        };
        stats
            .writes
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        for ack in waiters.drain(..) {
            ack(result.clone());
        }
    }
}

/// How long a flush may take before the store counts as failed. sled 0.34
/// can wait forever in a flush after one of its I/O threads hit an error
/// (a full disk) that no call of ours saw; without a limit every writer
/// would wait with it, and the node would neither refuse writes (507) nor
/// restart once space returns. A healthy flush takes milliseconds, a slow
/// SD card under load a few seconds.
const FLUSH_STUCK: Duration = Duration::from_secs(20);

/// Runs sled's flush on a thread of its own, so that the flush thread can
/// stop waiting for one that never returns.
struct Flusher {
    /// `None` once dropped: the thread's loop ends.
    go: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    done: std::sync::mpsc::Receiver<Result<(), StoreError>>,
    store: Store,
    stuck_after: Duration,
    /// Set once a flush did not return in time; it never will be used again.
    stuck: bool,
}

impl Flusher {
    /// Flushes `store` (then fsyncs its files, with `fsync`).
    fn start(store: Store, fsync: bool, stuck_after: Duration) -> Flusher {
        let on = store.clone();
        let flush = move || {
            on.flush().and_then(|()| {
                if fsync {
                    on.sync_files().map(|_| ())
                } else {
                    Ok(())
                }
            })
        };
        Flusher::with(store, flush, stuck_after)
    }

    /// Runs `flush` for `store`.
    fn with(
        store: Store,
        mut flush: impl FnMut() -> Result<(), StoreError> + Send + 'static,
        stuck_after: Duration,
    ) -> Flusher {
        let (go, go_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let (done_tx, done) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("mergeflow-sled-flush".into())
            .spawn(move || {
                while go_rx.recv().is_ok() {
                    if done_tx.send(flush()).is_err() {
                        break;
                    }
                }
            });
        let thread = spawned
            .inspect_err(|e| {
                // No write is acknowledged unflushed: the store fails, and
                // the node refuses writes and restarts.
                store.failed(&format!("cannot start the sled flush thread: {e}"));
            })
            .ok();
        Flusher {
            go: Some(go),
            thread,
            done,
            store,
            stuck_after,
            stuck: false,
        }
    }

    /// One flush (and fsync), or an error once one has taken longer than
    /// `stuck_after`: then the store is marked failed, which makes the node
    /// refuse writes and restart on its data dir once it has room.
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.stuck {
            if self.go.as_ref().is_none_or(|go| go.send(()).is_err()) {
                return Err(StoreError::Closed);
            }
            match self.done.recv_timeout(self.stuck_after) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(StoreError::Closed);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => self.stuck = true,
            }
            self.store.failed(&format!(
                "a flush of {} did not finish within {} s (sled waits for a write that \
                 failed, most often on a full disk)",
                self.store.path().display(),
                self.stuck_after.as_secs()
            ));
        }
        Err(StoreError::Flush(
            self.store
                .failure()
                .unwrap_or_else(|| "a flush did not finish".into()),
        ))
    }
}

impl Drop for Flusher {
    /// Ends the thread and waits for it, so that its handle on the store is
    /// gone before the node closes sled (and seals the data dir); a thread
    /// stuck in sled is left behind.
    fn drop(&mut self) {
        self.go = None;
        if let Some(t) = self.thread.take()
            && !self.stuck
        {
            let _ = t.join();
        }
    }
}

/// What the flush thread reports to an ack when its flush failed.
impl From<Arc<str>> for StoreError {
    fn from(msg: Arc<str>) -> Self {
        if &*msg == CLOSED {
            StoreError::Closed
        } else {
            StoreError::Flush(msg.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (gc, thread) = GroupCommit::start(store.clone(), 64, Duration::ZERO, false);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    gc.flush().await.unwrap();
                }
                i
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let flushes = gc.stats().flushes.load(Ordering::Relaxed);
        let writes = gc.stats().writes.load(Ordering::Relaxed);
        assert_eq!(writes, 640);
        assert!(
            flushes < writes,
            "no flush was shared: flushes {flushes} writes {writes}"
        );
        drop(gc);
        thread.join().unwrap();
    }

    #[test]
    fn a_flush_that_never_returns_fails_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (_hold, hang) = std::sync::mpsc::channel::<()>();
        let mut flusher = Flusher::with(
            store.clone(),
            move || {
                let _ = hang.recv(); // as sled waiting for a write that failed
                Ok(())
            },
            Duration::from_millis(50),
        );
        let err = flusher.flush().unwrap_err().to_string();
        assert!(err.contains("did not finish within"), "{err}");
        let failure = store.failure().expect("the store counts as failed");
        assert!(failure.contains("full disk"), "{failure}");
        // Later flushes fail at once instead of queueing behind the stuck one.
        assert!(flusher.flush().is_err());
        assert!(
            store.put_sig("d", &[0; 32], b"s").is_err(),
            "writes are refused"
        );
    }

    #[test]
    fn lazy_acks_run_in_order_and_are_flushed_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (gc, thread) = GroupCommit::start(store.clone(), 64, Duration::from_millis(20), false);
        let (tx, rx) = std::sync::mpsc::channel();
        let ack = |name: &'static str| -> Ack {
            let tx = tx.clone();
            Box::new(move |r| tx.send((name, r.is_ok())).unwrap())
        };
        gc.submit_blocking(vec![ack("lazy 1")], false);
        assert_eq!(rx.recv().unwrap(), ("lazy 1", true));
        assert_eq!(
            gc.stats().flushes.load(Ordering::Relaxed),
            0,
            "answered before a flush"
        );
        // The window runs out with nothing else queued: a flush follows.
        let deadline = Instant::now() + Duration::from_secs(30);
        while gc.stats().flushes.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no flush after the lazy window");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A lazy batch behind a durable one waits for the durable one's flush.
        gc.submit_blocking(vec![ack("durable")], true);
        gc.submit_blocking(vec![ack("lazy 2")], false);
        assert_eq!(rx.recv().unwrap(), ("durable", true));
        assert_eq!(rx.recv().unwrap(), ("lazy 2", true));
        assert!(
            gc.stats().flushes.load(Ordering::Relaxed) >= 2,
            "the durable batch had a flush of its own"
        );
        drop(gc);
        thread.join().unwrap();
    }

    #[test]
    fn a_steady_stream_of_lazy_batches_is_still_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (gc, thread) = GroupCommit::start(store, 64, Duration::from_millis(20), false);
        // Lazy batches as fast as the queue takes them: it is never empty,
        // so the window's timer alone would never fire.
        let deadline = Instant::now() + Duration::from_secs(30);
        while gc.stats().flushes.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "lazy batches were never flushed");
            gc.submit_blocking(Vec::new(), false);
        }
        drop(gc);
        thread.join().unwrap();
    }
}
