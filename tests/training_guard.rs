//! Training pinned bitwise: the real daemon trains a tiny model on a fixed corpus (new rows,
//! then replay-only steps), with scheduled evaluations, the governor on and a manual expansion
//! whose ramp and probation it runs, across a restart. The blake3 of the final model and
//! optimizer files and of the loop state must equal the figure recorded from the trainer
//! before it was split into `learn::mix`, `learn::eval` and `govern::drift`; any change to
//! what the trainer computes changes it.
//!
//! It pins the unpacked trainer (`training.packing = false`, one row per window);
//! `tests/packing_daemon.rs` checks packed training's exact resume.
//!
//! The figure depends on the floating-point kernels the CPU selects (AVX-512 or not); it was
//! recorded on the project's build machine (AMD Zen 4). `MBTD_TRAINING_GUARD_PRINT=1` prints
//! the digest instead of comparing it (to re-record after a deliberate change of the maths,
//! with the reason in the commit).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// blake3 of `model.safetensors ‖ optimizer.safetensors ‖ manifest.state` (checkpoint ids
/// removed) after the run.
const EXPECTED: &str = "018d7d515eea5d38a2b4ddbd6b81102512053891480134ed895784c011e20e7c";

fn config(max_steps: u64) -> String {
    format!(
        r#"
[ingest]
settle_ms = 50
rescan_ms = 200
[model]
vocab_size = 300
d_model = 32
n_heads = 2
n_layers = 2
branches = 2
max_seq_len = 16
[optim]
lr = 0.003
warmup_steps = 5
[availability]
p = 0.75
[tokenizer]
bootstrap_rows = 100
[training]
batch_size = 4
seq_len = 16
replay_share = 0.5
packing = false
idle_steps_per_min = 60000
max_steps = {max_steps}
[eval]
every_steps = 7
max_rows_per_group = 8
[replay]
control_fraction = 0.1
[checkpoints]
every_steps = 25
every_seconds = 0
keep_last = 50
[governor]
enabled = true
ramp_steps = 10
probation_steps = 14
"#
    )
}

fn write_data(d: &Daemon) {
    let parity = |i: usize| if i.is_multiple_of(2) { "even" } else { "odd" }.to_string();
    d.drop_csv("d.csv", &sums_csv(11, 160, 40, parity));
}

/// Digest of the checkpoint LATEST names, and its manifest.
fn latest_digest(d: &Daemon) -> (String, Value) {
    let (m, model, optimizer) = d.latest_files();
    let mut h = blake3::Hasher::new();
    h.update(&model);
    h.update(&optimizer);
    let mut state = m["state"].clone();
    drop_checkpoint_ids(&mut state);
    h.update(state.to_string().as_bytes());
    (h.finalize().to_hex().to_string(), m)
}

/// Checkpoint ids carry the wall-clock time: the governor's references to them are not
/// part of what training computed.
fn drop_checkpoint_ids(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.remove("checkpoint_id");
            o.values_mut().for_each(drop_checkpoint_ids);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_checkpoint_ids),
        _ => {}
    }
}

#[test]
fn training_is_bitwise_pinned() {
    let mut d = Daemon::start(&config(20));
    write_data(&d);
    d.wait_step(20, Duration::from_secs(180));
    let e = d.data(
        "expand",
        json!({"layer": 1, "branches": 1, "noise": 0.001, "ramp_steps": 10}),
    );
    assert_eq!(e["logits_bitwise_equal_at_eta0"], true, "{e}");
    d.stop_ok();
    let mut d = d.restart_with(&config(90));
    d.wait_step(90, Duration::from_secs(180));
    d.stop_ok();
    let (digest, m) = latest_digest(&d);
    assert_eq!(m["step"], 90, "{m}");
    if std::env::var_os("MBTD_TRAINING_GUARD_PRINT").is_some() {
        eprintln!(
            "training guard digest: {digest}\nwidths {}\nstate {}",
            m["widths"], m["state"]
        );
        return;
    }
    assert_eq!(
        digest, EXPECTED,
        "training changed: final weights, optimizer or loop state differ from the recorded run \
         (widths {}, state {})",
        m["widths"], m["state"]
    );
}
