//! The coordinator's side of `[cluster]` outside the trainer thread: the swarm endpoint
//! (started before READY, its nodes checked and dialled, kept connected), the task that
//! follows the nodes' connections ([`PeerEvent`]s: `node_up`, `node_down`,
//! `node_refused`), and the shared [`ClusterView`] that `ctl nodes`, `ctl status` and
//! the trainer read. The trainer's glue (placement, quorum, pushes and pulls) is
//! [`crate::actors::trainer_cluster`].
//!
//! A node's *state*: `down` while it has no connection, `late` while connected but
//! suspect (it missed a round and has not answered a ping since) or awaiting the
//! coordinator's copy of its branches, else `up`.

pub mod events;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mbtd_cluster::{Endpoint, EndpointConfig, HostRecord, Multiaddr, PeerEvent, PeerId, identity};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::{ClusterConfig, FieldError};
use crate::telemetry::event::InternalEvent;
use events::{NodeDown, NodeRefused, NodeUp};

/// Why the cluster endpoint cannot start (before READY; `mbtd run` exits with code 2).
#[derive(Debug, thiserror::Error)]
pub enum ClusterStartError {
    #[error("invalid value for {0}")]
    Field(FieldError),
    #[error(
        "cannot load the coordinator's identity: {0}; check `cluster.key_file` (created 0600 on first start)"
    )]
    Identity(String),
    #[error("cannot start the cluster endpoint: {0}")]
    Endpoint(String),
}

/// What one node's connection and the trainer's view of it say, for `ctl nodes`.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    /// A connection is up.
    pub connected: bool,
    /// Connections that closed since the start (the trainer parks the node when it moves).
    pub downs: u64,
    /// The node was down and has not got its branches back yet.
    pub rejoining: bool,
    /// The trainer does not ask the node until it gets the coordinator's copy.
    pub parked: bool,
    /// Newest training step in which one of its branches was computed.
    pub last_step: Option<u64>,
}

/// Everything the trainer, the admin server and the connection task share.
#[derive(Debug, Default)]
pub struct ViewState {
    pub nodes: Vec<NodeState>,
    /// The trainer's transport records (round trips, misses), once the model exists.
    pub records: Option<Arc<Mutex<Vec<HostRecord>>>>,
    /// Per node, the `(layer, branch)` it hosts.
    pub branches: Vec<Vec<(usize, usize)>>,
    /// The trainer's step counter.
    pub step: u64,
    pub steps_skipped_quorum: u64,
    /// Peers refused (not in `cluster.nodes`).
    pub refused: u64,
    /// Per node, payload bytes in plus out during the last completed training step.
    pub last_step_bytes: Vec<u64>,
    /// Raw bytes of the activations the last completed training step moved (per layer:
    /// the input to each node asked, each computed branch's output, the same backward).
    pub last_step_raw_bytes: Option<u64>,
}

/// The coordinator's cluster: its endpoint, its nodes, and what is known of them.
pub struct ClusterView {
    pub cfg: ClusterConfig,
    pub endpoint: Endpoint,
    pub runtime: tokio::runtime::Handle,
    pub peers: Vec<PeerId>,
    pub addrs: Vec<Multiaddr>,
    pub state: Mutex<ViewState>,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("peers", &self.peers)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Parses `cluster.nodes` fully (the config only checked their shape); the first that
/// does not parse is named.
pub fn parse_nodes(cfg: &ClusterConfig) -> Result<(Vec<PeerId>, Vec<Multiaddr>), FieldError> {
    let mut peers = Vec::new();
    let mut addrs = Vec::new();
    for (i, n) in cfg.nodes.iter().enumerate() {
        let peer: PeerId = n.id.parse().map_err(|e| {
            FieldError::new(
                format!("cluster.nodes[{i}].id"),
                format!("{:?}", n.id),
                format!("a libp2p peer id as printed by `mbtd node --print-id` ({e})"),
            )
        })?;
        let addr: Multiaddr = n.addr.parse().map_err(|e| {
            FieldError::new(
                format!("cluster.nodes[{i}].addr"),
                format!("{:?}", n.addr),
                format!("a multiaddr such as /ip4/10.0.0.2/tcp/7070 ({e})"),
            )
        })?;
        peers.push(peer);
        addrs.push(addr);
    }
    Ok((peers, addrs))
}

/// Starts the endpoint of `cfg` on the current runtime, keeps every node dialled, and
/// spawns the task that follows their connections. Nodes that are not up yet are no
/// error: their branches are masked until they connect.
pub async fn start(cfg: &ClusterConfig) -> Result<Arc<ClusterView>, ClusterStartError> {
    let (peers, addrs) = parse_nodes(cfg).map_err(ClusterStartError::Field)?;
    let listen = match &cfg.listen {
        None => None,
        Some(l) => Some(l.parse::<Multiaddr>().map_err(|e| {
            ClusterStartError::Field(FieldError::new(
                "cluster.listen",
                format!("{l:?}"),
                format!("a multiaddr such as /ip4/0.0.0.0/tcp/7070 ({e})"),
            ))
        })?),
    };
    let keypair = identity::load_or_create(&cfg.key_file)
        .map_err(|e| ClusterStartError::Identity(e.to_string()))?;
    let (endpoint, _incoming, events) = Endpoint::start(
        keypair,
        EndpointConfig {
            listen,
            allowed: peers.clone(),
            request_timeout: Duration::from_millis(cfg.deadline_ms),
            max_message_bytes: mbtd_cluster::endpoint::DEFAULT_MAX_MESSAGE_BYTES,
            kameo_global: false,
        },
    )
    .await
    .map_err(|e| ClusterStartError::Endpoint(e.to_string()))?;
    for (p, a) in peers.iter().zip(&addrs) {
        endpoint.keep_connected(*p, a.clone());
    }
    tracing::info!(
        event = crate::telemetry::names::events::CLUSTER_STARTED,
        peer_id = %endpoint.peer_id(),
        nodes = peers.len(),
        listen = ?endpoint.listen_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    );
    for p in &peers {
        metrics::gauge!(crate::telemetry::names::NODE_UP, "node" => p.to_string()).set(0.0);
    }
    metrics::counter!(crate::telemetry::names::STEPS_SKIPPED_QUORUM_TOTAL).increment(0);
    let view = Arc::new(ClusterView {
        cfg: cfg.clone(),
        endpoint,
        runtime: tokio::runtime::Handle::current(),
        state: Mutex::new(ViewState {
            nodes: vec![NodeState::default(); peers.len()],
            ..ViewState::default()
        }),
        peers,
        addrs,
    });
    tokio::spawn(follow(view.clone(), events));
    Ok(view)
}

/// Follows the nodes' connections until the endpoint stops.
async fn follow(view: Arc<ClusterView>, mut events: UnboundedReceiver<PeerEvent>) {
    while let Some(ev) = events.recv().await {
        match ev {
            PeerEvent::Up { peer, addr } => {
                let Some(h) = view.peers.iter().position(|p| *p == peer) else {
                    continue;
                };
                let rejoining = {
                    let mut st = view.state.lock().unwrap();
                    let n = &mut st.nodes[h];
                    n.connected = true;
                    n.rejoining
                };
                NodeUp {
                    node: h,
                    peer: &peer,
                    addr: &addr,
                    rejoining,
                }
                .emit();
            }
            PeerEvent::Down { peer } => {
                let Some(h) = view.peers.iter().position(|p| *p == peer) else {
                    continue;
                };
                {
                    let mut st = view.state.lock().unwrap();
                    let n = &mut st.nodes[h];
                    n.connected = false;
                    n.downs += 1;
                    n.rejoining = true;
                }
                NodeDown {
                    node: h,
                    peer: &peer,
                }
                .emit();
            }
            PeerEvent::Refused { peer, addr } => {
                view.state.lock().unwrap().refused += 1;
                NodeRefused {
                    peer: peer.as_ref(),
                    addr: &addr,
                }
                .emit();
            }
        }
    }
}

/// Seconds at quantile `q` of `v` (nearest rank); `None` when empty.
fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[((s.len() - 1) as f64 * q).round() as usize])
}

impl ClusterView {
    /// Each node's state word: `down`, `late` or `up` (see the module doc).
    fn states(&self, st: &ViewState) -> Vec<&'static str> {
        let records = st.records.as_ref().map(|r| r.lock().unwrap().clone());
        st.nodes
            .iter()
            .enumerate()
            .map(|(h, n)| {
                let suspect = records
                    .as_ref()
                    .and_then(|r| r.get(h))
                    .is_some_and(|r| r.suspect);
                if !n.connected {
                    "down"
                } else if suspect || n.parked {
                    "late"
                } else {
                    "up"
                }
            })
            .collect()
    }

    /// The answer of `ctl nodes`.
    pub fn nodes_report(&self) -> serde_json::Value {
        let traffic = self.endpoint.traffic();
        let st = self.state.lock().unwrap();
        let states = self.states(&st);
        let records = st.records.as_ref().map(|r| r.lock().unwrap().clone());
        let nodes: Vec<serde_json::Value> = self
            .peers
            .iter()
            .enumerate()
            .map(|(h, peer)| {
                let rec = records.as_ref().and_then(|r| r.get(h)).cloned();
                let rtts = rec.as_ref().map(|r| r.rtts.clone()).unwrap_or_default();
                let t = traffic.get(peer).copied().unwrap_or_default();
                serde_json::json!({
                    "node": h,
                    "id": peer.to_string(),
                    "addr": self.addrs[h].to_string(),
                    "state": states[h],
                    "branches": st.branches.get(h).cloned().unwrap_or_default(),
                    "rtt_p50_s": quantile(&rtts, 0.5),
                    "rtt_p99_s": quantile(&rtts, 0.99),
                    "last_step_answered": st.nodes[h].last_step,
                    "rounds_answered": rec.as_ref().map_or(0, |r| r.answered),
                    "rounds_missed": rec.as_ref().map_or(0, |r| r.missed),
                    "last_problem": rec.and_then(|r| r.last_problem),
                    "bytes_in": t.bytes_in,
                    "bytes_out": t.bytes_out,
                    "bytes_last_step": st.last_step_bytes.get(h),
                    "disconnections": st.nodes[h].downs,
                })
            })
            .collect();
        serde_json::json!({
            "coordinator": self.endpoint.peer_id().to_string(),
            "listen": self.endpoint.listen_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "step": st.step,
            "steps_skipped_quorum": st.steps_skipped_quorum,
            "peers_refused": st.refused,
            "wire_bytes_last_step": st.last_step_raw_bytes.map(|_| st.last_step_bytes.iter().sum::<u64>()),
            "raw_tensor_bytes_last_step": st.last_step_raw_bytes,
            "deadline_ms": self.cfg.deadline_ms,
            "wire": self.cfg.wire,
            "nodes": nodes,
        })
    }

    /// The short `cluster` section of `ctl status`.
    pub fn status_line(&self) -> serde_json::Value {
        let st = self.state.lock().unwrap();
        let states = self.states(&st);
        let count = |w: &str| states.iter().filter(|s| **s == w).count();
        serde_json::json!({
            "nodes": format!("{} up, {} late, {} down", count("up"), count("late"), count("down")),
            "steps_skipped_quorum": st.steps_skipped_quorum,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeEntry;

    #[test]
    fn nodes_that_do_not_parse_are_named() {
        let id = identity::peer_id(&mbtd_cluster::Keypair::generate_ed25519()).to_string();
        let mut cfg = ClusterConfig {
            nodes: vec![NodeEntry {
                id: id.clone(),
                addr: "/ip4/127.0.0.1/tcp/7070".into(),
            }],
            ..ClusterConfig::default()
        };
        let (peers, addrs) = parse_nodes(&cfg).unwrap();
        assert_eq!(peers[0].to_string(), id);
        assert_eq!(addrs[0].to_string(), "/ip4/127.0.0.1/tcp/7070");
        // base58 of the right length, but not a multihash
        cfg.nodes[0].id = "1".repeat(52);
        assert_eq!(parse_nodes(&cfg).unwrap_err().field, "cluster.nodes[0].id");
        cfg.nodes[0].id = id;
        cfg.nodes[0].addr = "/ip4/300.0.0.1/tcp/7070".into();
        assert_eq!(
            parse_nodes(&cfg).unwrap_err().field,
            "cluster.nodes[0].addr"
        );
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.99), Some(99.0));
    }
}
