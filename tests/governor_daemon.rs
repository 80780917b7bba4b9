//! The expansion governor wired into the real daemon: a manual expansion is exact at η = 0
//! and ramped by the governor; a harmful expansion is rolled back by the probation gate,
//! bitwise; a plateau with saturated layers triggers an automatic expansion that is kept.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Tiny model, scheduled evals every 5 steps (they drive the governor), and `governor`
/// lines for the `[governor]` section.
fn config(governor: &str) -> String {
    let base = small(&[
        ("optim.lr", "0.003"),
        ("optim.warmup_steps", "5"),
        ("training.replay_share", "0.5"),
        ("eval.every_steps", "5"),
        ("eval.max_rows_per_group", "16"),
        ("replay.control_fraction", "0.15"),
        ("checkpoints.keep_last", "50"),
    ]);
    format!("{base}\n[governor]\n{governor}")
}

fn write_task(d: &Daemon, name: &str, rows: usize) {
    d.drop_csv(name, &sums_csv(7, rows, 50, |_| "a".to_string()));
}

/// `mbtd ctl --json …`, parsed.
fn ctl_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = d.ctl(&all);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn manual_expand_is_exact_at_eta0_ramped_by_the_governor_and_aborted_by_a_manual_rollback() {
    // Long probation: this test is about the ramp, not the verdict.
    let d = Daemon::start(&config("probation_steps = 100000\n"));
    write_task(&d, "a.csv", 300);
    d.wait_steps(10, Duration::from_secs(40));

    let e = ctl_json(
        &d,
        &[
            "expand",
            "--layer",
            "1",
            "--branches",
            "1",
            "--beta",
            "0.3",
            "--ramp-steps",
            "10",
        ],
    );
    assert_eq!(e["logits_bitwise_equal_at_eta0"], true, "{e}");
    assert_eq!(e["widths"], json!([2, 3]));
    assert_eq!(e["manual"], true);
    let pre_hash = e["pre_expand_probe_logits_blake3"]
        .as_str()
        .unwrap()
        .to_string();
    let g = d.data("governor", Value::Null);
    assert_eq!(g["enabled"], false, "default config has auto-expansion off");
    assert_eq!(g["in_progress"]["layer"], 1, "{g}");
    assert_eq!(g["in_progress"]["manual"], true);
    assert_eq!(
        g["in_progress"]["checkpoint_id"],
        e["pre_expand_checkpoint"]
    );
    assert!((g["in_progress"]["beta"].as_f64().unwrap() - 0.3).abs() < 1e-6);

    // Training goes on at the new width; after the ramp η = β and probation runs.
    d.wait_steps(15, Duration::from_secs(40));
    let diag = d.data("diagnostics", Value::Null);
    assert_eq!(diag["widths"], json!([2, 3]));
    assert!(
        (diag["layers"][1]["eta"].as_f64().unwrap() - 0.3).abs() < 1e-6,
        "{diag}"
    );
    assert!(d.metric("loss").is_finite());
    assert!((d.metric("eta_injection_last") - 0.3).abs() < 1e-6);
    let g = d.data("governor", Value::Null);
    assert_eq!(g["in_progress"]["phase"]["phase"], "probation", "{g}");
    assert_eq!(d.metric("governor_expansion_in_progress"), 1.0);

    // One expansion at a time.
    let busy = d.request("expand", json!({"layer": 0, "branches": 1}));
    assert_eq!(busy["ok"], false, "{busy}");
    assert!(busy.to_string().contains("still in progress"), "{busy}");

    // The operator's rollback restores the pre-expansion model and aborts the expansion.
    let r = d.data(
        "rollback",
        json!({"target": e["pre_expand_checkpoint"].as_str().unwrap()}),
    );
    assert_eq!(r["widths"], json!([2, 2]));
    assert_eq!(r["probe_logits_blake3"].as_str().unwrap(), pre_hash);
    assert_eq!(r["governor_aborted_expansion"]["layer"], 1, "{r}");
    let g = d.data("governor", Value::Null);
    assert!(g["in_progress"].is_null(), "{g}");
    assert_eq!(d.metric("governor_expansion_in_progress"), 0.0);
    d.wait_steps(5, Duration::from_secs(40));
}

#[test]
fn harmful_expansion_is_rolled_back_bitwise_by_the_probation_gate() {
    let d = Daemon::start(&config(
        "probation_steps = 10\nmin_gain = 0.0\nmax_regression = 0.05\ncooldown_steps = 1000\n",
    ));
    write_task(&d, "a.csv", 300);
    // Past the steep part of the learning curve, so that the expansion's harm is not
    // hidden by the progress the model is still making.
    d.wait_steps(150, Duration::from_secs(40));

    // Freeze the state, take its fingerprint, expand with huge noise at η → 0.95.
    d.data("pause", Value::Null);
    let before = d.data("checkpoint", json!({"tag": "before"}));
    let h_before = before["probe_logits_blake3"].as_str().unwrap().to_string();
    let e = d.data(
        "expand",
        json!({"layer": 1, "branches": 1, "beta": 0.95, "ramp_steps": 3, "noise": 10.0}),
    );
    assert_eq!(e["logits_bitwise_equal_at_eta0"], true, "{e}");
    assert_eq!(e["widths"], json!([2, 3]));
    assert_eq!(
        e["pre_expand_probe_logits_blake3"].as_str().unwrap(),
        h_before
    );
    let start = e["step"].as_u64().unwrap();
    d.data("resume", Value::Null);

    // Ramp (3 steps) + probation (10 steps) + the next scheduled eval: the gate rolls back.
    let g = d.wait_for(Duration::from_secs(40), "automatic rollback", || {
        let g = d.data("governor", Value::Null);
        (g["rollbacks_total"].as_u64() >= Some(1)).then_some(g)
    });
    let rb = &g["last_rollback"]["decision"];
    assert_eq!(rb["decision"], "rollback", "{g}");
    assert_eq!(rb["checkpoint_id"], e["pre_expand_checkpoint"]);
    assert_eq!(rb["layer"], 1);
    let j = &rb["judgement"];
    eprintln!("probation judgement: {j}");
    assert!(
        j["gain"].as_f64().unwrap() < 0.0,
        "the harmful expansion should have raised the loss: {j}"
    );
    let out = &rb["outcome"];
    assert_eq!(
        out["probe_logits_blake3"].as_str().unwrap(),
        h_before,
        "automatic rollback not bitwise: {rb}"
    );
    assert_eq!(out["widths"], json!([2, 2]));
    assert_eq!(out["step"].as_u64().unwrap(), start);
    // The governor kept its live memory: back-off doubled, cool-down from the restored step.
    assert!(g["in_progress"].is_null(), "{g}");
    assert_eq!(g["layers"][1]["rolled_back"], 1);
    assert_eq!(g["layers"][1]["backoff"], 2.0);
    assert_eq!(g["layers"][1]["cooldown_until"], start + 2000);
    assert_eq!(g["expansions_total"], 1);

    assert_eq!(d.data("diagnostics", Value::Null)["widths"], json!([2, 2]));
    assert_eq!(d.metric("rollbacks_total"), 1.0);
    assert_eq!(
        d.metric("governor_decisions_total{decision=\"rollback\"}"),
        1.0
    );
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("\"governor_decision\"") && l.contains("\"decision\":\"rollback\"")),
        "no governor_decision rollback log line"
    );
    // Training goes on from the restored state.
    d.wait_steps(5, Duration::from_secs(40));
    assert!(d.metric("loss").is_finite());
}

#[test]
fn plateau_with_saturated_layers_expands_automatically_and_probation_keeps_it() {
    // Permissive: every eval window is a plateau, every layer is saturated, any outcome is kept.
    let d = Daemon::start(&config(
        "enabled = true\npatience = 2\nplateau_tolerance = 1.0\nsaturation_threshold = 0.0\n\
         ramp_steps = 3\nprobation_steps = 5\nmin_gain = -10.0\nmax_regression = 10.0\n\
         cooldown_steps = 100000\nmax_branches_per_layer = 3\n",
    ));
    write_task(&d, "a.csv", 300);
    let g = d.wait_for(Duration::from_secs(40), "an automatic expansion", || {
        let g = d.data("governor", Value::Null);
        (g["expansions_total"].as_u64() >= Some(1)).then_some(g)
    });
    let act = g["last_actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action"] == "expand")
        .unwrap_or_else(|| panic!("no expand action: {g}"))
        .clone();
    let dec = &act["decision"];
    assert_eq!(dec["basis"]["plateau"]["plateau"], true, "{dec}");
    assert_eq!(dec["outcome"]["manual"], false);
    assert_eq!(
        dec["outcome"]["logits_bitwise_equal_at_eta0"], true,
        "{dec}"
    );
    let layer = dec["layer"].as_u64().unwrap() as usize;

    let g = d.wait_for(Duration::from_secs(40), "the probation verdict", || {
        let g = d.data("governor", Value::Null);
        (g["layers"][layer]["kept"].as_u64() >= Some(1)).then_some(g)
    });
    assert!(
        g["last_decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["decision"] == "keep" && x["layer"] == layer),
        "{g}"
    );
    assert_eq!(g["layers"][layer]["cooling_down"], true);
    assert_eq!(
        d.data("diagnostics", Value::Null)["widths"][layer],
        3,
        "kept expansion lost"
    );
    assert_eq!(d.metric("rollbacks_total"), 0.0);
}
