//! The demo's operator actions as real `ctl` requests, each turned into a line for the view
//! and the summary.

use serde_json::{Value, json};

use super::daemon::DaemonChild;
use super::timeline::{Action, DEMO_TAG, OUTAGE};
use crate::text::synth::{Synth, Task, solve};

/// What one action did.
#[derive(Debug, Clone, PartialEq)]
pub struct Exercised {
    pub action: Action,
    /// Seconds since the demo started.
    pub at_s: f64,
    pub ok: bool,
    pub detail: String,
}

/// One `generate` of the demo: a prompt of a task, the right answer, the model's.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub task: Task,
    pub prompt: String,
    pub expected: String,
    pub got: String,
}

impl Generated {
    pub fn correct(&self) -> bool {
        self.got == self.expected
    }
}

/// State carried between actions.
pub struct Actions {
    pub last_layer: usize,
    pub prompt_seed: u64,
    /// The probe-logits hash of the demo's checkpoint (compared after the rollback).
    checkpoint_probe: Option<String>,
    pub generated: Vec<Generated>,
}

impl Actions {
    pub fn new(n_layers: usize, prompt_seed: u64) -> Self {
        Self {
            last_layer: n_layers.saturating_sub(1),
            prompt_seed,
            checkpoint_probe: None,
            generated: Vec::new(),
        }
    }

    /// Carries out `a`; a refused request is reported, not fatal.
    pub fn perform(&mut self, d: &DaemonChild, a: Action, at_s: f64) -> Exercised {
        let r = match a {
            Action::Mask | Action::Unmask => {
                let cmd = if a == Action::Mask { "mask" } else { "unmask" };
                d.call(cmd, json!({"layer": OUTAGE.0, "branch": OUTAGE.1}))
                    .map(|_| {
                        if a == Action::Mask {
                            format!(
                                "outage: layer {} branch {} masked (neither computed nor trained)",
                                OUTAGE.0, OUTAGE.1
                            )
                        } else {
                            format!("outage over: layer {} branch {} back", OUTAGE.0, OUTAGE.1)
                        }
                    })
            }
            Action::Expand => d
                .call("expand", json!({"layer": self.last_layer, "branches": 1}))
                .map(|v| {
                    format!(
                        "expansion: layer {} now {} branches (logits bitwise equal at η = 0: {}; η ramps to {} over {} steps)",
                        self.last_layer,
                        v["width"],
                        yes_no(&v["logits_bitwise_equal_at_eta0"]),
                        v["beta"],
                        v["ramp_steps"]
                    )
                }),
            Action::Checkpoint => d.call("checkpoint", json!({"tag": DEMO_TAG})).map(|v| {
                self.checkpoint_probe = v["probe_logits_blake3"].as_str().map(String::from);
                format!(
                    "checkpoint: {} at step {} (tag `{DEMO_TAG}`)",
                    v["id"].as_str().unwrap_or("?"),
                    v["step"]
                )
            }),
            Action::Rollback => d.call("rollback", json!({"target": DEMO_TAG})).map(|v| {
                let exact = match (&self.checkpoint_probe, v["probe_logits_blake3"].as_str()) {
                    (Some(a), Some(b)) => {
                        if a == b {
                            "probe logits bitwise equal to the checkpoint's"
                        } else {
                            "probe logits DIFFER from the checkpoint's"
                        }
                    }
                    _ => "probe logits not compared",
                };
                format!(
                    "rollback: back to {} at step {}, widths {} ({exact})",
                    v["id"].as_str().unwrap_or("?"),
                    v["step"],
                    v["widths"]
                )
            }),
            Action::Generate => self.generate(d),
        };
        let (ok, detail) = match r {
            Ok(s) => (true, s),
            Err(e) => (false, format!("{a:?} refused: {e}")),
        };
        Exercised {
            action: a,
            at_s,
            ok,
            detail,
        }
    }

    /// Greedy answers to one unseen prompt of each task.
    fn generate(&mut self, d: &DaemonChild) -> Result<String, crate::admin::client::ClientError> {
        let mut g = Synth::new(self.prompt_seed);
        let mut right = 0;
        for task in Task::ALL {
            let row = g.row(task);
            let v = d.call_stream(
                "generate",
                json!({"prompt": row.prompt, "respond": true, "max_tokens": 32, "temperature": 0.0}),
                |_| {},
            )?;
            let got = answer(v["text"].as_str().unwrap_or(""));
            let expected = solve(task, &row.prompt).unwrap_or(row.response);
            let gen_ = Generated {
                task,
                prompt: row.prompt,
                expected,
                got,
            };
            right += gen_.correct() as usize;
            self.generated.push(gen_);
        }
        Ok(format!(
            "generate: {right} of {} answers right (greedy, one unseen prompt per task)",
            Task::ALL.len()
        ))
    }
}

fn yes_no(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "?",
    }
}

/// The model's answer: the generated text up to the end-of-text token, trimmed.
pub fn answer(text: &str) -> String {
    let end = text.find(crate::text::tokenizer::EOT_TOKEN);
    text[..end.unwrap_or(text.len())].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_stops_at_the_end_token() {
        assert_eq!(answer(" 82<|endoftext|>9"), "82");
        assert_eq!(answer("cba "), "cba");
        assert_eq!(answer("<|endoftext|>"), "");
    }
}
