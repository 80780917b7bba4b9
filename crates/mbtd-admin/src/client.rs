//! The `mbtd ctl` client: one request over the admin socket, responses printed as they come.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::protocol::{Request, Response};

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
}

/// Sends `cmd` with `args` and calls `on_response` for each response line (chunks of a stream
/// and the final one). Returns the final response's data.
pub fn call(
    socket: &Path,
    cmd: &str,
    args: serde_json::Value,
    mut on_chunk: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_path_buf())
        }
        _ => ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        },
    })?;
    let req = Request {
        id: 1,
        cmd: cmd.to_string(),
        args,
    };
    (&stream).write_all(req.to_line().as_bytes())?;
    let mut rd = BufReader::new(&stream);
    loop {
        let mut buf = String::new();
        if rd.read_line(&mut buf)? == 0 {
            return Err(ClientError::Truncated);
        }
        let resp: Response = serde_json::from_str(buf.trim())
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        if !resp.ok {
            return Err(ClientError::Daemon(resp.error.unwrap_or_default()));
        }
        if resp.done {
            return Ok(resp.data.unwrap_or(serde_json::Value::Null));
        }
        if let Some(d) = &resp.data {
            on_chunk(d);
        }
    }
}
