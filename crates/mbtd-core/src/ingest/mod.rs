//! Inbox processing (synchronous core of the ingestor actor).
//!
//! - [`select`]: which inbox entries are complete and ready (pure).
//! - [`process`]: one file → durable rows in the replay store → the file moved to
//!   `inbox/.done/` (or `inbox/.failed/`) with a JSON sidecar ([`sidecar`]).
//! - [`sink`]: where the rows go ([`RowSink`]: the store itself, or the replay actor).
//! - [`bench`]: `mbtd bench ingest`.
//!
//! How the ingestor actor drives it (all calls blocking; it runs them in
//! `spawn_blocking`, the rows going to the replay actor in chunks):
//! 1. on a watcher event or every `rescan_ms`: `list_inbox` → `select_candidates`
//!    (carry the returned [`ScanMemory`]; pass names seen renamed into the inbox and
//!    names a writer still has open);
//! 2. for each ready name, oldest first: `process_file_resuming(inbox, inbox/name, sink,
//!    cfg, progress)`; an `Err` leaves the file for a retry ([`IngestError::is_disk_full`]:
//!    after a back-off; [`IngestError::Changed`]: once it settles again);
//! 3. after each file: `store.enforce_capacity(trainer_cursor_seq)` to keep
//!    `max_rows` / `max_bytes` (only rows the trainer has consumed are evicted).

pub mod bench;
pub mod process;
pub mod select;
pub mod sidecar;
pub mod sink;

use crate::config::{FieldError, Section};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use bench::{BenchIngestArgs, bench_ingest};
pub use process::{Progress, process_file, process_file_resuming};
pub use select::{EntryKind, InboxEntry, ScanMemory, Selection, list_inbox, select_candidates};
pub use sidecar::{FileOutcome, Outcome, Sidecar, Timings};
pub use sink::{RowSink, SinkResult};

use crate::store::StoreError;

/// Errors of inbox processing. A file that is refused is not an error (it goes to
/// `.failed/`); these are conditions where the file stays in the inbox for a retry.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// An I/O operation failed.
    #[error(
        "ingest: {what} failed for {path}: {source}; check permissions and free space, the file stays in the inbox for a retry"
    )]
    Io {
        /// The operation.
        what: String,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The replay store failed.
    #[error("ingest: {source}; the file stays in the inbox for a retry")]
    Store {
        /// The store error.
        #[source]
        source: StoreError,
    },
    /// The replay store cannot be reached (its actor is restarting or stopped).
    #[error(
        "ingest: the replay store is not reachable ({detail}); the file stays in the inbox for a retry"
    )]
    StoreUnavailable {
        /// What the messaging layer said.
        detail: String,
    },
    /// The file changed while it was read: a writer is still appending to it.
    #[error(
        "ingest: {path} changed while it was read (a writer is still appending); rows read were rolled back, the file is taken again once it has settled"
    )]
    Changed {
        /// The inbox file.
        path: PathBuf,
    },
    /// The path is not something `process_file` handles (directory, no file name).
    #[error(
        "ingest: {path} is not a processable inbox file ({why}); candidate selection should not offer it"
    )]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Invalid configuration.
    #[error("ingest config: {0}")]
    Config(String),
}

impl IngestError {
    /// True when the cause is a full file system (`ENOSPC`, `EDQUOT`) in the store or
    /// the inbox: an expected condition that clears when space is freed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            IngestError::Io { source, .. } => crate::store::fault::is_disk_full(source),
            IngestError::Store { source } => source.is_disk_full(),
            _ => false,
        }
    }

    /// True when the file itself vanished (removed or moved by someone else): nothing to
    /// retry.
    pub fn is_gone(&self) -> bool {
        matches!(self, IngestError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Configuration of inbox processing (`[ingest]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A file is ready when its size and mtime have not changed for this long (ms,
    /// 0 ..= 600000). A file renamed into the inbox is ready at once.
    pub settle_ms: u64,
    /// Period of the safety rescan of the inbox (ms, 100 ..= 3600000).
    pub rescan_ms: u64,
    /// Larger files are refused (bytes, 1 ..= 64 GiB).
    pub max_file_bytes: u64,
    /// Larger rows are rejected (bytes of field data, 16 ..= 256 MiB).
    pub max_row_bytes: u64,
    /// Scheduling niceness of the thread that parses, hashes and fsyncs a file (0 ..= 19,
    /// Linux). Above 0 it yields the CPU to training, so a large file arriving does not
    /// slow the trainer's steps; ingestion then takes the cores training leaves.
    pub nice: u8,
    /// Share of one core, in percent (1 ..= 100), that storing an arriving file's rows may
    /// take: after each chunk the ingestion thread waits `(100 − p)/p` times as long as the
    /// store took, so the store's work (at normal priority, beside the trainer's asks)
    /// stays near `p` % of a core. 100 = no waiting (fastest ingestion).
    pub store_share_pct: u8,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            settle_ms: 500,
            rescan_ms: 2000,
            max_file_bytes: 256 << 20,
            max_row_bytes: 1 << 20,
            nice: 19,
            store_share_pct: 10,
        }
    }
}

impl Section for IngestConfig {
    const NAME: &'static str = "ingest";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("settle_ms", self.settle_ms, 0, 600_000)?;
        Self::in_range("rescan_ms", self.rescan_ms, 100, 3_600_000)?;
        Self::in_range("max_file_bytes", self.max_file_bytes, 1, 64 << 30)?;
        Self::in_range("max_row_bytes", self.max_row_bytes, 16, 256 << 20)?;
        Self::in_range("nice", self.nice, 0, 19)?;
        Self::in_range("store_share_pct", self.store_share_pct, 1, 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_validate_and_errors_name_the_field() {
        IngestConfig::default().validate().unwrap();
        let bad = IngestConfig {
            max_row_bytes: 1,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_row_bytes")
        );
        let bad = IngestConfig {
            nice: 20,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err();
        assert_eq!((e.field.as_str(), e.value.as_str()), ("ingest.nice", "20"));
        assert_eq!(e.allowed, "0 ..= 19");
        let c: IngestConfig = toml::from_str("settle_ms = 10").unwrap();
        assert_eq!((c.settle_ms, c.rescan_ms), (10, 2000));
        assert!(toml::from_str::<IngestConfig>("settle = 10").is_err());
    }
}
