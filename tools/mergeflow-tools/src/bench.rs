//! `mergeflow-tools bench`: durable write throughput and acknowledgement latency over
//! HTTP against a running node, and a filler for reopen measurements.
//! Prints numbers; asserts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use mergeflow::client::{Client, ClientError};

/// Result of one load run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Concurrent writers.
    pub concurrency: usize,
    /// Acknowledged writes.
    pub writes: u64,
    /// Failed writes.
    pub errors: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Acknowledged writes per second.
    pub writes_per_s: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

/// Runs `concurrency` writers for `duration`, each sending merge patches to one
/// of `docs` documents, and measures acknowledged (durable) writes, counted
/// in `done` as they are acknowledged.
///
/// # Errors
/// A client error on the first request (node unreachable).
pub async fn load(
    client: &Client,
    concurrency: usize,
    duration: Duration,
    docs: usize,
    done: Arc<AtomicU64>,
) -> Result<LoadReport, ClientError> {
    client.status().await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (client, done) = (client.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let doc = format!("bench/doc-{}", w % docs.max(1));
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let patch = json!({ format!("w{w}"): i, "last": w });
                match client.patch(&doc, &patch).await {
                    Ok(_) => {
                        lat.push(t.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.expect("bench task");
        all.extend(lat);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i].as_secs_f64() * 1000.0
    };
    Ok(LoadReport {
        concurrency,
        writes: all.len() as u64,
        errors,
        seconds,
        writes_per_s: all.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}

/// Creates `count` documents `<prefix>/doc-N` with a small body, `concurrency` at
/// a time, counting them in `done`.
///
/// # Errors
/// The first failed write.
pub async fn fill(
    client: &Client,
    prefix: &str,
    count: usize,
    concurrency: usize,
    done: Arc<AtomicU64>,
) -> Result<f64, ClientError> {
    let start = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, done) = (client.clone(), next.clone(), done.clone());
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, ClientError>(());
                }
                let value = json!({"n": i, "name": format!("document {i}"), "tags": ["a", "b"]});
                client.patch(&format!("{prefix}/doc-{i}"), &value).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("fill task")?;
    }
    Ok(start.elapsed().as_secs_f64())
}
