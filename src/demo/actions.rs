//! The demo's operator actions as real `ctl` requests, each turned into a line for the view
//! and the summary.

use serde_json::{Value, json};

use super::producer::RealText;
use super::timeline::{Action, DEMO_TAG, OUTAGE};
use crate::daemon::child::DaemonChild;
use crate::text::csv_rows::RowBody;
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

/// A prompt the demo asks the model about.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The task (synthetic) or the row's source (real text).
    pub label: String,
    pub prompt: String,
    /// Answer as an instruction (prompt, then the response token), or continue the text.
    pub respond: bool,
    /// The right answer, when there is one.
    pub expected: Option<String>,
}

/// One unseen prompt of each synthetic task (from a seed the producer does not use).
pub fn synthetic_probes(seed: u64) -> Vec<Probe> {
    let mut g = Synth::new(seed);
    Task::ALL
        .iter()
        .map(|&task| {
            let row = g.row(task);
            Probe {
                label: task.name().to_string(),
                expected: Some(solve(task, &row.prompt).unwrap_or(row.response)),
                prompt: row.prompt,
                respond: true,
            }
        })
        .collect()
}

/// `n` rows spread over a real-text file: a prompt and its response, or the first words of a
/// text (at most a third of them, at most 6) to be continued.
pub fn real_probes(text: &RealText, n: usize) -> Vec<Probe> {
    let len = text.rows.len();
    (0..n.min(len))
        .map(|i| &text.rows[i * len / n.min(len)])
        .map(|row| match &row.body {
            RowBody::PromptResponse { prompt, response } => Probe {
                label: row.source.clone(),
                prompt: prompt.clone(),
                respond: true,
                expected: Some(response.clone()),
            },
            RowBody::Text { text } => {
                let words: Vec<&str> = text.split_whitespace().collect();
                let k = words.len().div_ceil(3).clamp(1, 6);
                Probe {
                    label: row.source.clone(),
                    prompt: words[..k.min(words.len())].join(" "),
                    respond: false,
                    expected: None,
                }
            }
        })
        .collect()
}

/// One `generate` of the demo: the probe and the model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub probe: Probe,
    pub got: String,
}

impl Generated {
    /// Right or wrong; `None` when there is no right answer (a text continuation).
    pub fn correct(&self) -> Option<bool> {
        self.probe.expected.as_ref().map(|e| *e == self.got)
    }
}

/// State carried between actions.
pub struct Actions {
    pub last_layer: usize,
    probes: Vec<Probe>,
    /// The probe-logits hash of the demo's checkpoint (compared after the rollback).
    checkpoint_probe: Option<String>,
    pub generated: Vec<Generated>,
}

impl Actions {
    pub fn new(n_layers: usize, probes: Vec<Probe>) -> Self {
        Self {
            last_layer: n_layers.saturating_sub(1),
            probes,
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

    /// Greedy answers to the probes.
    fn generate(&mut self, d: &DaemonChild) -> Result<String, crate::admin::client::ClientError> {
        let (mut right, mut judged) = (0, 0);
        for probe in &self.probes {
            let v = d.call_stream(
                "generate",
                json!({"prompt": probe.prompt, "respond": probe.respond, "max_tokens": 32,
                    "temperature": 0.0}),
                |_| {},
            )?;
            let g = Generated {
                probe: probe.clone(),
                got: answer(v["text"].as_str().unwrap_or("")),
            };
            if let Some(ok) = g.correct() {
                judged += 1;
                right += ok as usize;
            }
            self.generated.push(g);
        }
        let n = self.probes.len();
        Ok(if judged > 0 {
            format!("generate: {right} of {judged} answers right (greedy, {n} unseen prompts)")
        } else {
            format!("generate: {n} continuations of real-text prompts (greedy; see below)")
        })
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
    fn synthetic_probes_cover_every_task_with_the_right_answer() {
        let p = synthetic_probes(5);
        assert_eq!(p.len(), Task::ALL.len());
        for (probe, task) in p.iter().zip(Task::ALL) {
            assert_eq!(probe.label, task.name());
            assert!(probe.respond);
            assert_eq!(probe.expected, solve(task, &probe.prompt));
        }
    }

    #[test]
    fn real_probes_spread_over_the_file() {
        use crate::text::csv_rows::{CsvRow, RowKind};
        let rows: Vec<CsvRow> = (0..8)
            .map(|i| CsvRow {
                line: i + 2,
                source: "s".into(),
                time_ms: None,
                body: RowBody::Text {
                    text: format!("row {i} has exactly six words"),
                },
            })
            .collect();
        let t = RealText {
            file: "f.csv".into(),
            kind: RowKind::Text,
            rows,
        };
        let p = real_probes(&t, 4);
        let prompts: Vec<&str> = p.iter().map(|p| p.prompt.as_str()).collect();
        assert_eq!(prompts, vec!["row 0", "row 2", "row 4", "row 6"]);
        assert!(p.iter().all(|p| !p.respond && p.expected.is_none()));
        assert_eq!(real_probes(&t, 20).len(), 8);
    }

    #[test]
    fn answer_stops_at_the_end_token() {
        assert_eq!(answer(" 82<|endoftext|>9"), "82");
        assert_eq!(answer("cba "), "cba");
        assert_eq!(answer("<|endoftext|>"), "");
    }
}
