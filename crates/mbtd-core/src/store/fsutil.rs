//! Durable file operations, the one place they are written: temp file + fsync + rename +
//! directory fsync. The checkpoint format, the replay state, sidecars, the tokenizer and the
//! demo producer all write through [`write_atomic`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// fsync a directory so that entries created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The temporary name [`write_atomic`] uses for `path`: `.<name>.tmp` in the same
/// directory. It starts with a dot (the inbox scan and the checkpoint listing skip it) and
/// ends in `.tmp` (the replay store removes such leftovers when it opens).
pub fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok(parent_of(path).join(format!(".{}.tmp", name.to_string_lossy())))
}

/// Creates `path` (which must not exist), writes `bytes` and returns the open file (not yet
/// fsynced).
pub fn create_and_write(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    Ok(f)
}

/// Writes `bytes` to `path` atomically and durably: write [`temp_path`], fsync it, rename it
/// over `path`, fsync the parent directory. A crash leaves either the old or the new content,
/// never a mix; on error the temporary file is removed and `path` is unchanged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let result = (|| {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let f = create_and_write(&tmp, bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fsync_dir(parent_of(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The parent directory of `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    system_ms(std::time::SystemTime::now()).max(0) as u64
}

/// `t` in milliseconds since the Unix epoch (negative before it, saturating).
pub fn system_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        // A leftover temp of a crashed earlier write does not get in the way.
        fs::write(temp_path(&p).unwrap(), b"partial").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
    }

    #[test]
    fn temp_name_is_hidden_and_ends_in_tmp() {
        assert_eq!(
            temp_path(Path::new("a/b/state.json")).unwrap(),
            Path::new("a/b/.state.json.tmp")
        );
        assert_eq!(
            temp_path(Path::new("LATEST")).unwrap(),
            Path::new("./.LATEST.tmp")
        );
        assert!(temp_path(Path::new("/")).is_err());
    }

    #[test]
    fn a_failed_write_leaves_the_old_content_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"old").unwrap();
        // Renaming a file over a directory fails after the temp was written.
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("x"), b"x").unwrap();
        assert!(write_atomic(&d, b"new").is_err());
        assert!(!temp_path(&d).unwrap().exists());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }
}
