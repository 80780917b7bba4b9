//! The admin socket under load: many concurrent clients, each sending many requests on one
//! connection, all answered; the daemon keeps serving.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;

#[test]
fn fifty_clients_times_a_hundred_requests_are_all_answered() {
    let d = Daemon::start("");
    let sock = d.socket();
    let handles: Vec<_> = (0..50)
        .map(|c| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut ok = 0;
                for i in 0..100u64 {
                    let cmd = if i % 10 == 0 { "status" } else { "ping" };
                    let id = c * 1000 + i;
                    writeln!(w, "{{\"id\":{id},\"cmd\":\"{cmd}\"}}").unwrap();
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    assert_eq!(v["id"], id);
                    if v["ok"] == true {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, 5000);
    assert_nothing_restarted(&d);
    // A request is counted once its response stream has closed, which can be just after
    // the client read the response: wait for the last ones.
    d.wait_for(Duration::from_secs(10), "5,000 requests counted ok", || {
        let m = d.data("metrics", serde_json::Value::Null);
        (m["admin_requests_total{outcome=\"ok\"}"].as_u64().unwrap() >= 5000).then_some(())
    });
}

#[test]
fn sigterm_during_a_checkpoint_write_exits_zero_with_a_valid_latest() {
    let mut d = Daemon::start(&small(&[
        ("model.vocab_size", "300"),
        ("model.d_model", "64"),
        ("model.max_seq_len", "16"),
        ("tokenizer.bootstrap_rows", "50"),
        ("training.batch_size", "4"),
        ("training.seq_len", "16"),
        ("checkpoints.every_steps", "1"),
        ("checkpoints.keep_last", "3"),
        ("checkpoints.keep_daily", "0"),
    ]));
    let mut s = String::from("text\n");
    for i in 0..200 {
        s.push_str(&format!("\"row {i} is a row of text number {i}\"\n"));
    }
    std::fs::write(d.path().join("x.tmp"), s).unwrap();
    std::fs::rename(d.path().join("x.tmp"), d.path().join("inbox/x.csv")).unwrap();
    d.wait_for(Duration::from_secs(60), "checkpoints", || {
        let m = d.data("metrics", serde_json::Value::Null);
        (m["checkpoints_total"].as_u64().unwrap_or(0) >= 5).then_some(())
    });
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let root = d.path().join("checkpoints");
    let id = std::fs::read_to_string(root.join("LATEST")).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["inspect", "checkpoint"])
        .arg(root.join(id.trim()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The final state is LATEST: a `shutdown` checkpoint, or (when the last periodic
    // checkpoint already holds it, so no identical copy is written) the newest one on disk.
    let step_of = |dir: &std::path::Path| -> Option<u64> {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).ok()?).ok()?;
        m["step"].as_u64()
    };
    let latest_step = step_of(&root.join(id.trim())).expect("LATEST has a manifest");
    let newest = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| step_of(&e.ok()?.path()))
        .max()
        .unwrap();
    assert_eq!(latest_step, newest, "final checkpoint is LATEST");
    let tmp = tmp_entries(&root).len();
    assert_eq!(tmp, 0, "a write in flight at SIGTERM was left half-done");
}

#[test]
fn garbage_huge_lines_and_half_closed_connections_do_not_hurt_the_daemon() {
    use std::net::Shutdown;
    let d = Daemon::start("[admin]\nmax_request_bytes = 4096\n");
    let sock = d.socket();
    let mut x: u64 = 0x1234_5678;
    for round in 0..30 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let bytes: Vec<u8> = (0..(round * 97 + 1))
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        let _ = s.write_all(&bytes);
        match round % 3 {
            // Half-close: the daemon sees EOF after the garbage.
            0 => {
                let _ = s.shutdown(Shutdown::Write);
            }
            // A huge line without a newline.
            1 => {
                let _ = s.write_all(&vec![b'a'; 100_000]);
            }
            // Drop mid-line.
            _ => {}
        }
        drop(s);
    }
    // Still serving, nothing restarted.
    for _ in 0..5 {
        assert_eq!(d.request("ping", serde_json::Value::Null)["ok"], true);
    }
    assert_nothing_restarted(&d);
}

/// Every actor runs and none was restarted.
fn assert_nothing_restarted(d: &Daemon) {
    let st = d.data("status", serde_json::Value::Null);
    assert!(
        st["actors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["restarts"] == 0 && a["state"] == "running"),
        "{st}"
    );
}
