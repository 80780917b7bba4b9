//! A daemon whose model exists and is paused, for tests that generate text.

use std::time::Duration;

use super::common::{Daemon, small};

/// A model big enough that generating a few hundred tokens takes a noticeable while (so a
/// cancelled stream is seen to stop early); training is cheap (short windows).
pub fn model_config() -> String {
    small(&[
        ("model.vocab_size", "400"),
        ("model.d_model", "384"),
        ("model.n_heads", "6"),
        ("model.n_layers", "6"),
        ("model.max_seq_len", "2048"),
        ("tokenizer.bootstrap_rows", "50"),
        ("training.batch_size", "2"),
        ("training.seq_len", "16"),
    ])
}

/// Starts a daemon with [`model_config`], feeds it rows until the model exists and has trained a
/// step, then pauses training so that generation is deterministic.
pub fn daemon_with_model() -> Daemon {
    daemon_with_model_env(&[])
}

/// [`daemon_with_model`] whose generation sleeps `ms` after each token (fault injection),
/// so a test can act while a reply is still streaming.
#[cfg(feature = "fault-injection")]
pub fn daemon_with_slow_generation(ms: u64) -> Daemon {
    daemon_with_model_env(&[("MBTD_FAULT_TOKEN_DELAY_MS", &ms.to_string())])
}

fn daemon_with_model_env(env: &[(&str, &str)]) -> Daemon {
    let d = Daemon::start_with_env(&model_config(), env);
    let mut s = String::from("text\n");
    for i in 0..200 {
        s.push_str(&format!("\"row {i} says the cat sat on mat number {i}\"\n"));
    }
    d.drop_csv("rows.csv", &s);
    d.wait_for(Duration::from_secs(180), "the first training step", || {
        (d.step() >= 1).then_some(())
    });
    d.data("pause", serde_json::Value::Null);
    d
}

/// A prompt and sampling seed (temperature 1, training paused, so deterministic) whose
/// instruction reply runs at least 200 tokens, with its token count: an untrained model may
/// draw the end token early for some prompts and seeds.
pub fn long_generation(d: &Daemon) -> (String, u64, u64) {
    for seed in 0..40u64 {
        let prompt = format!("row {seed} says");
        let args = serde_json::json!({"prompt": prompt, "respond": true, "temperature": 1,
            "seed": seed, "max_tokens": 2000});
        let tokens = d.data("generate", args)["tokens"].as_u64().unwrap();
        if tokens >= 200 {
            return (prompt, seed, tokens);
        }
    }
    panic!("no prompt and seed gave a reply of 200 tokens or more");
}
