//! The checkpointer's internal events: each writes its log line and updates its metrics
//! together (see [`crate::telemetry::event`]).

use crate::telemetry::event::InternalEvent;
use crate::telemetry::names::{self, events};

/// A checkpoint was written.
pub struct CheckpointWritten<'a> {
    pub id: &'a str,
    pub step: u64,
    pub tag: Option<&'a str>,
    pub bytes: u64,
    pub seconds: f64,
}

impl InternalEvent for CheckpointWritten<'_> {
    fn emit(self) {
        tracing::info!(
            event = events::CHECKPOINT_WRITTEN,
            actor = "checkpointer",
            id = %self.id,
            step = self.step,
            tag = self.tag.unwrap_or(""),
            bytes = self.bytes,
            seconds = self.seconds
        );
        metrics::counter!(names::CHECKPOINTS_TOTAL).increment(1);
        metrics::gauge!(names::CHECKPOINT_WRITE_SECONDS).set(self.seconds);
        metrics::gauge!(names::CHECKPOINT_BYTES).set(self.bytes as f64);
    }
}

/// The first failure after a success (or after the start): the state changes to failing.
pub struct CheckpointFailing<'a> {
    pub step: u64,
    pub error: &'a str,
    pub disk_full: bool,
    pub retry_in_s: f64,
}

impl InternalEvent for CheckpointFailing<'_> {
    fn emit(self) {
        tracing::error!(
            event = events::CHECKPOINT_FAILING,
            actor = "checkpointer",
            step = self.step,
            disk_full = self.disk_full,
            retry_in_s = self.retry_in_s,
            error = %self.error,
            "checkpoint writes are failing; training and serving go on with the last good checkpoint, periodic writes back off and resume by themselves once they succeed"
        );
        metrics::counter!(names::CHECKPOINT_FAILURES_TOTAL).increment(1);
        metrics::gauge!(names::CHECKPOINT_FAILING).set(1.0);
        metrics::gauge!(names::CHECKPOINT_DISK_FULL).set(if self.disk_full { 1.0 } else { 0.0 });
    }
}

/// A further failure while already failing (rate-limited: `suppressed` failures were not
/// logged since the previous line).
pub struct CheckpointStillFailing<'a> {
    pub step: u64,
    pub error: &'a str,
    pub disk_full: bool,
    pub failures: u64,
    pub suppressed: u64,
    pub retry_in_s: f64,
}

impl InternalEvent for CheckpointStillFailing<'_> {
    fn emit(self) {
        tracing::warn!(
            event = events::CHECKPOINT_FAILED,
            actor = "checkpointer",
            step = self.step,
            disk_full = self.disk_full,
            failures = self.failures,
            suppressed = self.suppressed,
            retry_in_s = self.retry_in_s,
            error = %self.error,
            "checkpoint write failed again; previous checkpoints are intact"
        );
        metrics::counter!(names::CHECKPOINT_FAILURES_TOTAL).increment(1 + self.suppressed);
        metrics::gauge!(names::CHECKPOINT_DISK_FULL).set(if self.disk_full { 1.0 } else { 0.0 });
    }
}

/// A write succeeded after failures: the state changes back to ok.
pub struct CheckpointRecovered<'a> {
    pub id: &'a str,
    pub failing_for_s: f64,
    pub failures: u64,
}

impl InternalEvent for CheckpointRecovered<'_> {
    fn emit(self) {
        tracing::info!(
            event = events::CHECKPOINT_RECOVERED,
            actor = "checkpointer",
            id = %self.id,
            failing_for_s = self.failing_for_s,
            failures = self.failures,
            "checkpoint writes work again"
        );
        metrics::gauge!(names::CHECKPOINT_FAILING).set(0.0);
        metrics::gauge!(names::CHECKPOINT_DISK_FULL).set(0.0);
    }
}

/// A periodic write was not attempted: writes are failing and backing off.
pub struct CheckpointSkipped;

impl InternalEvent for CheckpointSkipped {
    fn emit(self) {
        metrics::counter!(names::CHECKPOINTS_SKIPPED_TOTAL).increment(1);
    }
}

/// The final checkpoint at shutdown failed.
pub struct FinalCheckpointFailed<'a> {
    pub step: u64,
    pub last_written: Option<(&'a str, u64)>,
    pub steps_lost: u64,
    pub error: &'a str,
}

impl InternalEvent for FinalCheckpointFailed<'_> {
    fn emit(self) {
        tracing::error!(
            event = events::CHECKPOINT_FINAL_FAILED,
            actor = "checkpointer",
            step = self.step,
            last_checkpoint = self.last_written.map_or("", |(id, _)| id),
            last_checkpoint_step = self.last_written.map_or(0, |(_, s)| s),
            steps_lost = self.steps_lost,
            error = %self.error,
            "the final checkpoint failed: the next start resumes from the last checkpoint written"
        );
        metrics::counter!(names::CHECKPOINT_FAILURES_TOTAL).increment(1);
    }
}

/// Retention ran after a write.
pub struct RetentionApplied<'a> {
    pub deleted: &'a [String],
    pub kept_bytes: u64,
    pub over_budget: bool,
    pub max_bytes: u64,
}

impl InternalEvent for RetentionApplied<'_> {
    fn emit(self) {
        let Self {
            deleted,
            kept_bytes,
            over_budget,
            max_bytes,
        } = self;
        if !deleted.is_empty() || over_budget {
            let ids = deleted.join(",");
            if over_budget {
                tracing::warn!(
                    event = events::CHECKPOINT_RETENTION,
                    actor = "checkpointer",
                    deleted = %ids,
                    kept_bytes,
                    max_bytes,
                    "checkpoints exceed checkpoints.max_bytes although only protected ones (LATEST, its parent, an undecided pre-expand, the newest operator-tagged) are left; raise max_bytes or delete tagged checkpoints"
                );
            } else {
                tracing::info!(
                    event = events::CHECKPOINT_RETENTION,
                    actor = "checkpointer",
                    deleted = %ids,
                    kept_bytes
                );
            }
        }
        metrics::counter!(names::CHECKPOINTS_DELETED_TOTAL).increment(deleted.len() as u64);
        metrics::gauge!(names::CHECKPOINTS_DISK_BYTES).set(kept_bytes as f64);
    }
}

/// Retention could not list or delete (it runs again after the next write).
pub struct RetentionFailed<'a> {
    pub error: &'a str,
}

impl InternalEvent for RetentionFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            event = events::CHECKPOINT_RETENTION,
            actor = "checkpointer",
            error = %self.error,
            "retention could not remove old checkpoints; it runs again after the next write"
        );
    }
}

/// An operator deleted checkpoints.
pub struct CheckpointsDeleted<'a> {
    pub name: &'a str,
    pub ids: &'a [String],
}

impl InternalEvent for CheckpointsDeleted<'_> {
    fn emit(self) {
        tracing::info!(
            event = events::CHECKPOINT_DELETED,
            actor = "checkpointer",
            name = %self.name,
            ids = %self.ids.join(",")
        );
        metrics::counter!(names::CHECKPOINTS_DELETED_TOTAL).increment(self.ids.len() as u64);
    }
}

/// A checkpoint was refused at resume (corrupt or partial).
pub struct CheckpointRejected<'a> {
    pub id: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for CheckpointRejected<'_> {
    fn emit(self) {
        tracing::error!(
            event = events::CHECKPOINT_REJECTED,
            actor = "checkpointer",
            id = %self.id,
            reason = %self.reason,
            "checkpoint is corrupt or partial; falling back to an older valid one"
        );
        metrics::counter!(names::CHECKPOINTS_REJECTED_TOTAL).increment(1);
    }
}
