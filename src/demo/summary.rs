//! The demo's final summary.

use std::fmt;
use std::path::PathBuf;

use serde_json::Value;

use super::actions::{Exercised, Generated};
use super::progress::View;
use super::timeline::TIMELINE;
use crate::report::Report;

pub struct Summary {
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub ran_s: f64,
    pub interrupted: bool,
    /// What fed the inbox ("synthetic tasks" or the real-text file).
    pub fed_from: String,
    pub files: usize,
    pub rows: usize,
    /// The daemon's last status.
    pub last: View,
    /// The final `eval` reply (per source and era), if one was taken.
    pub final_eval: Option<Value>,
    pub exercised: Vec<Exercised>,
    pub generated: Vec<Generated>,
    /// How the daemon ended.
    pub daemon_exit: String,
    pub daemon_clean: bool,
    pub report: Result<Report, String>,
}

impl Summary {
    /// Every action ran and succeeded, the daemon stopped cleanly, the plots exist.
    pub fn all_ok(&self) -> bool {
        self.exercised.len() == TIMELINE.len()
            && self.exercised.iter().all(|e| e.ok)
            && self.daemon_clean
            && self.report.is_ok()
    }
}

fn mmss(s: f64) -> String {
    let s = s.max(0.0) as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}

/// Control loss per source at the end, `source: old / new`.
fn per_source(eval: &Value) -> Vec<String> {
    let Some(m) = eval["per_source"].as_object() else {
        return Vec::new();
    };
    let mut by: std::collections::BTreeMap<&str, [Option<f64>; 2]> = Default::default();
    for (k, v) in m {
        if let Some((src, era)) = k.rsplit_once('/') {
            let e = by.entry(src).or_default();
            e[(era == "new") as usize] = v.as_f64();
        }
    }
    by.into_iter()
        .map(|(s, [o, n])| {
            let f = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.3}"));
            format!("{s} {} / {}", f(o), f(n))
        })
        .collect()
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.interrupted {
            "stopped by Ctrl-C"
        } else {
            "finished"
        };
        writeln!(f, "\n== mbtd demo {how} after {} ==", mmss(self.ran_s))?;
        writeln!(
            f,
            "fed {} files, {} rows ({}); replay holds {} rows; trainer at step {}, widths {:?}",
            self.files,
            self.rows,
            self.fed_from,
            self.last.replay_rows.map_or("?".into(), |r| r.to_string()),
            self.last.step.map_or("–".into(), |s| s.to_string()),
            self.last.widths
        )?;
        if let Some(e) = &self.final_eval {
            let ps = per_source(e);
            if !ps.is_empty() {
                writeln!(
                    f,
                    "control loss per source at the end (old rows / new rows): {}",
                    ps.join(", ")
                )?;
            }
        }
        writeln!(f, "features exercised (real ctl requests):")?;
        for (_, a) in TIMELINE {
            match self.exercised.iter().find(|e| e.action == a) {
                Some(e) => writeln!(
                    f,
                    "  [{}] {} {}",
                    mmss(e.at_s),
                    if e.ok { "ok    " } else { "FAILED" },
                    e.detail
                )?,
                None => writeln!(
                    f,
                    "  [--:--] not reached ({a:?}): the demo stopped before it"
                )?,
            }
        }
        if !self.generated.is_empty() {
            writeln!(f, "generate (greedy):")?;
            for g in &self.generated {
                let p = &g.probe;
                match (&p.expected, g.correct()) {
                    (Some(e), Some(ok)) => writeln!(
                        f,
                        "  {:<9} {:?} → {:?} (expected {e:?}) {}",
                        p.label,
                        p.prompt,
                        g.got,
                        if ok { "right" } else { "wrong" }
                    )?,
                    _ => writeln!(f, "  {:<9} {:?} → {:?}", p.label, p.prompt, g.got)?,
                }
            }
        }
        writeln!(
            f,
            "daemon: {}; log {}",
            self.daemon_exit,
            self.log.display()
        )?;
        match &self.report {
            Ok(r) => write!(f, "{r}")?,
            Err(e) => writeln!(f, "report FAILED: {e}")?,
        }
        writeln!(
            f,
            "data dir left for inspection: {}\n  resume it: mbtd run --config {} --data-dir {}\n  redraw the plots: mbtd report --config {} --data-dir {}",
            self.data_dir.display(),
            self.config.display(),
            self.data_dir.display(),
            self.config.display(),
            self.data_dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::timeline::Action;
    use serde_json::json;

    #[test]
    fn per_source_pairs_old_and_new() {
        let e = json!({"per_source": {"arith/old": 1.0, "arith/new": 1.5, "lookup/new": 2.0}});
        assert_eq!(
            per_source(&e),
            vec!["arith 1.000 / 1.500", "lookup – / 2.000"]
        );
    }

    #[test]
    fn summary_lists_every_action_and_unreached_ones() {
        let s = Summary {
            data_dir: "d".into(),
            config: "d/demo.toml".into(),
            log: "d/daemon.log".into(),
            ran_s: 75.0,
            interrupted: true,
            fed_from: "synthetic tasks".into(),
            files: 3,
            rows: 600,
            last: View::default(),
            final_eval: None,
            exercised: vec![Exercised {
                action: Action::Mask,
                at_s: 20.0,
                ok: true,
                detail: "outage: layer 0 branch 1 masked".into(),
            }],
            generated: Vec::new(),
            daemon_exit: "stopped cleanly (exit 0)".into(),
            daemon_clean: true,
            report: Err("no history".into()),
        };
        let t = s.to_string();
        assert!(t.contains("stopped by Ctrl-C after 01:15"), "{t}");
        assert!(t.contains("[00:20] ok     outage"), "{t}");
        assert!(
            t.contains("not reached (Rollback): the demo stopped before it"),
            "{t}"
        );
        assert!(t.contains("report FAILED: no history"), "{t}");
        assert!(!s.all_ok());
    }
}
