//! `mbtd demo` end to end (a short run: the real daemon, the producer, every feature through
//! ctl, the plots) and `mbtd report` on a daemon that ran with the default paths.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run mbtd")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn assert_png(p: &Path) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        p.display()
    );
    assert!(
        bytes.len() > 20_000,
        "{} has only {} bytes",
        p.display(),
        bytes.len()
    );
}

#[test]
fn a_short_demo_exercises_every_feature_and_writes_the_plots() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("demo");
    let o = run(&[
        "demo",
        "--minutes",
        "0.4",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    assert!(
        o.status.success(),
        "demo failed\nstdout:\n{out}\nstderr:\n{err}\ndaemon log tail:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    for needle in [
        "ok     outage: layer 0 branch 1 masked",
        "ok     outage over: layer 0 branch 1 back",
        "ok     expansion: layer 1 now 4 branches (logits bitwise equal at η = 0: yes",
        "ok     checkpoint: ",
        "ok     rollback: back to ",
        "probe logits bitwise equal to the checkpoint's",
        "ok     generate: ",
        "stopped in order, final checkpoint written (exit 0)",
        // The governor's probation may add a rollback of its own in a slow run.
        "events: expansion × 1, rollback × ",
        "outage start × 1, outage end × 1",
        "tagged: pre-expand",
    ] {
        assert!(out.contains(needle), "summary lacks {needle:?}:\n{out}");
    }
    // One generated answer per task, each judged.
    for task in ["arith", "strings", "lookup", "sentences"] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(task)
                && (l.ends_with("right") || l.ends_with("wrong"))),
            "no answer for {task}:\n{out}"
        );
    }
    for png in ["loss.png", "branches.png", "throughput.png"] {
        let p = dir.join("report").join(png);
        assert_png(&p);
        assert!(
            out.contains(&p.display().to_string()),
            "{png} path not printed:\n{out}"
        );
    }
    assert!(dir.join("metrics.jsonl").exists());
    assert!(dir.join("demo.toml").exists());

    // The data dir is left; a second demo on it is refused unless --fresh.
    let o = run(&[
        "demo",
        "--minutes",
        "0.1",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("is not empty") && err.contains("--fresh"),
        "{err}"
    );

    // `mbtd report` redraws the plots from the left data dir.
    let o = run(&[
        "report",
        "--data-dir",
        dir.to_str().unwrap(),
        "--config",
        dir.join("demo.toml").to_str().unwrap(),
        "--out",
        t.path().join("again").to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_png(&t.path().join("again").join("loss.png"));
}

#[test]
fn fresh_refuses_a_directory_the_demo_did_not_make() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("precious.txt"), "keep me").unwrap();
    let o = run(&[
        "demo",
        "--fresh",
        "--minutes",
        "0.1",
        "--data-dir",
        t.path().to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("was not made by `mbtd demo`"), "{err}");
    assert!(t.path().join("precious.txt").exists());
}

#[test]
fn a_bad_real_text_file_is_refused_up_front_naming_file_line_and_field() {
    let t = tempfile::tempdir().unwrap();
    let csv = t.path().join("corpus.csv");
    std::fs::write(&csv, "prompt,response\nhello,world\nwhat,\n").unwrap();
    let dir = t.path().join("demo");
    let o = run(&[
        "demo",
        "--real-text",
        csv.to_str().unwrap(),
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("corpus.csv:3") && err.contains("`response`"),
        "{err}"
    );
    assert!(!dir.exists(), "nothing is started for a bad file");
}

#[test]
fn report_reads_a_daemon_that_ran_with_the_default_paths() {
    let d = Daemon::start(&small(&[
        ("metrics.history_every_s", "1"),
        ("model.vocab_size", "300"),
        ("model.d_model", "16"),
        ("tokenizer.bootstrap_rows", "50"),
        ("training.batch_size", "4"),
    ]));
    let rows: String = (0..80)
        .map(|i| format!("\"row {i} of the test\"\n"))
        .collect();
    let tmp = d.path().join("t.tmp");
    std::fs::write(&tmp, format!("text\n{rows}")).unwrap();
    std::fs::rename(&tmp, d.path().join("inbox").join("t.csv")).unwrap();
    d.wait_steps(5, Duration::from_secs(60));
    d.data("mask", serde_json::json!({"layer": 0, "branch": 1}));
    d.wait_for(Duration::from_secs(30), "history lines", || {
        let h = std::fs::read_to_string(d.path().join("metrics.jsonl")).ok()?;
        (h.lines()
            .filter(|l| l.contains("\"branches_forced_off\":1.0"))
            .count()
            >= 2)
            .then_some(())
    });
    // No --config: the embedded default's paths (metrics.jsonl, checkpoints/) under --data-dir.
    let o = run(&["report", "--data-dir", d.path().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("outage start × 1"), "{out}");
    for png in ["loss.png", "branches.png", "throughput.png"] {
        assert_png(&d.path().join("report").join(png));
    }
}
