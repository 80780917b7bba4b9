//! The trainer thread with the real daemon: `ctl mask` keeps `availability.min_active`, a
//! second `expand` says what the operator can do, an acknowledged expansion and a pause
//! survive a restart (`kill -9` for the expansion), an unrestorable checkpoint stops the
//! trainer with its cause (no panic), new rows wake an idle trainer, and status names the
//! products' kernel.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The shared small configuration, 3 branches, context 16, with `extra` overrides.
fn config(extra: &[(&str, &str)]) -> String {
    let base = [
        ("model.vocab_size", "300"),
        ("model.branches", "3"),
        ("model.max_seq_len", "16"),
        ("optim.lr", "0.003"),
        ("optim.warmup_steps", "5"),
        ("training.batch_size", "4"),
        ("training.seq_len", "16"),
        ("eval.every_steps", "10"),
        ("eval.max_rows_per_group", "8"),
        ("replay.control_fraction", "0.1"),
        ("checkpoints.every_steps", "1000000"),
        ("checkpoints.keep_last", "20"),
    ];
    let all: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
    small(&all)
}

fn write_rows(d: &Daemon, name: &str, rows: usize) {
    let mut s = String::from("text,source\n");
    for i in 0..rows {
        s.push_str(&format!("\"{name} row {i} has {} words\",s\n", i % 17));
    }
    d.drop_csv(name, &s);
}

fn started(extra: &[(&str, &str)]) -> Daemon {
    let d = Daemon::start(&config(extra));
    write_rows(&d, "a.csv", 150);
    d.wait_for(Duration::from_secs(120), "first steps", || {
        (d.step() >= 3).then_some(())
    });
    d
}

#[test]
fn mask_refuses_to_leave_fewer_branches_than_min_active() {
    let d = started(&[("availability.min_active", "2")]);
    let r = d.request("mask", json!({"layer": 0, "branch": 0}));
    assert_eq!(r["ok"], true, "{r}");
    let r = d.request("mask", json!({"layer": 0, "branch": 1}));
    assert_eq!(
        r["ok"], false,
        "a layer of 3 with min_active 2 ran on 1 branch: {r}"
    );
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("min_active = 2") && e.contains("layer 0"), "{e}");
    // Unmasking is always allowed, and then masking another branch is fine.
    assert_eq!(
        d.request("unmask", json!({"layer": 0, "branch": 0}))["ok"],
        true
    );
    assert_eq!(
        d.request("mask", json!({"layer": 0, "branch": 1}))["ok"],
        true
    );
}

#[test]
fn a_second_expand_names_a_command_that_exists() {
    let d = started(&[
        ("governor.ramp_steps", "1000"),
        ("governor.probation_steps", "1000"),
    ]);
    d.data("expand", json!({"layer": 0, "branches": 1}));
    let r = d.request("expand", json!({"layer": 1, "branches": 1}));
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(
        !e.contains("abort"),
        "promises an abort command that does not exist: {e}"
    );
    assert!(e.contains("ctl rollback pre-expand"), "{e}");
}

#[test]
fn an_acknowledged_expansion_survives_kill_9() {
    let mut d = started(&[
        ("governor.ramp_steps", "1000"),
        ("governor.probation_steps", "1000"),
    ]);
    let e = d.data("expand", json!({"layer": 1, "branches": 2}));
    assert_eq!(e["widths"], json!([3, 5]), "{e}");
    d.kill9();
    let d = d.restart_with(&config(&[
        ("governor.ramp_steps", "1000"),
        ("governor.probation_steps", "1000"),
    ]));
    let t = d.wait_resumed(Duration::from_secs(60));
    assert_eq!(t["widths"], json!([3, 5]), "expansion lost by kill -9: {t}");
    assert_eq!(t["governor_expansion"]["layer"], 1, "{t}");
    assert_eq!(
        d.section("checkpoints")["latest"],
        e["checkpoint"],
        "resumed from the expansion's checkpoint"
    );
}

#[test]
fn pause_survives_a_restart_until_resume() {
    let mut d = started(&[]);
    assert_eq!(d.data("pause", json!(null))["training_paused"], true);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let d = d.restart_with(&config(&[]));
    let t = d.wait_for(Duration::from_secs(60), "resume", || {
        let t = d.section("trainer");
        t["step"].as_u64().is_some().then_some(t)
    });
    assert_eq!(t["state"], "paused", "pause lost by a restart: {t}");
    let step = t["step"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.step(), step, "trained while paused");
    assert_eq!(d.data("resume", json!(null))["training_paused"], false);
    d.wait_steps(2, Duration::from_secs(60));
}

#[test]
fn an_unrestorable_checkpoint_stops_the_trainer_with_its_cause() {
    let mut d = started(&[
        ("daemon.restart_limit", "2"),
        ("daemon.restart_window_s", "60"),
    ]);
    let c = d.data("checkpoint", json!({"tag": "t"}));
    d.kill9();
    // A checkpoint whose files verify but whose loop state does not fit the trainer.
    let dir = d.path().join("checkpoints").join(c["id"].as_str().unwrap());
    let path = dir.join(mbtd::checkpoint::MANIFEST_FILE);
    let mut m =
        mbtd::checkpoint::manifest::decode_manifest(&std::fs::read(&path).unwrap()).unwrap();
    m.state["availability"] = json!("not an availability state");
    std::fs::write(
        &path,
        mbtd::checkpoint::manifest::encode_manifest(&m).unwrap(),
    )
    .unwrap();
    let cfg = d.path().join("test.toml");
    std::fs::write(
        &cfg,
        format!(
            "{BASE_CONFIG}{}",
            config(&[
                ("daemon.restart_limit", "2"),
                ("daemon.restart_window_s", "60")
            ])
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(d.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("the daemon kept running on an unrestorable checkpoint");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "{log}");
    assert!(
        !log.contains("panicked"),
        "the resume path panicked:\n{log}"
    );
    assert!(
        log.contains("cannot resume from checkpoint") && log.contains("manifest loop state"),
        "the cause does not reach the log:\n{log}"
    );
}

#[test]
fn new_rows_wake_an_idle_trainer() {
    // Idle steps off: without new rows the trainer does not step at all.
    let d = Daemon::start(&config(&[("training.idle_steps_per_min", "0")]));
    write_rows(&d, "a.csv", 120);
    let idle_step = d.wait_for(Duration::from_secs(120), "all new rows trained", || {
        let t = d.section("trainer");
        (t["state"] == "training (idle: replay only)" && t["step"].as_u64()? > 0)
            .then(|| t["step"].as_u64().unwrap())
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        d.step(),
        idle_step,
        "stepped with nothing new and idle steps off"
    );
    write_rows(&d, "b.csv", 40);
    d.wait_for(Duration::from_secs(30), "steps on the new rows", || {
        (d.step() > idle_step).then_some(())
    });
}

#[test]
fn consolidation_backs_off_to_its_floor_and_new_rows_restore_full_speed() {
    // A tiny corpus that overfits quickly: replay at full speed until the control loss
    // stops improving, then back off to the floor (2 steps/min, so the floor is visible as
    // a stalled step counter), and back to full speed when a file arrives.
    let cfg = config(&[
        ("training.idle_steps_per_min", "2"),
        ("training.consolidation_patience", "2"),
        ("eval.every_steps", "4"),
    ]);
    let d = Daemon::start(&cfg);
    // Words drawn at random: nothing to learn beyond their frequencies, so the control loss
    // stops improving soon and then rises as the model memorises the training rows.
    let mut s = String::from("text,source\n");
    let mut x: u64 = 3;
    for _ in 0..200 {
        let words: Vec<String> = (0..8)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                format!("w{}", (x >> 33) % 60)
            })
            .collect();
        s.push_str(&format!("\"{}\",s\n", words.join(" ")));
    }
    std::fs::write(d.path().join("a.tmp"), s).unwrap();
    std::fs::rename(d.path().join("a.tmp"), d.path().join("inbox/a.csv")).unwrap();
    let t = d.wait_for(Duration::from_secs(240), "the floor", || {
        let t = d.section("trainer");
        (t["consolidation"]["pace"]["state"] == "floor").then_some(t)
    });
    let why = t["consolidation"]["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("idle_steps_per_min"), "{t}");
    let step = d.step();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d.step() <= step + 1,
        "not at the floor rate: {} -> {}",
        step,
        d.step()
    );
    write_rows(&d, "b.csv", 40);
    let t = d.wait_for(Duration::from_secs(60), "full speed", || {
        let t = d.section("trainer");
        (t["consolidation"]["pace"]["state"] == "full").then_some(t)
    });
    // Full speed because of the new rows, or already past an evaluation on them (which
    // forgot the old best).
    let why = t["consolidation"]["why"].as_str().unwrap_or_default();
    assert!(why.contains("new rows") || why.contains("improving"), "{t}");
}

/// `ctl status` names what computes the products, and `bf16` on a CPU without AVX-512 BF16
/// (the portable path, slower than `f32`) is warned about when the daemon starts.
#[test]
fn status_names_the_products_kernel_and_a_slow_bf16_is_warned_about() {
    let hardware = mbtd::model::ops::has_avx512_bf16();
    let mut d = started(&[("model.precision", "\"bf16\"")]);
    let want = if hardware {
        "bf16 (AVX-512 BF16)"
    } else {
        "bf16 (portable: this CPU lacks AVX-512 BF16, slower than f32)"
    };
    assert_eq!(d.section("trainer")["precision"], want);
    let log = d.log_text();
    let warned = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| {
            v["event"] == "precision_without_hardware"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("set model.precision = \"f32\""))
        });
    assert_eq!(warned, !hardware, "AVX-512 BF16: {hardware}; log:\n{log}");
    d.stop_ok();

    let mut d = started(&[]);
    assert_eq!(d.section("trainer")["precision"], "f32");
    assert!(!d.log_text().contains("precision_without_hardware"));
    d.stop_ok();
}
