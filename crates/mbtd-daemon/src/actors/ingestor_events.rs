//! Internal events of the ingestor: log line and metric together (see
//! [`crate::telemetry::event`]). A blocked ingestion is reported once when it starts and
//! once when it ends; retries in between go through a [`RateLimit`].
//!
//! [`RateLimit`]: crate::telemetry::event::RateLimit

use std::time::Duration;

use crate::telemetry::event::InternalEvent;
use crate::telemetry::names::{self, events};

fn cause(disk_full: bool) -> &'static str {
    if disk_full { "disk_full" } else { "other" }
}

/// Ingestion stops: a file could not be stored; it stays in the inbox and is retried
/// after `retry_in`.
pub struct IngestBlocked<'a> {
    pub file: &'a str,
    pub error: &'a str,
    pub disk_full: bool,
    pub retry_in: Duration,
}

impl InternalEvent for IngestBlocked<'_> {
    fn emit(self) {
        let what = if self.disk_full {
            "disk full: ingestion blocked, files wait in the inbox; free space and it resumes by itself"
        } else {
            "ingestion failed; the file stays in the inbox and is retried with back-off"
        };
        tracing::error!(
            event = events::INGEST_BLOCKED,
            actor = "ingestor",
            file = self.file,
            error = self.error,
            retry_in_ms = self.retry_in.as_millis() as u64,
            "{what}"
        );
        metrics::gauge!(names::INGEST_BLOCKED_DISK_FULL).set(if self.disk_full {
            1.0
        } else {
            0.0
        });
        metrics::counter!(names::INGEST_ATTEMPTS_FAILED_TOTAL, "cause" => cause(self.disk_full))
            .increment(1);
    }
}

/// A retry while blocked failed again (emitted through a rate limit).
pub struct IngestStillBlocked<'a> {
    pub file: &'a str,
    pub error: &'a str,
    pub disk_full: bool,
    pub retry_in: Duration,
    /// Failed retries not logged since the last line.
    pub suppressed: u64,
}

impl InternalEvent for IngestStillBlocked<'_> {
    fn emit(self) {
        tracing::warn!(
            event = events::INGEST_STILL_BLOCKED,
            actor = "ingestor",
            file = self.file,
            error = self.error,
            disk_full = self.disk_full,
            retry_in_ms = self.retry_in.as_millis() as u64,
            suppressed = self.suppressed,
            "ingestion still blocked"
        );
        metrics::gauge!(names::INGEST_BLOCKED_DISK_FULL).set(if self.disk_full {
            1.0
        } else {
            0.0
        });
    }
}

/// A failed retry that is not logged (held back by the rate limit): the metric only.
pub struct IngestRetryFailed {
    pub disk_full: bool,
}

impl InternalEvent for IngestRetryFailed {
    fn emit(self) {
        metrics::counter!(names::INGEST_ATTEMPTS_FAILED_TOTAL, "cause" => cause(self.disk_full))
            .increment(1);
    }
}

/// Ingestion runs again.
pub struct IngestUnblocked {
    pub blocked_for: Duration,
    pub failed_attempts: u64,
}

impl InternalEvent for IngestUnblocked {
    fn emit(self) {
        tracing::info!(
            event = events::INGEST_UNBLOCKED,
            actor = "ingestor",
            blocked_for_ms = self.blocked_for.as_millis() as u64,
            failed_attempts = self.failed_attempts,
            "ingestion resumed"
        );
        metrics::gauge!(names::INGEST_BLOCKED_DISK_FULL).set(0.0);
    }
}
