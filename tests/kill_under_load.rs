//! `kill -9` (nine times) at seeded random moments while the daemon ingests a steady inbox stream, trains
//! and writes a checkpoint every two steps. `ingest_daemon.rs` kills during ingestion alone
//! (no training) and `checkpoint_daemon.rs` during checkpoint writes on a fixed data set; here
//! all three run at once, and after every kill and at the end: no row twice in the replay
//! store, every row of a finished file present, LATEST verifies, the killed write's `.tmp-`
//! directory gone after the restart; at the end every produced row exactly once.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use mbtd::text::csv_rows::{RowBody, RowKind};
use mbtd::text::csv_write::CsvRowWriter;

fn config() -> String {
    small(&[
        ("model.vocab_size", "300"),
        ("model.max_seq_len", "16"),
        ("optim.warmup_steps", "5"),
        ("training.batch_size", "4"),
        ("training.seq_len", "16"),
        ("eval.every_steps", "25"),
        ("checkpoints.every_steps", "2"),
        ("checkpoints.keep_last", "3"),
        ("checkpoints.keep_daily", "0"),
    ])
}

/// Rows of inbox file `name` (`k` its number): unique texts, three sources.
fn rows_of(name: &str, k: u64, n: u64) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("s{}", k % 3), format!("{name} row {i} of {n}")))
        .collect()
}

/// Writes `rows` as `name` in `staging`, then renames it into `inbox`.
fn drop_file(staging: &Path, inbox: &Path, name: &str, rows: &[(String, String)]) {
    let tmp = staging.join(name);
    let f = std::fs::File::create(&tmp).unwrap();
    let mut w = CsvRowWriter::new(f, RowKind::Text).unwrap();
    for (source, text) in rows {
        w.write(source, &RowBody::Text { text: text.clone() })
            .unwrap();
    }
    w.finish().unwrap();
    std::fs::rename(&tmp, inbox.join(name)).unwrap();
}

/// Every file dropped so far: name → its (source, text) rows.
type Produced = Arc<std::sync::Mutex<HashMap<String, Vec<(String, String)>>>>;

/// The steady stream: a file of 20–59 rows every 40 ms until `stop`.
fn producer(dir: PathBuf, seed: u64, stop: Arc<AtomicBool>, produced: Produced) {
    let (staging, inbox) = (dir.join("staging"), dir.join("inbox"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&inbox).unwrap();
    let mut rng = Rng(seed);
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("p{k:05}.csv");
        let rows = rows_of(&name, k, 20 + rng.below(40));
        produced.lock().unwrap().insert(name.clone(), rows.clone());
        drop_file(&staging, &inbox, &name, &rows);
        k += 1;
        std::thread::sleep(Duration::from_millis(40));
    }
}

/// Checks of a stopped daemon's data dir: LATEST verifies; no row twice; every row of a file
/// with a `.done` sidecar present; nothing in the store that was not produced. Returns the
/// store's row count.
fn check_stopped(dir: &Path, produced: &HashMap<String, Vec<(String, String)>>) -> usize {
    latest_checkpoint_valid(&dir.join("checkpoints")).unwrap();
    let expected: HashMap<&str, &str> = produced
        .values()
        .flatten()
        .map(|(s, t)| (t.as_str(), s.as_str()))
        .collect();
    let mut seen = BTreeSet::new();
    let recs = all_records(dir);
    for r in &recs {
        let text = body_text(&r.body);
        assert_eq!(
            expected.get(text.as_str()).copied(),
            Some(r.source.as_str()),
            "unexpected row {text:?} (source {})",
            r.source
        );
        assert!(
            seen.insert(text.clone()),
            "row twice in the store: {text:?}"
        );
    }
    for (name, sc) in sidecars(&dir.join("inbox"), ".done") {
        let rows = &produced[&name];
        assert_eq!(sc.rows_accepted, rows.len() as u64, "{name}");
        let missing = rows.iter().filter(|(_, t)| !seen.contains(t)).count();
        assert_eq!(
            missing, 0,
            "{name} is done but {missing} of its rows are missing"
        );
    }
    recs.len()
}

/// The step of the checkpoint LATEST names.
fn latest_step(dir: &Path) -> u64 {
    let root = dir.join("checkpoints");
    let id = std::fs::read_to_string(root.join("LATEST")).unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join(id.trim()).join("manifest.json")).unwrap())
            .unwrap();
    m["step"].as_u64().unwrap()
}

/// The `.tmp-` entries of the checkpoint root.
fn tmp_names(dir: &Path) -> BTreeSet<String> {
    tmp_entries(&dir.join("checkpoints"))
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Moment {
    /// Within 0–20 ms of a 3,000-row file's rename into the inbox.
    Ingestion,
    /// 0–150 ms after a step, at a random point of the step cycle.
    Training,
    /// The moment a `.tmp-<id>` checkpoint directory is seen (a write in progress; not a
    /// `.tmp-del-` directory of a retention delete).
    CheckpointWrite,
}

#[test]
fn kill_9_under_ingestion_training_and_checkpointing_keeps_rows_once_and_latest_valid() {
    let t0 = Instant::now();
    let seed = seed();
    let mut rng = Rng(seed);
    let mut d = Daemon::start(&config());
    let dir = d.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let produced: Produced = Arc::default();
    let stream = {
        let (dir, stop, produced) = (dir.clone(), stop.clone(), produced.clone());
        std::thread::spawn(move || producer(dir, seed ^ 0xfeed, stop, produced))
    };
    // Three kills of each kind, in a seeded order.
    let mut plan = [Moment::Ingestion, Moment::Training, Moment::CheckpointWrite].repeat(3);
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (mut in_flight_files, mut in_flight_ckpts) = (0, 0);
    for (round, moment) in plan.iter().enumerate() {
        // Training runs and a checkpoint exists before any kill.
        d.wait_for(
            Duration::from_secs(30),
            "training with a checkpoint",
            || (d.step() >= 2 && dir.join("checkpoints/LATEST").exists()).then_some(()),
        );
        let step = d.wait_steps(1, Duration::from_secs(30));
        let what = match moment {
            Moment::Ingestion => {
                let name = format!("burst{round}.csv");
                let rows = rows_of(&name, round as u64, 3000);
                produced.lock().unwrap().insert(name.clone(), rows.clone());
                drop_file(&dir.join("staging"), &dir.join("inbox"), &name, &rows);
                std::thread::sleep(Duration::from_millis(rng.below(21)));
                d.kill9();
                let pending = dir.join("inbox").join(&name).exists();
                in_flight_files += pending as usize;
                format!("{name} {}", if pending { "not yet moved" } else { "done" })
            }
            Moment::Training => {
                let delay = rng.below(151);
                std::thread::sleep(Duration::from_millis(delay));
                d.kill9();
                format!("{delay} ms after step {step} was seen")
            }
            Moment::CheckpointWrite => {
                let writing = |dir: &Path| {
                    let t = tmp_names(dir);
                    t.iter().any(|n| !n.starts_with(".tmp-del-")).then_some(t)
                };
                let t = Instant::now();
                while writing(&dir).is_none() && t.elapsed() < Duration::from_secs(5) {
                    std::hint::spin_loop();
                }
                d.kill9();
                let tmp = writing(&dir);
                in_flight_ckpts += tmp.is_some() as usize;
                format!("with checkpoint dirs in progress {tmp:?}")
            }
        };
        let left = tmp_names(&dir);
        let rows = check_stopped(&dir, &produced.lock().unwrap().clone());
        let latest = latest_step(&dir);
        eprintln!("kill {round} ({moment:?}) {what}: {rows} rows stored, LATEST at step {latest}");
        d = d.restart_with(&config());
        d.wait_for(Duration::from_secs(30), "resume", || {
            d.log_text().contains("trainer_resumed").then_some(())
        });
        assert!(!d.log_text().contains("trainer_started_fresh"));
        assert!(d.step() >= latest, "resumed behind LATEST");
        let still = tmp_names(&dir);
        assert!(
            left.is_disjoint(&still),
            "killed checkpoint writes left behind: {:?}",
            left.intersection(&still).collect::<Vec<_>>()
        );
    }
    // The stream stops; everything produced is ingested; a clean stop.
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    let produced = produced.lock().unwrap().clone();
    d.wait_for(Duration::from_secs(60), "a sidecar for every file", || {
        (sidecars(&dir.join("inbox"), ".done").len() == produced.len()).then_some(())
    });
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
    let total: usize = produced.values().map(Vec::len).sum();
    assert_eq!(check_stopped(&dir, &produced), total, "rows in the store");
    let rep = inspect_replay(&dir);
    assert!(rep.ok, "inspect found damage: {rep:?}");
    assert_eq!(rep.rows, total as u64);
    assert_eq!(rep.journal.entries, produced.len());
    let accepted: u64 = sidecars(&dir.join("inbox"), ".done")
        .values()
        .map(|s| s.rows_accepted)
        .sum();
    assert_eq!(accepted, total as u64);
    assert!(tmp_names(&dir).is_empty(), "{:?}", tmp_names(&dir));
    assert!(
        in_flight_ckpts >= 1,
        "no kill landed during a checkpoint write"
    );
    eprintln!(
        "{} files, {total} rows, {} kills ({in_flight_files} with the burst file not yet moved, \
         {in_flight_ckpts} during a checkpoint write), {:.1} s",
        produced.len(),
        plan.len(),
        t0.elapsed().as_secs_f64()
    );
}
