//! Tests of the replay store: recovery, exactly-once, eviction, control, sampling (test
//! code only, which is why this file runs past 600 lines).

use super::*;
use crate::store::format::{Record, scan_segment};
use crate::store::inspect_replay;
use crate::text::csv_rows::CsvRow;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::fs;

fn cfg(segment_bytes: u64) -> ReplayConfig {
    ReplayConfig {
        segment_bytes,
        control_fraction: 0.1,
        ..Default::default()
    }
}

fn open(dir: &Path, c: &ReplayConfig) -> (ReplayStore, RecoveryReport) {
    ReplayStore::open(dir, c).unwrap()
}

fn file_rows(tag: u8, n: usize, text_len: usize) -> ([u8; 32], Vec<CsvRow>) {
    let rows = (0..n)
        .map(|i| CsvRow {
            line: 2 + i as u64,
            source: format!("s{}", i % 3),
            time_ms: None,
            body: if i % 2 == 0 {
                RowBody::Text {
                    text: format!("{tag}-{i}-{}", "x".repeat((i * 7) % (text_len + 1))),
                }
            } else {
                RowBody::PromptResponse {
                    prompt: format!("p{tag}-{i}"),
                    response: "r".repeat(1 + (i * 13) % (text_len + 1)),
                }
            },
        })
        .collect();
    ([tag; 32], rows)
}

type Key = ([u8; 32], u64);

/// Every row in the store (training and control), keyed by (file, row), with counts.
fn contents(st: &ReplayStore) -> HashMap<Key, (usize, Record)> {
    let mut m: HashMap<Key, (usize, Record)> = HashMap::new();
    for m_ in &st.rows {
        let r = st.read_meta(m_).unwrap();
        let e = m.entry((r.file_hash, r.row)).or_insert((0, r.clone()));
        e.0 += 1;
    }
    m
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

#[test]
fn store_can_move_into_spawn_blocking() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<ReplayStore>();
    assert_send::<RecoveryReport>();
}

#[test]
fn append_reopen_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(4096);
    let (h, rows) = file_rows(1, 200, 100);
    {
        let (mut st, rep) = open(dir.path(), &c);
        assert!(rep.is_clean());
        let s = st.append_file_rows(&h, rows.clone(), 3).unwrap();
        assert_eq!((s.appended, s.already_present), (200, 0));
        assert_eq!((s.entry.rows_accepted, s.entry.rows_rejected), (200, 3));
        assert_eq!(s.entry.last_seq - s.entry.first_seq, 199);
        assert!(st.stats().segments > 1);
    }
    let (st, rep) = open(dir.path(), &c);
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(rep.rows, 200);
    let got = contents(&st);
    assert_eq!(got.len(), 200);
    for r in &rows {
        let (n, rec) = &got[&(h, r.line)];
        assert_eq!(*n, 1);
        assert_eq!((&rec.source, &rec.body), (&r.source, &r.body));
    }
    let stats = st.stats();
    assert_eq!(stats.rows, 200);
    assert_eq!(stats.by_kind[&RowKind::Text], 100);
    assert_eq!(stats.by_source["s0"], 67);
    assert_eq!(stats.training_rows + stats.control_rows, 200);
    assert!(stats.control_rows > 5 && stats.control_rows < 45);
    assert_eq!(stats.last_seq, 200);
    assert_eq!(stats.journal_files, 1);
    let inspect = inspect_replay(dir.path()).unwrap();
    assert!(inspect.ok);
    assert_eq!(
        (inspect.rows, inspect.control_rows, inspect.bytes),
        (stats.rows, stats.control_rows, stats.bytes)
    );
    assert!(inspect.to_string().contains("all CRCs verified"));
    let json = serde_json::to_value(&inspect).unwrap();
    assert_eq!(json["by_source"]["s1"]["rows"], 67);
}

#[test]
fn crash_after_fsync_before_journal_adds_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(4096);
    let (h, rows) = file_rows(2, 50, 50);
    {
        let (mut st, _) = open(dir.path(), &c);
        for r in &rows[..30] {
            assert!(st.append_row(&h, r.line, &r.source, &r.body, 5, 1).unwrap());
        }
        st.sync().unwrap();
    }
    let (mut st, _) = open(dir.path(), &c);
    assert!(st.journal_entry(&h).is_none());
    assert!(st.contains_row(&h, rows[0].line));
    let s = st.append_file_rows(&h, rows.clone(), 0).unwrap();
    assert_eq!((s.appended, s.already_present), (20, 30));
    let s = st.append_file_rows(&h, rows.clone(), 0).unwrap();
    assert_eq!((s.appended, s.already_present), (0, 50));
    drop(st);
    let (st, _) = open(dir.path(), &c);
    let got = contents(&st);
    assert_eq!(got.len(), 50);
    assert!(got.values().all(|(n, _)| *n == 1));
}

#[test]
fn corrupt_middle_record_is_reported_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(1 << 20);
    let (h, rows) = file_rows(3, 20, 30);
    {
        let (mut st, _) = open(dir.path(), &c);
        st.append_file_rows(&h, rows, 0).unwrap();
    }
    let seg = &segment_files(dir.path())[0];
    let mut bytes = fs::read(seg).unwrap();
    let scan = scan_segment(&bytes, 1);
    let victim = &scan.records[7];
    bytes[victim.offset as usize + 12] ^= 0x55;
    fs::write(seg, &bytes).unwrap();
    let before = inspect_replay(dir.path()).unwrap();
    assert!(!before.ok);
    assert_eq!(before.segments[0].corrupt_regions, 1);
    let (st, rep) = open(dir.path(), &c);
    assert_eq!(rep.corrupt.len(), 1);
    assert!(rep.truncated.is_empty());
    assert!(rep.to_string().contains("corrupt region"));
    let got = contents(&st);
    assert_eq!(got.len(), 19);
    assert!(!got.contains_key(&(h, victim.record.row)));
}

#[test]
fn torn_segment_header_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(4096);
    {
        let (mut st, _) = open(dir.path(), &c);
        let (h, rows) = file_rows(4, 5, 10);
        st.append_file_rows(&h, rows, 0).unwrap();
    }
    fs::write(dir.path().join(segment_name(9)), b"MBTD").unwrap();
    let (mut st, rep) = open(dir.path(), &c);
    assert_eq!(rep.truncated.len(), 1);
    let (h, rows) = file_rows(5, 5, 10);
    st.append_file_rows(&h, rows, 0).unwrap();
    drop(st);
    let (st, rep) = open(dir.path(), &c);
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(st.stats().rows, 10);
}

/// Rows of `n_files` files of `rows_per_file` each, evicting down to `max_rows`
/// after every file; returns retained seqs and the store's stats.
fn run_eviction(
    dir: &Path,
    seed: u64,
    n_files: u8,
    rows_per_file: usize,
    max_rows: u64,
) -> (Vec<u64>, ReplayStats) {
    let c = ReplayConfig {
        segment_bytes: 8192,
        max_rows,
        control_fraction: 0.05,
        seed,
        ..Default::default()
    };
    let (mut st, _) = open(dir, &c);
    for f in 0..n_files {
        let (h, rows) = file_rows(f, rows_per_file, 20);
        st.append_file_rows(&h, rows, 0).unwrap();
        st.enforce_capacity(u64::MAX).unwrap();
        assert!(st.stats().rows <= max_rows);
    }
    let seqs = st
        .rows
        .iter()
        .filter(|m| !m.control)
        .map(|m| m.seq)
        .collect();
    (seqs, st.stats())
}

#[test]
fn eviction_keeps_uniform_deterministic_samples_of_training_and_control_rows() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (s1, stats1) = run_eviction(d1.path(), 11, 10, 200, 300);
    let (s2, _) = run_eviction(d2.path(), 11, 10, 200, 300);
    assert_eq!(s1, s2, "same seed, same history, same sample");
    let control: Vec<u64> = {
        let (st, _) = open(d1.path(), &cfg(8192));
        st.rows
            .iter()
            .filter(|m| m.control)
            .map(|m| m.seq)
            .collect()
    };
    assert_eq!(control.len() as u64, stats1.control_rows);
    assert_eq!(
        stats1.control_rows, 15,
        "about 100 of 2000 rows are control; 5% of max_rows = 15 of them stay"
    );
    // A uniform sample of 15 control seqs from 1..=2000: mean ~1000, sd of the mean ~150.
    let mean = control.iter().sum::<u64>() as f64 / control.len() as f64;
    assert!((450.0..1550.0).contains(&mean), "mean control seq {mean}");
    assert_eq!(stats1.rows, 300);
    assert_eq!(stats1.evicted_total, 2000 - 300);
    // A uniform sample of seqs 1..=2000 has mean ~1000 (sd of the mean ~ 40 here);
    // keeping the newest rows would give ~1900.
    let mean = s1.iter().sum::<u64>() as f64 / s1.len() as f64;
    assert!((850.0..1150.0).contains(&mean), "mean seq {mean}");
    // Durable: a reopen sees the same rows; disk space was reclaimed.
    let (st, rep) = open(d1.path(), &cfg(8192));
    let reopened: Vec<u64> = st
        .rows
        .iter()
        .filter(|m| !m.control)
        .map(|m| m.seq)
        .collect();
    assert_eq!(reopened, s1);
    let disk: u64 = segment_files(d1.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        disk < stats1.bytes * 2,
        "disk {disk} vs live {}",
        stats1.bytes
    );
    assert!(rep.evicted_on_disk < 300);
    let insp = inspect_replay(d1.path()).unwrap();
    assert_eq!(insp.rows, 300);
    assert!(insp.ok);
}

#[test]
fn eviction_waits_for_the_consumer_cursor_and_handles_incomplete_files() {
    let dir = tempfile::tempdir().unwrap();
    let c = ReplayConfig {
        segment_bytes: 8192,
        max_rows: 10,
        control_fraction: 0.0,
        ..Default::default()
    };
    let (mut st, _) = open(dir.path(), &c);
    let (h, rows) = file_rows(1, 40, 10);
    st.append_file_rows(&h, rows, 0).unwrap();
    let (h2, rows2) = file_rows(2, 10, 10);
    for r in &rows2 {
        st.append_row(&h2, r.line, &r.source, &r.body, 5, 1)
            .unwrap();
    }
    st.sync().unwrap();
    assert_eq!(st.backlog(0), 50);
    assert_eq!(st.backlog(20), 30);
    assert!(st.at_capacity());
    let rep = st.enforce_capacity(20).unwrap();
    assert!(rep.evicted > 0);
    assert_eq!(
        st.backlog(20),
        30,
        "eviction never takes rows the trainer has not seen"
    );
    assert!(st.at_capacity(), "the backlog alone fills the store");
    assert_eq!(
        st.rows.iter().filter(|m| m.seq > 20).count(),
        30,
        "only consumed rows (seq <= 20) are evicted"
    );
    st.enforce_capacity(u64::MAX).unwrap();
    assert_eq!(
        st.stats().rows,
        10,
        "exactly the bound once all is consumed"
    );
    assert_eq!(st.backlog(st.last_durable_seq()), 0);
    // Completing the interrupted file appends its evicted rows again, never twice.
    let live_of_2 = st
        .rows
        .iter()
        .filter(|m| m.file == st.file_ids[&h2])
        .count() as u64;
    let s = st.append_file_rows(&h2, rows2, 0).unwrap();
    assert_eq!((s.appended, s.already_present), (10 - live_of_2, live_of_2));
    let got = contents(&st);
    assert!(got.values().all(|(n, _)| *n == 1));
    assert_eq!(got.keys().filter(|k| k.0 == h2).count(), 10);
    // New rows are not evicted before they are consumed.
    st.enforce_capacity(50).unwrap();
    assert_eq!(
        st.rows.iter().filter(|m| m.seq > 50).count() as u64,
        10 - live_of_2
    );
    assert!(st.stats().rows >= 10);
    st.enforce_capacity(u64::MAX).unwrap();
    assert_eq!(st.stats().rows, 10);
}

#[test]
fn control_rows_are_held_out_and_grouped() {
    let dir = tempfile::tempdir().unwrap();
    let c = ReplayConfig {
        control_fraction: 0.3,
        ..cfg(1 << 20)
    };
    let (mut st, _) = open(dir.path(), &c);
    let (h, rows) = file_rows(1, 300, 10);
    st.append_file_rows(&h, rows, 0).unwrap();
    let control: Vec<&RowMeta> = st.rows.iter().filter(|m| m.control).collect();
    assert!(
        control.len() > 50 && control.len() < 130,
        "{}",
        control.len()
    );
    let training = st.rows_after(0, usize::MAX).unwrap();
    assert_eq!(training.len() + control.len(), 300);
    assert_eq!(
        st.backlog(0),
        training.len() as u64,
        "control rows are no backlog"
    );
    let last_training = st.rows.iter().rfind(|m| !m.control).unwrap().seq;
    assert_eq!(st.backlog(last_training), 0);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for r in training
        .iter()
        .chain(&st.sample_uniform(&mut rng, 200).unwrap())
    {
        assert!(!is_control(0.3, &r.body));
    }
    let groups = st.control_groups(151, 5).unwrap();
    let total: u64 = groups.iter().map(|g| g.total_rows).sum();
    assert_eq!(total as usize, control.len());
    assert_eq!(groups.len(), 6, "3 sources x 2 eras");
    for g in &groups {
        assert!(g.records.len() <= 5);
        for r in &g.records {
            assert_eq!(r.source, g.source);
            assert_eq!(g.era == Era::Old, r.seq < 151);
            assert!(is_control(0.3, &r.body));
        }
    }
}

#[test]
fn samplers_and_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let c = ReplayConfig {
        control_fraction: 0.0,
        ..cfg(1 << 20)
    };
    let (mut st, _) = open(dir.path(), &c);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    assert!(st.sample_uniform(&mut rng, 3).unwrap().is_empty());
    let (h, rows) = file_rows(1, 1000, 5);
    st.append_file_rows(&h, rows, 0).unwrap();
    let mean = |v: Vec<Record>| v.iter().map(|r| r.seq as f64).sum::<f64>() / v.len() as f64;
    let u = mean(st.sample_uniform(&mut rng, 2000).unwrap());
    let r = mean(st.sample_recent(&mut rng, 2000, 5.0).unwrap());
    let r0 = mean(st.sample_recent(&mut rng, 2000, 0.0).unwrap());
    assert!((450.0..550.0).contains(&u), "{u}");
    assert!((450.0..550.0).contains(&r0), "{r0}");
    // Density ∝ e^{5x}: mean of x is 1/(1-e^-5) - 1/5 ≈ 0.807.
    assert!((760.0..850.0).contains(&r), "{r}");
    let page = st.rows_after(990, 5).unwrap();
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![991, 992, 993, 994, 995]
    );
    assert!(st.rows_after(1000, 5).unwrap().is_empty());
}

#[derive(Clone, Debug)]
enum Op {
    /// Append a whole file and commit it.
    Commit(u8),
    /// Append the first `k` rows of a file, crash, cut the last segment at a point
    /// `cut` of the way through its unsynced bytes, reopen.
    Crash(u8, usize, f64),
    /// Clean reopen.
    Reopen,
    /// Enforce a row bound with every row consumed.
    Evict(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5).prop_map(Op::Commit),
        (0u8..5, 0usize..40, 0.0f64..=1.0).prop_map(|(f, k, c)| Op::Crash(f, k, c)),
        Just(Op::Reopen),
        (20u64..120).prop_map(Op::Evict),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Any sequence of appends, crashes (last segment cut at a random byte after its
    /// durable length) and reopens yields every fsynced row, plus possibly a prefix of
    /// the rows appended before the crash, each exactly once, never a corrupt record;
    /// re-appending files (journal idempotence) never duplicates.
    #[test]
    fn appends_crashes_and_reopens_keep_exactly_the_durable_rows(ops in proptest::collection::vec(op(), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(2048);
        let files: Vec<([u8; 32], Vec<CsvRow>)> = (0..5u8).map(|f| file_rows(f, 40, 60)).collect();
        let (mut st, _) = open(dir.path(), &c);
        let mut durable: HashMap<Key, RowBody> = HashMap::new();
        let mut synced_len: HashMap<PathBuf, u64> = HashMap::new();
        let snapshot = |synced: &mut HashMap<PathBuf, u64>| {
            synced.clear();
            for p in segment_files(dir.path()) {
                let n = fs::metadata(&p).unwrap().len();
                synced.insert(p, n);
            }
        };
        snapshot(&mut synced_len);
        for op in ops {
            match op {
                Op::Commit(f) => {
                    let (h, rows) = &files[f as usize];
                    let complete = st.journal_entry(h).is_some();
                    let s = st.append_file_rows(h, rows.clone(), 0).unwrap();
                    let before = durable.len();
                    if !complete {
                        for r in rows {
                            durable.insert((*h, r.line), r.body.clone());
                        }
                    }
                    prop_assert_eq!(s.appended as usize, durable.len() - before);
                    snapshot(&mut synced_len);
                }
                Op::Crash(f, k, cut) => {
                    let (h, rows) = &files[f as usize];
                    let mut written = Vec::new();
                    for r in &rows[..k] {
                        if st.append_row(h, r.line, &r.source, &r.body, 5, 1).unwrap() {
                            written.push(r.clone());
                        }
                    }
                    drop(st);
                    let segs = segment_files(dir.path());
                    if let Some(last) = segs.last() {
                        let len = fs::metadata(last).unwrap().len();
                        let lo = synced_len.get(last).copied().unwrap_or(0);
                        let at = lo + ((len - lo) as f64 * cut) as u64;
                        fs::OpenOptions::new().write(true).open(last).unwrap().set_len(at).unwrap();
                    }
                    let (s2, _) = open(dir.path(), &c);
                    st = s2;
                    let got = contents(&st);
                    let mut survived = 0;
                    for (key, (n, rec)) in &got {
                        prop_assert_eq!(*n, 1, "duplicate row");
                        match durable.get(key) {
                            Some(body) => prop_assert_eq!(body, &rec.body),
                            None => survived += 1,
                        }
                    }
                    for key in durable.keys() {
                        prop_assert!(got.contains_key(key), "durable row lost");
                    }
                    // The survivors of the crash are a prefix of what was written.
                    for (i, r) in written.iter().enumerate() {
                        prop_assert_eq!(got.contains_key(&(*h, r.line)), i < survived);
                    }
                    for (key, (_, rec)) in got {
                        durable.insert(key, rec.body);
                    }
                    snapshot(&mut synced_len);
                }
                Op::Reopen => {
                    drop(st);
                    let (s2, rep) = open(dir.path(), &c);
                    prop_assert!(rep.is_clean(), "{}", rep);
                    st = s2;
                }
                Op::Evict(max_rows) => {
                    st.cfg.max_rows = max_rows;
                    let before = st.stats().rows;
                    let rep = st.enforce_capacity(u64::MAX).unwrap();
                    let got = contents(&st);
                    prop_assert_eq!(got.len() as u64, before - rep.evicted);
                    let protected = st.rows.iter().filter(|m| m.control).count() as u64;
                    prop_assert!(got.len() as u64 <= max_rows.max(protected));
                    durable.retain(|k, _| got.contains_key(k));
                    prop_assert_eq!(durable.len(), got.len());
                    st.cfg.max_rows = c.max_rows;
                    snapshot(&mut synced_len);
                }
            }
            let got = contents(&st);
            prop_assert_eq!(got.len(), durable.len());
            prop_assert!(got.values().all(|(n, _)| *n == 1));
        }
        // Journal idempotence: completing every file now adds exactly the rows of the
        // files not yet complete; evicted rows of complete files never come back.
        for (h, rows) in &files {
            let complete = st.journal_entry(h).is_some();
            st.append_file_rows(h, rows.clone(), 0).unwrap();
            if !complete {
                for r in rows {
                    durable.insert((*h, r.line), r.body.clone());
                }
            }
        }
        drop(st);
        let (st, _) = open(dir.path(), &c);
        let got = contents(&st);
        prop_assert_eq!(got.len(), durable.len());
        for (k, (n, rec)) in &got {
            prop_assert_eq!(*n, 1);
            prop_assert_eq!(&durable[k], &rec.body);
        }
        prop_assert!(inspect_replay(dir.path()).unwrap().ok);
    }
}

#[test]
fn byte_bound_is_enforced_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = ReplayConfig {
        segment_bytes: 4096,
        max_bytes: 8192,
        control_fraction: 0.0,
        ..Default::default()
    };
    let (mut st, _) = open(dir.path(), &c);
    let (h, rows) = file_rows(1, 300, 40);
    st.append_file_rows(&h, rows, 0).unwrap();
    let before = st.stats();
    assert!(before.bytes > 8192);
    let rep = st.enforce_capacity(u64::MAX).unwrap();
    let after = st.stats();
    assert!(after.bytes <= 8192, "{}", after.bytes);
    assert_eq!(rep.evicted, before.rows - after.rows);
    assert!(rep.bytes_reclaimed > 0);
    assert!(rep.segments_removed + rep.segments_rewritten > 0);
    let disk: u64 = segment_files(dir.path())
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        disk <= after.bytes + 16 * after.segments as u64 * 2 + 4096,
        "disk {disk}"
    );
    // Appending after compaction keeps working; nothing evicted comes back.
    let (h2, rows2) = file_rows(2, 10, 5);
    st.append_file_rows(&h2, rows2, 0).unwrap();
    let seqs: Vec<u64> = st.rows.iter().map(|m| m.seq).collect();
    drop(st);
    let (st, rep) = open(dir.path(), &c);
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(st.rows.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs);
    assert_eq!(st.stats().evicted_total, before.rows - after.rows);
    assert_eq!(st.stats().last_seq, 310);
}

#[test]
fn crash_between_state_write_and_compaction_loses_no_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let c = ReplayConfig {
        segment_bytes: 4096,
        max_rows: 50,
        control_fraction: 0.1,
        ..Default::default()
    };
    let (mut st, _) = open(dir.path(), &c);
    let (h, rows) = file_rows(1, 300, 30);
    st.append_file_rows(&h, rows, 0).unwrap();
    let saved: Vec<(PathBuf, Vec<u8>)> = segment_files(dir.path())
        .into_iter()
        .map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    st.enforce_capacity(u64::MAX).unwrap();
    let kept: Vec<u64> = st.rows.iter().map(|m| m.seq).collect();
    drop(st);
    // Put the pre-compaction segments back, plus a half-written compaction temp file:
    // the state of a crash after `state.bin` was written, before compaction finished.
    for (p, b) in &saved {
        fs::write(p, b).unwrap();
    }
    fs::write(dir.path().join("seg-0000000001.log.tmp"), b"partial").unwrap();
    let (st, rep) = open(dir.path(), &c);
    assert_eq!(rep.stale_temp_files, 1);
    assert!(rep.evicted_on_disk > 0);
    assert_eq!(st.rows.iter().map(|m| m.seq).collect::<Vec<_>>(), kept);
}

/// A failed commit (full disk while flushing) or a caller's abort leaves the store as at
/// the last commit: segments created since are gone, the others cut back, sequence
/// numbers reused; a reopen finds nothing of the aborted rows, and a retry appends and
/// counts them all again.
#[test]
fn aborted_batch_rolls_back_segments_and_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(4096);
    let (h1, rows1) = file_rows(1, 20, 40);
    let (h2, rows2) = file_rows(2, 200, 60);
    let (mut st, _) = open(dir.path(), &c);
    st.append_file_rows(&h1, rows1, 0).unwrap();
    let committed_segments = segment_files(dir.path());
    let lens: Vec<u64> = committed_segments
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    let next_seq = st.state.next_seq;
    for r in &rows2 {
        assert!(
            st.append_row(&h2, r.line, &r.source, &r.body, 5, 1)
                .unwrap()
        );
    }
    // Flushed to the OS (several segments rolled), then the commit is given up.
    let synced = st.prepare_commit().unwrap();
    assert!(segment_files(dir.path()).len() > committed_segments.len());
    st.abort_pending().unwrap();
    assert!(st.publish_commit(synced, &h2, 200, 0).is_err());
    assert_eq!(segment_files(dir.path()), committed_segments);
    let now: Vec<u64> = committed_segments
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(now, lens);
    assert_eq!(st.state.next_seq, next_seq);
    assert!(!st.contains_row(&h2, rows2[0].line));
    let s = st.append_file_rows(&h2, rows2.clone(), 0).unwrap();
    assert_eq!((s.appended, s.already_present), (200, 0));
    assert_eq!(s.entry.first_seq, next_seq);
    drop(st);
    let (st, report) = open(dir.path(), &c);
    assert!(report.is_clean(), "{report}");
    let all = contents(&st);
    assert_eq!(all.len(), 220);
    assert!(all.values().all(|(n, _)| *n == 1));
}

/// With an injected full disk at the flush, the rows appended are rolled back and the
/// commit fails as `disk full`; once space is back the same rows commit normally.
#[cfg(feature = "fault-injection")]
#[test]
fn disk_full_at_commit_is_reported_and_rolled_back() {
    use crate::store::fault::DISK_FULL_FLAG;
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(1 << 20);
    let (h, rows) = file_rows(3, 50, 30);
    let (mut st, _) = open(dir.path(), &c);
    fs::write(dir.path().join(DISK_FULL_FLAG), b"").unwrap();
    let err = st.append_file_rows(&h, rows.clone(), 0).unwrap_err();
    assert!(err.is_disk_full(), "{err}");
    assert_eq!(st.stats().rows, 0);
    assert!(!st.contains_row(&h, rows[0].line));
    fs::remove_file(dir.path().join(DISK_FULL_FLAG)).unwrap();
    let s = st.append_file_rows(&h, rows, 0).unwrap();
    assert_eq!((s.appended, s.already_present), (50, 0));
    assert_eq!(s.entry.rows_appended, 50);
}

/// A store written by the version-1 writer (before rows carried a time; committed fixture
/// `tests/fixtures/replay-v1`: two rows of file `[7; 32]`) opens, reads its rows with no
/// time, keeps its segment as it is and puts new rows, with their times, in a new
/// version-2 segment; reopened, both kinds read back and compaction keeps both.
#[test]
fn version_1_store_opens_and_new_rows_go_to_a_version_2_segment() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replay-v1");
    let dir = tempfile::tempdir().unwrap();
    for e in fs::read_dir(&fixture).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let v1_bytes = fs::read(dir.path().join("seg-0000000001.log")).unwrap();
    assert_eq!(
        v1_bytes[8..12],
        1u32.to_le_bytes(),
        "the fixture is version 1"
    );
    let c = ReplayConfig {
        control_fraction: 0.0,
        ..Default::default()
    };
    let (mut st, rep) = open(dir.path(), &c);
    assert!(rep.is_clean(), "{rep}");
    let old = st.rows_after(0, 10).unwrap();
    assert_eq!(old.len(), 2);
    assert!(old.iter().all(|r| r.time_ms.is_none() && r.source == "old"));
    assert_eq!(
        old[1].body,
        RowBody::PromptResponse {
            prompt: "what year?".into(),
            response: "unknown".into()
        }
    );
    assert!(st.journal_entry(&[7; 32]).is_some());
    let (h, mut rows) = file_rows(9, 3, 10);
    rows[0].time_ms = Some(1_577_836_800_000);
    st.append_file_rows(&h, rows, 0).unwrap();
    drop(st);
    assert_eq!(
        fs::read(dir.path().join("seg-0000000001.log")).unwrap(),
        v1_bytes,
        "a version-1 segment is never appended to"
    );
    let new_seg = fs::read(dir.path().join("seg-0000000002.log")).unwrap();
    assert_eq!(new_seg[8..12], 2u32.to_le_bytes());
    let (st, rep) = open(dir.path(), &c);
    assert!(rep.is_clean(), "{rep}");
    let all = st.rows_after(0, 10).unwrap();
    let times: Vec<Option<i64>> = all.iter().map(|r| r.time_ms).collect();
    assert_eq!(times.len(), 5);
    assert_eq!(times[..3], [None, None, Some(1_577_836_800_000)]);
    assert!(
        times[3].unwrap() > 1_700_000_000_000,
        "no time cell: the append time"
    );
    assert!(inspect_replay(dir.path()).unwrap().ok);
    // eviction compacts the version-1 segment into a version-2 file that still holds a
    // version-1 record; every state reopens clean
    let mut copied_v1 = false;
    for max_rows in (1..=4).rev() {
        let small = ReplayConfig {
            max_rows,
            ..c.clone()
        };
        let (mut st, _) = open(dir.path(), &small);
        st.enforce_capacity(u64::MAX).unwrap();
        drop(st);
        let (st, rep) = open(dir.path(), &c);
        assert!(rep.is_clean(), "{rep}");
        let left = st.rows_after(0, 10).unwrap();
        assert_eq!(left.len() as u64, max_rows);
        let seg1 = fs::read(dir.path().join("seg-0000000001.log")).ok();
        copied_v1 |= seg1.is_some_and(|b| b[8..12] == 2u32.to_le_bytes())
            && left.iter().any(|r| r.time_ms.is_none());
    }
    assert!(
        copied_v1,
        "a version-1 record was copied into a version-2 segment"
    );
}
