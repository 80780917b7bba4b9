//! Foundation: the real daemon's lifecycle, admin socket and configuration errors.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn status_then_ctl_shutdown_exits_zero() {
    let mut d = Daemon::start("");
    let out = d.ctl(&["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ACTOR"), "{text}");
    assert!(text.contains("metrics") && text.contains("admin"), "{text}");
    let json = d.data("status", serde_json::Value::Null);
    assert_eq!(json["pid"], d.pid());
    let out = d.ctl(&["shutdown"]);
    assert!(out.status.success(), "{out:?}");
    let st = d.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "log:\n{}", d.log_text());
    assert!(d.log_text().contains("daemon_stopped"));
}

#[test]
fn sigterm_exits_zero_and_removes_socket() {
    let mut d = Daemon::start("");
    assert!(d.socket().exists());
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0));
    assert!(!d.socket().exists(), "socket file left behind");
}

#[test]
fn second_daemon_on_same_dir_is_refused_naming_the_pid() {
    let d = Daemon::start("");
    let out = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains(&format!("pid {}", d.pid())), "{all}");
    // The first daemon still serves.
    assert_eq!(d.request("ping", serde_json::Value::Null)["ok"], true);
}

#[test]
fn socket_is_mode_0600() {
    let d = Daemon::start("");
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn oversize_and_malformed_requests_get_errors_and_daemon_keeps_serving() {
    let d = Daemon::start("[admin]\nmax_request_bytes = 4096\n");
    let big = format!("{{\"cmd\":\"ping\",\"args\":\"{}\"}}\n", "x".repeat(10_000));
    let r = raw_exchange(&d.socket(), big.as_bytes()).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("4096"), "{r}");

    let r = raw_exchange(&d.socket(), b"this is not json\n").unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("malformed"), "{r}");

    let r = d.request("no-such-command", serde_json::Value::Null);
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("unknown command"),
        "{r}"
    );

    assert_eq!(d.request("ping", serde_json::Value::Null)["ok"], true);
}

#[test]
fn ctl_without_daemon_says_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mbtd.sock");
    let out = Command::new(BIN)
        .args(["ctl", "--socket"])
        .arg(&sock)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mbtd is not running (no socket at"), "{err}");
}

fn run_with_config(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, text).unwrap();
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap()
}

#[test]
fn bad_config_key_exits_2_naming_key_and_file() {
    let out = run_with_config("[daemon]\nshutdown_timeout = 3\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shutdown_timeout"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn bad_config_value_exits_2_naming_field_and_range() {
    let out = run_with_config("[daemon]\nrestart_limit = 0\n");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daemon.restart_limit"), "{err}");
    assert!(err.contains("1 ..= 1000"), "{err}");
}

#[test]
fn config_check_and_default_work() {
    let out = Command::new(BIN)
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.toml");
    std::fs::write(&f, &out.stdout).unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));
}
