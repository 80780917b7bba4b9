//! The cluster's internal events (see [`crate::telemetry::event`]): a node's connection
//! going up or down, its return with its branches, a refused peer, a step skipped for
//! its quorum, a checkpoint that went ahead without some nodes, a generation that went
//! on without a node's branches.

use mbtd_cluster::{Multiaddr, PeerId};

use crate::telemetry::event::InternalEvent;
use crate::telemetry::names::{self as n, events};

/// A node's connection is up (`node_up`); a returning node logs `node_rejoined` once it
/// has its branches back ([`NodeRejoined`]).
pub struct NodeUp<'a> {
    pub node: usize,
    pub peer: &'a PeerId,
    pub addr: &'a Multiaddr,
    /// It was down before (its branches are pushed before it is asked again).
    pub rejoining: bool,
}

impl InternalEvent for NodeUp<'_> {
    fn emit(self) {
        tracing::info!(event = events::NODE_UP, node = self.node, peer = %self.peer,
            addr = %self.addr, rejoining = self.rejoining, "branch host connected");
        metrics::gauge!(n::NODE_UP, "node" => self.peer.to_string()).set(1.0);
    }
}

/// A node's last connection closed: its branches are masked until it comes back.
pub struct NodeDown<'a> {
    pub node: usize,
    pub peer: &'a PeerId,
}

impl InternalEvent for NodeDown<'_> {
    fn emit(self) {
        tracing::warn!(event = events::NODE_DOWN, node = self.node, peer = %self.peer,
            "branch host disconnected; its branches are masked until it returns");
        metrics::gauge!(n::NODE_UP, "node" => self.peer.to_string()).set(0.0);
    }
}

/// A node that was down took the coordinator's copy of its branches and is asked again.
pub struct NodeRejoined<'a> {
    pub node: usize,
    pub peer: &'a PeerId,
    /// The trainer's step when its branches were pushed.
    pub step: u64,
}

impl InternalEvent for NodeRejoined<'_> {
    fn emit(self) {
        tracing::info!(event = events::NODE_REJOINED, node = self.node, peer = %self.peer,
            step = self.step, "branch host back in service with the coordinator's copy of its branches");
    }
}

/// A peer not in `cluster.nodes` tried to connect, or a node's address answered with an
/// identity other than the one listed for it.
pub struct NodeRefused<'a> {
    pub peer: Option<&'a PeerId>,
    pub addr: &'a Multiaddr,
}

impl InternalEvent for NodeRefused<'_> {
    fn emit(self) {
        tracing::warn!(event = events::NODE_REFUSED, peer = ?self.peer.map(|p| p.to_string()),
            addr = %self.addr, "refused a peer whose identity is not in cluster.nodes (it connected, or it answered at a node's address); check cluster.nodes and the node's identity.key");
        metrics::counter!(n::CLUSTER_PEERS_REFUSED_TOTAL).increment(1);
    }
}

/// A step skipped: a layer stayed short of its quorum for `cluster.quorum_wait_ms`. Its
/// rows are trained by a later step.
pub struct StepSkippedQuorum<'a> {
    pub step: u64,
    pub waited_s: f64,
    pub error: &'a str,
}

impl InternalEvent for StepSkippedQuorum<'_> {
    fn emit(self) {
        tracing::warn!(
            event = events::STEP_SKIPPED_QUORUM,
            actor = "trainer",
            step = self.step,
            waited_s = self.waited_s,
            error = self.error,
            "step skipped for its quorum; its rows are trained later"
        );
        metrics::counter!(n::STEPS_SKIPPED_QUORUM_TOTAL).increment(1);
    }
}

/// A checkpoint holds the coordinator's last copy of the branches of `nodes` (they did
/// not give theirs: down, late or awaiting their branches).
pub struct CheckpointWithoutNodes<'a> {
    pub step: u64,
    pub nodes: &'a [usize],
}

impl InternalEvent for CheckpointWithoutNodes<'_> {
    fn emit(self) {
        tracing::warn!(event = events::CHECKPOINT_WITHOUT_NODES, actor = "trainer",
            step = self.step, nodes = ?self.nodes,
            "checkpoint holds the coordinator's last copy of these nodes' branches");
    }
}

/// A generation went on without node `node`'s branches: they gave no usable output from
/// context position `position` on (0: the whole generation) and were masked, their
/// layers renormalised. Logged once per node and generation.
pub struct GenerationNodeLost<'a> {
    pub node: usize,
    pub peer: &'a PeerId,
    /// `(layer, branch)` masked.
    pub branches: &'a [(usize, usize)],
    pub position: usize,
    pub why: &'a str,
}

impl InternalEvent for GenerationNodeLost<'_> {
    fn emit(self) {
        tracing::warn!(event = events::GENERATION_NODE_LOST, actor = "trainer", node = self.node,
            peer = %self.peer, branches = ?self.branches, position = self.position, why = self.why,
            "generation goes on without this node's branches; their layers are renormalised");
        metrics::counter!(n::GENERATION_BRANCHES_MASKED_TOTAL)
            .increment(self.branches.len() as u64);
    }
}
