//! The admin socket server: binding with safe permissions, peer-credential checks, bounded
//! request lines, and one task per connection that hands requests to the [`Dispatcher`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::protocol::{Incoming, Response, decode_line, too_large_response};
use crate::actors::dispatch::Dispatcher;
use crate::telemetry::names::{self, events};

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "{path} exists and is not a socket; refusing to replace it (move it away or set admin.socket)"
    )]
    NotASocket { path: PathBuf },
    #[error("cannot bind the admin socket at {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set permissions of the admin socket {path}: {source}")]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin.group `{group}` does not exist on this system; create it or remove the key")]
    UnknownGroup { group: String },
}

/// Looks a group name up in the system's group database.
pub fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam reads a NUL-terminated name; the result is only read immediately.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        None
    } else {
        // SAFETY: non-null pointer returned by getgrnam.
        Some(unsafe { (*gr).gr_gid })
    }
}

/// Binds the socket at `path` with mode 0600 (0660 and group ownership when `gid` is given).
/// A stale socket file left by a dead daemon is replaced; the caller holds the data-dir lock,
/// so no live daemon can own it. Anything other than a socket is never removed.
pub fn bind(path: &Path, gid: Option<u32>) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(AdminError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    // SAFETY: umask only changes the process file-creation mask; restored right after bind,
    // so the socket never exists with wider permissions than 0600.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|source| AdminError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let perm = |source| AdminError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    if let Some(gid) = gid {
        let c =
            std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in path");
        // SAFETY: chown on a NUL-terminated path we just created; uid -1 keeps the owner.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(perm(std::io::Error::last_os_error()));
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(perm)?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(perm)?;
    }
    Ok(listener)
}

/// Whether a peer may use the socket: root, the daemon's own user, or a member of the
/// configured group (primary group of the peer process).
pub fn peer_allowed(peer_uid: u32, peer_gid: u32, group: Option<u32>) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    peer_uid == 0 || peer_uid == me || group.is_some_and(|g| g == peer_gid)
}

/// Outcome of reading one request line.
#[derive(Debug, PartialEq)]
pub enum LineRead {
    Line(Vec<u8>),
    TooLarge,
    Eof,
}

/// Reads one `\n`-terminated line of at most `max` bytes without buffering more than that.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<LineRead> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line(line)
            });
        }
        let (take, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let content = if found { take - 1 } else { take };
        if line.len() + content > max {
            return Ok(LineRead::TooLarge);
        }
        line.extend_from_slice(&buf[..content]);
        r.consume(take);
        if found {
            return Ok(LineRead::Line(line));
        }
    }
}

/// Accepts connections forever, one task each.
pub async fn serve(
    listener: UnixListener,
    dispatcher: Dispatcher,
    max_request_bytes: usize,
    group: Option<u32>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let d = dispatcher.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, d, max_request_bytes, group).await {
                        tracing::debug!(actor = "admin", error = %e, "admin connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(actor = "admin", error = %e, "accept failed on the admin socket");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    stream: UnixStream,
    dispatcher: Dispatcher,
    max: usize,
    group: Option<u32>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (rd, mut wr) = stream.into_split();
    if !peer_allowed(cred.uid(), cred.gid(), group) {
        tracing::warn!(
            event = events::ADMIN_PEER_REFUSED,
            actor = "admin",
            uid = cred.uid(),
            gid = cred.gid(),
            pid = cred.pid(),
            "refused an admin connection from an unauthorised user"
        );
        let r = Response::error(
            0,
            "permission denied: only root, the daemon's user or admin.group may use this socket",
        );
        wr.write_all(r.to_line().as_bytes()).await?;
        return Ok(());
    }
    let mut rd = BufReader::new(rd);
    loop {
        let line = match read_line_bounded(&mut rd, max).await? {
            LineRead::Eof => return Ok(()),
            LineRead::TooLarge => {
                metrics::counter!(names::ADMIN_REQUESTS_TOTAL, "outcome" => "error").increment(1);
                tracing::warn!(
                    event = events::ADMIN_REQUEST_REFUSED,
                    actor = "admin",
                    max_bytes = max,
                    "admin request larger than the limit; connection closed"
                );
                wr.write_all(too_large_response(max).to_line().as_bytes())
                    .await?;
                return Ok(());
            }
            LineRead::Line(l) => l,
        };
        let req = match decode_line(&line) {
            Incoming::Blank => continue,
            Incoming::Request(r) => r,
            Incoming::Malformed(r) => {
                metrics::counter!(names::ADMIN_REQUESTS_TOTAL, "outcome" => "error").increment(1);
                wr.write_all(r.to_line().as_bytes()).await?;
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Response>(64);
        let d = dispatcher.clone();
        let job = tokio::spawn(async move { d.handle(req, tx).await });
        let mut ok = true;
        while let Some(resp) = rx.recv().await {
            ok &= resp.ok;
            wr.write_all(resp.to_line().as_bytes()).await?;
        }
        let _ = job.await;
        let outcome = if ok { "ok" } else { "error" };
        metrics::counter!(names::ADMIN_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_reader_splits_lines_and_refuses_oversize() {
        let data = b"abc\n{\"x\":1}\nlonglonglong\n".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        assert_eq!(
            read_line_bounded(&mut r, 8).await.unwrap(),
            LineRead::Line(b"abc".to_vec())
        );
        assert_eq!(
            read_line_bounded(&mut r, 8).await.unwrap(),
            LineRead::Line(b"{\"x\":1}".to_vec())
        );
        assert_eq!(
            read_line_bounded(&mut r, 8).await.unwrap(),
            LineRead::TooLarge
        );
    }

    #[tokio::test]
    async fn unterminated_last_line_and_eof() {
        let data = b"tail".to_vec();
        let mut r = BufReader::new(&data[..]);
        assert_eq!(
            read_line_bounded(&mut r, 8).await.unwrap(),
            LineRead::Line(b"tail".to_vec())
        );
        assert_eq!(read_line_bounded(&mut r, 8).await.unwrap(), LineRead::Eof);
    }

    #[test]
    fn peers_allowed_are_root_self_and_group() {
        let me = unsafe { libc::geteuid() };
        assert!(peer_allowed(0, 0, None));
        assert!(peer_allowed(me, 12345, None));
        if me != 54321 {
            assert!(!peer_allowed(54321, 777, None));
            assert!(peer_allowed(54321, 777, Some(777)));
            assert!(!peer_allowed(54321, 778, Some(777)));
        }
    }

    #[tokio::test]
    async fn socket_is_created_0600_and_stale_socket_replaced_but_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = bind(&p, None).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        bind(&p, None).unwrap();
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(bind(&f, None), Err(AdminError::NotASocket { .. })));
        assert!(f.exists());
    }
}
