//! The on-disk format: writing a checkpoint atomically, verifying and loading one, the
//! `LATEST` pointer, and finding the checkpoint to resume from.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use super::durable::{FaultPlan, StepError, Steps, WriteStep};
use super::manifest::{
    FORMAT_VERSION, FileEntry, MANIFEST_FILE, Manifest, decode_manifest, encode_manifest,
    is_valid_id,
};
use crate::store::fsutil;

/// Name of the pointer file to the newest checkpoint.
pub const LATEST_FILE: &str = "LATEST";
const LATEST_TMP: &str = ".LATEST.tmp";
pub(crate) const TMP_PREFIX: &str = ".tmp-";

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
    write_checkpoint_with_faults(root, manifest, files, FaultPlan::injected(root))
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
                Some(p) if !p.as_os_str().is_empty() => fsutil::fsync_dir(p),
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
                fsutil::create_and_write(&path, bytes)
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
            fsutil::create_and_write(&path, &encoded)
        })?;
        steps.run(WriteStep::SyncFile, &path, || f.sync_all())?;
        total += encoded.len() as u64;
        steps.run(WriteStep::SyncTmpDir, &tmp_dir, || {
            fsutil::fsync_dir(&tmp_dir)
        })?;
        steps.run(WriteStep::RenameDir, &final_dir, || {
            fs::rename(&tmp_dir, &final_dir)
        })?;
        renamed = true;
        steps.run(WriteStep::SyncRoot, root, || fsutil::fsync_dir(root))?;
        let _ = fs::remove_file(&latest_tmp);
        let pointer = format!("{id}\n");
        let f = steps.run(WriteStep::WriteLatest, &latest_tmp, || {
            fsutil::create_and_write(&latest_tmp, pointer.as_bytes())
        })?;
        steps.run(WriteStep::SyncLatest, &latest_tmp, || f.sync_all())?;
        steps.run(WriteStep::RenameLatest, &latest, || {
            fs::rename(&latest_tmp, &latest)
        })?;
        latest_replaced = true;
        steps.run(WriteStep::SyncRootLatest, root, || fsutil::fsync_dir(root))?;
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
                    Some(old) => fsutil::write_atomic(&latest, old),
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
            let _ = fsutil::fsync_dir(root);
            Err(step_err(e))
        }
    }
}

/// Reads a whole checkpoint file; a missing file is [`CheckpointError::FileMissing`].
fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::FileMissing {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Reads and checks `dir/manifest.json` (checksum, version, plain file names); no file
/// content is read.
pub fn read_manifest(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = read_file(&path)?;
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

/// Reads `dir/name` and checks its size and blake3 against `entry`.
pub fn check_file(dir: &Path, name: &str, entry: &FileEntry) -> Result<Vec<u8>, CheckpointError> {
    let path = dir.join(name);
    let bytes = read_file(&path)?;
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
    fsutil::write_atomic(&path, format!("{id}\n").as_bytes())
        .map_err(CheckpointError::fs("write", &path))
}

/// Checkpoint directory names under `root`, sorted by id (oldest first). Dot-entries and
/// plain files are skipped.
pub fn checkpoint_ids(root: &Path) -> Result<Vec<String>, CheckpointError> {
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
        result.map_err(CheckpointError::fs("remove leftover", &path))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        fsutil::fsync_dir(root).map_err(CheckpointError::fs("fsync", root))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::listing::dir_bytes;
    use crate::checkpoint::testutil::{dir_names, manifest, payload, write};
    use crate::checkpoint::{inspect, list};

    /// The id of the checkpoint `open_latest` resumes from.
    fn latest_id(root: &Path) -> String {
        open_latest(root).unwrap().checkpoint.unwrap().manifest.id
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
        assert_eq!(latest_id(root.path()), b.id);
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
                    assert_eq!(latest_id(root.path()), info.id);
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
}
