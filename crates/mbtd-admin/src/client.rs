//! The client side of the admin socket (`mbtd ctl`, `mbtd chat`): one typed request per
//! connection, responses read as they come. Closing the connection while a stream runs
//! cancels it: the daemon stops generating for that request.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{Envelope, Request, RequestError, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("mbtd is not running (no socket at {0})")]
    NotRunning(PathBuf),
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connection to mbtd lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("mbtd sent a response that is not valid JSON: {0}")]
    BadResponse(String),
    #[error("mbtd closed the connection before the response was complete")]
    Truncated,
    #[error("{0}")]
    Daemon(String),
    #[error("request not sent: {0}")]
    Request(#[from] RequestError),
}

/// One response of a call, in order: chunks of a stream, then the final data.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Chunk(serde_json::Value),
    Done(serde_json::Value),
}

/// A request in flight on its own connection.
pub struct Call {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Bytes of a response line read before a poll timed out.
    partial: Vec<u8>,
}

impl Call {
    /// Connects to `socket` and sends `request`.
    pub fn start(socket: &Path, request: &Request) -> Result<Call, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(socket.to_path_buf())
            }
            _ => ClientError::Connect {
                path: socket.to_path_buf(),
                source,
            },
        })?;
        let line = Envelope {
            id: 1,
            request: request.clone(),
        }
        .to_line();
        if let Err(e) = (&stream).write_all(line.as_bytes()) {
            // A refused connection (too many open) may be closed before the request is
            // written; the daemon's reason is still readable.
            let mut first = String::new();
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            if BufReader::new(&stream).read_line(&mut first).is_ok()
                && let Ok(r) = serde_json::from_str::<Response>(first.trim())
                && !r.ok
            {
                return Err(ClientError::Daemon(r.error.unwrap_or_default()));
            }
            return Err(e.into());
        }
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Call {
            stream,
            reader,
            partial: Vec::new(),
        })
    }

    /// The next response, waiting at most `wait` (`None`: until it comes). `Ok(None)` when
    /// the wait ran out (call again; nothing is lost). A daemon error is `Err(Daemon)`.
    pub fn next(&mut self, wait: Option<Duration>) -> Result<Option<Event>, ClientError> {
        self.stream.set_read_timeout(wait)?;
        match self.reader.read_until(b'\n', &mut self.partial) {
            Ok(0) => return Err(ClientError::Truncated),
            Ok(_) if self.partial.ends_with(b"\n") => {}
            Ok(_) => return Err(ClientError::Truncated),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let line = std::mem::take(&mut self.partial);
        let resp: Response = serde_json::from_slice(line.trim_ascii())
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        if !resp.ok {
            return Err(ClientError::Daemon(resp.error.unwrap_or_default()));
        }
        let data = resp.data.unwrap_or(serde_json::Value::Null);
        Ok(Some(if resp.done {
            Event::Done(data)
        } else {
            Event::Chunk(data)
        }))
    }

    /// Abandons the request: the connection closes and the daemon stops working on it.
    pub fn cancel(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Sends `request` and calls `on_chunk` for each chunk of a stream. Returns the final
/// response's data.
pub fn call(
    socket: &Path,
    request: &Request,
    mut on_chunk: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value, ClientError> {
    let mut c = Call::start(socket, request)?;
    loop {
        match c.next(None)? {
            Some(Event::Chunk(d)) => on_chunk(&d),
            Some(Event::Done(d)) => return Ok(d),
            None => {}
        }
    }
}

/// [`call`] with a command given by name and JSON arguments, checked here by the same rules
/// as the daemon's before anything is sent.
pub fn call_json(
    socket: &Path,
    cmd: &str,
    args: serde_json::Value,
    on_chunk: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value, ClientError> {
    call(socket, &Request::from_parts(cmd, args)?, on_chunk)
}
