//! Progress of a bench run, drawn on stderr (as `mergeflow wait-synced`
//! draws its own).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Runs `work` while a bar (or a spinner, without `len`) shows `count` (what
/// `work` counts) against `len`; the bar is cleared when it ends.
pub async fn counting<T>(
    len: Option<u64>,
    template: &str,
    work: impl AsyncFnOnce(Arc<AtomicU64>) -> T,
) -> T {
    let count = Arc::new(AtomicU64::new(0));
    let bar = mergeflow::cli_support::progress_bar(len, template);
    let watch = {
        let (bar, count) = (bar.clone(), count.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(count.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let out = work(count).await;
    watch.abort();
    bar.finish_and_clear();
    out
}
