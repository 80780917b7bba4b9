//! Admin protocol: JSON lines over a Unix socket.
//!
//! A request is one line `{"id": <u64>, "cmd": "<name>", "args": {…}}`. The daemon answers
//! with one or more lines `{"id": …, "ok": true, "data": …, "done": <bool>}`; a stream (e.g.
//! `generate`) sends `done: false` chunks and ends with a `done: true` message. An error is
//! `{"id": …, "ok": false, "error": "…", "done": true}`.

use serde::{Deserialize, Serialize};

/// A request from a client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub id: u64,
    pub cmd: String,
    #[serde(default)]
    pub args: serde_json::Value,
}

impl Request {
    /// The line sent on the wire (with its trailing newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a request serialises");
        s.push('\n');
        s
    }
}

/// What one request line (without its `\n`) is to the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// Empty or only ASCII whitespace: ignored.
    Blank,
    /// A well-formed request.
    Request(Request),
    /// Not a request; the error response to send (the connection stays usable).
    Malformed(Response),
}

/// Decodes one request line. Pure: the server's only decision about a line's content.
pub fn decode_line(line: &[u8]) -> Incoming {
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return Incoming::Blank;
    }
    // serde's derived struct decoding also takes a JSON array (`[1,"ping",{}]`); the
    // protocol is objects only.
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    let decoded = match first {
        Some(b'{') => serde_json::from_slice::<Request>(line).map_err(|e| e.to_string()),
        _ => Err("a request must be a JSON object".to_string()),
    };
    match decoded {
        Ok(r) => Incoming::Request(r),
        Err(e) => Incoming::Malformed(Response::error(
            0,
            format!(
                "malformed request: {e}; expected one JSON object per line like {{\"id\":1,\"cmd\":\"status\",\"args\":{{}}}}"
            ),
        )),
    }
}

/// The error response to a request line longer than `max` bytes (the connection is closed).
pub fn too_large_response(max: usize) -> Response {
    Response::error(
        0,
        format!("request larger than {max} bytes (admin.max_request_bytes); connection closed"),
    )
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub done: bool,
}

impl Response {
    pub fn ok(id: u64, data: serde_json::Value) -> Self {
        Self {
            id,
            ok: true,
            data: Some(data),
            error: None,
            done: true,
        }
    }

    pub fn chunk(id: u64, data: serde_json::Value) -> Self {
        Self {
            id,
            ok: true,
            data: Some(data),
            error: None,
            done: false,
        }
    }

    pub fn error(id: u64, message: impl Into<String>) -> Self {
        Self {
            id,
            ok: false,
            data: None,
            error: Some(message.into()),
            done: true,
        }
    }

    /// The line sent on the wire (with its trailing newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("response serialises");
        s.push('\n');
        s
    }
}

/// What `ctl status` shows for one actor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActorStatus {
    pub name: String,
    pub state: String,
    pub restarts: u64,
}

/// The reply to `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReply {
    pub version: String,
    pub pid: u32,
    pub uptime_s: f64,
    pub data_dir: String,
    pub actors: Vec<ActorStatus>,
    /// Extra sections contributed by actors (ingest, replay, trainer, …), in order.
    #[serde(default)]
    pub sections: Vec<(String, serde_json::Value)>,
}

/// A section (`trainer`, `replay`, …) of a `status` reply as JSON (`Null` when absent).
pub fn status_section<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["sections"]
        .as_array()
        .and_then(|s| s.iter().find(|e| e[0] == name))
        .map_or(&serde_json::Value::Null, |e| &e[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_defaults() {
        let r: Request = serde_json::from_str(r#"{"cmd":"ping"}"#).unwrap();
        assert_eq!(r.id, 0);
        assert_eq!(r.args, serde_json::Value::Null);
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"x","bogus":1}"#).is_err());
    }

    #[test]
    fn decode_line_takes_objects_only() {
        assert_eq!(decode_line(b" \t\r"), Incoming::Blank);
        let Incoming::Request(r) = decode_line(br#" {"id":2,"cmd":"ping"}"#) else {
            panic!("an object is a request")
        };
        assert_eq!((r.id, r.cmd.as_str()), (2, "ping"));
        // serde's derive would take the array form; the protocol does not.
        for bad in [&br#"[1,"ping",{}]"#[..], b"\"ping\"", b"{\"cmd\":"] {
            let Incoming::Malformed(resp) = decode_line(bad) else {
                panic!("{} accepted", String::from_utf8_lossy(bad))
            };
            assert!(resp.error.unwrap().starts_with("malformed request"));
        }
    }

    #[test]
    fn response_lines_end_with_newline_and_parse_back() {
        let r = Response::error(7, "nope");
        let line = r.to_line();
        assert!(line.ends_with('\n'));
        assert_eq!(serde_json::from_str::<Response>(line.trim()).unwrap(), r);
    }
}
