//! Arrival times through the real daemon: a `time` column (or the file's mtime) goes into
//! the replay store, a bad time rejects its row with line and field in the sidecar, and
//! `generate --as-of` is accepted (changing nothing without a time embedding) or refused
//! with a clear message.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const Y2020: i64 = 1_577_836_800_000;

/// Rows dated 2020 by their `time` cell, rows with an empty cell (the file's mtime), and one
/// row with a time that is not one.
fn dated_csv() -> String {
    let mut s = String::from("text,time\n");
    for i in 0..60 {
        let time = if i % 2 == 0 {
            "2020-01-01T00:00:00Z"
        } else {
            ""
        };
        s.push_str(&format!("\"row {i} says the cat sat on mat {i}\",{time}\n"));
    }
    s.push_str("\"a row from no time at all\",last tuesday\n");
    s
}

fn start(time_embedding: &str) -> Daemon {
    let d = Daemon::start(&small(&[
        ("model.time_embedding", time_embedding),
        ("tokenizer.bootstrap_rows", "40"),
        ("training.batch_size", "2"),
        ("training.seq_len", "16"),
    ]));
    d.drop_csv("dated.csv", &dated_csv());
    d.wait_for(Duration::from_secs(180), "the first training step", || {
        (d.step() >= 1).then_some(())
    });
    d.data("pause", Value::Null);
    d
}

fn greedy(d: &Daemon, as_of: Option<&str>) -> String {
    let mut args = json!({"prompt": "row 3 says", "max_tokens": 12, "temperature": 0});
    if let Some(t) = as_of {
        args["as_of"] = json!(t);
    }
    d.data("generate", args)["text"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn rows_keep_their_time_and_as_of_is_typed() {
    let mut d = start("\"none\"");
    // `as_of` is accepted and, without a time embedding, changes nothing
    let now = greedy(&d, None);
    assert_eq!(greedy(&d, Some("2020-06-01T00:00:00Z")), now);
    assert_eq!(greedy(&d, Some("2024-06-01T12:30:00+02:00")), now);
    // garbage is refused naming the field, before anything is generated
    for bad in ["last tuesday", "2024-02-30T00:00:00Z", "2024-06-01"] {
        let r = d.request("generate", json!({"prompt": "row", "as_of": bad}));
        assert_eq!(r["ok"], false, "{bad}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("invalid arguments for `generate`")
                && e.contains("`as_of`")
                && e.contains("is not an RFC 3339 time"),
            "{e}"
        );
    }
    let r = d.request("generate", json!({"prompt": "row", "as_of": 2024}));
    assert!(r["error"].as_str().unwrap().contains("invalid type"), "{r}");
    // the same through `mbtd ctl`
    let out = d.ctl(&["generate", "--prompt", "row", "--as-of", "soon"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`as_of` \"soon\" is not an RFC 3339 time"),
        "{err}"
    );
    let out = d.ctl(&[
        "generate",
        "--prompt",
        "row",
        "--max-tokens",
        "3",
        "--as-of",
        "2020-01-01T00:00:00Z",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the bad time rejected its row, with line and field, and kept the others
    let side = &sidecars(&d.path().join("inbox"), ".done")["dated.csv"];
    assert_eq!(
        (side.rows_accepted, side.rows_rejected),
        (60, 1),
        "{side:?}"
    );
    let listed = serde_json::to_string(&side.rejections).unwrap();
    assert!(
        listed.contains("\"line\":62") && listed.contains("field `time` = \\\"last tuesday\\\""),
        "{listed}"
    );
    d.stop_ok();
    let recs = all_records(d.path());
    assert_eq!(recs.len(), 60);
    for r in &recs {
        let i: usize = body_text(&r.body)
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let t = r.time_ms.expect("every new row has a time");
        if i.is_multiple_of(2) {
            assert_eq!(t, Y2020, "row {i}: its time cell");
        } else {
            assert!(t > 1_700_000_000_000, "row {i}: the file's mtime, got {t}");
        }
    }
}

#[test]
fn a_time2vec_daemon_trains_and_answers_as_of_a_time() {
    let mut d = start("\"time2vec\"");
    for as_of in [json!("2020-01-01T00:00:00Z"), Value::Null] {
        let mut args = json!({"prompt": "row 3 says", "max_tokens": 5, "seed": 1});
        if !as_of.is_null() {
            args["as_of"] = as_of;
        }
        let r = d.data("generate", args);
        assert!(r["tokens"].as_u64().is_some_and(|n| n <= 5), "{r}");
    }
    let r = d.request("generate", json!({"prompt": "row", "as_of": "yesterday"}));
    assert_eq!(r["ok"], false, "{r}");
    d.stop_ok();
    let (manifest, model, _) = d.latest_files();
    assert_eq!(
        manifest["config"]["model"]["time_embedding"], "time2vec",
        "{manifest}"
    );
    let st = safetensors::SafeTensors::deserialize(&model).unwrap();
    assert_eq!(st.tensor("time2vec.proj.w").unwrap().shape()[0], 9);
}
