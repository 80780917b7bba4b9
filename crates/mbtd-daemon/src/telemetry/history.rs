//! The metrics history: one JSON line per snapshot, appended to `metrics.history_file` every
//! `metrics.history_every_s`, for `mbtd report`.
//!
//! Bounded: when an append would take the file past `history_max_bytes`, the file is renamed
//! to its rotated name (`metrics.jsonl` → `metrics.1.jsonl`, replacing the previous rotated
//! file) and a new one begun, so the history never holds more than twice the bound on disk.
//! Each line is flushed with `fdatasync`; a line torn by a crash is terminated at the next
//! open and skipped by the reader.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Snapshot;
use crate::store::fsutil::{fsync_dir, parent_of};

/// Format version of a history line.
pub const HISTORY_VERSION: u32 = 1;

/// One line of the history: when, and every metric's value (`null` for a NaN gauge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub v: u32,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Seconds since the daemon started (resets when it restarts).
    pub uptime_s: f64,
    pub metrics: BTreeMap<String, Option<f64>>,
}

impl HistoryRecord {
    pub fn from_snapshot(unix_ms: u64, uptime_s: f64, snap: &Snapshot) -> Self {
        Self {
            v: HISTORY_VERSION,
            unix_ms,
            uptime_s,
            metrics: snap
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.as_f64()).filter(|x| x.is_finite())))
                .collect(),
        }
    }
}

/// The rotated file's name: `metrics.jsonl` → `metrics.1.jsonl` (`name` → `name.1`).
pub fn rotated_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let ext = path.extension().map(|s| s.to_string_lossy().into_owned());
    let name = match (stem, ext) {
        (Some(s), Some(e)) => format!("{s}.1.{e}"),
        (Some(s), None) => format!("{s}.1"),
        _ => "history.1".to_string(),
    };
    path.with_file_name(name)
}

/// Appends history lines to a file, rotating it at a size bound.
pub struct HistoryWriter {
    path: PathBuf,
    max_bytes: u64,
    file: Option<File>,
    size: u64,
}

impl HistoryWriter {
    /// A writer of `path`; nothing is opened until the first append.
    pub fn new(path: PathBuf, max_bytes: u64) -> Self {
        Self {
            path,
            max_bytes,
            file: None,
            size: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `rec` as one line and syncs it.
    pub fn append(&mut self, rec: &HistoryRecord) -> io::Result<()> {
        let mut line = serde_json::to_string(rec).map_err(io::Error::other)?;
        line.push('\n');
        if self.file.is_none() {
            self.open()?;
        }
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let f = self.file.as_mut().expect("opened above");
        f.write_all(line.as_bytes())?;
        f.sync_data()?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn open(&mut self) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)?;
        let mut size = f.metadata()?.len();
        if size > 0 {
            // A line torn by a crash: end it, so the next line stands on its own.
            let mut last = [0u8];
            f.seek(SeekFrom::Start(size - 1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                f.write_all(b"\n")?;
                size += 1;
            }
        }
        self.file = Some(f);
        self.size = size;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        std::fs::rename(&self.path, rotated_path(&self.path))?;
        fsync_dir(parent_of(&self.path))?;
        self.open()?;
        fsync_dir(parent_of(&self.path))
    }
}

/// What [`read_history`] found.
#[derive(Debug, Default)]
pub struct HistoryRead {
    /// Records, oldest first (the rotated file, then the current one).
    pub records: Vec<HistoryRecord>,
    /// Lines that were not a history record (torn by a crash, or foreign).
    pub skipped_lines: usize,
    /// The files read.
    pub files: Vec<PathBuf>,
}

/// Reads the rotated file (if any), then `path`. A missing `path` is an error (no history).
pub fn read_history(path: &Path) -> io::Result<HistoryRead> {
    let mut out = HistoryRead::default();
    let rotated = rotated_path(path);
    if rotated.exists() {
        read_lines(&rotated, &mut out)?;
    }
    read_lines(path, &mut out)?;
    Ok(out)
}

fn read_lines(path: &Path, out: &mut HistoryRead) -> io::Result<()> {
    let f = File::open(path)?;
    for line in BufReader::new(f).split(b'\n') {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<HistoryRecord>(&line) {
            Ok(r) if r.v == HISTORY_VERSION => out.records.push(r),
            _ => out.skipped_lines += 1,
        }
    }
    out.files.push(path.to_path_buf());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::MetricValue;

    fn rec(i: u64) -> HistoryRecord {
        let mut s = Snapshot::new();
        s.insert("train_step".into(), MetricValue::Gauge(i as f64));
        s.insert("checkpoints_total".into(), MetricValue::Counter(i));
        s.insert("loss_control_old".into(), MetricValue::Gauge(f64::NAN));
        HistoryRecord::from_snapshot(1000 * i, i as f64, &s)
    }

    #[test]
    fn records_round_trip_and_nan_reads_back_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut w = HistoryWriter::new(p.clone(), 1 << 20);
        for i in 0..3 {
            w.append(&rec(i)).unwrap();
        }
        let r = read_history(&p).unwrap();
        assert_eq!(r.records, (0..3).map(rec).collect::<Vec<_>>());
        assert_eq!(r.records[2].metrics["train_step"], Some(2.0));
        assert_eq!(r.records[2].metrics["loss_control_old"], None);
        assert_eq!(r.skipped_lines, 0);
    }

    #[test]
    fn rotation_bounds_the_files_and_keeps_the_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let line_len = serde_json::to_string(&rec(10)).unwrap().len() as u64 + 1;
        let max = 5 * line_len;
        let mut w = HistoryWriter::new(p.clone(), max);
        for i in 10..40 {
            w.append(&rec(i)).unwrap();
            for f in [&p, &rotated_path(&p)] {
                if let Ok(m) = std::fs::metadata(f) {
                    assert!(m.len() <= max, "{} has {} bytes", f.display(), m.len());
                }
            }
        }
        let r = read_history(&p).unwrap();
        assert_eq!(r.files.len(), 2);
        let steps: Vec<u64> = r.records.iter().map(|r| r.unix_ms / 1000).collect();
        assert_eq!(*steps.last().unwrap(), 39);
        assert!(steps.windows(2).all(|w| w[1] == w[0] + 1), "{steps:?}");
        assert!(steps.len() >= 6 && steps.len() <= 10, "{steps:?}");
        assert_eq!(rotated_path(&p), dir.path().join("metrics.1.jsonl"));
    }

    #[test]
    fn a_torn_line_is_skipped_and_the_next_append_stands_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut w = HistoryWriter::new(p.clone(), 1 << 20);
        w.append(&rec(1)).unwrap();
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"v\":1,\"unix_ms\":12").unwrap();
        drop(f);
        let mut w = HistoryWriter::new(p.clone(), 1 << 20);
        w.append(&rec(2)).unwrap();
        let r = read_history(&p).unwrap();
        assert_eq!(r.records, vec![rec(1), rec(2)]);
        assert_eq!(r.skipped_lines, 1);
    }

    #[test]
    fn missing_history_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_history(&dir.path().join("metrics.jsonl")).is_err());
    }
}
