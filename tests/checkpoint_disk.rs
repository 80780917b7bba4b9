//! Checkpoints over months: a full disk is a reported state the daemon recovers from,
//! retention bounds the checkpoints' count and bytes over restarts and expansions, a
//! changed model in the config is refused before READY, and what the daemon writes is
//! private to its user.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn csv(prefix: &str, rows: u32) -> String {
    let mut s = String::from("prompt,response,source\n");
    for i in 0..rows {
        s.push_str(&format!(
            "\"{prefix} what is {i} times 3\",\"{}\",m\n",
            i * 3
        ));
    }
    s
}

fn wait_rows(d: &Daemon, n: u64) {
    d.wait_for(Duration::from_secs(60), "rows ingested", || {
        (d.section("replay")["rows"].as_u64() >= Some(n)).then_some(())
    });
}

/// A small filesystem for the checkpoints and the replay store: a tmpfs where this process
/// may mount one (root), else the `fault-injection` build's ENOSPC switches on a plain
/// directory.
struct SmallDisk {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl SmallDisk {
    fn new() -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: getuid(2) has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        let mounted = root
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
                .arg(dir.path())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        eprintln!(
            "checkpoints and replay store on {}",
            if mounted {
                "a 4 MiB tmpfs"
            } else {
                "a plain dir with injected ENOSPC"
            }
        );
        SmallDisk { dir, mounted }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn checkpoints(&self) -> PathBuf {
        self.path().join("checkpoints")
    }

    fn replay(&self) -> PathBuf {
        self.path().join("replay")
    }

    /// The injected-ENOSPC switches of the checkpoint writer and of the replay store.
    fn switches(&self) -> [PathBuf; 2] {
        [
            self.checkpoints()
                .join(mbtd::checkpoint::durable::INJECT_ENOSPC_FILE),
            self.replay().join(mbtd::store::fault::DISK_FULL_FLAG),
        ]
    }

    fn filler(&self) -> PathBuf {
        self.path().join(".filler")
    }

    /// Fills the filesystem (or switches the injected ENOSPC on).
    fn fill(&self) {
        if !self.mounted {
            for switch in self.switches() {
                std::fs::write(switch, b"").unwrap();
            }
            return;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let chunk = vec![7u8; 16 << 10];
        while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
    }

    /// Frees the space again.
    fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
        for switch in self.switches() {
            let _ = std::fs::remove_file(switch);
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}

fn events(d: &Daemon, name: &str) -> usize {
    d.log_text()
        .lines()
        .filter(|l| l.contains(&format!("\"event\":\"{name}\"")))
        .count()
}

#[test]
fn a_full_disk_is_reported_training_goes_on_and_checkpoints_recover() {
    let disk = SmallDisk::new();
    let at = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = small(&[
        ("paths.checkpoints", &at(disk.checkpoints())),
        ("paths.replay", &at(disk.replay())),
        ("checkpoints.every_steps", "20"),
        ("checkpoints.keep_last", "2"),
        ("checkpoints.keep_daily", "0"),
        ("checkpoints.min_free_bytes", "0"),
    ]);
    let mut d = Daemon::start(&config);
    d.drop_csv("a.csv", &csv("a", 300));
    wait_rows(&d, 300);
    d.wait_for(Duration::from_secs(120), "a first checkpoint", || {
        d.section("checkpoints")["last_written"]
            .as_str()
            .map(String::from)
    });
    disk.fill();
    let full_at = Instant::now();
    let step_full = d.step();
    d.wait_for(Duration::from_secs(120), "failing state", || {
        let s = d.section("checkpoints");
        s["state"]
            .as_str()
            .is_some_and(|st| st.starts_with("failing since"))
            .then_some(())
    });
    let written_before = d.metric("checkpoints_total");
    // A file arriving now cannot be stored: ingestion is blocked and says why; the file
    // waits in the inbox.
    d.drop_csv("b.csv", &csv("b", 200));
    let blocked = d.wait_for(Duration::from_secs(60), "ingest blocked", || {
        let s = d.section("ingest");
        (s["state"] == "blocked: disk full").then_some(s)
    });
    assert_eq!(blocked["blocked"]["file"], "b.csv", "{blocked}");
    assert_eq!(d.metric("ingest_blocked_disk_full"), 1.0);
    while full_at.elapsed() < Duration::from_secs(65) {
        let exited = d.child.as_mut().unwrap().try_wait().unwrap();
        assert!(
            exited.is_none(),
            "the daemon exited: {exited:?}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_secs(5));
    }
    let s = d.section("checkpoints");
    let state = s["state"].as_str().unwrap().to_string();
    assert!(state.starts_with("failing since"), "{s}");
    if disk.mounted {
        assert!(state.contains("disk full"), "{s}");
    }
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{s}"
    );
    assert_eq!(d.metric("checkpoint_failing"), 1.0);
    assert!(d.metric("checkpoint_failures_total") >= 1.0);
    assert_eq!(d.metric("checkpoints_total"), written_before);
    assert!(d.step() > step_full + 40, "training went on");
    assert_eq!(
        d.section("replay")["rows"],
        300,
        "nothing stored while the disk is full"
    );
    assert_eq!(d.section("ingest")["state"], "blocked: disk full");
    // LATEST names a checkpoint that exists and verifies; so does the status.
    let latest = latest_checkpoint_valid(&disk.checkpoints()).unwrap();
    assert_eq!(s["latest"], latest.as_str());
    assert_eq!(
        events(&d, "checkpoint_failing"),
        1,
        "one line per state change"
    );
    let text = String::from_utf8(d.ctl(&["status"]).stdout).unwrap();
    assert!(text.contains("failing since"), "{text}");

    disk.free();
    let recovered = d.wait_for(Duration::from_secs(200), "recovery", || {
        let s = d.section("checkpoints");
        (s["state"] == "ok").then_some(s)
    });
    assert_eq!(d.metric("checkpoint_failing"), 0.0);
    assert!(d.metric("checkpoints_total") > written_before);
    assert_eq!(events(&d, "checkpoint_recovered"), 1);
    let latest = latest_checkpoint_valid(&disk.checkpoints()).unwrap();
    assert_eq!(recovered["latest"], latest.as_str());
    // The last error stays visible after recovery.
    assert!(recovered["last_error"].as_str().is_some(), "{recovered}");
    // Ingestion resumed by itself: the waiting file is stored and the block is lifted.
    wait_rows(&d, 500);
    let inbox = d.path().join("inbox");
    d.wait_for(Duration::from_secs(60), "b.csv done", || {
        sidecars(&inbox, ".done")
            .contains_key("b.csv")
            .then_some(())
    });
    d.wait_for(Duration::from_secs(10), "the block lifted", || {
        (d.metric("ingest_blocked_disk_full") == 0.0).then_some(())
    });
    assert!(d.section("ingest")["blocked"].is_null());

    // A final checkpoint that cannot be written makes the exit non-zero and says what is lost.
    d.wait_steps(5, Duration::from_secs(60));
    disk.fill();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "exit {status:?}");
    let log = d.log_text();
    assert!(log.contains("steps of training since"), "{log}");
    disk.free();

    // No accepted row lost or duplicated.
    let records = all_records(disk.path());
    let texts: BTreeSet<String> = records.iter().map(|r| body_text(&r.body)).collect();
    assert_eq!(records.len(), 500);
    assert_eq!(texts.len(), 500);
}

/// Counts and bytes of the checkpoint directories under `root`.
fn on_disk(root: &Path) -> (usize, u64, Vec<Value>) {
    let l = mbtd::checkpoint::list(root).unwrap();
    let bytes = l.checkpoints.iter().map(|c| c.bytes).sum();
    let rows = l
        .checkpoints
        .iter()
        .map(|c| json!({"id": c.id, "tag": c.tag, "bytes": c.bytes, "latest": c.is_latest}))
        .collect();
    (l.checkpoints.len(), bytes, rows)
}

fn in_progress(d: &Daemon) -> bool {
    !d.section("trainer")["governor_expansion"].is_null()
}

#[test]
fn retention_bounds_checkpoints_over_restarts_and_expansions() {
    const KEEP_LAST: usize = 3;
    const KEEP_DECIDED: usize = 1;
    let base = |max_bytes: u64, max_steps: u64| {
        small(&[
            ("checkpoints.every_steps", "15"),
            ("checkpoints.keep_last", &KEEP_LAST.to_string()),
            ("checkpoints.keep_daily", "0"),
            ("checkpoints.keep_tagged", "2"),
            (
                "checkpoints.keep_decided_pre_expand",
                &KEEP_DECIDED.to_string(),
            ),
            ("checkpoints.max_bytes", &max_bytes.to_string()),
            ("checkpoints.min_free_bytes", "0"),
            ("training.max_steps", &max_steps.to_string()),
            ("eval.every_steps", "5"),
            ("governor.ramp_steps", "5"),
            ("governor.probation_steps", "10"),
            ("governor.cooldown_steps", "0"),
        ])
    };
    let mut d = Daemon::start(&base(0, 0));
    d.drop_csv("a.csv", &csv("a", 300));
    wait_rows(&d, 300);
    d.wait_steps(5, Duration::from_secs(60));
    let size = d.data("checkpoint", Value::Null)["bytes"].as_u64().unwrap();
    let max_bytes = 7 * size;
    let root = d.path().join("checkpoints");

    // Operator tags: validated, kept, deletable; LATEST is not deletable.
    for bad in ["../../evil", "shutdown", "a b", &"x".repeat(100)] {
        let r = d.request("checkpoint", json!({ "tag": bad }));
        assert_eq!(r["ok"], false, "{bad}: {r}");
    }
    let tagged = d.data("checkpoint", json!({"tag": "before-test"}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = d.request("checkpoint-delete", json!({"target": tagged}));
    assert_eq!(r["ok"], false, "LATEST is protected: {r}");
    d.wait_steps(20, Duration::from_secs(60));
    d.data("checkpoint", Value::Null);
    d.data("checkpoint", Value::Null);
    let out = d.ctl(&["checkpoint", "delete", "before-test"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!root.join(&tagged).exists());

    let mut expansions = 0;
    let mut rolled_back = 0;
    let mut rejected_checked = false;
    let mut last_step = 0;
    for restart in 0..20 {
        d = stop_and_restart(d, &base(max_bytes, 0));
        let step = d.wait_steps(10, Duration::from_secs(60));
        assert!(
            step > last_step || rolled_back > 0,
            "training between restarts"
        );
        last_step = step;
        if restart % 3 == 1 && expansions < 5 {
            if in_progress(&d) {
                d.data("rollback", json!({"target": "pre-expand"}));
                rolled_back += 1;
            }
            if !rejected_checked {
                // A refused expansion writes no checkpoint (paused: no periodic ones either).
                d.data("pause", Value::Null);
                // A periodic checkpoint snapshotted before the pause may still be being
                // written: wait until the count and the directory are still.
                let still = || (d.metric("checkpoints_total"), on_disk(&root).2);
                let (before, ids_before) =
                    d.wait_for(Duration::from_secs(30), "writes settle", || {
                        let a = still();
                        std::thread::sleep(Duration::from_millis(300));
                        (still() == a).then_some(a)
                    });
                let r = d.request("expand", json!({"layer": 0, "branches": 1, "noise": -1.0}));
                assert_eq!(r["ok"], false, "{r}");
                assert_eq!(d.metric("checkpoints_total"), before);
                assert_eq!(on_disk(&root).2, ids_before);
                d.data("resume", Value::Null);
                rejected_checked = true;
            }
            let r = d.data("expand", json!({"layer": expansions % 2, "branches": 1}));
            assert!(r["pre_expand_checkpoint"].is_string(), "{r}");
            expansions += 1;
            if expansions % 2 == 1 {
                d.wait_steps(3, Duration::from_secs(60));
                d.data("rollback", json!({"target": "pre-expand"}));
                rolled_back += 1;
            }
        }
        d.wait_steps(10, Duration::from_secs(60));
        // Measured at rest: while a checkpoint is being written, the new one is on disk
        // before retention makes room after it.
        d.data("pause", Value::Null);
        std::thread::sleep(Duration::from_millis(500));
        let (n, bytes, rows) = on_disk(&root);
        d.data("resume", Value::Null);
        // keep_last + newest shutdown + decided pre-expand + LATEST, its parent and one
        // undecided pre-expand (README "Checkpoints").
        let bound = KEEP_LAST + 1 + KEEP_DECIDED + 3;
        assert!(n <= bound, "restart {restart}: {n} > {bound}: {rows:#?}");
        assert!(
            bytes <= max_bytes,
            "restart {restart}: {bytes} > {max_bytes}: {rows:#?}"
        );
        assert_eq!(d.section("checkpoints")["over_budget"], false);
    }
    assert_eq!(expansions, 5);
    assert!(rolled_back >= 3);

    // Nothing trained since the last shutdown: no second, identical shutdown checkpoint.
    let reached = d.step();
    d = stop_and_restart(d, &base(max_bytes, reached));
    let shutdowns = |root: &Path| -> Vec<String> {
        mbtd::checkpoint::list(root)
            .unwrap()
            .checkpoints
            .into_iter()
            .filter(|c| c.tag.as_deref() == Some("shutdown"))
            .map(|c| c.id)
            .collect()
    };
    let held = d.wait_for(Duration::from_secs(60), "a resumed step", || {
        Some(d.step()).filter(|&s| s > 0)
    });
    assert!(held >= reached);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.step(), held, "training.max_steps holds the step");
    let before = shutdowns(&root);
    d = stop_and_restart(d, &base(max_bytes, reached));
    assert_eq!(shutdowns(&root), before);
    d.stop_ok();
}

fn stop_and_restart(mut d: Daemon, config: &str) -> Daemon {
    d.stop_ok();
    d.restart_with(config)
}

/// Runs `mbtd run` on `dir` expecting it to refuse; returns (exit code, stderr).
fn refused_start(dir: &Path, config: &str, extra: &[&str]) -> (Option<i32>, String) {
    let cfg = dir.join("test.toml");
    std::fs::write(&cfg, format!("{BASE_CONFIG}{config}")).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert!(
                !dir.join("mbtd.sock").exists(),
                "no socket: refused before READY"
            );
            return (st.code(), err);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("mbtd run did not refuse within 60 s");
}

#[test]
fn a_changed_model_is_refused_before_ready_with_exit_2() {
    let model = |d: &str, h: &str| {
        small(&[
            ("model.d_model", d),
            ("model.n_heads", h),
            ("checkpoints.every_steps", "10"),
        ])
    };
    let mut d = Daemon::start(&model("64", "2"));
    d.drop_csv("a.csv", &csv("a", 200));
    wait_rows(&d, 200);
    d.wait_steps(12, Duration::from_secs(60));
    d.stop_ok();
    let step = latest_checkpoint_valid(&d.path().join("checkpoints")).unwrap();

    let (code, err) = refused_start(d.path(), &model("96", "2"), &[]);
    assert_eq!(code, Some(2), "{err}");
    for needle in [
        "model.d_model: checkpoint 64, config 96",
        "--accept-checkpoint-model",
        "--data-dir",
    ] {
        assert!(err.contains(needle), "{needle} missing:\n{err}");
    }
    let (code, err) = refused_start(d.path(), &model("64", "4"), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("model.n_heads: checkpoint 2, config 4"),
        "{err}"
    );
    assert!(
        !err.contains("model.d_model"),
        "only differing fields: {err}"
    );

    // With the flag the daemon runs the checkpoint's architecture and resumes.
    let cfg = d.path().join("test.toml");
    std::fs::write(&cfg, format!("{BASE_CONFIG}{}", model("64", "4"))).unwrap();
    let log = std::fs::File::create(d.path().join("accept.log")).unwrap();
    let child = Command::new(BIN)
        .args(["run", "--accept-checkpoint-model", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(d.path())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    d.child = Some(child);
    d.log = d.path().join("accept.log");
    d.wait_ready(Duration::from_secs(60));
    d.wait_for(
        Duration::from_secs(60),
        "resumed from the checkpoint",
        || (d.step() > 0).then_some(()),
    );
    assert!(!step.is_empty());
    let ck = d.data("checkpoint", Value::Null);
    let m = mbtd::checkpoint::format::read_manifest(
        &d.path()
            .join("checkpoints")
            .join(ck["id"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(m.config["model"]["n_heads"], 2);
    d.stop_ok();
}

#[test]
fn files_the_daemon_writes_are_private_and_an_open_data_dir_is_refused() {
    let mut d = Daemon::start(&small(&[
        ("checkpoints.every_steps", "10"),
        ("metrics.history_every_s", "1"),
    ]));
    d.drop_csv("a.csv", &csv("a", 200));
    wait_rows(&d, 200);
    d.wait_steps(12, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    d.stop_ok();
    let mut seen = 0;
    let mut stack = vec![d.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if dir == d.path() && (name == "test.toml" || name.starts_with("daemon-")) {
                continue; // written by this test
            }
            if name.ends_with(".csv") {
                // The producer's file: moved to .done/ with the mode its writer gave it.
                continue;
            }
            let meta = e.metadata().unwrap();
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", e.path().display());
            seen += 1;
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(seen > 10, "checked {seen} entries");
    for p in ["replay", "checkpoints", "inbox/.done", "metrics.jsonl"] {
        assert!(d.path().join(p).exists(), "{p}");
    }

    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = refused_start(d.path(), &small(&[]), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("chmod go-w"), "{err}");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
}
