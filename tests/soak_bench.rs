//! `mbtd bench soak` end to end, briefly: the daemon child trains under the producer's
//! stream, is sampled, drains, stops with exit 0, and the one JSON line adds up.

mod common;

use common::BIN;
use serde_json::Value;

#[test]
fn a_short_soak_reports_consistent_figures_and_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["bench", "soak", "--minutes", "0.25", "--sample-secs", "2"])
        .args(["--warmup-secs", "6", "--rows-per-sec", "300", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["daemon_exit_code"], 0);
    let produced = r["rows_produced"].as_u64().unwrap();
    assert!(produced >= 1000, "{r}");
    assert_eq!(r["rows_ingested"].as_u64(), Some(produced), "{r}");
    assert_eq!(r["rows_rejected"].as_u64(), Some(0));
    assert!(r["steps"].as_u64().unwrap() > 0, "{r}");
    let series = &r["series"];
    let n = series["t_s"].as_array().unwrap().len();
    assert!(n >= 7, "{r}");
    for k in ["rss_kib", "fds", "step", "tokens_per_sec", "replay_rows"] {
        assert_eq!(series[k].as_array().unwrap().len(), n, "{k}");
    }
    assert!(
        series["rss_kib"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_u64() > Some(0))
    );
    assert!(
        series["fds"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_u64() > Some(2))
    );
    let s = &r["summary"];
    assert!(s["samples_after_warmup"].as_u64().unwrap() >= 4, "{r}");
    assert!(s["rss_growth_kib_per_min"].as_f64().is_some(), "{r}");
    let q = |k: &str| r["step_ms"][k].as_f64().unwrap();
    assert!(
        0.0 < q("p50") && q("p50") <= q("p90") && q("p90") <= q("p99"),
        "{r}"
    );
    // One sample per step of this run (the two counters are updated a moment apart).
    let (count, steps) = (
        r["step_ms"]["count"].as_i64().unwrap(),
        r["steps"].as_i64().unwrap(),
    );
    assert!((count - steps).abs() <= 1, "{r}");
    // The daemon's data dir: LATEST from its periodic and final checkpoints verifies.
    common::latest_checkpoint_valid(&dir.path().join("checkpoints")).unwrap();
}
