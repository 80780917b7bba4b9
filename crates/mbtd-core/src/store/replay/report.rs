//! What the replay store reports: recovery at open, appends, eviction, counters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::format::Record;
use crate::store::journal::{JournalEntry, JournalScan};
use crate::text::csv_rows::RowKind;

/// Arrival era of a control row relative to a boundary sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Era {
    /// `seq < boundary`.
    Old,
    /// `seq >= boundary`.
    New,
}

/// Control rows of one source and era.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlGroup {
    /// Source tag.
    pub source: String,
    /// Era.
    pub era: Era,
    /// All control rows of this group in the store.
    pub total_rows: u64,
    /// The first `max_per_group` of them by sequence number (a stable set).
    pub records: Vec<Record>,
}

/// A torn tail cut off at open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TornTail {
    /// Segment file name.
    pub segment: String,
    /// Offset where the valid data ended.
    pub offset: u64,
    /// Bytes removed.
    pub bytes: u64,
}

/// A corrupt region skipped at open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorruptRegion {
    /// Segment file name.
    pub segment: String,
    /// Offset of the region.
    pub offset: u64,
    /// Bytes skipped.
    pub bytes: u64,
}

/// What opening the store found and repaired; the actor logs it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// Segment files read.
    pub segments: usize,
    /// Live rows loaded.
    pub rows: u64,
    /// Records on disk already evicted by the rule (awaiting compaction).
    pub evicted_on_disk: u64,
    /// Torn tails truncated.
    pub truncated: Vec<TornTail>,
    /// Corrupt regions skipped (never returned as rows).
    pub corrupt: Vec<CorruptRegion>,
    /// Segments not used at all, with the reason.
    pub skipped_segments: Vec<(String, String)>,
    /// Journal scan.
    pub journal: JournalScan,
    /// Leftover temporary files removed.
    pub stale_temp_files: usize,
    /// Other remarks (for example config values overridden by the store's identity).
    pub notes: Vec<String>,
}

impl RecoveryReport {
    /// True when nothing had to be repaired or skipped.
    pub fn is_clean(&self) -> bool {
        self.truncated.is_empty()
            && self.corrupt.is_empty()
            && self.skipped_segments.is_empty()
            && self.journal.corrupt_entries == 0
            && self.journal.torn_tail_bytes == 0
    }
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replay opened: {} segments, {} rows, {} evicted awaiting compaction, {} journal entries",
            self.segments, self.rows, self.evicted_on_disk, self.journal.entries
        )?;
        for t in &self.truncated {
            write!(
                f,
                "; torn tail of {} truncated at {} ({} bytes)",
                t.segment, t.offset, t.bytes
            )?;
        }
        for c in &self.corrupt {
            write!(
                f,
                "; corrupt region in {} at {} ({} bytes) skipped",
                c.segment, c.offset, c.bytes
            )?;
        }
        for (s, why) in &self.skipped_segments {
            write!(f, "; segment {s} skipped: {why}")?;
        }
        if self.journal.corrupt_entries > 0 || self.journal.torn_tail_bytes > 0 {
            write!(
                f,
                "; journal: {} corrupt entries skipped, {} torn bytes truncated",
                self.journal.corrupt_entries, self.journal.torn_tail_bytes
            )?;
        }
        if self.stale_temp_files > 0 {
            write!(
                f,
                "; {} stale temporary files removed",
                self.stale_temp_files
            )?;
        }
        for n in &self.notes {
            write!(f, "; {n}")?;
        }
        Ok(())
    }
}

/// Result of appending one file's rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppendSummary {
    /// Rows newly appended.
    pub appended: u64,
    /// Rows skipped because the store already had them.
    pub already_present: u64,
    /// The journal entry of the file.
    pub entry: JournalEntry,
}

/// Result of committing one file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitSummary {
    /// The journal entry of the file (its first one if it was committed before).
    pub entry: JournalEntry,
    /// Rows of the file made durable since the store was opened and first journaled
    /// now (0 when the file was already in the journal).
    pub appended: u64,
}

/// Result of [`super::ReplayStore::enforce_capacity`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictionReport {
    /// Rows evicted now.
    pub evicted: u64,
    /// Segments rewritten.
    pub segments_rewritten: usize,
    /// Segments deleted.
    pub segments_removed: usize,
    /// Bytes of disk space given back.
    pub bytes_reclaimed: u64,
}

/// Counters of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayStats {
    /// Live rows (training + control).
    pub rows: u64,
    /// Training rows.
    pub training_rows: u64,
    /// Held-out control rows.
    pub control_rows: u64,
    /// Bytes of live records (frames included).
    pub bytes: u64,
    /// Rows evicted since the store was created.
    pub evicted_total: u64,
    /// Segment files.
    pub segments: usize,
    /// Largest sequence number handed out (0 if none).
    pub last_seq: u64,
    /// Completed files in the journal.
    pub journal_files: usize,
    /// Live rows per source.
    pub by_source: BTreeMap<String, u64>,
    /// Live rows per kind.
    pub by_kind: BTreeMap<RowKind, u64>,
}
