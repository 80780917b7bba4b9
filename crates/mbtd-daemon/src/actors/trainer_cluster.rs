//! The trainer thread's side of `[cluster]`: it places branch `i < model.branches` of
//! every layer on node `i mod nodes` (branches added later by expansion stay here),
//! attaches them over a [`SwarmTransport`] (the thread blocks on the daemon's runtime for
//! each round), and keeps the nodes' state in line with the coordinator's copy:
//!
//! - attach (a fresh model, or a resumed one: the checkpoint's branches) pushes every
//!   node its branches; a node that does not take them is *parked*: not asked, its
//!   branches masked;
//! - a node whose connection closed is parked (it may have lost its state); a parked node
//!   that is connected and answers pings gets the coordinator's copy of its branches —
//!   the copy of the last checkpoint, or of the attach if none was taken since — and is
//!   asked again (`node_rejoined` when it had been down);
//! - a checkpoint pulls the branches of every node that gives them; a node that does not
//!   is parked, and the checkpoint holds the coordinator's last copy of its branches;
//! - a rollback attaches the restored model, which pushes its branches;
//! - `availability.min_active` is the quorum of every layer: a step short of it is tried
//!   again until `cluster.quorum_wait_ms` has passed, then skipped (see
//!   [`super::trainer_worker`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mbtd_cluster::{HostRecord, SwarmTransport};

use super::trainer_worker::Worker;
use crate::cluster::ClusterView;
use crate::cluster::events::{CheckpointWithoutNodes, GenerationNodeLost, NodeRejoined};
use crate::model::LostBranch;
use crate::model::remote::RemoteBranches;
use crate::model::train::StepReport;
use crate::model::{ModelError, Trainer};
use crate::telemetry::event::InternalEvent;
use crate::telemetry::names as n;

/// Least time between two pushes to the same parked node.
const PUSH_RETRY: Duration = Duration::from_millis(500);
/// Pause before the third and later tries of an abandoned step (the second goes at once).
pub(super) const QUORUM_RETRY: Duration = Duration::from_millis(50);

/// Branch `i` of layer `l` on node `i mod nodes` for `i < base`; the rest here.
pub(super) fn placement(widths: &[usize], base: usize, nodes: usize) -> Vec<Vec<Option<usize>>> {
    widths
        .iter()
        .map(|&k| {
            (0..k)
                .map(|i| (i < base && nodes > 0).then_some(i % nodes.max(1)))
                .collect()
        })
        .collect()
}

/// Raw bytes of the activations a training step moved: per layer, `h` to each node that
/// computed a branch and each computed branch's `z` back, then `∂L/∂h'` to each of those
/// nodes and each branch's `∂L/∂h` back, every tensor `tensor_bytes` (positions × d ×
/// bytes per element). Branches computed in this process move nothing.
pub(super) fn raw_step_bytes(
    placement: &[Vec<Option<usize>>],
    computed: &[Vec<bool>],
    tensor_bytes: usize,
) -> u64 {
    let tensors: usize = placement
        .iter()
        .zip(computed)
        .map(|(hosts, on)| {
            let mut used: Vec<usize> = hosts
                .iter()
                .zip(on)
                .filter_map(|(h, &c)| h.filter(|_| c))
                .collect();
            let branches = used.len();
            used.sort_unstable();
            used.dedup();
            2 * (used.len() + branches)
        })
        .sum();
    (tensors * tensor_bytes) as u64
}

/// Whether a failed step is the cluster's doing (tried again, then skipped).
pub(super) fn retryable(e: &ModelError) -> bool {
    matches!(e, ModelError::Quorum { .. } | ModelError::Cluster(_))
}

/// The trainer's link to its nodes.
pub(super) struct ClusterLink {
    view: Arc<ClusterView>,
    records: Arc<Mutex<Vec<HostRecord>>>,
    quorum: usize,
    /// Disconnections of each node already acted on.
    seen_downs: Vec<u64>,
    last_push: Vec<Option<Instant>>,
    /// Per layer and branch, deadline misses already counted in the metrics.
    seen_missed: [Vec<Vec<u64>>; 3],
    /// Per node, answered rounds whose round trip is already in the histogram.
    seen_answered: Vec<u64>,
    /// Per node, payload bytes in plus out when the step about to run started.
    step_start_bytes: Vec<u64>,
}

impl ClusterLink {
    /// Places the branches of `trainer` on the nodes of `view` with quorum `quorum`.
    pub(super) fn attach(view: Arc<ClusterView>, trainer: &mut Trainer, quorum: usize) -> Self {
        let nodes = view.peers.len();
        let seen_downs = view
            .state
            .lock()
            .unwrap()
            .nodes
            .iter()
            .map(|n| n.downs)
            .collect();
        let mut link = Self {
            seen_downs,
            records: Arc::new(Mutex::new(Vec::new())),
            quorum,
            last_push: vec![None; nodes],
            seen_missed: Default::default(),
            seen_answered: vec![0; nodes],
            step_start_bytes: vec![0; nodes],
            view,
        };
        let remote = link.fresh_remote(trainer);
        link.install(trainer, remote);
        link
    }

    /// A new transport and placement for `trainer`'s widths.
    fn fresh_remote(&mut self, trainer: &Trainer) -> RemoteBranches {
        let v = &self.view;
        let transport = SwarmTransport::new(
            v.endpoint.clone(),
            v.runtime.clone(),
            v.peers.clone(),
            Duration::from_millis(v.cfg.deadline_ms),
        );
        self.records = transport.records();
        self.seen_answered = vec![0; v.peers.len()];
        self.seen_missed = Default::default();
        let model = trainer.model();
        let placement = placement(&model.widths(), model.config.branches, v.peers.len());
        let mut remote = RemoteBranches::new(placement, Box::new(transport), v.cfg.wire);
        remote.set_quorum(self.quorum);
        remote.set_max_output_norm_ratio(v.cfg.max_output_norm_ratio);
        remote
    }

    /// Attaches `remote` to `trainer` (pushing every node its branches) and publishes the
    /// placement.
    fn install(&mut self, trainer: &mut Trainer, remote: RemoteBranches) {
        let mut per_node = vec![Vec::new(); self.view.peers.len()];
        for (l, row) in remote.placement().iter().enumerate() {
            for (i, h) in row.iter().enumerate() {
                if let Some(h) = h {
                    per_node[*h].push((l, i));
                }
            }
        }
        match trainer.attach_remote_reachable(remote) {
            Ok(failed) if !failed.is_empty() => tracing::warn!(actor = "trainer", nodes = ?failed,
                "these nodes did not take their branches; they are masked until they do"),
            Ok(_) => {}
            // the placement is built from the model's own widths
            Err(e) => tracing::error!(actor = "trainer", error = %e, "cannot place the branches"),
        }
        let now = Instant::now();
        self.last_push.iter_mut().for_each(|t| *t = Some(now));
        let mut st = self.view.state.lock().unwrap();
        st.records = Some(self.records.clone());
        st.branches = per_node;
        st.step = trainer.step();
    }

    /// Rollback: the branches go with the restored model `new` (and are pushed from it).
    pub(super) fn reattach(&mut self, old: &mut Trainer, new: &mut Trainer) {
        let remote = match old.detach_remote() {
            Some(r) if r.placement().iter().map(Vec::len).eq(new.model().widths()) => r,
            _ => self.fresh_remote(new),
        };
        self.install(new, remote);
    }

    /// Between steps: parks the nodes that went down, pushes the coordinator's copy to
    /// parked nodes that are connected and answer.
    pub(super) fn before_step(&mut self, trainer: &mut Trainer) {
        let (downs, connected, rejoining): (Vec<u64>, Vec<bool>, Vec<bool>) = {
            let st = self.view.state.lock().unwrap();
            (
                st.nodes.iter().map(|n| n.downs).collect(),
                st.nodes.iter().map(|n| n.connected).collect(),
                st.nodes.iter().map(|n| n.rejoining).collect(),
            )
        };
        let Some(remote) = trainer.remote_mut() else {
            return;
        };
        for (h, &d) in downs.iter().enumerate() {
            if d != self.seen_downs[h] {
                self.seen_downs[h] = d;
                remote.park(h);
            }
        }
        let suspect = HostRecord::suspects(&self.records);
        for h in remote.parked() {
            let due = self.last_push[h].is_none_or(|t| t.elapsed() >= PUSH_RETRY);
            if !connected[h] || suspect.get(h).copied().unwrap_or(false) || !due {
                continue;
            }
            self.last_push[h] = Some(Instant::now());
            if trainer.push_branches_reachable(Some(h)).is_empty() && rejoining[h] {
                self.view.state.lock().unwrap().nodes[h].rejoining = false;
                NodeRejoined {
                    node: h,
                    peer: &self.view.peers[h],
                    step: trainer.step(),
                }
                .emit();
            }
        }
        self.publish(trainer, None);
        self.step_start_bytes = self.node_bytes();
    }

    /// Per node, payload bytes in plus out so far.
    fn node_bytes(&self) -> Vec<u64> {
        let traffic = self.view.endpoint.traffic();
        self.view
            .peers
            .iter()
            .map(|p| traffic.get(p).map_or(0, |t| t.bytes_in + t.bytes_out))
            .collect()
    }

    /// After a step (or a skipped one): the view and the metrics.
    pub(super) fn publish(&mut self, trainer: &Trainer, done: Option<&StepReport>) {
        let Some(remote) = trainer.remote() else {
            return;
        };
        let parked = remote.parked();
        let mut st = self.view.state.lock().unwrap();
        st.step = trainer.step();
        for (h, node) in st.nodes.iter_mut().enumerate() {
            node.parked = parked.contains(&h);
        }
        if let Some(r) = done {
            let d_model = trainer.model().config.d_model;
            st.last_step_raw_bytes = Some(raw_step_bytes(
                remote.placement(),
                &r.computed,
                r.tokens * d_model * self.view.cfg.wire.bytes(),
            ));
            st.last_step_bytes = self
                .node_bytes()
                .iter()
                .zip(&self.step_start_bytes)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect();
            for (h, keys) in st.branches.clone().iter().enumerate() {
                if keys
                    .iter()
                    .any(|&(l, i)| r.computed.get(l).and_then(|c| c.get(i)) == Some(&true))
                {
                    st.nodes[h].last_step = Some(r.step);
                }
            }
        }
        drop(st);
        let stats = remote.stats();
        let counts = [&stats.missed, &stats.non_finite, &stats.out_of_line];
        for (k, (counts, seen)) in counts.into_iter().zip(&mut self.seen_missed).enumerate() {
            seen.resize(counts.len(), Vec::new());
            for (l, (row, seen)) in counts.iter().zip(seen.iter_mut()).enumerate() {
                seen.resize(row.len(), 0);
                for (i, (&now, was)) in row.iter().zip(seen.iter_mut()).enumerate() {
                    if now <= *was {
                        continue;
                    }
                    let (layer, branch) = (l.to_string(), i.to_string());
                    let c = match k {
                        0 => metrics::counter!(n::BRANCH_DEADLINE_MISSES_TOTAL,
                            "layer" => layer, "branch" => branch),
                        1 => metrics::counter!(n::BRANCH_OUTPUTS_REJECTED_TOTAL,
                            "layer" => layer, "branch" => branch, "reason" => "non_finite"),
                        _ => metrics::counter!(n::BRANCH_OUTPUTS_REJECTED_TOTAL,
                            "layer" => layer, "branch" => branch, "reason" => "norm"),
                    };
                    c.increment(now - *was);
                    *was = now;
                }
            }
        }
        let records = self.records.lock().unwrap();
        for (h, rec) in records.iter().enumerate() {
            let new = rec.answered.saturating_sub(self.seen_answered[h]) as usize;
            let hist =
                metrics::histogram!(n::NODE_RTT_SECONDS, "node" => self.view.peers[h].to_string());
            for &rtt in &rec.rtts[rec.rtts.len().saturating_sub(new)..] {
                hist.record(rtt);
            }
            self.seen_answered[h] = rec.answered;
        }
        let (bytes_in, bytes_out) = self
            .view
            .endpoint
            .traffic()
            .values()
            .fold((0, 0), |(i, o), t| (i + t.bytes_in, o + t.bytes_out));
        metrics::counter!(n::CLUSTER_BYTES_TOTAL, "direction" => "in").absolute(bytes_in);
        metrics::counter!(n::CLUSTER_BYTES_TOTAL, "direction" => "out").absolute(bytes_out);
    }

    /// A step skipped for its quorum.
    pub(super) fn skipped(&self) {
        self.view.state.lock().unwrap().steps_skipped_quorum += 1;
    }

    /// Before checkpoint bytes are taken: the nodes' branches into the coordinator's copy.
    pub(super) fn pull(&mut self, trainer: &mut Trainer) -> Result<(), String> {
        let failed = trainer
            .pull_branches_reachable()
            .map_err(|e| format!("cannot bring the nodes' branches back: {e}"))?;
        if !failed.is_empty() {
            CheckpointWithoutNodes {
                step: trainer.step(),
                nodes: &failed,
            }
            .emit();
        }
        self.publish(trainer, None);
        Ok(())
    }
}

impl ClusterLink {
    /// After a generation: logs each node whose branches it lost once
    /// ([`GenerationNodeLost`]) and describes every masked branch for the response:
    /// `[{layer, branch, node, position, why}]` (`node`: its peer id).
    pub(super) fn generation_lost(
        &self,
        trainer: &Trainer,
        lost: &[LostBranch],
    ) -> serde_json::Value {
        let placement = trainer
            .remote()
            .map(|r| r.placement().to_vec())
            .unwrap_or_default();
        let node_of = |b: &LostBranch| {
            placement
                .get(b.layer)
                .and_then(|r| r.get(b.branch))
                .copied()
                .flatten()
        };
        let mut nodes: Vec<usize> = lost.iter().filter_map(node_of).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for h in nodes {
            let mine: Vec<&LostBranch> = lost.iter().filter(|b| node_of(b) == Some(h)).collect();
            let keys: Vec<(usize, usize)> = mine.iter().map(|b| (b.layer, b.branch)).collect();
            GenerationNodeLost {
                node: h,
                peer: &self.view.peers[h],
                branches: &keys,
                position: mine.iter().map(|b| b.position).min().unwrap_or(0),
                why: &mine[0].why,
            }
            .emit();
        }
        lost.iter()
            .map(|b| {
                serde_json::json!({
                    "layer": b.layer,
                    "branch": b.branch,
                    "node": node_of(b).map(|h| self.view.peers[h].to_string()),
                    "position": b.position,
                    "why": b.why,
                })
            })
            .collect()
    }
}

impl Worker {
    /// The nodes' state brought in line before a step or a checkpoint (no-op alone).
    pub(super) fn cluster_sync(&mut self) {
        if let Some(link) = self.cluster.as_mut() {
            link.before_step(&mut self.live.trainer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_go_round_robin_and_expansions_stay_here() {
        assert_eq!(
            placement(&[3, 5], 3, 2),
            vec![
                vec![Some(0), Some(1), Some(0)],
                vec![Some(0), Some(1), Some(0), None, None]
            ]
        );
        assert_eq!(placement(&[2], 2, 3), vec![vec![Some(0), Some(1)]]);
    }

    #[test]
    fn raw_bytes_count_one_input_per_node_and_one_output_per_branch() {
        // layer 0: branches 0 and 2 on node 0, 1 on node 1, all computed: 2 nodes, 3
        // branches; layer 1: branch 0 masked, branch 1 on node 1, branch 2 local
        let placement = vec![
            vec![Some(0), Some(1), Some(0)],
            vec![Some(0), Some(1), None],
        ];
        let computed = vec![vec![true, true, true], vec![false, true, true]];
        assert_eq!(
            raw_step_bytes(&placement, &computed, 10),
            (2 * (2 + 3) + 2 * (1 + 1)) * 10
        );
        assert_eq!(
            raw_step_bytes(&placement, &[vec![false; 3], vec![false; 3]], 10),
            0
        );
    }

    #[test]
    fn only_the_clusters_failures_are_tried_again() {
        let q = ModelError::Quorum {
            layer: 0,
            step: 1,
            answered: 0,
            need: 1,
        };
        assert!(retryable(&q));
        assert!(retryable(&ModelError::Cluster("x".into())));
        assert!(!retryable(&ModelError::NonFinite {
            step: 1,
            loss: f32::NAN,
            grad_norm: 0.0
        }));
    }
}
