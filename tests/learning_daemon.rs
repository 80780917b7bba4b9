//! The continual-learning loop in the real daemon: two tasks in sequence, masks, generation,
//! metrics, expansion, checkpoints, rollback and resume — on a tiny model.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn config() -> String {
    small(&[
        ("optim.lr", "0.003"),
        ("optim.warmup_steps", "5"),
        ("training.replay_share", "0.5"),
        ("eval.max_rows_per_group", "48"),
        ("replay.control_fraction", "0.15"),
        ("checkpoints.keep_last", "50"),
    ])
}

/// Task A: "<a> plus <b> is <a+b>"; task B: "reverse <w> is <reversed w>".
fn write_task(d: &Daemon, name: &str, task: char, rows: usize) {
    let mut s = String::from("text,source\n");
    let mut x: u64 = if task == 'a' { 7 } else { 11 };
    for _ in 0..rows {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let (a, b) = ((x >> 33) % 50, (x >> 45) % 50);
        match task {
            'a' => s.push_str(&format!("\"{a} plus {b} is {}\",a\n", a + b)),
            _ => {
                let w: String = format!("{a}x{b}").chars().collect();
                let r: String = w.chars().rev().collect();
                s.push_str(&format!("\"reverse {w} is {r}\",b\n"))
            }
        }
    }
    let tmp = d.path().join(format!("{name}.tmp"));
    std::fs::write(&tmp, s).unwrap();
    std::fs::rename(&tmp, d.path().join("inbox").join(name)).unwrap();
}

/// Control loss of a source (either era).
fn source_loss(eval: &Value, src: &str) -> f64 {
    let per = eval["per_source"].as_object().unwrap();
    let vals: Vec<f64> = per
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{src}/")))
        .map(|(_, v)| v.as_f64().unwrap())
        .collect();
    assert!(!vals.is_empty(), "no control rows of {src}: {eval}");
    vals.iter().sum::<f64>() / vals.len() as f64
}

#[test]
fn learns_two_tasks_in_sequence_and_keeps_the_first_with_replay() {
    let d = Daemon::start(&config());
    write_task(&d, "a.csv", 'a', 600);
    d.wait_steps(1, Duration::from_secs(120));
    let a0 = source_loss(&d.data("eval", Value::Null), "a");
    d.wait_steps(250, Duration::from_secs(120));
    let a1 = source_loss(&d.data("eval", Value::Null), "a");
    eprintln!("task A control loss: start {a0:.3}, after 250 steps {a1:.3}");
    assert!(a1 < 0.7 * a0, "task A did not learn: {a0} -> {a1}");

    write_task(&d, "b.csv", 'b', 600);
    d.wait_for(Duration::from_secs(30), "task B ingested", || {
        let e = d.data("eval", Value::Null);
        e["per_source"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("b/"))
            .then_some(())
    });
    let b0 = source_loss(&d.data("eval", Value::Null), "b");
    d.wait_steps(250, Duration::from_secs(120));
    let e = d.data("eval", Value::Null);
    let (a2, b1) = (source_loss(&e, "a"), source_loss(&e, "b"));
    eprintln!("task B control loss: start {b0:.3}, after 250 steps {b1:.3}; task A now {a2:.3}");
    assert!(b1 < 0.8 * b0, "task B did not learn: {b0} -> {b1}");
    // With replay, task A stays within 0.5 nats of its best.
    assert!(a2 < a1 + 0.5, "task A forgotten: best {a1}, now {a2}");
}

#[test]
fn mask_freezes_a_branch_generate_streams_and_metrics_are_complete() {
    let d = Daemon::start(&config());
    write_task(&d, "a.csv", 'a', 400);
    d.wait_steps(5, Duration::from_secs(120));

    // Status answers quickly while steps run.
    for _ in 0..10 {
        let t = Instant::now();
        d.data("status", Value::Null);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "status took {:?}",
            t.elapsed()
        );
    }

    d.data("mask", json!({"layer": 0, "branch": 1}));
    let c1 = d.data("checkpoint", json!({"tag": "masked-1"}));
    d.wait_steps(30, Duration::from_secs(120));
    let c2 = d.data("checkpoint", json!({"tag": "masked-2"}));
    assert_eq!(d.metric("active_branches_min"), 1.0);
    let frozen = |c: &Value| branch_bytes(&d, c["id"].as_str().unwrap(), 0, 1);
    assert_eq!(frozen(&c1), frozen(&c2), "masked branch changed");
    assert_ne!(
        branch_bytes(&d, c1["id"].as_str().unwrap(), 0, 0),
        branch_bytes(&d, c2["id"].as_str().unwrap(), 0, 0),
        "active branch did not train"
    );
    d.data("unmask", json!({"layer": 0, "branch": 1}));
    d.wait_steps(30, Duration::from_secs(120));
    let c3 = d.data("checkpoint", json!({"tag": "unmasked"}));
    assert_ne!(
        frozen(&c2),
        frozen(&c3),
        "unmasked branch did not resume training"
    );

    // generate streams chunks, then a final summary.
    let line = json!({"id": 9, "cmd": "generate", "args": {"prompt": "3 plus 4 is", "max_tokens": 8, "temperature": 0}});
    let (chunks, last) = stream(&d, &line.to_string());
    assert_eq!(last["ok"], true, "{last}");
    assert!(chunks >= 1, "no streamed chunk");
    assert!(last["data"]["tokens"].as_u64().unwrap() >= 1);

    // Every metric named in ARCHITECTURE.md, finite. The first evaluation puts every
    // control row in the "new" era; the second sees them as "old".
    d.data("eval", Value::Null);
    d.data("eval", Value::Null);
    let m = d.data("metrics", Value::Null);
    let names = m.as_object().unwrap();
    for want in ARCHITECTURE_METRICS {
        let hits: Vec<_> = names
            .iter()
            .filter(|(k, _)| *k == want || k.starts_with(&format!("{want}{{")))
            .collect();
        assert!(!hits.is_empty(), "metric {want} missing");
        for (k, v) in hits {
            assert!(v.as_f64().is_some_and(f64::is_finite), "{k} = {v}");
        }
    }
    // Step-time quantiles: one sample per step, ordered, positive.
    let q = |s: &str| m[format!("train_step_seconds{s}")].as_f64().unwrap();
    assert!(q("_count") >= 1.0 && q("_count") <= m["train_steps_total"].as_f64().unwrap());
    assert!(0.0 < q("_p50") && q("_p50") <= q("_p90") && q("_p90") <= q("_p99"));
    assert!(q("_p99") <= q("_max") * 1.011, "{m}");
}

#[test]
fn expand_is_exact_at_eta0_rollback_restores_bitwise_and_sigterm_checkpoints() {
    let mut d = Daemon::start(&config());
    write_task(&d, "a.csv", 'a', 300);
    d.wait_steps(10, Duration::from_secs(120));
    let tagged = d.data("checkpoint", json!({"tag": "before"}));
    let h_before = tagged["probe_logits_blake3"].as_str().unwrap().to_string();

    let e = d.data(
        "expand",
        json!({"layer": 1, "branches": 1, "beta": 0.2, "ramp_steps": 10}),
    );
    assert_eq!(e["logits_bitwise_equal_at_eta0"], true, "{e}");
    assert_eq!(e["widths"], json!([2, 3]));
    d.wait_steps(20, Duration::from_secs(120));
    let diag = d.data("diagnostics", Value::Null);
    assert_eq!(diag["widths"], json!([2, 3]));
    assert!(d.metric("loss").is_finite());
    assert_eq!(d.metric("expansion_events_total"), 1.0);

    let r = d.data("rollback", json!({"target": "before"}));
    assert_eq!(
        r["probe_logits_blake3"].as_str().unwrap(),
        h_before,
        "rollback not bitwise"
    );
    assert_eq!(r["widths"], json!([2, 2]));
    assert_eq!(d.metric("rollbacks_total"), 1.0);

    d.wait_steps(5, Duration::from_secs(120));
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let root = d.path().join("checkpoints");
    let latest = std::fs::read_to_string(root.join("LATEST")).unwrap();
    let m: Value = serde_json::from_slice(
        &std::fs::read(root.join(latest.trim()).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["tag"], "shutdown");
    let final_step = m["step"].as_u64().unwrap();

    // Restart resumes exactly there.
    let d = d.restart_with(&config());
    let s = d.wait_resumed(Duration::from_secs(30));
    assert!(s["step"].as_u64().unwrap() >= final_step);
    assert!(
        d.log_text().contains(&format!("\"step\":{final_step}")),
        "resume step"
    );
}

/// The bytes of every tensor of one branch in a checkpoint's model.safetensors.
fn branch_bytes(d: &Daemon, id: &str, layer: usize, branch: usize) -> Vec<u8> {
    let bytes = std::fs::read(
        d.path()
            .join("checkpoints")
            .join(id)
            .join("model.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let prefix = format!("layers.{layer}.branches.{branch}.");
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .map(|n| n.to_string())
        .collect();
    names.sort();
    assert!(!names.is_empty());
    names
        .iter()
        .flat_map(|n| st.tensor(n).unwrap().data().to_vec())
        .collect()
}

fn stream(d: &Daemon, line: &str) -> (usize, Value) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    for (chunks, l) in BufReader::new(s).lines().enumerate() {
        let v: Value = serde_json::from_str(&l.unwrap()).unwrap();
        if v["done"] == true {
            return (chunks, v);
        }
    }
    panic!("stream ended without done");
}

const ARCHITECTURE_METRICS: &[&str] = &[
    "path_starvation_index",
    "effective_num_paths",
    "gini_concentration",
    "top1_share",
    "margin_top1_top2",
    "diversity_cosine_distance_mean",
    "branch_correlation_mean",
    "output_energy_cv",
    "alpha",
    "branch_select_gini",
    "branch_select_top1_share",
    "ingest_rows_total",
    "ingest_rows_per_sec_window",
    "ingest_events_per_sec_window",
    "ingest_parse_errors_total",
    "ingest_rows_rejected_total",
    "ingest_files_total",
    "ingest_pending_events_observed_peak",
    "ingest_held_back",
    "train_steps_total",
    "train_tokens_per_sec",
    "loss",
    "grad_norm",
    "active_branches_mean",
    "active_branches_std",
    "active_branches_min",
    "active_branches_max",
    "mask_sparsity_mean",
    "mask_sparsity_std",
    "steps_at_min_active_share",
    "grad_norm_ratio_scaled_over_unscaled_mean",
    "grad_norm_ratio_scaled_over_unscaled_std",
    "coverage_ratio_used_over_available",
    "new_data_ratio_in_available",
    "replay_share",
    "replay_delta_loss_mean",
    "replay_delta_loss_std",
    "loss_control_old",
    "retention_delta_old",
    "expansion_events_total",
    "eta_injection_last",
    "sum_w_new_last",
    "expand_drift_logits_l2_mean",
    "expand_drift_logits_l2_std",
    "expand_drift_logits_cos_dist_mean",
    "expand_drift_logits_cos_dist_std",
    "rollbacks_total",
    "checkpoints_total",
    "checkpoint_write_seconds",
    "checkpoint_bytes",
];
