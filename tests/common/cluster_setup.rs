//! What the cluster tests share: the coordinator's identity and the `cluster.nodes` list.

use std::path::{Path, PathBuf};
use std::process::Command;

use mbtd::cluster::bench::NodeProcess;

use super::BIN;

/// The coordinator's key file (in `dir`) and its peer id, made by `mbtd node --print-id`
/// (the same identity format).
pub fn coordinator_key(dir: &Path) -> (PathBuf, String) {
    let out = Command::new(BIN)
        .args(["node", "--print-id", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    (dir.join("identity.key"), id)
}

/// The value of `cluster.nodes` naming these nodes, in placement order.
pub fn nodes_toml(nodes: &[&NodeProcess]) -> String {
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{{ id = \"{}\", addr = \"{}\" }}", n.peer, n.addr))
        .collect();
    format!("[{}]", list.join(", "))
}
