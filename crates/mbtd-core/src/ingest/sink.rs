//! Where the rows of an inbox file go.
//!
//! [`super::process_file`] parses and hashes a file itself and hands the rows over in
//! chunks of at most [`CHUNK_ROWS`] rows or [`CHUNK_BYTES`] bytes of text, so that whoever
//! owns the store is busy for one chunk at a time, never for a whole file. The store
//! implements the trait directly (tests, `mbtd bench ingest`); the daemon implements it
//! with messages to the replay actor and runs the commit's fsyncs outside that actor.

use super::IngestError;
use crate::store::ReplayStore;
use crate::text::csv_rows::CsvRow;

/// Most rows handed over at once.
pub const CHUNK_ROWS: usize = 1024;
/// Most bytes of row text handed over at once (a single longer row is one chunk).
pub const CHUNK_BYTES: usize = 1 << 20;

/// What a [`RowSink`] call returns.
pub type SinkResult<T> = Result<T, IngestError>;

/// The receiving end of a file's rows: appends that stay invisible until the commit.
///
/// Contract: rows of one file are appended, then committed once; after any `Err` the
/// caller calls [`RowSink::abort`] (which forgets every row appended since the last
/// commit) and the file is processed again later.
pub trait RowSink {
    /// True when the file with this content hash is completely ingested (journal hit).
    fn is_committed(&mut self, hash: &[u8; 32]) -> SinkResult<bool>;

    /// Append rows of the file `hash` (rows the store already has are skipped). A row
    /// without a time (`CsvRow::time_ms` `None`) arrives at `ingest_ms`.
    fn append(&mut self, hash: &[u8; 32], rows: Vec<CsvRow>, ingest_ms: u64) -> SinkResult<()>;

    /// Make the appended rows durable and record the file as complete. Returns the rows
    /// of the file first made durable by this process (0 when it was complete already).
    fn commit(&mut self, hash: &[u8; 32], accepted: u64, rejected: u64) -> SinkResult<u64>;

    /// Forget every row appended since the last commit.
    fn abort(&mut self);
}

impl RowSink for ReplayStore {
    fn is_committed(&mut self, hash: &[u8; 32]) -> SinkResult<bool> {
        Ok(self.journal_entry(hash).is_some())
    }

    fn append(&mut self, hash: &[u8; 32], rows: Vec<CsvRow>, ingest_ms: u64) -> SinkResult<()> {
        for r in rows {
            let time = r.time_ms.unwrap_or(ingest_ms as i64);
            self.append_row(hash, r.line, &r.source, &r.body, time, ingest_ms)
                .map_err(|source| IngestError::Store { source })?;
        }
        Ok(())
    }

    fn commit(&mut self, hash: &[u8; 32], accepted: u64, rejected: u64) -> SinkResult<u64> {
        self.commit_file(hash, accepted, rejected)
            .map(|c| c.appended)
            .map_err(|source| IngestError::Store { source })
    }

    fn abort(&mut self) {
        // A failed rollback is retried by the store before its next write.
        let _ = self.abort_pending();
    }
}
