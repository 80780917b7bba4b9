//! Branches on other machines, end to end: `mbtd bench cluster` starts real `mbtd node`
//! processes on loopback, trains the same steps in one process and with the branches on
//! the nodes, and reports whether the results are bitwise equal.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mbtd");

fn bench(extra: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args([
            "bench", "cluster", "--preset", "small", "--nodes", "2", "--warmup", "1", "--steps",
            "4", "--batch", "2", "--seq", "16",
        ])
        .args(extra)
        .output()
        .expect("run mbtd bench cluster");
    assert!(
        out.status.success(),
        "bench cluster failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn three_processes_on_loopback_train_bitwise_like_one() {
    let r = bench(&[]);
    assert_eq!(r["bitwise_equal"], true, "{r}");
    assert_eq!(r["branches_masked"], 0, "{r}");
    assert_eq!(r["max_rel_loss_diff"], 0.0, "{r}");
    // the bytes counted on the swarm are the tensors' raw size plus headers
    let ratio = r["wire_over_raw"].as_f64().unwrap();
    assert!((0.99..1.10).contains(&ratio), "wire/raw = {ratio}: {r}");
}

#[test]
fn a_bf16_wire_halves_the_bytes_and_keeps_the_losses_close() {
    let r = bench(&["--wire", "bf16"]);
    assert_eq!(r["branches_masked"], 0, "{r}");
    let d = r["max_rel_loss_diff"].as_f64().unwrap();
    assert!(d < 0.01, "relative loss difference {d}: {r}");
    let ratio = r["wire_over_raw"].as_f64().unwrap();
    assert!((0.99..1.10).contains(&ratio), "wire/raw = {ratio}: {r}");
}

fn fault(kind: &str) -> Value {
    bench(&[
        "--fault",
        kind,
        "--deadline-ms",
        "300",
        "--fault-at",
        "3",
        "--fault-steps",
        "6",
    ])
}

#[test]
fn a_killed_node_is_masked_then_rejoins_with_the_same_identity() {
    let r = fault("kill");
    assert_eq!(r["final_loss_finite"], true, "{r}");
    assert_eq!(r["steps_abandoned"], 0, "{r}");
    assert!(r["steps_with_node0_masked"].as_u64().unwrap() >= 6, "{r}");
    let rejoin = r["rejoin_s"]
        .as_f64()
        .expect("node 0 came back into service");
    assert!(rejoin < 10.0, "rejoined after {rejoin} s: {r}");
    // a dead peer's connection is closed: its rounds fail at once, no deadline to wait
    assert!(r["step_s_p99_during"].as_f64().unwrap() < 0.3, "{r}");
}

#[test]
fn a_paused_node_costs_one_deadline_then_is_skipped_until_it_answers() {
    let r = fault("stop");
    assert_eq!(r["final_loss_finite"], true, "{r}");
    assert!(r["steps_with_node0_masked"].as_u64().unwrap() >= 6, "{r}");
    let (p99, p50_before) = (
        r["step_s_p99_during"].as_f64().unwrap(),
        r["step_s_p50_before"].as_f64().unwrap(),
    );
    assert!(
        p99 <= 1.1 * 0.3 + p50_before,
        "p99 {p99} s with a 0.3 s deadline: {r}"
    );
    let p50 = r["step_s_p50_during"].as_f64().unwrap();
    assert!(
        p50 < 0.3,
        "later steps must not wait for the paused node: {r}"
    );
    assert!(
        r["rejoin_s"].as_f64().expect("node 0 came back") < 10.0,
        "{r}"
    );
}
