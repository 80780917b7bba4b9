//! The process-wide `metrics` recorder: an in-memory registry of counters and gauges that
//! the metrics actor snapshots for `ctl metrics` and the periodic log line, optionally fanned
//! out to a Prometheus recorder.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use metrics_util::registry::{AtomicStorage, Registry};
use serde::Serialize;

/// Relative error of the quantiles of a histogram (DDSketch `alpha`): a reported quantile
/// `q̂` of the true value `q` satisfies `|q̂ - q| <= 0.01·q`.
const QUANTILE_ALPHA: f64 = 0.01;
/// Most buckets one histogram's sketch keeps (8 bytes each): bounded memory, whatever the
/// number of samples. With α = 0.01 that covers values over 17 orders of magnitude.
const QUANTILE_MAX_BUCKETS: u32 = 2048;
/// Values below this (in the metric's unit) count as 0.
const QUANTILE_MIN_VALUE: f64 = 1e-9;

/// A histogram kept as its last value, its count, its sum and a quantile sketch
/// (`metrics_util::storage::Summary`, a DDSketch of bounded size).
#[derive(Debug)]
struct Summary {
    last: AtomicU64,
    count: AtomicU64,
    sum: AtomicU64,
    sketch: std::sync::Mutex<metrics_util::storage::Summary>,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            last: AtomicU64::default(),
            count: AtomicU64::default(),
            sum: AtomicU64::default(),
            sketch: std::sync::Mutex::new(metrics_util::storage::Summary::new(
                QUANTILE_ALPHA,
                QUANTILE_MAX_BUCKETS,
                QUANTILE_MIN_VALUE,
            )),
        }
    }
}

impl HistogramFn for Summary {
    fn record(&self, value: f64) {
        self.last.store(value.to_bits(), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((f64::from_bits(s) + value).to_bits())
            });
        self.sketch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(value);
    }
}

impl Summary {
    /// (suffix, value) of p50, p90, p99 and max; empty before the first sample.
    fn quantiles(&self) -> Vec<(&'static str, f64)> {
        let sk = self.sketch.lock().unwrap_or_else(|e| e.into_inner());
        if sk.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<(&'static str, f64)> = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)]
            .into_iter()
            .filter_map(|(name, q)| sk.quantile(q).map(|v| (name, v)))
            .collect();
        out.push(("max", sk.max()));
        out
    }
}

/// Counters and gauges in lock-free atomic storage, histograms as [`Summary`].
#[derive(Clone)]
pub struct SnapshotRecorder {
    registry: Arc<Registry<Key, AtomicStorage>>,
    summaries: Arc<std::sync::RwLock<BTreeMap<Key, Arc<Summary>>>>,
}

impl Default for SnapshotRecorder {
    fn default() -> Self {
        Self {
            registry: Arc::new(Registry::atomic()),
            summaries: Arc::default(),
        }
    }
}

/// One metric value in a snapshot.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum MetricValue {
    Counter(u64),
    Gauge(f64),
}

impl MetricValue {
    pub fn as_f64(&self) -> f64 {
        match *self {
            MetricValue::Counter(c) => c as f64,
            MetricValue::Gauge(g) => g,
        }
    }
}

/// A point-in-time copy of every metric, keyed by `name{label="v",…}`.
pub type Snapshot = BTreeMap<String, MetricValue>;

fn render_key(key: &Key) -> String {
    let mut labels: Vec<_> = key
        .labels()
        .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
        .collect();
    if labels.is_empty() {
        return key.name().to_string();
    }
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl SnapshotRecorder {
    /// Copies every metric. Histograms appear as `name` (last value), `name_count`, `name_sum`
    /// and, once they have a sample, `name_p50`, `name_p90`, `name_p99`, `name_max` (since
    /// the start, within 1 % of the true quantiles).
    pub fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::new();
        self.registry.visit_counters(|k, c| {
            out.insert(
                render_key(k),
                MetricValue::Counter(c.load(Ordering::Relaxed)),
            );
        });
        self.registry.visit_gauges(|k, g| {
            out.insert(
                render_key(k),
                MetricValue::Gauge(f64::from_bits(g.load(Ordering::Relaxed))),
            );
        });
        let summaries = self.summaries.read().unwrap_or_else(|e| e.into_inner());
        for (k, s) in summaries.iter() {
            let name = render_key(k);
            let (base, labels) = match name.find('{') {
                Some(i) => (&name[..i], &name[i..]),
                None => (name.as_str(), ""),
            };
            out.insert(
                name.clone(),
                MetricValue::Gauge(f64::from_bits(s.last.load(Ordering::Relaxed))),
            );
            out.insert(
                format!("{base}_count{labels}"),
                MetricValue::Counter(s.count.load(Ordering::Relaxed)),
            );
            out.insert(
                format!("{base}_sum{labels}"),
                MetricValue::Gauge(f64::from_bits(s.sum.load(Ordering::Relaxed))),
            );
            for (suffix, v) in s.quantiles() {
                out.insert(format!("{base}_{suffix}{labels}"), MetricValue::Gauge(v));
            }
        }
        out
    }
}

impl Recorder for SnapshotRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut map = self.summaries.write().unwrap_or_else(|e| e.into_inner());
        let s = map.entry(key.clone()).or_default().clone();
        Histogram::from_arc(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sees_counters_gauges_and_histograms_with_labels() {
        let rec = SnapshotRecorder::default();
        metrics::with_local_recorder(&rec, || {
            metrics::counter!("c_total", "actor" => "x").increment(3);
            metrics::gauge!("g").set(1.5);
            metrics::histogram!("h_seconds").record(2.0);
            metrics::histogram!("h_seconds").record(4.0);
        });
        let s = rec.snapshot();
        assert_eq!(s["c_total{actor=\"x\"}"], MetricValue::Counter(3));
        assert_eq!(s["g"], MetricValue::Gauge(1.5));
        assert_eq!(s["h_seconds"], MetricValue::Gauge(4.0));
        assert_eq!(s["h_seconds_count"], MetricValue::Counter(2));
        assert_eq!(s["h_seconds_sum"], MetricValue::Gauge(6.0));
        assert_eq!(s["h_seconds_max"], MetricValue::Gauge(4.0));
        assert!(!s.contains_key("g_p50"));
    }

    #[test]
    fn histogram_quantiles_are_within_one_percent() {
        let rec = SnapshotRecorder::default();
        metrics::with_local_recorder(&rec, || {
            // 1 ms … 1000 ms, one sample each: p50 = 500 ms, p90 = 900 ms, p99 = 990 ms.
            for i in 1..=1000 {
                metrics::histogram!("step_seconds", "layer" => "0").record(i as f64 * 1e-3);
            }
        });
        let s = rec.snapshot();
        for (name, want) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)] {
            let got = s[&format!("step_seconds_{name}{{layer=\"0\"}}")].as_f64();
            assert!(
                (got - want).abs() <= 0.011 * want,
                "{name}: {got} vs {want}"
            );
        }
        assert_eq!(
            s["step_seconds_count{layer=\"0\"}"],
            MetricValue::Counter(1000)
        );
    }
}
