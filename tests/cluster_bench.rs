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
