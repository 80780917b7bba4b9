//! Processing one inbox file.
//!
//! Order of effects (each durable before the next):
//! 1. hash the file (blake3) — the identity used by the store's journal;
//! 2. stream its rows into the store, skipping rows the store already has;
//! 3. `commit_file`: segments fsynced, then the journal entry fsynced;
//! 4. write the sidecar `<dest>.json` (temp + fsync + rename + dir fsync);
//! 5. rename the file to `<dest>` in `.done/` (or `.failed/`), fsync both directories.
//!
//! A crash before 3 leaves some rows durable: re-processing skips them and adds the
//! rest. A crash after 3 leaves a journal hit: re-processing appends nothing. A crash
//! between 4 and 5 leaves an orphan sidecar whose `content_hash` matches the file:
//! re-processing reuses its name, so the final state is the same as without a crash.
//! Destination names never overwrite: `name`, `name.1`, `name.2`, ….

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{IngestConfig, IngestError};
use crate::store::ReplayStore;
use crate::store::fsutil::{fsync_dir, now_ms, write_atomic};
use crate::text::csv_rows::{CsvError, CsvRowReader, Rejection};

/// Sidecar format version.
pub const SIDECAR_VERSION: u32 = 1;
/// Rejections listed in a sidecar.
pub const MAX_LISTED_REJECTIONS: usize = 100;

/// Final place of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Ingested (possibly with rejected rows); moved to `.done/`.
    Done,
    /// Refused as a whole; moved to `.failed/`.
    Failed,
}

impl Outcome {
    /// `done` or `failed` (the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
        }
    }

    fn dir_name(self) -> &'static str {
        match self {
            Outcome::Done => ".done",
            Outcome::Failed => ".failed",
        }
    }
}

/// One rejection as listed in a sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedRejection {
    /// 1-based physical line.
    pub line: u64,
    /// Human-readable reason.
    pub reason: String,
}

/// Timings of one file, microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Hashing.
    pub hash_us: u64,
    /// Parsing, appending and the durable commit.
    pub ingest_us: u64,
    /// Of which the durable commit (fsyncs, journal entry).
    pub commit_us: u64,
    /// Sidecar and move (up to the sidecar write).
    pub finish_us: u64,
    /// Whole processing up to the sidecar write.
    pub total_us: u64,
}

/// The JSON sidecar written next to a processed file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Format version (1).
    pub version: u32,
    /// Original file name in the inbox.
    pub file: String,
    /// `done` or `failed`.
    pub outcome: Outcome,
    /// Why the file was refused (failed only).
    pub reason: Option<String>,
    /// blake3 of the content, hex (absent when the file was not read).
    pub content_hash: Option<String>,
    /// File size.
    pub bytes: u64,
    /// `text` or `prompt_response` (when the header was valid).
    pub kind: Option<String>,
    /// Valid rows.
    pub rows_accepted: u64,
    /// Valid rows appended by this run.
    pub rows_appended: u64,
    /// Valid rows the store already had (a re-delivered or re-processed file).
    pub rows_already_present: u64,
    /// Rejected rows.
    pub rows_rejected: u64,
    /// Rejected rows that were malformed (field count, encoding).
    pub parse_errors: u64,
    /// The first 100 rejections.
    pub rejections: Vec<ListedRejection>,
    /// Header columns that were ignored.
    pub extra_columns_ignored: Vec<String>,
    /// Timings.
    pub timings: Timings,
    /// When processing finished, ms since the Unix epoch.
    pub processed_ms: u64,
    /// blake3 (hex) of this sidecar's pretty JSON written with `checksum: null`.
    pub checksum: Option<String>,
}

impl Sidecar {
    fn digest(&self) -> String {
        let bare = Sidecar {
            checksum: None,
            ..self.clone()
        };
        let json = serde_json::to_vec_pretty(&bare).expect("a sidecar always serializes");
        blake3::hash(&json).to_hex().to_string()
    }

    /// True when `checksum` matches the content.
    pub fn verify(&self) -> bool {
        self.checksum.as_deref() == Some(self.digest().as_str())
    }
}

/// What the actor needs from one processed file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileOutcome {
    /// `done` or `failed`.
    pub outcome: Outcome,
    /// Valid rows.
    pub rows_accepted: u64,
    /// Valid rows appended now.
    pub rows_appended: u64,
    /// Rejected rows.
    pub rows_rejected: u64,
    /// Malformed rows (subset of rejected).
    pub parse_errors: u64,
    /// File size.
    pub bytes: u64,
    /// Why the file was refused.
    pub reason: Option<String>,
    /// Where the file went.
    pub moved_to: PathBuf,
    /// Its sidecar.
    pub sidecar_path: PathBuf,
    /// Whole processing time, ms.
    pub total_ms: f64,
    /// Phase timings (as in the sidecar).
    pub timings: Timings,
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> IngestError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |source| IngestError::Io { what, path, source }
}

/// blake3 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<[u8; 32], IngestError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

fn hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

/// Result of streaming a file's rows into the store (before the commit).
#[derive(Debug)]
struct Streamed {
    accepted: u64,
    appended: u64,
    rejected: u64,
    parse_errors: u64,
    listed: Vec<ListedRejection>,
    kind: String,
    extra: Vec<String>,
}

/// Either the rows were streamed, or the file is refused with a reason.
enum StreamResult {
    Rows(Streamed),
    Refused(String),
}

fn stream_rows(
    path: &Path,
    name: &str,
    hash: &[u8; 32],
    store: &mut ReplayStore,
    cfg: &IngestConfig,
) -> Result<StreamResult, IngestError> {
    let stem = Path::new(name)
        .file_stem()
        .map_or_else(|| name.to_string(), |s| s.to_string_lossy().into_owned());
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut reader = match CsvRowReader::new(f, name, &stem, cfg.max_row_bytes as usize) {
        Ok(r) => r,
        Err(CsvError::Io { source, .. }) => return Err(io_err("read", path)(source)),
        Err(e) => return Ok(StreamResult::Refused(e.to_string())),
    };
    let mut s = Streamed {
        accepted: 0,
        appended: 0,
        rejected: 0,
        parse_errors: 0,
        listed: Vec::new(),
        kind: reader.schema().kind.as_str().to_string(),
        extra: reader.schema().extra_columns.clone(),
    };
    let committed = store.journal_entry(hash).is_some();
    let now = now_ms();
    loop {
        let next = match reader.next_row() {
            Ok(n) => n,
            Err(CsvError::Io { source, .. }) => return Err(io_err("read", path)(source)),
            Err(e) => return Err(io_err("read", path)(std::io::Error::other(e.to_string()))),
        };
        match next {
            None => break,
            Some(Ok(row)) => {
                s.accepted += 1;
                if !committed
                    && store
                        .append_row(hash, row.line, &row.source, &row.body, now)
                        .map_err(|source| IngestError::Store {
                            path: path.to_path_buf(),
                            source,
                        })?
                {
                    s.appended += 1;
                }
            }
            Some(Err(Rejection { line, reason })) => {
                s.rejected += 1;
                s.parse_errors += reason.is_parse_error() as u64;
                if s.listed.len() < MAX_LISTED_REJECTIONS {
                    s.listed.push(ListedRejection {
                        line,
                        reason: reason.to_string(),
                    });
                }
            }
        }
    }
    Ok(StreamResult::Rows(s))
}

/// Pick `<dir>/<name>[.k]` such that neither it nor its `.json` sidecar exists, except
/// that an orphan sidecar (no file beside it) recording the same content hash is
/// reused: that is this file's own sidecar from a run that crashed before the move.
fn choose_dest(
    dir: &Path,
    name: &str,
    hash: Option<&str>,
) -> Result<(PathBuf, PathBuf), IngestError> {
    for k in 0u64.. {
        let cand = if k == 0 {
            name.to_string()
        } else {
            format!("{name}.{k}")
        };
        let file = dir.join(&cand);
        let side = dir.join(format!("{cand}.json"));
        let file_exists = file.symlink_metadata().is_ok();
        if file_exists {
            continue;
        }
        if side.symlink_metadata().is_err() {
            return Ok((file, side));
        }
        if let Some(h) = hash
            && let Ok(bytes) = fs::read(&side)
            && let Ok(old) = serde_json::from_slice::<Sidecar>(&bytes)
            && old.content_hash.as_deref() == Some(h)
        {
            return Ok((file, side));
        }
    }
    unreachable!("u64 range of suffixes exhausted")
}

fn write_sidecar(path: &Path, sidecar: &Sidecar) -> Result<(), IngestError> {
    let sealed = Sidecar {
        checksum: Some(sidecar.digest()),
        ..sidecar.clone()
    };
    let json = serde_json::to_vec_pretty(&sealed).map_err(|e| IngestError::Io {
        what: "serialize sidecar".into(),
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(path, &json).map_err(io_err("write sidecar", path))
}

fn move_file(from: &Path, to: &Path) -> Result<(), IngestError> {
    fs::rename(from, to).map_err(io_err("move processed file", from))?;
    let to_dir = to.parent().expect("destination has a parent");
    fsync_dir(to_dir).map_err(io_err("fsync", to_dir))?;
    let from_dir = from.parent().expect("inbox file has a parent");
    fsync_dir(from_dir).map_err(io_err("fsync", from_dir))
}

fn outcome_dir(inbox: &Path, outcome: Outcome) -> Result<PathBuf, IngestError> {
    let dir = inbox.join(outcome.dir_name());
    if !dir.is_dir() {
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        fsync_dir(inbox).map_err(io_err("fsync", inbox))?;
    }
    Ok(dir)
}

/// Write the sidecar, then move the file beside it.
fn finish(
    inbox: &Path,
    path: &Path,
    mut sidecar: Sidecar,
    started: Instant,
) -> Result<FileOutcome, IngestError> {
    let t = Instant::now();
    let dir = outcome_dir(inbox, sidecar.outcome)?;
    let (dest, side) = choose_dest(&dir, &sidecar.file, sidecar.content_hash.as_deref())?;
    sidecar.processed_ms = now_ms();
    sidecar.timings.finish_us = us(t);
    sidecar.timings.total_us = us(started);
    write_sidecar(&side, &sidecar)?;
    move_file(path, &dest)?;
    Ok(FileOutcome {
        outcome: sidecar.outcome,
        rows_accepted: sidecar.rows_accepted,
        rows_appended: sidecar.rows_appended,
        rows_rejected: sidecar.rows_rejected,
        parse_errors: sidecar.parse_errors,
        bytes: sidecar.bytes,
        reason: sidecar.reason,
        moved_to: dest,
        sidecar_path: side,
        total_ms: ms(started),
        timings: sidecar.timings,
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn us(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

fn empty_sidecar(name: &str, bytes: u64) -> Sidecar {
    Sidecar {
        version: SIDECAR_VERSION,
        file: name.to_string(),
        outcome: Outcome::Failed,
        reason: None,
        content_hash: None,
        bytes,
        kind: None,
        rows_accepted: 0,
        rows_appended: 0,
        rows_already_present: 0,
        rows_rejected: 0,
        parse_errors: 0,
        rejections: Vec::new(),
        extra_columns_ignored: Vec::new(),
        timings: Timings::default(),
        processed_ms: 0,
        checksum: None,
    }
}

/// Process one ready inbox file: ingest it durably into `store` and move it to
/// `inbox/.done/` with a sidecar, or refuse it to `inbox/.failed/` with a sidecar
/// giving the reason (symbolic link, empty, larger than `max_file_bytes`, bad or
/// non-UTF-8 header). An `Err` leaves the file in the inbox for a retry.
pub fn process_file(
    inbox: &Path,
    path: &Path,
    store: &mut ReplayStore,
    cfg: &IngestConfig,
) -> Result<FileOutcome, IngestError> {
    let started = Instant::now();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| IngestError::NotAFile {
            path: path.to_path_buf(),
            why: "no UTF-8 file name".into(),
        })?
        .to_string();
    let meta = path.symlink_metadata().map_err(io_err("stat", path))?;
    let mut sidecar = empty_sidecar(&name, meta.len());
    let refuse = |mut sc: Sidecar, reason: String| {
        sc.reason = Some(reason);
        finish(inbox, path, sc, started)
    };
    if meta.file_type().is_symlink() {
        return refuse(
            sidecar,
            "symbolic link: links are refused, move the file itself into the inbox".into(),
        );
    }
    if !meta.is_file() {
        return Err(IngestError::NotAFile {
            path: path.to_path_buf(),
            why: "not a regular file".into(),
        });
    }
    if meta.len() == 0 {
        return refuse(sidecar, "empty file (0 bytes): nothing to ingest".into());
    }
    if meta.len() > cfg.max_file_bytes {
        return refuse(
            sidecar,
            format!(
                "file has {} bytes, more than ingest.max_file_bytes = {}; split it into smaller files",
                meta.len(),
                cfg.max_file_bytes
            ),
        );
    }
    let t = Instant::now();
    let hash = hash_file(path)?;
    sidecar.content_hash = Some(hex(&hash));
    sidecar.timings.hash_us = us(t);
    let t = Instant::now();
    let s = match stream_rows(path, &name, &hash, store, cfg)? {
        StreamResult::Refused(reason) => return refuse(sidecar, reason),
        StreamResult::Rows(s) => s,
    };
    let tc = Instant::now();
    store
        .commit_file(&hash, s.accepted, s.rejected)
        .map_err(|source| IngestError::Store {
            path: path.to_path_buf(),
            source,
        })?;
    sidecar.timings.commit_us = us(tc);
    sidecar.timings.ingest_us = us(t);
    sidecar.outcome = Outcome::Done;
    sidecar.kind = Some(s.kind);
    sidecar.rows_accepted = s.accepted;
    sidecar.rows_appended = s.appended;
    sidecar.rows_already_present = s.accepted - s.appended;
    sidecar.rows_rejected = s.rejected;
    sidecar.parse_errors = s.parse_errors;
    sidecar.rejections = s.listed;
    sidecar.extra_columns_ignored = s.extra;
    finish(inbox, path, sidecar, started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ReplayConfig;
    use crate::store::format::HEADER_LEN;
    use std::collections::HashMap;

    struct Env {
        _tmp: tempfile::TempDir,
        inbox: PathBuf,
        replay: PathBuf,
    }

    fn env() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let inbox = tmp.path().join("inbox");
        let replay = tmp.path().join("replay");
        fs::create_dir_all(&inbox).unwrap();
        Env {
            _tmp: tmp,
            inbox,
            replay,
        }
    }

    fn store(e: &Env) -> ReplayStore {
        let cfg = ReplayConfig {
            segment_bytes: 4096,
            ..Default::default()
        };
        ReplayStore::open(&e.replay, &cfg).unwrap().0
    }

    fn csv_text(n: usize) -> String {
        let mut s = String::from("text,source\n");
        for i in 0..n {
            s.push_str(&format!("\"row {i}, with a comma\",src{}\n", i % 3));
            if i % 7 == 3 {
                s.push_str("bad,row,extra\n");
            }
        }
        s
    }

    /// (row line → count) of everything in the store.
    fn store_rows(st: &ReplayStore) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for r in st.rows_after(0, usize::MAX).unwrap() {
            *m.entry(r.row).or_default() += 1;
        }
        for g in st.control_groups(0, usize::MAX).unwrap() {
            for r in g.records {
                *m.entry(r.row).or_default() += 1;
            }
        }
        m
    }

    fn done_names(e: &Env) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(e.inbox.join(".done"))
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn done_file_gets_sidecar_and_rows() {
        let e = env();
        let p = e.inbox.join("a.csv");
        fs::write(&p, csv_text(50)).unwrap();
        let mut st = store(&e);
        let out = process_file(&e.inbox, &p, &mut st, &IngestConfig::default()).unwrap();
        assert_eq!(out.outcome, Outcome::Done);
        assert_eq!((out.rows_accepted, out.rows_appended), (50, 50));
        assert_eq!(out.rows_rejected, 7);
        assert_eq!(out.parse_errors, 7);
        assert!(!p.exists());
        assert_eq!(done_names(&e), vec!["a.csv", "a.csv.json"]);
        let sc: Sidecar = serde_json::from_slice(&fs::read(&out.sidecar_path).unwrap()).unwrap();
        assert_eq!(sc.rejections.len(), 7);
        assert_eq!(sc.rejections[0].line, 6);
        assert_eq!(sc.kind.as_deref(), Some("text"));
        assert!(sc.verify());
        let tampered = Sidecar {
            rows_accepted: 49,
            ..sc.clone()
        };
        assert!(!tampered.verify());
        let rows = store_rows(&st);
        assert_eq!(rows.len(), 50);
        assert!(rows.values().all(|&c| c == 1));
        assert_eq!(st.stats().by_source.len(), 3);
    }

    #[test]
    fn redelivered_file_adds_nothing_and_never_overwrites() {
        let e = env();
        let mut st = store(&e);
        for _ in 0..3 {
            let p = e.inbox.join("a.csv");
            fs::write(&p, csv_text(20)).unwrap();
            process_file(&e.inbox, &p, &mut st, &IngestConfig::default()).unwrap();
        }
        assert_eq!(
            done_names(&e),
            vec![
                "a.csv",
                "a.csv.1",
                "a.csv.1.json",
                "a.csv.2",
                "a.csv.2.json",
                "a.csv.json"
            ]
        );
        let sc: Sidecar =
            serde_json::from_slice(&fs::read(e.inbox.join(".done/a.csv.2.json")).unwrap()).unwrap();
        assert_eq!(
            (sc.rows_accepted, sc.rows_appended, sc.rows_already_present),
            (20, 0, 20)
        );
        assert_eq!(store_rows(&st).len(), 20);
        assert_eq!(st.stats().rows, 20);
    }

    #[test]
    fn refused_files_go_to_failed_with_reason() {
        let e = env();
        let mut st = store(&e);
        let cfg = IngestConfig {
            max_file_bytes: 100,
            ..Default::default()
        };
        let cases = [
            ("hdr.csv", "id,body\n1,x\n".to_string(), "no `text` column"),
            ("empty.csv", String::new(), "empty file"),
            ("big.csv", csv_text(10), "max_file_bytes"),
        ];
        for (name, content, why) in cases {
            let p = e.inbox.join(name);
            fs::write(&p, content).unwrap();
            let out = process_file(&e.inbox, &p, &mut st, &cfg).unwrap();
            assert_eq!(out.outcome, Outcome::Failed, "{name}");
            assert!(
                out.reason.as_deref().unwrap().contains(why),
                "{name}: {:?}",
                out.reason
            );
            assert!(out.moved_to.starts_with(e.inbox.join(".failed")));
            assert!(out.sidecar_path.exists());
        }
        std::os::unix::fs::symlink("/etc/hostname", e.inbox.join("l.csv")).unwrap();
        let out = process_file(&e.inbox, &e.inbox.join("l.csv"), &mut st, &cfg).unwrap();
        assert_eq!(out.outcome, Outcome::Failed);
        assert!(
            out.moved_to
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(st.stats().rows, 0);
    }

    /// Simulated crash stages: every one ends, after re-processing, in the same final
    /// state: each valid row once in the store, the file and one sidecar in `.done/`.
    #[test]
    fn crash_at_every_stage_converges_to_the_same_state() {
        let cfg = IngestConfig::default();
        for stage in 0..6 {
            let e = env();
            let p = e.inbox.join("f.csv");
            fs::write(&p, csv_text(300)).unwrap();
            {
                let mut st = store(&e);
                let hash = hash_file(&p).unwrap();
                if stage >= 1 {
                    let s = match stream_rows(&p, "f.csv", &hash, &mut st, &cfg).unwrap() {
                        StreamResult::Rows(s) => s,
                        StreamResult::Refused(r) => panic!("{r}"),
                    };
                    if stage == 2 {
                        // Crash after append, before fsync, with a torn tail.
                        drop(st);
                        let mut segs: Vec<PathBuf> = fs::read_dir(&e.replay)
                            .unwrap()
                            .map(|d| d.unwrap().path())
                            .filter(|p| {
                                p.to_string_lossy().ends_with(".log")
                                    && p.file_name().unwrap() != "journal.log"
                            })
                            .collect();
                        segs.sort();
                        let last = segs.last().unwrap();
                        let len = fs::metadata(last).unwrap().len();
                        let f = fs::OpenOptions::new().write(true).open(last).unwrap();
                        f.set_len(HEADER_LEN + (len - HEADER_LEN) / 2 + 3).unwrap();
                        continue_to_recovery(&e, &p, &cfg);
                        continue;
                    }
                    if stage >= 3 {
                        st.commit_file(&hash, s.accepted, s.rejected).unwrap();
                    }
                    if stage >= 4 {
                        let mut sc = empty_sidecar("f.csv", 0);
                        sc.outcome = Outcome::Done;
                        sc.content_hash = Some(hex(&hash));
                        let dir = outcome_dir(&e.inbox, Outcome::Done).unwrap();
                        let (dest, side) =
                            choose_dest(&dir, "f.csv", sc.content_hash.as_deref()).unwrap();
                        write_sidecar(&side, &sc).unwrap();
                        if stage == 5 {
                            move_file(&p, &dest).unwrap();
                        }
                    }
                }
            }
            if stage == 5 {
                let st = store(&e);
                assert_eq!(store_rows(&st).len(), 300);
                assert_eq!(done_names(&e), vec!["f.csv", "f.csv.json"]);
                continue;
            }
            continue_to_recovery(&e, &p, &cfg);
        }
    }

    fn continue_to_recovery(e: &Env, p: &Path, cfg: &IngestConfig) {
        let mut st = store(e);
        let out = process_file(&e.inbox, p, &mut st, cfg).unwrap();
        assert_eq!(out.rows_accepted, 300);
        let rows = store_rows(&st);
        assert_eq!(rows.len(), 300);
        assert!(rows.values().all(|&c| c == 1));
        assert_eq!(done_names(e), vec!["f.csv", "f.csv.json"]);
        let sc: Sidecar = serde_json::from_slice(&fs::read(&out.sidecar_path).unwrap()).unwrap();
        assert_eq!(sc.rows_accepted, 300);
        assert_eq!(sc.rows_appended + sc.rows_already_present, 300);
        drop(st);
        let st = store(e);
        assert_eq!(store_rows(&st).len(), 300);
    }
}
