//! Telemetry: the one place that names every metric and log event, the in-memory recorder,
//! the metrics history file, and log set-up.

pub mod event;
pub mod history;
pub mod logging;
pub mod names;
pub mod rate;
pub mod recorder;

pub use recorder::{MetricValue, Snapshot, SnapshotRecorder};
