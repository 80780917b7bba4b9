//! The replay store stays bounded when training falls behind the inbox: files wait in the
//! inbox (nothing lost) while the store is full of rows not trained on yet, and are taken
//! again once training catches up.

mod common;

use common::{Daemon, sidecars, small};
use serde_json::Value;
use std::fs;
use std::time::Duration;

const MAX_ROWS: u64 = 300;

fn config() -> String {
    small(&[
        ("replay.max_rows", "300"),
        ("replay.control_fraction", "0.15"),
    ])
}

/// A file of `rows` distinct text rows, written elsewhere and renamed into the inbox.
fn drop_file(d: &Daemon, name: &str, rows: usize) {
    let mut s = String::from("text\n");
    for i in 0..rows {
        s.push_str(&format!(
            "{name} row {i} says {} and {}\n",
            i * 7 % 13,
            i % 5
        ));
    }
    let staging = d.path().join("staging");
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join(name), s).unwrap();
    fs::rename(staging.join(name), d.path().join("inbox").join(name)).unwrap();
}

fn ingest(d: &Daemon) -> Value {
    d.section("ingest")
}

#[test]
fn files_wait_in_the_inbox_while_the_store_is_full_of_untrained_rows() {
    let d = Daemon::start(&config());
    drop_file(&d, "first.csv", 150);
    // A few steps, so that the trainer has consumed rows (before that there is always room).
    d.wait_steps(5, Duration::from_secs(120));
    let out = d.ctl(&["pause"]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..4 {
        drop_file(&d, &format!("later{i}.csv"), 100);
    }
    let held = d.wait_for(Duration::from_secs(20), "ingestion held back", || {
        let s = ingest(&d);
        s["state"]
            .as_str()
            .is_some_and(|t| t.starts_with("held back"))
            .then_some(s)
    });
    // The check comes before each file, so one file can overshoot the bound.
    let rows = d.metric("replay_rows") as u64;
    assert!(
        (MAX_ROWS..MAX_ROWS + 100).contains(&rows),
        "store at {rows} rows, bound {MAX_ROWS}"
    );
    assert!(held["waiting_files"].as_u64().unwrap() >= 1, "{held}");
    assert_eq!(held["held_back"]["max_rows"], MAX_ROWS, "{held}");
    assert!(
        held["held_back"]["untrained_rows"].as_u64().unwrap() > 0,
        "{held}"
    );
    assert_eq!(d.metric("ingest_held_back"), 1.0);
    std::thread::sleep(Duration::from_millis(800));
    let inbox = d.path().join("inbox");
    let waiting = (0..4)
        .filter(|i| inbox.join(format!("later{i}.csv")).is_file())
        .count();
    assert!(waiting >= 1, "files still wait in the inbox");
    assert_eq!(
        d.metric("replay_rows") as u64,
        rows,
        "nothing taken while held"
    );

    let out = d.ctl(&["resume"]);
    assert!(out.status.success(), "{out:?}");
    // The replay actor writes a file's sidecar before the ingestor counts its rows, so
    // the last file's rows may be counted a moment after its sidecar appears.
    d.wait_for(
        Duration::from_secs(120),
        "every file ingested and counted",
        || {
            (sidecars(&inbox, ".done").len() == 5 && d.metric("ingest_rows_total") as u64 >= 550)
                .then_some(())
        },
    );
    assert_eq!(d.metric("ingest_rows_total") as u64, 550, "no row lost");
    let log = d.log_text();
    assert!(log.contains("ingest_held_back") && log.contains("ingest_hold_released"));
}
