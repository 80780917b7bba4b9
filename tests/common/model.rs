//! A daemon whose model exists and is paused, for tests that generate text.

use std::time::Duration;

use super::common::Daemon;

/// A model big enough that generating a few hundred tokens takes a noticeable while (so a
/// cancelled stream is seen to stop early); training is cheap (short windows).
pub const MODEL: &str = r#"
[ingest]
settle_ms = 50
[model]
vocab_size = 400
d_model = 256
n_heads = 4
n_layers = 4
branches = 2
max_seq_len = 1024
[tokenizer]
bootstrap_rows = 50
[training]
batch_size = 2
seq_len = 16
idle_steps_per_min = 60000
[checkpoints]
every_steps = 0
every_seconds = 0
"#;

/// Starts a daemon with [`MODEL`], feeds it rows until the model exists and has trained a
/// step, then pauses training so that generation is deterministic.
pub fn daemon_with_model() -> Daemon {
    let d = Daemon::start(MODEL);
    let mut s = String::from("text\n");
    for i in 0..200 {
        s.push_str(&format!("\"row {i} says the cat sat on mat number {i}\"\n"));
    }
    std::fs::write(d.path().join("rows.tmp"), s).unwrap();
    std::fs::rename(d.path().join("rows.tmp"), d.path().join("inbox/rows.csv")).unwrap();
    d.wait_for(Duration::from_secs(180), "the first training step", || {
        (d.step() >= 1).then_some(())
    });
    d.data("pause", serde_json::Value::Null);
    d
}
