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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::format::{
    HEADER_LEN, HeaderCheck, Record, check_header, decode_frame, encode_record, scan_segment,
    segment_header,
};
use super::fsutil::{fsync_dir, now_ms};
use super::journal::{Journal, JournalEntry, JournalScan};
use super::state::{StoreState, eviction_key, splitmix64};
use super::{ReplayConfig, SamplingMode, StoreError};
use crate::text::csv_rows::{CsvRow, RowBody, RowKind};

/// Largest encoded record accepted.
const MAX_RECORD_BYTES: usize = 1 << 30;

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

struct Active {
    id: u32,
    writer: BufWriter<File>,
    len: u64,
}

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

/// Result of [`ReplayStore::enforce_capacity`].
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
    unsynced: Vec<u32>,
    dir_dirty: bool,
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
    /// Open (or create) the store in `dir`, recovering from any crash: torn tails are
    /// truncated, corrupt records skipped, leftover temporary files removed. The report
    /// says what was found.
    pub fn open(
        dir: &Path,
        cfg: &ReplayConfig,
    ) -> Result<(ReplayStore, RecoveryReport), StoreError> {
        cfg.validate().map_err(StoreError::Config)?;
        let io = |what: &str, path: &Path| {
            let what = what.to_string();
            let path = path.to_path_buf();
            move |source| StoreError::Io { what, path, source }
        };
        fs::create_dir_all(dir).map_err(io("create replay directory", dir))?;
        let mut report = RecoveryReport::default();

        let mut segment_ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(io("list replay directory", dir))? {
            let entry = entry.map_err(io("list replay directory", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                fs::remove_file(entry.path())
                    .map_err(io("remove stale temp file", &entry.path()))?;
                report.stale_temp_files += 1;
            } else if let Some(id) = parse_segment_name(&name) {
                segment_ids.push(id);
            }
        }
        segment_ids.sort_unstable();
        if report.stale_temp_files > 0 {
            fsync_dir(dir).map_err(io("fsync replay directory", dir))?;
        }

        let state_path = dir.join("state.bin");
        let state = if state_path.exists() {
            let bytes = fs::read(&state_path).map_err(io("read store state", &state_path))?;
            let s = StoreState::decode(&state_path, &bytes)?;
            if s.seed != cfg.seed || s.control_fraction != cfg.control_fraction {
                report.notes.push(format!(
                    "the store was created with seed {} and control_fraction {}; those stay in force (config has {} and {})",
                    s.seed, s.control_fraction, cfg.seed, cfg.control_fraction
                ));
            }
            s
        } else {
            let s = StoreState::new(cfg.seed, cfg.control_fraction);
            s.save(&state_path)?;
            s
        };
        let (journal, jscan) = Journal::open(dir)?;
        report.journal = jscan;

        let mut store = ReplayStore {
            dir: dir.to_path_buf(),
            cfg: cfg.clone(),
            state,
            journal,
            segments: BTreeMap::new(),
            next_segment: segment_ids.last().map_or(1, |l| l + 1),
            active: None,
            rows: Vec::new(),
            train: Vec::new(),
            pending: Vec::new(),
            sources: Vec::new(),
            source_ids: HashMap::new(),
            source_rows: Vec::new(),
            kind_rows: [0; 2],
            files: Vec::new(),
            file_ids: HashMap::new(),
            partial: HashMap::new(),
            cur_file: None,
            unsynced: Vec::new(),
            dir_dirty: false,
            live_bytes: 0,
            control_rows: 0,
            buf: Vec::new(),
        };

        let mut min_seq = 1u64;
        let last_id = segment_ids.last().copied();
        for id in segment_ids {
            let name = segment_name(id);
            let path = dir.join(&name);
            let is_last = Some(id) == last_id;
            let mut bytes = fs::read(&path).map_err(io("read segment", &path))?;
            match check_header(&bytes) {
                HeaderCheck::Ok => {}
                HeaderCheck::Short if is_last => {
                    report.truncated.push(TornTail {
                        segment: name.clone(),
                        offset: 0,
                        bytes: bytes.len() as u64,
                    });
                    bytes = segment_header().to_vec();
                    fs::write(&path, &bytes).map_err(io("rewrite torn segment header", &path))?;
                    File::open(&path)
                        .and_then(|f| f.sync_all())
                        .map_err(io("fsync segment", &path))?;
                }
                HeaderCheck::Short | HeaderCheck::Corrupt => {
                    report.skipped_segments.push((
                        name,
                        "bad segment header (magic or checksum); move the file away after inspecting it".into(),
                    ));
                    continue;
                }
                HeaderCheck::Version(v) => {
                    report.skipped_segments.push((
                        name,
                        format!("segment format version {v}, this build reads version 1"),
                    ));
                    continue;
                }
            }
            let scan = scan_segment(&bytes, min_seq);
            for (offset, n) in &scan.corrupt {
                report.corrupt.push(CorruptRegion {
                    segment: name.clone(),
                    offset: *offset,
                    bytes: *n,
                });
            }
            if scan.tail_bytes > 0 {
                if is_last {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io("open segment", &path))?;
                    f.set_len(scan.valid_end)
                        .map_err(io("truncate torn tail", &path))?;
                    f.sync_all().map_err(io("fsync segment", &path))?;
                    report.truncated.push(TornTail {
                        segment: name.clone(),
                        offset: scan.valid_end,
                        bytes: scan.tail_bytes,
                    });
                } else {
                    report.corrupt.push(CorruptRegion {
                        segment: name.clone(),
                        offset: scan.valid_end,
                        bytes: scan.tail_bytes,
                    });
                }
            }
            let reader = File::open(&path).map_err(io("open segment", &path))?;
            let mut seg = Segment {
                path: path.clone(),
                reader,
                live_bytes: 0,
                dead_bytes: 0,
                live_rows: 0,
            };
            for s in scan.records {
                min_seq = s.record.seq + 1;
                let control = is_control(store.state.control_fraction, &s.record.body);
                if store.state.is_evicted(s.record.seq, control) {
                    seg.dead_bytes += s.frame_len as u64;
                    report.evicted_on_disk += 1;
                    continue;
                }
                let meta = RowMeta {
                    seq: s.record.seq,
                    offset: s.offset,
                    row: s.record.row,
                    len: s.frame_len,
                    segment: id,
                    source: store.intern_source(&s.record.source),
                    file: store.intern_file(&s.record.file_hash),
                    kind: s.record.body.kind(),
                    control,
                };
                seg.live_bytes += meta.len as u64;
                seg.live_rows += 1;
                if store.journal.get(&s.record.file_hash).is_none() {
                    store.partial.entry(meta.file).or_default().insert(meta.row);
                }
                store.index_row(meta);
            }
            store.segments.insert(id, seg);
            if is_last {
                let len = scan.valid_end.max(HEADER_LEN);
                if len < store.cfg.segment_bytes {
                    let f = OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .map_err(io("open segment for append", &path))?;
                    store.active = Some(Active {
                        id,
                        writer: BufWriter::with_capacity(1 << 20, f),
                        len,
                    });
                }
            }
        }
        store.state.next_seq = store.state.next_seq.max(min_seq);
        report.segments = store.segments.len();
        report.rows = store.rows.len() as u64;
        Ok((store, report))
    }

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

    fn roll_segment(&mut self) -> Result<(), StoreError> {
        if let Some(mut old) = self.active.take() {
            let path = self.dir.join(segment_name(old.id));
            old.writer
                .flush()
                .map_err(|e| self.io_err("write segment", &path, e))?;
        }
        let id = self.next_segment;
        self.next_segment += 1;
        let path = self.dir.join(segment_name(id));
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| self.io_err("create segment", &path, e))?;
        f.write_all(&segment_header())
            .map_err(|e| self.io_err("write segment header", &path, e))?;
        let reader = File::open(&path).map_err(|e| self.io_err("open segment", &path, e))?;
        self.segments.insert(
            id,
            Segment {
                path,
                reader,
                live_bytes: 0,
                dead_bytes: 0,
                live_rows: 0,
            },
        );
        self.active = Some(Active {
            id,
            writer: BufWriter::with_capacity(1 << 20, f),
            len: HEADER_LEN,
        });
        self.unsynced.push(id);
        self.dir_dirty = true;
        Ok(())
    }

    /// Append one row of the file `file_hash` (written, not yet durable). Returns
    /// `false` without writing when the store already holds that row. Call
    /// [`ReplayStore::commit_file`] after the last row.
    pub fn append_row(
        &mut self,
        file_hash: &[u8; 32],
        row: u64,
        source: &str,
        body: &RowBody,
        ingest_ms: u64,
    ) -> Result<bool, StoreError> {
        let (file, journaled) = match self.cur_file {
            Some((h, id, done)) if &h == file_hash => (id, done),
            _ => {
                let id = self.intern_file(file_hash);
                let done = self.journal.get(file_hash).is_some();
                self.cur_file = Some((*file_hash, id, done));
                (id, done)
            }
        };
        if journaled || !self.partial.entry(file).or_default().insert(row) {
            return Ok(false);
        }
        let seq = self.state.next_seq;
        self.buf.clear();
        let n = encode_record(&mut self.buf, seq, ingest_ms, row, file_hash, source, body);
        if n > MAX_RECORD_BYTES {
            return Err(StoreError::RowTooLarge {
                row,
                source_tag: source.to_string(),
                bytes: n,
                max: MAX_RECORD_BYTES,
            });
        }
        let must_roll = match &self.active {
            None => true,
            Some(a) => a.len > HEADER_LEN && a.len + n as u64 > self.cfg.segment_bytes,
        };
        if must_roll {
            self.roll_segment()?;
        }
        let source = self.intern_source(source);
        let active = self.active.as_mut().expect("rolled above");
        if let Err(e) = active.writer.write_all(&self.buf) {
            let path = self.dir.join(segment_name(active.id));
            if let Some(set) = self.partial.get_mut(&file) {
                set.remove(&row);
            }
            return Err(self.io_err("append to segment", &path, e));
        }
        let meta = RowMeta {
            seq,
            offset: active.len,
            row,
            len: n as u32,
            segment: active.id,
            source,
            file,
            kind: body.kind(),
            control: is_control(self.state.control_fraction, body),
        };
        active.len += n as u64;
        if self.unsynced.last() != Some(&active.id) {
            self.unsynced.push(active.id);
        }
        self.state.next_seq += 1;
        self.pending.push(meta);
        Ok(true)
    }

    /// Make every appended row durable: flush, fsync the segments written since the
    /// last sync, fsync the directory if a segment was created. Then the rows become
    /// visible to readers.
    fn sync(&mut self) -> Result<(), StoreError> {
        if let Some(a) = self.active.as_mut()
            && let Err(e) = a.writer.flush()
        {
            let path = self.dir.join(segment_name(a.id));
            return Err(self.io_err("write segment", &path, e));
        }
        for id in std::mem::take(&mut self.unsynced) {
            let seg = &self.segments[&id];
            let r = match &self.active {
                Some(a) if a.id == id => a.writer.get_ref().sync_data(),
                _ => OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .and_then(|f| f.sync_data()),
            };
            r.map_err(|e| self.io_err("fsync segment", &seg.path, e))?;
        }
        if self.dir_dirty {
            fsync_dir(&self.dir)
                .map_err(|e| self.io_err("fsync replay directory", &self.dir, e))?;
            self.dir_dirty = false;
        }
        for m in std::mem::take(&mut self.pending) {
            let seg = self.segments.get_mut(&m.segment).expect("segment of a row");
            seg.live_bytes += m.len as u64;
            seg.live_rows += 1;
            self.index_row(m);
        }
        Ok(())
    }

    /// Make the file's rows durable, then record the file as complete in the journal
    /// (fsynced). Idempotent: a file already in the journal keeps its first entry.
    pub fn commit_file(
        &mut self,
        file_hash: &[u8; 32],
        rows_accepted: u64,
        rows_rejected: u64,
    ) -> Result<JournalEntry, StoreError> {
        let file = self.intern_file(file_hash);
        let mine: Vec<u64> = self
            .pending
            .iter()
            .filter(|m| m.file == file)
            .map(|m| m.seq)
            .collect();
        self.sync()?;
        if let Some(e) = self.journal.get(file_hash) {
            return Ok(e.clone());
        }
        let entry = JournalEntry {
            file_hash: *file_hash,
            rows_accepted,
            rows_rejected,
            rows_appended: mine.len() as u64,
            first_seq: mine.first().copied().unwrap_or(0),
            last_seq: mine.last().copied().unwrap_or(0),
            committed_ms: now_ms(),
        };
        self.journal.append(entry.clone())?;
        self.partial.remove(&file);
        if let Some(cur) = self.cur_file.as_mut()
            && cur.1 == file
        {
            cur.2 = true;
        }
        Ok(entry)
    }

    /// Append all `rows` of one file and commit it: one fsync batch for the file.
    /// Rows already present (from an earlier, interrupted run) are skipped.
    pub fn append_file_rows(
        &mut self,
        file_hash: &[u8; 32],
        rows: impl IntoIterator<Item = CsvRow>,
        rows_rejected: u64,
    ) -> Result<AppendSummary, StoreError> {
        let now = now_ms();
        let (mut appended, mut present) = (0u64, 0u64);
        for r in rows {
            if self.append_row(file_hash, r.line, &r.source, &r.body, now)? {
                appended += 1;
            } else {
                present += 1;
            }
        }
        let entry = self.commit_file(file_hash, appended + present, rows_rejected)?;
        Ok(AppendSummary {
            appended,
            already_present: present,
            entry,
        })
    }

    fn read_meta(&self, m: &RowMeta) -> Result<Record, StoreError> {
        let seg = &self.segments[&m.segment];
        let mut buf = vec![0u8; m.len as usize];
        seg.reader
            .read_exact_at(&mut buf, m.offset)
            .map_err(|e| self.io_err("read record", &seg.path, e))?;
        decode_frame(&buf).ok_or_else(|| StoreError::Corrupt {
            path: seg.path.clone(),
            detail: format!(
                "record seq {} at offset {} fails its CRC check on read; the disk may be failing; restart the daemon to rescan",
                m.seq, m.offset
            ),
        })
    }

    /// `n` training rows drawn uniformly with replacement (empty if there are none).
    pub fn sample_uniform<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        n: usize,
    ) -> Result<Vec<Record>, StoreError> {
        if self.train.is_empty() {
            return Ok(Vec::new());
        }
        (0..n)
            .map(|_| {
                let i = self.train[rng.random_range(0..self.train.len())];
                self.read_meta(&self.rows[i as usize])
            })
            .collect()
    }

    /// `n` training rows drawn with replacement, favouring recent ones: with `N`
    /// training rows in arrival order and `b = bias`, position `i` is drawn with density
    /// proportional to `e^(b·i/N)` by inverse CDF: `x = ln(1 + u(e^b − 1))/b`,
    /// `i = ⌊xN⌋` (`b = 0` is uniform). O(1) per row.
    pub fn sample_recent<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        n: usize,
        bias: f64,
    ) -> Result<Vec<Record>, StoreError> {
        let count = self.train.len();
        if count == 0 {
            return Ok(Vec::new());
        }
        (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                let x = if bias < 1e-9 {
                    u
                } else {
                    (u * bias.exp_m1()).ln_1p() / bias
                };
                let pos = ((x * count as f64) as usize).min(count - 1);
                self.read_meta(&self.rows[self.train[pos] as usize])
            })
            .collect()
    }

    /// `n` training rows with the configured sampler (`sampling`, `recent_bias`).
    pub fn sample<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        n: usize,
    ) -> Result<Vec<Record>, StoreError> {
        match self.cfg.sampling {
            SamplingMode::Uniform => self.sample_uniform(rng, n),
            SamplingMode::Recent => self.sample_recent(rng, n, self.cfg.recent_bias),
        }
    }

    /// Up to `limit` durable training rows with `seq > cursor`, in sequence order. The
    /// trainer keeps the last returned seq as its cursor, so it sees every new row.
    pub fn rows_after(&self, cursor: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let start = self.rows.partition_point(|m| m.seq <= cursor);
        self.rows[start..]
            .iter()
            .filter(|m| !m.control)
            .take(limit)
            .map(|m| self.read_meta(m))
            .collect()
    }

    /// Training rows after `cursor` (not handed to the trainer yet).
    pub fn backlog(&self, cursor: u64) -> u64 {
        let start = self.rows.partition_point(|m| m.seq <= cursor);
        (self.train.len() - self.train.partition_point(|&p| (p as usize) < start)) as u64
    }

    /// True when the live rows (control rows included) reach `max_rows` or their bytes
    /// reach `max_bytes`.
    pub fn at_capacity(&self) -> bool {
        self.rows.len() as u64 >= self.cfg.max_rows || self.live_bytes >= self.cfg.max_bytes
    }

    /// Control rows grouped by source and era (`Old`: seq < `boundary`, `New`: seq >=
    /// `boundary`), each group with its first `max_per_group` rows by sequence number.
    pub fn control_groups(
        &self,
        boundary: u64,
        max_per_group: usize,
    ) -> Result<Vec<ControlGroup>, StoreError> {
        let mut groups: BTreeMap<(&str, Era), (u64, Vec<&RowMeta>)> = BTreeMap::new();
        for m in self.rows.iter().filter(|m| m.control) {
            let era = if m.seq < boundary { Era::Old } else { Era::New };
            let g = groups
                .entry((self.sources[m.source as usize].as_str(), era))
                .or_default();
            g.0 += 1;
            if g.1.len() < max_per_group {
                g.1.push(m);
            }
        }
        groups
            .into_iter()
            .map(|((source, era), (total_rows, metas))| {
                Ok(ControlGroup {
                    source: source.to_string(),
                    era,
                    total_rows,
                    records: metas
                        .into_iter()
                        .map(|m| self.read_meta(m))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> ReplayStats {
        let mut by_kind = BTreeMap::new();
        for k in [RowKind::Text, RowKind::PromptResponse] {
            if self.kind_rows[kind_index(k)] > 0 {
                by_kind.insert(k, self.kind_rows[kind_index(k)]);
            }
        }
        ReplayStats {
            rows: self.rows.len() as u64,
            training_rows: self.train.len() as u64,
            control_rows: self.control_rows,
            bytes: self.live_bytes,
            evicted_total: self.state.evicted_total,
            segments: self.segments.len(),
            last_seq: self.state.next_seq - 1,
            journal_files: self.journal.len(),
            by_source: self
                .sources
                .iter()
                .zip(&self.source_rows)
                .filter(|(_, n)| **n > 0)
                .map(|(s, n)| (s.clone(), *n))
                .collect(),
            by_kind,
        }
    }

    /// Largest durable sequence number (0 if none).
    pub fn last_durable_seq(&self) -> u64 {
        self.rows.last().map_or(0, |m| m.seq)
    }

    /// Most control rows kept: `control_fraction` of `max_rows` (at least one).
    fn control_budget(&self) -> u64 {
        ((self.state.control_fraction * self.cfg.max_rows as f64).ceil() as u64).max(1)
    }

    /// Enforce `max_rows` / `max_bytes` by bottom-k eviction, then compact.
    ///
    /// Control rows are held to their own budget first (`control_fraction` of `max_rows`):
    /// the ones with the smallest keys stay, a uniform sample of every control row so far.
    /// Then the threshold `tau` is chosen over all training rows: the rows kept in the end
    /// are those with the smallest keys such that the bounds hold (the kept control rows
    /// count). Only training rows with `seq <= consumed_through` (rows the trainer has
    /// seen) are evicted now; unconsumed rows above the threshold stay until a later call
    /// with a larger cursor, so the bounds can be exceeded by them (the ingestor then holds
    /// files back, see `backlog`). A row of a file whose ingestion was interrupted can be
    /// evicted like any other; if that file is processed again, such a row is appended
    /// again (it is never live twice).
    pub fn enforce_capacity(
        &mut self,
        consumed_through: u64,
    ) -> Result<EvictionReport, StoreError> {
        let (max_rows, max_bytes) = (self.cfg.max_rows, self.cfg.max_bytes);
        let control_max = self.control_budget();
        if self.rows.len() as u64 <= max_rows
            && self.live_bytes <= max_bytes
            && self.control_rows <= control_max
            && self.state.tau == u64::MAX
        {
            return Ok(EvictionReport::default());
        }
        // Never beyond the newest existing row: rows appended later must not fall
        // under the rule before they were consumed.
        let last = self.last_durable_seq();
        let through = consumed_through.min(last).max(self.state.evict_through);
        let seed = self.state.seed;
        let mut control_tau = self.state.control_tau;
        let mut control_keys: Vec<u64> = self
            .rows
            .iter()
            .filter(|m| m.control)
            .map(|m| eviction_key(seed, m.seq))
            .filter(|&k| k < control_tau)
            .collect();
        if control_keys.len() as u64 > control_max {
            let (_, &mut nth, _) = control_keys.select_nth_unstable(control_max as usize);
            control_tau = nth;
        }
        let mut tau = self.state.tau;
        let mut rows_left = self.rows.len() as u64;
        let mut bytes_left = self.live_bytes;
        let mut below = Vec::new();
        for m in &self.rows {
            let key = eviction_key(seed, m.seq);
            if key >= if m.control { control_tau } else { tau } {
                rows_left -= 1;
                bytes_left -= m.len as u64;
            } else if !m.control {
                below.push((key, m.len));
            }
        }
        if rows_left > max_rows || bytes_left > max_bytes {
            below.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
            for (key, len) in below {
                if rows_left <= max_rows && bytes_left <= max_bytes {
                    break;
                }
                rows_left -= 1;
                bytes_left -= len as u64;
                tau = key;
            }
        }
        let rule = StoreState {
            tau,
            evict_through: through,
            control_tau,
            control_through: last.max(self.state.control_through),
            ..self.state.clone()
        };
        let evict: Vec<bool> = self
            .rows
            .iter()
            .map(|m| rule.is_evicted(m.seq, m.control))
            .collect();
        let count = evict.iter().filter(|&&e| e).count() as u64;
        if count == 0 {
            return Ok(EvictionReport::default());
        }
        self.state = StoreState {
            evicted_total: self.state.evicted_total + count,
            ..rule
        };
        self.state.save(&self.dir.join("state.bin"))?;

        let old = std::mem::take(&mut self.rows);
        self.train.clear();
        self.control_rows = 0;
        self.live_bytes = 0;
        self.source_rows.iter_mut().for_each(|n| *n = 0);
        self.kind_rows = [0; 2];
        for (m, gone) in old.into_iter().zip(evict) {
            if gone {
                if let Some(set) = self.partial.get_mut(&m.file) {
                    set.remove(&m.row);
                }
                let seg = self.segments.get_mut(&m.segment).expect("segment of a row");
                seg.live_bytes -= m.len as u64;
                seg.dead_bytes += m.len as u64;
                seg.live_rows -= 1;
            } else {
                self.index_row(m);
            }
        }
        let mut report = self.compact()?;
        report.evicted = count;
        Ok(report)
    }

    /// Reclaim the space of evicted rows: delete segments with no live row, rewrite
    /// those whose dead bytes are at least a quarter of their record bytes.
    fn compact(&mut self) -> Result<EvictionReport, StoreError> {
        let mut report = EvictionReport::default();
        let busy = !self.pending.is_empty();
        let ids: Vec<u32> = self
            .segments
            .iter()
            .filter(|(_, s)| {
                s.dead_bytes > 0
                    && (s.live_rows == 0 || s.dead_bytes * 4 >= s.dead_bytes + s.live_bytes)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let is_active = self.active.as_ref().is_some_and(|a| a.id == id);
            if is_active && busy {
                continue;
            }
            let dead = self.segments[&id].dead_bytes;
            if self.segments[&id].live_rows == 0 && !is_active {
                let seg = self.segments.remove(&id).expect("listed");
                fs::remove_file(&seg.path)
                    .map_err(|e| self.io_err("remove empty segment", &seg.path, e))?;
                report.segments_removed += 1;
                report.bytes_reclaimed += dead;
                continue;
            }
            self.rewrite_segment(id, is_active)?;
            report.segments_rewritten += 1;
            report.bytes_reclaimed += dead;
        }
        if report.segments_removed > 0 || report.segments_rewritten > 0 {
            fsync_dir(&self.dir)
                .map_err(|e| self.io_err("fsync replay directory", &self.dir, e))?;
        }
        Ok(report)
    }

    fn rewrite_segment(&mut self, id: u32, is_active: bool) -> Result<(), StoreError> {
        let path = self.segments[&id].path.clone();
        if is_active {
            let a = self.active.take().expect("active");
            let mut w = a.writer;
            w.flush()
                .map_err(|e| self.io_err("write segment", &path, e))?;
        }
        let old = fs::read(&path).map_err(|e| self.io_err("read segment", &path, e))?;
        let lo = self.rows.partition_point(|m| m.segment < id);
        let hi = self.rows.partition_point(|m| m.segment <= id);
        let mut out = segment_header().to_vec();
        for m in &mut self.rows[lo..hi] {
            let start = m.offset as usize;
            let frame = &old[start..start + m.len as usize];
            m.offset = out.len() as u64;
            out.extend_from_slice(frame);
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fsync_dir(&self.dir)
        };
        write().map_err(|e| self.io_err("rewrite segment", &path, e))?;
        let reader = File::open(&path).map_err(|e| self.io_err("open segment", &path, e))?;
        let seg = self.segments.get_mut(&id).expect("segment");
        seg.reader = reader;
        seg.dead_bytes = 0;
        if is_active {
            let f = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| self.io_err("open segment for append", &path, e))?;
            self.active = Some(Active {
                id,
                writer: BufWriter::with_capacity(1 << 20, f),
                len: out.len() as u64,
            });
        }
        Ok(())
    }

    /// The replay directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
#[path = "replay_tests.rs"]
mod tests;
