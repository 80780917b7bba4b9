//! Packed training (`training.packing`, the default) with the real daemon: a run killed
//! with `kill -9` and restarted from its last periodic checkpoint ends bitwise equal to a
//! straight run (the packing progress is part of the loop state), and short rows fill at
//! least 95 % of the positions the trainer computes.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(120);

fn config(max_steps: u64) -> String {
    short_windows(&[
        ("training.packing", "true"),
        ("training.max_steps", &max_steps.to_string()),
        ("checkpoints.every_steps", "5"),
        ("checkpoints.keep_last", "50"),
    ])
}

/// Prompt/response rows (one kind per file): short ones, and ones whose response is longer
/// than a window (cut into pieces, the prompt carrying no loss).
fn write_data(d: &Daemon) {
    let mut s = String::from("prompt,response,source\n");
    for i in 0..300u32 {
        let response = if i % 3 == 1 {
            let long: Vec<String> = (0..12 + i % 9)
                .map(|j| format!("w{}", (i + j) % 13))
                .collect();
            long.join(" ")
        } else {
            (i * 3).to_string()
        };
        s.push_str(&format!("\"what is {i} times 3\",\"{response}\",m\n"));
    }
    d.drop_csv("d.csv", &s);
}

#[test]
fn packed_training_killed_and_resumed_ends_bitwise_like_a_straight_run() {
    let mut a = Daemon::start(&config(30));
    write_data(&a);
    a.wait_step(30, WAIT);
    a.stop_ok();
    let (ma, wa, oa) = a.latest_files();
    assert_eq!(ma["step"], 30);

    // Training stops at step 13; the periodic checkpoint of step 10 is the last one.
    let mut b = Daemon::start(&config(13));
    write_data(&b);
    b.wait_step(13, WAIT);
    let m10 = b.wait_for(Duration::from_secs(60), "checkpoint of step 10", || {
        let (m, _, _) = b.latest_files();
        (m["step"] == 10).then_some(m)
    });
    let ahead = &m10["state"]["ahead"];
    assert!(
        ahead.as_array().is_some_and(|a| !a.is_empty()),
        "the checkpoint holds packing progress (pieces trained ahead of the cursor): {}",
        m10["state"]
    );
    b.kill9();
    let mut b = b.restart_with(&config(30));
    b.wait_step(30, WAIT);
    b.stop_ok();
    let (mb, wb, ob) = b.latest_files();
    assert_eq!(mb["step"], 30);
    assert!(wa == wb, "model weights differ after kill -9 and resume");
    assert!(oa == ob, "optimizer state differs after kill -9 and resume");
    for k in [
        "cursor",
        "ahead",
        "tokens_total",
        "select_counts",
        "last_control",
    ] {
        assert_eq!(ma["state"][k], mb["state"][k], "loop state {k} differs");
    }
    assert_eq!(ma["tokens"], mb["tokens"]);
}

#[test]
fn short_rows_fill_the_positions_and_tokens_count_text_only() {
    let mut d = Daemon::start(&config(12));
    write_data(&d);
    d.wait_step(12, WAIT);
    let util = d.metric("train_position_utilization");
    assert!(util >= 0.95, "train_position_utilization = {util}");
    d.stop_ok();
    let (m, _, _) = d.latest_files();
    // 12 steps of 4 windows of 16 positions: the tokens counted are loss targets (text
    // only, prompts excluded), far more than a row per window would give and never more
    // than the positions.
    let tokens = m["tokens"].as_u64().unwrap();
    eprintln!("{tokens} loss tokens in 12 steps; last step's utilisation {util}");
    assert!(tokens <= 12 * 4 * 16, "{tokens}");
    assert!(
        tokens * 10 >= 12 * 4 * 16 * 6,
        "{tokens}: packing should fill the windows"
    );
}
