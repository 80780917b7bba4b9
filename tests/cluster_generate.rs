//! `ctl generate` on a coordinator whose branches live on two real `mbtd node` processes
//! (loopback): the nodes compute their branches from their live weights with per-session
//! caches; a node killed with SIGKILL while a reply streams is masked for the rest of
//! that generation, which completes and names the masked branches; the daemon stays up
//! and generates again.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use mbtd::cluster::bench::{NodeProcess, start_node};
use serde_json::{Value, json};

/// Rotary positions: a reply may run past `max_seq_len` (32), long enough to kill a
/// node while it streams.
const MODEL: [(&str, &str); 1] = [("model.positions", "\"rope\"")];

fn start(dir: &Path, config: &Path, coordinator: &str, extra: &[&str]) -> NodeProcess {
    std::fs::create_dir_all(dir).unwrap();
    start_node(
        Path::new(BIN),
        dir,
        config,
        coordinator,
        "/ip4/127.0.0.1/tcp/0",
        extra,
    )
    .unwrap_or_else(|e| panic!("mbtd node: {e:#}"))
}

/// Two nodes (node 1 started with `n1_args`) and a coordinator (generation slowed by
/// `token_delay_ms` per token) that trained until both nodes answered a few steps, then
/// paused (generation deterministic).
fn cluster(
    keys: &Path,
    token_delay_ms: u64,
    n1_args: &[&str],
) -> (NodeProcess, NodeProcess, Daemon) {
    let (key_file, coord) = coordinator_key(&keys.join("coordinator"));
    let node_cfg = keys.join("node.toml");
    std::fs::write(&node_cfg, small(&MODEL)).unwrap();
    let n0 = start(&keys.join("n0"), &node_cfg, &coord, &[]);
    let n1 = start(&keys.join("n1"), &node_cfg, &coord, n1_args);
    let nodes = nodes_toml(&[&n0, &n1]);
    let key = format!("{:?}", key_file.display().to_string());
    let mut settings = MODEL.to_vec();
    settings.extend([
        ("cluster.key_file", key.as_str()),
        ("cluster.nodes", nodes.as_str()),
        ("cluster.deadline_ms", "1000"),
    ]);
    let delay = token_delay_ms.to_string();
    let d = Daemon::start_with_env(
        &small(&settings),
        &[("MBTD_FAULT_TOKEN_DELAY_MS", delay.as_str())],
    );
    d.drop_csv(
        "sums.csv",
        &sums_csv(seed(), 300, 50, |i| format!("s{}", i % 3)),
    );
    d.wait_for(Duration::from_secs(90), "both nodes answering", || {
        let r = d.data("nodes", Value::Null);
        let all = r["nodes"].as_array()?.iter().all(|n| {
            n["state"] == "up" && n["last_step_answered"].as_u64().is_some_and(|s| s >= 3)
        });
        all.then_some(())
    });
    d.data("pause", Value::Null);
    (n0, n1, d)
}

fn generate_args(seed: u64, max_tokens: u64) -> Value {
    json!({"prompt": "s1", "respond": true, "temperature": 1, "seed": seed,
        "max_tokens": max_tokens})
}

/// Bytes the coordinator sent to node `k`.
fn bytes_out(d: &Daemon, k: usize) -> u64 {
    d.data("nodes", Value::Null)["nodes"][k]["bytes_out"]
        .as_u64()
        .unwrap()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[cfg(feature = "fault-injection")]
#[test]
fn generation_runs_on_the_nodes_and_survives_a_node_killed_mid_reply() {
    let keys = tempfile::tempdir().unwrap();
    let (_n0, mut n1, d) = cluster(keys.path(), 10, &[]);
    let n1_peer = n1.peer.to_string();

    // `ctl generate` works and asks both nodes (training is paused: this traffic is the
    // generation's)
    let before = (bytes_out(&d, 0), bytes_out(&d, 1));
    let out = d.ctl(&[
        "generate",
        "--prompt",
        "s1",
        "--max-tokens",
        "8",
        "--seed",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("generated without"));
    let after = (bytes_out(&d, 0), bytes_out(&d, 1));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "{before:?} → {after:?}"
    );

    // a seed whose reply runs long with every node up
    let seed = (0..30u64)
        .find(|&seed| {
            let r = d.data("generate", generate_args(seed, 120));
            assert_eq!(r["masked"], json!([]), "{r}");
            r["tokens"].as_u64().unwrap() >= 100
        })
        .expect("a seed with a reply of 100 tokens or more");

    // the same reply streams; node 1 is killed after its first piece
    let line = json!({"id": 9, "cmd": "generate", "args": generate_args(seed, 120)}).to_string();
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).unwrap();
    assert!(first.contains("\"done\":false"), "{first}");
    n1.kill();
    let last = loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "the daemon closed the stream"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["done"] == true {
            break v;
        }
    };
    assert_eq!(last["ok"], true, "{last}");
    let data = &last["data"];
    let tokens = data["tokens"].as_u64().unwrap();
    assert!((1..=120).contains(&tokens), "{data}");
    let masked = data["masked"].as_array().expect("masked branches listed");
    let mut names: Vec<(u64, u64)> = masked
        .iter()
        .map(|b| (b["layer"].as_u64().unwrap(), b["branch"].as_u64().unwrap()))
        .collect();
    // in the order they were lost: layer 1's first when the node died between the layers
    names.sort_unstable();
    // branch i of each layer is on node i mod 2
    assert_eq!(names, vec![(0, 1), (1, 1)], "{data}");
    for b in masked {
        assert_eq!(b["node"], n1_peer.as_str(), "{b}");
        assert!(b["position"].as_u64().unwrap() > 0, "masked mid-reply: {b}");
        assert!(!b["why"].as_str().unwrap().is_empty(), "{b}");
    }
    d.wait_for(
        Duration::from_secs(10),
        "the generation_node_lost event",
        || (count(&d.log_text(), "\"generation_node_lost\"") == 1).then_some(()),
    );
    assert!(d.metric("generation_branches_masked_total") >= 2.0);

    // the daemon stays up and generates again, node 1's branches masked from the start
    let again = d.data("generate", generate_args(seed, 20));
    assert!(again["tokens"].as_u64().unwrap() >= 1, "{again}");
    let masked = again["masked"].as_array().unwrap();
    assert_eq!(masked.len(), 2, "{again}");
    assert!(masked.iter().all(|b| b["position"] == 0), "{again}");
    let out = d.ctl(&["generate", "--prompt", "s1", "--max-tokens", "5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("generated without these branches") && err.contains(&n1_peer),
        "{err}"
    );
    d.data("ping", Value::Null);
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_node_drops_sessions_idle_longer_than_its_flag_allows() {
    // node 1 keeps an unused session for 1 s; tokens come every 1.5 s
    let keys = tempfile::tempdir().unwrap();
    let (_n0, n1, d) = cluster(keys.path(), 1500, &["--generation-idle-secs", "1"]);
    let n1_peer = n1.peer.to_string();
    let reply = (0..10u64)
        .map(|seed| d.data("generate", generate_args(seed, 3)))
        .find(|r| r["tokens"].as_u64().unwrap() >= 2)
        .expect("a reply of 2 tokens or more");
    let masked = reply["masked"].as_array().expect("masked branches listed");
    let mut names: Vec<(u64, u64)> = masked
        .iter()
        .map(|b| (b["layer"].as_u64().unwrap(), b["branch"].as_u64().unwrap()))
        .collect();
    names.sort_unstable();
    assert_eq!(names, vec![(0, 1), (1, 1)], "{reply}");
    for b in masked {
        assert_eq!(b["node"], n1_peer.as_str(), "{b}");
        assert!(b["position"].as_u64().unwrap() > 0, "{b}");
        let why = b["why"].as_str().unwrap();
        assert!(why.contains("idle for more than 1s"), "{b}");
    }
}

#[test]
fn a_node_refuses_a_session_limit_of_zero_by_name() {
    let out = std::process::Command::new(BIN)
        .args(["node", "--coordinator", "x", "--generation-sessions", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--generation-sessions"), "{err}");
}
