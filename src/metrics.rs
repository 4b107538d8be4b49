//! Prometheus metrics, served as text at `GET /metrics`: one registry per
//! node, built once at start, and the work queues' depths.
//!
//! A leaf: it imports nothing from the crate, so every part can record into
//! it and nothing imports the parts that fill it. Latency histograms are
//! recorded as things happen and registered once ([`Metrics::new`]); every
//! other number is read from the node at scrape time (the same sources as
//! `/v1/status`) and handed to [`Metrics::render`] as [`Family`]s, which one
//! [`Collector`] encodes, so nothing is counted twice and a scrape builds no
//! registry. Names follow Prometheus conventions: a `mergeflow_` prefix, base
//! units in the name, `_total` on counters.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family as LabelledFamily;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::mpsc;

/// Label pairs of a series.
pub type Labels = Vec<(&'static str, String)>;

/// A number of a series.
#[derive(Clone, Copy, Debug)]
pub enum Number {
    /// A whole number (counts, sizes).
    Int(u64),
    /// A fraction (timestamps in seconds).
    Float(f64),
}

/// One metric family read at scrape time: a level (gauge) or a count since
/// the node started (counter), with its unit if it has one, and its series
/// (one unlabelled, or any number labelled; with none it is not shown).
#[derive(Clone, Debug)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    counter: bool,
    series: Vec<(Labels, Number)>,
}

impl Family {
    /// A gauge with one unlabelled value.
    pub fn gauge(name: &'static str, help: &'static str, value: u64) -> Family {
        Family {
            name,
            help,
            unit: None,
            counter: false,
            series: vec![(Vec::new(), Number::Int(value))],
        }
    }

    /// A counter with one unlabelled value.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Family {
        Family {
            counter: true,
            ..Family::gauge(name, help, value)
        }
    }

    /// A gauge whose series are labelled; add them with [`Family::push`].
    pub fn labelled_gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            series: Vec::new(),
            ..Family::gauge(name, help, 0)
        }
    }

    /// A counter whose series are labelled; add them with [`Family::push`].
    pub fn labelled_counter(name: &'static str, help: &'static str) -> Family {
        Family {
            counter: true,
            ..Family::labelled_gauge(name, help)
        }
    }

    /// The same family, measured in `unit` (which the name then ends with).
    pub fn in_unit(self, unit: Unit) -> Family {
        Family {
            unit: Some(unit),
            ..self
        }
    }

    /// Adds a series.
    pub fn push(&mut self, labels: Labels, value: Number) {
        self.series.push((labels, value));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.series.is_empty() {
            // As a registry shows an empty family: not at all.
            return Ok(());
        }
        let kind = if self.counter {
            MetricType::Counter
        } else {
            MetricType::Gauge
        };
        // Registry::register ends help with a period; the collector's
        // families read the same.
        let help = format!("{}.", self.help);
        let out = encoder.encode_descriptor(self.name, &help, self.unit.as_ref(), kind)?;
        if let [(labels, value)] = self.series.as_slice()
            && labels.is_empty()
        {
            let n = match *value {
                Number::Int(n) => n,
                Number::Float(f) => f as u64,
            };
            return if self.counter {
                ConstCounter::new(n).encode(out)
            } else {
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(out)
            };
        }
        let floats = self
            .series
            .iter()
            .any(|(_, v)| matches!(v, Number::Float(_)));
        if self.counter {
            let f = LabelledFamily::<Labels, Counter>::default();
            for (labels, value) in &self.series {
                if let Number::Int(n) = value {
                    f.get_or_create(labels).inc_by(*n);
                }
            }
            f.encode(out)
        } else if floats {
            let f = LabelledFamily::<Labels, Gauge<f64, AtomicU64>>::default();
            for (labels, value) in &self.series {
                let v = match *value {
                    Number::Int(n) => n as f64,
                    Number::Float(v) => v,
                };
                f.get_or_create(labels).set(v);
            }
            f.encode(out)
        } else {
            let f = LabelledFamily::<Labels, Gauge>::default();
            for (labels, value) in &self.series {
                if let Number::Int(n) = value {
                    f.get_or_create(labels)
                        .set(i64::try_from(*n).unwrap_or(i64::MAX));
                }
            }
            f.encode(out)
        }
    }
}

/// A latency histogram registered at start: name, help, the histogram.
pub type Timing = (&'static str, &'static str, Histogram);

/// The node's metrics: one registry (`mergeflow_*` and, once the network
/// has registered, `libp2p_*`), encoded at each scrape.
pub struct Metrics {
    registry: Mutex<Registry>,
    scraped: Arc<Mutex<Vec<Family>>>,
}

impl Metrics {
    /// The registry, with the latency histograms (in seconds) and the
    /// queues' depths, and a collector for the numbers read at scrape time.
    pub fn new(timings: Vec<Timing>, queues: Queues) -> Metrics {
        let mut root = Registry::default();
        let scraped = Arc::new(Mutex::new(Vec::new()));
        let ours = root.sub_registry_with_prefix("mergeflow");
        for (name, help, histogram) in timings {
            ours.register_with_unit(name, help, Unit::Seconds, histogram);
        }
        ours.register_collector(Box::new(AtScrape {
            scraped: scraped.clone(),
            queues,
        }));
        Metrics {
            registry: Mutex::new(root),
            scraped,
        }
    }

    /// The registry, for a part that registers its own metrics (libp2p's).
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The OpenMetrics text of the registry, with `families` as the numbers
    /// read at this scrape.
    pub fn render(&self, families: Vec<Family>) -> String {
        let registry = self.registry();
        let mut scraped = self.scraped.lock().unwrap_or_else(|p| p.into_inner());
        *scraped = families;
        drop(scraped);
        let mut out = String::new();
        encode_registry(&mut out, &registry).expect("writing to a String does not fail");
        encode_eof(&mut out).expect("writing to a String does not fail");
        out
    }
}

/// The collector of the numbers read at scrape time, and of queue depths.
#[derive(Debug)]
struct AtScrape {
    scraped: Arc<Mutex<Vec<Family>>>,
    queues: Queues,
}

impl Collector for AtScrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let families = self
            .scraped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for f in families.iter().chain(&self.queues.families()) {
            f.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// A queue's probe: its depth and capacity while it exists.
type Probe = Box<dyn Fn() -> Option<(usize, usize)> + Send + Sync>;

/// The node's bounded work queues, by name: what each holds now and can
/// hold, shown as `mergeflow_queue_depth{queue=...}` and
/// `mergeflow_queue_capacity{queue=...}` (queues of one name add up).
/// Cheap to clone; clones share the list.
#[derive(Clone, Default)]
pub struct Queues(Arc<Mutex<Vec<(&'static str, Probe)>>>);

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queues")
    }
}

impl Queues {
    /// A bounded channel named `name` that carries work, holding at most
    /// `capacity` (at least 1) messages; its depth shows in the metrics
    /// until every sender is gone.
    pub fn channel<T: Send + 'static>(
        &self,
        name: &'static str,
        capacity: usize,
    ) -> (mpsc::Sender<T>, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let weak = tx.downgrade();
        let probe: Probe = Box::new(move || {
            let tx = weak.upgrade()?;
            Some((tx.max_capacity() - tx.capacity(), tx.max_capacity()))
        });
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Queues made and dropped over time (one per peer link) must not
        // pile up between scrapes.
        list.retain(|(_, probe)| probe().is_some());
        list.push((name, probe));
        drop(list);
        (tx, rx)
    }

    /// Depth and capacity by queue name, of the queues that still exist
    /// (the others are forgotten here).
    pub fn depths(&self) -> Vec<(&'static str, usize, usize)> {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(&'static str, usize, usize)> = Vec::new();
        list.retain(|(name, probe)| {
            let Some((depth, cap)) = probe() else {
                return false;
            };
            match out.iter_mut().find(|(n, _, _)| n == name) {
                Some(e) => {
                    e.1 += depth;
                    e.2 += cap;
                }
                None => out.push((name, depth, cap)),
            }
            true
        });
        out
    }

    fn families(&self) -> Vec<Family> {
        let mut depth = Family::labelled_gauge("queue_depth", "Messages waiting in a work queue");
        let mut capacity = Family::labelled_gauge(
            "queue_capacity",
            "Messages a work queue holds at most (senders wait or drop past it)",
        );
        for (name, d, c) in self.depths() {
            depth.push(vec![("queue", name.into())], Number::Int(d as u64));
            capacity.push(vec![("queue", name.into())], Number::Int(c as u64));
        }
        vec![depth, capacity]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_queues_render_as_one_exposition() {
        let queues = Queues::default();
        let (tx, _rx) = queues.channel::<u8>("writer", 4);
        tx.try_send(1).unwrap();
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        let m = Metrics::new(vec![("write_duration", "Writes", h)], queues.clone());
        let mut peers = Family::labelled_counter("peer_messages", "Messages");
        peers.push(vec![("peer", "p1".into())], Number::Int(3));
        let text = m.render(vec![
            Family::gauge("docs", "Live documents", 7),
            Family::counter("flushes", "Flushes", 2),
            Family::gauge("store_size", "Size", 9).in_unit(Unit::Bytes),
            peers,
            Family::labelled_gauge("peer_connected", "Connected"),
        ]);
        for line in [
            "mergeflow_docs 7",
            "mergeflow_flushes_total 2",
            "mergeflow_store_size_bytes 9",
            "mergeflow_peer_messages_total{peer=\"p1\"} 3",
            "mergeflow_write_duration_seconds_count 1",
            "mergeflow_queue_depth{queue=\"writer\"} 1",
            "mergeflow_queue_capacity{queue=\"writer\"} 4",
            "# HELP mergeflow_docs Live documents.",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains("peer_connected"),
            "an empty family is not shown"
        );
        drop(tx);
        assert!(queues.depths().is_empty(), "a closed queue is forgotten");
    }
}
