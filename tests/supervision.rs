//! Supervision of the real daemon's actors: a crashed child comes back and is counted; a
//! crash loop makes the daemon exit non-zero. Needs `--features fault-injection`.
#![cfg(feature = "fault-injection")]

mod common;

use std::time::Duration;

use common::*;

fn restarts(d: &Daemon, actor: &str) -> (u64, String) {
    let s = d.data("status", serde_json::Value::Null);
    let a = s["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == actor)
        .unwrap()
        .clone();
    (
        a["restarts"].as_u64().unwrap(),
        a["state"].as_str().unwrap().to_string(),
    )
}

#[test]
fn crashed_child_is_restarted_counted_and_daemon_keeps_serving() {
    let d = Daemon::start("[daemon]\nrestart_backoff_initial_ms = 10\n");
    let out = d.ctl(&["debug-crash", "--actor", "metrics"]);
    assert!(out.status.success(), "{out:?}");
    let (n, state) = d.wait_for(Duration::from_secs(10), "metrics restart", || {
        let (n, s) = restarts(&d, "metrics");
        (n == 1 && s == "running").then_some((n, s))
    });
    assert_eq!((n, state.as_str()), (1, "running"));
    let m = d.data("metrics", serde_json::Value::Null);
    assert_eq!(m["actor_restarts_total{actor=\"metrics\"}"], 1, "{m}");
    let text = String::from_utf8_lossy(&d.ctl(&["status"]).stdout).to_string();
    assert!(
        text.contains("metrics        running           1"),
        "{text}"
    );
    assert!(d.log_text().contains("actor_restarting"));
}

#[test]
fn crash_loop_exits_non_zero() {
    let mut d = Daemon::start(
        "[daemon]\nrestart_backoff_initial_ms = 1\nrestart_limit = 2\nrestart_window_s = 60\n",
    );
    for _ in 0..6 {
        let _ = try_request(
            &d.socket(),
            "debug-crash",
            serde_json::json!({"actor": "metrics"}),
        );
        std::thread::sleep(Duration::from_millis(200));
        if d.child.as_mut().unwrap().try_wait().unwrap().is_some() {
            break;
        }
    }
    let st = d.wait_exit(Duration::from_secs(20));
    assert_ne!(st.code(), Some(0));
    assert!(
        d.log_text().contains("actor_crash_loop"),
        "{}",
        d.log_text()
    );
}
