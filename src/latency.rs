//! The latency histogram that the store, the doc service and the workflow
//! engine record into. A leaf: `metrics.rs` renders the histograms, and
//! nothing that records imports the renderer.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// A latency histogram in seconds: 50 us to ~26 s, doubling.
pub fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}
