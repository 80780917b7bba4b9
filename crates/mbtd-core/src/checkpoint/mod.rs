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
//!
//! Modules: [`format`] writes, verifies and loads; [`listing`] lists from manifests and
//! deletes; [`retention`] plans what to delete; [`inspect`] is the offline check;
//! [`table`] renders the listing and the inspection for people.

pub mod durable;
pub mod format;
pub mod inspect;
pub mod listing;
pub mod manifest;
pub mod retention;
pub mod table;
#[cfg(test)]
mod testutil;

use crate::config::{FieldError, Section};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use durable::{FaultPlan, WriteStep};
pub use format::{
    CheckpointInfo, LATEST_FILE, LoadedCheckpoint, Rejected, Resume, load_checkpoint, open_latest,
    read_latest, repair_latest, set_latest, write_checkpoint, write_checkpoint_with_faults,
};
pub use inspect::{FileCheck, Inspection, TensorSummary, inspect};
pub use listing::{
    CheckpointList, CheckpointSummary, delete, list, remove_checkpoints, resume_manifest,
};
pub use manifest::{
    AUTOMATIC_TAGS, FORMAT_VERSION, FileEntry, MANIFEST_FILE, Manifest, TAG_PRE_EXPAND,
    TAG_SHUTDOWN, new_id, validate_tag,
};
pub use retention::{RetentionPlan, RetentionPolicy, plan_retention};

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
    /// Too little free space to write a checkpoint and keep the reserve.
    #[error(
        "not enough free space for a checkpoint under {root}: {free} bytes free, the checkpoint needs about {needed} and checkpoints.min_free_bytes keeps {reserve} in reserve; free disk space, lower checkpoints.max_bytes or keep_last, or move paths.checkpoints"
    )]
    DiskFull {
        /// The checkpoint root.
        root: PathBuf,
        /// Bytes available to the daemon.
        free: u64,
        /// Estimated size of the checkpoint.
        needed: u64,
        /// `checkpoints.min_free_bytes`.
        reserve: u64,
    },
    /// No checkpoint matches what an operator named.
    #[error("no checkpoint `{name}`: {why}; `mbtd ctl checkpoints` lists them")]
    NotFound {
        /// The id, tag or keyword given.
        name: String,
        /// Why nothing matched.
        why: String,
    },
    /// Deleting this checkpoint would break resume or a pending rollback.
    #[error(
        "checkpoint {id} is not deleted: it is LATEST, LATEST's parent, or the pre-expansion checkpoint of an undecided expansion; roll back or wait for the expansion's outcome first"
    )]
    Protected {
        /// Its id.
        id: String,
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

impl CheckpointError {
    /// `map_err` adapter for a filesystem step: `.map_err(CheckpointError::fs("fsync", dir))`.
    pub fn fs(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Fs { op, path, source }
    }

    /// Whether this failure means the disk (or quota) is full: an expected condition the
    /// daemon reports and retries, not a bug.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::DiskFull { .. } => true,
            Self::Write { source, .. } | Self::Fs { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }
}

/// Bytes available to an unprivileged writer on the filesystem holding `path` (the nearest
/// existing ancestor when `path` does not exist yet).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => q,
            _ => Path::new("."),
        };
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs(3) writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The field types are u32 or u64 depending on the platform.
    #[allow(clippy::useless_conversion)]
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

/// Refuses a write of about `needed` bytes under `root` that would leave less than
/// `reserve` bytes free ([`CheckpointError::DiskFull`]). A `reserve` of 0 checks nothing.
pub fn check_free_space(root: &Path, needed: u64, reserve: u64) -> Result<(), CheckpointError> {
    if reserve == 0 {
        return Ok(());
    }
    let free = free_bytes(root).map_err(CheckpointError::fs("statvfs", root))?;
    if free < needed.saturating_add(reserve) {
        return Err(CheckpointError::DiskFull {
            root: root.to_path_buf(),
            free,
            needed,
            reserve,
        });
    }
    Ok(())
}

/// Checkpoint settings (`[checkpoints]` in the daemon config).
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
    /// Keep the newest N operator-tagged checkpoints (`ctl checkpoint --tag`), even over
    /// `max_bytes`; older tagged ones are retained like untagged ones.
    pub keep_tagged: usize,
    /// Keep the newest N `pre-expand` checkpoints of expansions already kept or rolled back
    /// (the one of an undecided expansion is always kept).
    pub keep_decided_pre_expand: usize,
    /// Budget for all checkpoints together, bytes; retention deletes the oldest unprotected
    /// ones beyond it (0 = no budget).
    pub max_bytes: u64,
    /// Free space to leave on the checkpoints' filesystem: a checkpoint that would leave less
    /// is not written (reported like a full disk). 0 = no check.
    pub min_free_bytes: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_steps: 1000,
            every_seconds: 600,
            keep_last: 5,
            keep_daily: 7,
            keep_tagged: 20,
            keep_decided_pre_expand: 2,
            max_bytes: 16 << 30,
            min_free_bytes: 256 << 20,
        }
    }
}

impl Section for CheckpointConfig {
    const NAME: &'static str = "checkpoints";

    fn validate(&self) -> Result<(), FieldError> {
        Self::require(
            "every_seconds",
            self.every_seconds,
            self.every_steps > 0 || self.every_seconds > 0,
            ">= 1 when checkpoints.every_steps = 0 (set at least one of them)",
        )?;
        Self::require(
            "every_seconds",
            self.every_seconds,
            self.every_seconds <= 7 * 86_400,
            "0 ..= 604800 (one week)",
        )?;
        Self::in_range("keep_last", self.keep_last, 1, 10_000)?;
        Self::in_range("keep_daily", self.keep_daily, 0, 3650)?;
        Self::in_range("keep_tagged", self.keep_tagged, 0, 10_000)?;
        Self::in_range(
            "keep_decided_pre_expand",
            self.keep_decided_pre_expand,
            0,
            100,
        )
    }
}

impl CheckpointConfig {
    /// The retention rule of this config.
    pub fn retention(&self) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: self.keep_last,
            keep_daily: self.keep_daily,
            keep_tagged: self.keep_tagged,
            keep_decided_pre_expand: self.keep_decided_pre_expand,
            max_bytes: self.max_bytes,
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
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("checkpoints.keep_last")
        );
        let bad = CheckpointConfig {
            every_steps: 0,
            every_seconds: 0,
            ..c.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("checkpoints.every_steps")
        );
        let bad = CheckpointConfig {
            keep_daily: 10_000,
            ..c.clone()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("checkpoints.keep_daily")
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
