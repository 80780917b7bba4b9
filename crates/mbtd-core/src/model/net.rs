//! The model (parameters + aggregation groups) and its forward/backward pass over a
//! reusable [`Workspace`].
//!
//! Forward per layer `l` (input `h`, output `h'`), for each computed branch `i`:
//! `a1 = LN1(h)`, `qkv = a1·Wqkv + bqkv`, `att = Attn(qkv)`, `u = h + att·Wo + bo`,
//! `a2 = LN2(u)`, `f = a2·W1 + b1`, `g = gelu(f)`, `z_i = u + g·W2 + b2`, then
//! `h' = Σ_i α̃_i z_i` in branch order. A branch is *computed* when its mask bit is on
//! and `α̃_i > 0` (a branch of a new group at `η = 0` contributes exactly nothing and is
//! skipped, which keeps the function bitwise equal to the pre-expansion one).
//!
//! Backward per layer (given `∂L/∂h'`): `g_i = ⟨∂L/∂h', z_i⟩` feeds the aggregation
//! logits ([`super::agg::logits_grad`]); each computed branch receives
//! `∂L/∂z_i = α̃_i ∂L/∂h'` and its gradients flow back through the block; `∂L/∂h` is the
//! sum over computed branches in branch order.
//!
//! The computed branches of a layer run side by side, one per thread
//! (`block::run_pairwise`); each keeps its own output and its own part of `∂L/∂h`,
//! and the layer combines them in branch order, so the pairing never changes a bit.
//! The layer loop reaches the branches through [`LayerBranches`] (in this process, or on
//! branch hosts, see `model::remote`); everything else stays here.

use super::agg::{self, AggGroups};
use super::attention::{AttnShape, Segments};
use super::block::{BranchWs, BwdScratch, fit};
use super::branches::{LayerBranches, LayerGrads, LayerInput, Local, Pass};
use super::ops::rope::RopeTable;
use super::ops::time2vec::{time2vec_bwd, time2vec_fwd};
use super::ops::{
    Mat, embed_bwd, embed_fwd, layernorm_bwd, layernorm_fwd, mm_nt, mm_tn, profile, serial_gemm,
    weighted_sum, xent_fwd_bwd,
};
use super::params::Params;
use super::{Batch, Masks, ModelConfig, ModelError, Positions};
use crate::config::Section;

/// The model: configuration, parameters and per-layer aggregation groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Shape configuration (`branches` is the initial width only).
    pub config: ModelConfig,
    /// All trainable tensors.
    pub params: Params,
    /// Expansion groups of each layer (see [`super::agg`]).
    pub groups: Vec<AggGroups>,
}

/// Aggregation state of one layer for the current batch.
#[derive(Debug, Default)]
pub(crate) struct LayerWs {
    pub branches: Vec<BranchWs>,
    pub alpha: Vec<f32>,
    pub p: Vec<f32>,
    pub alpha_t: Vec<f32>,
    pub mask: Vec<bool>,
    pub computed: Vec<bool>,
    pub g: Vec<f32>,
}

/// Reusable buffers for forward and backward. Buffers grow to the largest shape seen
/// and are then reused: steady-state steps allocate nothing.
#[derive(Debug, Default)]
pub struct Workspace {
    pub(crate) n: usize,
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) hs: Vec<Vec<f32>>,
    pub(crate) layers: Vec<LayerWs>,
    meanf: Vec<f32>,
    rstdf: Vec<f32>,
    af: Vec<f32>,
    pub(crate) logits: Vec<f32>,
    row_loss: Vec<f64>,
    dh: Vec<f32>,
    dh_prev: Vec<f32>,
    da: Vec<f32>,
    scratch: [BwdScratch; 2],
    segs: Segments,
    /// Rotary angles for positions `0..max_seq_len` (rotary positions only).
    rope: RopeTable,
    /// Each row's position `[B·T]` for the rotary angles: its offset within its segment
    /// (packed) or window.
    rope_pos: Vec<u32>,
    /// Dropout of the last forward pass (a training step), reused by its backward.
    drop: Option<StepDropout>,
    /// Step of the last forward pass when it was a training pass.
    train: Option<u64>,
    /// Time2Vec features `[B·T, k+1]` of the last forward pass (time embedding only).
    t2v_feats: Vec<f32>,
}

/// Dropout of one training step: probability, training seed and step. The mask of branch
/// `i` of layer `l` at site `s` is keyed by `(seed, step, l, i, s)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct StepDropout {
    pub p: f32,
    pub seed: u64,
    pub step: u64,
}

impl Workspace {
    /// Sizes the shared buffers for a batch (branch buffers are sized on use).
    fn prepare(&mut self, cfg: &ModelConfig, widths: &[usize], batch: usize, seq: usize) {
        let (n, d, v) = (batch * seq, cfg.d_model, cfg.vocab_size);
        self.n = n;
        self.batch = batch;
        self.seq = seq;
        self.hs.resize_with(widths.len() + 1, Vec::new);
        for h in &mut self.hs {
            fit(h, n * d);
        }
        self.layers.resize_with(widths.len(), LayerWs::default);
        for (lw, &k) in self.layers.iter_mut().zip(widths) {
            lw.branches.resize_with(k, BranchWs::default);
            for v in [&mut lw.alpha, &mut lw.p, &mut lw.alpha_t, &mut lw.g] {
                fit(v, k);
            }
            lw.mask.resize(k, false);
            lw.computed.resize(k, false);
        }
        for (b, len) in [
            (&mut self.meanf, n),
            (&mut self.rstdf, n),
            (&mut self.af, n * d),
            (&mut self.logits, n * v),
            (&mut self.dh, n * d),
            (&mut self.dh_prev, n * d),
            (&mut self.da, n * d),
        ] {
            fit(b, len);
        }
        self.row_loss.resize(n, 0.0);
    }

    /// Logits `[B, T, V]` of the last forward pass (before any loss computation).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Output `z_i` (`[B·T, d]`) of branch `i` of layer `l` in the last forward pass, when
    /// it was computed.
    pub fn branch_output(&self, l: usize, i: usize) -> Option<&[f32]> {
        let lw = self.layers.get(l)?;
        if *lw.computed.get(i)? {
            Some(&lw.branches[i].z)
        } else {
            None
        }
    }

    /// Renormalised weights `α̃` of layer `l` in the last forward pass.
    pub fn alpha_tilde(&self, l: usize) -> &[f32] {
        &self.layers[l].alpha_t
    }
}

impl Workspace {
    /// Whether the last forward pass used rotary positions.
    fn rope_on(&self) -> bool {
        !self.rope_pos.is_empty()
    }
}

impl Model {
    /// Rotary positions: sizes the angle table and fills each row's position (the offset
    /// within its segment, as for learned positions, or within its window).
    fn prepare_rope(&self, ws: &mut Workspace) {
        let cfg = &self.config;
        ws.rope_pos.clear();
        if cfg.positions != Positions::Rope {
            return;
        }
        if !ws.rope.fits(cfg.max_seq_len, cfg.head_dim()) {
            ws.rope = RopeTable::new(cfg.max_seq_len, cfg.head_dim());
        }
        match ws.segs.positions() {
            Some(p) => ws.rope_pos.extend_from_slice(p),
            None => ws.rope_pos.extend((0..ws.n).map(|n| (n % ws.seq) as u32)),
        }
    }

    /// A freshly initialised model (ARCHITECTURE.md init) from a seed.
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        let params = Params::init(&config, seed);
        let groups = vec![AggGroups::single(); config.n_layers];
        Ok(Self {
            config,
            params,
            groups,
        })
    }

    /// Branches per layer.
    pub fn widths(&self) -> Vec<usize> {
        self.params.widths()
    }

    /// Masks with every branch active.
    pub fn all_active(&self) -> Masks {
        self.widths().into_iter().map(|k| vec![true; k]).collect()
    }

    /// Unmasked aggregation weights `α` of layer `l` (panics if `l >= n_layers`).
    pub fn alphas(&self, l: usize) -> Vec<f32> {
        let s = &self.params.layers[l].alpha_logits;
        let (mut a, mut p) = (vec![0.0; s.len()], vec![0.0; s.len()]);
        agg::alphas(&mut a, &mut p, s, &self.groups[l], self.config.agg_floor);
        a
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.params.count()
    }

    /// Checks that `masks` has one entry per branch and at least one active per layer.
    pub fn check_masks(&self, masks: &Masks) -> Result<(), ModelError> {
        let widths = self.widths();
        if masks.len() != widths.len() {
            return Err(ModelError::Masks(format!(
                "{} mask rows for {} layers; pass one Vec<bool> per layer",
                masks.len(),
                widths.len()
            )));
        }
        for (l, (m, &k)) in masks.iter().zip(&widths).enumerate() {
            if m.len() != k {
                return Err(ModelError::Masks(format!(
                    "layer {l}: mask has {} entries, the layer has {k} branches",
                    m.len()
                )));
            }
            if !m.iter().any(|&b| b) {
                return Err(ModelError::Masks(format!(
                    "layer {l}: no active branch; at least one must be on"
                )));
            }
        }
        Ok(())
    }

    fn attn_shape<'s>(&self, batch: usize, seq: usize, segs: &'s Segments) -> AttnShape<'s> {
        AttnShape {
            batch,
            seq,
            heads: self.config.n_heads,
            head_dim: self.config.head_dim(),
            segs: segs.bounds(),
        }
    }

    /// Forward pass: fills the workspace (activations, `logits` `[B·T, V]`), without
    /// dropout (evaluation, generation).
    ///
    /// # Shapes
    /// `batch.inputs`: `[B, T]` token ids → embeddings `[B·T, d]` → per layer
    /// `[B·T, d]` → `logits` `[B·T, V]` (`B = batch.batch`, `T = batch.seq`).
    pub fn forward(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
    ) -> Result<(), ModelError> {
        self.forward_with(ws, batch, masks, None)
    }

    /// [`Model::forward`] with the dropout of a training step (`None` or `p = 0`: none).
    pub(crate) fn forward_with(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
        drop: Option<StepDropout>,
    ) -> Result<(), ModelError> {
        self.forward_via(ws, batch, masks, drop, &mut Local)
    }

    /// [`Model::forward_with`] with the branches computed by `via`. `drop` is `Some`
    /// on a training pass (its step is the pass's step), `None` for evaluation.
    pub(crate) fn forward_via(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
        drop: Option<StepDropout>,
        via: &mut impl LayerBranches,
    ) -> Result<(), ModelError> {
        batch.validate(&self.config)?;
        self.check_masks(masks)?;
        let cfg = &self.config;
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let widths = self.widths();
        ws.prepare(cfg, &widths, batch.batch, batch.seq);
        ws.segs.fill(batch.segments.as_deref(), batch.seq);
        ws.drop = drop.filter(|sd| sd.p > 0.0);
        ws.train = drop.map(|sd| sd.step);
        self.prepare_rope(ws);
        let n = ws.n;
        let pass = Pass {
            shape: self.attn_shape(batch.batch, batch.seq, &ws.segs),
            rope: ws.rope_on().then_some((&ws.rope, ws.rope_pos.as_slice())),
            drop: ws.drop,
            train: ws.train,
            segments: batch.segments.as_deref(),
        };
        embed_fwd(
            &mut ws.hs[0],
            &self.params.wte,
            &self.params.wpe,
            &batch.inputs,
            ws.segs.positions(),
            batch.seq,
            d,
        );
        let p = &self.params;
        if let (false, Some(times)) = (p.t2v_w.is_empty(), &batch.times) {
            fit(&mut ws.t2v_feats, n * p.t2v_w.len());
            time2vec_fwd(&mut ws.hs[0], &mut ws.t2v_feats, times, p.time2vec(), d);
        }
        for (l, layer) in self.params.layers.iter().enumerate() {
            let (before, after) = ws.hs.split_at_mut(l + 1);
            let (h, out) = (&before[l], &mut after[0]);
            let lw = &mut ws.layers[l];
            lw.mask.copy_from_slice(&masks[l]);
            agg::alphas(
                &mut lw.alpha,
                &mut lw.p,
                &layer.alpha_logits,
                &self.groups[l],
                cfg.agg_floor,
            );
            agg::renormalise(&mut lw.alpha_t, &lw.alpha, &lw.mask);
            for i in 0..layer.branches.len() {
                lw.computed[i] = lw.mask[i] && lw.alpha_t[i] > 0.0;
            }
            let at = LayerInput {
                model: self,
                l,
                h,
                pass: &pass,
            };
            via.forward(at, lw)?;
            let (branches, computed, alpha_t) = (&lw.branches, &lw.computed, &lw.alpha_t);
            weighted_sum(out, || {
                branches
                    .iter()
                    .zip(computed.iter().zip(alpha_t))
                    .filter_map(|(bw, (&on, &a))| on.then_some((a, bw.z.as_slice())))
            });
        }
        let p = &self.params;
        layernorm_fwd(
            &mut ws.af,
            &mut ws.meanf,
            &mut ws.rstdf,
            &ws.hs[widths.len()],
            &p.lnf_gain,
            &p.lnf_bias,
        );
        let _prof = profile::scope(profile::LINEAR);
        super::ops::mm_prec(
            self.config.precision,
            &mut ws.logits,
            &ws.af,
            &p.head_w,
            n,
            d,
            v,
            false,
        );
        Ok(())
    }

    /// Loss of the last forward pass; overwrites the logits with their gradient.
    pub(crate) fn loss(&self, ws: &mut Workspace, batch: &Batch) -> f32 {
        xent_fwd_bwd(
            &mut ws.logits,
            &mut ws.row_loss,
            &batch.targets,
            &batch.loss_mask,
            self.config.vocab_size,
        )
    }

    /// Backward pass after [`Model::forward`] and [`Model::loss`]: writes the gradient of
    /// every tensor of the global part, the aggregation logits and every computed branch
    /// into `grads` (non-computed branches' gradients are left untouched).
    pub(crate) fn backward(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        grads: &mut Params,
    ) -> Result<(), ModelError> {
        self.backward_via(ws, batch, grads, &mut Local)
    }

    /// [`Model::backward`] through the branches of the forward pass (`via`); an
    /// error leaves `grads` partly written (nothing has been applied).
    pub(crate) fn backward_via(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        grads: &mut Params,
        via: &mut impl LayerBranches,
    ) -> Result<(), ModelError> {
        let cfg = &self.config;
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let n = ws.n;
        let nl = self.params.layers.len();
        let p = &self.params;
        {
            let _prof = profile::scope(profile::LINEAR);
            let (af, dlogits, da) = (&ws.af, &ws.logits, &mut ws.da);
            let (hw, pr) = (&p.head_w, cfg.precision);
            let dy = Mat::new(dlogits, n, v);
            rayon::join(
                || serial_gemm(|| mm_tn(pr, &mut grads.head_w, Mat::new(af, n, d), dy, false)),
                || serial_gemm(|| mm_nt(pr, da, dy, Mat::new(hw, d, v), false)),
            );
        }
        layernorm_bwd(
            &mut ws.dh,
            false,
            &mut grads.lnf_gain,
            &mut grads.lnf_bias,
            &ws.da,
            &ws.hs[nl],
            &ws.meanf,
            &ws.rstdf,
            &p.lnf_gain,
            &mut ws.scratch[0].sums,
        );
        // the segment bounds and rotary angles leave the workspace while its layers are
        // borrowed mutably
        let segs = std::mem::take(&mut ws.segs);
        let (table, pos) = (
            std::mem::take(&mut ws.rope),
            std::mem::take(&mut ws.rope_pos),
        );
        let pass = Pass {
            shape: self.attn_shape(ws.batch, ws.seq, &segs),
            rope: (!pos.is_empty()).then_some((&table, pos.as_slice())),
            drop: ws.drop,
            train: ws.train,
            segments: batch.segments.as_deref(),
        };
        let mut done = Ok(());
        for l in (0..nl).rev() {
            done = self.layer_bwd(ws, l, &pass, grads, via);
            if done.is_err() {
                break;
            }
            std::mem::swap(&mut ws.dh, &mut ws.dh_prev);
        }
        (ws.rope, ws.rope_pos) = (table, pos);
        if done.is_err() {
            ws.segs = segs;
            return done;
        }
        embed_bwd(
            &mut grads.wte,
            &mut grads.wpe,
            &ws.dh,
            &batch.inputs,
            segs.positions(),
            batch.seq,
            d,
        );
        if !p.t2v_w.is_empty() {
            match &batch.times {
                Some(times) => time2vec_bwd(
                    [&mut grads.t2v_w, &mut grads.t2v_b, &mut grads.t2v_proj],
                    &ws.dh,
                    &ws.t2v_feats,
                    p.time2vec(),
                    times,
                    d,
                ),
                None => {
                    for g in [&mut grads.t2v_w, &mut grads.t2v_b, &mut grads.t2v_proj] {
                        g.fill(0.0);
                    }
                }
            }
        }
        ws.segs = segs;
        Ok(())
    }

    /// Backward of layer `l`: `ws.dh` (gradient of its output) → `ws.dh_prev`.
    fn layer_bwd(
        &self,
        ws: &mut Workspace,
        l: usize,
        pass: &Pass,
        grads: &mut Params,
        via: &mut impl LayerBranches,
    ) -> Result<(), ModelError> {
        let gl = &mut grads.layers[l];
        let lw = &mut ws.layers[l];
        let (h, dh) = (&ws.hs[l], &ws.dh);
        let at = LayerInput {
            model: self,
            l,
            h,
            pass,
        };
        let back = LayerGrads {
            dh,
            grads: gl,
            scratch: &mut ws.scratch,
        };
        via.backward(at, lw, back)?;
        agg::logits_grad(
            &mut gl.alpha_logits,
            &lw.g,
            &lw.alpha,
            &lw.alpha_t,
            &lw.p,
            &lw.mask,
            &self.groups[l],
            self.config.agg_floor,
        );
        let (branches, computed) = (&lw.branches, &lw.computed);
        weighted_sum(&mut ws.dh_prev, || {
            branches
                .iter()
                .zip(computed)
                .filter_map(|(bw, &on)| on.then_some((1.0, bw.dh.as_slice())))
        });
        Ok(())
    }

    /// Mean loss of a batch without updating anything.
    pub fn eval_loss(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
    ) -> Result<f32, ModelError> {
        self.forward(ws, batch, masks)?;
        Ok(self.loss(ws, batch))
    }

    /// Logits `[B, T, V]` of a batch.
    pub fn logits(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward(ws, batch, masks)?;
        Ok(ws.logits[..ws.n * self.config.vocab_size].to_vec())
    }

    /// Loss and gradients of a batch (gradients of non-computed branches untouched).
    pub fn loss_and_grad(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
        grads: &mut Params,
    ) -> Result<f32, ModelError> {
        self.forward(ws, batch, masks)?;
        let loss = self.loss(ws, batch);
        self.backward(ws, batch, grads)?;
        Ok(loss)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::bench;
    use crate::model::ops::tests::rel_err;
    use crate::model::params::TensorId;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub(crate) fn tiny_config() -> ModelConfig {
        ModelConfig {
            vocab_size: 11,
            d_model: 8,
            n_heads: 2,
            n_layers: 2,
            branches: 3,
            max_seq_len: 6,
            agg_floor: 0.2,
            init_std: 0.3,
            ..ModelConfig::default()
        }
    }

    /// [`crate::model::bench::random_batch`] from a seed, the first two positions of
    /// each row without loss.
    pub(crate) fn random_batch(cfg: &ModelConfig, batch: usize, seq: usize, seed: u64) -> Batch {
        bench::random_batch(cfg, batch, seq, 2, &mut ChaCha8Rng::seed_from_u64(seed))
    }

    /// Whole-model finite-difference check on a subset of coordinates of every tensor.
    fn check_model_gradient(masks: Masks, eta_group: bool) {
        let batch = random_batch(&tiny_config(), 2, 5, 3);
        check_model_gradient_on(&batch, masks, eta_group);
    }

    fn check_model_gradient_on(batch: &Batch, masks: Masks, eta_group: bool) {
        check_model_gradient_with(tiny_config(), None, batch, masks, eta_group);
    }

    /// The whole-model check for a configuration and, optionally, the dropout of one
    /// training step (the same masks in every evaluation of the loss).
    fn check_model_gradient_with(
        cfg: ModelConfig,
        drop: Option<StepDropout>,
        batch: &Batch,
        masks: Masks,
        eta_group: bool,
    ) {
        let mut model = Model::new(cfg.clone(), 11).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // Non-trivial LayerNorm and aggregation parameters.
        for layer in &mut model.params.layers {
            for s in &mut layer.alpha_logits {
                *s = rng.random_range(-1.0..1.0);
            }
            for b in &mut layer.branches {
                for t in b.tensors_mut() {
                    for x in t.iter_mut() {
                        *x += rng.random_range(-0.1..0.1);
                    }
                }
            }
        }
        // a time embedding that is not the zero of its initialisation
        for x in model.params.t2v_proj.iter_mut() {
            *x = rng.random_range(-0.5..0.5);
        }
        if eta_group {
            model.groups[1] = AggGroups {
                start: vec![0, 2],
                eta: vec![1.0, 0.4],
            };
        }
        let mut ws = Workspace::default();
        let mut grads = Params::zeros(&cfg, &model.widths());
        model.forward_with(&mut ws, batch, &masks, drop).unwrap();
        model.loss(&mut ws, batch);
        model.backward(&mut ws, batch, &mut grads).unwrap();
        let loss_of = |m: &Model, ws: &mut Workspace| {
            m.forward_with(ws, batch, &masks, drop).unwrap();
            m.loss(ws, batch) as f64
        };
        let computed: Masks = (0..cfg.n_layers)
            .map(|l| {
                (0..model.widths()[l])
                    .map(|i| ws.layers[l].computed[i])
                    .collect()
            })
            .collect();
        assert_eq!(computed, masks);
        let mut probe = model.clone();
        let (mut an, mut num) = (Vec::new(), Vec::new());
        let h = 1e-2f32;
        for id in grads.ids() {
            if let TensorId::Branch(l, i, _) = id
                && !computed[l][i]
            {
                continue;
            }
            let len = grads.get(id).len();
            for j in (0..len).step_by((len / 7).max(1)) {
                let old = probe.params.get(id)[j];
                probe.params.get_mut(id)[j] = old + h;
                let fp = loss_of(&probe, &mut ws);
                probe.params.get_mut(id)[j] = old - h;
                let fm = loss_of(&probe, &mut ws);
                probe.params.get_mut(id)[j] = old;
                num.push((fp - fm) / (2.0 * h as f64));
                an.push(grads.get(id)[j] as f64);
            }
        }
        let err = rel_err(&an, &num);
        eprintln!(
            "whole-model gradient check: {} coordinates, relative error {err:.2e}",
            num.len()
        );
        assert!(err < 2e-3, "whole-model relative gradient error {err}");
        assert!(num.iter().filter(|x| x.abs() > 1e-4).count() > num.len() / 2);
    }

    #[test]
    fn whole_model_gradient_all_active() {
        check_model_gradient(vec![vec![true; 3]; 2], false);
    }

    #[test]
    fn whole_model_gradient_masked_and_grouped() {
        check_model_gradient(vec![vec![true, false, true], vec![false, true, true]], true);
    }

    #[test]
    fn whole_model_gradient_packed() {
        // two windows of 6: segments of 2, 3, 1 and 4, 2 positions; every wpe row used
        let mut batch = random_batch(&tiny_config(), 2, 6, 8);
        batch.segments = Some(vec![0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 1, 1]);
        check_model_gradient_on(&batch, vec![vec![true; 3]; 2], false);
        check_model_gradient_on(&batch, vec![vec![false, true, true], vec![true; 3]], true);
    }

    fn rope_config() -> ModelConfig {
        ModelConfig {
            positions: super::Positions::Rope,
            ..tiny_config()
        }
    }

    #[test]
    fn whole_model_gradient_rope_plain_and_packed() {
        let batch = random_batch(&rope_config(), 2, 5, 3);
        check_model_gradient_with(rope_config(), None, &batch, vec![vec![true; 3]; 2], false);
        let mut packed = random_batch(&rope_config(), 2, 6, 8);
        packed.segments = Some(vec![0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 1, 1]);
        let masks = vec![vec![false, true, true], vec![true; 3]];
        check_model_gradient_with(rope_config(), None, &packed, masks, true);
    }

    #[test]
    fn whole_model_gradient_with_fixed_dropout_masks() {
        let drop = StepDropout {
            p: 0.2,
            seed: 5,
            step: 3,
        };
        let cfg = ModelConfig {
            dropout: 0.2,
            ..rope_config()
        };
        let batch = random_batch(&cfg, 2, 5, 3);
        check_model_gradient_with(
            cfg.clone(),
            Some(drop),
            &batch,
            vec![vec![true; 3]; 2],
            false,
        );
        // the masks are on: the training loss differs from the evaluation loss
        let model = Model::new(cfg, 11).unwrap();
        let mut ws = Workspace::default();
        let masks = model.all_active();
        let eval = model.eval_loss(&mut ws, &batch, &masks).unwrap();
        model
            .forward_with(&mut ws, &batch, &masks, Some(drop))
            .unwrap();
        assert_ne!(model.loss(&mut ws, &batch), eval);
    }

    fn time2vec_config() -> ModelConfig {
        ModelConfig {
            time_embedding: super::super::TimeEmbedding::Time2vec,
            time_features: 3,
            ..tiny_config()
        }
    }

    #[test]
    fn whole_model_gradient_time2vec_plain_and_packed() {
        let cfg = time2vec_config();
        let mut batch = random_batch(&cfg, 2, 5, 3);
        batch.times = Some(vec![2.0, 2.0, 2.0, 2.0, 2.0, 2.4, 2.4, 2.4, 2.4, f32::NAN]);
        check_model_gradient_with(cfg.clone(), None, &batch, vec![vec![true; 3]; 2], false);
        // packed: each segment its own row's time, padding unknown
        let mut packed = random_batch(&cfg, 2, 6, 8);
        packed.segments = Some(vec![0, 0, 1, 1, 1, 2, 0, 0, 0, 0, 1, 1]);
        packed.times = Some(vec![
            -0.5,
            -0.5,
            1.3,
            1.3,
            1.3,
            f32::NAN,
            2.4,
            2.4,
            2.4,
            2.4,
            0.7,
            0.7,
        ]);
        let masks = vec![vec![false, true, true], vec![true; 3]];
        check_model_gradient_with(cfg, None, &packed, masks, true);
    }

    /// With the time embedding on, the rows' times change the logits (a fresh model's
    /// projection is zero: it computes exactly what the model without it computes), and a
    /// batch without times gets no time input.
    #[test]
    fn time2vec_starts_as_a_no_op_and_then_depends_on_time() {
        let cfg = time2vec_config();
        let plain = Model::new(tiny_config(), 11).unwrap();
        let mut model = Model::new(cfg.clone(), 11).unwrap();
        assert_eq!(model.params.t2v_w.len(), 4);
        assert_eq!(
            model.params.wte, plain.params.wte,
            "other tensors drawn as before"
        );
        let masks = model.all_active();
        let mut ws = Workspace::default();
        let mut batch = random_batch(&cfg, 1, 5, 3);
        let none = plain.logits(&mut ws, &batch, &masks).unwrap();
        batch.times = Some(vec![2.0; 5]);
        let fresh = model.logits(&mut ws, &batch, &masks).unwrap();
        assert!(
            none.iter()
                .zip(&fresh)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        model.params.t2v_proj.iter_mut().for_each(|x| *x = 0.3);
        let t20 = model.logits(&mut ws, &batch, &masks).unwrap();
        batch.times = Some(vec![2.4; 5]);
        let t24 = model.logits(&mut ws, &batch, &masks).unwrap();
        assert_ne!(t20, t24);
        batch.times = None;
        let unknown = model.logits(&mut ws, &batch, &masks).unwrap();
        assert!(
            none.iter()
                .zip(&unknown)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }

    /// Rows of the given lengths packed into windows of `seq` (in order, a new window when
    /// the next row does not fit), the rest padded with token 0 in a segment of its own.
    fn pack_rows(rows: &[Vec<u32>], seq: usize) -> (Batch, Vec<(usize, usize)>) {
        let (mut inputs, mut segments, mut at) = (Vec::new(), Vec::new(), Vec::new());
        let mut window: (Vec<u32>, Vec<u16>) = (Vec::new(), Vec::new());
        let flush = |w: &mut (Vec<u32>, Vec<u16>), inputs: &mut Vec<u32>, segs: &mut Vec<u16>| {
            let pad_seg = w.1.last().map_or(0, |&s| s + 1);
            w.0.resize(seq, 0);
            w.1.resize(seq, pad_seg);
            inputs.append(&mut w.0);
            segs.append(&mut w.1);
        };
        for row in rows {
            if window.0.len() + row.len() > seq {
                flush(&mut window, &mut inputs, &mut segments);
            }
            let seg = window.1.last().map_or(0, |&s| s + 1);
            at.push((inputs.len() + window.0.len(), row.len()));
            window.0.extend(row);
            window.1.extend(std::iter::repeat_n(seg, row.len()));
        }
        flush(&mut window, &mut inputs, &mut segments);
        let n = inputs.len();
        let batch = Batch {
            batch: n / seq,
            seq,
            targets: inputs.clone(),
            inputs,
            loss_mask: vec![1.0; n],
            segments: Some(segments),
            times: None,
        };
        (batch, at)
    }

    /// A packed batch gives every row bit for bit the logits that row gets alone (at the
    /// start of a window of the same length, padded, no segments). Bitwise because every
    /// kernel is row-local or sums a row's own terms in the same order wherever the row
    /// sits: products over `d` are per row, masked attention terms are exact zeros, and the
    /// softmax sums its lanes counted from the segment start (the same lanes as at position
    /// 0 when the window length is a multiple of 16, as here).
    #[test]
    fn packed_rows_get_the_logits_they_get_alone() {
        packed_rows_alone(tiny_config());
    }

    #[test]
    fn packed_rows_get_the_logits_they_get_alone_with_rope() {
        packed_rows_alone(rope_config());
    }

    fn packed_rows_alone(base: ModelConfig) {
        let cfg = ModelConfig {
            max_seq_len: 32,
            ..base
        };
        let model = Model::new(cfg.clone(), 21).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let rows: Vec<Vec<u32>> = [5, 11, 1, 9, 20, 3, 32, 7, 17]
            .iter()
            .map(|&len| (0..len).map(|_| rng.random_range(0..11)).collect())
            .collect();
        let seq = 32;
        let (packed, at) = pack_rows(&rows, seq);
        assert!(packed.batch < rows.len(), "rows share windows");
        let masks = model.all_active();
        let mut ws = Workspace::default();
        let logits = model.logits(&mut ws, &packed, &masks).unwrap();
        let v = cfg.vocab_size;
        for (row, &(start, len)) in rows.iter().zip(&at) {
            let mut inputs = row.clone();
            inputs.resize(seq, 0);
            let alone = Batch {
                batch: 1,
                seq,
                targets: inputs.clone(),
                inputs,
                loss_mask: vec![1.0; seq],
                times: None,
                segments: None,
            };
            let want = model.logits(&mut ws, &alone, &masks).unwrap();
            let got = &logits[start * v..(start + len) * v];
            assert!(
                got.iter()
                    .zip(&want[..len * v])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row of {len} at {start}: packed logits differ from alone"
            );
        }
    }
}
