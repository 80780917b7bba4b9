//! The admin socket server: binding with safe permissions, peer-credential checks, a cap on
//! open connections, an idle timeout, bounded request lines, and one task per connection
//! that hands requests to the [`Dispatcher`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::protocol::{Incoming, Response, decode_line, too_large_response};
use super::server_events::{
    AcceptFailed, ConnectionRefused, IdleClosed, PeerRefused, RequestTooLarge,
};
use crate::actors::dispatch::Dispatcher;
use crate::config::AdminConfig;
use crate::telemetry::event::{InternalEvent, RateLimit};
use crate::telemetry::names;

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

/// The limits one admin socket enforces (from `[admin]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line; a longer one gets an error and the connection closes.
    pub max_request_bytes: usize,
    /// Connections served at once; one more is answered with an error and closed.
    pub max_connections: usize,
    /// A connection that sends no request for this long (or does not take a response for
    /// this long) is closed.
    pub idle_timeout: Duration,
}

impl From<&AdminConfig> for Limits {
    fn from(c: &AdminConfig) -> Self {
        Self {
            max_request_bytes: c.max_request_bytes,
            max_connections: c.max_connections,
            idle_timeout: Duration::from_secs(c.idle_timeout_s),
        }
    }
}

/// Interval of the log lines of repeating refusals and accept errors (all are counted).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of descriptors: nothing succeeds until one frees).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// The answer to a connection over `admin.max_connections`.
pub fn too_many_connections_response(limits: &Limits) -> Response {
    Response::error(
        0,
        format!(
            "too many admin connections: admin.max_connections = {} are open; this one is \
             closed. Idle connections close after admin.idle_timeout_s = {} s; close unused \
             clients or raise admin.max_connections",
            limits.max_connections,
            limits.idle_timeout.as_secs()
        ),
    )
}

/// Accepts connections forever, one task each, at most `limits.max_connections` at once.
pub async fn serve(
    listener: UnixListener,
    dispatcher: Dispatcher,
    limits: Limits,
    group: Option<u32>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open_gauge = metrics::gauge!(names::ADMIN_CONNECTIONS);
    open_gauge.set(0.0);
    let mut refused_log = RateLimit::new(LOG_EVERY);
    let mut peer_log = RateLimit::new(LOG_EVERY);
    let mut accept_log = RateLimit::new(LOG_EVERY);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                let admitted = accept_log.admit(Instant::now());
                AcceptFailed {
                    error: &error,
                    suppressed: admitted.unwrap_or(0),
                    logged: admitted.is_some(),
                }
                .emit();
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // A refused connection gets one line (written without waiting: a fresh socket's
        // buffer takes it) and is closed when `stream` drops.
        let refuse = |stream: &UnixStream, r: Response| {
            let _ = stream.try_write(r.to_line().as_bytes());
        };
        match stream.peer_cred() {
            Ok(cred) if peer_allowed(cred.uid(), cred.gid(), group) => {}
            Ok(cred) => {
                let admitted = peer_log.admit(Instant::now());
                PeerRefused {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    pid: cred.pid(),
                    suppressed: admitted.unwrap_or(0),
                    logged: admitted.is_some(),
                }
                .emit();
                refuse(
                    &stream,
                    Response::error(
                        0,
                        "permission denied: only root, the daemon's user or admin.group may use this socket",
                    ),
                );
                continue;
            }
            Err(e) => {
                tracing::debug!(actor = "admin", error = %e, "no peer credentials; connection dropped");
                continue;
            }
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let admitted = refused_log.admit(Instant::now());
            ConnectionRefused {
                max: limits.max_connections,
                suppressed: admitted.unwrap_or(0),
                logged: admitted.is_some(),
            }
            .emit();
            refuse(&stream, too_many_connections_response(&limits));
            continue;
        };
        open_gauge.set((limits.max_connections - slots.available_permits()) as f64);
        let d = dispatcher.clone();
        let (slots, open_gauge) = (slots.clone(), open_gauge.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, d, &limits).await {
                tracing::debug!(actor = "admin", error = %e, "admin connection ended");
            }
            drop(permit);
            open_gauge.set((limits.max_connections - slots.available_permits()) as f64);
        });
    }
}

/// Writes one response, giving up (an error) when the client takes none of it for
/// `limits.idle_timeout`.
async fn send(wr: &mut OwnedWriteHalf, r: &Response, limits: &Limits) -> std::io::Result<()> {
    match tokio::time::timeout(limits.idle_timeout, wr.write_all(r.to_line().as_bytes())).await {
        Ok(res) => res,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took no response for admin.idle_timeout_s",
        )),
    }
}

/// Waits for the client's next bytes without taking them: `false` when a next request is
/// arriving or the client only closed its sending side (it still reads its answer, as
/// `nc -N` does); `true` when it hung up (closed, or shut down both directions).
async fn client_gone<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    wr: &OwnedWriteHalf,
) -> std::io::Result<bool> {
    if !rd.fill_buf().await?.is_empty() {
        return Ok(false);
    }
    let ready = wr.as_ref().ready(tokio::io::Interest::WRITABLE).await?;
    Ok(ready.is_write_closed())
}

/// Serves one connection's requests in order, each in its own task. When the client goes
/// away mid-response this returns, dropping the response channel: a stream (`generate`)
/// sees it closed and cancels its work; other commands finish and their answer is dropped.
async fn connection(
    stream: UnixStream,
    dispatcher: Dispatcher,
    limits: &Limits,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let max = limits.max_request_bytes;
    let mut rd = BufReader::new(rd);
    loop {
        let read = tokio::time::timeout(limits.idle_timeout, read_line_bounded(&mut rd, max));
        let line = match read.await {
            Err(_) => {
                IdleClosed {
                    idle_s: limits.idle_timeout.as_secs(),
                }
                .emit();
                let r = Response::error(
                    0,
                    format!(
                        "no request for admin.idle_timeout_s = {} s; connection closed",
                        limits.idle_timeout.as_secs()
                    ),
                );
                return send(&mut wr, &r, limits).await;
            }
            Ok(read) => match read? {
                LineRead::Eof => return Ok(()),
                LineRead::TooLarge => {
                    RequestTooLarge { max_bytes: max }.emit();
                    return send(&mut wr, &too_large_response(max), limits).await;
                }
                LineRead::Line(l) => l,
            },
        };
        let req = match decode_line(&line) {
            Incoming::Blank => continue,
            Incoming::Request(r) => r,
            Incoming::Malformed(r) => {
                metrics::counter!(names::ADMIN_REQUESTS_TOTAL, "outcome" => "error").increment(1);
                send(&mut wr, &r, limits).await?;
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Response>(64);
        let d = dispatcher.clone();
        tokio::spawn(async move { d.handle(req, tx).await });
        let mut ok = true;
        // Until the client sends its next request, watch for it hanging up: then stop here
        // (a stream sees its channel closed and cancels its work), even while the response
        // has nothing to write for a while.
        let mut watch_hangup = true;
        loop {
            let resp = tokio::select! {
                r = rx.recv() => r,
                gone = client_gone(&mut rd, &wr), if watch_hangup => {
                    if gone? {
                        return Ok(());
                    }
                    watch_hangup = false;
                    continue;
                }
            };
            let Some(resp) = resp else { break };
            ok &= resp.ok;
            send(&mut wr, &resp, limits).await?;
        }
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
