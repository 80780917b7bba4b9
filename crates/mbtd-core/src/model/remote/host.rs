//! [`BranchHost`]: the state a branch host holds and its answer to every request.
//!
//! A host holds, per `(layer, branch)` assigned to it, the branch's weights, AdamW moments,
//! gradient buffers and the activations of its last forward pass, plus per layer the last
//! layer input. It runs exactly the arithmetic of the in-process trainer
//! (`block::branch_fwd`/`branch_bwd` through `block::run_pairwise`, the trainer's squared
//! norm and AdamW), so with an f32 wire its results are bitwise those of a local branch.
//!
//! Each branch moves through `idle → forwarded(t) → backwarded(t) → idle`:
//! * a training [`Forward`] of step `t` puts the requested branches in `forwarded(t)` and
//!   every other branch of that layer back to `idle` (its activations belong to an older
//!   pass); an evaluation forward leaves the requested branches `idle`;
//! * [`Backward`] of step `t` needs `forwarded(t)` for every requested branch and the
//!   layer input of step `t`, else it is refused as a whole;
//! * [`Update`] of step `t` applies AdamW only to branches in `backwarded(t)`, and lists
//!   every other requested branch as refused: a host never updates a branch for a step
//!   whose forward it was not asked for, was masked from, or did not back-propagate.
//!
//! Generation sessions ([`Open`], [`Decode`], [`Request::Close`]) are kept beside the
//! step state (`super::sessions`, bounded by [`SessionLimits`]); an open is an evaluation
//! forward, so it leaves every branch of its layer idle like any evaluation pass. A
//! session's branch whose weights change after the open (an update or a push) is
//! refused at its next decode rather than computed with mixed weights.
//!
//! [`BranchHost::handle_bytes`] is what a transport calls: one encoded request in, one
//! encoded reply out (a request that cannot be decoded gets a [`Reply::Refused`]).

use super::protocol::{
    AdamWStep, Backward, BackwardReply, BranchGrad, BranchKey, BranchState, Decode, DecodeReply,
    Forward, ForwardReply, Open, Reply, Request, Update, UpdateReply,
};
use super::sessions::{Cached, SessionLimits, Sessions};
use super::wire::{WirePrecision, decode_request, encode_reply};
use crate::config::Section;
use crate::model::attention::{AttnShape, Segments};
use crate::model::block::{BranchWs, BwdScratch, branch_bwd, branch_fwd, run_pairwise};
use crate::model::branches::block_opts;
use crate::model::decode::BranchDecode;
use crate::model::net::StepDropout;
use crate::model::ops::rope::{RopeTable, rope_angles};
use crate::model::params::{BRANCH_TENSORS, BranchParams};
use crate::model::train::{adamw, branch_sq_norm};
use crate::model::{ModelConfig, ModelError, OptimConfig, Positions};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::time::Instant;

/// Where a hosted branch is in the step protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Idle,
    Forwarded(u64),
    Backwarded(u64),
}

/// One hosted branch.
#[derive(Debug)]
struct Hosted {
    params: BranchParams,
    m: BranchParams,
    v: BranchParams,
    grads: BranchParams,
    ws: BranchWs,
    stage: Stage,
    /// The host's change counter when these weights were last written.
    version: u64,
}

/// The last input of a layer and what its pass shares.
#[derive(Debug, Default)]
struct LayerInput {
    step: u64,
    train: bool,
    batch: usize,
    seq: usize,
    h: Vec<f32>,
    segs: Segments,
    rope_pos: Vec<u32>,
    rope: bool,
    drop: Option<StepDropout>,
}

impl LayerInput {
    /// The attention shape of this input's batch and, with rotary positions, the angle
    /// table with each row's position.
    #[allow(clippy::type_complexity)]
    fn pass<'a>(
        &'a self,
        cfg: &ModelConfig,
        table: &'a RopeTable,
    ) -> (AttnShape<'a>, Option<(&'a RopeTable, &'a [u32])>) {
        let shape = AttnShape {
            batch: self.batch,
            seq: self.seq,
            heads: cfg.n_heads,
            head_dim: cfg.head_dim(),
            segs: self.segs.bounds(),
        };
        (
            shape,
            self.rope.then_some((table, self.rope_pos.as_slice())),
        )
    }
}

/// The branches held by one host and the state of their passes.
#[derive(Debug)]
pub struct BranchHost {
    config: ModelConfig,
    held: BTreeMap<BranchKey, Hosted>,
    inputs: BTreeMap<usize, LayerInput>,
    rope: RopeTable,
    scratch: [BwdScratch; 2],
    sessions: Sessions,
    /// Counts weight writes (updates, pushes): a branch's `version`.
    changes: u64,
}

impl BranchHost {
    /// A host holding nothing, for a model of shape `config` (its `d_model`, `n_heads`,
    /// `max_seq_len`, `positions` and `precision` must be the coordinator's).
    pub fn new(config: ModelConfig) -> Result<Self, ModelError> {
        Self::with_session_limits(config, SessionLimits::default())
    }

    /// [`BranchHost::new`] keeping at most `limits` generation sessions.
    pub fn with_session_limits(
        config: ModelConfig,
        limits: SessionLimits,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        Ok(Self {
            config,
            held: BTreeMap::new(),
            inputs: BTreeMap::new(),
            rope: RopeTable::default(),
            scratch: Default::default(),
            sessions: Sessions::new(limits),
            changes: 0,
        })
    }

    /// Generation sessions held now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The branches held, ascending.
    pub fn held(&self) -> Vec<BranchKey> {
        self.held.keys().copied().collect()
    }

    /// One encoded request in, one encoded reply out (in the request's precision).
    pub fn handle_bytes(&mut self, request: &[u8]) -> Vec<u8> {
        match decode_request(request) {
            Ok((req, wire)) => encode_reply(&self.handle(req), wire),
            Err(e) => encode_reply(
                &Reply::Refused(format!("undecodable request: {e}")),
                WirePrecision::F32,
            ),
        }
    }

    /// Carries out one request (generation sessions idle at this instant are dropped).
    pub fn handle(&mut self, req: Request) -> Reply {
        self.handle_at(req, Instant::now())
    }

    /// [`BranchHost::handle`] at the instant `now` (session idleness is measured to it).
    pub fn handle_at(&mut self, req: Request, now: Instant) -> Reply {
        let result = match req {
            Request::Open(o) => self.open(o, now).map(Reply::Forward),
            Request::Decode(d) => self.decode(d, now).map(Reply::Decoded),
            Request::Close(id) => Ok(Reply::Closed(self.sessions.close(id))),
            Request::Forward(f) => self.forward(f).map(Reply::Forward),
            Request::Backward(b) => self.backward(b).map(Reply::Backward),
            Request::Update(u) => Ok(Reply::Update(self.update(&u))),
            Request::Pull(keys) => self.pull(&keys).map(Reply::Pulled),
            Request::Push(states) => self.push(states).map(Reply::Pushed),
        };
        result.unwrap_or_else(Reply::Refused)
    }

    fn n_d(&self, batch: usize, seq: usize) -> (usize, usize) {
        (batch * seq, self.config.d_model)
    }

    /// Checks that `branches` is strictly ascending and every one is held in `layer`.
    fn check_held(
        &self,
        layer: usize,
        branches: impl Iterator<Item = usize>,
    ) -> Result<(), String> {
        let mut last = None;
        for i in branches {
            if last.is_some_and(|p| p >= i) {
                return Err(format!(
                    "layer {layer}: branch list not strictly ascending at {i}"
                ));
            }
            last = Some(i);
            if !self.held.contains_key(&(layer, i)) {
                return Err(format!(
                    "branch ({layer}, {i}) is not held here (held: {:?}); push it first",
                    self.held()
                ));
            }
        }
        Ok(())
    }

    fn forward(&mut self, f: Forward) -> Result<ForwardReply, String> {
        let cfg = &self.config;
        let (n, d) = self.n_d(f.batch, f.seq);
        if f.batch == 0 || f.seq == 0 || f.seq > cfg.max_seq_len {
            return Err(format!(
                "forward of layer {}: batch {} × seq {} (seq must be in 1..={})",
                f.layer, f.batch, f.seq, cfg.max_seq_len
            ));
        }
        if f.h.len() != n * d {
            return Err(format!(
                "forward of layer {}: h has {} values, batch·seq·d = {}",
                f.layer,
                f.h.len(),
                n * d
            ));
        }
        if f.segments.as_ref().is_some_and(|s| s.len() != n) {
            return Err(format!(
                "forward of layer {}: segments do not have batch·seq = {n} entries",
                f.layer
            ));
        }
        if f.rope != (cfg.positions == Positions::Rope) {
            return Err(format!(
                "forward asks for rope = {}, this host's model.positions is {:?}; give the node the coordinator's model configuration",
                f.rope, cfg.positions
            ));
        }
        if let Some((p, _)) = f.dropout
            && !(0.0..1.0).contains(&p)
        {
            return Err(format!("dropout p = {p}: must be in [0, 1)"));
        }
        self.check_held(f.layer, f.branches.iter().copied())?;
        let (l, step) = (f.layer, f.step);
        if f.rope && !self.rope.fits(cfg.max_seq_len, cfg.head_dim()) {
            self.rope = RopeTable::new(cfg.max_seq_len, cfg.head_dim());
        }
        let inp = self.inputs.entry(l).or_default();
        inp.segs.fill(f.segments.as_deref(), f.seq);
        inp.rope_pos.clear();
        if f.rope {
            match inp.segs.positions() {
                Some(p) => inp.rope_pos.extend_from_slice(p),
                None => inp.rope_pos.extend((0..n).map(|r| (r % f.seq) as u32)),
            }
        }
        (inp.step, inp.train, inp.batch, inp.seq) = (step, f.train, f.batch, f.seq);
        inp.rope = f.rope;
        inp.drop = f
            .dropout
            .filter(|&(p, _)| p > 0.0)
            .map(|(p, seed)| StepDropout { p, seed, step });
        inp.h = f.h;
        let inp = &*inp;
        let (shape, rope) = inp.pass(cfg, &self.rope);
        let (prec, drop, h) = (cfg.precision, inp.drop, inp.h.as_slice());
        let next = if f.train {
            Stage::Forwarded(step)
        } else {
            Stage::Idle
        };
        let wanted = &f.branches;
        let todo = self
            .held
            .range_mut((l, 0)..=(l, usize::MAX))
            .filter_map(|(&(_, i), hb)| {
                hb.stage = Stage::Idle;
                wanted.binary_search(&i).is_ok().then_some((i, hb))
            });
        run_pairwise(todo, wanted.len(), &mut [(), ()], |(i, hb), _| {
            branch_fwd(
                &hb.params,
                &mut hb.ws,
                h,
                shape,
                block_opts(rope, drop, l, i, prec),
            );
            hb.stage = next;
        });
        let outputs = wanted
            .iter()
            .map(|&i| (i, self.held[&(l, i)].ws.z.clone()))
            .collect();
        Ok(ForwardReply {
            step,
            layer: l,
            outputs,
        })
    }

    fn backward(&mut self, b: Backward) -> Result<BackwardReply, String> {
        let (l, step) = (b.layer, b.step);
        let inp = self
            .inputs
            .get(&l)
            .filter(|inp| inp.step == step && inp.train)
            .ok_or_else(|| {
                format!(
                    "backward of layer {l} at step {step}: no training forward of that step here"
                )
            })?;
        let (n, d) = self.n_d(inp.batch, inp.seq);
        if b.dh.len() != n * d {
            return Err(format!(
                "backward of layer {l}: dh has {} values, batch·seq·d = {}",
                b.dh.len(),
                n * d
            ));
        }
        self.check_held(l, b.branches.iter().map(|&(i, _)| i))?;
        if let Some(&(i, _)) = b
            .branches
            .iter()
            .find(|&&(i, _)| self.held[&(l, i)].stage != Stage::Forwarded(step))
        {
            return Err(format!(
                "backward of branch ({l}, {i}) at step {step}: its forward of that step was not computed here"
            ));
        }
        let cfg = &self.config;
        let (shape, rope) = inp.pass(cfg, &self.rope);
        let (prec, drop, h, dh) = (cfg.precision, inp.drop, inp.h.as_slice(), &b.dh);
        let alphas = &b.branches;
        let todo = self
            .held
            .range_mut((l, 0)..=(l, usize::MAX))
            .filter_map(|(&(_, i), hb)| {
                let k = alphas.binary_search_by_key(&i, |&(j, _)| j).ok()?;
                Some((i, alphas[k].1, hb))
            });
        run_pairwise(
            todo,
            alphas.len(),
            &mut self.scratch,
            |(i, alpha, hb), sc| {
                let o = block_opts(rope, drop, l, i, prec);
                branch_bwd(
                    &hb.params,
                    &mut hb.ws,
                    &mut hb.grads,
                    sc,
                    dh,
                    alpha,
                    h,
                    shape,
                    o,
                );
                hb.stage = Stage::Backwarded(step);
            },
        );
        let grads = alphas
            .iter()
            .map(|&(i, _)| {
                let hb = &self.held[&(l, i)];
                BranchGrad {
                    branch: i,
                    dh: hb.ws.dh.clone(),
                    sq_norm: branch_sq_norm(&hb.grads),
                }
            })
            .collect();
        Ok(BackwardReply {
            step,
            layer: l,
            grads,
        })
    }

    fn update(&mut self, u: &Update) -> UpdateReply {
        let AdamWStep {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            bc1,
            bc2,
        } = u.adamw;
        let o = OptimConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..OptimConfig::default()
        };
        let (mut applied, mut refused) = (Vec::new(), Vec::new());
        for &(l, i, k) in &u.branches {
            match self.held.get_mut(&(l, i)) {
                Some(hb) if hb.stage == Stage::Backwarded(u.step) => {
                    let Hosted {
                        params,
                        m,
                        v,
                        grads,
                        ..
                    } = hb;
                    let tensors = params
                        .tensors_mut()
                        .into_iter()
                        .zip(grads.tensors())
                        .zip(m.tensors_mut().into_iter().zip(v.tensors_mut()));
                    for (t, ((p, g), (m, v))) in tensors.enumerate() {
                        let decay = if BRANCH_TENSORS[t].1 {
                            weight_decay
                        } else {
                            0.0
                        };
                        adamw(p, g, m, v, k, lr, decay, &o, (bc1, bc2));
                    }
                    hb.stage = Stage::Idle;
                    self.changes += 1;
                    hb.version = self.changes;
                    applied.push((l, i));
                }
                _ => refused.push((l, i)),
            }
        }
        UpdateReply {
            step: u.step,
            applied,
            refused,
        }
    }

    /// An evaluation forward of one window whose branches' keys and values start
    /// session `o.session`.
    fn open(&mut self, o: Open, now: Instant) -> Result<ForwardReply, String> {
        let f = &o.forward;
        if f.train || f.batch != 1 || f.segments.is_some() || f.dropout.is_some() {
            return Err(format!(
                "open of session {:#x}, layer {}: a prefill is an evaluation pass of one window (train = false, batch = 1, no segments, no dropout)",
                o.session, f.layer
            ));
        }
        let (l, seq, branches) = (f.layer, f.seq, f.branches.clone());
        let reply = self.forward(o.forward)?;
        let (d, t_max) = (self.config.d_model, self.config.max_seq_len);
        let session = self.sessions.open(o.session, now);
        session.branches.retain(|&(layer, _), _| layer != l);
        for i in branches {
            let hb = &self.held[&(l, i)];
            let dec = BranchDecode::new(&hb.params, d, t_max, &hb.ws.qkv, seq);
            let cached = Cached {
                dec,
                pos: seq as u64,
                version: hb.version,
            };
            session.branches.insert((l, i), cached);
        }
        Ok(reply)
    }

    /// One position of a session through some of its branches of one layer.
    ///
    /// # Shapes
    /// `d.x`: `[d]` → each output `[d]`.
    fn decode(&mut self, d: Decode, now: Instant) -> Result<DecodeReply, String> {
        let cfg = &self.config;
        let (l, dm, heads) = (d.layer, cfg.d_model, cfg.n_heads);
        if d.x.len() != dm {
            return Err(format!(
                "decode of layer {l}: x has {} values, d_model is {dm}",
                d.x.len()
            ));
        }
        let pos = usize::try_from(d.pos).map_err(|_| format!("decode position {}", d.pos))?;
        if cfg.positions != Positions::Rope && pos >= cfg.max_seq_len {
            return Err(format!(
                "decode of layer {l} at position {pos}: learned positions stop at max_seq_len {}",
                cfg.max_seq_len
            ));
        }
        self.check_held(l, d.branches.iter().copied())?;
        let session = self.sessions.get(d.session, now)?;
        for &i in &d.branches {
            let c = session.branches.get(&(l, i)).ok_or_else(|| {
                format!(
                    "branch ({l}, {i}) was not opened in generation session {:#x}",
                    d.session
                )
            })?;
            if c.pos != d.pos {
                return Err(format!(
                    "decode of branch ({l}, {i}) in session {:#x} at position {}: its next position is {}",
                    d.session, d.pos, c.pos
                ));
            }
            if c.version != self.held[&(l, i)].version {
                return Err(format!(
                    "branch ({l}, {i}) was updated or replaced since session {:#x} opened; start the generation again",
                    d.session
                ));
            }
        }
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        if cfg.positions == Positions::Rope {
            let half = cfg.head_dim() / 2;
            (cos, sin) = (vec![0.0; half], vec![0.0; half]);
            rope_angles(&mut cos, &mut sin, pos, cfg.head_dim());
        }
        let angles = (!cos.is_empty()).then_some((cos.as_slice(), sin.as_slice()));
        let held = &self.held;
        let mut todo: Vec<(&BranchParams, &mut Cached)> = session
            .branches
            .range_mut((l, 0)..=(l, usize::MAX))
            .filter(|((_, i), _)| d.branches.binary_search(i).is_ok())
            .map(|(k, c)| (&held[k].params, c))
            .collect();
        let x = &d.x;
        todo.par_iter_mut().for_each(|(bp, c)| {
            c.dec.step(bp, x, pos, heads, angles);
            c.pos += 1;
        });
        let outputs = todo
            .iter()
            .zip(&d.branches)
            .map(|((_, c), &i)| (i, c.dec.z().to_vec()))
            .collect();
        Ok(DecodeReply {
            session: d.session,
            layer: l,
            pos: d.pos,
            outputs,
        })
    }

    fn pull(&self, keys: &[BranchKey]) -> Result<Vec<BranchState>, String> {
        keys.iter()
            .map(|&(l, i)| {
                let hb = self.held.get(&(l, i)).ok_or_else(|| {
                    format!(
                        "pull of branch ({l}, {i}): not held here (held: {:?})",
                        self.held()
                    )
                })?;
                Ok(BranchState {
                    layer: l,
                    branch: i,
                    params: hb.params.clone(),
                    m: hb.m.clone(),
                    v: hb.v.clone(),
                })
            })
            .collect()
    }

    fn push(&mut self, states: Vec<BranchState>) -> Result<usize, String> {
        let d = self.config.d_model;
        if let Some(s) = states.iter().find(|s| s.params.ln1_gain.len() != d) {
            return Err(format!(
                "push of branch ({}, {}): width {}, this host's model.d_model is {d}",
                s.layer,
                s.branch,
                s.params.ln1_gain.len()
            ));
        }
        for s in states {
            self.changes += 1;
            self.held.insert(
                (s.layer, s.branch),
                Hosted {
                    params: s.params,
                    m: s.m,
                    v: s.v,
                    grads: BranchParams::zeros(d),
                    ws: BranchWs::default(),
                    stage: Stage::Idle,
                    version: self.changes,
                },
            );
        }
        Ok(self.held.len())
    }
}
