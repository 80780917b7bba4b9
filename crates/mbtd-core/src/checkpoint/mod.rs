//! Checkpoint format: atomic checkpoint directories, integrity checks, resume, retention.
//!
//! Layout under the checkpoint root:
//! ```text
//! checkpoints/
//!   LATEST                      "<id>\n", replaced atomically after each complete write
//!   <id>/manifest.json          see [`manifest`]: version, state, blake3 + size of every file
//!   <id>/model.safetensors      (the files are opaque here: the caller passes the bytes)
//!   <id>/optimizer.safetensors
//!   <id>/tokenizer.json
//!   .tmp-<id>/                  a write in progress (removed on the next start)
//! ```
//! A checkpoint is visible under its id only once all its files and the directory are on
//! disk (temp dir, fsync every file and the dir, rename, fsync root). `LATEST` is then
//! replaced by temp file + fsync + rename + fsync root.

pub mod durable;
pub mod manifest;
pub mod retention;
pub mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use durable::{FaultPlan, WriteStep};
pub use manifest::{FORMAT_VERSION, FileEntry, MANIFEST_FILE, Manifest, new_id};
pub use retention::{RetentionPolicy, apply_retention, plan_retention};
pub use store::{
    CheckpointInfo, CheckpointList, CheckpointSummary, FileCheck, Inspection, LoadedCheckpoint,
    Rejected, Resume, TensorSummary, inspect, list, load_checkpoint, open_latest, read_latest,
    repair_latest, set_latest, write_checkpoint, write_checkpoint_with_faults,
};

/// Errors of the checkpoint module. Each names the path and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A step of a write failed; nothing of this write is visible and LATEST is unchanged.
    #[error(
        "checkpoint write failed at step '{step}' on {path}: {source}; previous checkpoints and LATEST are unchanged; free disk space or fix permissions and retry"
    )]
    Write {
        /// The step that failed.
        step: WriteStep,
        /// The path it worked on.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The caller passed something that cannot be written.
    #[error("cannot write checkpoint: {0}")]
    InvalidInput(String),
    /// A checkpoint with this id already exists.
    #[error("checkpoint {path} already exists; make a fresh id with checkpoint::new_id")]
    AlreadyExists {
        /// The existing directory.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The manifest is unreadable, corrupted or inconsistent.
    #[error("bad manifest {path}: {reason}; the checkpoint is unusable, use an older one")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The format version is not the one this build reads.
    #[error(
        "checkpoint {path} has format version {found}, this build reads version {supported}; use the mbtd release that wrote it"
    )]
    Version {
        /// The manifest file.
        path: PathBuf,
        /// Version in the manifest.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A file listed in the manifest is missing.
    #[error(
        "checkpoint file {path} is missing (listed in the manifest); the checkpoint is incomplete, use an older one"
    )]
    FileMissing {
        /// The missing file.
        path: PathBuf,
    },
    /// A file has the wrong size.
    #[error(
        "checkpoint file {path} has {actual} bytes, the manifest says {expected}; the file is truncated or corrupted, use an older checkpoint"
    )]
    FileSize {
        /// The file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file's content does not match its blake3.
    #[error(
        "checkpoint file {path} is corrupted: blake3 {actual}, the manifest says {expected}; use an older checkpoint"
    )]
    FileHash {
        /// The file.
        path: PathBuf,
        /// Hash in the manifest.
        expected: String,
        /// Hash of the content.
        actual: String,
    },
    /// A file-system operation outside a write (cleanup, retention, LATEST) failed.
    #[error("{op} {path} failed: {source}")]
    Fs {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Checkpoint settings (`[checkpoint]` in the daemon config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many optimizer steps (0 = not by steps).
    pub every_steps: u64,
    /// Write a checkpoint at least every this many seconds of training (0 = not by time).
    pub every_seconds: u64,
    /// Keep the newest N valid checkpoints.
    pub keep_last: usize,
    /// Also keep the newest checkpoint of each of the last N UTC days (0 = none).
    pub keep_daily: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_steps: 1000,
            every_seconds: 600,
            keep_last: 5,
            keep_daily: 7,
        }
    }
}

impl CheckpointConfig {
    /// Checks every field; the error names the field and its allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if self.every_steps == 0 && self.every_seconds == 0 {
            return Err(
                "checkpoint.every_steps and checkpoint.every_seconds are both 0: set at least one to >= 1"
                    .to_string(),
            );
        }
        if self.every_seconds > 7 * 86_400 {
            return Err(format!(
                "checkpoint.every_seconds = {} is out of range: allowed 0..=604800 (one week)",
                self.every_seconds
            ));
        }
        if !(1..=10_000).contains(&self.keep_last) {
            return Err(format!(
                "checkpoint.keep_last = {} is out of range: allowed 1..=10000",
                self.keep_last
            ));
        }
        if self.keep_daily > 3650 {
            return Err(format!(
                "checkpoint.keep_daily = {} is out of range: allowed 0..=3650",
                self.keep_daily
            ));
        }
        Ok(())
    }

    /// The retention rule of this config.
    pub fn retention(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            keep_daily: self.keep_daily,
        }
    }

    /// Whether a checkpoint is due: `steps_since` steps and `secs_since` seconds after the
    /// last one (a trigger set to 0 never fires).
    pub fn is_due(&self, steps_since: u64, secs_since: f64) -> bool {
        (self.every_steps > 0 && steps_since >= self.every_steps)
            || (self.every_seconds > 0
                && steps_since > 0
                && secs_since >= self.every_seconds as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_validate_and_name_fields() {
        let c = CheckpointConfig::default();
        assert!(c.validate().is_ok());
        let bad = CheckpointConfig {
            keep_last: 0,
            ..c.clone()
        };
        assert!(bad.validate().unwrap_err().contains("checkpoint.keep_last"));
        let bad = CheckpointConfig {
            every_steps: 0,
            every_seconds: 0,
            ..c.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("checkpoint.every_steps")
        );
        let bad = CheckpointConfig {
            keep_daily: 10_000,
            ..c.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("checkpoint.keep_daily")
        );
        let parsed: CheckpointConfig = toml::from_str("keep_last = 3").unwrap();
        assert_eq!(parsed.keep_last, 3);
        assert_eq!(parsed.every_steps, c.every_steps);
        assert!(toml::from_str::<CheckpointConfig>("keep = 3").is_err());
    }

    #[test]
    fn due_by_steps_or_time() {
        let c = CheckpointConfig {
            every_steps: 100,
            every_seconds: 60,
            ..Default::default()
        };
        assert!(!c.is_due(99, 10.0));
        assert!(c.is_due(100, 10.0));
        assert!(c.is_due(1, 60.0));
        assert!(!c.is_due(0, 3600.0), "no new steps, nothing to save");
        let steps_only = CheckpointConfig {
            every_seconds: 0,
            ..c
        };
        assert!(!steps_only.is_due(5, 1e9));
    }
}
