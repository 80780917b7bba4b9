//! The sidecar written beside every processed inbox file, and the final move.
//!
//! What a sidecar echoes from the input is bounded, so that its size does not grow with
//! a pathological file: at most [`MAX_LISTED_REJECTIONS`] rejections and
//! [`MAX_LISTED_COLUMNS`] ignored column names (each cut to 64 characters), reasons cut
//! to [`MAX_REASON_CHARS`] characters; the counts always cover everything.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::IngestError;
use crate::store::fsutil::{fsync_dir, now_ms, write_atomic};
use crate::text::csv_rows::{MAX_COLUMN_NAME_CHARS, clip_chars};

/// Sidecar format version.
pub const SIDECAR_VERSION: u32 = 1;
/// Rejections listed in a sidecar (the count covers all of them).
pub const MAX_LISTED_REJECTIONS: usize = 100;
/// Ignored header columns listed in a sidecar (`extra_columns_total` counts all of them).
pub const MAX_LISTED_COLUMNS: usize = 100;
/// Characters of a refusal reason or rejection reason kept in a sidecar.
pub const MAX_REASON_CHARS: usize = 1000;

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
    /// Why the file was refused (failed only), cut to [`MAX_REASON_CHARS`] characters.
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
    /// The first [`MAX_LISTED_REJECTIONS`] rejections, each reason cut to
    /// [`MAX_REASON_CHARS`] characters.
    pub rejections: Vec<ListedRejection>,
    /// The first [`MAX_LISTED_COLUMNS`] header columns that were ignored, each name cut
    /// to `MAX_COLUMN_NAME_CHARS` (64) characters, so that a header of a million columns
    /// gives a sidecar of a few kilobytes.
    pub extra_columns_ignored: Vec<String>,
    /// All header columns that were ignored.
    #[serde(default)]
    pub extra_columns_total: u64,
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

pub(super) fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> IngestError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |source| IngestError::Io { what, path, source }
}

/// The ignored columns as a sidecar lists them (see [`Sidecar::extra_columns_ignored`]).
pub(super) fn listed_columns(extra: &[String]) -> Vec<String> {
    extra
        .iter()
        .take(MAX_LISTED_COLUMNS)
        .map(|c| clip_chars(c, MAX_COLUMN_NAME_CHARS))
        .collect()
}

/// Pick `<dir>/<name>[.k]` such that neither it nor its `.json` sidecar exists, except
/// that an orphan sidecar (no file beside it) recording the same content hash is
/// reused: that is this file's own sidecar from a run that crashed before the move.
pub(super) fn choose_dest(
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

pub(super) fn write_sidecar(path: &Path, sidecar: &Sidecar) -> Result<(), IngestError> {
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

/// Moves a processed file into `.done/` or `.failed/` (both fsynced) and takes from a
/// regular file the permission bits its directory does not grant: nothing for other
/// users, group read only where the directory lets the group in (the daemon creates it
/// 0700, or 0750 with `paths.group_readable`). A producer's 0644 file thus does not stay
/// world-readable. A file the daemon does not own keeps its mode (only its owner may
/// change it); the directory still keeps other users out.
pub(super) fn move_file(from: &Path, to: &Path) -> Result<(), IngestError> {
    fs::rename(from, to).map_err(io_err("move processed file", from))?;
    restrict_mode(to);
    let to_dir = to.parent().expect("destination has a parent");
    fsync_dir(to_dir).map_err(io_err("fsync", to_dir))?;
    let from_dir = from.parent().expect("inbox file has a parent");
    fsync_dir(from_dir).map_err(io_err("fsync", from_dir))
}

/// The mode [`move_file`] gives a file of mode `file` in a directory of mode `dir`.
fn private_mode(file: u32, dir: u32) -> u32 {
    let group_read = if dir & 0o050 == 0o050 {
        file & 0o040
    } else {
        0
    };
    (file & 0o700) | group_read
}

fn restrict_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let (Ok(meta), Some(dir)) = (fs::symlink_metadata(path), path.parent()) else {
        return;
    };
    let Ok(dir_meta) = fs::metadata(dir) else {
        return;
    };
    let (old, dir_mode) = (
        meta.permissions().mode() & 0o7777,
        dir_meta.permissions().mode(),
    );
    let new = private_mode(old, dir_mode);
    if meta.is_file() && new != old {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(new));
    }
}

pub(super) fn outcome_dir(inbox: &Path, outcome: Outcome) -> Result<PathBuf, IngestError> {
    let dir = inbox.join(outcome.dir_name());
    if !dir.is_dir() {
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        fsync_dir(inbox).map_err(io_err("fsync", inbox))?;
    }
    Ok(dir)
}

/// Write the sidecar, then move the file beside it.
pub(super) fn finish(
    inbox: &Path,
    path: &Path,
    mut sidecar: Sidecar,
    started: Instant,
) -> Result<FileOutcome, IngestError> {
    let t = Instant::now();
    sidecar.reason = sidecar.reason.map(|r| clip_chars(&r, MAX_REASON_CHARS));
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

pub(super) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub(super) fn us(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

pub(super) fn empty_sidecar(name: &str, bytes: u64) -> Sidecar {
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
        extra_columns_total: 0,
        timings: Timings::default(),
        processed_ms: 0,
        checksum: None,
    }
}
