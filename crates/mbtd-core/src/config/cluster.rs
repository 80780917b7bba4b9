//! `[cluster]`: branches on other machines. Absent, the daemon trains every branch in its
//! own process; present, `mbtd run` is a coordinator and branch `i` of every layer lives
//! on node `i mod nodes.len()` (branches added later by expansion stay in the coordinator).
//!
//! Peer ids and addresses are checked for their shape here (base58 ids, `/ip4|ip6|dns…/
//! …/tcp/PORT` addresses); the daemon parses them fully before READY and names the same
//! fields when one does not parse.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::section::{FieldError, Section};
use crate::model::remote::WirePrecision;

/// One branch host: its identity and where it listens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's libp2p peer id (`mbtd node --print-id --data-dir <its data dir>`).
    pub id: String,
    /// The node's `--listen` address as a multiaddr: `/ip4/10.0.0.2/tcp/7070`.
    pub addr: String,
}

/// The coordinator's side of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The coordinator's identity (created on first start); relative to the data dir.
    pub key_file: PathBuf,
    /// Address the coordinator also listens on (left out: it only dials its nodes).
    pub listen: Option<String>,
    /// The branch hosts, in placement order.
    pub nodes: Vec<NodeEntry>,
    /// Longest wait for the nodes' answers in one round of a step, milliseconds; a node
    /// later than this is masked for the step.
    pub deadline_ms: u64,
    /// Activations on the wire: `f32` (bitwise the one-process run) or `bf16` (half the
    /// bytes).
    pub wire: WirePrecision,
    /// Hard limit on how long a step waits for the quorum (`availability.min_active`
    /// branches of every layer answering), milliseconds; then the step is skipped and its
    /// rows are trained later.
    pub quorum_wait_ms: u64,
    /// Norm control: an output whose RMS is more than this times the median of the
    /// layer's recent outputs is masked and counted (0: off).
    pub max_output_norm_ratio: f64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            key_file: "identity.key".into(),
            listen: None,
            nodes: Vec::new(),
            deadline_ms: 5_000,
            wire: WirePrecision::F32,
            quorum_wait_ms: 2_000,
            max_output_norm_ratio: 100.0,
        }
    }
}

/// Whether `s` has the shape of a libp2p peer id: base58 (no `0`, `O`, `I`, `l`), 40 to
/// 64 characters (`12D3KooW…` for Ed25519 keys).
pub fn looks_like_peer_id(s: &str) -> bool {
    (40..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() && !matches!(c, '0' | 'O' | 'I' | 'l'))
}

/// Whether `s` has the shape of a TCP multiaddr: `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT`,
/// with a port above 0 unless `any_port`.
pub fn looks_like_tcp_multiaddr(s: &str, any_port: bool) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    let [empty, proto, host, tcp, port, ..] = parts.as_slice() else {
        return false;
    };
    empty.is_empty()
        && matches!(*proto, "ip4" | "ip6" | "dns" | "dns4" | "dns6")
        && !host.is_empty()
        && *tcp == "tcp"
        && port.parse::<u16>().is_ok_and(|p| any_port || p > 0)
}

impl ClusterConfig {
    /// Resolves `key_file` against `data_dir`.
    pub fn resolve_paths(&mut self, data_dir: &Path) {
        if self.key_file.is_relative() {
            self.key_file = data_dir.join(&self.key_file);
        }
    }
}

impl Section for ClusterConfig {
    const NAME: &'static str = "cluster";

    fn validate(&self) -> Result<(), FieldError> {
        Self::require(
            "key_file",
            "\"\"",
            !self.key_file.as_os_str().is_empty(),
            "a file path",
        )?;
        if let Some(l) = &self.listen {
            Self::require(
                "listen",
                format!("{l:?}"),
                looks_like_tcp_multiaddr(l, true),
                "a TCP multiaddr such as /ip4/0.0.0.0/tcp/7070",
            )?;
        }
        Self::require(
            "nodes",
            "[]",
            !self.nodes.is_empty(),
            "at least one node: nodes = [{ id = \"<peer id>\", addr = \"/ip4/…/tcp/…\" }]",
        )?;
        let mut seen = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            Self::require(
                &format!("nodes[{i}].id"),
                format!("{:?}", n.id),
                looks_like_peer_id(&n.id),
                "a libp2p peer id as printed by `mbtd node --print-id` (base58, 12D3KooW…)",
            )?;
            Self::require(
                &format!("nodes[{i}].id"),
                format!("{:?}", n.id),
                seen.insert(n.id.as_str()),
                "each node once",
            )?;
            Self::require(
                &format!("nodes[{i}].addr"),
                format!("{:?}", n.addr),
                looks_like_tcp_multiaddr(&n.addr, false),
                "the node's --listen multiaddr with a port, such as /ip4/10.0.0.2/tcp/7070",
            )?;
        }
        Self::in_range("deadline_ms", self.deadline_ms, 1, 600_000)?;
        Self::in_range("quorum_wait_ms", self.quorum_wait_ms, 0, 3_600_000)?;
        let r = self.max_output_norm_ratio;
        Self::require(
            "max_output_norm_ratio",
            r,
            r == 0.0 || (1.0..=1e6).contains(&r),
            "0 (off) or 1 ..= 1000000",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    const ID: &str = "12D3KooWGzh9nQjR3bB4a7sVUfqYfMtGJdRxD3w8Qj6YkqCq7bZc";

    fn with_nodes(nodes: &str) -> String {
        format!("[cluster]\nnodes = {nodes}\n")
    }

    fn field_of(text: &str) -> (String, String) {
        match Config::from_toml(text, "c.toml") {
            Err(ConfigError::Invalid { error, .. }) => (error.field, error.allowed),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn absent_is_none_and_the_config_serialises_as_before() {
        let cfg = Config::from_toml("", "c.toml").unwrap();
        assert!(cfg.cluster.is_none());
        assert!(!cfg.to_toml().contains("cluster"));
        assert!(serde_json::to_value(&cfg).unwrap().get("cluster").is_none());
    }

    #[test]
    fn a_cluster_section_parses_with_defaults_and_resolves_its_key_file() {
        let text = format!(
            "[cluster]\nwire = \"bf16\"\nnodes = [{{ id = \"{ID}\", addr = \"/ip4/127.0.0.1/tcp/7070\" }}]\n"
        );
        let mut cfg = Config::from_toml(&text, "c.toml").unwrap();
        let c = cfg.cluster.clone().unwrap();
        assert_eq!(c.wire, WirePrecision::Bf16);
        assert_eq!((c.deadline_ms, c.quorum_wait_ms), (5_000, 2_000));
        assert_eq!(c.nodes[0].id, ID);
        cfg.resolve_paths(Path::new("/var/lib/mbtd"));
        assert_eq!(
            cfg.cluster.unwrap().key_file,
            Path::new("/var/lib/mbtd/identity.key")
        );
        let back = Config::from_toml(&text, "c").unwrap();
        assert_eq!(Config::from_toml(&back.to_toml(), "rt").unwrap(), back);
    }

    #[test]
    fn bad_nodes_and_fields_are_named() {
        let good = format!("{{ id = \"{ID}\", addr = \"/ip4/127.0.0.1/tcp/7070\" }}");
        let cases = [
            (with_nodes("[]"), "cluster.nodes"),
            (
                with_nodes(&format!(
                    "[{good}, {{ id = \"not-a-peer-id\", addr = \"/ip4/1.2.3.4/tcp/1\" }}]"
                )),
                "cluster.nodes[1].id",
            ),
            (
                with_nodes(&format!(
                    "[{good}, {{ id = \"{ID}\", addr = \"/ip4/1.2.3.4/tcp/1\" }}]"
                )),
                "cluster.nodes[1].id",
            ),
            (
                with_nodes(&format!("[{{ id = \"{ID}\", addr = \"127.0.0.1:7070\" }}]")),
                "cluster.nodes[0].addr",
            ),
            (
                with_nodes(&format!(
                    "[{{ id = \"{ID}\", addr = \"/ip4/127.0.0.1/tcp/0\" }}]"
                )),
                "cluster.nodes[0].addr",
            ),
            (
                format!("{}deadline_ms = 0\n", with_nodes(&format!("[{good}]"))),
                "cluster.deadline_ms",
            ),
            (
                format!(
                    "{}listen = \"tcp:7070\"\n",
                    with_nodes(&format!("[{good}]"))
                ),
                "cluster.listen",
            ),
            (
                format!(
                    "{}max_output_norm_ratio = 0.5\n",
                    with_nodes(&format!("[{good}]"))
                ),
                "cluster.max_output_norm_ratio",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(&text).0, field, "{text}");
        }
        let err = Config::from_toml("[cluster]\nwire = \"f16\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("wire") && err.contains("c.toml"), "{err}");
        let err = Config::from_toml("[cluster]\nnode = []\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("node"), "unknown key named: {err}");
    }

    #[test]
    fn address_and_id_shapes() {
        assert!(looks_like_tcp_multiaddr("/ip6/::1/tcp/9", false));
        assert!(looks_like_tcp_multiaddr("/dns4/node-a.lan/tcp/7070", false));
        assert!(looks_like_tcp_multiaddr("/ip4/0.0.0.0/tcp/0", true));
        assert!(!looks_like_tcp_multiaddr("/ip4/1.2.3.4/udp/9", false));
        assert!(!looks_like_tcp_multiaddr("/ip4/1.2.3.4/tcp/70000", false));
        assert!(!looks_like_tcp_multiaddr("/ip4//tcp/9", false));
        assert!(looks_like_peer_id(ID));
        assert!(!looks_like_peer_id(&ID.replace('h', "0")));
        assert!(!looks_like_peer_id("12D3KooW"));
    }
}
