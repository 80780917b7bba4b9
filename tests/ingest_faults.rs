//! Ingestion under hostile conditions, through the real daemon binary: a full disk, a
//! file appended to in place, a symbolic link in the inbox, and a large file arriving
//! while the model trains.

mod common;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The tests' small model (many steps a second) with a longer settle time.
fn train_cfg() -> String {
    small(&[("ingest.settle_ms", "250")])
}

fn inbox(d: &Daemon) -> PathBuf {
    d.path().join("inbox")
}

fn text_csv(tag: &str, rows: usize) -> Vec<u8> {
    let mut s = String::from("text\n");
    for n in 0..rows {
        s.push_str(&format!("{tag} row number {n}\n"));
    }
    s.into_bytes()
}

/// Written elsewhere, then renamed into the inbox.
fn drop_renamed(d: &Daemon, name: &str, bytes: &[u8]) {
    let staging = d.path().join("staging");
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join(name), bytes).unwrap();
    fs::create_dir_all(inbox(d)).unwrap();
    fs::rename(staging.join(name), inbox(d).join(name)).unwrap();
}

fn count_lines(log: &str, event: &str) -> usize {
    let needle = format!("\"event\":\"{event}\"");
    log.lines().filter(|l| l.contains(&needle)).count()
}

/// Found by a hostile-operator probe: a symbolic link in the inbox got a log line but no
/// sidecar, and stayed in the inbox.
#[test]
fn symlink_in_the_inbox_gets_a_sidecar_and_leaves_the_inbox() {
    let d = Daemon::start("[ingest]\nsettle_ms = 100\nrescan_ms = 200\n");
    let target = d.path().join("elsewhere.csv");
    fs::write(&target, text_csv("linked", 5)).unwrap();
    fs::create_dir_all(inbox(&d)).unwrap();
    std::os::unix::fs::symlink(&target, inbox(&d).join("link.csv")).unwrap();
    let sc = d.wait_for(Duration::from_secs(20), "the link's sidecar", || {
        sidecars(&inbox(&d), ".failed").remove("link.csv")
    });
    assert!(
        sc.reason.as_deref().unwrap().contains("symbolic link"),
        "{sc:?}"
    );
    assert!(inbox(&d).join("link.csv").symlink_metadata().is_err());
    let moved = inbox(&d).join(".failed/link.csv");
    assert!(moved.symlink_metadata().unwrap().file_type().is_symlink());
    // The target is untouched and nothing of it was ingested.
    assert_eq!(fs::read(&target).unwrap(), text_csv("linked", 5));
    assert_eq!(d.section("replay")["rows"].as_u64().unwrap_or(0), 0);
}

/// Found by a hostile-operator probe: a file hard-linked into the inbox gets no
/// close-write event, so it was held as "open for writing" until the 120 s stale mark.
/// It is complete when linked: it must be taken as a renamed-in file is.
#[test]
fn a_file_hard_linked_into_the_inbox_is_taken_at_once() {
    let d = Daemon::start("[ingest]\nsettle_ms = 100\nrescan_ms = 200\n");
    let staged = d.path().join("staged.csv");
    fs::write(&staged, text_csv("linked in", 7)).unwrap();
    fs::create_dir_all(inbox(&d)).unwrap();
    fs::hard_link(&staged, inbox(&d).join("linked.csv")).unwrap();
    let sc = d.wait_for(Duration::from_secs(20), "the linked file's sidecar", || {
        sidecars(&inbox(&d), ".done").remove("linked.csv")
    });
    assert_eq!((sc.rows_accepted, sc.rows_appended), (7, 7));
}

/// Found by a hostile-operator probe: a CSV appended once a second in place was taken
/// after its first row and the rest went to `.done/` unseen. The writer here keeps the
/// file open and appends a row a second for 10 s (far beyond `settle_ms`); every row
/// must be ingested exactly once.
#[test]
fn csv_appended_in_place_every_second_is_ingested_exactly_once() {
    let mut d = Daemon::start("[ingest]\nsettle_ms = 250\nrescan_ms = 200\n");
    fs::create_dir_all(inbox(&d)).unwrap();
    let path = inbox(&d).join("growing.csv");
    let mut f = fs::File::create(&path).unwrap();
    f.write_all(b"text\n").unwrap();
    for i in 0..10 {
        f.write_all(format!("appended row {i}\n").as_bytes())
            .unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        // Still open for writing: it must not have been taken.
        assert!(
            path.exists(),
            "taken after {} rows while its writer had it open",
            i + 1
        );
    }
    drop(f);
    let sc = d.wait_for(Duration::from_secs(30), "the grown file", || {
        sidecars(&inbox(&d), ".done").remove("growing.csv")
    });
    assert_eq!(
        (sc.rows_accepted, sc.rows_appended, sc.rows_already_present),
        (10, 10, 0)
    );
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let mut texts: Vec<String> = all_records(d.path())
        .iter()
        .map(|r| body_text(&r.body))
        .collect();
    texts.sort();
    let want: Vec<String> = (0..10).map(|i| format!("appended row {i}")).collect();
    assert_eq!(texts, want);
}

/// Found by a hostile-operator probe: on a full disk ingestion retried every 100 ms
/// (10 ERROR lines a second), `ctl status` said "watching, waiting_files 0", and the
/// sidecar of the first-time ingestion said `rows_appended 0, rows_already_present 1000`.
/// Now: one log line when blocked, status and a metric say why, the retries back off,
/// and it resumes by itself with every row counted once. (The full disk is injected at
/// the replay store's write layer: `<data>/replay/fault-disk-full`.)
#[cfg(feature = "fault-injection")]
#[test]
fn disk_full_blocks_ingestion_says_why_and_resumes_by_itself() {
    let d = Daemon::start("[ingest]\nsettle_ms = 100\nrescan_ms = 200\n");
    let flag = d
        .path()
        .join("replay")
        .join(mbtd::store::fault::DISK_FULL_FLAG);
    fs::write(&flag, b"").unwrap();
    drop_renamed(&d, "first.csv", &text_csv("first", 1000));
    let blocked = d.wait_for(Duration::from_secs(20), "ingest blocked", || {
        let s = d.section("ingest");
        (s["state"] == "blocked: disk full").then_some(s)
    });
    assert_eq!(blocked["waiting_files"], 1, "{blocked}");
    assert_eq!(blocked["blocked"]["file"], "first.csv", "{blocked}");
    let err = blocked["blocked"]["last_error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(err.contains("space") || err.contains("full"), "{err}");
    assert_eq!(d.metric("ingest_blocked_disk_full"), 1.0);
    // Several back-off periods (1 s, 2 s, 4 s): retries happen, one log line says so.
    std::thread::sleep(Duration::from_secs(5));
    let s = d.section("ingest");
    assert!(
        s["blocked"]["failed_attempts"].as_u64().unwrap() >= 2,
        "{s}"
    );
    assert!(
        s["blocked"]["failed_attempts"].as_u64().unwrap() <= 5,
        "no back-off: {s}"
    );
    let log = d.log_text();
    assert_eq!(count_lines(&log, "ingest_blocked"), 1, "{log}");
    assert!(inbox(&d).join("first.csv").exists());
    assert!(sidecars(&inbox(&d), ".done").is_empty());

    fs::remove_file(&flag).unwrap();
    let sc = d.wait_for(Duration::from_secs(90), "ingest resumed", || {
        sidecars(&inbox(&d), ".done").remove("first.csv")
    });
    assert_eq!(
        (sc.rows_accepted, sc.rows_appended, sc.rows_already_present),
        (1000, 1000, 0)
    );
    let s = d.section("ingest");
    assert_eq!(s["state"], "watching", "{s}");
    assert_eq!(d.metric("ingest_blocked_disk_full"), 0.0);
    assert_eq!(count_lines(&d.log_text(), "ingest_unblocked"), 1);
    assert_eq!(d.section("replay")["rows"].as_u64().unwrap(), 1000);
}

/// Point 8 of the hostile-operator probe: ingestion ran inside the actor the trainer asks
/// for rows, so a large file stopped training for the length of its ingest. Training must
/// keep stepping while a large file is being ingested (no timing threshold: the step
/// count must move several times while the file is still in the inbox).
#[test]
fn training_keeps_stepping_while_a_large_file_ingests() {
    let d = Daemon::start(&train_cfg());
    drop_renamed(&d, "seed.csv", &text_csv("seed", 400));
    d.wait_steps(5, Duration::from_secs(120));
    // About 40 MB of rows, renamed in: taken at once.
    let mut big = String::from("text\n");
    let mut n = 0;
    while big.len() < 40 << 20 {
        big.push_str(&format!(
            "a longer row of the large file number {n} with some padding text to parse\n"
        ));
        n += 1;
    }
    drop_renamed(&d, "big.csv", big.as_bytes());
    let t = Instant::now();
    let mut steps = Vec::new();
    while inbox(&d).join("big.csv").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "big.csv not ingested"
        );
        let s = d.section("trainer")["step"].as_u64().unwrap_or(0);
        if steps.last() != Some(&s) {
            steps.push(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        steps.len() >= 4,
        "the trainer advanced only through steps {steps:?} while big.csv was ingested"
    );
    let sc = d.wait_for(Duration::from_secs(30), "big.csv sidecar", || {
        sidecars(&inbox(&d), ".done").remove("big.csv")
    });
    assert_eq!((sc.rows_accepted, sc.rows_appended), (n, n));
    let _: Value = d.data("status", Value::Null);
}
