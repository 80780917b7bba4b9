//! Checkpoints with the real daemon: bitwise-exact resume, corruption fallback, kill -9
//! during checkpoint writes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn config(max_steps: u64, every_steps: u64) -> String {
    config_with(max_steps, every_steps, &[])
}

fn config_with(max_steps: u64, every_steps: u64, extra: &[(&str, &str)]) -> String {
    let steps = max_steps.to_string();
    let every = every_steps.to_string();
    let mut o = vec![
        ("model.branches", "3"),
        ("training.max_steps", &steps),
        ("checkpoints.every_steps", &every),
        ("checkpoints.keep_last", "3"),
    ];
    o.extend_from_slice(extra);
    short_windows(&o)
}

fn write_data(d: &Daemon) {
    let mut s = String::from("prompt,response,source\n");
    for i in 0..300u32 {
        s.push_str(&format!("\"what is {i} times 3\",\"{}\",m\n", i * 3));
    }
    d.drop_csv("d.csv", &s);
}

/// A daemon that trained `max_steps` steps (checkpoints every `every` steps) and stopped.
fn trained(max_steps: u64, every: u64) -> Daemon {
    trained_with(max_steps, every, &[])
}

/// [`trained`] with extra config settings.
fn trained_with(max_steps: u64, every: u64, extra: &[(&str, &str)]) -> Daemon {
    let mut d = Daemon::start(&config_with(max_steps, every, extra));
    write_data(&d);
    d.wait_step(max_steps, Duration::from_secs(120));
    d.stop_ok();
    d
}

#[test]
fn resume_is_bitwise_exact() {
    resume_is_bitwise_exact_with(&[]);
}

/// Rotary positions and dropout: the masks of a resumed run are those of the straight run.
#[test]
fn resume_is_bitwise_exact_with_rope_and_dropout() {
    resume_is_bitwise_exact_with(&[("model.positions", "\"rope\""), ("model.dropout", "0.1")]);
}

fn resume_is_bitwise_exact_with(extra: &[(&str, &str)]) {
    // Straight: 40 steps.
    let (ma, wa, oa) = trained_with(40, 1_000_000, extra).latest_files();
    assert_eq!(ma["step"], 40);
    let want = if extra.is_empty() { "learned" } else { "rope" };
    assert_eq!(ma["config"]["model"]["positions"], want, "{ma}");

    // 20 steps, stop, start, 20 more.
    let mut b = trained_with(20, 1_000_000, extra).restart_with(&config_with(40, 1_000_000, extra));
    b.wait_step(40, Duration::from_secs(120));
    b.stop_ok();
    let (mb, wb, ob) = b.latest_files();
    assert_eq!(mb["step"], 40);
    assert!(wa == wb, "model weights differ after resume");
    assert!(oa == ob, "optimizer state differs after resume");
}

#[test]
fn corrupt_latest_falls_back_to_the_previous_checkpoint_and_is_reported() {
    let d = trained(30, 10);
    let (m, _, _) = d.latest_files();
    let root = d.path().join("checkpoints");
    let bad = root
        .join(m["id"].as_str().unwrap())
        .join("model.safetensors");
    let mut bytes = std::fs::read(&bad).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&bad, bytes).unwrap();

    let d = d.restart_with(&config(30, 10));
    let t = d.wait_resumed(Duration::from_secs(30));
    // The shutdown at step 30 wrote nothing (identical to the periodic checkpoint at 30,
    // which was LATEST), so the one before the corrupted LATEST is step 20's.
    assert!(
        t["last_event"].as_str().unwrap().contains("-000000000020-"),
        "previous checkpoint (step 20 by every_steps) expected: {t}"
    );
    let ck = &d.section("checkpoints");
    let rejected = ck["rejected_at_start"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{ck}");
    assert!(
        rejected[0].as_str().unwrap().contains("model.safetensors"),
        "{ck}"
    );
    let metrics = d.data("metrics", Value::Null);
    assert_eq!(metrics["checkpoints_rejected_total"], 1);
    assert!(d.log_text().contains("checkpoint_rejected"));
}

#[test]
fn kill_9_during_checkpoint_writes_leaves_a_valid_checkpoint_and_no_tmp() {
    let mut d = Daemon::start(&config(0, 1));
    write_data(&d);
    for delay_ms in [150u64, 230, 310] {
        d.wait_for(Duration::from_secs(60), "checkpoints", || {
            (d.section("trainer")["step"].as_u64().unwrap_or(0) > 3).then_some(())
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        d.kill9();
        // Restart with max_steps = 1: it resumes but writes no new checkpoint, so any
        // `.tmp-` dir would be a leftover of the killed write.
        d = d.restart_with(&config(1, 1_000_000));
        let root = d.path().join("checkpoints");
        let t = d.wait_resumed(Duration::from_secs(30));
        assert!(t["step"].as_u64().unwrap() > 0);
        let tmp = tmp_entries(&root);
        assert!(tmp.is_empty(), "leftover tmp dirs: {tmp:?}");
        latest_checkpoint_valid(&root).unwrap();
        d.kill9();
        d = d.restart_with(&config(0, 1));
    }
}
