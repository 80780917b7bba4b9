//! Connection limits of the admin socket over the real socket: 1,100 idle connections do
//! not exhaust the daemon's descriptors (ingestion and `ctl checkpoint` keep working),
//! connections over `admin.max_connections` are refused with a clear message, and idle
//! connections are closed after `admin.idle_timeout_s`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Sets this process's soft descriptor limit to `n` (at most the hard limit).
fn raise_own_nofile(n: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = n.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// Sets the daemon's descriptor limit (soft and hard) to `n`, as systemd's default 1024.
fn limit_daemon_nofile(pid: u32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit on our own child process with a valid struct.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn eleven_hundred_idle_connections_do_not_exhaust_the_daemon() {
    assert!(
        raise_own_nofile(4096) >= 1300,
        "the test needs 1,300 descriptors for its own connections"
    );
    let d = Daemon::start(&small(&[
        ("admin.max_connections", "32"),
        ("admin.idle_timeout_s", "15"),
        ("tokenizer.bootstrap_rows", "20"),
    ]));
    limit_daemon_nofile(d.pid(), 1024);
    let sock = d.socket();
    let mut conns = Vec::new();
    for i in 0..1100 {
        let c = UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("connect #{i}: {e}; log:\n{}", d.log_text()));
        conns.push(c);
    }
    // A new client (beside the 1,100) is refused clearly while the cap is held.
    let out = d.ctl(&["ping"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.max_connections"), "{err}");

    // Those over the cap were answered with one line and closed.
    let mut refused = 0;
    let mut message = String::new();
    for c in &conns[32..] {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert_eq!(v["ok"], false);
        message = v["error"].as_str().unwrap().to_string();
        refused += 1;
    }
    assert_eq!(refused, 1068);
    assert!(
        message.contains("too many admin connections")
            && message.contains("admin.max_connections = 32"),
        "{message}"
    );
    let fds = open_fds(d.pid());
    assert!(fds < 200, "the daemon holds {fds} descriptors");

    // Ingestion works meanwhile (it needs descriptors too).
    let mut s = String::from("text\n");
    for i in 0..40 {
        s.push_str(&format!("\"line {i} of the file\"\n"));
    }
    std::fs::write(d.path().join("a.tmp"), s).unwrap();
    std::fs::rename(d.path().join("a.tmp"), d.path().join("inbox/a.csv")).unwrap();
    let inbox = d.path().join("inbox");
    let sc = d.wait_for(Duration::from_secs(60), "the file's sidecar", || {
        sidecars(&inbox, ".done").remove("a.csv")
    });
    assert_eq!(sc.rows_accepted, 40);

    // The idle ones are closed after idle_timeout_s with a line saying so; then the socket
    // serves again: `ctl checkpoint` works once the model exists.
    let mut idle_closed = 0;
    for c in &conns[..32] {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut text = String::new();
        (&*c).read_to_string(&mut text).unwrap();
        assert!(text.contains("admin.idle_timeout_s = 15"), "{text}");
        idle_closed += 1;
    }
    assert_eq!(idle_closed, 32);
    drop(conns);
    d.wait_for(Duration::from_secs(120), "the first training step", || {
        (d.step() >= 1).then_some(())
    });
    let out = d.ctl(&["checkpoint"]);
    assert!(out.status.success(), "{out:?}\nlog:\n{}", d.log_text());
    let m = d.data("metrics", Value::Null);
    assert_eq!(
        m["admin_connections_refused_total{reason=\"max_connections\"}"].as_u64(),
        Some(1069),
        "{m}"
    );
    assert_eq!(
        m["admin_connections_idle_closed_total"].as_u64(),
        Some(32),
        "{m}"
    );
    // Refusals are logged rate-limited, not once each.
    let lines = d
        .log_text()
        .lines()
        .filter(|l| l.contains("admin_connection_refused"))
        .count();
    assert!((1..=3).contains(&lines), "{lines} refusal log lines");
}
