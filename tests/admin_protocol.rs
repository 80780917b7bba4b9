//! The typed admin protocol over the real socket: loosely typed or out-of-range arguments,
//! unknown fields and unsafe checkpoint tags are refused with the field's name and allowed
//! range, and nothing happens (no tokens, no expansion, no checkpoint); a client that goes
//! away mid-stream stops the daemon's generation.

mod common;
#[path = "common/model.rs"]
mod model;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
#[cfg(feature = "fault-injection")]
use model::daemon_with_slow_generation;
use model::{daemon_with_model, long_generation};
use serde_json::{Value, json};

fn refused(d: &Daemon, cmd: &str, args: Value, want: &str) {
    let r = d.request(cmd, args.clone());
    assert_eq!(r["ok"], false, "{cmd} {args} was accepted: {r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains(want), "{cmd} {args}: error {e:?} lacks {want:?}");
}

fn tags(d: &Daemon) -> Vec<String> {
    d.data("checkpoints", Value::Null)["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["tag"].as_str().map(String::from))
        .collect()
}

#[test]
fn loose_arguments_and_unsafe_tags_are_refused_and_change_nothing() {
    let d = daemon_with_model();
    // Before: "5" gave 37 tokens, -5 gave 63, top_k -1 and seed -1 were ignored.
    let range = "`max_tokens` must be an integer in 1 ..= 65536";
    refused(
        &d,
        "generate",
        json!({"prompt": "row", "max_tokens": "5"}),
        &format!("{range}; got \"5\""),
    );
    refused(
        &d,
        "generate",
        json!({"prompt": "row", "max_tokens": -5}),
        &format!("{range}; got -5"),
    );
    refused(
        &d,
        "generate",
        json!({"prompt": "row", "top_k": -1}),
        "`top_k` must be an integer in 0 ..= 1000000; got -1",
    );
    refused(
        &d,
        "generate",
        json!({"prompt": "row", "seed": -1}),
        "`seed` must be an integer in 0 ..= 18446744073709551615; got -1",
    );
    refused(
        &d,
        "generate",
        json!({"prompt": "row", "stream": false}),
        "unknown field `stream`",
    );
    // A well-formed request is served as before.
    let ok = d.data(
        "generate",
        json!({"prompt": "row", "max_tokens": 5, "temperature": 0}),
    );
    assert!(ok["tokens"].as_u64().unwrap() <= 5, "{ok}");

    // Before: ramp_steps -1 started a real expansion (ramp 500) after a pre-expand checkpoint.
    let widths = d.data("diagnostics", Value::Null)["widths"].clone();
    refused(
        &d,
        "expand",
        json!({"layer": 0, "branches": 1, "ramp_steps": -1}),
        "`ramp_steps` must be an integer in 0 ..= 10000000; got -1",
    );
    refused(
        &d,
        "expand",
        json!({"layer": 0, "branches": 1, "noise": -1}),
        "`noise` must be a number in [0, 1000]; got -1",
    );
    assert_eq!(d.data("diagnostics", Value::Null)["widths"], widths);
    assert!(
        !tags(&d).iter().any(|t| t == "pre-expand"),
        "a refused expand wrote a checkpoint"
    );

    // Before: these tags were written into manifests and broke the `ctl checkpoints` table.
    let huge = "x".repeat(100_000);
    for bad in ["../../evil", "two\nlines", huge.as_str(), "shutdown"] {
        refused(&d, "checkpoint", json!({ "tag": bad }), "`tag`");
    }
    let out = d.ctl(&["checkpoint", "--tag", "../../evil"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`tag`") && err.contains("A-Z a-z 0-9"),
        "{err}"
    );
    assert!(
        tags(&d).is_empty(),
        "refused tags were written: {:?}",
        tags(&d)
    );
    let out = d.ctl(&["checkpoint", "--tag", "nightly-1.0"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(tags(&d), ["nightly-1.0"]);

    // A refused request answers with its own id; the connection stays usable.
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"{\"id\":77,\"cmd\":\"status\",\"args\":{\"verbose\":true}}\n{\"id\":78,\"cmd\":\"ping\"}\n")
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["id"].as_u64(), v["ok"].as_bool()),
        (Some(77), Some(false)),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `verbose`"),
        "{v}"
    );
    line.clear();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["id"].as_u64(), v["ok"].as_bool()),
        (Some(78), Some(true)),
        "{v}"
    );
}

/// The `tokens` of the daemon's `admin_generate_cancelled` log lines.
fn cancelled_tokens(d: &Daemon) -> Vec<Option<u64>> {
    d.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "admin_generate_cancelled")
        .map(|v| v["tokens"].as_u64())
        .collect()
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_client_that_goes_away_stops_the_generation() {
    let d = daemon_with_slow_generation(10);
    let (prompt, seed, full) = long_generation(&d);
    // A client that only closes its sending side (as `nc -N` does) still gets the whole
    // stream.
    let args = json!({"prompt": prompt, "respond": true, "temperature": 1, "seed": seed,
        "max_tokens": 30});
    let line = json!({"id": 4, "cmd": "generate", "args": args}).to_string() + "\n";
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let last = BufReader::new(s).lines().last().unwrap().unwrap();
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["data"]["tokens"], 30, "{last}");
    let args = json!({"prompt": prompt, "respond": true, "temperature": 1, "seed": seed,
        "max_tokens": 2000});
    let line = json!({"id": 5, "cmd": "generate", "args": args}).to_string() + "\n";
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).unwrap();
    assert!(first.contains("\"done\":false"), "{first}");
    // Shut down, the descriptor still open (as `mbtd chat` does on Ctrl-C): the daemon must
    // see the client gone even while it has no piece to write.
    r.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
    let tokens = d.wait_for(Duration::from_secs(60), "the cancel log line", || {
        cancelled_tokens(&d).first().cloned()
    });
    drop(r);
    let tokens = tokens.expect("the trainer reports the tokens it produced");
    assert!(
        tokens < full,
        "the daemon generated all {tokens} of {full} tokens for a client that had gone"
    );
    assert_eq!(d.metric("admin_streams_cancelled_total"), 1.0);
    // The trainer is free again.
    assert_eq!(d.request("eval", Value::Null)["done"], true);
}
