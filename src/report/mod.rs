//! `mbtd report`: reads the metrics history and the checkpoint list of a data dir and writes
//! PNG plots to `<data-dir>/report/`: `loss.png` (loss and control loss over steps, with
//! expansion, rollback and outage marks and the kept checkpoints), `branches.png` (branches,
//! active branches and α per layer over time), `throughput.png` (tokens/s, ingest rows/s).

pub mod history;
pub mod plots;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::checkpoint::{CheckpointSummary, list};
use crate::config::Config;
use crate::telemetry::history::read_history;
use history::{EventKind, Series, series};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The daemon's data dir.
    #[arg(long, default_value = ".")]
    pub data_dir: PathBuf,
    /// The configuration the daemon ran with (to find the history file and checkpoints;
    /// default: the embedded default).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the PNG files go (default: <data-dir>/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Why no report could be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "no metrics history at {path}: {source}; the daemon appends it every metrics.history_every_s (0 turns it off); pass the daemon's --data-dir and --config"
    )]
    NoHistory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the metrics history {path} holds no snapshot yet; wait metrics.history_every_s and try again"
    )]
    Empty { path: PathBuf },
    #[error("cannot create the report directory {path}: {source}")]
    OutDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw {path}: {why}")]
    Draw { path: PathBuf, why: String },
    #[error("the embedded plot font could not be loaded (a build problem)")]
    Font,
}

/// What the report read and wrote.
#[derive(Debug, Clone)]
pub struct Report {
    pub history_files: Vec<PathBuf>,
    pub records: usize,
    pub skipped_lines: usize,
    pub span_s: f64,
    pub first_step: Option<f64>,
    pub last_step: Option<f64>,
    /// Mean training loss over the first and last 10 snapshots that have one.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub last_control_old: Option<f64>,
    pub last_control_new: Option<f64>,
    pub events: BTreeMap<EventKind, u64>,
    pub checkpoints: Vec<CheckpointSummary>,
    pub plots: Vec<PathBuf>,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The numbers of [`Report`] from the series (pure).
fn summarize(s: &Series) -> (Option<f64>, Option<f64>, Option<f64>, Option<f64>) {
    let losses: Vec<f64> = s
        .points
        .iter()
        .filter_map(|p| p.loss)
        .filter(|x| x.is_finite())
        .collect();
    let k = losses.len().min(10);
    let last = |f: fn(&history::Point) -> Option<f64>| s.points.iter().rev().find_map(f);
    (
        mean(&losses[..k]),
        mean(&losses[losses.len() - k..]),
        last(|p| p.control_old),
        last(|p| p.control_new),
    )
}

/// Reads the history and checkpoints of `cfg` (paths resolved against the data dir) and
/// writes the plots to `out`.
pub fn write_report(cfg: &Config, out: &Path) -> Result<Report, ReportError> {
    let path = &cfg.metrics.history_file;
    let read = read_history(path).map_err(|source| ReportError::NoHistory {
        path: path.clone(),
        source,
    })?;
    if read.records.is_empty() {
        return Err(ReportError::Empty { path: path.clone() });
    }
    let s = series(&read.records);
    // A missing or unreadable checkpoint root only leaves the marks out.
    let checkpoints = list(&cfg.paths.checkpoints)
        .map(|l| l.checkpoints)
        .unwrap_or_default();
    std::fs::create_dir_all(out).map_err(|source| ReportError::OutDir {
        path: out.to_path_buf(),
        source,
    })?;
    // Each drawn to a temporary name, then renamed: a reader never sees half a PNG.
    let mut plots = Vec::new();
    for name in ["loss.png", "branches.png", "throughput.png"] {
        let (tmp, path) = (out.join(format!(".tmp-{name}")), out.join(name));
        match name {
            "loss.png" => plots::loss_plot(&tmp, &s, &checkpoints)?,
            "branches.png" => plots::branches_plot(&tmp, &s)?,
            _ => plots::throughput_plot(&tmp, &s)?,
        }
        std::fs::rename(&tmp, &path).map_err(|source| ReportError::Write {
            path: path.clone(),
            source,
        })?;
        plots.push(path);
    }
    let mut events = BTreeMap::new();
    for e in &s.events {
        *events.entry(e.kind).or_insert(0) += e.count;
    }
    let (first_loss, last_loss, last_control_old, last_control_new) = summarize(&s);
    let steps: Vec<f64> = s.points.iter().filter_map(|p| p.step).collect();
    Ok(Report {
        history_files: read.files,
        records: read.records.len(),
        skipped_lines: read.skipped_lines,
        span_s: s.points.last().map_or(0.0, |p| p.t_s),
        first_step: steps.first().copied(),
        last_step: steps.last().copied(),
        first_loss,
        last_loss,
        last_control_old,
        last_control_new,
        events,
        checkpoints,
        plots,
    })
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.digits$}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: Vec<String> = self
            .history_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        writeln!(
            f,
            "history: {} snapshots over {:.0} s from {}{}",
            self.records,
            self.span_s,
            files.join(" + "),
            if self.skipped_lines > 0 {
                format!(" ({} unreadable lines skipped)", self.skipped_lines)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "steps {} → {}; training loss {} → {} (mean of the first / last 10 snapshots); control loss old {}, new {}",
            opt(self.first_step, 0),
            opt(self.last_step, 0),
            opt(self.first_loss, 3),
            opt(self.last_loss, 3),
            opt(self.last_control_old, 3),
            opt(self.last_control_new, 3)
        )?;
        let ev: Vec<String> = self
            .events
            .iter()
            .map(|(k, n)| format!("{} × {n}", k.label()))
            .collect();
        writeln!(
            f,
            "events: {}",
            if ev.is_empty() {
                "none".into()
            } else {
                ev.join(", ")
            }
        )?;
        let tagged: Vec<String> = self
            .checkpoints
            .iter()
            .filter_map(|c| Some(format!("{} (step {})", c.tag.as_ref()?, c.step?)))
            .collect();
        writeln!(
            f,
            "checkpoints kept: {}{}",
            self.checkpoints.len(),
            if tagged.is_empty() {
                String::new()
            } else {
                format!("; tagged: {}", tagged.join(", "))
            }
        )?;
        writeln!(f, "plots:")?;
        for p in &self.plots {
            writeln!(f, "  {}", p.display())?;
        }
        Ok(())
    }
}

/// `mbtd report`: loads the configuration, resolves it against the data dir, writes the plots.
pub fn run(args: &ReportArgs) -> anyhow::Result<Report> {
    let mut cfg = Config::load(args.config.as_deref())?;
    let data_dir = std::path::absolute(&args.data_dir)?;
    cfg.resolve_paths(&data_dir);
    let out = args.out.clone().unwrap_or_else(|| data_dir.join("report"));
    Ok(write_report(&cfg, &out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fsutil::now_ms;
    use crate::telemetry::history::{HistoryRecord, HistoryWriter};

    fn rec(i: u64) -> HistoryRecord {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: f64| {
            m.insert(k.to_string(), Some(v));
        };
        put("train_step", (i * 10) as f64);
        put("loss", 5.0 - i as f64 * 0.1);
        put("train_tokens_per_sec", 1000.0 + i as f64);
        put("ingest_rows_per_sec_window", 20.0);
        put("expansion_events_total", if i >= 5 { 1.0 } else { 0.0 });
        put(
            "branches_forced_off",
            if (2..4).contains(&i) { 1.0 } else { 0.0 },
        );
        put("loss_control_old", if i >= 3 { 4.0 } else { 4.5 });
        for l in 0..2 {
            let w = if l == 1 && i >= 5 { 3 } else { 2 };
            put(&format!("layer_width{{layer=\"{l}\"}}"), w as f64);
            put(&format!("layer_active_branches{{layer=\"{l}\"}}"), w as f64);
            for b in 0..w {
                put(
                    &format!("alpha{{branch=\"{b}\",layer=\"{l}\"}}"),
                    1.0 / w as f64,
                );
            }
        }
        HistoryRecord {
            v: 1,
            unix_ms: now_ms() + i * 1000,
            uptime_s: i as f64,
            metrics: m,
        }
    }

    #[test]
    fn writes_three_pngs_and_summarizes_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.resolve_paths(dir.path());
        let mut w = HistoryWriter::new(cfg.metrics.history_file.clone(), 1 << 20);
        for i in 0..30 {
            w.append(&rec(i)).unwrap();
        }
        let out = dir.path().join("report");
        let r = write_report(&cfg, &out).unwrap();
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "no temporary file left: {names:?}");
        for p in &r.plots {
            let bytes = std::fs::read(p).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{}", p.display());
            assert!(
                bytes.len() > 10_000,
                "{} is {} bytes",
                p.display(),
                bytes.len()
            );
        }
        assert_eq!(r.records, 30);
        assert_eq!(r.events[&EventKind::Expansion], 1);
        assert_eq!(r.events[&EventKind::OutageStart], 1);
        assert_eq!(r.last_step, Some(290.0));
        assert!((r.first_loss.unwrap() - 4.55).abs() < 1e-9);
        assert_eq!(r.last_control_old, Some(4.0));
        let text = r.to_string();
        assert!(text.contains("expansion × 1"), "{text}");
        assert!(text.contains("loss.png"), "{text}");
    }

    #[test]
    fn a_data_dir_without_history_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.resolve_paths(dir.path());
        let e = write_report(&cfg, &dir.path().join("r"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics.jsonl") && e.contains("history_every_s"),
            "{e}"
        );
    }
}
