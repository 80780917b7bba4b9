//! The demo's live view: what `ctl status` and `ctl diagnostics` say, as two lines under a
//! progress bar (indicatif; hidden when stderr is not a terminal, then a plain line every
//! few seconds instead). Events print above it, on stdout.

use std::time::Duration;

use crate::admin::protocol::status_section;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// The numbers the view shows, read from a `status` reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub state: String,
    pub step: Option<u64>,
    pub tokens_per_sec: Option<f64>,
    pub loss: Option<f64>,
    pub control_old: Option<f64>,
    pub control_new: Option<f64>,
    pub widths: Vec<u64>,
    pub replay_rows: Option<u64>,
    pub files_done: u64,
    pub files_failed: u64,
    /// (layer, branch) under a forced outage.
    pub forced_off: Vec<(usize, usize)>,
    pub trainer_event: String,
}

impl View {
    pub fn from_status(status: &Value) -> Self {
        let tr = status_section(status, "trainer");
        let ing = status_section(status, "ingest");
        let forced_off = tr["forced_off"]
            .as_array()
            .map(|layers| {
                layers
                    .iter()
                    .enumerate()
                    .flat_map(|(l, bs)| {
                        bs.as_array()
                            .into_iter()
                            .flatten()
                            .enumerate()
                            .filter(|(_, b)| b.as_bool() == Some(true))
                            .map(move |(i, _)| (l, i))
                    })
                    .collect()
            })
            .unwrap_or_default();
        View {
            state: tr["state"].as_str().unwrap_or("starting").to_string(),
            step: tr["step"].as_u64(),
            tokens_per_sec: tr["tokens_per_sec"].as_f64(),
            loss: tr["loss"].as_f64(),
            control_old: tr["loss_control_old"].as_f64(),
            control_new: tr["loss_control_new"].as_f64(),
            widths: tr["widths"]
                .as_array()
                .map(|w| w.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default(),
            replay_rows: status_section(status, "replay")["rows"].as_u64(),
            files_done: ing["files_done"].as_u64().unwrap_or(0),
            files_failed: ing["files_failed"].as_u64().unwrap_or(0),
            forced_off,
            trainer_event: tr["last_event"].as_str().unwrap_or("").to_string(),
        }
    }
}

/// α per layer from a `diagnostics` reply.
pub fn alphas(diag: &Value) -> Vec<Vec<f64>> {
    diag["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    l["alpha"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.filter(|v| v.is_finite())
        .map_or("–".to_string(), |v| format!("{v:.digits$}"))
}

/// The two lines under the bar. `files_dropped`: files the producer put in the inbox.
pub fn render(v: &View, alphas: &[Vec<f64>], files_dropped: usize, last_event: &str) -> String {
    let waiting = (files_dropped as u64).saturating_sub(v.files_done + v.files_failed);
    let widths: Vec<String> = v.widths.iter().map(u64::to_string).collect();
    let alpha: Vec<String> = alphas
        .iter()
        .enumerate()
        .map(|(l, a)| {
            let a: Vec<String> = a.iter().map(|x| format!("{x:.2}")).collect();
            format!("L{l} [{}]", a.join(" "))
        })
        .collect();
    let outage = if v.forced_off.is_empty() {
        String::new()
    } else {
        let o: Vec<String> = v
            .forced_off
            .iter()
            .map(|(l, b)| format!("L{l} b{b}"))
            .collect();
        format!(" · outage: {}", o.join(", "))
    };
    let step = match v.step {
        Some(s) => format!("step {s}"),
        None if v.trainer_event.is_empty() => v.state.clone(),
        None => format!("{}: {}", v.state, v.trainer_event),
    };
    format!(
        "{step} · {} tok/s · loss {} · control old {} / new {} · widths [{}] · inbox {waiting} waiting · replay {} rows\n\
         α {}{outage} · last event: {last_event}",
        num(v.tokens_per_sec, 0),
        num(v.loss, 3),
        num(v.control_old, 3),
        num(v.control_new, 3),
        widths.join(","),
        v.replay_rows.map_or("–".into(), |r| r.to_string()),
        if alpha.is_empty() {
            "–".to_string()
        } else {
            alpha.join(" ")
        },
    )
}

/// The bar over the demo's duration with the view under it.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total: Duration) -> Self {
        let bar = ProgressBar::new(total.as_secs().max(1));
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} s · {prefix}\n{msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar }
    }

    /// Whether the bar is drawn (stderr is a terminal).
    pub fn is_drawn(&self) -> bool {
        !self.bar.is_hidden()
    }

    pub fn update(&self, elapsed: Duration, phase: &str, view: String) {
        self.bar.set_position(elapsed.as_secs());
        self.bar.set_prefix(phase.to_string());
        self.bar.set_message(view);
    }

    /// Prints a line above the bar (to stdout, also when the bar is hidden).
    pub fn println(&self, line: &str) {
        self.bar.suspend(|| println!("{line}"));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Value {
        json!({"sections": [
            ["ingest", {"files_done": 3, "files_failed": 1}],
            ["replay", {"rows": 1234}],
            ["trainer", {"state": "training", "step": 42, "tokens_per_sec": 5123.4,
                "loss": 1.23456, "loss_control_old": 1.5, "loss_control_new": null,
                "widths": [3, 4], "forced_off": [[false, true, false], [false, false, false, false]],
                "last_event": "layer 1 expanded to 4 branches"}]
        ]})
    }

    #[test]
    fn view_reads_every_field_of_status() {
        let v = View::from_status(&status());
        assert_eq!(v.step, Some(42));
        assert_eq!(v.widths, vec![3, 4]);
        assert_eq!(v.forced_off, vec![(0, 1)]);
        assert_eq!(v.control_new, None);
        assert_eq!((v.files_done, v.files_failed), (3, 1));
        assert_eq!(v.replay_rows, Some(1234));
    }

    #[test]
    fn render_shows_the_numbers_and_missing_ones_as_dashes() {
        let v = View::from_status(&status());
        let a = alphas(&json!({"layers": [{"alpha": [0.5, 0.25, 0.25]}, {"alpha": [1.0]}]}));
        let s = render(&v, &a, 6, "outage started");
        assert!(s.contains("step 42"), "{s}");
        assert!(s.contains("5123 tok/s"), "{s}");
        assert!(s.contains("loss 1.235"), "{s}");
        assert!(s.contains("old 1.500 / new –"), "{s}");
        assert!(s.contains("widths [3,4]"), "{s}");
        assert!(s.contains("inbox 2 waiting"), "{s}");
        assert!(s.contains("L0 [0.50 0.25 0.25] L1 [1.00]"), "{s}");
        assert!(s.contains("outage: L0 b1"), "{s}");
        assert!(s.contains("last event: outage started"), "{s}");
        let empty = render(&View::default(), &[], 0, "");
        assert!(
            empty.contains("– tok/s") && empty.contains("α –"),
            "{empty}"
        );
    }
}
