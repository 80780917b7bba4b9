//! Listing the checkpoints under a root from their manifests (no file content is hashed:
//! that happens on load and in [`super::inspect()`]).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::CheckpointError;
use super::format::{TMP_PREFIX, checkpoint_ids, read_latest, read_manifest};
use super::manifest::{Manifest, is_valid_id};
use crate::store::fsutil;

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
    /// Checkpoints its state may return to (see [`super::Manifest::pins`]).
    #[serde(default)]
    pub pins: Vec<String>,
    /// Bytes of all files in the directory.
    pub bytes: u64,
    /// Whether the manifest verified and every file it lists is present with its size
    /// (contents are hashed on load and by `inspect checkpoint`, not here).
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

impl CheckpointList {
    /// The valid checkpoint an operator means by `name`: an id, `previous` (the one before
    /// `LATEST`), or a tag (the newest with it).
    pub fn resolve(&self, name: &str) -> Result<&CheckpointSummary, CheckpointError> {
        let valid: Vec<&CheckpointSummary> = self.checkpoints.iter().filter(|c| c.valid).collect();
        let found = if name == "previous" {
            let cur = valid.iter().position(|c| c.is_latest);
            match cur {
                Some(i) if i > 0 => Some(valid[i - 1]),
                _ => {
                    return Err(CheckpointError::NotFound {
                        name: name.to_string(),
                        why: "there is no valid checkpoint before LATEST".to_string(),
                    });
                }
            }
        } else {
            valid
                .iter()
                .find(|c| c.id == name)
                .or_else(|| valid.iter().rev().find(|c| c.tag.as_deref() == Some(name)))
                .copied()
        };
        found.ok_or_else(|| CheckpointError::NotFound {
            name: name.to_string(),
            why: "no valid checkpoint has this id or tag".to_string(),
        })
    }

    /// Ids that must not be deleted now: `LATEST`, its parent, and the checkpoints `LATEST`
    /// pins (an undecided expansion's pre-expansion checkpoint).
    pub fn protected(&self) -> Vec<&str> {
        let mut out = Vec::new();
        for c in self.checkpoints.iter().filter(|c| c.is_latest) {
            out.push(c.id.as_str());
            out.extend(c.parent.as_deref());
            out.extend(c.pins.iter().map(String::as_str));
        }
        out
    }
}

/// Total size of the plain files in `dir` (one `stat` each).
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
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

/// The first problem of checkpoint `id` short of hashing: manifest unreadable or for another
/// id, or a listed file missing or of another size.
fn quick_problem(dir: &Path, id: &str, m: &Manifest) -> Option<String> {
    if m.id != id {
        return Some(format!(
            "manifest id {:?} differs from the directory name",
            m.id
        ));
    }
    m.files.iter().find_map(|(name, entry)| {
        let path = dir.join(name);
        match fs::metadata(&path) {
            Err(_) => Some(CheckpointError::FileMissing { path }.to_string()),
            Ok(meta) if meta.len() != entry.bytes => Some(
                CheckpointError::FileSize {
                    path,
                    expected: entry.bytes,
                    actual: meta.len(),
                }
                .to_string(),
            ),
            Ok(_) => None,
        }
    })
}

/// Lists the checkpoints under `root` (oldest first) from their manifests and file sizes;
/// the cost is one manifest read and a `stat` per file, whatever the checkpoints' size.
pub fn list(root: &Path) -> Result<CheckpointList, CheckpointError> {
    let latest = read_latest(root).ok().flatten();
    let mut checkpoints = Vec::new();
    for id in checkpoint_ids(root)? {
        let dir = root.join(&id);
        let manifest = read_manifest(&dir);
        let problem = match &manifest {
            Ok(m) => quick_problem(&dir, &id, m),
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
            pins: m.as_ref().map(|m| m.pins.clone()).unwrap_or_default(),
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

/// The manifest of the checkpoint a start would resume from, read without hashing any file:
/// the one `LATEST` names, else the newest readable one. `None` when there is none.
pub fn resume_manifest(root: &Path) -> Option<Manifest> {
    if let Ok(Some(id)) = read_latest(root)
        && let Ok(m) = read_manifest(&root.join(&id))
    {
        return Some(m);
    }
    checkpoint_ids(root)
        .ok()?
        .iter()
        .rev()
        .find_map(|id| read_manifest(&root.join(id)).ok())
}

/// Deletes what an operator names (`ctl checkpoint delete`): the checkpoint with id `name`,
/// else every checkpoint tagged `name`. Refuses, deleting nothing, when that would delete
/// `LATEST`, its parent or a checkpoint `LATEST` pins. Returns the ids deleted, oldest first.
pub fn delete(root: &Path, name: &str) -> Result<Vec<String>, CheckpointError> {
    let l = list(root)?;
    let doomed: Vec<String> = if l.checkpoints.iter().any(|c| c.id == name) {
        vec![name.to_string()]
    } else {
        l.checkpoints
            .iter()
            .filter(|c| c.tag.as_deref() == Some(name))
            .map(|c| c.id.clone())
            .collect()
    };
    if doomed.is_empty() {
        return Err(CheckpointError::NotFound {
            name: name.to_string(),
            why: "no checkpoint has this id or tag".to_string(),
        });
    }
    let protected = l.protected();
    if let Some(p) = doomed.iter().find(|id| protected.contains(&id.as_str())) {
        return Err(CheckpointError::Protected { id: p.clone() });
    }
    remove_checkpoints(root, &doomed)
}

/// Removes checkpoint directories `ids` under `root` (each is renamed to a `.tmp-del-` name
/// first, so a crash mid-delete leaves only a leftover the next start removes), then fsyncs
/// `root`. Refuses the one `LATEST` names. Returns the ids removed.
pub fn remove_checkpoints(root: &Path, ids: &[String]) -> Result<Vec<String>, CheckpointError> {
    let latest = read_latest(root).ok().flatten();
    let mut removed = Vec::new();
    for id in ids {
        if !is_valid_id(id) || latest.as_deref() == Some(id.as_str()) {
            return Err(CheckpointError::Protected { id: id.clone() });
        }
        let dir = root.join(id);
        let doomed = root.join(format!("{TMP_PREFIX}del-{id}"));
        fs::rename(&dir, &doomed).map_err(CheckpointError::fs("rename for deletion", &dir))?;
        fs::remove_dir_all(&doomed).map_err(CheckpointError::fs("remove", &doomed))?;
        removed.push(id.clone());
    }
    if !removed.is_empty() {
        fsutil::fsync_dir(root).map_err(CheckpointError::fs("fsync", root))?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::inspect;
    use crate::checkpoint::testutil::write;

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
