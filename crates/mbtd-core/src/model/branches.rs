//! The narrow interface between the layer loop and "the branches of layer `l`".
//!
//! [`Model::forward_via`](super::net::Model) and the backward pass hand each layer's
//! branch work to a [`LayerBranches`]: [`Local`] runs the branches in this process
//! (`block::run_pairwise`, today's code path, monomorphised so it costs nothing), and
//! `remote::RemoteBranches` sends them to branch hosts as messages. Everything around
//! the branches — embeddings, aggregation weights and their renormalisation, the sum
//! `h' = Σ α̃_i z_i`, the aggregation gradients, LayerNorm, head, loss — stays in the
//! layer loop, so both implementations feed it the same numbers.

use super::ModelError;
use super::attention::AttnShape;
use super::block::{BlockOpts, BwdScratch, branch_bwd, branch_fwd, run_pairwise};
use super::net::{LayerWs, Model, StepDropout};
use super::ops::Precision;
use super::ops::dot_f64;
use super::ops::dropout::Dropout;
use super::ops::rope::RopeTable;
use super::params::LayerParams;

/// What every branch of a pass shares besides its weights.
#[derive(Clone, Copy)]
pub(crate) struct Pass<'a> {
    /// Attention shape and packed segment bounds.
    pub shape: AttnShape<'a>,
    /// Rotary angles and each row's position.
    pub rope: Option<(&'a RopeTable, &'a [u32])>,
    /// Dropout of a training step (`p > 0` only).
    pub drop: Option<StepDropout>,
    /// `Some(step)` on a training pass (its backward and update follow).
    pub train: Option<u64>,
    /// Segment ids of a packed batch (`[B·T]`).
    pub segments: Option<&'a [u16]>,
}

/// Branch options of layer `l`, branch `i`: the dropout key of `(seed, step, l, i)`.
pub(crate) fn block_opts<'a>(
    rope: Option<(&'a RopeTable, &'a [u32])>,
    drop: Option<StepDropout>,
    l: usize,
    i: usize,
    prec: Precision,
) -> BlockOpts<'a> {
    BlockOpts {
        rope,
        drop: drop.map(|sd| Dropout::at(sd.p, sd.seed, sd.step, l, i, 0)),
        prec,
    }
}

/// The layer a branch call works on: the model, the layer index `l`, its input `h`
/// (`[B·T, d]`) and what every branch of the pass shares.
#[derive(Clone, Copy)]
pub(crate) struct LayerInput<'a> {
    pub model: &'a Model,
    pub l: usize,
    pub h: &'a [f32],
    pub pass: &'a Pass<'a>,
}

/// What a backward call reads and writes besides the layer's workspace: `dh = ∂L/∂h'`,
/// the layer's gradients and the two threads' scratch.
pub(crate) struct LayerGrads<'a> {
    pub dh: &'a [f32],
    pub grads: &'a mut LayerParams,
    pub scratch: &'a mut [BwdScratch; 2],
}

/// What a branch call returns: an error when the pass must be abandoned.
pub(crate) type Done = Result<(), ModelError>;

/// Where the branches of a layer are computed.
pub(crate) trait LayerBranches {
    /// Forward of the branches of layer `l` marked in `lw.computed` on the layer input
    /// `h`: each one's output into `lw.branches[i].z` (`[B·T, d]`). A branch whose output
    /// cannot be had is masked for this pass: its bit of `lw.mask` cleared, `lw.alpha_t`
    /// renormalised and `lw.computed` recomputed, exactly as if the availability mask had
    /// left it out. An error when no computed branch is left (the pass is abandoned).
    fn forward(&mut self, at: LayerInput, lw: &mut LayerWs) -> Done;

    /// Backward of layer `l` from `dh = ∂L/∂h'`: for every computed branch `i`,
    /// `lw.g[i] = ⟨dh, z_i⟩` (0 elsewhere), its part of `∂L/∂h` into `lw.branches[i].dh`,
    /// and its weight gradients (into `grads` for branches computed here). An error when
    /// a branch's backward cannot be had (nothing has been updated yet; the step is
    /// abandoned).
    fn backward(&mut self, at: LayerInput, lw: &mut LayerWs, g: LayerGrads) -> Done;
}

/// Every branch in this process.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Local;

impl LayerBranches for Local {
    #[inline]
    fn forward(&mut self, at: LayerInput, lw: &mut LayerWs) -> Done {
        forward_here(at, lw, |_| true);
        Ok(())
    }

    #[inline]
    fn backward(&mut self, at: LayerInput, lw: &mut LayerWs, g: LayerGrads) -> Done {
        backward_here(at, lw, g, |_| true);
        Ok(())
    }
}

/// How many branches are computed and have `here(i)`.
fn count_here(computed: &[bool], here: &impl Fn(usize) -> bool) -> usize {
    (0..)
        .zip(computed)
        .filter(|&(i, &on)| on && here(i))
        .count()
}

/// Forward, in this process, of the computed branches `i` of layer `l` with `here(i)`.
pub(crate) fn forward_here(at: LayerInput, lw: &mut LayerWs, here: impl Fn(usize) -> bool + Sync) {
    let LayerInput { model, l, h, pass } = at;
    let count = count_here(&lw.computed, &here);
    let layer = &model.params.layers[l];
    let prec = model.config.precision;
    let todo = layer
        .branches
        .iter()
        .zip(lw.branches.iter_mut())
        .zip(&lw.computed)
        .enumerate()
        .filter_map(|(i, (pair, &on))| (on && here(i)).then_some((i, pair)));
    run_pairwise(todo, count, &mut [(), ()], |(i, (bp, bw)), _| {
        branch_fwd(
            bp,
            bw,
            h,
            pass.shape,
            block_opts(pass.rope, pass.drop, l, i, prec),
        )
    });
}

/// Backward, in this process, of the computed branches `i` of layer `l` with `here(i)`;
/// sets `lw.g` to 0 for every other branch.
pub(crate) fn backward_here(
    at: LayerInput,
    lw: &mut LayerWs,
    g: LayerGrads,
    here: impl Fn(usize) -> bool + Sync,
) {
    let LayerInput { model, l, h, pass } = at;
    let LayerGrads { dh, grads, scratch } = g;
    let layer = &model.params.layers[l];
    let prec = model.config.precision;
    let alpha_t = &lw.alpha_t;
    let computed = &lw.computed;
    let count = count_here(computed, &here);
    let todo = layer
        .branches
        .iter()
        .zip(lw.branches.iter_mut())
        .zip(grads.branches.iter_mut())
        .zip(lw.g.iter_mut())
        .enumerate()
        .filter_map(|(i, (((bp, bw), gb), g))| {
            *g = 0.0;
            (computed[i] && here(i)).then_some((i, alpha_t[i], bp, bw, gb, g))
        });
    run_pairwise(todo, count, scratch, |(i, alpha, bp, bw, gb, g), sc| {
        // the aggregation logits' input: g_i = ⟨∂L/∂h', z_i⟩
        *g = dot_f64(dh, &bw.z) as f32;
        let o = block_opts(pass.rope, pass.drop, l, i, prec);
        branch_bwd(bp, bw, gb, sc, dh, alpha, h, pass.shape, o)
    });
}
