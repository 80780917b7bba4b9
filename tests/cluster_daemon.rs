//! `mbtd run` as a coordinator, end to end on loopback: two real `mbtd node` processes
//! host the branches of a small model; the daemon trains on a dropped CSV, a node killed
//! with SIGKILL is reported down while training goes on, a checkpoint completes without
//! it, the node restarted with the same identity and address rejoins with its branches,
//! and every row of the CSV is in the replay store exactly once; `ctl nodes` gives the
//! bytes on the wire of the last step beside the tensors' raw size. A `[cluster]` section
//! with a bad node is refused before READY, naming the field. Steps short of their quorum
//! are skipped and their rows trained later; peers whose identity is not listed are
//! refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mbtd::cluster::bench::{NodeProcess, start_node};
use serde_json::Value;

/// A running `mbtd node` (killed when dropped) and what it takes to start it again.
struct Node {
    process: NodeProcess,
    dir: PathBuf,
    config: PathBuf,
    coordinator: String,
    peer: String,
    addr: String,
}

impl Node {
    fn start(dir: &Path, config: &Path, coordinator: &str, listen: &str) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let process = start_node(Path::new(BIN), dir, config, coordinator, listen, &[])
            .unwrap_or_else(|e| panic!("mbtd node: {e:#}"));
        Node {
            peer: process.peer.to_string(),
            addr: process.addr.to_string(),
            process,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            coordinator: coordinator.to_string(),
        }
    }

    fn kill9(&mut self) {
        self.process.kill();
    }

    /// Starts again with the same identity (data dir) and address.
    fn restart(&mut self) {
        let again = Node::start(&self.dir, &self.config, &self.coordinator, &self.addr);
        assert_eq!(again.peer, self.peer, "same identity");
        *self = again;
    }
}

fn node_of(d: &Daemon, k: usize) -> Value {
    d.data("nodes", Value::Null)["nodes"][k].clone()
}

/// Two nodes (the keys and configs in `keys`), and a coordinator with `extra` settings
/// training on a dropped CSV of `rows` rows, once both nodes compute their branches.
/// Returns the nodes, the daemon, the CSV and the `ctl nodes` answer at that point.
fn cluster(
    keys: &Path,
    rows: usize,
    extra: &[(&str, &str)],
) -> (Node, Node, Daemon, String, Value) {
    let (key_file, coord) = coordinator_key(&keys.join("coordinator"));
    let node_cfg = keys.join("node.toml");
    std::fs::write(&node_cfg, small(&[])).unwrap();
    let loopback = "/ip4/127.0.0.1/tcp/0";
    let n0 = Node::start(&keys.join("n0"), &node_cfg, &coord, loopback);
    let n1 = Node::start(&keys.join("n1"), &node_cfg, &coord, loopback);
    let nodes = nodes_toml(&[&n0.process, &n1.process]);
    let key = format!("{:?}", key_file.display().to_string());
    let mut settings = vec![
        ("cluster.key_file", key.as_str()),
        ("cluster.nodes", nodes.as_str()),
        ("cluster.deadline_ms", "1000"),
    ];
    settings.extend_from_slice(extra);
    let d = Daemon::start(&small(&settings));
    let csv = sums_csv(seed(), rows, 50, |i| format!("s{}", i % 3));
    d.drop_csv("sums.csv", &csv);
    let ready = d.wait_for(Duration::from_secs(90), "both nodes answering", || {
        let r = d.data("nodes", Value::Null);
        let all = r["nodes"].as_array()?.iter().all(|n| {
            n["state"] == "up" && n["last_step_answered"].as_u64().is_some_and(|s| s >= 3)
        });
        all.then_some(r)
    });
    (n0, n1, d, csv, ready)
}

#[test]
fn a_killed_node_is_masked_and_rejoins_and_no_row_is_lost() {
    let keys = tempfile::tempdir().unwrap();
    let rows = 400;
    let (mut n0, n1, mut d, csv, ready) =
        cluster(keys.path(), rows, &[("cluster.quorum_wait_ms", "500")]);
    for (k, n) in ready["nodes"].as_array().unwrap().iter().enumerate() {
        assert!(n["bytes_in"].as_u64().unwrap() > 0, "{n}");
        assert!(n["bytes_out"].as_u64().unwrap() > 0, "{n}");
        assert_eq!(n["branches"], serde_json::json!([[0, k], [1, k]]), "{n}");
        assert!(n["rtt_p50_s"].as_f64().is_some(), "{n}");
    }
    assert_eq!(ready["nodes"][0]["id"], n0.peer.as_str());
    // bytes on the wire in the last step: the tensors' raw size plus headers (< 10 %)
    let wire = ready["wire_bytes_last_step"].as_u64().unwrap();
    let raw = ready["raw_tensor_bytes_last_step"].as_u64().unwrap();
    assert!(raw > 0 && wire >= raw && wire * 10 < raw * 11, "{ready}");
    let per_node: u64 = ready["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["bytes_last_step"].as_u64().unwrap())
        .sum();
    assert_eq!(per_node, wire, "{ready}");
    let table = String::from_utf8(d.ctl(&["nodes"]).stdout).unwrap();
    assert!(
        table.contains(&n1.peer) && table.contains(" up "),
        "{table}"
    );
    assert!(
        table.contains("bytes on the wire last step") && table.contains("(tensors "),
        "{table}"
    );
    assert!(
        d.section("cluster")["nodes"]
            .as_str()
            .unwrap()
            .starts_with("2 up"),
        "status line"
    );

    // kill -9 node 0: down, training goes on with node 1's branches
    n0.kill9();
    let killed = Instant::now();
    d.wait_for(Duration::from_secs(10), "node 0 down", || {
        (node_of(&d, 0)["state"] == "down").then_some(())
    });
    d.wait_for(Duration::from_secs(10), "node_down event", || {
        d.log_text().contains("\"node_down\"").then_some(())
    });
    assert_eq!(d.metric(&format!("node_up{{node=\"{}\"}}", n0.peer)), 0.0);
    let before = d.step();
    d.wait_steps(5, Duration::from_secs(60));
    let n1_step = node_of(&d, 1)["last_step_answered"].as_u64().unwrap();
    assert!(n1_step > before, "node 1 keeps answering");
    // a checkpoint while node 0 is down completes with the coordinator's copy
    let ck = d.data("checkpoint", Value::Null);
    assert!(ck["id"].is_string(), "{ck}");
    assert!(
        d.log_text().contains("\"checkpoint_without_nodes\""),
        "the checkpoint says which node it went without"
    );
    assert!(killed.elapsed() < Duration::from_secs(60));

    // restarted with the same identity and address: back within 10 s
    let down_step = node_of(&d, 0)["last_step_answered"].as_u64().unwrap();
    n0.restart();
    let back = Instant::now();
    d.wait_for(Duration::from_secs(10), "node 0 rejoined", || {
        let n = node_of(&d, 0);
        (d.log_text().contains("\"node_rejoined\"")
            && n["state"] == "up"
            && n["last_step_answered"].as_u64()? > down_step)
            .then_some(())
    });
    eprintln!("node 0 back in service after {:?}", back.elapsed());
    assert_eq!(d.data("nodes", Value::Null)["steps_skipped_quorum"], 0);
    // node 0 hosts branch 0 of every layer: masked while it was away
    assert!(d.metric("branch_deadline_misses_total{branch=\"0\",layer=\"0\"}") > 0.0);
    assert_eq!(d.metric(&format!("node_up{{node=\"{}\"}}", n0.peer)), 1.0);
    assert!(d.metric(&format!("node_rtt_seconds_count{{node=\"{}\"}}", n1.peer)) > 0.0);
    assert!(d.metric("cluster_bytes_total{direction=\"in\"}") > 0.0);
    assert_eq!(d.metric("steps_skipped_quorum_total"), 0.0);

    d.stop_ok();
    // every row of the CSV is in the replay store exactly once
    let stored: Vec<String> = all_records(d.path())
        .iter()
        .map(|r| body_text(&r.body))
        .collect();
    let mut want: Vec<String> = csv
        .lines()
        .skip(1)
        .map(|l| l.rsplit_once(',').unwrap().0.trim_matches('"').to_string())
        .collect();
    let mut got = stored.clone();
    want.sort();
    got.sort();
    assert_eq!(got.len(), rows);
    assert_eq!(got, want);
}

/// A node whose identity or address does not parse stops `mbtd run` before READY with
/// exit code 2 and the field's name.
#[test]
fn a_bad_node_is_refused_before_ready_naming_the_field() {
    let good = "12D3KooWGzh9nQjR3bB4a7sVUfqYfMtGJdRxD3w8Qj6YkqCq7bZc";
    let cases = [
        // refused by the config's check
        (
            "[{ id = \"not-a-peer-id\", addr = \"/ip4/127.0.0.1/tcp/7070\" }]".to_string(),
            "cluster.nodes[0].id",
        ),
        (
            format!("[{{ id = \"{good}\", addr = \"127.0.0.1:7070\" }}]"),
            "cluster.nodes[0].addr",
        ),
        // the right shape, refused when the daemon parses it
        (
            format!(
                "[{{ id = \"{}\", addr = \"/ip4/127.0.0.1/tcp/7070\" }}]",
                "1".repeat(52)
            ),
            "cluster.nodes[0].id",
        ),
    ];
    for (nodes, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!("{}\n[cluster]\nnodes = {nodes}\n", small(&[])),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{nodes}: {all}");
        assert!(all.contains(field), "{field} named: {all}");
        assert!(!all.contains("daemon_ready"), "refused before READY: {all}");
    }
}

/// `availability.min_active = 2` with two branches per layer, one per node: with a node
/// down no step reaches its quorum; each waits `cluster.quorum_wait_ms`, is skipped and
/// counted, the daemon keeps answering, and training resumes once the node is back. The
/// new rows the skipped steps took are put back and trained later: in the end every
/// piece of a new row queued has been trained.
#[test]
fn steps_short_of_their_quorum_are_skipped_until_the_node_returns() {
    let keys = tempfile::tempdir().unwrap();
    let (mut n0, _n1, mut d, _csv, _) = cluster(
        keys.path(),
        300,
        &[
            ("availability.min_active", "2"),
            ("cluster.quorum_wait_ms", "300"),
        ],
    );
    n0.kill9();
    // rows that arrive now are taken by steps that are skipped: they go back to the queue
    d.drop_csv(
        "more.csv",
        &sums_csv(seed() ^ 1, 100, 50, |i| format!("m{}", i % 3)),
    );
    let held = d.wait_for(
        Duration::from_secs(20),
        "steps skipped with new rows queued",
        || {
            let t = d.section("trainer");
            (d.metric("steps_skipped_quorum_total") >= 3.0 && t["pending_windows"].as_u64()? > 0)
                .then_some(t)
        },
    );
    std::thread::sleep(Duration::from_millis(800));
    let t = d.section("trainer");
    assert_eq!(t["step"], held["step"], "no step trains without its quorum");
    assert_eq!(t["new_pieces_trained"], held["new_pieces_trained"], "{t}");
    assert!(t["pending_windows"].as_u64().unwrap() > 0, "{t}");
    assert!(d.log_text().contains("\"step_skipped_quorum\""));
    let line = d.section("cluster");
    assert_eq!(line["nodes"], "1 up, 0 late, 1 down", "{line}");
    assert!(
        line["steps_skipped_quorum"].as_u64().unwrap() >= 3,
        "{line}"
    );
    assert!(
        d.data("nodes", Value::Null)["steps_skipped_quorum"]
            .as_u64()
            .unwrap()
            >= 3
    );
    n0.restart();
    d.wait_steps(5, Duration::from_secs(20));
    assert!(d.log_text().contains("\"node_rejoined\""));
    // every piece of a new row that was queued, put back by the skipped steps included,
    // is trained once the node is back: as many as without a skip
    let done = d.wait_for(Duration::from_secs(30), "every new row trained", || {
        let t = d.section("trainer");
        (d.metric("ingest_files_total{outcome=\"done\"}") >= 2.0 && t["pending_windows"] == 0)
            .then_some(t)
    });
    let queued = done["new_pieces_queued"].as_u64().unwrap();
    assert!(
        queued > held["new_pieces_queued"].as_u64().unwrap(),
        "{held} → {done}"
    );
    assert_eq!(
        done["new_pieces_trained"].as_u64().unwrap(),
        queued,
        "{done}"
    );
    d.stop_ok();
}

/// Identities the coordinator does not list are refused, logged (`node_refused`) and
/// counted (`cluster_peers_refused_total`): a node at a configured address whose identity
/// is not the configured one (never asked anything), and a process that dials the
/// coordinator with its own key (gets no answer). Training goes on with the listed node.
#[test]
fn peers_whose_identity_is_not_listed_are_refused_and_training_goes_on() {
    let keys = tempfile::tempdir().unwrap();
    let (key_file, coord) = coordinator_key(&keys.path().join("coordinator"));
    let (_, listed) = coordinator_key(&keys.path().join("never-started"));
    let node_cfg = keys.path().join("node.toml");
    std::fs::write(&node_cfg, small(&[])).unwrap();
    let loopback = "/ip4/127.0.0.1/tcp/0";
    let n0 = Node::start(&keys.path().join("n0"), &node_cfg, &coord, loopback);
    // serves the coordinator, but with its own key, at the address listed for `listed`
    let impostor = Node::start(&keys.path().join("impostor"), &node_cfg, &coord, loopback);
    let nodes = format!(
        "[{{ id = \"{}\", addr = \"{}\" }}, {{ id = \"{listed}\", addr = \"{}\" }}]",
        n0.peer, n0.addr, impostor.addr
    );
    let key = format!("{:?}", key_file.display().to_string());
    let d = Daemon::start(&small(&[
        ("cluster.key_file", key.as_str()),
        ("cluster.nodes", nodes.as_str()),
        ("cluster.listen", "\"/ip4/127.0.0.1/tcp/0\""),
        ("cluster.deadline_ms", "1000"),
    ]));
    d.drop_csv(
        "sums.csv",
        &sums_csv(seed(), 300, 50, |i| format!("s{}", i % 3)),
    );
    let refused_line = |peer: &str| {
        d.log_text()
            .lines()
            .any(|l| l.contains("\"node_refused\"") && l.contains(peer))
    };
    let ready = d.wait_for(
        Duration::from_secs(90),
        "node 0 answering, the impostor refused",
        || {
            let r = d.data("nodes", Value::Null);
            (r["nodes"][0]["last_step_answered"].as_u64()? >= 3 && refused_line(&impostor.peer))
                .then_some(r)
        },
    );
    assert!(ready["peers_refused"].as_u64().unwrap() >= 1, "{ready}");
    assert!(d.metric("cluster_peers_refused_total") >= 1.0);
    let n1 = &ready["nodes"][1];
    assert_eq!(n1["state"], "down", "{n1}");
    assert_eq!(n1["bytes_out"], 0, "nothing reaches the impostor: {n1}");
    assert_eq!(n1["last_step_answered"], Value::Null, "{n1}");

    // a process with its own key dials the coordinator and asks
    let coord_addr: mbtd_cluster::Multiaddr = ready["listen"][0].as_str().unwrap().parse().unwrap();
    let coord_peer: mbtd_cluster::PeerId = coord.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stranger_key = mbtd_cluster::Keypair::generate_ed25519();
    let stranger_id = stranger_key.public().to_peer_id().to_string();
    let answer = rt.block_on(async {
        let (stranger, _, _) = mbtd_cluster::Endpoint::start(
            stranger_key,
            mbtd_cluster::EndpointConfig {
                listen: None,
                allowed: vec![coord_peer],
                request_timeout: Duration::from_secs(2),
                max_message_bytes: 1 << 20,
                kameo_global: false,
            },
        )
        .await
        .unwrap();
        let _ = stranger.dial(coord_addr).await;
        stranger.request(coord_peer, vec![0; 64]).await
    });
    assert!(answer.is_err(), "the stranger got an answer: {answer:?}");
    d.wait_for(Duration::from_secs(10), "the stranger refused", || {
        refused_line(&stranger_id).then_some(())
    });
    let refused = d.data("nodes", Value::Null)["peers_refused"]
        .as_u64()
        .unwrap();
    assert!(refused >= 2, "impostor and stranger: {refused}");
    assert!(d.metric("cluster_peers_refused_total") >= 2.0);

    // training goes on with node 0
    let before = d.step();
    d.wait_steps(3, Duration::from_secs(30));
    assert!(node_of(&d, 0)["last_step_answered"].as_u64().unwrap() > before);
    assert_eq!(node_of(&d, 0)["state"], "up");
}
