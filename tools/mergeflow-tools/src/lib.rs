//! mergeflow-tools: development tools that run against mergeflow nodes and
//! are not shipped with them.
//!
//! - [`chaos`]: the fault campaign's workload, effect receiver and checker,
//!   run by `scripts/chaos.sh` (`mergeflow-tools chaos ...`) and by
//!   `tests/campaign.rs` on an in-process cluster.
//! - [`bench`](mod@bench): durable write throughput and latency over HTTP, and a filler,
//!   run by `scripts/bench.sh` (`mergeflow-tools bench ...`).
//! - `http.rs`: the campaign's raw HTTP client settings.
//! - `main.rs`, `chaos_cmd.rs` and `progress.rs`: the `mergeflow-tools`
//!   command.

#![warn(missing_docs)]

pub mod bench;
pub mod chaos;
