//! Group commit: many writers, one flush.
//!
//! A writer first applies its batch to sled (in memory, fast), then calls
//! [`GroupCommit::flush`] and is acknowledged when that returns. A dedicated
//! thread takes every waiting request, calls `sled::Db::flush` once and answers
//! them all. A request that arrives during a flush waits for the next one, so the
//! flush that answers it always started after the writer's batch was applied:
//! the flush covers the write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};

/// The message acks get when the flush thread is gone.
pub(super) const CLOSED: &str = "the store is closed";

/// Called once with the result of the flush that covers a write.
pub type Ack = Box<dyn FnOnce(Result<(), Arc<str>>) + Send>;

enum Msg {
    Flush(Vec<Ack>),
    Stop,
}

/// Handle to the flush thread. Cloning shares the thread.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Msg>,
    stats: Arc<FlushStats>,
}

/// Counters of the flush thread.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// Flushes done.
    pub flushes: AtomicU64,
    /// Writes acknowledged by those flushes.
    pub writes: AtomicU64,
}

impl GroupCommit {
    /// Starts the flush thread for `store`. `queue` bounds the writers waiting for a
    /// flush; more wait for room.
    ///
    /// The thread exits after [`GroupCommit::stop`] or when every clone is dropped,
    /// answering the requests queued before; join it with the returned handle.
    pub fn start(store: Store, queue: usize) -> (GroupCommit, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Msg>(queue);
        let stats = Arc::new(FlushStats::default());
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("mergeflow-flush".into())
            .spawn(move || {
                let mut waiters = Vec::with_capacity(queue);
                let mut stop = false;
                while !stop {
                    match rx.blocking_recv() {
                        Some(Msg::Flush(acks)) => waiters.extend(acks),
                        Some(Msg::Stop) | None => stop = true,
                    }
                    while let Ok(msg) = rx.try_recv() {
                        match msg {
                            Msg::Flush(acks) => waiters.extend(acks),
                            Msg::Stop => stop = true,
                        }
                    }
                    let result = store.flush().map_err(|e| {
                        tracing::error!(err = %e, "store flush failed");
                        Arc::<str>::from(e.to_string())
                    });
                    thread_stats.flushes.fetch_add(1, Ordering::Relaxed);
                    thread_stats
                        .writes
                        .fetch_add(waiters.len() as u64, Ordering::Relaxed);
                    for ack in waiters.drain(..) {
                        ack(result.clone());
                    }
                }
            })
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
    pub fn submit_blocking(&self, acks: Vec<Ack>) {
        if let Err(mpsc::error::SendError(Msg::Flush(acks))) =
            self.tx.blocking_send(Msg::Flush(acks))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (gc, thread) = GroupCommit::start(store.clone(), 64);
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
}
