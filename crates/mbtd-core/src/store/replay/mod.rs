//! The replay store proper: open/recovery, batched durable appends, eviction and
//! compaction, the control slice and the trainer's samplers.
//!
//! In memory the store keeps one small [`RowMeta`] per live row (sequence number,
//! segment and offset, source, kind, control flag), sorted by sequence number, plus the
//! positions of the training (non-control) rows. Sampling picks positions in O(1) and
//! reads each record with one positioned read.
//!
//! Capacity: [`ReplayStore::enforce_capacity`] applies bottom-k eviction (see
//! [`super::state`]): it lowers the key threshold until the training rows under it
//! (plus the control rows) fit `max_rows` and `max_bytes`, evicts the rows above it
//! that the trainer has already consumed, writes `state.bin` (the eviction is then
//! durable), and compacts: a segment with no live row
//! is deleted; a segment whose dead bytes are at least a quarter of its record bytes is
//! rewritten (live frames copied to `seg-N.log.tmp`, fsync, rename over the segment,
//! directory fsync). A crash at any point leaves either the old or the new segment,
//! both of which give the same live rows under the persisted rule.
//!
//! The code is split by concern: [`report`] (what the store reports), `open` (open and
//! crash recovery), `append` (batched durable appends and their rollback), `read`
//! (samplers, cursors, control groups, counters) and `evict` (eviction and compaction).

mod append;
mod evict;
mod open;
mod read;
pub mod report;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

pub use append::PendingSync;
pub use report::{
    AppendSummary, CommitSummary, ControlGroup, CorruptRegion, Era, EvictionReport, RecoveryReport,
    ReplayStats, TornTail,
};

use super::journal::{Journal, JournalEntry};
use super::state::{StoreState, splitmix64};
use super::{ReplayConfig, StoreError};
use crate::text::csv_rows::{RowBody, RowKind};

/// Distinguishes one opening of a store from another in this process (see
/// [`ReplayStore::epoch`]).
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

/// Hasher for sets of row numbers: splitmix64 of the value (fast, well mixed).
#[derive(Default, Clone, Copy)]
struct RowHasher(u64);

impl std::hash::Hasher for RowHasher {
    fn finish(&self) -> u64 {
        splitmix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type RowSet = HashSet<u64, std::hash::BuildHasherDefault<RowHasher>>;

/// Per-row index entry.
#[derive(Clone, Copy, Debug)]
struct RowMeta {
    seq: u64,
    offset: u64,
    row: u64,
    len: u32,
    segment: u32,
    source: u32,
    file: u32,
    kind: RowKind,
    control: bool,
}

struct Segment {
    path: PathBuf,
    reader: File,
    live_bytes: u64,
    dead_bytes: u64,
    live_rows: u64,
}

/// A segment written since the last commit, with its length before (rollback point).
#[derive(Clone, Copy, Debug)]
struct Mark {
    id: u32,
    len: u64,
    /// Created since the last commit (a rollback deletes it).
    created: bool,
}

struct Active {
    id: u32,
    writer: BufWriter<File>,
    len: u64,
}

/// Is a row with this content in the control slice? With `c = crc32(kind byte |
/// for each field: len u64 LE | bytes)` and `h = splitmix64(c | bytes << 32)` (`bytes`
/// the total field length), a row is a control row iff `h < fraction · 2^64`. Depends
/// only on the content, so the same row is always on the same side.
pub fn is_control(fraction: f64, body: &RowBody) -> bool {
    let threshold = (fraction * 18_446_744_073_709_551_616.0) as u64;
    if threshold == 0 {
        return false;
    }
    let mut h = crc32fast::Hasher::new();
    let mut field = |s: &str| {
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    match body {
        RowBody::Text { text } => {
            field(text);
            h.update(&[0]);
        }
        RowBody::PromptResponse { prompt, response } => {
            field(prompt);
            field(response);
            h.update(&[1]);
        }
    }
    let bytes = body.text_bytes() as u64;
    splitmix64(h.finalize() as u64 | bytes << 32) < threshold
}

fn segment_name(id: u32) -> String {
    format!("seg-{id:010}.log")
}

fn parse_segment_name(name: &str) -> Option<u32> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The replay store. Not thread-safe by itself: one owner (the replay actor) calls it,
/// typically from `spawn_blocking`.
pub struct ReplayStore {
    dir: PathBuf,
    cfg: ReplayConfig,
    state: StoreState,
    journal: Journal,
    segments: BTreeMap<u32, Segment>,
    next_segment: u32,
    active: Option<Active>,
    rows: Vec<RowMeta>,
    train: Vec<u32>,
    pending: Vec<RowMeta>,
    sources: Vec<String>,
    source_ids: HashMap<String, u32>,
    source_rows: Vec<u64>,
    kind_rows: [u64; 2],
    files: Vec<[u8; 32]>,
    file_ids: HashMap<[u8; 32], u32>,
    partial: HashMap<u32, RowSet>,
    /// The file of the last append: (hash, id, journaled).
    cur_file: Option<([u8; 32], u32, bool)>,
    /// Segments written since the last commit (see `append`).
    marks: Vec<Mark>,
    /// A rollback could not finish; it is retried before the next write.
    rollback_due: bool,
    /// Rows of files made durable by a commit whose journal entry then failed:
    /// (count, first seq, last seq), counted as appended when the file is journaled.
    unjournaled: HashMap<u32, (u64, u64, u64)>,
    epoch: u64,
    live_bytes: u64,
    control_rows: u64,
    buf: Vec<u8>,
}

fn kind_index(k: RowKind) -> usize {
    match k {
        RowKind::Text => 0,
        RowKind::PromptResponse => 1,
    }
}

impl ReplayStore {
    fn intern_source(&mut self, s: &str) -> u32 {
        if let Some(last) = self.pending.last()
            && self.sources[last.source as usize] == s
        {
            return last.source;
        }
        if let Some(&id) = self.source_ids.get(s) {
            return id;
        }
        let id = self.sources.len() as u32;
        self.sources.push(s.to_string());
        self.source_ids.insert(s.to_string(), id);
        self.source_rows.push(0);
        id
    }

    fn intern_file(&mut self, h: &[u8; 32]) -> u32 {
        if let Some((hash, id, _)) = &self.cur_file
            && hash == h
        {
            return *id;
        }
        if let Some(&id) = self.file_ids.get(h) {
            return id;
        }
        let id = self.files.len() as u32;
        self.files.push(*h);
        self.file_ids.insert(*h, id);
        id
    }

    fn index_row(&mut self, m: RowMeta) {
        if m.control {
            self.control_rows += 1;
        } else {
            self.train.push(self.rows.len() as u32);
        }
        self.source_rows[m.source as usize] += 1;
        self.kind_rows[kind_index(m.kind)] += 1;
        self.live_bytes += m.len as u64;
        self.rows.push(m);
    }

    /// The configuration in force.
    pub fn config(&self) -> &ReplayConfig {
        &self.cfg
    }

    /// The journal entry of a completely ingested file.
    pub fn journal_entry(&self, file_hash: &[u8; 32]) -> Option<&JournalEntry> {
        self.journal.get(file_hash)
    }

    /// Does the store hold row `row` of the file with this hash (or the whole file)?
    pub fn contains_row(&self, file_hash: &[u8; 32], row: u64) -> bool {
        if self.journal.get(file_hash).is_some() {
            return true;
        }
        self.file_ids
            .get(file_hash)
            .and_then(|id| self.partial.get(id))
            .is_some_and(|rows| rows.contains(&row))
    }

    fn io_err(&self, what: &str, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what: what.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }

    /// Identifies this opening of the store within the process: a caller that holds a
    /// [`PendingSync`] from another epoch (the store was reopened meanwhile) is refused.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The replay directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests;
