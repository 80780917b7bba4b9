//! Training: AdamW with inverse participation scaling, global-norm clipping and a
//! warm-up-then-constant learning rate; width expansion with optimizer bookkeeping.
//! Why over 600 lines: the step, its norms and the update read one another's state; the
//! remote-branch bookkeeping is already in train/cluster.rs.
//!
//! One step `t` (0-based), with `c_i` the branch scale (`min(1/π_i, max_scale)`, given by
//! the caller) and `G` the gradient of the loss:
//! * scaled gradient `G̃` = `c_i·G` on branch `i`'s tensors, `G` elsewhere;
//!   `grad_norm = ‖G̃‖`, `grad_norm_unscaled = ‖G‖` (over the computed parts);
//! * clip `k = min(1, grad_clip/‖G̃‖)` (`k = 1` when `grad_clip = 0`);
//! * AdamW per tensor with `g = k·G̃`: `m ← β1 m + (1-β1) g`, `v ← β2 v + (1-β2) g²`,
//!   `θ ← θ·(1 - lr·wd)` (2-D tensors only), `θ ← θ - lr·(m/(1-β1^{t+1}))/(√(v/(1-β2^{t+1})) + ε)`.
//!
//! A step whose loss or gradient norm is not finite is refused ([`ModelError::NonFinite`])
//! before anything is updated.
//!
//! Inactive-branch rule: a branch that is not computed this step (masked, or of a new
//! group at `η = 0`) is not touched at all: no decay, no update, its moments are not
//! advanced. Bias correction uses the global step counter.
//!
//! Branches may sit on branch hosts ([`Trainer::attach_remote`], see `model::remote`):
//! the layer loop and the update then reach them through messages, the hosts report each
//! branch's `‖G_i‖²` for the global norm and apply AdamW with the `k` sent to them.

use super::agg::AggGroups;
use super::io;
use super::net::{Model, StepDropout, Workspace};
use super::ops::{dot_f64, simd};
use super::params::{BranchParams, Params, TensorId, normal};
use super::remote::{AdamWStep, RemoteBranches};
use super::{Batch, BranchScales, Masks, ModelConfig, ModelError, OptimConfig};
use crate::config::Section;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

mod cluster;

/// What one training step did (for metrics and diagnostics).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// Step counter after this step.
    pub step: u64,
    /// Loss-mask-weighted mean cross-entropy of the batch.
    pub loss: f32,
    /// Norm of the scaled gradient, before clipping.
    pub grad_norm: f32,
    /// Norm of the unscaled gradient.
    pub grad_norm_unscaled: f32,
    /// `grad_norm / grad_norm_unscaled` (1 when both are 0).
    pub grad_norm_ratio: f32,
    /// Clip factor applied (1 = not clipped).
    pub clip_coef: f32,
    /// Per layer, per branch unscaled gradient norm (`None`: not computed this step).
    pub branch_grad_norms: Vec<Vec<Option<f32>>>,
    /// Per layer, per branch output energy `e_i = mean(z_i²)` (`None`: not computed).
    pub branch_energy: Vec<Vec<Option<f32>>>,
    /// Per layer, the `K×K` row-major matrix of cosine similarities of branch outputs
    /// (flattened over batch and positions; `None` where either branch was not computed).
    pub branch_cosine: Vec<Vec<Option<f32>>>,
    /// The masks used.
    pub masks: Masks,
    /// Per layer, which branches were computed (active and `α̃ > 0`).
    pub computed: Masks,
    /// Per layer, the unmasked aggregation weights `α` before the update.
    pub alpha: Vec<Vec<f32>>,
    /// Tokens (positions) in the batch.
    pub tokens: usize,
    /// Sum of the loss mask (positions that carried loss).
    pub loss_tokens: f32,
    /// Learning rate used.
    pub lr: f32,
}

/// Result of a width expansion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpandReport {
    /// Layer expanded.
    pub layer: usize,
    /// Index of the first new branch.
    pub first_new: usize,
    /// Source branch copied by each new branch.
    pub sources: Vec<usize>,
    /// New width of the layer.
    pub width: usize,
}

/// The outcome of [`Model::expand`] and [`Trainer::expand`].
pub type Expanded = Result<ExpandReport, ModelError>;

/// Model, AdamW state, step counter and reusable buffers.
#[derive(Debug)]
pub struct Trainer {
    model: Model,
    optim: OptimConfig,
    m: Params,
    v: Params,
    step: u64,
    grads: Params,
    ws: Workspace,
    /// Seed of the dropout masks (with `model.dropout > 0`).
    dropout_seed: u64,
    /// Branches placed on branch hosts (`None`: every branch in this process).
    remote: Option<Box<RemoteBranches>>,
}

/// One AdamW update of a tensor, element-wise in fixed chunks: with `g ← k·g`,
/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p·(1 − lr·λ) − (lr/bc1)·m / (√(v/bc2) + ε)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    k: f32,
    lr: f32,
    decay: f32,
    o: &OptimConfig,
    bc: (f32, f32),
) {
    let (b1, b2, eps) = (o.beta1, o.beta2, o.eps);
    let shrink = 1.0 - lr * decay;
    let (bc1, bc2) = bc;
    // m̂/(√v̂ + ε) with m̂ = m/bc1, v̂ = v/bc2: the constant divisions as products, so
    // that one square root and one division per element remain
    let (step, inv_bc2) = (lr / bc1, 1.0 / bc2);
    p.par_chunks_mut(16384)
        .zip(g.par_chunks(16384))
        .zip(m.par_chunks_mut(16384).zip(v.par_chunks_mut(16384)))
        .for_each(|((p, g), (m, v))| {
            simd(
                #[inline(always)]
                || {
                    let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
                    for (((p, &g), m), v) in it {
                        let g = g * k;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *p *= shrink;
                        *p -= step * *m / ((*v * inv_bc2).sqrt() + eps);
                    }
                },
            )
        });
}

fn sq_norm(t: &[f32]) -> f64 {
    dot_f64(t, t)
}

/// `‖G_i‖²` of one branch: the f64 sum of its tensors' squared norms in storage order.
pub(crate) fn branch_sq_norm(b: &BranchParams) -> f64 {
    b.tensors().iter().map(|t| sq_norm(t)).sum()
}

impl Trainer {
    /// A trainer with zero AdamW moments at step 0.
    pub fn new(model: Model, optim: OptimConfig) -> Result<Self, ModelError> {
        optim.validate()?;
        model.config.validate()?;
        let widths = model.widths();
        let zeros = Params::zeros(&model.config, &widths);
        Ok(Self {
            optim,
            m: zeros.clone(),
            v: zeros.clone(),
            grads: zeros,
            step: 0,
            ws: Workspace::default(),
            dropout_seed: 0,
            remote: None,
            model,
        })
    }

    /// Rebuilds a trainer from `model.safetensors` bytes and, when given,
    /// `optimizer.safetensors` bytes (otherwise zero moments at step 0).
    pub fn from_bytes(
        config: ModelConfig,
        optim: OptimConfig,
        model_bytes: &[u8],
        optimizer_bytes: Option<&[u8]>,
    ) -> Result<Self, ModelError> {
        let model = io::model_from_bytes(config, model_bytes)?;
        let mut t = Self::new(model, optim)?;
        if let Some(b) = optimizer_bytes {
            let (m, v, step) = io::optimizer_from_bytes(&t.model, b)?;
            t.m = m;
            t.v = v;
            t.step = step;
        }
        Ok(t)
    }

    /// `model.safetensors` bytes. With branches on hosts, after
    /// [`Trainer::pull_branches`] (an error while the hosts hold newer weights).
    pub fn model_bytes(&self) -> Result<Vec<u8>, ModelError> {
        self.check_current()?;
        io::model_to_bytes(&self.model)
    }

    /// `optimizer.safetensors` bytes (moments and step counter); as
    /// [`Trainer::model_bytes`] with branches on hosts.
    pub fn optimizer_bytes(&self) -> Result<Vec<u8>, ModelError> {
        self.check_current()?;
        io::optimizer_to_bytes(&self.model, &self.m, &self.v, self.step)
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The optimizer configuration.
    pub fn optim(&self) -> &OptimConfig {
        &self.optim
    }

    /// Replaces the optimizer configuration (e.g. a new learning rate).
    pub fn set_optim(&mut self, optim: OptimConfig) -> Result<(), ModelError> {
        optim.validate()?;
        self.optim = optim;
        Ok(())
    }

    /// Seeds the dropout masks (`model.dropout > 0`): the mask of step `t`, layer `l`,
    /// branch `i` and site `s` is a function of `(seed, t, l, i, s)` alone, so a trainer
    /// restored from its bytes with the same seed continues bit for bit. Default 0.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// AdamW first and second moments.
    pub fn moments(&self) -> (&Params, &Params) {
        (&self.m, &self.v)
    }

    fn check_scales(&self, scales: &BranchScales) -> Result<(), ModelError> {
        let widths = self.model.widths();
        if scales.len() != widths.len() || scales.iter().zip(&widths).any(|(s, &k)| s.len() != k) {
            return Err(ModelError::Masks(format!(
                "branch scales have widths {:?}, the model has {:?}; take them from Availability::scales",
                scales.iter().map(Vec::len).collect::<Vec<_>>(),
                widths
            )));
        }
        for (l, s) in scales.iter().enumerate() {
            if let Some(i) = s.iter().position(|&c| !(c > 0.0 && c.is_finite())) {
                return Err(ModelError::Masks(format!(
                    "layer {l} branch {i}: scale {} must be finite and > 0",
                    s[i]
                )));
            }
        }
        Ok(())
    }

    /// One training step: forward, backward, scaling, clipping, AdamW update.
    pub fn train_step(
        &mut self,
        batch: &Batch,
        masks: &Masks,
        scales: &BranchScales,
    ) -> Result<StepReport, ModelError> {
        self.train_step_timed(batch, masks, scales).map(|(r, _)| r)
    }

    /// [`Trainer::train_step`] that also returns the seconds spent in forward (with the
    /// loss), backward, and optimizer (norms, update, report statistics).
    pub fn train_step_timed(
        &mut self,
        batch: &Batch,
        masks: &Masks,
        scales: &BranchScales,
    ) -> Result<(StepReport, [f64; 3]), ModelError> {
        self.check_scales(scales)?;
        let t0 = Instant::now();
        let alpha: Vec<Vec<f32>> = (0..self.model.params.layers.len())
            .map(|l| self.model.alphas(l))
            .collect();
        let drop = StepDropout {
            p: self.model.config.dropout,
            seed: self.dropout_seed,
            step: self.step,
        };
        match self.remote.as_deref_mut() {
            None => self
                .model
                .forward_with(&mut self.ws, batch, masks, Some(drop))?,
            Some(r) => self
                .model
                .forward_via(&mut self.ws, batch, masks, Some(drop), r)?,
        }
        let loss = self.model.loss(&mut self.ws, batch);
        let t1 = Instant::now();
        match self.remote.as_deref_mut() {
            None => self.model.backward(&mut self.ws, batch, &mut self.grads)?,
            Some(r) => self
                .model
                .backward_via(&mut self.ws, batch, &mut self.grads, r)?,
        }
        let t2 = Instant::now();
        let nl = self.model.params.layers.len();
        let computed: Masks = (0..nl)
            .map(|l| self.ws.layers[l].computed.clone())
            .collect();

        let mut shared = 0.0f64;
        for t in self.grads.globals() {
            shared += sq_norm(t);
        }
        for layer in &self.grads.layers {
            shared += sq_norm(&layer.alpha_logits);
        }
        let mut branch_sq: Vec<Vec<Option<f64>>> = Vec::with_capacity(nl);
        let (mut unscaled, mut scaled) = (shared, shared);
        for (l, layer) in self.grads.layers.iter().enumerate() {
            let mut row = Vec::with_capacity(layer.branches.len());
            for (i, b) in layer.branches.iter().enumerate() {
                if computed[l][i] {
                    let s = match self.remote.as_ref().and_then(|r| r.sq_norm(l, i)) {
                        Some(s) => s,
                        None => branch_sq_norm(b),
                    };
                    unscaled += s;
                    scaled += s * (scales[l][i] as f64).powi(2);
                    row.push(Some(s));
                } else {
                    row.push(None);
                }
            }
            branch_sq.push(row);
        }
        let (gn, gn_u) = (scaled.sqrt() as f32, unscaled.sqrt() as f32);
        if !(loss.is_finite() && gn.is_finite()) {
            return Err(ModelError::NonFinite {
                step: self.step,
                loss,
                grad_norm: gn,
            });
        }
        let clip = if self.optim.grad_clip > 0.0 && gn > self.optim.grad_clip {
            self.optim.grad_clip / gn
        } else {
            1.0
        };
        let lr = self.optim.lr_at(self.step);
        self.apply_adamw(&computed, scales, clip, lr);
        self.step += 1;

        let (energy, cosine) = self.branch_stats(&computed);
        let t3 = Instant::now();
        let phases = [
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
        ];
        let report = StepReport {
            step: self.step,
            loss,
            grad_norm: gn,
            grad_norm_unscaled: gn_u,
            grad_norm_ratio: if gn_u > 0.0 { gn / gn_u } else { 1.0 },
            clip_coef: clip,
            branch_grad_norms: branch_sq
                .iter()
                .map(|r| r.iter().map(|s| s.map(|s| s.sqrt() as f32)).collect())
                .collect(),
            branch_energy: energy,
            branch_cosine: cosine,
            masks: masks.clone(),
            computed,
            alpha,
            tokens: batch.batch * batch.seq,
            loss_tokens: batch.loss_mask.iter().sum(),
            lr,
        };
        Ok((report, phases))
    }

    fn apply_adamw(&mut self, computed: &Masks, scales: &BranchScales, clip: f32, lr: f32) {
        let t = (self.step + 1) as i32;
        let bc = (
            1.0 - self.optim.beta1.powi(t),
            1.0 - self.optim.beta2.powi(t),
        );
        let o = self.optim.clone();
        let remote = self.remote.as_deref();
        for id in self.model.params.ids() {
            let k = match id {
                TensorId::Branch(l, i, _) if !computed[l][i] => continue,
                TensorId::Branch(l, i, _) if remote.is_some_and(|r| r.is_remote(l, i)) => continue,
                TensorId::Branch(l, i, _) => clip * scales[l][i],
                _ => clip,
            };
            let decay = if id.is_matrix() { o.weight_decay } else { 0.0 };
            adamw(
                self.model.params.get_mut(id),
                self.grads.get(id),
                self.m.get_mut(id),
                self.v.get_mut(id),
                k,
                lr,
                decay,
                &o,
                bc,
            );
        }
        if let Some(r) = self.remote.as_deref_mut() {
            let ks: Vec<(usize, usize, f32)> = (0..computed.len())
                .flat_map(|l| (0..computed[l].len()).map(move |i| (l, i)))
                .filter(|&(l, i)| computed[l][i] && r.is_remote(l, i))
                .map(|(l, i)| (l, i, clip * scales[l][i]))
                .collect();
            let adamw = AdamWStep {
                lr,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
                bc1: bc.0,
                bc2: bc.1,
            };
            r.update(self.step, adamw, &ks);
        }
    }

    /// Energies `mean(z_i²)` and pairwise cosines of the computed branch outputs.
    #[allow(clippy::type_complexity)]
    fn branch_stats(&self, computed: &Masks) -> (Vec<Vec<Option<f32>>>, Vec<Vec<Option<f32>>>) {
        let mut energy = Vec::with_capacity(computed.len());
        let mut cosine = Vec::with_capacity(computed.len());
        for (l, comp) in computed.iter().enumerate() {
            let k = comp.len();
            let mut dots = vec![None; k * k];
            for i in 0..k {
                for j in i..k {
                    if let (Some(a), Some(b)) =
                        (self.ws.branch_output(l, i), self.ws.branch_output(l, j))
                    {
                        let v = dot_f64(a, b);
                        dots[i * k + j] = Some(v);
                        dots[j * k + i] = Some(v);
                    }
                }
            }
            let len = self.ws.n * self.model.config.d_model;
            energy.push(
                (0..k)
                    .map(|i| dots[i * k + i].map(|v| (v / len as f64) as f32))
                    .collect(),
            );
            cosine.push(
                (0..k * k)
                    .map(|ij| {
                        let (i, j) = (ij / k, ij % k);
                        match (dots[ij], dots[i * k + i], dots[j * k + j]) {
                            (Some(x), Some(a), Some(b)) if a > 0.0 && b > 0.0 => {
                                Some((x / (a * b).sqrt()) as f32)
                            }
                            _ => None,
                        }
                    })
                    .collect(),
            );
        }
        (energy, cosine)
    }

    /// Mean loss on a batch, no update.
    pub fn eval_loss(&mut self, batch: &Batch, masks: &Masks) -> Result<f32, ModelError> {
        match self.remote.as_deref_mut() {
            None => self.model.eval_loss(&mut self.ws, batch, masks),
            Some(r) => {
                self.model
                    .forward_via(&mut self.ws, batch, masks, None, r)?;
                Ok(self.model.loss(&mut self.ws, batch))
            }
        }
    }

    /// Logits `[B, T, V]` of a batch, no update.
    pub fn logits(&mut self, batch: &Batch, masks: &Masks) -> Result<Vec<f32>, ModelError> {
        match self.remote.as_deref_mut() {
            None => self.model.logits(&mut self.ws, batch, masks),
            Some(r) => {
                self.model
                    .forward_via(&mut self.ws, batch, masks, None, r)?;
                Ok(
                    self.ws.logits()[..batch.batch * batch.seq * self.model.config.vocab_size]
                        .to_vec(),
                )
            }
        }
    }

    /// Adds `m` branches to `layer` (see [`Model::expand`]); their AdamW moments start
    /// at zero. With branches on hosts, the new branches live in this process.
    pub fn expand(&mut self, layer: usize, m: usize, noise_std: f32, seed: u64) -> Expanded {
        let report = self.model.expand(layer, m, noise_std, seed)?;
        let d = self.model.config.d_model;
        for p in [&mut self.m, &mut self.v, &mut self.grads] {
            let lp = &mut p.layers[layer];
            lp.alpha_logits.resize(report.width, 0.0);
            lp.branches
                .resize_with(report.width, || BranchParams::zeros(d));
        }
        if let Some(r) = self.remote.as_deref_mut() {
            r.add_local(layer, m);
        }
        Ok(report)
    }

    /// Sets `η` of the newest expansion group of `layer`.
    pub fn set_eta(&mut self, layer: usize, eta: f32) -> Result<(), ModelError> {
        self.model.set_eta(layer, eta)
    }
}

impl Model {
    /// Adds `m` branches to `layer`. New branch `j` copies the existing branch of rank
    /// `j mod K` by current `α` (highest first, ties to the lower index) plus
    /// `N(0, noise_std)` noise on every tensor; new logits are 0. The new branches form a
    /// new aggregation group with `η = 0`, so the model's function is bitwise unchanged
    /// until [`Model::set_eta`] raises `η`.
    pub fn expand(&mut self, layer: usize, m: usize, noise_std: f32, seed: u64) -> Expanded {
        let nl = self.params.layers.len();
        if layer >= nl {
            return Err(ModelError::Expand(format!(
                "layer {layer} does not exist (the model has {nl})"
            )));
        }
        let k = self.params.layers[layer].branches.len();
        if m == 0 || k + m > 256 {
            return Err(ModelError::Expand(format!(
                "layer {layer}: cannot add {m} branches to {k}; add 1..={} (at most 256 per layer)",
                256 - k.min(256)
            )));
        }
        if self.groups[layer].start.len() >= 64 {
            return Err(ModelError::Expand(format!(
                "layer {layer}: at most 64 expansion groups"
            )));
        }
        if !(noise_std >= 0.0 && noise_std.is_finite()) {
            return Err(ModelError::Expand(format!(
                "noise_std = {noise_std}: must be finite and >= 0"
            )));
        }
        let alpha = self.alphas(layer);
        let mut rank: Vec<usize> = (0..k).collect();
        rank.sort_by(|&a, &b| alpha[b].total_cmp(&alpha[a]).then(a.cmp(&b)));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let sources: Vec<usize> = (0..m).map(|j| rank[j % k]).collect();
        let lp = &mut self.params.layers[layer];
        for &src in &sources {
            let mut b = lp.branches[src].clone();
            if noise_std > 0.0 {
                for t in b.tensors_mut() {
                    for x in t.iter_mut() {
                        *x += noise_std * normal(&mut rng);
                    }
                }
            }
            lp.branches.push(b);
            lp.alpha_logits.push(0.0);
        }
        self.groups[layer].start.push(k);
        self.groups[layer].eta.push(0.0);
        Ok(ExpandReport {
            layer,
            first_new: k,
            sources,
            width: k + m,
        })
    }

    /// Sets `η ∈ [0, 1]` of the newest expansion group of `layer`.
    pub fn set_eta(&mut self, layer: usize, eta: f32) -> Result<(), ModelError> {
        let groups: &mut AggGroups = self
            .groups
            .get_mut(layer)
            .ok_or_else(|| ModelError::Expand(format!("layer {layer} does not exist")))?;
        if groups.start.len() < 2 {
            return Err(ModelError::Expand(format!(
                "layer {layer} has no expansion group; expand it before setting η"
            )));
        }
        if !(0.0..=1.0).contains(&eta) {
            return Err(ModelError::Expand(format!("η = {eta}: must be in [0, 1]")));
        }
        *groups.eta.last_mut().expect("at least two groups") = eta;
        Ok(())
    }

    /// `η` of the newest expansion group of each layer (0 where none).
    pub fn etas(&self) -> Vec<f32> {
        self.groups
            .iter()
            .map(|g| {
                if g.start.len() > 1 {
                    *g.eta.last().unwrap_or(&0.0)
                } else {
                    0.0
                }
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::net::tests::{random_batch, tiny_config};

    /// [`default_training_is_bitwise_unchanged`]'s digest.
    const GOLDEN_DIGEST: u64 = 0xe29a_0de3_a575_ae8b;

    pub(crate) fn ones(model: &Model) -> BranchScales {
        model.widths().iter().map(|&k| vec![1.0; k]).collect()
    }

    pub(crate) fn optim() -> OptimConfig {
        OptimConfig {
            lr: 1e-2,
            warmup_steps: 5,
            weight_decay: 0.0,
            ..OptimConfig::default()
        }
    }

    #[test]
    fn tiny_model_overfits_a_fixed_batch() {
        let cfg = tiny_config();
        let mut t = Trainer::new(Model::new(cfg.clone(), 1).unwrap(), optim()).unwrap();
        let batch = random_batch(&cfg, 2, 6, 9);
        let masks = t.model().all_active();
        let scales = ones(t.model());
        let first = t.train_step(&batch, &masks, &scales).unwrap().loss;
        let mut last = first;
        for _ in 0..300 {
            last = t.train_step(&batch, &masks, &scales).unwrap().loss;
        }
        assert!(first > 2.0 && last < 0.1, "loss {first} -> {last}");
        assert_eq!(t.step(), 301);
    }

    #[test]
    fn masked_branches_are_never_touched() {
        let cfg = tiny_config();
        let mut t = Trainer::new(
            Model::new(cfg.clone(), 2).unwrap(),
            OptimConfig {
                weight_decay: 0.1,
                ..optim()
            },
        )
        .unwrap();
        let batch = random_batch(&cfg, 2, 5, 4);
        let masks = vec![vec![true, false, true], vec![false, false, true]];
        let before = t.model().clone();
        let scales = ones(&before);
        for _ in 0..5 {
            let r = t.train_step(&batch, &masks, &scales).unwrap();
            assert_eq!(r.computed, masks);
            assert_eq!(r.branch_grad_norms[1][0], None);
            assert!(r.branch_energy[0][0].unwrap() > 0.0);
        }
        let after = t.model();
        for (l, m) in masks.iter().enumerate() {
            for (i, &on) in m.iter().enumerate() {
                let same =
                    after.params.layers[l].branches[i] == before.params.layers[l].branches[i];
                assert_eq!(same, !on, "layer {l} branch {i} active {on}");
                let zero = t.m.layers[l].branches[i].fc_w.iter().all(|&x| x == 0.0);
                assert_eq!(zero, !on, "moments of layer {l} branch {i}");
            }
        }
    }

    #[test]
    fn scaling_changes_norm_ratio_and_clipping_bounds_update() {
        let cfg = tiny_config();
        let mut t = Trainer::new(
            Model::new(cfg.clone(), 3).unwrap(),
            OptimConfig {
                grad_clip: 1e-3,
                ..optim()
            },
        )
        .unwrap();
        let batch = random_batch(&cfg, 2, 5, 4);
        let masks = t.model().all_active();
        let mut scales = ones(t.model());
        scales[0][1] = 3.0;
        let r = t.train_step(&batch, &masks, &scales).unwrap();
        assert!(r.grad_norm > r.grad_norm_unscaled && r.grad_norm_ratio > 1.0);
        assert!((r.clip_coef - 1e-3 / r.grad_norm).abs() < 1e-9);
        assert!(r.branch_cosine[0][0].unwrap() > 0.999);
        assert!((r.lr - 1e-2 / 5.0).abs() < 1e-9);
    }

    #[test]
    fn expand_at_eta_zero_is_bitwise_identical_and_ramp_trains() {
        let cfg = tiny_config();
        let mut t = Trainer::new(Model::new(cfg.clone(), 4).unwrap(), optim()).unwrap();
        let batch = random_batch(&cfg, 2, 6, 5);
        let scales = ones(t.model());
        for _ in 0..3 {
            let masks = t.model().all_active();
            t.train_step(&batch, &masks, &scales).unwrap();
        }
        let masks = t.model().all_active();
        let before = t.logits(&batch, &masks).unwrap();
        let rep = t.expand(1, 2, 1e-3, 7).unwrap();
        assert_eq!((rep.first_new, rep.width), (3, 5));
        let masks = t.model().all_active();
        let after = t.logits(&batch, &masks).unwrap();
        assert_eq!(
            before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            after.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let scales = ones(t.model());
        let mut loss = 0.0;
        for s in 0..20 {
            t.set_eta(1, 0.3 * (s + 1) as f32 / 20.0).unwrap();
            let r = t.train_step(&batch, &masks, &scales).unwrap();
            loss = r.loss;
            assert!(r.computed[1].iter().all(|&c| c));
        }
        assert!(loss.is_finite());
        let a = t.model().alphas(1);
        assert!((a[3] + a[4] - 0.3).abs() < 1e-6);
        assert!(t.set_eta(0, 0.1).is_err());
        // a second expansion nests a new group: again bitwise identical at η = 0
        let before = t.logits(&batch, &masks).unwrap();
        t.expand(1, 1, 0.0, 8).unwrap();
        let masks = t.model().all_active();
        let after = t.logits(&batch, &masks).unwrap();
        assert!(
            before
                .iter()
                .zip(&after)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert_eq!(t.model().groups[1].start, vec![0, 3, 5]);
        let scales = ones(t.model());
        t.set_eta(1, 0.1).unwrap();
        assert!(
            t.train_step(&batch, &masks, &scales)
                .unwrap()
                .loss
                .is_finite()
        );
    }

    #[test]
    fn rejects_bad_masks_and_scales() {
        let cfg = tiny_config();
        let mut t = Trainer::new(Model::new(cfg.clone(), 5).unwrap(), optim()).unwrap();
        let batch = random_batch(&cfg, 1, 3, 1);
        let scales = ones(t.model());
        let err = t
            .train_step(&batch, &vec![vec![false; 3], vec![true; 3]], &scales)
            .unwrap_err();
        assert!(err.to_string().contains("layer 0"), "{err}");
        let err = t
            .train_step(&batch, &t.model().all_active(), &vec![vec![1.0; 2]; 2])
            .unwrap_err();
        assert!(err.to_string().contains("widths"), "{err}");
        let mut bad = batch.clone();
        bad.inputs[0] = 99;
        assert!(
            t.train_step(&bad, &t.model().all_active(), &scales)
                .unwrap_err()
                .to_string()
                .contains("inputs[0]")
        );
    }

    /// The 64-wide model of the thread-count tests.
    pub(crate) fn pool_config() -> ModelConfig {
        ModelConfig {
            vocab_size: 97,
            d_model: 64,
            n_heads: 2,
            n_layers: 2,
            branches: 2,
            max_seq_len: 32,
            ..ModelConfig::default()
        }
    }

    /// Three steps of `cfg` (seed 8, 16 × 32 windows, some branches masked) on a pool of
    /// `threads` threads: weights, optimizer state and losses.
    pub(crate) fn train_in_pool(cfg: &ModelConfig, threads: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut t = Trainer::new(Model::new(cfg.clone(), 8).unwrap(), optim()).unwrap();
            let mut losses = Vec::new();
            for s in 0..3u64 {
                // 512 rows: large enough for gemm to use several threads
                let batch = random_batch(cfg, 16, 32, s);
                let masks = vec![vec![true, s != 1], vec![s != 2, true]];
                let scales = vec![vec![1.0, 1.5], vec![2.0, 1.0]];
                losses.push(t.train_step(&batch, &masks, &scales).unwrap().loss);
            }
            (
                t.model_bytes().unwrap(),
                t.optimizer_bytes().unwrap(),
                losses,
            )
        })
    }

    #[test]
    fn bitwise_deterministic_across_thread_counts() {
        let cfg = pool_config();
        let one = train_in_pool(&cfg, 1);
        let two = train_in_pool(&cfg, 2);
        assert_eq!(one.2, two.2);
        assert!(one.0 == two.0, "weights differ between 1 and 2 threads");
        assert!(
            one.1 == two.1,
            "optimizer state differs between 1 and 2 threads"
        );
        assert!(train_in_pool(&cfg, 3).0 == one.0);
    }

    #[test]
    fn workspace_is_reused_across_shapes_without_stale_state() {
        let cfg = tiny_config();
        let model = Model::new(cfg.clone(), 6).unwrap();
        let big = random_batch(&cfg, 3, 6, 1);
        let small = random_batch(&cfg, 1, 2, 2);
        let masks = model.all_active();
        let mut fresh = Trainer::new(model.clone(), optim()).unwrap();
        let want = fresh.eval_loss(&small, &masks).unwrap();
        let mut t = Trainer::new(model, optim()).unwrap();
        let scales = ones(t.model());
        t.train_step(&big, &masks, &scales).unwrap();
        let ptrs = (
            t.ws.logits.as_ptr(),
            t.ws.layers[1].branches[2].dgelu.as_ptr(),
        );
        t.model = fresh.model.clone();
        assert_eq!(
            t.eval_loss(&small, &masks).unwrap().to_bits(),
            want.to_bits()
        );
        t.train_step(&big, &masks, &scales).unwrap();
        assert_eq!(
            ptrs,
            (
                t.ws.logits.as_ptr(),
                t.ws.layers[1].branches[2].dgelu.as_ptr()
            ),
            "buffers were reallocated"
        );
    }

    #[test]
    fn non_finite_step_is_refused_without_update() {
        let cfg = tiny_config();
        let mut t = Trainer::new(Model::new(cfg.clone(), 9).unwrap(), optim()).unwrap();
        let batch = random_batch(&cfg, 1, 4, 3);
        let masks = t.model().all_active();
        let scales = ones(t.model());
        t.model.params.layers[0].branches[1].fc_w[3] = f32::NAN;
        let before = t.model().params.layers[1].clone();
        let err = t.train_step(&batch, &masks, &scales).unwrap_err();
        assert!(
            matches!(err, ModelError::NonFinite { step: 0, .. }),
            "{err}"
        );
        assert_eq!(t.step(), 0);
        assert!(
            t.moments().0.layers[1].branches[0]
                .fc_w
                .iter()
                .all(|&x| x == 0.0)
        );
        assert_eq!(t.model().params.layers[1].alpha_logits, before.alpha_logits);
    }

    /// Training with dropout on for `n` steps straight equals `n/2` steps, the trainer
    /// serialised to its checkpoint bytes and restored, then `n/2` more, bit for bit: the
    /// masks depend on (seed, step, layer, branch, site) only. A different seed trains to
    /// other weights, and so does `p = 0` (the masks are really on).
    #[test]
    fn dropout_training_resumes_bitwise_from_bytes() {
        let cfg = ModelConfig {
            dropout: 0.2,
            positions: crate::model::Positions::Rope,
            max_seq_len: 20,
            ..tiny_config()
        };
        let batches: Vec<Batch> = (0..6).map(|i| random_batch(&cfg, 2, 20, 40 + i)).collect();
        let run = |seed: u64, from: &mut Trainer, steps: std::ops::Range<usize>| {
            from.set_dropout_seed(seed);
            let masks = from.model().all_active();
            let scales = ones(from.model());
            steps
                .map(|i| from.train_step(&batches[i], &masks, &scales).unwrap().loss)
                .collect::<Vec<f32>>()
        };
        let fresh =
            |cfg: &ModelConfig| Trainer::new(Model::new(cfg.clone(), 3).unwrap(), optim()).unwrap();
        let mut straight = fresh(&cfg);
        let all = run(9, &mut straight, 0..6);
        let mut first = fresh(&cfg);
        let mut losses = run(9, &mut first, 0..3);
        let (mb, ob) = (
            first.model_bytes().unwrap(),
            first.optimizer_bytes().unwrap(),
        );
        drop(first);
        let mut resumed = Trainer::from_bytes(cfg.clone(), optim(), &mb, Some(&ob)).unwrap();
        losses.extend(run(9, &mut resumed, 3..6));
        assert_eq!(losses, all);
        assert_eq!(
            resumed.model_bytes().unwrap(),
            straight.model_bytes().unwrap()
        );
        assert_eq!(
            resumed.optimizer_bytes().unwrap(),
            straight.optimizer_bytes().unwrap()
        );
        let mut other_seed = fresh(&cfg);
        run(10, &mut other_seed, 0..6);
        assert_ne!(
            other_seed.model_bytes().unwrap(),
            straight.model_bytes().unwrap()
        );
        let off = ModelConfig {
            dropout: 0.0,
            ..cfg.clone()
        };
        let mut no_drop = fresh(&off);
        assert_ne!(run(9, &mut no_drop, 0..6), all);
        // evaluation never drops: the same loss twice, whatever the seed
        let masks = straight.model().all_active();
        let a = straight.eval_loss(&batches[0], &masks).unwrap();
        straight.set_dropout_seed(77);
        assert_eq!(straight.eval_loss(&batches[0], &masks).unwrap(), a);
    }

    /// FNV-1a over the bits of every parameter (tensor order of `Params::ids`) and of the
    /// step losses.
    fn weights_digest(model: &Model, losses: &[f32]) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let bits = model
            .params
            .ids()
            .into_iter()
            .flat_map(|id| model.params.get(id).to_vec())
            .chain(losses.iter().copied())
            .map(f32::to_bits);
        for b in bits {
            for byte in b.to_le_bytes() {
                h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// The default model (learned positions, no segments) trains to exactly the weights it
    /// trained to before the kernels were split by family and packing was added: the
    /// digest below was produced by this test on commit 99647f2. Register tiles, 16-lane
    /// chunks with tails (seq 20, head dim 16), a masked branch and three steps of AdamW.
    #[test]
    fn default_training_is_bitwise_unchanged() {
        let cfg = ModelConfig {
            vocab_size: 50,
            d_model: 32,
            n_heads: 2,
            max_seq_len: 20,
            ..tiny_config()
        };
        let mut t = Trainer::new(Model::new(cfg.clone(), 3).unwrap(), optim()).unwrap();
        let batch = random_batch(&cfg, 3, 20, 7);
        let masks = vec![vec![true, false, true], vec![true; 3]];
        let scales = ones(t.model());
        let losses: Vec<f32> = (0..3)
            .map(|_| t.train_step(&batch, &masks, &scales).unwrap().loss)
            .collect();
        let digest = weights_digest(t.model(), &losses);
        eprintln!("weights digest {digest:#018x}");
        assert_eq!(digest, GOLDEN_DIGEST, "{digest:#018x}");
    }
}
