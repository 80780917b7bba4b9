//! Properties of the admin socket's request lines: bounded framing and decoding.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use crate::admin::protocol::{Envelope, Incoming, Request, Response, decode_line};
use crate::admin::server::{LineRead, read_line_bounded};

/// Fuzzer entry point: byte 0 sets the line limit (1, 3, …, 511 bytes), byte 1 the read
/// buffer's capacity (1 ..= 64 bytes, so lines arrive in pieces), the rest is what a client
/// sends on one connection.
pub fn admin_lines(input: &[u8]) {
    if let [m, c, stream @ ..] = input {
        check_admin_stream(stream, 1 + 2 * *m as usize, 1 + (*c % 64) as usize);
    }
}

/// Drives the server's bounded line reader over `stream` (buffer of `capacity` bytes) as one
/// connection does, and checks:
/// 1. framing: the lines read are the `\n`-separated pieces of the stream, in order, whole;
///    the first piece longer than `max` bytes gives `TooLarge` (and the connection ends), the
///    end of the stream gives `Eof`;
/// 2. decoding: a line of ASCII blanks is ignored; a decoded request agrees with the line as
///    a generic JSON object (only `id`, `cmd`, `args`; `id` 0 when absent; the typed command
///    is what `Request::from_parts` makes of `cmd` and `args`),
///    and re-encodes as one line that decodes to an equal request; anything else gets one
///    well-formed error line.
pub fn check_admin_stream(stream: &[u8], max: usize, capacity: usize) {
    let mut reader = tokio::io::BufReader::with_capacity(capacity, stream);
    let mut rest = stream;
    loop {
        let got = ready(read_line_bounded(&mut reader, max)).expect("reading a byte slice");
        if rest.is_empty() {
            assert_eq!(got, LineRead::Eof, "the stream has ended");
            return;
        }
        let (piece, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        if piece.len() > max {
            assert_eq!(
                got,
                LineRead::TooLarge,
                "a {}-byte line with max {max}",
                piece.len()
            );
            return;
        }
        assert_eq!(got, LineRead::Line(piece.to_vec()), "framing");
        check_line(piece);
        rest = next;
    }
}

/// Polls a future that never waits (reads from memory) to completion.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("reading from memory waited"),
    }
}

fn check_line(line: &[u8]) {
    match decode_line(line) {
        Incoming::Blank => assert!(line.iter().all(|b| b.is_ascii_whitespace())),
        Incoming::Request(r) => {
            agrees_with_generic_json(line, &r);
            let wire = r.to_line();
            let body = wire
                .strip_suffix('\n')
                .expect("a request line ends with \\n");
            assert!(!body.contains('\n'), "an encoded request spans lines");
            assert_eq!(
                decode_line(body.as_bytes()),
                Incoming::Request(r),
                "re-encoded request"
            );
        }
        Incoming::Malformed(resp) => {
            assert!(!line.iter().all(|b| b.is_ascii_whitespace()));
            assert!(!resp.ok && resp.done && resp.data.is_none());
            assert!(resp.error.as_deref().is_some_and(|e| !e.is_empty()));
            let wire = resp.to_line();
            let body = wire
                .strip_suffix('\n')
                .expect("a response line ends with \\n");
            assert!(!body.contains('\n'), "an error response spans lines");
            assert_eq!(serde_json::from_str::<Response>(body).ok(), Some(resp));
        }
    }
}

fn agrees_with_generic_json(line: &[u8], r: &Envelope) {
    let v: serde_json::Value = serde_json::from_slice(line)
        .unwrap_or_else(|e| panic!("a decoded request is not JSON ({e}): {r:?}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("a decoded request is not a JSON object: {v}"));
    assert!(
        obj.keys()
            .all(|k| ["id", "cmd", "args"].contains(&k.as_str())),
        "unknown key accepted: {v}"
    );
    assert_eq!(obj.get("id").map_or(Some(0), |i| i.as_u64()), Some(r.id));
    let cmd = obj.get("cmd").and_then(|c| c.as_str());
    assert_eq!(cmd, Some(r.request.name()));
    let args = obj.get("args").cloned().unwrap_or(serde_json::Value::Null);
    assert_eq!(
        Request::from_parts(r.request.name(), args).as_ref(),
        Ok(&r.request),
        "the typed request is its line's command and arguments"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_property_holds_on_a_session_with_blank_malformed_and_oversize_lines() {
        let stream =
            b"{\"id\":3,\"cmd\":\"ping\"}\n  \r\nnot json\n{\"cmd\":\"x\",\"args\":[1,2.5]}\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\nnever read\n";
        for capacity in [1, 3, 64] {
            check_admin_stream(stream, 40, capacity);
        }
        check_admin_stream(b"{\"cmd\":\"tail without newline\"}", 100, 8);
    }
}
