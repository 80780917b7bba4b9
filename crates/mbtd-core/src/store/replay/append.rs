//! Appending rows: buffered writes, the durable commit of a file, and rollback.
//!
//! Rows are appended to the active segment through a buffer and stay *pending*
//! (invisible to readers) until a commit makes them durable, in three steps:
//! [`ReplayStore::prepare_commit`] flushes the buffer and returns a [`PendingSync`]
//! holding the files to fsync; the caller runs [`PendingSync::fsync`] on any thread (the
//! daemon does it outside the actor that owns the store, so that the trainer's reads are
//! not stalled by it); [`ReplayStore::publish_commit`] then makes the rows visible and
//! writes the file's journal entry. [`ReplayStore::commit_file`] does the three in a row.
//!
//! Rollback: every segment written since the last commit is remembered with its length
//! before the batch (a [`Mark`]). When a write, flush or fsync fails (a full disk), or the
//! caller gives up ([`ReplayStore::abort_pending`]), the pending rows are forgotten, the
//! buffered bytes dropped, segments created in the batch deleted, the others truncated
//! back, and the sequence numbers reused: the store is as it was after the last commit, so
//! a retry appends (and counts) the same rows again. A rollback that cannot truncate is
//! retried before the next append or commit.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use super::report::{AppendSummary, CommitSummary};
use super::{Active, Mark, ReplayStore, RowMeta, Segment, is_control, segment_name};
use crate::store::format::{HEADER_LEN, encode_record, segment_header};
use crate::store::fsutil::{fsync_dir, now_ms};
use crate::store::journal::JournalEntry;
use crate::store::{StoreError, fault};
use crate::text::csv_rows::{CsvRow, RowBody};

/// Largest encoded record accepted.
const MAX_RECORD_BYTES: usize = 1 << 30;

/// Rows made visible by a commit, per file id: (rows, first seq, last seq).
type Published = HashMap<u32, (u64, u64, u64)>;

/// The fsyncs that make the pending rows durable (from [`ReplayStore::prepare_commit`]).
#[derive(Debug)]
pub struct PendingSync {
    epoch: u64,
    pending: usize,
    store_dir: PathBuf,
    files: Vec<(PathBuf, File)>,
    sync_dir: bool,
}

impl PendingSync {
    /// fsync every segment written since the last commit, and the directory when a
    /// segment was created. Touches no store state: run it on any thread. On an error,
    /// give the store [`ReplayStore::abort_pending`].
    pub fn fsync(&self) -> Result<(), StoreError> {
        let io = |what: &str, path: &std::path::Path| {
            let (what, path) = (what.to_string(), path.to_path_buf());
            move |source| StoreError::Io { what, path, source }
        };
        for (path, f) in &self.files {
            fault::disk_full(&self.store_dir).map_err(io("fsync segment", path))?;
            f.sync_data().map_err(io("fsync segment", path))?;
        }
        if self.sync_dir {
            fsync_dir(&self.store_dir).map_err(io("fsync replay directory", &self.store_dir))?;
        }
        Ok(())
    }

    /// Pending rows this sync covers.
    pub fn rows(&self) -> usize {
        self.pending
    }
}

impl ReplayStore {
    fn roll_segment(&mut self) -> Result<(), StoreError> {
        if let Some(old) = self.active.as_mut() {
            let path = self.dir.join(segment_name(old.id));
            if let Err(e) = old.writer.flush() {
                return Err(self.io_err("write segment", &path, e));
            }
        }
        self.active = None;
        let id = self.next_segment;
        self.next_segment += 1;
        let path = self.dir.join(segment_name(id));
        let mut f = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| self.io_err("create segment", &path, e))?;
        self.marks.push(Mark {
            id,
            len: 0,
            created: true,
        });
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
        Ok(())
    }

    /// Append one row of the file `file_hash` with its arrival time `time_ms`
    /// (milliseconds since the Unix epoch; written, not yet durable). Returns
    /// `false` without writing when the store already holds that row. Call
    /// [`ReplayStore::commit_file`] after the last row. On an error every row appended
    /// since the last commit is rolled back (see the module doc).
    pub fn append_row(
        &mut self,
        file_hash: &[u8; 32],
        row: u64,
        source: &str,
        body: &RowBody,
        time_ms: i64,
        ingest_ms: u64,
    ) -> Result<bool, StoreError> {
        if self.rollback_due {
            self.rollback()?;
        }
        let (file, journaled) = match self.cur_file {
            Some((h, id, done)) if &h == file_hash => (id, done),
            _ => {
                let id = self.intern_file(file_hash);
                let done = self.journal.get(file_hash).is_some();
                self.cur_file = Some((*file_hash, id, done));
                (id, done)
            }
        };
        if journaled || self.partial.get(&file).is_some_and(|s| s.contains(&row)) {
            return Ok(false);
        }
        let seq = self.state.next_seq;
        self.buf.clear();
        let n = encode_record(
            &mut self.buf,
            seq,
            ingest_ms,
            row,
            file_hash,
            time_ms,
            source,
            body,
        );
        if n > MAX_RECORD_BYTES {
            return Err(StoreError::RowTooLarge {
                row,
                source_tag: source.to_string(),
                bytes: n,
                max: MAX_RECORD_BYTES,
            });
        }
        match self.write_frame(n) {
            Ok((segment, offset)) => {
                let meta = RowMeta {
                    seq,
                    offset,
                    row,
                    len: n as u32,
                    segment,
                    source: self.intern_source(source),
                    file,
                    kind: body.kind(),
                    control: is_control(self.state.control_fraction, body),
                };
                self.partial.entry(file).or_default().insert(row);
                self.state.next_seq += 1;
                self.pending.push(meta);
                Ok(true)
            }
            Err(e) => {
                // The error that matters is the write's; a failed rollback is retried.
                let _ = self.abort_pending();
                Err(e)
            }
        }
    }

    /// Write the encoded record in `self.buf` (`n` bytes) to the active segment, rolling
    /// to a new one when it would pass `segment_bytes`. Returns (segment, offset).
    fn write_frame(&mut self, n: usize) -> Result<(u32, u64), StoreError> {
        let must_roll = match &self.active {
            None => true,
            Some(a) => a.len > HEADER_LEN && a.len + n as u64 > self.cfg.segment_bytes,
        };
        if must_roll {
            self.roll_segment()?;
        }
        let active = self.active.as_mut().expect("rolled above");
        if self.marks.last().map(|m| m.id) != Some(active.id) {
            self.marks.push(Mark {
                id: active.id,
                len: active.len,
                created: false,
            });
        }
        if let Err(e) = active.writer.write_all(&self.buf) {
            let path = self.dir.join(segment_name(active.id));
            return Err(self.io_err("append to segment", &path, e));
        }
        let at = (active.id, active.len);
        active.len += n as u64;
        Ok(at)
    }

    /// First step of a commit: flush the appended rows to the operating system and return
    /// the fsyncs that make them durable. On an error the pending rows are rolled back.
    pub fn prepare_commit(&mut self) -> Result<PendingSync, StoreError> {
        if self.rollback_due {
            self.rollback()?;
        }
        let r = self.flush_and_collect();
        if r.is_err() {
            let _ = self.abort_pending();
        }
        r
    }

    fn flush_and_collect(&mut self) -> Result<PendingSync, StoreError> {
        if let Some(a) = self.active.as_mut() {
            let path = self.dir.join(segment_name(a.id));
            let flushed = fault::disk_full(&self.dir).and_then(|_| a.writer.flush());
            if let Err(e) = flushed {
                return Err(self.io_err("write segment", &path, e));
            }
        }
        let mut files = Vec::with_capacity(self.marks.len());
        for m in &self.marks {
            let path = self.dir.join(segment_name(m.id));
            let handle = match &self.active {
                Some(a) if a.id == m.id => a.writer.get_ref().try_clone(),
                _ => OpenOptions::new().append(true).open(&path),
            };
            let f = handle.map_err(|e| self.io_err("open segment for fsync", &path, e))?;
            files.push((path, f));
        }
        Ok(PendingSync {
            epoch: self.epoch,
            pending: self.pending.len(),
            store_dir: self.dir.clone(),
            files,
            sync_dir: self.marks.iter().any(|m| m.created),
        })
    }

    /// Last step of a commit, after `synced.fsync()` succeeded: the pending rows become
    /// visible, then the file is recorded as complete in the journal (fsynced). Refused
    /// when the store was reopened, or rows were appended or rolled back, since `synced`
    /// was prepared.
    pub fn publish_commit(
        &mut self,
        synced: PendingSync,
        file_hash: &[u8; 32],
        rows_accepted: u64,
        rows_rejected: u64,
    ) -> Result<CommitSummary, StoreError> {
        if synced.epoch != self.epoch || synced.pending != self.pending.len() {
            return Err(StoreError::StaleCommit {
                dir: self.dir.clone(),
            });
        }
        let published = self.publish_rows();
        self.journal_file(file_hash, rows_accepted, rows_rejected, &published)
    }

    /// The pending rows are durable: make them visible. Returns what was published per
    /// file: (rows, first seq, last seq).
    fn publish_rows(&mut self) -> Published {
        self.marks.clear();
        let mut out = Published::new();
        for m in std::mem::take(&mut self.pending) {
            let seg = self.segments.get_mut(&m.segment).expect("segment of a row");
            seg.live_bytes += m.len as u64;
            seg.live_rows += 1;
            let d = out.entry(m.file).or_insert((0, m.seq, m.seq));
            d.0 += 1;
            d.2 = m.seq;
            self.index_row(m);
        }
        out
    }

    /// Record the file as complete (idempotent: a file already in the journal keeps its
    /// first entry). `appended` counts the rows of the file published by this commit,
    /// plus those of earlier commits of it whose journal entry failed (so a commit
    /// retried after a full disk still counts them as appended).
    fn journal_file(
        &mut self,
        file_hash: &[u8; 32],
        rows_accepted: u64,
        rows_rejected: u64,
        published: &Published,
    ) -> Result<CommitSummary, StoreError> {
        if let Some(e) = self.journal.get(file_hash) {
            return Ok(CommitSummary {
                entry: e.clone(),
                appended: 0,
            });
        }
        let file = self.intern_file(file_hash);
        let mine = published.get(&file).copied();
        let carried = self.unjournaled.remove(&file);
        let (appended, first_seq, last_seq) = match (carried, mine) {
            (Some(c), Some(m)) => (c.0 + m.0, c.1, m.2),
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => (0, 0, 0),
        };
        let entry = JournalEntry {
            file_hash: *file_hash,
            rows_accepted,
            rows_rejected,
            rows_appended: appended,
            first_seq,
            last_seq,
            committed_ms: now_ms(),
        };
        if let Err(e) = self.journal.append(entry.clone()) {
            self.unjournaled
                .insert(file, (appended, first_seq, last_seq));
            return Err(e);
        }
        self.partial.remove(&file);
        if let Some(cur) = self.cur_file.as_mut()
            && cur.1 == file
        {
            cur.2 = true;
        }
        Ok(CommitSummary { entry, appended })
    }

    /// Make every appended row durable and visible (the three commit steps, no journal
    /// entry). On an error the pending rows are rolled back.
    pub(super) fn sync(&mut self) -> Result<Published, StoreError> {
        let synced = self.prepare_commit()?;
        if let Err(e) = synced.fsync() {
            let _ = self.abort_pending();
            return Err(e);
        }
        Ok(self.publish_rows())
    }

    /// Make the file's rows durable, then record the file as complete in the journal
    /// (fsynced). Idempotent: a file already in the journal keeps its first entry.
    pub fn commit_file(
        &mut self,
        file_hash: &[u8; 32],
        rows_accepted: u64,
        rows_rejected: u64,
    ) -> Result<CommitSummary, StoreError> {
        let published = self.sync()?;
        self.journal_file(file_hash, rows_accepted, rows_rejected, &published)
    }

    /// Append all `rows` of one file and commit it: one fsync batch for the file. A row
    /// without a time arrives now.
    /// Rows already present (from an earlier, interrupted run) are skipped.
    pub fn append_file_rows(
        &mut self,
        file_hash: &[u8; 32],
        rows: impl IntoIterator<Item = CsvRow>,
        rows_rejected: u64,
    ) -> Result<AppendSummary, StoreError> {
        let now = now_ms();
        let mut accepted = 0u64;
        for r in rows {
            let time = r.time_ms.unwrap_or(now as i64);
            self.append_row(file_hash, r.line, &r.source, &r.body, time, now)?;
            accepted += 1;
        }
        let c = self.commit_file(file_hash, accepted, rows_rejected)?;
        Ok(AppendSummary {
            appended: c.appended,
            already_present: accepted - c.appended,
            entry: c.entry,
        })
    }

    /// Forget every row appended since the last commit (see the module doc). The store
    /// is then as after the last commit; an `Err` means the segments could not be
    /// truncated yet, which is retried before the next append or commit.
    pub fn abort_pending(&mut self) -> Result<(), StoreError> {
        for m in &self.pending {
            if let Some(set) = self.partial.get_mut(&m.file) {
                set.remove(&m.row);
            }
        }
        if let Some(first) = self.pending.first() {
            self.state.next_seq = first.seq;
        }
        self.pending.clear();
        if let Some(a) = self.active.take() {
            // `into_parts` drops the buffered bytes without writing them.
            let (f, _unwritten) = a.writer.into_parts();
            self.active = Some(Active {
                id: a.id,
                writer: BufWriter::with_capacity(1 << 20, f),
                len: a.len,
            });
        }
        self.rollback_due = true;
        self.rollback()
    }

    /// Undo the marks, newest first: delete created segments, truncate the others.
    pub(super) fn rollback(&mut self) -> Result<(), StoreError> {
        let mut removed = false;
        while let Some(m) = self.marks.last().copied() {
            let path = self.dir.join(segment_name(m.id));
            if m.created {
                if self.active.as_ref().is_some_and(|a| a.id == m.id) {
                    let a = self.active.take().expect("checked");
                    drop(a.writer.into_parts());
                }
                match fs::remove_file(&path) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io_err("remove rolled-back segment", &path, e)),
                }
                self.segments.remove(&m.id);
            } else {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(m.len))
                    .map_err(|e| self.io_err("truncate rolled-back segment", &path, e))?;
                if let Some(a) = self.active.as_mut()
                    && a.id == m.id
                {
                    a.len = m.len;
                }
            }
            self.marks.pop();
        }
        if removed {
            // Not needed for correctness (a resurrected segment holds whole records that
            // recovery dedups), so a failure here is not an error of the rollback.
            let _ = fsync_dir(&self.dir);
        }
        self.rollback_due = false;
        Ok(())
    }
}
