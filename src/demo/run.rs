//! The demo's main loop: the daemon, the producer, the timeline of actions, the live view,
//! then an ordered stop, the report and the summary.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::actions::{Actions, Exercised, real_probes, synthetic_probes};
use super::producer::{Producer, RealText};
use super::progress::{Progress, View, alphas, render};
use super::summary::Summary;
use super::timeline::{TIMELINE, due};
use super::{DEMO_TOML, DemoArgs, demo_config};
use crate::daemon::child::DaemonChild;
use crate::report::write_report;
use crate::text::synth::{PHASES, phase_index};

/// Marks a directory made by `mbtd demo` (only such a directory is deleted by `--fresh`).
pub const MARKER: &str = ".mbtd-demo";
/// Seconds between two files of the producer.
const DROP_EVERY: Duration = Duration::from_millis(1500);
/// Rows per synthetic file after the first: 200 rows/s, about what the demo model takes in
/// (≈ 25 steps/s × 8 new windows), so that replay does not repeat few rows to memorisation.
const CHUNK_ROWS: usize = 300;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C sets a flag the loop polls (the daemon, in its own process group, does not see it).
fn install_sigint() {
    // SAFETY: a handler that only stores to an atomic is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

/// Creates `dir` (absolute path returned) with the demo marker. A non-empty `dir` is refused
/// unless `fresh` and it carries the marker, in which case it is deleted first.
pub fn prepare_data_dir(dir: &Path, fresh: bool) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(dir)?;
    let non_empty = std::fs::read_dir(&abs)
        .map(|mut r| r.next().is_some())
        .unwrap_or(false);
    if non_empty {
        if !fresh {
            bail!(
                "{} is not empty (left by an earlier demo?): look inside, remove it, or run `mbtd demo --fresh` to delete it and start over",
                abs.display()
            );
        }
        if !abs.join(MARKER).exists() {
            bail!(
                "{} is not empty and was not made by `mbtd demo` (no {MARKER} file in it); --fresh deletes only demo directories: choose another --data-dir",
                abs.display()
            );
        }
        std::fs::remove_dir_all(&abs)
            .with_context(|| format!("cannot delete {}", abs.display()))?;
    }
    std::fs::create_dir_all(&abs).with_context(|| format!("cannot create {}", abs.display()))?;
    std::fs::write(
        abs.join(MARKER),
        "made by `mbtd demo`; `mbtd demo --fresh` may delete this directory\n",
    )?;
    Ok(abs)
}

fn data(r: Result<Value, crate::admin::client::ClientError>) -> Option<Value> {
    r.ok()
}

/// Runs the demo; the summary says what happened (also when an action was refused).
pub fn run(args: &DemoArgs) -> anyhow::Result<Summary> {
    if !(args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
        bail!("--minutes {}: must be in (0, 1440]", args.minutes);
    }
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let mut cfg = demo_config()?;
    let real = args
        .real_text
        .as_ref()
        .map(|p| {
            RealText::load(
                p,
                cfg.ingest.max_row_bytes as usize,
                cfg.tokenizer.bootstrap_rows,
            )
        })
        .transpose()?;
    // Prompts for `generate`: unseen synthetic rows (another seed), or rows of the file.
    let probes = match &real {
        Some(t) => real_probes(t, 4),
        None => synthetic_probes(args.seed.wrapping_add(1_000_003)),
    };
    let data_dir = prepare_data_dir(&args.data_dir, args.fresh)?;
    let cfg_path = data_dir.join("demo.toml");
    std::fs::write(&cfg_path, DEMO_TOML)?;
    cfg.resolve_paths(&data_dir);
    std::fs::create_dir_all(&cfg.paths.inbox)?;
    let log = data_dir.join("daemon.log");
    let m = &cfg.model;
    println!(
        "mbtd demo: {:.1} min on {}\n  config: {} (the embedded demo config: d {}, {} layers × {} branches, vocab {}; \
         the full default model is `mbtd config default`, run with `mbtd run --config FILE`)\n  daemon log: {}\n  Ctrl-C stops early (the daemon stops in order, the report is still written)",
        args.minutes,
        data_dir.display(),
        cfg_path.display(),
        m.d_model,
        m.n_layers,
        m.branches,
        m.vocab_size,
        log.display()
    );
    install_sigint();
    let exe = std::env::current_exe().context("cannot find the mbtd executable")?;
    let mut d = DaemonChild::spawn(&exe, &cfg_path, &data_dir, cfg.admin.socket.clone(), log)?;
    d.wait_ready(Duration::from_secs(60))?;
    let start = Instant::now();
    let first_rows = cfg.tokenizer.bootstrap_rows + 100;
    let (mut producer, fed_from) = match real {
        Some(text) => {
            let drops = (total.as_secs_f64() / DROP_EVERY.as_secs_f64()).max(2.0) as usize - 1;
            let chunk = text.rows.len().saturating_sub(first_rows).div_ceil(drops);
            let from = format!("real text from {}", text.file);
            (
                Producer::real(cfg.paths.inbox.clone(), text, first_rows, chunk),
                from,
            )
        }
        None => (
            Producer::synthetic(cfg.paths.inbox.clone(), args.seed, first_rows, CHUNK_ROWS),
            format!("synthetic tasks in {} phases", PHASES.len()),
        ),
    };
    let progress = Progress::new(total);
    let say = |line: String| progress.println(&format!("[{}] {line}", mmss(start.elapsed())));
    let mut actions = Actions::new(cfg.model.n_layers, probes);
    let mut exercised: Vec<Exercised> = Vec::new();
    let mut view = View::default();
    let mut alpha: Vec<Vec<f64>> = Vec::new();
    let mut last_event = String::from("daemon started");
    let mut train_start: Option<Instant> = None;
    let (mut next_drop, mut next_status, mut next_diag, mut next_line) =
        (start, start, start, start + Duration::from_secs(10));
    let mut phase_name = "";
    loop {
        let now = Instant::now();
        if INTERRUPTED.load(Ordering::SeqCst) {
            say("Ctrl-C: stopping the daemon in order (final checkpoint), then the report".into());
            break;
        }
        if now >= start + total {
            break;
        }
        if let Some(st) = d.exited() {
            bail!(
                "the daemon exited during the demo ({st}); its log:\n{}",
                d.log_tail(20)
            );
        }
        let fraction = now.duration_since(start).as_secs_f64() / total.as_secs_f64();
        if now >= next_drop {
            next_drop = now + DROP_EVERY;
            if let Some(dropped) = producer.drop_next(fraction)?
                && dropped.phase != phase_name
            {
                phase_name = dropped.phase;
                let i = phase_index(fraction, PHASES.len());
                say(if fed_from.starts_with("synthetic") {
                    format!("data phase {}/{}: {phase_name}", i + 1, PHASES.len())
                } else {
                    format!("feeding {fed_from}")
                });
            }
        }
        if now >= next_status {
            next_status = now + Duration::from_millis(500);
            if let Some(s) = data(d.call("status", Value::Null)) {
                view = View::from_status(&s);
            }
            if train_start.is_none() && view.step.is_some_and(|s| s >= 1) {
                train_start = Some(now);
                last_event = format!(
                    "training started: tokenizer trained on the first {} rows, vocab ≤ {}",
                    cfg.tokenizer.bootstrap_rows, cfg.model.vocab_size
                );
                say(last_event.clone());
            }
        }
        if train_start.is_some() && now >= next_diag {
            next_diag = now + Duration::from_secs(2);
            if let Some(v) = data(d.call("diagnostics", Value::Null)) {
                alpha = alphas(&v);
            }
        }
        if let Some(ts) = train_start {
            let end = start + total;
            let f = now.duration_since(ts).as_secs_f64()
                / end.duration_since(ts).as_secs_f64().max(1e-9);
            for &(_, a) in due(exercised.len(), f) {
                let e = actions.perform(&d, a, start.elapsed().as_secs_f64());
                say(format!(
                    "{}{}",
                    if e.ok { "" } else { "FAILED: " },
                    e.detail
                ));
                last_event = e.detail.clone();
                exercised.push(e);
            }
        }
        let line = render(&view, &alpha, producer.files, &last_event);
        progress.update(now.duration_since(start), phase_name, line.clone());
        if !progress.is_drawn() && now >= next_line {
            next_line = now + Duration::from_secs(10);
            println!("[{}] {}", mmss(start.elapsed()), line.replace('\n', " · "));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    progress.finish();
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    let mut final_eval = None;
    if train_start.is_some() && !interrupted {
        // Training started late: the actions not reached still run, in order.
        for &(_, a) in &TIMELINE[exercised.len()..] {
            let e = actions.perform(&d, a, start.elapsed().as_secs_f64());
            say(e.detail.clone());
            exercised.push(e);
        }
        final_eval = data(d.call("eval", Value::Null));
    }
    if let Some(s) = data(d.call("status", Value::Null)) {
        view = View::from_status(&s);
    }
    let ran_s = start.elapsed().as_secs_f64();
    let (daemon_exit, daemon_clean) =
        match d.shutdown(Duration::from_secs(cfg.daemon.shutdown_timeout_s + 15)) {
            Ok(st) if st.success() => (
                "stopped in order, final checkpoint written (exit 0)".to_string(),
                true,
            ),
            Ok(st) => (format!("stopped with {st}"), false),
            Err(e) => (format!("{e:#}"), false),
        };
    let report = write_report(&cfg, &data_dir.join("report")).map_err(|e| e.to_string());
    Ok(Summary {
        data_dir,
        config: cfg_path,
        log: d.log.clone(),
        ran_s,
        interrupted,
        fed_from,
        files: producer.files,
        rows: producer.rows,
        last: view,
        final_eval,
        exercised,
        generated: actions.generated,
        daemon_exit,
        daemon_clean,
        report,
    })
}

fn mmss(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_dir_is_made_and_marked() {
        let t = tempfile::tempdir().unwrap();
        let d = prepare_data_dir(&t.path().join("demo"), false).unwrap();
        assert!(d.is_absolute());
        assert!(d.join(MARKER).exists());
    }

    #[test]
    fn a_non_empty_dir_is_refused_unless_fresh_and_marked() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("demo");
        prepare_data_dir(&dir, false).unwrap();
        std::fs::write(dir.join("left.txt"), "x").unwrap();
        let e = prepare_data_dir(&dir, false).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--fresh"), "{e}");
        prepare_data_dir(&dir, true).unwrap();
        assert!(!dir.join("left.txt").exists());

        let other = t.path().join("precious");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("keep.txt"), "x").unwrap();
        let e = prepare_data_dir(&other, true).unwrap_err().to_string();
        assert!(e.contains("was not made by `mbtd demo`"), "{e}");
        assert!(other.join("keep.txt").exists());
    }
}
