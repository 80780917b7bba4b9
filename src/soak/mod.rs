//! `mbtd bench soak`: the real daemon for N minutes under a steady inbox stream.
//!
//! This executable's `run` is started as a child on a data dir (a fresh temp dir by default)
//! with a small embedded config (`soak.toml`: a model that makes thousands of steps in a few
//! minutes, checkpoints every 30 s, a capped replay store). A producer thread drops CSV files
//! into the inbox at a steady row rate (written in a staging dir, renamed in). Every
//! `--sample-secs` the soak reads the child's RSS and open descriptors from `/proc/<pid>/` and
//! its step, tokens/s and replay rows from `ctl status`. At the end the producer stops, the
//! inbox drains, `ctl metrics` gives the step-time quantiles (`train_step_seconds_*`) and the
//! ingest counters, `ctl shutdown` stops the daemon, which must exit 0. One JSON line.
//!
//! Rows come from any iterator of (source, body) ([`producer::Producer`]); the soak uses the
//! small seeded [`producer::local_rows`].

pub mod procfs;
pub mod producer;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use self::producer::{Dropped, Producer, local_rows};
use self::stats::{Sample, summarize};
use crate::admin::client::ClientError;
use crate::admin::protocol::status_section;
use crate::config::Config;
use crate::daemon::child::{ChildError, DaemonChild};
use crate::text::csv_write::CsvWriteError;

/// The daemon configuration of the soak.
pub const SOAK_TOML: &str = include_str!("soak.toml");

/// Options of `mbtd bench soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Minutes of soak after the daemon answers (fractions allowed).
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Seconds between samples of RSS, descriptors and status.
    #[arg(long, default_value_t = 5.0)]
    pub sample_secs: f64,
    /// Seconds of warm-up left out of the growth figures (at most half the soak).
    #[arg(long, default_value_t = 60.0)]
    pub warmup_secs: f64,
    /// Rows per second the producer drops into the inbox.
    #[arg(long, default_value_t = 100.0)]
    pub rows_per_sec: f64,
    /// Rows per batch (a batch is one file per row kind).
    #[arg(long, default_value_t = 200)]
    pub rows_per_batch: usize,
    /// Seed of the row generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Data dir of the daemon (default: a new temp dir, removed after a successful soak).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Daemon configuration (default: the embedded soak config).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Why the soak could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// Bad options.
    #[error("bench soak: {0}")]
    Args(String),
    /// A file-system operation failed.
    #[error("bench soak: {what} {path} failed: {source}")]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon's configuration does not load.
    #[error("bench soak: {0}")]
    Config(String),
    /// The daemon misbehaved (did not start, died, did not stop, exited non-zero).
    #[error("bench soak: the daemon {what}; see its log {}", log.display())]
    Daemon { what: String, log: PathBuf },
    /// The child daemon did not start, died or did not stop.
    #[error("bench soak: {0}")]
    Child(#[from] ChildError),
    /// An admin request failed.
    #[error("bench soak: admin request failed: {0}")]
    Client(#[from] ClientError),
    /// Writing an inbox file failed.
    #[error("bench soak: {0}")]
    Write(#[from] CsvWriteError),
}

impl SoakError {
    fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> SoakError {
        let (what, path) = (what.to_string(), path.to_path_buf());
        move |source| SoakError::Io { what, path, source }
    }
}

/// Stops the producer thread when dropped (also when the soak ends with an error).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn validate(a: &SoakArgs) -> Result<(), SoakError> {
    let positive = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(SoakError::Args(format!("--{name} must be > 0, got {v}")))
        }
    };
    positive("minutes", a.minutes)?;
    positive("sample-secs", a.sample_secs)?;
    positive("rows-per-sec", a.rows_per_sec)?;
    if !(a.warmup_secs.is_finite() && a.warmup_secs >= 0.0) {
        return Err(SoakError::Args("--warmup-secs must be >= 0".into()));
    }
    if a.rows_per_batch == 0 {
        return Err(SoakError::Args("--rows-per-batch must be >= 1".into()));
    }
    Ok(())
}

/// Runs the producer until `stop`: a batch of `rows_per_batch` rows every
/// `rows_per_batch / rows_per_sec` seconds (deadline-scheduled, so the rate holds).
fn produce(
    mut p: Producer<impl Iterator<Item = producer::SourcedRow>>,
    rows_per_batch: usize,
    rows_per_sec: f64,
    stop: &AtomicBool,
) -> Result<Dropped, SoakError> {
    let period = Duration::from_secs_f64(rows_per_batch as f64 / rows_per_sec);
    let mut total = Dropped::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        let d = p.drop_batch(rows_per_batch)?;
        total.files += d.files;
        total.rows += d.rows;
        total.bytes += d.bytes;
        next += period;
    }
    Ok(total)
}

fn sample(d: &mut DaemonChild, t_s: f64) -> Result<Sample, SoakError> {
    d.check_alive()?;
    let pid = d.pid();
    let proc_path = PathBuf::from(format!("/proc/{pid}"));
    let rss_kib = procfs::rss_kib(pid).map_err(SoakError::io("read RSS of", &proc_path))?;
    let fds = procfs::open_fds(pid).map_err(SoakError::io("count descriptors of", &proc_path))?;
    let st = d.call("status", Value::Null)?;
    let trainer = status_section(&st, "trainer");
    Ok(Sample {
        t_s,
        rss_kib,
        fds,
        step: trainer["step"].as_u64(),
        tokens_per_sec: trainer["tokens_per_sec"].as_f64(),
        replay_rows: status_section(&st, "replay")["rows"].as_u64(),
    })
}

/// Files the ingestor has finished (done or failed).
fn files_finished(d: &DaemonChild) -> Result<u64, SoakError> {
    let st = d.call("status", Value::Null)?;
    let ing = status_section(&st, "ingest");
    Ok(ing["files_done"].as_u64().unwrap_or(0) + ing["files_failed"].as_u64().unwrap_or(0))
}

/// Runs the soak and returns its JSON report.
pub fn bench_soak(a: &SoakArgs) -> Result<Value, SoakError> {
    validate(a)?;
    let started = Instant::now();
    let (dir, temp) = match &a.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "mbtd-soak-{}-{}",
                std::process::id(),
                crate::store::fsutil::now_ms()
            )),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).map_err(SoakError::io("create", &dir))?;
    let dir = std::path::absolute(&dir).map_err(SoakError::io("resolve", &dir))?;
    let config_path = match &a.config {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("soak.toml");
            std::fs::write(&p, SOAK_TOML).map_err(SoakError::io("write", &p))?;
            p
        }
    };
    let mut cfg = Config::load(Some(&config_path)).map_err(|e| SoakError::Config(e.to_string()))?;
    cfg.resolve_paths(&dir);
    let exe = std::env::current_exe().map_err(SoakError::io("locate", Path::new("mbtd")))?;
    let mut d = DaemonChild::spawn(
        &exe,
        &config_path,
        &dir,
        cfg.admin.socket.clone(),
        dir.join("daemon.log"),
    )?;
    d.wait_ready(Duration::from_secs(60))?;

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let prod = Producer::new(
        local_rows(a.seed),
        &dir.join("soak-staging"),
        &cfg.paths.inbox,
    )?;
    let (rows_per_batch, rows_per_sec) = (a.rows_per_batch, a.rows_per_sec);
    let flag = stop.clone();
    let producer = std::thread::Builder::new()
        .name("soak-producer".into())
        .spawn(move || produce(prod, rows_per_batch, rows_per_sec, &flag))
        .map_err(SoakError::io("start the producer thread", &dir))?;

    let duration = a.minutes * 60.0;
    let mut samples = Vec::new();
    let mut k = 0u32;
    loop {
        samples.push(sample(&mut d, t0.elapsed().as_secs_f64())?);
        k += 1;
        let next = (k as f64 * a.sample_secs).min(duration);
        if samples.last().is_some_and(|s| s.t_s >= duration) {
            break;
        }
        let wait = next - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let produced = producer
        .join()
        .map_err(|_| SoakError::Args("the producer thread panicked".into()))??;

    // Let the inbox drain so that every produced row is counted.
    let drain = Instant::now();
    while files_finished(&d)? < produced.files {
        d.check_alive()?;
        if drain.elapsed() > Duration::from_secs(120) {
            return Err(SoakError::Daemon {
                what: format!(
                    "did not finish the {} produced files within 120 s of the producer's stop",
                    produced.files
                ),
                log: dir.join("daemon.log"),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let drain_s = drain.elapsed().as_secs_f64();
    let m = d.call("metrics", Value::Null)?;
    let exit = d.shutdown(Duration::from_secs(cfg.daemon.shutdown_timeout_s + 30))?;
    if !exit.success() {
        return Err(SoakError::Daemon {
            what: format!("ended with {exit} after `ctl shutdown`"),
            log: dir.join("daemon.log"),
        });
    }
    let warmup = a.warmup_secs.min(duration / 2.0);
    let summary = summarize(&samples, warmup);
    let ms = |k: &str| {
        m[format!("train_step_seconds_{k}")]
            .as_f64()
            .map(|s| s * 1e3)
    };
    let col = |f: fn(&Sample) -> Value| samples.iter().map(f).collect::<Vec<Value>>();
    let report = json!({
        "bench": "soak",
        "minutes": a.minutes,
        "sample_secs": a.sample_secs,
        "warmup_secs": warmup,
        "config": a.config.as_ref().map_or("embedded soak config".to_string(), |p| p.display().to_string()),
        "rows_per_sec_target": a.rows_per_sec,
        "series": {
            "t_s": col(|s| json!((s.t_s * 10.0).round() / 10.0)),
            "rss_kib": col(|s| json!(s.rss_kib)),
            "fds": col(|s| json!(s.fds)),
            "step": col(|s| json!(s.step)),
            "tokens_per_sec": col(|s| json!(s.tokens_per_sec.map(f64::round))),
            "replay_rows": col(|s| json!(s.replay_rows)),
        },
        "summary": summary,
        "step_ms": {
            "p50": ms("p50"), "p90": ms("p90"), "p99": ms("p99"), "max": ms("max"),
            "count": m["train_step_seconds_count"],
        },
        "steps": m["train_steps_total"],
        "rows_produced": produced.rows,
        "files_produced": produced.files,
        "bytes_produced": produced.bytes,
        "rows_ingested": m["ingest_rows_total"],
        "rows_rejected": m["ingest_rows_rejected_total"],
        "replay_rows": m["replay_rows"],
        "replay_evicted_total": m["replay_evicted_total"],
        "checkpoints_written": m["checkpoints_total"],
        "drain_s": drain_s,
        "daemon_exit_code": exit.code(),
        "data_dir": if temp { Value::Null } else { json!(dir.display().to_string()) },
        "wall_s": started.elapsed().as_secs_f64(),
    });
    if temp {
        std::fs::remove_dir_all(&dir).map_err(SoakError::io("remove", &dir))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_loads_and_bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("soak.toml");
        std::fs::write(&p, SOAK_TOML).unwrap();
        let cfg = Config::load(Some(&p)).unwrap();
        assert_eq!(cfg.model.d_model, 64);
        let ok = SoakArgs {
            minutes: 1.0,
            sample_secs: 5.0,
            warmup_secs: 10.0,
            rows_per_sec: 10.0,
            rows_per_batch: 10,
            seed: 1,
            data_dir: None,
            config: None,
        };
        validate(&ok).unwrap();
        let bad = SoakArgs {
            minutes: 0.0,
            ..ok.clone()
        };
        assert!(
            validate(&bad)
                .unwrap_err()
                .to_string()
                .contains("--minutes")
        );
        let bad = SoakArgs {
            rows_per_batch: 0,
            ..ok
        };
        assert!(validate(&bad).is_err());
    }
}
