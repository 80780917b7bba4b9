//! Test harness: runs the real `mbtd` binary on a temp data dir and talks to it over its
//! real admin socket.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mbtd::ingest::Sidecar;
use mbtd::store::{InspectReport, Record, ReplayConfig, ReplayStore};
use mbtd::text::csv_rows::RowBody;

mod cluster_setup;
#[allow(unused_imports)]
pub use cluster_setup::{coordinator_key, nodes_toml};

pub const BIN: &str = env!("CARGO_BIN_EXE_mbtd");

/// A daemon process on its own temp data dir; killed on drop.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Environment of every start (fault-injection switches).
    pub env: Vec<(String, String)>,
}

/// The one small test configuration (a d 32, 2 × 2-branch model; see
/// `mbtd::config::preset::SMALL_TOML`) with dotted-key overrides, e.g.
/// `small(&[("model.branches", "3"), ("eval.every_steps", "7")])`.
pub fn small(overrides: &[(&str, &str)]) -> String {
    mbtd::config::preset::small(overrides).unwrap_or_else(|e| panic!("test configuration: {e}"))
}

/// [`small`] with 16-token windows in batches of 4 over a 300-token vocabulary, a learning
/// rate of 0.003 after 5 warm-up steps, availability 0.75, scheduled evaluations every 7
/// steps on a 10 % control set and no daily checkpoints (the short kill-and-resume runs of
/// the checkpoint and packing tests), then `extra`.
pub fn short_windows(extra: &[(&str, &str)]) -> String {
    let base = [
        ("model.vocab_size", "300"),
        ("model.max_seq_len", "16"),
        ("optim.lr", "0.003"),
        ("optim.warmup_steps", "5"),
        ("availability.p", "0.75"),
        ("training.batch_size", "4"),
        ("training.seq_len", "16"),
        ("eval.every_steps", "7"),
        ("replay.control_fraction", "0.1"),
        ("checkpoints.keep_daily", "0"),
    ];
    let all: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
    small(&all)
}

/// Extra TOML appended to the test's config (small timeouts, fast metrics).
pub const BASE_CONFIG: &str = "[logging]\nformat = \"json\"\nlevel = \"info\"\n";

impl Daemon {
    /// Starts `mbtd run` with `config` written to `<dir>/test.toml`, waits for the socket.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    /// [`Daemon::start`] with extra environment variables, kept for restarts.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = Daemon {
            dir,
            child: None,
            log: PathBuf::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.restart_with(config)
    }

    /// Starts (again) on the same dir.
    pub fn restart_with(mut self, config: &str) -> Daemon {
        let cfg = self.dir.path().join("test.toml");
        std::fs::write(&cfg, format!("{BASE_CONFIG}{config}")).unwrap();
        self.log = self.dir.path().join(format!("daemon-{}.log", now_ms()));
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn mbtd");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60));
        self
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mbtd.sock")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until the socket answers `ping`.
    pub fn wait_ready(&self, within: Duration) {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Ok(r) = try_request(&self.socket(), "ping", serde_json::Value::Null)
                && r["ok"] == true
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "daemon not ready within {within:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends one request and returns the final response object (panics on I/O failure).
    pub fn request(&self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        try_request(&self.socket(), cmd, args)
            .unwrap_or_else(|e| panic!("request {cmd} failed: {e}; log:\n{}", self.log_text()))
    }

    /// The `data` of a successful request.
    pub fn data(&self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        let r = self.request(cmd, args);
        assert_eq!(r["ok"], true, "{cmd} failed: {r}");
        r["data"].clone()
    }

    /// Runs `mbtd ctl …` against this daemon.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("ctl")
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run mbtd ctl")
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if t.elapsed() > within {
                panic!(
                    "daemon did not exit within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Polls `f` until it returns Some, or panics after `within`.
    pub fn wait_for<T>(&self, within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let t = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if t.elapsed() > within {
                panic!("timed out waiting for {what}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Sends one request line, reads until the `done` response; returns it.
pub fn try_request(
    socket: &Path,
    cmd: &str,
    args: serde_json::Value,
) -> std::io::Result<serde_json::Value> {
    let line = serde_json::json!({"id": 1, "cmd": cmd, "args": args}).to_string();
    raw_exchange(socket, format!("{line}\n").as_bytes())
}

/// Writes raw bytes and returns the first `done` response.
pub fn raw_exchange(socket: &Path, bytes: &[u8]) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(bytes)?;
    let mut rd = BufReader::new(s);
    loop {
        let mut l = String::new();
        if rd.read_line(&mut l)? == 0 {
            return Err(std::io::Error::other(
                "connection closed before a done response",
            ));
        }
        let v: serde_json::Value = serde_json::from_str(l.trim()).map_err(std::io::Error::other)?;
        if v["done"] == true {
            return Ok(v);
        }
    }
}

impl Daemon {
    /// A section (`trainer`, `checkpoints`, …) of `status`.
    pub fn section(&self, name: &str) -> serde_json::Value {
        self.data("status", serde_json::Value::Null)["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == name)
            .map(|s| s[1].clone())
            .unwrap_or_else(|| panic!("no status section {name}"))
    }

    /// The trainer's step (0 before the model exists).
    pub fn step(&self) -> u64 {
        self.section("trainer")["step"].as_u64().unwrap_or(0)
    }

    /// Waits until `n` more steps are done; returns the step reached.
    pub fn wait_steps(&self, n: u64, within: Duration) -> u64 {
        let start = self.step();
        self.wait_for(within, "training steps", || {
            let s = self.step();
            (s >= start + n).then_some(s)
        })
    }

    /// Waits until the trainer's step is exactly `n` (a run with `training.max_steps = n`).
    pub fn wait_step(&self, n: u64, within: Duration) {
        self.wait_for(within, &format!("step {n}"), || {
            (self.step() == n).then_some(())
        });
    }

    /// Waits until the trainer says it resumed from a checkpoint; its status section.
    pub fn wait_resumed(&self, within: Duration) -> serde_json::Value {
        self.wait_for(within, "resume", || {
            let t = self.section("trainer");
            t["last_event"]
                .as_str()?
                .starts_with("resumed")
                .then_some(t)
        })
    }

    /// Writes `body` beside the inbox and renames it in (a complete file arrives at once).
    pub fn drop_csv(&self, name: &str, body: &str) {
        let tmp = self.path().join(format!(".{name}.part"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, self.path().join("inbox").join(name)).unwrap();
    }

    /// SIGTERM, and the daemon must exit 0 within a minute (the log is shown otherwise).
    pub fn stop_ok(&mut self) {
        self.signal(libc::SIGTERM);
        let st = self.wait_exit(Duration::from_secs(60));
        assert!(st.success(), "exit {st:?}; log:\n{}", self.log_text());
    }

    /// The LATEST checkpoint's manifest, model and optimizer files.
    pub fn latest_files(&self) -> (serde_json::Value, Vec<u8>, Vec<u8>) {
        let root = self.path().join("checkpoints");
        let id = std::fs::read_to_string(root.join("LATEST")).unwrap();
        let dir = root.join(id.trim());
        let m = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        (
            m,
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            std::fs::read(dir.join("optimizer.safetensors")).unwrap(),
        )
    }

    /// A metric's value as f64.
    pub fn metric(&self, name: &str) -> f64 {
        let m = self.data("metrics", serde_json::Value::Null);
        m[name]
            .as_f64()
            .unwrap_or_else(|| panic!("no metric {name} in {m}"))
    }
}

/// Names of leftover `.tmp-*` entries under a checkpoint root.
/// CSV rows `"a plus b is a+b",source` with `a, b < modulus` drawn from an LCG seeded by
/// `seed`; `source(i)` names row `i`'s source.
pub fn sums_csv(seed: u64, rows: usize, modulus: u64, source: impl Fn(usize) -> String) -> String {
    let mut s = String::from("text,source\n");
    let mut x = seed;
    for i in 0..rows {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let (a, b) = ((x >> 33) % modulus, (x >> 45) % modulus);
        s.push_str(&format!("\"{a} plus {b} is {}\",{}\n", a + b, source(i)));
    }
    s
}

pub fn tmp_entries(root: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
        .collect()
}

/// A tiny deterministic generator (SplitMix64); the seed is printed so a failure replays.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn seed() -> u64 {
    let s = std::env::var("MBTD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("MBTD_TEST_SEED={s}");
    s
}

/// Sidecars of `inbox/<sub>/` by original file name (`<name>.json` → `name`).
pub fn sidecars(inbox: &Path, sub: &str) -> BTreeMap<String, Sidecar> {
    let mut m = BTreeMap::new();
    let Ok(rd) = fs::read_dir(inbox.join(sub)) else {
        return m;
    };
    for e in rd {
        let e = e.unwrap();
        let n = e.file_name().into_string().unwrap();
        // Sidecars are written atomically; skip anything else (temp files, data files).
        if let Some(stem) = n.strip_suffix(".json")
            && let Ok(bytes) = fs::read(e.path())
            && let Ok(sc) = serde_json::from_slice::<Sidecar>(&bytes)
        {
            m.insert(stem.to_string(), sc);
        }
    }
    m
}

/// Every record of a (stopped) daemon's replay store, training and control rows (opening
/// the store repairs a torn tail, as the daemon's start does).
pub fn all_records(data_dir: &Path) -> Vec<Record> {
    let (store, _) = ReplayStore::open(&data_dir.join("replay"), &ReplayConfig::default()).unwrap();
    let mut v = store.rows_after(0, usize::MAX).unwrap();
    for g in store.control_groups(0, usize::MAX).unwrap() {
        v.extend(g.records);
    }
    v.sort_by_key(|r| r.seq);
    v
}

/// A row's text as one string (`prompt|response` for instruction rows).
pub fn body_text(b: &RowBody) -> String {
    match b {
        RowBody::Text { text } => text.clone(),
        RowBody::PromptResponse { prompt, response } => format!("{prompt}|{response}"),
    }
}

/// `mbtd inspect replay --json` on a data dir (the daemon may be stopped).
pub fn inspect_replay(data_dir: &Path) -> InspectReport {
    let out = std::process::Command::new(BIN)
        .args(["inspect", "replay", "--json", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "inspect failed: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect output is not a report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `mbtd inspect checkpoint` of the checkpoint `LATEST` names under `root`: `Err` with the
/// tool's output when LATEST is missing or the checkpoint does not verify.
pub fn latest_checkpoint_valid(root: &Path) -> Result<String, String> {
    let id = std::fs::read_to_string(root.join("LATEST"))
        .map_err(|e| format!("no LATEST in {}: {e}", root.display()))?;
    let out = Command::new(BIN)
        .args(["inspect", "checkpoint"])
        .arg(root.join(id.trim()))
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(id.trim().to_string())
    } else {
        Err(format!(
            "checkpoint {} does not verify: {}",
            id.trim(),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}
