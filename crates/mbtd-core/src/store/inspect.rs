//! Read-only inspection of a replay directory (works with the daemon stopped; changes
//! nothing on disk): verifies every record's CRC and counts rows.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::format::{HeaderCheck, check_header, scan_segment};
use super::journal::{self, JournalScan};
use super::replay::is_control;
use super::state::StoreState;

/// One segment's findings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReport {
    /// File name.
    pub name: String,
    /// File size.
    pub bytes: u64,
    /// `ok`, `short header`, `corrupt header` or `version N`.
    pub header: String,
    /// Records with a valid CRC.
    pub records: u64,
    /// Of those, records already evicted (awaiting compaction).
    pub evicted: u64,
    /// Corrupt regions in the middle.
    pub corrupt_regions: u64,
    /// Corrupt bytes in the middle.
    pub corrupt_bytes: u64,
    /// Bytes of a bad tail (torn write).
    pub tail_bytes: u64,
    /// Smallest and largest sequence numbers.
    pub seq_range: Option<(u64, u64)>,
}

/// Per-source counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCounts {
    /// Live rows.
    pub rows: u64,
    /// Of which control rows.
    pub control: u64,
    /// Text rows.
    pub text: u64,
    /// Prompt/response rows.
    pub prompt_response: u64,
}

/// Result of [`inspect_replay`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InspectReport {
    /// The directory.
    pub dir: PathBuf,
    /// True when every CRC verified and no segment or journal damage was found.
    pub ok: bool,
    /// Seed of the store's eviction keys.
    pub seed: u64,
    /// Control fraction of the store.
    pub control_fraction: f64,
    /// Live rows.
    pub rows: u64,
    /// Live control rows.
    pub control_rows: u64,
    /// Live record bytes.
    pub bytes: u64,
    /// Rows evicted since creation (from `state.bin`).
    pub evicted_total: u64,
    /// Per segment.
    pub segments: Vec<SegmentReport>,
    /// Journal findings.
    pub journal: JournalScan,
    /// Per source.
    pub by_source: BTreeMap<String, SourceCounts>,
    /// Per kind.
    pub by_kind: BTreeMap<String, u64>,
}

/// Inspect `dir` without modifying it.
pub fn inspect_replay(dir: &Path) -> Result<InspectReport, StoreError> {
    let io = |what: &str, path: &Path| {
        let what = what.to_string();
        let path = path.to_path_buf();
        move |source| StoreError::Io { what, path, source }
    };
    let state_path = dir.join("state.bin");
    let state = StoreState::decode(
        &state_path,
        &std::fs::read(&state_path).map_err(io("read store state", &state_path))?,
    )?;
    let mut rep = InspectReport {
        dir: dir.to_path_buf(),
        evicted_total: state.evicted_total,
        seed: state.seed,
        control_fraction: state.control_fraction,
        ok: true,
        ..Default::default()
    };
    let journal_path = dir.join("journal.log");
    if journal_path.exists() {
        let bytes = std::fs::read(&journal_path).map_err(io("read journal", &journal_path))?;
        rep.journal = journal::parse(&journal_path, &bytes)?.1;
        rep.ok &= rep.journal.corrupt_entries == 0 && rep.journal.torn_tail_bytes == 0;
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io("list replay directory", dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seg-") && n.ends_with(".log"))
        .collect();
    names.sort();
    let mut min_seq = 1;
    for name in names {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(io("read segment", &path))?;
        let mut s = SegmentReport {
            name,
            bytes: bytes.len() as u64,
            ..Default::default()
        };
        s.header = match check_header(&bytes) {
            HeaderCheck::Ok => "ok".into(),
            HeaderCheck::V1 => "ok (version 1, rows without a time)".into(),
            HeaderCheck::Short => "short header".into(),
            HeaderCheck::Corrupt => "corrupt header".into(),
            HeaderCheck::Version(v) => format!("version {v}"),
        };
        if !s.header.starts_with("ok") {
            rep.ok = false;
            rep.segments.push(s);
            continue;
        }
        let scan = scan_segment(&bytes, min_seq);
        s.corrupt_regions = scan.corrupt.len() as u64;
        s.corrupt_bytes = scan.corrupt.iter().map(|c| c.1).sum();
        s.tail_bytes = scan.tail_bytes;
        rep.ok &= s.corrupt_regions == 0 && s.tail_bytes == 0;
        for r in &scan.records {
            let rec = &r.record;
            min_seq = rec.seq + 1;
            s.records += 1;
            s.seq_range = Some((s.seq_range.map_or(rec.seq, |x| x.0), rec.seq));
            let control = is_control(state.control_fraction, &rec.body);
            if state.is_evicted(rec.seq, control) {
                s.evicted += 1;
                continue;
            }
            rep.rows += 1;
            rep.bytes += r.frame_len as u64;
            let c = rep.by_source.entry(rec.source.clone()).or_default();
            c.rows += 1;
            let kind = rec.body.kind();
            match kind {
                crate::text::csv_rows::RowKind::Text => c.text += 1,
                crate::text::csv_rows::RowKind::PromptResponse => c.prompt_response += 1,
            }
            if control {
                c.control += 1;
                rep.control_rows += 1;
            }
            *rep.by_kind.entry(kind.as_str().to_string()).or_default() += 1;
        }
        rep.segments.push(s);
    }
    Ok(rep)
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "replay store {}", self.dir.display())?;
        writeln!(
            f,
            "  rows {}  control {}  bytes {}  evicted total {}  seed {}  control_fraction {}",
            self.rows,
            self.control_rows,
            self.bytes,
            self.evicted_total,
            self.seed,
            self.control_fraction
        )?;
        writeln!(
            f,
            "  journal: {} files, {} corrupt entries, {} torn bytes",
            self.journal.entries, self.journal.corrupt_entries, self.journal.torn_tail_bytes
        )?;
        let segment = |f: &mut fmt::Formatter<'_>, cols: [&str; 8]| {
            let [name, bytes, records, evicted, corrupt, tail, seqs, header] = cols;
            writeln!(
                f,
                "  {name:<20} {bytes:>12} {records:>10} {evicted:>8} {corrupt:>8} {tail:>8} {seqs:>10}  {header}"
            )
        };
        let title = [
            "segment", "bytes", "records", "evicted", "corrupt", "tail", "seqs", "header",
        ];
        segment(f, title)?;
        for s in &self.segments {
            let seqs = s
                .seq_range
                .map_or("-".to_string(), |(a, b)| format!("{a}-{b}"));
            let counts = [
                s.bytes,
                s.records,
                s.evicted,
                s.corrupt_regions,
                s.tail_bytes,
            ];
            let [bytes, records, evicted, corrupt, tail] = counts.map(|n| n.to_string());
            let row = [
                &s.name, &bytes, &records, &evicted, &corrupt, &tail, &seqs, &s.header,
            ];
            segment(f, row.map(String::as_str))?;
        }
        writeln!(
            f,
            "  {:<24} {:>10} {:>8} {:>10} {:>16}",
            "source", "rows", "control", "text", "prompt_response"
        )?;
        for (src, c) in &self.by_source {
            writeln!(
                f,
                "  {:<24} {:>10} {:>8} {:>10} {:>16}",
                src, c.rows, c.control, c.text, c.prompt_response
            )?;
        }
        write!(
            f,
            "  verdict: {}",
            if self.ok {
                "all CRCs verified, no damage"
            } else {
                "damage found (see above); opening the store repairs torn tails and skips corrupt records"
            }
        )
    }
}
