//! Processing one inbox file.
//!
//! Order of effects (each durable before the next):
//! 1. hash the file (blake3) — the identity used by the store's journal;
//! 2. stream its rows to the store in chunks ([`RowSink`]), skipping rows it already has;
//! 3. look at the file again: if its size or mtime changed while it was read (a writer
//!    still appending), the appended rows are rolled back and the file waits to settle
//!    again ([`IngestError::Changed`]);
//! 4. commit: segments fsynced, then the journal entry fsynced;
//! 5. look at the file again: if it grew between 3 and 4, the rows after the last line
//!    read are ingested too (1–4 for the new content; the lines already committed are
//!    skipped, after checking that the file still starts with the committed bytes), so a
//!    file is never moved with rows nobody read;
//! 6. write the sidecar `<dest>.json` (temp + fsync + rename + dir fsync);
//! 7. rename the file to `<dest>` in `.done/` (or `.failed/`), fsync both directories.
//!
//! A crash before 4 leaves some rows durable: re-processing skips them and adds the
//! rest. A crash after 4 leaves a journal hit: re-processing appends nothing. A crash
//! between 6 and 7 leaves an orphan sidecar whose `content_hash` matches the file:
//! re-processing reuses its name, so the final state is the same as without a crash.
//! Destination names never overwrite: `name`, `name.1`, `name.2`, …. One window is not
//! covered: a crash after a file that grew during step 4 was committed once and before
//! its new rows were: after the restart the grown file is new content, and its first
//! rows are appended a second time.
//!
//! Retries within one process: a [`Progress`] remembers, per inbox path, what was
//! committed (bytes, hash, last line, counts). A retry after a failure in 5–7 (a full
//! disk) starts from there, so the sidecar counts every row once, as appended.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use super::sidecar::{
    FileOutcome, ListedRejection, MAX_LISTED_REJECTIONS, MAX_REASON_CHARS, Outcome, Sidecar,
    empty_sidecar, finish, io_err, listed_columns, us,
};
use super::sink::{CHUNK_BYTES, CHUNK_ROWS, RowSink};
use super::{IngestConfig, IngestError};
use crate::store::fsutil::{now_ms, system_ms};
use crate::text::csv_rows::{CsvError, CsvRowReader, Rejection, clip_chars};

/// Passes over a file that keeps growing before it is left to settle again.
const MAX_PASSES: usize = 4;

/// blake3 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<[u8; 32], IngestError> {
    hash_with_prefix(path, 0).map(|(h, _)| h)
}

/// blake3 of the whole file and of its first `prefix` bytes (one read).
fn hash_with_prefix(path: &Path, prefix: u64) -> Result<([u8; 32], [u8; 32]), IngestError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut h = blake3::Hasher::new();
    let mut at_prefix = (prefix == 0).then(|| *h.finalize().as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        if at_prefix.is_none() && read + n as u64 >= prefix {
            let cut = (prefix - read) as usize;
            h.update(&buf[..cut]);
            at_prefix = Some(*h.finalize().as_bytes());
            h.update(&buf[cut..n]);
        } else {
            h.update(&buf[..n]);
        }
        read += n as u64;
    }
    // A file shorter than the prefix cannot start with it.
    let prefix_hash = at_prefix.unwrap_or([0; 32]);
    Ok((*h.finalize().as_bytes(), prefix_hash))
}

pub(super) fn hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

/// Size and mtime: a file whose snapshot changed was written to meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Snapshot {
    len: u64,
    mtime: Option<SystemTime>,
}

impl Snapshot {
    fn of(path: &Path) -> Result<Snapshot, IngestError> {
        let m = path.symlink_metadata().map_err(io_err("stat", path))?;
        Ok(Snapshot {
            len: m.len(),
            mtime: m.modified().ok(),
        })
    }
}

/// Counts of a file (or of one pass over it).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Counts {
    pub(super) accepted: u64,
    pub(super) appended: u64,
    pub(super) rejected: u64,
    pub(super) parse_errors: u64,
    pub(super) listed: Vec<ListedRejection>,
    pub(super) kind: String,
    pub(super) extra: Vec<String>,
    /// Last physical line read.
    pub(super) last_line: u64,
}

impl Counts {
    fn add(&mut self, pass: Counts) {
        self.accepted += pass.accepted;
        self.appended += pass.appended;
        self.rejected += pass.rejected;
        self.parse_errors += pass.parse_errors;
        let room = MAX_LISTED_REJECTIONS.saturating_sub(self.listed.len());
        self.listed.extend(pass.listed.into_iter().take(room));
        if self.kind.is_empty() {
            self.kind = pass.kind;
            self.extra = pass.extra;
        }
        self.last_line = self.last_line.max(pass.last_line);
    }
}

/// What was committed of one inbox file.
#[derive(Clone, Debug, PartialEq)]
struct Committed {
    /// Bytes read and committed.
    bytes: u64,
    /// blake3 of those bytes (the content hash of the last pass).
    hash: [u8; 32],
    counts: Counts,
}

/// What this process committed of files still in the inbox (see the module doc).
#[derive(Debug, Default)]
pub struct Progress {
    files: HashMap<PathBuf, Committed>,
}

impl Progress {
    /// Forget files that are no longer where they were.
    pub fn retain_existing(&mut self) {
        self.files.retain(|p, _| p.symlink_metadata().is_ok());
    }

    /// Files partly or wholly committed and not moved yet.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no file is in progress.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Either the rows were streamed, or the file is refused with a reason.
pub(super) enum StreamResult {
    Rows(Counts),
    Refused(String),
}

/// Read the rows of `path` after line `skip_through`; when `append`, hand them to `sink`
/// in chunks, each row with its `time` cell or else the file's mtime. Counts every row read.
pub(super) fn stream_rows<S: RowSink + ?Sized>(
    path: &Path,
    name: &str,
    hash: &[u8; 32],
    sink: &mut S,
    cfg: &IngestConfig,
    skip_through: u64,
    append: bool,
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
    let mut s = Counts {
        kind: reader.schema().kind.as_str().to_string(),
        extra: reader.schema().extra_columns.clone(),
        ..Counts::default()
    };
    let now = now_ms();
    // rows without a `time` cell arrived when the file was last written
    let file_ms = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_or(now as i64, system_ms);
    let (mut chunk, mut chunk_bytes) = (Vec::new(), 0usize);
    loop {
        let next = match reader.next_row() {
            Ok(n) => n,
            Err(CsvError::Io { source, .. }) => return Err(io_err("read", path)(source)),
            Err(e) => return Err(io_err("read", path)(std::io::Error::other(e.to_string()))),
        };
        match next {
            None => break,
            Some(Ok(mut row)) if row.line > skip_through => {
                row.time_ms.get_or_insert(file_ms);
                s.accepted += 1;
                s.last_line = row.line;
                if append {
                    chunk_bytes += row.body.text_bytes();
                    chunk.push(row);
                    if chunk.len() >= CHUNK_ROWS || chunk_bytes >= CHUNK_BYTES {
                        sink.append(hash, std::mem::take(&mut chunk), now)?;
                        chunk_bytes = 0;
                    }
                }
            }
            Some(Err(Rejection { line, reason })) if line > skip_through => {
                s.rejected += 1;
                s.last_line = line;
                s.parse_errors += reason.is_parse_error() as u64;
                if s.listed.len() < MAX_LISTED_REJECTIONS {
                    s.listed.push(ListedRejection {
                        line,
                        reason: clip_chars(&reason.to_string(), MAX_REASON_CHARS),
                    });
                }
            }
            Some(_) => {}
        }
    }
    if !chunk.is_empty() {
        sink.append(hash, chunk, now)?;
    }
    Ok(StreamResult::Rows(s))
}

/// The file being processed.
struct FileCtx<'a> {
    path: &'a Path,
    name: &'a str,
    cfg: &'a IngestConfig,
}

/// One pass: stream the rows after `skip_through`, check the file did not change since
/// `snap`, commit (its time added to `commit_us`).
fn ingest_pass<S: RowSink + ?Sized>(
    f: &FileCtx<'_>,
    sink: &mut S,
    hash: &[u8; 32],
    snap: Snapshot,
    skip_through: u64,
    totals: &Counts,
    commit_us: &mut u64,
) -> Result<StreamResult, IngestError> {
    let append = !sink.is_committed(hash)?;
    let mut s = match stream_rows(f.path, f.name, hash, sink, f.cfg, skip_through, append)? {
        StreamResult::Rows(s) => s,
        refused => return Ok(refused),
    };
    if Snapshot::of(f.path)? != snap {
        return Err(IngestError::Changed {
            path: f.path.to_path_buf(),
        });
    }
    let t = Instant::now();
    s.appended = sink.commit(
        hash,
        totals.accepted + s.accepted,
        totals.rejected + s.rejected,
    )?;
    *commit_us += us(t);
    Ok(StreamResult::Rows(s))
}

/// Process one ready inbox file: ingest it durably into `sink` and move it to
/// `inbox/.done/` with a sidecar, or refuse it to `inbox/.failed/` with a sidecar
/// giving the reason (symbolic link or other non-regular entry, empty, larger than
/// `max_file_bytes`, bad or non-UTF-8 header). An `Err` leaves the file in the inbox
/// for a retry ([`IngestError::Changed`]: once it has settled again).
pub fn process_file<S: RowSink + ?Sized>(
    inbox: &Path,
    path: &Path,
    sink: &mut S,
    cfg: &IngestConfig,
) -> Result<FileOutcome, IngestError> {
    process_file_resuming(inbox, path, sink, cfg, &mut Progress::default())
}

/// [`process_file`] that records what it committed in `progress` and resumes from it
/// (see the module doc). Keep one `Progress` for all files of an inbox.
pub fn process_file_resuming<S: RowSink + ?Sized>(
    inbox: &Path,
    path: &Path,
    sink: &mut S,
    cfg: &IngestConfig,
    progress: &mut Progress,
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
    let ft = meta.file_type();
    if ft.is_symlink() {
        return refuse(
            sidecar,
            "symbolic link: links are refused, move the file itself into the inbox".into(),
        );
    }
    if ft.is_dir() {
        return Err(IngestError::NotAFile {
            path: path.to_path_buf(),
            why: "a directory".into(),
        });
    }
    if !ft.is_file() {
        return refuse(
            sidecar,
            "not a regular file (a FIFO, socket or device); move a regular file into the inbox"
                .into(),
        );
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
    let mut done = progress.files.get(path).cloned();
    let mut settled = false;
    for _ in 0..MAX_PASSES {
        let snap = Snapshot::of(path)?;
        let t = Instant::now();
        let (hash, prefix) = hash_with_prefix(path, done.as_ref().map_or(0, |c| c.bytes))?;
        sidecar.timings.hash_us += us(t);
        if let Some(c) = &done {
            if c.hash == hash {
                settled = true;
                break;
            }
            if prefix != c.hash {
                // Rewritten rather than appended to: new content from the first line.
                done = None;
            }
        }
        let t = Instant::now();
        let (skip, totals) = done.as_ref().map_or((0, Counts::default()), |c| {
            (c.counts.last_line, c.counts.clone())
        });
        let ctx = FileCtx {
            path,
            name: &name,
            cfg,
        };
        let commit_us = &mut sidecar.timings.commit_us;
        let pass = ingest_pass(&ctx, sink, &hash, snap, skip, &totals, commit_us);
        sidecar.timings.ingest_us += us(t);
        let pass = match pass {
            Ok(StreamResult::Rows(p)) => p,
            Ok(StreamResult::Refused(reason)) => {
                sink.abort();
                sidecar.content_hash = Some(hex(&hash));
                return refuse(sidecar, reason);
            }
            Err(e) => {
                sink.abort();
                return Err(e);
            }
        };
        let mut counts = totals;
        counts.add(pass);
        let c = Committed {
            bytes: snap.len,
            hash,
            counts,
        };
        progress.files.insert(path.to_path_buf(), c.clone());
        done = Some(c);
        if Snapshot::of(path)? == snap {
            settled = true;
            break;
        }
    }
    let c = match (settled, done) {
        (true, Some(c)) => c,
        _ => {
            return Err(IngestError::Changed {
                path: path.to_path_buf(),
            });
        }
    };
    let n = c.counts;
    sidecar.bytes = c.bytes;
    sidecar.content_hash = Some(hex(&c.hash));
    sidecar.outcome = Outcome::Done;
    sidecar.kind = Some(n.kind);
    sidecar.rows_accepted = n.accepted;
    sidecar.rows_appended = n.appended;
    sidecar.rows_already_present = n.accepted - n.appended;
    sidecar.rows_rejected = n.rejected;
    sidecar.parse_errors = n.parse_errors;
    sidecar.rejections = n.listed;
    sidecar.extra_columns_ignored = listed_columns(&n.extra);
    sidecar.extra_columns_total = n.extra.len() as u64;
    let out = finish(inbox, path, sidecar, started)?;
    progress.files.remove(path);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::sidecar::{
        MAX_LISTED_COLUMNS, choose_dest, move_file, outcome_dir, write_sidecar,
    };
    use crate::store::format::HEADER_LEN;
    use crate::store::{ReplayConfig, ReplayStore};
    use crate::text::csv_rows::CsvRow;
    use std::fs;

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

    /// Found by a hostile-operator probe: files in `.done/` kept the producer's mode
    /// (0644: world-readable).
    #[test]
    fn done_files_lose_the_bits_their_directory_does_not_grant() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for (dir_mode, want) in [(0o700, 0o600), (0o750, 0o640)] {
            let e = env();
            let done = e.inbox.join(".done");
            fs::create_dir_all(&done).unwrap();
            fs::set_permissions(&done, fs::Permissions::from_mode(dir_mode)).unwrap();
            let p = e.inbox.join("open.csv");
            fs::write(&p, csv_text(3)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o666)).unwrap();
            let mut st = store(&e);
            let out = process_file(&e.inbox, &p, &mut st, &IngestConfig::default()).unwrap();
            assert_eq!(mode(&out.moved_to), want, "in a {dir_mode:o} directory");
        }
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
                    let s = match stream_rows(&p, "f.csv", &hash, &mut st, &cfg, 0, true).unwrap() {
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

    /// A sink over the store that runs a hook once: at the first append, or right after
    /// the first commit (a writer appending to the file at those moments).
    struct Hooked<'a> {
        store: &'a mut ReplayStore,
        on_append: Option<Box<dyn FnOnce()>>,
        after_commit: Option<Box<dyn FnOnce()>>,
    }

    impl RowSink for Hooked<'_> {
        fn is_committed(&mut self, hash: &[u8; 32]) -> Result<bool, IngestError> {
            self.store.is_committed(hash)
        }
        fn append(&mut self, h: &[u8; 32], rows: Vec<CsvRow>, ms: u64) -> Result<(), IngestError> {
            if let Some(f) = self.on_append.take() {
                f();
            }
            self.store.append(h, rows, ms)
        }
        fn commit(&mut self, h: &[u8; 32], a: u64, r: u64) -> Result<u64, IngestError> {
            let n = RowSink::commit(self.store, h, a, r)?;
            if let Some(f) = self.after_commit.take() {
                f();
            }
            Ok(n)
        }
        fn abort(&mut self) {
            RowSink::abort(self.store);
        }
    }

    fn append_rows(p: &Path, from: usize, n: usize) -> Box<dyn FnOnce()> {
        let p = p.to_path_buf();
        Box::new(move || {
            let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
            for i in from..from + n {
                std::io::Write::write_all(&mut f, format!("late row {i},late\n").as_bytes())
                    .unwrap();
            }
        })
    }

    fn assert_each_row_once(st: &ReplayStore, n: usize) {
        let rows = store_rows(st);
        assert_eq!(rows.len(), n);
        assert!(rows.values().all(|&c| c == 1), "{rows:?}");
    }

    /// Found by a hostile-operator probe: rows appended while a file was read went to
    /// `.done/` unseen. Rows read before the change are rolled back; the file is taken
    /// whole once it has settled.
    #[test]
    fn file_growing_while_read_is_rolled_back_and_taken_later() {
        let e = env();
        let p = e.inbox.join("g.csv");
        fs::write(&p, csv_text(50)).unwrap();
        let mut st = store(&e);
        let cfg = IngestConfig::default();
        let mut sink = Hooked {
            store: &mut st,
            on_append: Some(append_rows(&p, 0, 10)),
            after_commit: None,
        };
        let err = process_file(&e.inbox, &p, &mut sink, &cfg).unwrap_err();
        assert!(matches!(err, IngestError::Changed { .. }), "{err}");
        assert!(p.exists());
        assert_eq!(st.stats().rows, 0);
        let out = process_file(&e.inbox, &p, &mut st, &cfg).unwrap();
        assert_eq!((out.rows_accepted, out.rows_appended), (60, 60));
        assert_each_row_once(&st, 60);
    }

    /// Growth between the check and the move: the new rows are ingested too before the
    /// file moves, each row once.
    #[test]
    fn rows_appended_after_the_commit_are_ingested_before_the_move() {
        let e = env();
        let p = e.inbox.join("g.csv");
        fs::write(&p, csv_text(50)).unwrap();
        let mut st = store(&e);
        let mut sink = Hooked {
            store: &mut st,
            on_append: None,
            after_commit: Some(append_rows(&p, 0, 10)),
        };
        let out = process_file(&e.inbox, &p, &mut sink, &IngestConfig::default()).unwrap();
        assert_eq!((out.rows_accepted, out.rows_appended), (60, 60));
        assert_eq!(out.rows_rejected, 7);
        assert_each_row_once(&st, 60);
        let moved = fs::read_to_string(&out.moved_to).unwrap();
        assert!(moved.ends_with("late row 9,late\n"));
        let sc: Sidecar = serde_json::from_slice(&fs::read(&out.sidecar_path).unwrap()).unwrap();
        assert_eq!(
            sc.content_hash,
            Some(hex(&hash_file(&out.moved_to).unwrap()))
        );
    }

    /// Found by a hostile-operator probe: a header of 10⁶ columns gave a 14.9 MB sidecar.
    #[test]
    fn sidecar_of_a_very_wide_header_is_bounded() {
        let e = env();
        let p = e.inbox.join("wide.csv");
        let cols = 200_000;
        let mut header = String::from("text");
        for i in 0..cols {
            header.push_str(&format!(",column_with_a_long_name_{i}"));
        }
        fs::write(&p, format!("{header}\nshort row\n")).unwrap();
        let mut st = store(&e);
        let out = process_file(&e.inbox, &p, &mut st, &IngestConfig::default()).unwrap();
        let side_bytes = fs::metadata(&out.sidecar_path).unwrap().len();
        assert!(side_bytes < 64 << 10, "sidecar has {side_bytes} bytes");
        let sc: Sidecar = serde_json::from_slice(&fs::read(&out.sidecar_path).unwrap()).unwrap();
        assert_eq!(sc.extra_columns_ignored.len(), MAX_LISTED_COLUMNS);
        assert_eq!(sc.extra_columns_total, cols);
        assert_eq!(sc.rows_rejected, 1);
        assert!(sc.rejections[0].reason.len() <= MAX_REASON_CHARS * 4);
    }

    /// Found by a hostile-operator probe: a NUL byte went into the store as text.
    #[test]
    fn nul_byte_row_is_rejected_naming_line_and_field() {
        let e = env();
        let p = e.inbox.join("nul.csv");
        fs::write(&p, b"text,source\nfine,a\nbad\0text,a\n").unwrap();
        let mut st = store(&e);
        let out = process_file(&e.inbox, &p, &mut st, &IngestConfig::default()).unwrap();
        assert_eq!((out.rows_accepted, out.rows_rejected), (1, 1));
        let sc: Sidecar = serde_json::from_slice(&fs::read(&out.sidecar_path).unwrap()).unwrap();
        assert_eq!(sc.file, "nul.csv");
        assert_eq!(sc.rejections[0].line, 3);
        assert!(
            sc.rejections[0].reason.contains("field `text`"),
            "{:?}",
            sc.rejections
        );
        assert!(sc.rejections[0].reason.contains("NUL"));
    }

    /// Found by a hostile-operator probe: after retries on a full disk a first-time
    /// ingestion reported `rows_appended 0, rows_already_present 1000`.
    #[cfg(feature = "fault-injection")]
    #[test]
    fn disk_full_rolls_back_and_the_retry_counts_every_row_once() {
        use crate::store::fault::DISK_FULL_FLAG;
        let e = env();
        let p = e.inbox.join("f.csv");
        fs::write(&p, csv_text(1000)).unwrap();
        let mut st = store(&e);
        let cfg = IngestConfig::default();
        fs::write(e.replay.join(DISK_FULL_FLAG), b"").unwrap();
        for _ in 0..3 {
            let err = process_file(&e.inbox, &p, &mut st, &cfg).unwrap_err();
            assert!(err.is_disk_full(), "{err}");
            assert!(p.exists());
            assert_eq!(st.stats().rows, 0);
        }
        fs::remove_file(e.replay.join(DISK_FULL_FLAG)).unwrap();
        let out = process_file(&e.inbox, &p, &mut st, &cfg).unwrap();
        let sc: Sidecar = serde_json::from_slice(&fs::read(&out.sidecar_path).unwrap()).unwrap();
        assert_eq!(
            (sc.rows_accepted, sc.rows_appended, sc.rows_already_present),
            (1000, 1000, 0)
        );
        drop(st);
        assert_each_row_once(&store(&e), 1000);
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
