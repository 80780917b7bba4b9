//! The replay store: durable, append-only storage of ingested rows, with an ingest
//! journal for exactly-once ingestion, a bounded size kept by uniform eviction, a
//! held-out control slice and O(1) sampling for the trainer.
//!
//! Layout of `replay/`:
//! - `seg-NNNNNNNNNN.log` — append-only segments of CRC'd records ([`format`]).
//! - `journal.log` — one entry per completely ingested file ([`journal`]).
//! - `state.bin` — store identity and eviction state ([`state`]).
//!
//! Exactly-once ingestion: the rows of a file are appended, the segments and the
//! directory fsynced, and only then the journal entry for the file's blake3 hash is
//! written. When a file is processed again: a journal hit skips every row; otherwise
//! rows whose (file hash, row number) is already in the store are skipped. So a crash
//! at any point adds no duplicate and loses no row.

pub mod fault;
pub mod format;
pub mod fsutil;
pub mod inspect;
pub mod journal;
pub mod replay;
pub mod state;

use crate::config::{FieldError, Section};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use format::Record;
pub use inspect::{InspectReport, inspect_replay};
pub use journal::JournalEntry;
pub use replay::{
    AppendSummary, CommitSummary, ControlGroup, Era, EvictionReport, PendingSync, RecoveryReport,
    ReplayStats, ReplayStore,
};

/// Errors of the replay store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("replay store: {what} failed for {path}: {source}; check free space and permissions")]
    Io {
        /// The operation.
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the store cannot be used.
    #[error("replay store: {path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The configuration is invalid.
    #[error("replay config: {0}")]
    Config(FieldError),
    /// A commit's fsyncs were prepared for a different state of the store.
    #[error(
        "replay store {}: a commit does not match the store's pending rows (the store was reopened, or rows were appended or rolled back meanwhile); the file is processed again",
        dir.display()
    )]
    StaleCommit {
        /// The replay directory.
        dir: PathBuf,
    },
    /// A row is too large for the record format.
    #[error(
        "replay store: row {row} of source `{source_tag}` has {bytes} bytes, more than the record limit of {max}; lower ingest.max_row_bytes"
    )]
    RowTooLarge {
        /// Row number.
        row: u64,
        /// Source tag.
        source_tag: String,
        /// Encoded bytes.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

impl StoreError {
    /// True when the cause is a full file system (`ENOSPC`, `EDQUOT`): an expected
    /// condition that clears when space is freed.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if fault::is_disk_full(source))
    }
}

/// How the trainer's default sampler picks rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SamplingMode {
    /// Every training row equally likely.
    #[default]
    Uniform,
    /// Recent rows favoured by `recent_bias` (see [`ReplayStore::sample_recent`]).
    Recent,
}

/// Configuration of the replay store (`[replay]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// A segment is rolled when it would exceed this many bytes (1 KiB ..= 1 GiB).
    pub segment_bytes: u64,
    /// Most rows kept (control rows included; only training rows are evicted), >= 1.
    pub max_rows: u64,
    /// Most record bytes kept (frames included), >= 4096.
    pub max_bytes: u64,
    /// Share of rows held out as the control slice, by content hash (0.0 ..= 0.5).
    /// Fixed when the store is created (recorded in `state.bin`).
    pub control_fraction: f64,
    /// Default sampler: `uniform` or `recent`.
    pub sampling: SamplingMode,
    /// Bias of the `recent` sampler (0.0 ..= 50.0): the newest row is `e^bias` times as
    /// likely as the oldest.
    pub recent_bias: f64,
    /// Seed of the eviction keys. Fixed when the store is created.
    pub seed: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_rows: 5_000_000,
            max_bytes: 4 << 30,
            control_fraction: 0.05,
            sampling: SamplingMode::Uniform,
            recent_bias: 2.0,
            seed: 0x6d62_7464,
        }
    }
}

impl Section for ReplayConfig {
    const NAME: &'static str = "replay";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("segment_bytes", self.segment_bytes, 1024, 1 << 30)?;
        Self::require("max_rows", self.max_rows, self.max_rows >= 1, ">= 1")?;
        Self::require(
            "max_bytes",
            self.max_bytes,
            self.max_bytes >= 4096,
            ">= 4096",
        )?;
        Self::in_range("control_fraction", self.control_fraction, 0.0, 0.5)?;
        Self::in_range("recent_bias", self.recent_bias, 0.0, 50.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_validate_and_bad_fields_are_named() {
        ReplayConfig::default().validate().unwrap();
        let bad = ReplayConfig {
            control_fraction: 0.9,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("control_fraction")
        );
        let bad = ReplayConfig {
            segment_bytes: 10,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("segment_bytes")
        );
        let parsed: ReplayConfig = toml::from_str("max_rows = 7\nsampling = \"recent\"").unwrap();
        assert_eq!(parsed.max_rows, 7);
        assert_eq!(parsed.sampling, SamplingMode::Recent);
        assert!(toml::from_str::<ReplayConfig>("nope = 1").is_err());
    }
}
