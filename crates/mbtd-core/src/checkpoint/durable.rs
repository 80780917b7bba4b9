//! The steps of a checkpoint write, with a fault-injection hook.
//!
//! Every step of a checkpoint write goes through [`Steps::run`], which counts the steps and
//! can be told by a [`FaultPlan`] to fail one of them with `ENOSPC` instead of doing it. The
//! hook is compiled into normal builds (it costs one comparison per step) so tests exercise
//! the same code the daemon runs. The file operations themselves are
//! [`crate::store::fsutil`]'s.

use std::cell::Cell;
use std::io;
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

    /// The plan of a daemon write under `root`: none, except in builds with the
    /// `fault-injection` feature, where the file `root/`[`INJECT_ENOSPC_FILE`] makes the
    /// first file write fail with `ENOSPC` (a full disk, for tests that cannot mount a small
    /// filesystem).
    pub fn injected(root: &Path) -> Self {
        if cfg!(feature = "fault-injection") && root.join(INJECT_ENOSPC_FILE).exists() {
            // Step 0 creates the root, step 1 the temp dir, step 2 writes the first file.
            Self::fail_step(2)
        } else {
            Self::none()
        }
    }
}

/// See [`FaultPlan::injected`]; a dot-file, so listing and retention ignore it.
pub const INJECT_ENOSPC_FILE: &str = ".inject-enospc";

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
}
