//! Writing, verifying, resuming from, listing and inspecting checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use super::durable::{self, FaultPlan, StepError, Steps, WriteStep};
use super::manifest::{
    FORMAT_VERSION, FileEntry, MANIFEST_FILE, Manifest, decode_manifest, encode_manifest,
    is_valid_id,
};

/// Name of the pointer file to the newest checkpoint.
pub const LATEST_FILE: &str = "LATEST";
const LATEST_TMP: &str = ".LATEST.tmp";
const TMP_PREFIX: &str = ".tmp-";

/// What a successful write produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// The checkpoint id.
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Bytes written (all files and the manifest).
    pub bytes: u64,
    /// Wall time of the write, seconds.
    pub seconds: f64,
}

/// A checkpoint read back and verified.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedCheckpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// Every file of the manifest: name → content (verified size and blake3).
    pub files: BTreeMap<String, Vec<u8>>,
}

impl LoadedCheckpoint {
    /// The content of file `name`, if the checkpoint has it.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(Vec::as_slice)
    }
}

/// A checkpoint that [`open_latest`] could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Its id (directory name) or `LATEST` when the pointer itself is bad.
    pub id: String,
    /// The error.
    pub reason: String,
}

/// The outcome of [`open_latest`].
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    /// The checkpoint to resume from, `None` if there is no valid one.
    pub checkpoint: Option<LoadedCheckpoint>,
    /// The id `LATEST` named, if it was readable.
    pub latest_pointer: Option<String>,
    /// Whether `checkpoint` is the one `LATEST` names (false: fell back to an older one).
    pub from_latest: bool,
    /// Checkpoints tried and refused, newest first.
    pub rejected: Vec<Rejected>,
    /// Leftover temporary directories and files that were removed.
    pub removed_tmp: Vec<PathBuf>,
}

/// One row of [`list`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointSummary {
    /// Id (directory name).
    pub id: String,
    /// Step, if the manifest is readable.
    pub step: Option<u64>,
    /// Creation time (RFC 3339), if the manifest is readable.
    pub created_at: Option<String>,
    /// Branches per layer.
    pub widths: Vec<usize>,
    /// Control loss at the time.
    pub control_loss: Option<f32>,
    /// Tag.
    pub tag: Option<String>,
    /// Parent id.
    pub parent: Option<String>,
    /// Bytes of all files in the directory.
    pub bytes: u64,
    /// Whether every check passed.
    pub valid: bool,
    /// The first problem found, when not valid.
    pub problem: Option<String>,
    /// Whether `LATEST` names it.
    pub is_latest: bool,
}

/// The checkpoints under a root, oldest first; `Display` is a human table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointList {
    /// The checkpoint root.
    pub root: PathBuf,
    /// One row per checkpoint directory, sorted by id (oldest first).
    pub checkpoints: Vec<CheckpointSummary>,
}

/// The check of one file by [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheck {
    /// File name.
    pub name: String,
    /// Size the manifest records.
    pub expected_bytes: u64,
    /// Size on disk (`None`: missing).
    pub actual_bytes: Option<u64>,
    /// blake3 the manifest records.
    pub expected_blake3: String,
    /// blake3 of the content (`None`: missing).
    pub actual_blake3: Option<String>,
    /// Size and hash match.
    pub ok: bool,
}

/// One tensor of a `*.safetensors` file, from its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSummary {
    /// The file.
    pub file: String,
    /// Tensor name.
    pub name: String,
    /// Element type (`F32`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub elements: u64,
}

/// Offline report on one checkpoint directory (`mbtd inspect checkpoint <dir>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// Whether the manifest and every file verified.
    pub valid: bool,
    /// Problems found (empty when valid).
    pub problems: Vec<String>,
    /// The manifest, if readable.
    pub manifest: Option<Manifest>,
    /// Per-file checks.
    pub files: Vec<FileCheck>,
    /// Tensors of every readable `*.safetensors` file, in file order.
    pub tensors: Vec<TensorSummary>,
}

fn safetensors_index(file: &str, bytes: &[u8]) -> Result<Vec<TensorSummary>, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("{file}: not a valid safetensors file: {e}"))?;
    let infos = meta.tensors();
    Ok(meta
        .offset_keys()
        .into_iter()
        .filter_map(|name| {
            let info = infos.get(&name)?;
            Some(TensorSummary {
                file: file.to_string(),
                dtype: info.dtype.to_string(),
                elements: info.shape.iter().map(|&d| d as u64).product(),
                shape: info.shape.clone(),
                name,
            })
        })
        .collect())
}

fn step_err(e: StepError) -> CheckpointError {
    CheckpointError::Write {
        step: e.step,
        path: e.path,
        source: e.source,
    }
}

fn validate_input(manifest: &Manifest, files: &[(&str, &[u8])]) -> Result<(), CheckpointError> {
    let bad = |m: String| Err(CheckpointError::InvalidInput(m));
    if manifest.format_version != FORMAT_VERSION {
        return bad(format!(
            "manifest.format_version = {}, this build writes {FORMAT_VERSION}; build the manifest with Manifest::new",
            manifest.format_version
        ));
    }
    if !is_valid_id(&manifest.id) {
        return bad(format!(
            "manifest.id {:?} is not a valid directory name (non-empty, no '/', no leading '.')",
            manifest.id
        ));
    }
    let mut seen = BTreeSet::new();
    for (name, _) in files {
        if !is_valid_id(name) || *name == MANIFEST_FILE || name.starts_with(TMP_PREFIX) {
            return bad(format!(
                "file name {name:?} is not allowed (plain name, not {MANIFEST_FILE}, no '/', no leading '.')"
            ));
        }
        if !seen.insert(*name) {
            return bad(format!("file name {name:?} is given twice"));
        }
    }
    Ok(())
}

/// Writes a checkpoint durably and points `LATEST` at it (see the module doc of
/// [`crate::checkpoint`]). `manifest.files` is filled from `files`; a non-finite
/// `control_loss` is stored as `None`. On error nothing of this write stays visible and
/// `LATEST` is unchanged.
pub fn write_checkpoint(
    root: &Path,
    manifest: &Manifest,
    files: &[(&str, &[u8])],
) -> Result<CheckpointInfo, CheckpointError> {
    write_checkpoint_with_faults(root, manifest, files, FaultPlan::none())
}

/// [`write_checkpoint`] with a fault plan that fails one step (for tests).
pub fn write_checkpoint_with_faults(
    root: &Path,
    manifest: &Manifest,
    files: &[(&str, &[u8])],
    plan: FaultPlan,
) -> Result<CheckpointInfo, CheckpointError> {
    let start = Instant::now();
    validate_input(manifest, files)?;
    let id = manifest.id.as_str();
    let final_dir = root.join(id);
    if final_dir.exists() {
        return Err(CheckpointError::AlreadyExists { path: final_dir });
    }
    let tmp_dir = root.join(format!("{TMP_PREFIX}{id}"));
    let latest = root.join(LATEST_FILE);
    let latest_tmp = root.join(LATEST_TMP);
    let previous_latest = fs::read(&latest).ok();

    let steps = Steps::new(plan);
    let mut renamed = false;
    let mut latest_replaced = false;
    let result = (|| -> Result<u64, StepError> {
        steps.run(WriteStep::CreateRoot, root, || {
            if root.is_dir() {
                return Ok(());
            }
            fs::create_dir_all(root)?;
            // Make the new root's own directory entry durable too.
            match root.parent() {
                Some(p) if !p.as_os_str().is_empty() => durable::sync_dir(p),
                _ => Ok(()),
            }
        })?;
        if tmp_dir.exists() {
            // A leftover of an earlier failed attempt with the same id.
            let _ = fs::remove_dir_all(&tmp_dir);
        }
        steps.run(WriteStep::CreateTmpDir, &tmp_dir, || {
            fs::create_dir(&tmp_dir)
        })?;
        let mut m = manifest.clone();
        m.control_loss = m.control_loss.filter(|l| l.is_finite());
        m.files.clear();
        let mut total = 0u64;
        for (name, bytes) in files {
            let path = tmp_dir.join(name);
            let f = steps.run(WriteStep::WriteFile, &path, || {
                durable::create_and_write(&path, bytes)
            })?;
            steps.run(WriteStep::SyncFile, &path, || f.sync_all())?;
            m.files.insert(
                (*name).to_string(),
                FileEntry {
                    bytes: bytes.len() as u64,
                    blake3: blake3::hash(bytes).to_hex().to_string(),
                },
            );
            total += bytes.len() as u64;
        }
        let path = tmp_dir.join(MANIFEST_FILE);
        let encoded = encode_manifest(&m).map_err(|e| StepError {
            step: WriteStep::WriteFile,
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        let f = steps.run(WriteStep::WriteFile, &path, || {
            durable::create_and_write(&path, &encoded)
        })?;
        steps.run(WriteStep::SyncFile, &path, || f.sync_all())?;
        total += encoded.len() as u64;
        steps.run(WriteStep::SyncTmpDir, &tmp_dir, || {
            durable::sync_dir(&tmp_dir)
        })?;
        steps.run(WriteStep::RenameDir, &final_dir, || {
            fs::rename(&tmp_dir, &final_dir)
        })?;
        renamed = true;
        steps.run(WriteStep::SyncRoot, root, || durable::sync_dir(root))?;
        let _ = fs::remove_file(&latest_tmp);
        let pointer = format!("{id}\n");
        let f = steps.run(WriteStep::WriteLatest, &latest_tmp, || {
            durable::create_and_write(&latest_tmp, pointer.as_bytes())
        })?;
        steps.run(WriteStep::SyncLatest, &latest_tmp, || f.sync_all())?;
        steps.run(WriteStep::RenameLatest, &latest, || {
            fs::rename(&latest_tmp, &latest)
        })?;
        latest_replaced = true;
        steps.run(WriteStep::SyncRootLatest, root, || durable::sync_dir(root))?;
        Ok(total)
    })();

    match result {
        Ok(bytes) => Ok(CheckpointInfo {
            id: id.to_string(),
            dir: final_dir,
            bytes,
            seconds: start.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            // Undo, best effort: the caller was told the write failed, so nothing of it may
            // remain visible and LATEST must name what it named before.
            if latest_replaced {
                let _ = match &previous_latest {
                    Some(old) => durable::write_file_atomic(&latest, old),
                    None => fs::remove_file(&latest),
                };
            }
            let _ = fs::remove_file(&latest_tmp);
            if renamed {
                let doomed = root.join(format!("{TMP_PREFIX}del-{id}"));
                if fs::rename(&final_dir, &doomed).is_ok() {
                    let _ = fs::remove_dir_all(&doomed);
                }
            }
            let _ = fs::remove_dir_all(&tmp_dir);
            let _ = durable::sync_dir(root);
            Err(step_err(e))
        }
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::FileMissing { path: path.clone() },
        _ => CheckpointError::Read {
            path: path.clone(),
            source,
        },
    })?;
    // Check the version before the full parse, so a newer format reports as such.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
        && let Some(found) = v.get("format_version").and_then(serde_json::Value::as_u64)
        && found != u64::from(FORMAT_VERSION)
    {
        return Err(CheckpointError::Version {
            path,
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: FORMAT_VERSION,
        });
    }
    let m = decode_manifest(&bytes).map_err(|reason| CheckpointError::Manifest {
        path: path.clone(),
        reason,
    })?;
    for name in m.files.keys() {
        if !is_valid_id(name) || name == MANIFEST_FILE {
            return Err(CheckpointError::Manifest {
                path,
                reason: format!("file name {name:?} is not a plain file name"),
            });
        }
    }
    Ok(m)
}

fn check_file(dir: &Path, name: &str, entry: &FileEntry) -> Result<Vec<u8>, CheckpointError> {
    let path = dir.join(name);
    let bytes = fs::read(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::FileMissing { path: path.clone() },
        _ => CheckpointError::Read {
            path: path.clone(),
            source,
        },
    })?;
    if bytes.len() as u64 != entry.bytes {
        return Err(CheckpointError::FileSize {
            path,
            expected: entry.bytes,
            actual: bytes.len() as u64,
        });
    }
    let actual = blake3::hash(&bytes).to_hex();
    if actual.as_str() != entry.blake3 {
        return Err(CheckpointError::FileHash {
            path,
            expected: entry.blake3.clone(),
            actual: actual.to_string(),
        });
    }
    Ok(bytes)
}

/// Reads the checkpoint in `dir` and verifies the manifest checksum, the format version and
/// the size and blake3 of every file. Errors name the file and what is wrong.
pub fn load_checkpoint(dir: &Path) -> Result<LoadedCheckpoint, CheckpointError> {
    let manifest = read_manifest(dir)?;
    let mut files = BTreeMap::new();
    for (name, entry) in &manifest.files {
        files.insert(name.clone(), check_file(dir, name, entry)?);
    }
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        manifest,
        files,
    })
}

/// The id `root/LATEST` names (`Ok(None)` if there is no LATEST file).
pub fn read_latest(root: &Path) -> Result<Option<String>, CheckpointError> {
    let path = root.join(LATEST_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            if is_valid_id(id) {
                Ok(Some(id.to_string()))
            } else {
                Err(CheckpointError::Manifest {
                    path,
                    reason: format!("LATEST holds {s:?}, not a checkpoint id"),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CheckpointError::Read { path, source }),
    }
}

/// After [`open_latest`] fell back (LATEST missing, e.g. a kill between a checkpoint's
/// directory rename and its pointer write, or naming a bad checkpoint): points LATEST at the
/// checkpoint resumed from, so the next start and `inspect` agree with what runs. Returns the
/// id it now names, `None` when nothing needed repair.
pub fn repair_latest(root: &Path, resume: &Resume) -> Result<Option<String>, CheckpointError> {
    match &resume.checkpoint {
        Some(c) if !resume.from_latest => {
            set_latest(root, &c.manifest.id)?;
            Ok(Some(c.manifest.id.clone()))
        }
        _ => Ok(None),
    }
}

/// Points `root/LATEST` at the existing checkpoint `id` atomically (used after a rollback,
/// so that a restart resumes from the restored state).
pub fn set_latest(root: &Path, id: &str) -> Result<(), CheckpointError> {
    let dir = root.join(id);
    if !is_valid_id(id) || !dir.join(MANIFEST_FILE).is_file() {
        return Err(CheckpointError::InvalidInput(format!(
            "{} is not a checkpoint directory; pass an id that `list` shows",
            dir.display()
        )));
    }
    let path = root.join(LATEST_FILE);
    durable::write_file_atomic(&path, format!("{id}\n").as_bytes()).map_err(|source| {
        CheckpointError::Fs {
            op: "write",
            path,
            source,
        }
    })
}

/// Checkpoint directory names under `root`, sorted by id (oldest first). Dot-entries and
/// plain files are skipped.
fn checkpoint_ids(root: &Path) -> Result<Vec<String>, CheckpointError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CheckpointError::Read {
                path: root.to_path_buf(),
                source,
            });
        }
    };
    let mut ids: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_valid_id(n))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Removes leftovers of interrupted writes (`.tmp-*` directories, `.LATEST.tmp`).
fn remove_leftovers(root: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(root) else {
        return Ok(removed);
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let result = if name.starts_with(TMP_PREFIX) && e.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else if name == LATEST_TMP {
            fs::remove_file(&path)
        } else {
            continue;
        };
        result.map_err(|source| CheckpointError::Fs {
            op: "remove leftover",
            path: path.clone(),
            source,
        })?;
        removed.push(path);
    }
    if !removed.is_empty() {
        durable::sync_dir(root).map_err(|source| CheckpointError::Fs {
            op: "fsync",
            path: root.to_path_buf(),
            source,
        })?;
    }
    removed.sort();
    Ok(removed)
}

fn load_as(root: &Path, id: &str) -> Result<LoadedCheckpoint, CheckpointError> {
    let loaded = load_checkpoint(&root.join(id))?;
    if loaded.manifest.id != id {
        return Err(CheckpointError::Manifest {
            path: root.join(id).join(MANIFEST_FILE),
            reason: format!(
                "manifest id {:?} differs from the directory name {id:?}",
                loaded.manifest.id
            ),
        });
    }
    Ok(loaded)
}

/// Finds the checkpoint to resume from: removes leftover temporaries, verifies the one
/// `LATEST` names and, if it is missing or corrupt, falls back to the newest valid one by id
/// order. Every refused checkpoint is reported in [`Resume::rejected`].
pub fn open_latest(root: &Path) -> Result<Resume, CheckpointError> {
    let removed_tmp = remove_leftovers(root)?;
    let mut rejected = Vec::new();
    let latest_pointer = match read_latest(root) {
        Ok(p) => p,
        Err(e) => {
            rejected.push(Rejected {
                id: LATEST_FILE.to_string(),
                reason: e.to_string(),
            });
            None
        }
    };
    if let Some(id) = &latest_pointer {
        match load_as(root, id) {
            Ok(c) => {
                return Ok(Resume {
                    checkpoint: Some(c),
                    latest_pointer,
                    from_latest: true,
                    rejected,
                    removed_tmp,
                });
            }
            Err(e) => rejected.push(Rejected {
                id: id.clone(),
                reason: e.to_string(),
            }),
        }
    }
    let mut checkpoint = None;
    for id in checkpoint_ids(root)?.iter().rev() {
        if latest_pointer.as_deref() == Some(id.as_str()) {
            continue;
        }
        match load_as(root, id) {
            Ok(c) => {
                checkpoint = Some(c);
                break;
            }
            Err(e) => rejected.push(Rejected {
                id: id.clone(),
                reason: e.to_string(),
            }),
        }
    }
    Ok(Resume {
        checkpoint,
        latest_pointer,
        from_latest: false,
        rejected,
        removed_tmp,
    })
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|es| {
            es.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(fs::Metadata::is_file)
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Lists the checkpoints under `root` (oldest first), verifying each fully (manifest
/// checksum, sizes and blake3 of every file).
pub fn list(root: &Path) -> Result<CheckpointList, CheckpointError> {
    let latest = read_latest(root).ok().flatten();
    let mut checkpoints = Vec::new();
    for id in checkpoint_ids(root)? {
        let dir = root.join(&id);
        let manifest = read_manifest(&dir);
        let problem = match &manifest {
            Ok(m) => m
                .files
                .iter()
                .find_map(|(name, entry)| check_file(&dir, name, entry).err())
                .map(|e| e.to_string())
                .or_else(|| {
                    (m.id != id)
                        .then(|| format!("manifest id {:?} differs from the directory name", m.id))
                }),
            Err(e) => Some(e.to_string()),
        };
        let m = manifest.ok();
        checkpoints.push(CheckpointSummary {
            is_latest: latest.as_deref() == Some(id.as_str()),
            step: m.as_ref().map(|m| m.step),
            created_at: m.as_ref().map(|m| m.created_at.clone()),
            widths: m.as_ref().map(|m| m.widths.clone()).unwrap_or_default(),
            control_loss: m.as_ref().and_then(|m| m.control_loss),
            tag: m.as_ref().and_then(|m| m.tag.clone()),
            parent: m.as_ref().and_then(|m| m.parent.clone()),
            bytes: dir_bytes(&dir),
            valid: problem.is_none(),
            problem,
            id,
        });
    }
    Ok(CheckpointList {
        root: root.to_path_buf(),
        checkpoints,
    })
}

/// Verifies one checkpoint directory offline and reports every file's status.
pub fn inspect(dir: &Path) -> Inspection {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    let manifest = match read_manifest(dir) {
        Ok(m) => Some(m),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let Some(m) = &manifest {
        for (name, entry) in &m.files {
            let content = fs::read(dir.join(name)).ok();
            let actual_bytes = content.as_ref().map(|c| c.len() as u64);
            let actual_blake3 = content
                .as_ref()
                .map(|c| blake3::hash(c).to_hex().to_string());
            if let Err(e) = check_file(dir, name, entry) {
                problems.push(e.to_string());
            }
            if let (true, Some(c)) = (name.ends_with(".safetensors"), &content) {
                match safetensors_index(name, c) {
                    Ok(t) => tensors.extend(t),
                    Err(e) => problems.push(e),
                }
            }
            files.push(FileCheck {
                ok: actual_bytes == Some(entry.bytes)
                    && actual_blake3.as_deref() == Some(entry.blake3.as_str()),
                name: name.clone(),
                expected_bytes: entry.bytes,
                actual_bytes,
                expected_blake3: entry.blake3.clone(),
                actual_blake3,
            });
        }
    }
    Inspection {
        dir: dir.to_path_buf(),
        valid: problems.is_empty(),
        problems,
        manifest,
        files,
        tensors,
    }
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for CheckpointList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.checkpoints.is_empty() {
            return writeln!(f, "no checkpoints under {}", self.root.display());
        }
        let id_w = self
            .checkpoints
            .iter()
            .map(|c| c.id.len())
            .max()
            .unwrap_or(2)
            .max(2);
        writeln!(
            f,
            "  {:<id_w$}  {:>10}  {:<24}  {:<12}  {:>9}  {:>10}  {:<14}  STATUS",
            "ID", "STEP", "CREATED", "WIDTHS", "CTRL_LOSS", "SIZE", "TAG"
        )?;
        for c in &self.checkpoints {
            let widths = c
                .widths
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let loss = c
                .control_loss
                .map_or_else(|| "-".to_string(), |l| format!("{l:.4}"));
            let status = match &c.problem {
                None => "ok".to_string(),
                Some(p) => format!("INVALID: {p}"),
            };
            writeln!(
                f,
                "{} {:<id_w$}  {:>10}  {:<24}  {:<12}  {:>9}  {:>10}  {:<14}  {status}",
                if c.is_latest { '*' } else { ' ' },
                c.id,
                opt(&c.step),
                opt(&c.created_at),
                widths,
                loss,
                human_bytes(c.bytes),
                opt(&c.tag),
            )?;
        }
        write!(f, "(* = LATEST)")
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "checkpoint {}", self.dir.display())?;
        writeln!(
            f,
            "status:  {}",
            if self.valid { "valid" } else { "INVALID" }
        )?;
        if let Some(m) = &self.manifest {
            writeln!(f, "id:      {}", m.id)?;
            writeln!(f, "format:  {}", m.format_version)?;
            writeln!(f, "created: {}", m.created_at)?;
            writeln!(f, "step:    {}  tokens: {}", m.step, m.tokens)?;
            writeln!(f, "widths:  {:?}", m.widths)?;
            writeln!(f, "parent:  {}  tag: {}", opt(&m.parent), opt(&m.tag))?;
            writeln!(
                f,
                "control loss: {}",
                m.control_loss
                    .map_or_else(|| "-".to_string(), |l| format!("{l:.4}"))
            )?;
        }
        for c in &self.files {
            writeln!(
                f,
                "  {:<24} {:>12} {}  {}",
                c.name,
                human_bytes(c.expected_bytes),
                &c.expected_blake3.get(..16).unwrap_or(&c.expected_blake3),
                if c.ok { "ok" } else { "MISMATCH" }
            )?;
        }
        let mut file = "";
        for t in &self.tensors {
            if t.file != file {
                file = &t.file;
                let total: u64 = self
                    .tensors
                    .iter()
                    .filter(|x| x.file == file)
                    .map(|x| x.elements)
                    .sum();
                writeln!(f, "{file}: {total} elements")?;
            }
            writeln!(f, "  {:<48} {:<5} {:?}", t.name, t.dtype, t.shape)?;
        }
        for p in &self.problems {
            writeln!(f, "problem: {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    fn t(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_795_428_902_000 + ms)
    }

    fn manifest(ms: u64, step: u64) -> Manifest {
        let mut m = Manifest::new(t(ms), step, step * 100);
        m.widths = vec![4, 4];
        m.control_loss = Some(2.5);
        m.config = serde_json::json!({"model": {"d": 64}});
        m.state = serde_json::json!({"rng": "abc", "cursor": step});
        m
    }

    fn safetensors_of(name: &str, values: &[f32]) -> Vec<u8> {
        use safetensors::tensor::{Dtype, TensorView};
        let data: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![values.len()], &data).unwrap();
        safetensors::serialize(vec![(name, view)], None).unwrap()
    }

    fn payload(step: u64) -> Vec<(String, Vec<u8>)> {
        let w: Vec<f32> = (0..1000).map(|i| (i + step) as f32).collect();
        vec![
            ("model.safetensors".into(), safetensors_of("wte", &w)),
            (
                "optimizer.safetensors".into(),
                safetensors_of("adam.m.wte", &w[..80]),
            ),
            ("tokenizer.json".into(), b"{\"version\":\"1.0\"}".to_vec()),
        ]
    }

    fn write(root: &Path, ms: u64, step: u64) -> CheckpointInfo {
        let p = payload(step);
        let files: Vec<(&str, &[u8])> = p.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        write_checkpoint(root, &manifest(ms, step), &files).unwrap()
    }

    #[test]
    fn a_missing_latest_is_repaired_to_the_checkpoint_resumed_from() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, 0, 1);
        let newest = write(root, 10, 2);
        fs::remove_file(root.join(LATEST_FILE)).unwrap();
        let r = open_latest(root).unwrap();
        assert!(!r.from_latest);
        assert_eq!(repair_latest(root, &r).unwrap(), Some(newest.id.clone()));
        assert_eq!(read_latest(root).unwrap(), Some(newest.id));
        let again = open_latest(root).unwrap();
        assert!(again.from_latest);
        assert_eq!(repair_latest(root, &again).unwrap(), None);
    }

    fn dir_names(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn creates_a_missing_nested_root() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("a").join("checkpoints");
        let info = write(&root, 0, 1);
        assert_eq!(
            open_latest(&root).unwrap().checkpoint.unwrap().manifest.id,
            info.id
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn arbitrary_files_round_trip(
            files in proptest::collection::btree_map("[a-z]{1,8}\\.bin", proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), 0..5),
            step in 0u64..1_000_000,
            tag in proptest::option::of("[ -~]{0,20}"),
        ) {
            let root = tempfile::tempdir().unwrap();
            let mut m = manifest(0, step);
            m.tag = tag;
            let list: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
            let info = write_checkpoint(root.path(), &m, &list).unwrap();
            let loaded = load_checkpoint(&info.dir).unwrap();
            proptest::prop_assert_eq!(&loaded.files, &files);
            proptest::prop_assert_eq!(loaded.manifest.tag, m.tag);
            proptest::prop_assert_eq!(loaded.manifest.step, step);
        }
    }

    #[test]
    fn write_then_load_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let m = manifest(0, 7);
        let p = payload(7);
        let files: Vec<(&str, &[u8])> = p.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let info = write_checkpoint(root.path(), &m, &files).unwrap();
        assert_eq!(info.id, m.id);
        let on_disk: u64 = dir_bytes(&info.dir);
        assert_eq!(info.bytes, on_disk);
        assert_eq!(
            read_latest(root.path()).unwrap().as_deref(),
            Some(m.id.as_str())
        );
        let loaded = load_checkpoint(&info.dir).unwrap();
        for (name, bytes) in &p {
            assert_eq!(loaded.file(name).unwrap(), bytes.as_slice());
            assert_eq!(loaded.manifest.files[name].bytes, bytes.len() as u64);
        }
        let mut expected = m.clone();
        expected.files = loaded.manifest.files.clone();
        assert_eq!(loaded.manifest, expected);
        assert_eq!(
            dir_names(root.path()),
            vec![m.id.clone(), LATEST_FILE.to_string()]
        );
        // Same id again is refused.
        let err = write_checkpoint(root.path(), &m, &files).unwrap_err();
        assert!(matches!(err, CheckpointError::AlreadyExists { .. }));
    }

    #[test]
    fn corrupted_byte_is_detected_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        let info = write(root.path(), 0, 1);
        let path = info.dir.join("optimizer.safetensors");
        let mut b = fs::read(&path).unwrap();
        b[100] ^= 0x01;
        fs::write(&path, &b).unwrap();
        let err = load_checkpoint(&info.dir).unwrap_err();
        assert!(matches!(err, CheckpointError::FileHash { .. }), "{err}");
        assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
        // Truncation reports the sizes.
        fs::write(&path, &b[..10]).unwrap();
        let err = load_checkpoint(&info.dir).unwrap_err().to_string();
        assert!(
            err.contains("optimizer.safetensors") && err.contains("10 bytes"),
            "{err}"
        );
        let report = inspect(&info.dir);
        assert!(!report.valid);
        let bad: Vec<_> = report
            .files
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(bad, vec!["optimizer.safetensors"]);
        assert!(report.to_string().contains("MISMATCH"));
    }

    #[test]
    fn missing_file_and_bad_version_are_named() {
        let root = tempfile::tempdir().unwrap();
        let info = write(root.path(), 0, 1);
        fs::remove_file(info.dir.join("tokenizer.json")).unwrap();
        let err = load_checkpoint(&info.dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("missing"),
            "{err}"
        );

        let info = write(root.path(), 5, 2);
        let mpath = info.dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&mpath)
            .unwrap()
            .replace("\"format_version\": 1", "\"format_version\": 9");
        fs::write(&mpath, text).unwrap();
        let err = load_checkpoint(&info.dir).unwrap_err();
        assert!(
            matches!(err, CheckpointError::Version { found: 9, .. }),
            "{err}"
        );
    }

    #[test]
    fn corrupt_latest_falls_back_to_newest_valid() {
        let root = tempfile::tempdir().unwrap();
        let a = write(root.path(), 0, 1);
        let b = write(root.path(), 10, 2);
        let c = write(root.path(), 20, 3);
        let r = open_latest(root.path()).unwrap();
        assert!(r.from_latest && r.rejected.is_empty());
        assert_eq!(r.checkpoint.unwrap().manifest.id, c.id);
        // Corrupt the newest: fall back to b.
        let p = c.dir.join("model.safetensors");
        let mut bytes = fs::read(&p).unwrap();
        bytes[0] ^= 0xff;
        fs::write(&p, bytes).unwrap();
        let r = open_latest(root.path()).unwrap();
        assert!(!r.from_latest);
        assert_eq!(r.latest_pointer.as_deref(), Some(c.id.as_str()));
        assert_eq!(r.checkpoint.unwrap().manifest.id, b.id);
        assert_eq!(r.rejected.len(), 1);
        assert_eq!(r.rejected[0].id, c.id);
        assert!(r.rejected[0].reason.contains("model.safetensors"));
        // Partial dir (manifest missing) newer than everything: skipped.
        fs::create_dir(root.path().join("29991231T000000.000Z-000000000009-0000")).unwrap();
        // Garbage LATEST: reported, newest valid used.
        fs::write(root.path().join(LATEST_FILE), "../../etc\n").unwrap();
        let r = open_latest(root.path()).unwrap();
        assert_eq!(r.checkpoint.as_ref().unwrap().manifest.id, b.id);
        let ids: Vec<_> = r.rejected.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                LATEST_FILE,
                "29991231T000000.000Z-000000000009-0000",
                c.id.as_str()
            ]
        );
        // No LATEST at all: newest valid.
        fs::remove_file(root.path().join(LATEST_FILE)).unwrap();
        assert_eq!(
            open_latest(root.path())
                .unwrap()
                .checkpoint
                .unwrap()
                .manifest
                .id,
            b.id
        );
        // set_latest moves the pointer (rollback).
        set_latest(root.path(), &a.id).unwrap();
        let r = open_latest(root.path()).unwrap();
        assert!(r.from_latest);
        assert_eq!(r.checkpoint.unwrap().manifest.id, a.id);
        assert!(set_latest(root.path(), "nope").is_err());
    }

    #[test]
    fn empty_or_missing_root_has_nothing_to_resume() {
        let root = tempfile::tempdir().unwrap();
        let r = open_latest(&root.path().join("absent")).unwrap();
        assert!(r.checkpoint.is_none() && r.rejected.is_empty());
        let r = open_latest(root.path()).unwrap();
        assert!(r.checkpoint.is_none());
        assert!(
            list(root.path())
                .unwrap()
                .to_string()
                .contains("no checkpoints")
        );
    }

    #[test]
    fn leftover_tmp_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let a = write(root.path(), 0, 1);
        let tmp = root
            .path()
            .join(".tmp-20261123T101502.000Z-000000000002-abcd");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
        fs::write(root.path().join(LATEST_TMP), b"xx").unwrap();
        let r = open_latest(root.path()).unwrap();
        assert_eq!(r.checkpoint.unwrap().manifest.id, a.id);
        assert_eq!(
            r.removed_tmp,
            vec![root.path().join(LATEST_TMP), tmp.clone()]
        );
        assert!(!tmp.exists());
        assert_eq!(dir_names(root.path()), vec![a.id, LATEST_FILE.to_string()]);
    }

    #[test]
    fn fault_at_every_step_leaves_previous_state_intact() {
        let root = tempfile::tempdir().unwrap();
        let first = write(root.path(), 0, 1);
        let before = dir_names(root.path());
        let latest_before = fs::read(root.path().join(LATEST_FILE)).unwrap();
        let p = payload(2);
        let files: Vec<(&str, &[u8])> = p.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let mut seen_steps = BTreeSet::new();
        let mut n = 0;
        loop {
            let m = manifest(100 + n as u64, 2);
            match write_checkpoint_with_faults(root.path(), &m, &files, FaultPlan::fail_step(n)) {
                Err(CheckpointError::Write { step, source, .. }) => {
                    assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
                    seen_steps.insert(format!("{step:?}"));
                    assert_eq!(dir_names(root.path()), before, "fault at step {n} ({step})");
                    assert_eq!(
                        fs::read(root.path().join(LATEST_FILE)).unwrap(),
                        latest_before
                    );
                    let r = open_latest(root.path()).unwrap();
                    assert!(r.from_latest && r.removed_tmp.is_empty());
                    assert_eq!(r.checkpoint.unwrap().manifest.id, first.id);
                }
                Ok(info) => {
                    assert_eq!(
                        open_latest(root.path())
                            .unwrap()
                            .checkpoint
                            .unwrap()
                            .manifest
                            .id,
                        info.id
                    );
                    break;
                }
                Err(e) => panic!("unexpected error {e}"),
            }
            n += 1;
        }
        // 3 files + manifest, each write + fsync, plus 9 other steps.
        assert_eq!(n, 4 * 2 + 9);
        assert_eq!(
            seen_steps.len(),
            11,
            "every kind of step was failed once: {seen_steps:?}"
        );
    }

    #[test]
    fn fault_on_first_ever_write_leaves_no_latest() {
        let root = tempfile::tempdir().unwrap();
        let p = payload(1);
        let files: Vec<(&str, &[u8])> = p.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let last_step = 4 * 2 + 9 - 1;
        let err = write_checkpoint_with_faults(
            root.path(),
            &manifest(0, 1),
            &files,
            FaultPlan::fail_step(last_step),
        );
        assert!(matches!(
            err,
            Err(CheckpointError::Write {
                step: WriteStep::SyncRootLatest,
                ..
            })
        ));
        assert!(dir_names(root.path()).is_empty());
    }

    #[test]
    fn invalid_inputs_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let m = manifest(0, 1);
        for files in [
            vec![("a/b", b"x".as_slice())],
            vec![(MANIFEST_FILE, b"x".as_slice())],
            vec![("x", b"1".as_slice()), ("x", b"2".as_slice())],
        ] {
            let err = write_checkpoint(root.path(), &m, &files).unwrap_err();
            assert!(matches!(err, CheckpointError::InvalidInput(_)), "{err}");
        }
        let mut bad = m.clone();
        bad.format_version = 0;
        assert!(write_checkpoint(root.path(), &bad, &[]).is_err());
    }

    #[test]
    fn nan_control_loss_is_stored_as_unknown() {
        let root = tempfile::tempdir().unwrap();
        let mut m = manifest(0, 1);
        m.control_loss = Some(f32::NAN);
        let info = write_checkpoint(root.path(), &m, &[("model.safetensors", b"abc")]).unwrap();
        assert_eq!(
            load_checkpoint(&info.dir).unwrap().manifest.control_loss,
            None
        );
    }

    #[test]
    fn inspect_lists_safetensors_tensors() {
        use safetensors::tensor::{Dtype, TensorView};
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [0.5f32, 0.25]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let tensors = vec![
            ("wte", TensorView::new(Dtype::F32, vec![3, 2], &a).unwrap()),
            (
                "lnf.gain",
                TensorView::new(Dtype::F32, vec![2], &b).unwrap(),
            ),
        ];
        let model = safetensors::serialize(tensors, None).unwrap();
        let root = tempfile::tempdir().unwrap();
        let m = manifest(0, 3);
        let info = write_checkpoint(
            root.path(),
            &m,
            &[("model.safetensors", &model), ("tokenizer.json", b"{}")],
        )
        .unwrap();
        let report = inspect(&info.dir);
        assert!(report.valid, "{report}");
        let names: Vec<(&str, &[usize], u64)> = report
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), t.elements))
            .collect();
        assert_eq!(
            names,
            vec![
                ("lnf.gain", [2].as_slice(), 2),
                ("wte", [3, 2].as_slice(), 6)
            ]
        );
        let text = report.to_string();
        assert!(
            text.contains("model.safetensors: 8 elements") && text.contains("wte"),
            "{text}"
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Inspection>(&json).unwrap(), report);
        // A file named .safetensors that is not one is reported.
        let bad = write_checkpoint(
            root.path(),
            &manifest(9, 4),
            &[("model.safetensors", b"garbage")],
        )
        .unwrap();
        let report = inspect(&bad.dir);
        assert!(
            !report.valid && report.problems[0].contains("not a valid safetensors"),
            "{report}"
        );
    }

    #[test]
    fn list_marks_latest_and_invalid() {
        let root = tempfile::tempdir().unwrap();
        let a = write(root.path(), 0, 1);
        let b = write(root.path(), 10, 2);
        fs::write(a.dir.join("tokenizer.json"), b"tampered").unwrap();
        let l = list(root.path()).unwrap();
        assert_eq!(l.checkpoints.len(), 2);
        assert_eq!(l.checkpoints[0].id, a.id);
        assert!(!l.checkpoints[0].valid);
        assert!(
            l.checkpoints[0]
                .problem
                .as_ref()
                .unwrap()
                .contains("tokenizer.json")
        );
        assert!(l.checkpoints[1].valid && l.checkpoints[1].is_latest);
        assert_eq!(l.checkpoints[1].step, Some(2));
        assert_eq!(l.checkpoints[1].widths, vec![4, 4]);
        let table = l.to_string();
        assert!(table.contains(&format!("* {}", b.id)), "{table}");
        assert!(table.contains("INVALID"), "{table}");
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<CheckpointList>(&json).unwrap(), l);
        let report = inspect(&b.dir);
        assert!(report.valid, "{report}");
        assert_eq!(report.files.len(), 3);
        assert!(report.to_string().contains("status:  valid"));
    }
}
