//! Durable ingestion through the real daemon binary: exactly-once under `kill -9`, the
//! bad-input corpus (`tests/data/ingest/`, see its README), pause/resume of ingestion and
//! the ingest metrics.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use mbtd::ingest::Outcome;
use serde_json::Value;

/// Small timings: a file written in place is taken after 250 ms without change (long
/// enough that a loaded 2-core machine never lets a half-written file look settled).
const CFG: &str = "[ingest]\nsettle_ms = 250\nrescan_ms = 200\n";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn inbox(d: &Daemon) -> PathBuf {
    d.path().join("inbox")
}

/// A staging directory on the same file system as the inbox (for write-then-rename).
fn staging(d: &Daemon) -> PathBuf {
    let p = d.path().join("staging");
    fs::create_dir_all(&p).unwrap();
    p
}

/// Producer style 1: written elsewhere, then renamed into the inbox.
fn drop_renamed(d: &Daemon, name: &str, bytes: &[u8]) {
    let tmp = staging(d).join(name);
    fs::write(&tmp, bytes).unwrap();
    fs::create_dir_all(inbox(d)).unwrap();
    fs::rename(&tmp, inbox(d).join(name)).unwrap();
}

/// Producer style 2: written in place (one `write` call), picked up once settled.
fn drop_in_place(d: &Daemon, name: &str, bytes: &[u8]) {
    fs::create_dir_all(inbox(d)).unwrap();
    let mut f = fs::File::create(inbox(d).join(name)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Names in a directory (empty when it does not exist).
fn names_in(dir: &Path) -> BTreeSet<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

fn done_and_failed(d: &Daemon) -> usize {
    sidecars(&inbox(d), ".done").len() + sidecars(&inbox(d), ".failed").len()
}

/// Asserts every actor of the daemon runs and none was ever restarted.
fn assert_all_running_no_restarts(d: &Daemon) {
    let s = d.data("status", Value::Null);
    let actors = s["actors"].as_array().unwrap();
    assert!(actors.len() >= 4, "{s}");
    for a in actors {
        assert_eq!(a["state"], "running", "{s}");
        assert_eq!(a["restarts"], 0, "{s}");
    }
}

/// Graceful stop (SIGTERM: the same ordered stop as `ctl shutdown`, whose reply can be lost
/// when the daemon exits before the admin connection writes it); the daemon must exit 0.
fn shutdown(d: &mut Daemon) {
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "log:\n{}", d.log_text());
}

// ---------------------------------------------------------------------------------------
// 1. Exactly-once under kill -9
// ---------------------------------------------------------------------------------------

/// One generated inbox file and what must come of it.
struct GenFile {
    name: String,
    bytes: Vec<u8>,
    /// Valid rows: (line, source, body text as `body_text` renders it).
    valid: Vec<(u64, String, String)>,
    /// Lines of the rows that must be rejected.
    rejected: Vec<u64>,
}

/// File `i`: `rows` valid rows with unique text `row-<i>-<n>`, a few invalid rows when
/// `bad`, an embedded newline now and then, long rows when `pad` (so the file is over the
/// store's 1 MiB write buffer and a kill can leave part of it on disk uncommitted).
fn gen_file(i: usize, rows: u64, bad: bool, prompt_response: bool, pad: usize) -> GenFile {
    let name = format!("f{i:02}.csv");
    let mut s = String::new();
    let mut valid = Vec::new();
    let mut rejected = Vec::new();
    let mut line = 1u64;
    s.push_str(if prompt_response {
        "prompt,response,source\n"
    } else {
        "text,source\n"
    });
    let padding = "x".repeat(pad);
    for n in 0..rows {
        line += 1;
        // Three fields where the header has two or three (a parse error), and a blank
        // required field.
        let faults = [
            (97, 13, "a,b,c,d\n", "a,b,c\n"),
            (131, 50, "p,  ,s\n", "  ,s\n"),
        ];
        for (every, at, pr, text) in faults {
            if bad && n % every == at {
                s.push_str(if prompt_response { pr } else { text });
                rejected.push(line);
                line += 1;
            }
        }
        let src = format!("src-{}", i % 4);
        let mut text = format!("row-{i}-{n}");
        if !padding.is_empty() {
            text.push(' ');
            text.push_str(&padding);
        }
        let multiline = n % 89 == 7;
        if multiline {
            text.push_str("\nsecond line, with a comma");
        }
        if prompt_response {
            s.push_str(&format!("\"p-{i}-{n}\",\"{text}\",{src}\n"));
            valid.push((line, src, format!("p-{i}-{n}|{text}")));
        } else {
            s.push_str(&format!("\"{text}\",{src}\n"));
            valid.push((line, src, text));
        }
        if multiline {
            line += 1;
        }
    }
    GenFile {
        name,
        bytes: s.into_bytes(),
        valid,
        rejected,
    }
}

fn gen_files(rng: &mut Rng) -> Vec<GenFile> {
    (0..20)
        .map(|i| {
            let rows = 200 + rng.below(1801);
            let pad = if i % 7 == 3 { 1500 } else { 0 };
            let rows = if pad > 0 { 2000 } else { rows };
            gen_file(i, rows, i % 3 == 0, i % 5 == 4, pad)
        })
        .collect()
}

/// (bytes of all segments, bytes of the journal) of the replay store.
fn store_sizes(data_dir: &Path) -> (u64, u64) {
    let (mut seg, mut journal) = (0, 0);
    if let Ok(rd) = fs::read_dir(data_dir.join("replay")) {
        for e in rd.flatten() {
            let n = e.file_name().into_string().unwrap_or_default();
            let len = e.metadata().map_or(0, |m| m.len());
            if n == "journal.log" {
                journal = len;
            } else if n.starts_with("seg-") {
                seg += len;
            }
        }
    }
    (seg, journal)
}

/// Kills the daemon the moment segment bytes grow while the journal does not, i.e. rows of
/// a file are on disk but the file is not committed yet (a store write-buffer flush in the
/// middle of a large file, or the commit's flush before its journal entry). Returns whether
/// that moment was caught (else it kills once all `dropped` files are done, or at `within`).
fn kill_mid_append(d: &mut Daemon, dropped: usize, within: Duration) -> bool {
    let t = Instant::now();
    let (mut seg0, mut j0) = store_sizes(d.path());
    let mut polls = 0u64;
    while t.elapsed() < within {
        let (seg, j) = store_sizes(d.path());
        if j != j0 {
            // A commit happened: new baseline, segments read after the journal.
            j0 = j;
            seg0 = store_sizes(d.path()).0;
            continue;
        }
        if seg > seg0 {
            d.kill9();
            return true;
        }
        polls += 1;
        if polls.is_multiple_of(64) && done_and_failed(d) >= dropped {
            break; // nothing left to catch
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    d.kill9();
    false
}

#[test]
fn exactly_once_under_repeated_kill_9() {
    let t0 = Instant::now();
    let mut rng = Rng(seed());
    let files = gen_files(&mut rng);
    let mut d = Daemon::start(CFG);
    // Files not dropped yet; `dropped` counts the others.
    let mut queue: std::collections::VecDeque<usize> = (0..files.len()).collect();
    let mut dropped = 0usize;
    let mut kills = 0;
    let mut caught_mid_append = 0;
    // Six rounds: drop a batch (mixed producer styles); kill -9 either at a random moment
    // after the daemon has moved a file or two of it, or (odd rounds, a large file first in
    // the batch) at the moment rows of an uncommitted file reach the disk; drop another
    // file while it is down; restart on the same directory.
    for round in 0..6 {
        let mid_append = round % 2 == 1;
        if mid_append && let Some(pos) = queue.iter().position(|&i| files[i].bytes.len() > 2 << 20)
        {
            let big = queue.remove(pos).unwrap();
            queue.push_front(big);
        }
        let batch = 2 + rng.below(2) as usize;
        let target_done = dropped + 1 + rng.below(2) as usize;
        for _ in 0..batch {
            let Some(i) = queue.pop_front() else { break };
            let f = &files[i];
            if rng.below(3) == 0 {
                drop_in_place(&d, &f.name, &f.bytes);
            } else {
                drop_renamed(&d, &f.name, &f.bytes);
            }
            dropped += 1;
        }
        let how = if mid_append {
            let caught = kill_mid_append(&mut d, dropped, Duration::from_secs(10));
            caught_mid_append += caught as usize;
            if caught {
                "mid-append"
            } else {
                "mid-append missed"
            }
        } else {
            let target_done = target_done.min(dropped);
            d.wait_for(Duration::from_secs(30), "files moved before a kill", || {
                (done_and_failed(&d) >= target_done).then_some(())
            });
            std::thread::sleep(Duration::from_millis(rng.below(25)));
            d.kill9();
            "random"
        };
        kills += 1;
        let done_at_kill = done_and_failed(&d);
        if let Some(i) = queue.pop_front() {
            let f = &files[i];
            drop_renamed(&d, &f.name, &f.bytes);
            dropped += 1;
        }
        eprintln!(
            "round {round}: killed ({how}) with {done_at_kill} of {dropped} dropped files done"
        );
        d = d.restart_with(CFG);
        if round == 2 {
            // A kill right after start-up, while the start-up scan takes the backlog.
            std::thread::sleep(Duration::from_millis(rng.below(60)));
            d.kill9();
            kills += 1;
            d = d.restart_with(CFG);
        }
    }
    // The rest arrive while the daemon runs undisturbed.
    while let Some(i) = queue.pop_front() {
        let f = &files[i];
        if i % 2 == 0 {
            drop_in_place(&d, &f.name, &f.bytes);
        } else {
            drop_renamed(&d, &f.name, &f.bytes);
        }
    }
    d.wait_for(Duration::from_secs(60), "a sidecar for every file", || {
        (sidecars(&inbox(&d), ".done").len() == files.len()).then_some(())
    });
    assert_all_running_no_restarts(&d);
    shutdown(&mut d);

    // No file left in the inbox, nothing failed, each file once in .done with its sidecar.
    let inbox = inbox(&d);
    assert_eq!(
        names_in(&inbox),
        BTreeSet::from([".done".to_string()]),
        "inbox not empty"
    );
    let expected_done: BTreeSet<String> = files
        .iter()
        .flat_map(|f| [f.name.clone(), format!("{}.json", f.name)])
        .collect();
    assert_eq!(names_in(&inbox.join(".done")), expected_done);
    let scs = sidecars(&inbox, ".done");
    let mut resumed = 0;
    for f in &files {
        assert_eq!(
            fs::read(inbox.join(".done").join(&f.name)).unwrap(),
            f.bytes,
            "{} changed on its way to .done",
            f.name
        );
        let sc = &scs[&f.name];
        assert_eq!(sc.outcome, Outcome::Done, "{}", f.name);
        assert_eq!(sc.file, f.name);
        assert_eq!(sc.rows_accepted, f.valid.len() as u64, "{}", f.name);
        assert_eq!(
            sc.rows_appended + sc.rows_already_present,
            sc.rows_accepted,
            "{}",
            f.name
        );
        assert_eq!(sc.rows_rejected, f.rejected.len() as u64, "{}", f.name);
        let lines: Vec<u64> = sc.rejections.iter().map(|r| r.line).collect();
        assert_eq!(lines, f.rejected, "{}", f.name);
        assert_eq!(
            sc.content_hash.as_deref(),
            Some(blake3::hash(&f.bytes).to_hex().as_str()),
            "{}",
            f.name
        );
        resumed += (sc.rows_already_present > 0) as usize;
    }

    // The store, read-only first: every CRC verifies, the counts are those of the files.
    let total: usize = files.iter().map(|f| f.valid.len()).sum();
    let rep = inspect_replay(d.path());
    assert!(rep.ok, "inspect found damage: {rep:?}");
    assert_eq!(rep.rows, total as u64);
    assert_eq!(rep.journal.entries, files.len());
    assert_eq!(
        rep.by_source.values().map(|c| c.rows).sum::<u64>(),
        total as u64
    );
    for k in 0..4 {
        let want = files
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 4 == k)
            .map(|(_, f)| f.valid.len() as u64)
            .sum::<u64>();
        assert_eq!(rep.by_source[&format!("src-{k}")].rows, want);
    }

    // Then every row: each valid row exactly once, nothing else.
    let recs = all_records(d.path());
    let mut seen: HashMap<String, (u64, String, usize)> = HashMap::new();
    for r in &recs {
        let e = seen
            .entry(body_text(&r.body))
            .or_insert((r.row, r.source.clone(), 0));
        e.2 += 1;
    }
    let dups: Vec<&String> = seen
        .iter()
        .filter(|(_, v)| v.2 > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(
        dups.is_empty(),
        "{} duplicated rows, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(5)]
    );
    let mut missing = Vec::new();
    for f in &files {
        for (line, src, text) in &f.valid {
            match seen.remove(text) {
                Some((row, source, _)) => {
                    assert_eq!((row, &source), (*line, src), "{}: {text:.40}", f.name)
                }
                None => missing.push(text.clone()),
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} rows missing, e.g. {:.60?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(seen.is_empty(), "{} unexpected rows", seen.len());
    assert_eq!(recs.len(), total);
    assert!(
        caught_mid_append >= 1,
        "no kill landed while rows of an uncommitted file were on disk"
    );
    eprintln!(
        "exactly-once: {} files, {total} rows, {kills} kills ({caught_mid_append} caught \
         mid-append), {resumed} files resumed with rows already present, {:.1} s",
        files.len(),
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// 2. The bad-input corpus through the daemon
// ---------------------------------------------------------------------------------------

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ingest")
}

/// (outcome, rows accepted, rejected lines, reason fragment) per the corpus README.
fn corpus_expectations() -> BTreeMap<&'static str, (Outcome, u64, Vec<u64>, &'static str)> {
    use Outcome::{Done, Failed};
    BTreeMap::from([
        ("good_text.csv", (Done, 3, vec![], "")),
        (
            "wrong_header.csv",
            (Failed, 0, vec![], "columns found: [id, body, author]"),
        ),
        (
            "ambiguous_header.csv",
            (Failed, 0, vec![], "both a `text` column"),
        ),
        ("binary_junk.csv", (Failed, 0, vec![], "not valid UTF-8")),
        (
            "header_not_utf8.csv",
            (Failed, 0, vec![], "header column 1 is not valid UTF-8"),
        ),
        ("invalid_utf8_rows.csv", (Done, 3, vec![3, 5], "")),
        ("crlf.csv", (Done, 3, vec![], "")),
        ("quoted_newlines.csv", (Done, 4, vec![7, 9, 10], "")),
        ("empty.csv", (Failed, 0, vec![], "is empty")),
        ("header_only.csv", (Done, 0, vec![], "")),
        ("huge_row.csv", (Done, 3, vec![3], "")),
        (
            "zero_bytes.csv",
            (Failed, 0, vec![], "empty file (0 bytes)"),
        ),
        // Made by the test, in place.
        (
            "made_empty.csv",
            (Failed, 0, vec![], "empty file (0 bytes)"),
        ),
    ])
}

#[test]
fn bad_input_corpus_through_the_daemon() {
    let mut d = Daemon::start(&format!("{CFG}max_row_bytes = 65536\n"));
    let inbox = inbox(&d);
    let expect = corpus_expectations();
    // Ignored names and a directory first, so that they sit there through every scan.
    fs::create_dir_all(inbox.join("x.csv")).unwrap();
    fs::write(inbox.join("x.csv/inner.csv"), "text\nnot to be read\n").unwrap();
    let ignored = [".hidden.csv", "upload.csv.tmp", "big.csv.part"];
    for n in ignored {
        fs::write(inbox.join(n), "text\nshould never be read\n").unwrap();
    }
    std::os::unix::fs::symlink(corpus_dir().join("good_text.csv"), inbox.join("link.csv")).unwrap();
    let mut k = 0;
    for e in fs::read_dir(corpus_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !name.ends_with(".csv") {
            continue;
        }
        assert!(
            expect.contains_key(name.as_str()),
            "{name} has no expectation"
        );
        let bytes = fs::read(&p).unwrap();
        if k % 2 == 0 {
            drop_renamed(&d, &name, &bytes);
        } else {
            drop_in_place(&d, &name, &bytes);
        }
        k += 1;
    }
    assert_eq!(k, expect.len() - 1);
    fs::File::create(inbox.join("made_empty.csv")).unwrap();

    // The corpus files and the link (refused with a sidecar in `.failed/`).
    d.wait_for(
        Duration::from_secs(30),
        "every corpus file processed",
        || (done_and_failed(&d) == expect.len() + 1).then_some(()),
    );
    // A few more scans: nothing else must be taken.
    std::thread::sleep(Duration::from_millis(600));
    assert_all_running_no_restarts(&d);

    let done = sidecars(&inbox, ".done");
    let mut failed = sidecars(&inbox, ".failed");
    let link = failed
        .remove("link.csv")
        .expect("link.csv: no sidecar in .failed");
    assert_eq!(link.outcome, Outcome::Failed);
    assert!(
        link.reason
            .as_deref()
            .unwrap_or("")
            .contains("symbolic link"),
        "{link:?}"
    );
    assert_eq!(link.rows_appended, 0);
    for (name, (outcome, accepted, lines, reason)) in &expect {
        let (sc, dir) = match outcome {
            Outcome::Done => (done.get(*name), ".done"),
            Outcome::Failed => (failed.get(*name), ".failed"),
        };
        let sc = sc.unwrap_or_else(|| panic!("{name}: no sidecar in {dir}"));
        assert!(inbox.join(dir).join(name).is_file(), "{name} not in {dir}");
        assert!(!inbox.join(name).exists(), "{name} still in the inbox");
        assert_eq!(sc.outcome, *outcome, "{name}: {:?}", sc.reason);
        assert_eq!(sc.rows_accepted, *accepted, "{name}");
        assert_eq!(sc.rows_appended, *accepted, "{name}");
        let got: Vec<u64> = sc.rejections.iter().map(|r| r.line).collect();
        assert_eq!(&got, lines, "{name}");
        if *outcome == Outcome::Failed {
            let r = sc.reason.as_deref().unwrap_or("");
            assert!(r.contains(reason), "{name}: {r}");
        }
    }
    assert_eq!(done.len() + failed.len(), expect.len());
    assert_eq!(
        done["quoted_newlines.csv"].extra_columns_ignored,
        vec!["note".to_string()]
    );

    // Untouched: the directory and the ignored names. The link left the inbox as it is
    // (a link, its target not read).
    assert!(inbox.join("x.csv").is_dir());
    assert!(inbox.join("x.csv/inner.csv").is_file());
    for n in ignored {
        assert_eq!(
            fs::read_to_string(inbox.join(n)).unwrap(),
            "text\nshould never be read\n",
            "{n}"
        );
    }
    assert!(
        inbox
            .join(".failed/link.csv")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let log = d.log_text();
    let link_failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ingest_file_failed") && l.contains("link.csv"))
        .collect();
    assert_eq!(link_failed.len(), 1, "{link_failed:?}");
    assert!(!log.contains("ingest_refused_entry"), "{log}");
    let mut left = names_in(&inbox);
    left.remove(".done");
    left.remove(".failed");
    let mut want: BTreeSet<String> = ignored.iter().map(|s| s.to_string()).collect();
    want.insert("x.csv".to_string());
    assert_eq!(left, want);

    let status = d.data("status", Value::Null);
    let section = |n: &str| {
        status["sections"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s[0] == n).map(|s| s[1].clone()))
            .unwrap_or_else(|| status[n].clone())
    };
    let ingest = section("ingest");
    assert_eq!(ingest["files_done"], 6, "{status}");
    assert_eq!(ingest["files_failed"], 8, "{status}");
    assert_eq!(section("replay")["rows"], 16, "{status}");
    shutdown(&mut d);

    // Valid rows around the bad ones are kept, exactly.
    let recs = all_records(d.path());
    assert_eq!(recs.len(), 16);
    let texts = |source: &str| {
        let mut v: Vec<(u64, String)> = recs
            .iter()
            .filter(|r| r.source == source)
            .map(|r| (r.row, body_text(&r.body)))
            .collect();
        v.sort();
        v.into_iter().map(|x| x.1).collect::<Vec<_>>()
    };
    assert_eq!(
        texts("web"),
        ["valid before", "valid middle", "valid after"]
    );
    assert_eq!(
        texts("crlf"),
        ["row one", "row two\r\nspans lines", "row three"]
    );
    assert_eq!(texts("quoted_newlines"), ["q4|a4"]);
    assert_eq!(texts("huge_row")[1].len(), 59_999);
    assert!(inspect_replay(d.path()).ok);
}

// ---------------------------------------------------------------------------------------
// 3. pause-ingest / resume-ingest
// ---------------------------------------------------------------------------------------

fn small_csv(tag: &str, rows: usize) -> Vec<u8> {
    let mut s = String::from("text\n");
    for n in 0..rows {
        s.push_str(&format!("{tag}-{n}\n"));
    }
    s.into_bytes()
}

fn ingest_state(d: &Daemon) -> String {
    let s = d.data("status", Value::Null);
    let ingest = s["sections"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x[0] == "ingest").map(|x| x[1].clone()))
        .unwrap_or_else(|| s["ingest"].clone());
    ingest["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn pause_ingest_keeps_files_in_the_inbox_until_resume() {
    let d = Daemon::start(CFG);
    let out = d.ctl(&["pause-ingest"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ingest_state(&d), "paused");
    drop_renamed(&d, "renamed.csv", &small_csv("renamed", 10));
    drop_in_place(&d, "inplace.csv", &small_csv("inplace", 10));
    // Several rescans and well past the settle time.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(inbox(&d).join("renamed.csv").is_file());
    assert!(inbox(&d).join("inplace.csv").is_file());
    assert_eq!(done_and_failed(&d), 0);
    assert_eq!(ingest_state(&d), "paused");

    let out = d.ctl(&["resume-ingest"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ingest_state(&d), "watching");
    // The sidecar is written before its file moves beside it: wait for both.
    d.wait_for(Duration::from_secs(15), "both files after resume", || {
        let moved = ["renamed.csv", "inplace.csv"]
            .iter()
            .all(|f| !inbox(&d).join(f).exists());
        (moved && sidecars(&inbox(&d), ".done").len() == 2).then_some(())
    });
    let log = d.log_text();
    assert!(log.contains("ingest_paused") && log.contains("ingest_resumed"));
    assert_all_running_no_restarts(&d);
}

// ---------------------------------------------------------------------------------------
// 4. Metrics after ingestion
// ---------------------------------------------------------------------------------------

#[test]
fn ingest_metrics_match_the_files() {
    let d = Daemon::start(CFG);
    let a = gen_file(0, 300, true, false, 0);
    let b = gen_file(1, 250, false, true, 0);
    let c = gen_file(2, 120, true, true, 0);
    drop_renamed(&d, &a.name, &a.bytes);
    drop_in_place(&d, &b.name, &b.bytes);
    drop_renamed(&d, &c.name, &c.bytes);
    drop_renamed(&d, "bad_header.csv", b"id,body\n1,x\n");
    d.wait_for(Duration::from_secs(20), "four sidecars", || {
        (done_and_failed(&d) == 4).then_some(())
    });
    let rows = (a.valid.len() + b.valid.len() + c.valid.len()) as u64;
    let rejected = (a.rejected.len() + b.rejected.len() + c.rejected.len()) as u64;
    // The metrics and status are updated after the move; allow a moment.
    let m = d.wait_for(Duration::from_secs(5), "metrics caught up", || {
        let m = d.data("metrics", Value::Null);
        (m["ingest_files_total{outcome=\"done\"}"] == 3
            && m["ingest_files_total{outcome=\"failed\"}"] == 1)
            .then_some(m)
    });
    assert_eq!(m["ingest_rows_total"], rows, "{m}");
    assert_eq!(m["ingest_rows_rejected_total"], rejected, "{m}");
    assert_eq!(m["replay_rows"].as_f64(), Some(rows as f64), "{m}");
    let bytes = (a.bytes.len() + b.bytes.len() + c.bytes.len() + 12) as u64;
    assert_eq!(m["ingest_bytes_total"], bytes, "{m}");
    let status = d.data("status", Value::Null);
    let text = status.to_string();
    assert!(text.contains("\"files_done\":3"), "{text}");
    // The human `ctl metrics` lists the same names.
    let out = d.ctl(&["metrics"]);
    assert!(out.status.success(), "{out:?}");
    let human = String::from_utf8_lossy(&out.stdout);
    for name in ["ingest_rows_total", "ingest_files_total", "replay_rows"] {
        assert!(human.contains(name), "{human}");
    }
}

/// A pause asked while the daemon works through a backlog takes effect after the file in
/// hand, not after the whole backlog: the reply is prompt and the rest stays in the inbox.
#[test]
fn pause_during_a_backlog_stops_after_the_file_in_hand() {
    let d = Daemon::start(CFG);
    let n = 40;
    let files: Vec<GenFile> = (0..n).map(|i| gen_file(i, 1500, false, false, 0)).collect();
    // Staged first, then renamed in as one burst: the whole backlog is ready at once.
    for f in &files {
        fs::write(staging(&d).join(&f.name), &f.bytes).unwrap();
    }
    for f in &files {
        fs::rename(staging(&d).join(&f.name), inbox(&d).join(&f.name)).unwrap();
    }
    d.wait_for(Duration::from_secs(20), "the first file done", || {
        (done_and_failed(&d) >= 1).then_some(())
    });
    let t = Instant::now();
    let out = d.ctl(&["pause-ingest"]);
    let reply_ms = t.elapsed().as_millis();
    assert!(out.status.success(), "{out:?}");
    // "Paused" means no file in hand: the reply waits for the file being ingested.
    let ingest = d.section("ingest");
    assert!(
        ingest["ingesting"].is_null(),
        "a file in flight after the pause reply: {ingest}"
    );
    let at_pause = done_and_failed(&d);
    std::thread::sleep(Duration::from_millis(800));
    let later = done_and_failed(&d);
    eprintln!("pause replied in {reply_ms} ms with {at_pause} of {n} done, {later} after 800 ms");
    assert_eq!(
        later, at_pause,
        "files were still taken after the pause reply"
    );
    assert!(
        at_pause < n,
        "the pause only took effect after the whole backlog ({reply_ms} ms)"
    );
    let out = d.ctl(&["resume-ingest"]);
    assert!(out.status.success(), "{out:?}");
    d.wait_for(Duration::from_secs(30), "the backlog after resume", || {
        (sidecars(&inbox(&d), ".done").len() == n).then_some(())
    });
    assert_all_running_no_restarts(&d);
}

/// A file moved out of the inbox (to `.done/`) is not a file "renamed in": a producer that
/// writes the same name again in place right after gets the settle time, not a
/// half-written file taken at once.
#[test]
fn same_name_written_in_place_after_the_move_waits_to_settle() {
    let d = Daemon::start("[ingest]\nsettle_ms = 2000\nrescan_ms = 200\n");
    let first = small_csv("first", 20);
    drop_renamed(&d, "again.csv", &first);
    let t = Instant::now();
    while inbox(&d).join("again.csv").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "first delivery not taken"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    // Second delivery, written in place in two parts 500 ms apart (well within settle_ms).
    let second = small_csv("second", 400);
    let cut = second.len() / 2;
    let cut = cut + second[cut..].iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut f = fs::File::create(inbox(&d).join("again.csv")).unwrap();
    f.write_all(&second[..cut]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    f.write_all(&second[cut..]).unwrap();
    drop(f);
    d.wait_for(Duration::from_secs(20), "the second delivery", || {
        (sidecars(&inbox(&d), ".done").len() == 2).then_some(())
    });
    let scs = sidecars(&inbox(&d), ".done");
    assert_eq!(scs["again.csv"].rows_accepted, 20);
    assert_eq!(
        scs["again.csv.1"].rows_accepted, 400,
        "the second delivery was taken half-written"
    );
    assert_eq!(
        fs::read(inbox(&d).join(".done/again.csv.1")).unwrap(),
        second
    );

    // A rename inside the inbox (an upload finished as `*.part`) is still taken at once,
    // well before settle_ms.
    fs::write(inbox(&d).join("upload.csv.part"), small_csv("upload", 30)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    fs::rename(
        inbox(&d).join("upload.csv.part"),
        inbox(&d).join("upload.csv"),
    )
    .unwrap();
    d.wait_for(Duration::from_secs(20), "the renamed upload", || {
        sidecars(&inbox(&d), ".done")
            .contains_key("upload.csv")
            .then_some(())
    });
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "a file renamed inside the inbox waited {:?} (settle_ms = 2000)",
        t.elapsed()
    );
}

/// Supervision during a backlog: the replay and ingestor actors crash (fault injection)
/// while files are being taken; each comes back once, and every file is ingested exactly
/// once.
#[cfg(feature = "fault-injection")]
#[test]
fn actor_crashes_during_a_backlog_lose_and_duplicate_nothing() {
    let mut d = Daemon::start(&format!("{CFG}[daemon]\nrestart_backoff_initial_ms = 10\n"));
    let files: Vec<GenFile> = (0..40)
        .map(|i| gen_file(i, 1500, i % 2 == 0, false, 0))
        .collect();
    for f in &files {
        drop_renamed(&d, &f.name, &f.bytes);
    }
    d.wait_for(Duration::from_secs(20), "the first file done", || {
        (done_and_failed(&d) >= 1).then_some(())
    });
    for actor in ["replay", "ingestor"] {
        let out = d.ctl(&["debug-crash", "--actor", actor]);
        assert!(out.status.success(), "{out:?}");
        eprintln!(
            "{actor} crashed with {} of 40 files done",
            done_and_failed(&d)
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    d.wait_for(
        Duration::from_secs(30),
        "every file after the crashes",
        || (sidecars(&inbox(&d), ".done").len() == files.len()).then_some(()),
    );
    // The restarted ingestor keeps watching: a file dropped now is taken too.
    let late = gen_file(40, 100, false, false, 0);
    drop_renamed(&d, &late.name, &late.bytes);
    d.wait_for(
        Duration::from_secs(10),
        "a file dropped after the restarts",
        || {
            sidecars(&inbox(&d), ".done")
                .contains_key(&late.name)
                .then_some(())
        },
    );
    let files: Vec<GenFile> = files.into_iter().chain([late]).collect();
    let s = d.data("status", Value::Null);
    for a in s["actors"].as_array().unwrap() {
        let want = if a["name"] == "replay" || a["name"] == "ingestor" {
            1
        } else {
            0
        };
        assert_eq!(a["state"], "running", "{s}");
        assert_eq!(a["restarts"], want, "{s}");
    }
    shutdown(&mut d);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in all_records(d.path()) {
        *seen.entry(body_text(&r.body)).or_default() += 1;
    }
    let total: usize = files.iter().map(|f| f.valid.len()).sum();
    assert_eq!(seen.len(), total);
    assert!(seen.values().all(|&n| n == 1));
    for f in &files {
        for (_, _, text) in &f.valid {
            assert!(seen.contains_key(text), "{}: {text} missing", f.name);
        }
    }
    assert!(inspect_replay(d.path()).ok);
}
