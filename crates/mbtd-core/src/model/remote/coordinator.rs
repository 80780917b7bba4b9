//! Why over 600 lines: the step protocol's three passes (forward, backward, update) and
//! the state moves (push, pull, each strict and tolerant of hosts that are away) share
//! the placement, the rounds and the counters; norm control is in [`super::norm`].
//!
//! [`RemoteBranches`]: the coordinator's side of the step protocol, behind the trainer's
//! `LayerBranches` interface, over any [`Transport`] that moves encoded requests to hosts
//! and encoded replies back.
//!
//! Per layer the coordinator sends one [`Forward`] to each host of the layer's computed
//! branches, computes the branches placed in this process meanwhile, and keeps every
//! output it gets back. A branch whose output is missing — no reply in the transport's
//! time, a refusal, a malformed reply, or any non-finite value — is masked for the pass:
//! its mask bit is cleared and `α̃` renormalised, the availability maths the trainer
//! already has, and it is counted ([`ClusterStats`]). The host of a masked branch gets
//! no backward and no update for that step. Backward sends `∂L/∂h'` and each branch's
//! `α̃_i`; the replies give each branch's part of `∂L/∂h` and `‖G_i‖²`, and the
//! coordinator computes `g_i = ⟨∂L/∂h', z_i⟩` from the outputs it holds. A missing
//! backward abandons the step before anything is updated (the gradients of the rest of
//! the model already include that branch's output).
//!
//! A host can be *parked* ([`RemoteBranches::park`]): its state is not known to match
//! the coordinator's copy (it went down, restarted, or missed a pull or an update), so it
//! is not asked and its branches are masked until a push of the coordinator's copy to it
//! succeeds. With a quorum set ([`RemoteBranches::set_quorum`]) a training pass in which
//! fewer than `min(quorum, branches asked)` branches of a layer answered is abandoned
//! with [`ModelError::Quorum`] before any update.

use super::norm::NormGuard;
use super::protocol::{
    AdamWStep, Backward, BranchKey, BranchState, Forward, Open, Reply, Request, Update,
};
use super::wire::{WirePrecision, decode_reply, encode_request};
use crate::model::ModelError;
use crate::model::agg;
use crate::model::block::fit;
use crate::model::branches::{
    Done, LayerBranches, LayerGrads, LayerInput, backward_here, forward_here,
};
use crate::model::net::LayerWs;
use crate::model::ops::dot_f64;

/// Moves encoded requests to branch hosts and their encoded replies back.
pub trait Transport {
    /// One round: sends every `(host, request)` (at most one per host) and returns, in the
    /// same order, each host's reply, or `None` where a host gave none in time.
    fn exchange(&mut self, requests: Vec<(usize, Vec<u8>)>) -> Vec<Option<Vec<u8>>>;
}

/// Counters of the remote branches since they were attached.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterStats {
    /// Per layer, per branch: passes in which the branch's output was missing (no reply,
    /// refusal, malformed reply) and the branch was masked.
    pub missed: Vec<Vec<u64>>,
    /// Per layer, per branch: outputs with a NaN or infinite value, masked.
    pub non_finite: Vec<Vec<u64>>,
    /// Per layer, per branch: outputs out of line with the layer's running median norm
    /// ([`super::NormGuard`]), masked.
    pub out_of_line: Vec<Vec<u64>>,
    /// Training steps abandoned before any update: a backward reply was missing, or no
    /// branch of a layer was left to compute.
    pub steps_abandoned: u64,
    /// Update requests a host did not acknowledge in full (that host's copy may differ
    /// from the coordinator's view until its branches are pushed again).
    pub updates_unacked: u64,
    /// Bytes of requests handed to the transport.
    pub bytes_sent: u64,
    /// Bytes of replies received.
    pub bytes_received: u64,
    /// The last problem met, for diagnostics.
    pub last_problem: Option<String>,
}

/// Branches placed on hosts: the placement, the transport and the per-step state.
pub struct RemoteBranches {
    /// `placement[l][i]`: the host of branch `i` of layer `l`; `None` in this process.
    placement: Vec<Vec<Option<usize>>>,
    hosts: usize,
    transport: Box<dyn Transport + Send>,
    wire: WirePrecision,
    /// `‖G_i‖²` reported by the hosts in this step's backward.
    sq_norms: Vec<Vec<Option<f64>>>,
    stats: ClusterStats,
    /// The hosts hold updates the coordinator's copy of their branches lacks.
    stale: bool,
    /// Step number sent with evaluation passes (the next training step).
    next_step: u64,
    /// `parked[h]`: host `h` is not asked until a push to it succeeds.
    parked: Vec<bool>,
    /// Fewest branches of a layer that must answer a training pass (0: no quorum).
    quorum: usize,
    norms: NormGuard,
    /// The branches masked by the last forward, with why.
    pub(super) misses: Vec<(usize, String)>,
    /// Id of the next generation session.
    next_session: u64,
}

impl std::fmt::Debug for RemoteBranches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBranches")
            .field("placement", &self.placement)
            .field("wire", &self.wire)
            .field("stats", &self.stats)
            .field("stale", &self.stale)
            .finish_non_exhaustive()
    }
}

/// Why a remote branch's output was not used.
#[derive(Clone, Copy)]
enum Miss {
    /// No reply in time, a refusal, a malformed reply, or a parked host.
    NoAnswer,
    NonFinite,
    OutOfLine,
}

/// Decodes a reply; `None` (no reply), a refusal or an undecodable frame is the error.
pub(super) fn read_reply(bytes: Option<Vec<u8>>, host: usize, what: &str) -> Result<Reply, String> {
    let bytes = bytes.ok_or_else(|| format!("host {host} gave no {what} reply in time"))?;
    match decode_reply(&bytes) {
        Ok((Reply::Refused(msg), _)) => Err(format!("host {host} refused the {what}: {msg}")),
        Ok((reply, _)) => Ok(reply),
        Err(e) => Err(format!("host {host}: undecodable {what} reply: {e}")),
    }
}

impl RemoteBranches {
    /// Branches placed by `placement[l][i]` (a host index, or `None` for this process),
    /// reached through `transport`, activations in `wire` precision. The trainer checks
    /// the placement against the model's widths when it is attached.
    pub fn new(
        placement: Vec<Vec<Option<usize>>>,
        transport: Box<dyn Transport + Send>,
        wire: WirePrecision,
    ) -> Self {
        let hosts = placement
            .iter()
            .flatten()
            .flatten()
            .max()
            .map_or(0, |&h| h + 1);
        let zeros = |p: &Vec<Vec<Option<usize>>>| p.iter().map(|r| vec![0; r.len()]).collect();
        Self {
            stats: ClusterStats {
                missed: zeros(&placement),
                non_finite: zeros(&placement),
                out_of_line: zeros(&placement),
                ..ClusterStats::default()
            },
            sq_norms: placement.iter().map(|r| vec![None; r.len()]).collect(),
            placement,
            hosts,
            transport,
            wire,
            stale: false,
            next_step: 0,
            parked: vec![false; hosts],
            quorum: 0,
            norms: NormGuard::new(0.0),
            misses: Vec::new(),
            // distinct from the ids of an earlier coordinator process a host may still hold
            next_session: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |t| t.as_nanos() as u64),
        }
    }

    /// A fresh generation session id.
    pub(super) fn new_session(&mut self) -> u64 {
        self.next_session = self.next_session.wrapping_add(1);
        self.next_session
    }

    /// Whether host `host` is parked.
    pub(super) fn is_parked(&self, host: usize) -> bool {
        self.parked.get(host).copied().unwrap_or(false)
    }

    /// Host of branch `i` of layer `l` (`None`: in this process).
    pub(super) fn host_of(&self, l: usize, i: usize) -> Option<usize> {
        self.placement
            .get(l)
            .and_then(|r| r.get(i))
            .copied()
            .flatten()
    }

    /// Counts a generation output of branch `i` of layer `l` that could not be used.
    pub(super) fn count_miss(&mut self, l: usize, i: usize, non_finite: bool, why: String) {
        let counter = match non_finite {
            true => &mut self.stats.non_finite,
            false => &mut self.stats.missed,
        };
        counter[l][i] += 1;
        self.problem(why);
    }

    /// Number of hosts (one more than the largest host index placed).
    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// Stops asking host `host` until a push of the coordinator's copy to it succeeds.
    pub fn park(&mut self, host: usize) {
        if let Some(p) = self.parked.get_mut(host) {
            *p = true;
        }
    }

    /// The parked hosts, ascending.
    pub fn parked(&self) -> Vec<usize> {
        (0..self.hosts).filter(|&h| self.parked[h]).collect()
    }

    /// Masks outputs whose RMS exceeds `ratio` × the layer's running median (0: off).
    pub fn set_max_output_norm_ratio(&mut self, ratio: f64) {
        self.norms = NormGuard::new(ratio);
    }

    /// Sets the quorum of training passes: with `q > 0`, a layer in which fewer than
    /// `min(q, branches asked)` branches answered abandons the step ([`ModelError::Quorum`]).
    pub fn set_quorum(&mut self, q: usize) {
        self.quorum = q;
    }

    /// Host of each branch (`None`: in this process).
    pub fn placement(&self) -> &[Vec<Option<usize>>] {
        &self.placement
    }

    /// Counters since attachment.
    pub fn stats(&self) -> &ClusterStats {
        &self.stats
    }

    /// Whether the hosts hold updates not yet pulled into the coordinator's copy.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Whether branch `i` of layer `l` is on a host.
    pub(crate) fn is_remote(&self, l: usize, i: usize) -> bool {
        matches!(self.placement.get(l).and_then(|r| r.get(i)), Some(Some(_)))
    }

    /// `‖G_i‖²` of a remote branch from this step's backward (NaN when it is missing, so
    /// the step is refused); `None` for a branch in this process.
    pub(crate) fn sq_norm(&self, l: usize, i: usize) -> Option<f64> {
        self.is_remote(l, i)
            .then(|| self.sq_norms[l][i].unwrap_or(f64::NAN))
    }

    /// Widths of the placement.
    pub(crate) fn widths(&self) -> Vec<usize> {
        self.placement.iter().map(Vec::len).collect()
    }

    /// `m` new branches of layer `l`, in this process.
    pub(crate) fn add_local(&mut self, l: usize, m: usize) {
        let k = self.placement[l].len() + m;
        self.placement[l].resize(k, None);
        self.sq_norms[l].resize(k, None);
        self.stats.missed[l].resize(k, 0);
        self.stats.non_finite[l].resize(k, 0);
        self.stats.out_of_line[l].resize(k, 0);
    }

    /// Every remote branch grouped by host: `keys[host]`.
    pub(crate) fn by_host(&self) -> Vec<Vec<BranchKey>> {
        let mut keys = vec![Vec::new(); self.hosts];
        for (l, row) in self.placement.iter().enumerate() {
            for (i, host) in row.iter().enumerate() {
                if let Some(h) = host {
                    keys[*h].push((l, i));
                }
            }
        }
        keys
    }

    pub(super) fn problem(&mut self, msg: String) {
        self.stats.last_problem = Some(msg);
    }

    /// Encodes, exchanges and counts one round.
    pub(super) fn round(&mut self, requests: Vec<(usize, Request)>) -> Vec<Option<Vec<u8>>> {
        let frames: Vec<(usize, Vec<u8>)> = requests
            .iter()
            .map(|(h, r)| (*h, encode_request(r, self.wire)))
            .collect();
        self.stats.bytes_sent += frames.iter().map(|(_, f)| f.len() as u64).sum::<u64>();
        let replies = self.transport.exchange(frames);
        self.stats.bytes_received += replies
            .iter()
            .flatten()
            .map(|r| r.len() as u64)
            .sum::<u64>();
        let mut replies = replies;
        replies.resize(requests.len(), None);
        replies
    }

    /// The computed remote branches of layer `l` grouped by host.
    fn computed_by_host(&self, l: usize, lw: &LayerWs) -> Vec<(usize, Vec<usize>)> {
        let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
        for host in 0..self.hosts {
            let mine: Vec<usize> = (0..lw.computed.len())
                .filter(|&i| lw.computed[i] && self.placement[l][i] == Some(host))
                .collect();
            if !mine.is_empty() {
                out.push((host, mine));
            }
        }
        out
    }

    /// Sends the updates `(layer, branch, k)` of step `step` and checks the
    /// acknowledgements (a host that does not acknowledge is counted, not fatal).
    pub(crate) fn update(&mut self, step: u64, adamw: AdamWStep, ks: &[(usize, usize, f32)]) {
        let mut requests = Vec::new();
        let mut sent: Vec<Vec<BranchKey>> = Vec::new();
        for (host, keys) in self.by_host().into_iter().enumerate() {
            let branches: Vec<(usize, usize, f32)> = ks
                .iter()
                .copied()
                .filter(|&(l, i, _)| keys.contains(&(l, i)))
                .collect();
            if !branches.is_empty() {
                sent.push(branches.iter().map(|&(l, i, _)| (l, i)).collect());
                let u = Update {
                    step,
                    adamw,
                    branches,
                };
                requests.push((host, Request::Update(u)));
            }
        }
        let hosts: Vec<usize> = requests.iter().map(|(h, _)| *h).collect();
        let replies = self.round(requests);
        for ((host, sent), reply) in hosts.into_iter().zip(sent).zip(replies) {
            match read_reply(reply, host, "update") {
                Ok(Reply::Update(r)) if r.step == step && r.applied == sent => {}
                Ok(other) => {
                    self.stats.updates_unacked += 1;
                    self.park(host);
                    self.problem(format!(
                        "host {host}: update of step {step} not applied in full ({other:?} for {sent:?})"
                    ));
                }
                Err(e) => {
                    self.stats.updates_unacked += 1;
                    self.park(host);
                    self.problem(e);
                }
            }
        }
        self.stale = true;
        self.next_step = step + 1;
    }

    /// Sends each host the state of its branches, one branch per host per round; an error
    /// when a host does not take them all (the other hosts still get theirs).
    pub(crate) fn push(&mut self, states: Vec<BranchState>) -> Result<(), ModelError> {
        let failed = self.push_reachable(states)?;
        if failed.is_empty() {
            return Ok(());
        }
        let why = self.stats.last_problem.clone().unwrap_or_default();
        Err(ModelError::Cluster(format!(
            "hosts {failed:?} did not take their branches ({why})"
        )))
    }

    /// Sends each host the state of its branches, one branch per host per round. A host
    /// that does not take one is parked and skipped for the rest of the push; the hosts
    /// that took all of theirs are unparked. Returns the hosts that failed; an error only
    /// for a state of a branch that is not placed on a host.
    pub(crate) fn push_reachable(
        &mut self,
        mut states: Vec<BranchState>,
    ) -> Result<Vec<usize>, ModelError> {
        let mut queues: Vec<Vec<BranchState>> = vec![Vec::new(); self.hosts];
        for s in states.drain(..) {
            let Some(Some(h)) = self.placement.get(s.layer).and_then(|r| r.get(s.branch)) else {
                return Err(ModelError::Cluster(format!(
                    "branch ({}, {}) is not placed on a host",
                    s.layer, s.branch
                )));
            };
            queues[*h].push(s);
        }
        let pushed: Vec<bool> = queues.iter().map(|q| !q.is_empty()).collect();
        queues.iter_mut().for_each(|q| q.reverse());
        let mut failed = Vec::new();
        while queues.iter().any(|q| !q.is_empty()) {
            let requests: Vec<(usize, Request)> = queues
                .iter_mut()
                .enumerate()
                .filter_map(|(h, q)| q.pop().map(|s| (h, Request::Push(vec![s]))))
                .collect();
            let hosts: Vec<usize> = requests.iter().map(|(h, _)| *h).collect();
            let replies = self.round(requests);
            for (host, reply) in hosts.into_iter().zip(replies) {
                let problem = match read_reply(reply, host, "push") {
                    Ok(Reply::Pushed(_)) => continue,
                    Ok(other) => format!("host {host} answered a push with a {}", other.name()),
                    Err(e) => e,
                };
                self.problem(problem);
                self.park(host);
                queues[host].clear();
                failed.push(host);
            }
        }
        for (h, &p) in pushed.iter().enumerate() {
            if p && !failed.contains(&h) {
                self.parked[h] = false;
            }
        }
        Ok(failed)
    }

    /// One round of pulls: the next branch of every host's queue (popped from its end),
    /// each with the state received or what went wrong.
    fn pull_round(
        &mut self,
        queues: &mut [Vec<BranchKey>],
    ) -> Vec<(usize, Result<BranchState, String>)> {
        let requests: Vec<(usize, BranchKey)> = queues
            .iter_mut()
            .enumerate()
            .filter_map(|(h, q)| q.pop().map(|k| (h, k)))
            .collect();
        let frames = requests
            .iter()
            .map(|&(h, k)| (h, Request::Pull(vec![k])))
            .collect();
        let replies = self.round(frames);
        requests
            .into_iter()
            .zip(replies)
            .map(|((host, key), reply)| {
                let state = match read_reply(reply, host, "pull") {
                    Ok(Reply::Pulled(mut s))
                        if s.len() == 1 && (s[0].layer, s[0].branch) == key =>
                    {
                        Ok(s.pop().expect("one state"))
                    }
                    Ok(other) => Err(format!(
                        "host {host} answered the pull of branch {key:?} with a {}",
                        other.name()
                    )),
                    Err(e) => Err(e),
                };
                (host, state)
            })
            .collect()
    }

    /// Fetches the state of every remote branch, one branch per host per round.
    pub(crate) fn pull(&mut self) -> Result<Vec<BranchState>, ModelError> {
        let mut queues = self.by_host();
        queues.iter_mut().for_each(|q| q.reverse());
        let mut out = Vec::new();
        while queues.iter().any(|q| !q.is_empty()) {
            for (_, state) in self.pull_round(&mut queues) {
                out.push(state.map_err(ModelError::Cluster)?);
            }
        }
        self.stale = false;
        Ok(out)
    }

    /// Fetches the state of every remote branch from the hosts that give it, one branch
    /// per host per round. A parked host is not asked; a host that fails one pull is parked
    /// and gives none of its branches. Returns the states received and the hosts that gave
    /// none; the coordinator's copy counts as current afterwards (the parked hosts get it
    /// before they are asked again).
    pub(crate) fn pull_reachable(&mut self) -> (Vec<BranchState>, Vec<usize>) {
        let mut queues = self.by_host();
        let mut failed: Vec<usize> = Vec::new();
        for (h, q) in queues.iter_mut().enumerate() {
            if self.parked[h] && !q.is_empty() {
                q.clear();
                failed.push(h);
            }
        }
        queues.iter_mut().for_each(|q| q.reverse());
        let mut out = Vec::new();
        while queues.iter().any(|q| !q.is_empty()) {
            for (host, state) in self.pull_round(&mut queues) {
                match state {
                    Ok(s) => out.push((host, s)),
                    Err(problem) => {
                        self.problem(problem);
                        self.park(host);
                        queues[host].clear();
                        failed.push(host);
                    }
                }
            }
        }
        self.stale = false;
        failed.sort_unstable();
        let states = out
            .into_iter()
            .filter(|(h, _)| !failed.contains(h))
            .map(|(_, s)| s)
            .collect();
        (states, failed)
    }

    /// Marks the coordinator's copy as current (after a pull or a push).
    pub(crate) fn set_current(&mut self) {
        self.stale = false;
    }

    /// The trainer's next step (sent with evaluation passes).
    pub(crate) fn set_step(&mut self, step: u64) {
        self.next_step = step;
    }
}

impl RemoteBranches {
    /// [`LayerBranches::forward`]; with `session`, an evaluation pass whose branches open
    /// their caches for that generation session on their hosts ([`Open`]).
    pub(super) fn forward_pass(
        &mut self,
        at: LayerInput,
        lw: &mut LayerWs,
        session: Option<u64>,
    ) -> Done {
        let LayerInput { l, h, pass, .. } = at;
        self.misses.clear();
        let step = pass.train.unwrap_or(self.next_step);
        if l == 0 && pass.train.is_some() {
            self.sq_norms.iter_mut().flatten().for_each(|s| *s = None);
        }
        let asked = lw.computed.iter().filter(|&&c| c).count();
        let (groups, parked): (Vec<_>, Vec<_>) = self
            .computed_by_host(l, lw)
            .into_iter()
            .partition(|(host, _)| !self.parked[*host]);
        let requests: Vec<(usize, Request)> = groups
            .iter()
            .map(|(host, branches)| {
                let f = Forward {
                    step,
                    layer: l,
                    branches: branches.clone(),
                    batch: pass.shape.batch,
                    seq: pass.shape.seq,
                    segments: pass.segments.map(<[u16]>::to_vec),
                    rope: pass.rope.is_some(),
                    dropout: pass.drop.map(|d| (d.p, d.seed)),
                    train: pass.train.is_some(),
                    h: h.to_vec(),
                };
                let r = match session {
                    Some(session) => Request::Open(Open {
                        session,
                        forward: f,
                    }),
                    None => Request::Forward(f),
                };
                (*host, r)
            })
            .collect();
        let replies = self.round(requests);
        let placement = &self.placement[l];
        forward_here(at, lw, |i| placement[i].is_none());
        let mut missed: Vec<(usize, Miss)> = Vec::new();
        for (host, branches) in &parked {
            for &i in branches {
                missed.push((i, Miss::NoAnswer));
                self.misses.push((i, format!("host {host} is parked: down, or awaiting the coordinator's copy of its branches")));
            }
        }
        for ((host, branches), reply) in groups.into_iter().zip(replies) {
            let outputs = match read_reply(reply, host, "forward") {
                Ok(Reply::Forward(r))
                    if r.step == step
                        && r.layer == l
                        && r.outputs.len() == branches.len()
                        && r.outputs
                            .iter()
                            .zip(&branches)
                            .all(|((i, z), j)| i == j && z.len() == h.len()) =>
                {
                    r.outputs
                }
                other => {
                    let why = match other {
                        Ok(r) => format!(
                            "host {host}: forward of layer {l} step {step} answered with a mismatched {}",
                            r.name()
                        ),
                        Err(e) => e,
                    };
                    for &i in &branches {
                        missed.push((i, Miss::NoAnswer));
                        self.misses.push((i, why.clone()));
                    }
                    self.problem(why);
                    continue;
                }
            };
            for (i, z) in outputs {
                let why = if !z.iter().all(|x| x.is_finite()) {
                    missed.push((i, Miss::NonFinite));
                    format!("host {host}: output of branch ({l}, {i}) at step {step} is not finite")
                } else if let Err((r, median)) = self.norms.admit(l, &z) {
                    missed.push((i, Miss::OutOfLine));
                    format!(
                        "host {host}: output of branch ({l}, {i}) at step {step} has RMS {r:.3e}, out of line with the layer's median {median:.3e}"
                    )
                } else {
                    let bz = &mut lw.branches[i].z;
                    fit(bz, z.len());
                    bz.copy_from_slice(&z);
                    continue;
                };
                self.misses.push((i, why.clone()));
                self.problem(why);
            }
        }
        if missed.is_empty() {
            return Ok(());
        }
        for &(i, why) in &missed {
            let counter = match why {
                Miss::NoAnswer => &mut self.stats.missed,
                Miss::NonFinite => &mut self.stats.non_finite,
                Miss::OutOfLine => &mut self.stats.out_of_line,
            };
            counter[l][i] += 1;
            lw.mask[i] = false;
        }
        let answered: Vec<bool> = (0..lw.computed.len())
            .map(|i| lw.computed[i] && lw.mask[i])
            .collect();
        agg::renormalise(&mut lw.alpha_t, &lw.alpha, &lw.mask);
        for i in 0..lw.computed.len() {
            lw.computed[i] = lw.mask[i] && lw.alpha_t[i] > 0.0;
        }
        let got = answered.iter().filter(|&&a| a).count();
        let need = self.quorum.min(asked);
        if let Some(step) = pass.train
            && got < need
        {
            self.stats.steps_abandoned += 1;
            return Err(ModelError::Quorum {
                layer: l,
                step,
                answered: got,
                need,
            });
        }
        let any = lw.computed.iter().any(|&c| c);
        if any && lw.computed.iter().zip(&answered).all(|(&c, &a)| !c || a) {
            return Ok(());
        }
        if pass.train.is_some() {
            self.stats.steps_abandoned += 1;
        }
        let missed: Vec<usize> = missed.iter().map(|&(i, _)| i).collect();
        Err(ModelError::Cluster(format!(
            "layer {l} at step {step}: no weighted branch answered (branches {missed:?} missing); the pass was abandoned — check that the hosts of layer {l} are up"
        )))
    }
}

impl LayerBranches for RemoteBranches {
    fn forward(&mut self, at: LayerInput, lw: &mut LayerWs) -> Done {
        self.forward_pass(at, lw, None)
    }

    fn backward(&mut self, at: LayerInput, lw: &mut LayerWs, g: LayerGrads) -> Done {
        let LayerInput { l, pass, .. } = at;
        let LayerGrads { dh, grads, scratch } = g;
        let Some(step) = pass.train else {
            return Err(ModelError::Cluster(
                "backward without a training forward pass".into(),
            ));
        };
        let groups = self.computed_by_host(l, lw);
        let requests: Vec<(usize, Request)> = groups
            .iter()
            .map(|(host, branches)| {
                let b = Backward {
                    step,
                    layer: l,
                    branches: branches.iter().map(|&i| (i, lw.alpha_t[i])).collect(),
                    dh: dh.to_vec(),
                };
                (*host, Request::Backward(b))
            })
            .collect();
        let replies = self.round(requests);
        let placement = &self.placement[l];
        let here = LayerGrads {
            dh,
            grads: &mut *grads,
            scratch: &mut *scratch,
        };
        backward_here(at, lw, here, |i| placement[i].is_none());
        for ((host, branches), reply) in groups.into_iter().zip(replies) {
            let grads = match read_reply(reply, host, "backward") {
                Ok(Reply::Backward(r))
                    if r.step == step
                        && r.layer == l
                        && r.grads.len() == branches.len()
                        && r.grads
                            .iter()
                            .zip(&branches)
                            .all(|(g, &j)| g.branch == j && g.dh.len() == dh.len()) =>
                {
                    r.grads
                }
                other => {
                    let why = match other {
                        Ok(r) => format!("host {host} answered with a mismatched {}", r.name()),
                        Err(e) => e,
                    };
                    self.stats.steps_abandoned += 1;
                    self.problem(why.clone());
                    return Err(ModelError::Cluster(format!(
                        "backward of layer {l} at step {step}: {why}; the step was abandoned before any update"
                    )));
                }
            };
            for g in grads {
                let bw = &mut lw.branches[g.branch];
                lw.g[g.branch] = dot_f64(dh, &bw.z) as f32;
                fit(&mut bw.dh, g.dh.len());
                bw.dh.copy_from_slice(&g.dh);
                self.sq_norms[l][g.branch] = Some(g.sq_norm);
            }
        }
        Ok(())
    }
}
