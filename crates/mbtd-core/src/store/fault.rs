//! Test hook: an injected full disk at the replay store's write layer.
//!
//! Built with the `fault-injection` feature, every flush and fsync of segment data first
//! checks for a file named [`DISK_FULL_FLAG`] in the replay directory and, while it
//! exists, fails with `ENOSPC` (`ErrorKind::StorageFull`) as a full disk would. Without
//! the feature the check compiles to nothing.

use std::io;
use std::path::Path;

/// Name of the flag file (inside the replay directory) that simulates a full disk.
pub const DISK_FULL_FLAG: &str = "fault-disk-full";

/// `Err(ENOSPC)` while `<replay dir>/fault-disk-full` exists (`fault-injection` builds).
#[cfg(feature = "fault-injection")]
pub fn disk_full(replay_dir: &Path) -> io::Result<()> {
    if replay_dir.join(DISK_FULL_FLAG).exists() {
        return Err(io::Error::from(io::ErrorKind::StorageFull));
    }
    Ok(())
}

/// Always `Ok` (built without the `fault-injection` feature).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn disk_full(_replay_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// True when `e` says the file system is out of space or quota (`ENOSPC`, `EDQUOT`).
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
