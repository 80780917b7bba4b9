//! Durable file-system steps with a fault-injection hook.
//!
//! Every step of a checkpoint write goes through [`Steps::run`], which counts the steps and
//! can be told by a [`FaultPlan`] to fail one of them with `ENOSPC` instead of doing it. The
//! hook is compiled into normal builds (it costs one comparison per step) so tests exercise
//! the same code the daemon runs.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One kind of step of a checkpoint write, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteStep {
    /// Create the checkpoint root directory if missing.
    CreateRoot,
    /// Create `root/.tmp-<id>/`.
    CreateTmpDir,
    /// Create and write one file in the temporary directory.
    WriteFile,
    /// fsync one file.
    SyncFile,
    /// fsync the temporary directory.
    SyncTmpDir,
    /// Rename `root/.tmp-<id>` to `root/<id>`.
    RenameDir,
    /// fsync the root after the rename.
    SyncRoot,
    /// Write `root/.LATEST.tmp`.
    WriteLatest,
    /// fsync `root/.LATEST.tmp`.
    SyncLatest,
    /// Rename `root/.LATEST.tmp` to `root/LATEST`.
    RenameLatest,
    /// fsync the root after the LATEST rename.
    SyncRootLatest,
}

impl std::fmt::Display for WriteStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::CreateRoot => "create root dir",
            Self::CreateTmpDir => "create temp dir",
            Self::WriteFile => "write file",
            Self::SyncFile => "fsync file",
            Self::SyncTmpDir => "fsync temp dir",
            Self::RenameDir => "rename temp dir",
            Self::SyncRoot => "fsync root dir",
            Self::WriteLatest => "write LATEST temp",
            Self::SyncLatest => "fsync LATEST temp",
            Self::RenameLatest => "rename LATEST",
            Self::SyncRootLatest => "fsync root dir after LATEST",
        };
        f.write_str(s)
    }
}

/// Which step of a write to fail (tests only; the daemon passes [`FaultPlan::none`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Fail the step with this 0-based sequence number (counting every step of the write).
    pub fail_at: Option<usize>,
}

impl FaultPlan {
    /// No fault: every step runs.
    pub fn none() -> Self {
        Self { fail_at: None }
    }

    /// Fail the `n`-th step (0-based) with `ENOSPC`.
    pub fn fail_step(n: usize) -> Self {
        Self { fail_at: Some(n) }
    }
}

/// A failed step: which one, on which path, and the OS error.
#[derive(Debug)]
pub struct StepError {
    /// The step.
    pub step: WriteStep,
    /// The path it worked on.
    pub path: PathBuf,
    /// The error.
    pub source: io::Error,
}

/// Runs the steps of one write, counting them and injecting the planned fault.
pub struct Steps {
    plan: FaultPlan,
    done: Cell<usize>,
}

impl Steps {
    /// A step runner for `plan`.
    pub fn new(plan: FaultPlan) -> Self {
        Self {
            plan,
            done: Cell::new(0),
        }
    }

    /// Runs `f` as step `step` on `path`, or fails it if the plan says so.
    pub fn run<T>(
        &self,
        step: WriteStep,
        path: &Path,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Result<T, StepError> {
        let n = self.done.get();
        self.done.set(n + 1);
        let result = if self.plan.fail_at == Some(n) {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        } else {
            f()
        };
        result.map_err(|source| StepError {
            step,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `path` (which must not exist), writes `bytes` and returns the open file.
pub fn create_and_write(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut f = File::options().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    Ok(f)
}

/// Writes `bytes` to `path` durably: `path`'s directory gets `.<name>.tmp`, which is
/// written, fsynced and renamed over `path`; then the directory is fsynced.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let _ = std::fs::remove_file(&tmp);
        let f = create_and_write(&tmp, bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_fail_exactly_the_planned_one() {
        let steps = Steps::new(FaultPlan::fail_step(1));
        let p = Path::new("/x");
        assert!(steps.run(WriteStep::CreateRoot, p, || Ok(())).is_ok());
        let err = steps.run(WriteStep::WriteFile, p, || Ok(())).unwrap_err();
        assert_eq!(err.step, WriteStep::WriteFile);
        assert_eq!(err.source.raw_os_error(), Some(libc::ENOSPC));
        assert!(steps.run(WriteStep::SyncFile, p, || Ok(())).is_ok());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_file_atomic(&p, b"one").unwrap();
        write_file_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    }
}
