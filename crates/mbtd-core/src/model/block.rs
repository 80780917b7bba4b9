//! One branch: a pre-LN GPT block, its forward and backward pass, and the scheduler that
//! runs a layer's branches two at a time.
//!
//! Forward on input `h` (`[n, d]`): `a1 = LN1(h)`, `qkv = a1·Wqkv + bqkv`,
//! `att = Attn(qkv)`, `u = h + att·Wo + bo`, `a2 = LN2(u)`, `f = a2·W1 + b1`,
//! `g = gelu(f)`, `z = u + g·W2 + b2`.
//!
//! Options ([`BlockOpts`]): rotary positions rotate the `q` and `k` parts of `qkv` per
//! head before attention (`qkv ← R(pos)·qkv`; backward: the inverse rotation of `∂L/∂qkv`
//! after the attention backward). Dropout (training only) multiplies by fixed masks
//! (see [`super::ops::dropout`]): the attention probabilities (site 0), the GELU output
//! (`g ← M₁ ⊙ g`, site 1) and both residual branch outputs
//! (`u = h + M₂ ⊙ (att·Wo + bo)`, `z = u + M₃ ⊙ (g·W2 + b2)`, sites 2 and 3); each
//! backward multiplies the incoming gradient by the same mask.
//!
//! Backward from `∂L/∂z = α̃·∂L/∂h'`: `∂L/∂u = ∂L/∂z + LN2ᵀ(W1ᵀ(gelu'(f) ⊙ W2ᵀ∂L/∂z))`,
//! `∂L/∂h = ∂L/∂u + LN1ᵀ(Wqkvᵀ Attnᵀ(Woᵀ ∂L/∂u))`, with every weight gradient `xᵀ·dy`
//! on the way.
//!
//! Branches are independent given `h` (forward) and `∂L/∂h'` (backward), so
//! [`run_pairwise`] computes them side by side, one per thread with single-threaded
//! products: on two cores this beats splitting every product across both threads
//! (no barrier per product, no packing shared between cores). The result does not
//! depend on the pairing or the thread count: each branch's arithmetic is the same
//! whichever thread runs it, and the layer sums the branches in branch order.

use super::attention::{AttnShape, attn_bwd, attn_fwd};
use super::ops::dropout::{Dropout, dropout_apply};
use super::ops::rope::{RopeTable, rope_bwd, rope_fwd};
use super::ops::{
    ColSums, Mat, Precision, bias_gelu_fwd, gelu_bwd_colsum, layernorm_bwd, layernorm_fwd,
    linear_bwd, linear_fwd, linear_nobias_fwd, residual_linear_fwd, scale_colsum, serial_gemm,
};
use super::params::BranchParams;
use std::sync::Mutex;

/// What a branch block does besides its fixed maths.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BlockOpts<'a> {
    /// Rotary positions: the angle table and each row's position `[B·T]`.
    pub rope: Option<(&'a RopeTable, &'a [u32])>,
    /// Dropout of this branch (its sites are derived from this key).
    pub drop: Option<Dropout>,
    /// Arithmetic of the four linear products (forward and backward).
    pub prec: Precision,
}

/// Dropout sites of a branch.
const SITE_PROBS: u64 = 0;
const SITE_GELU: u64 = 1;
const SITE_ATTN_OUT: u64 = 2;
const SITE_MLP_OUT: u64 = 3;

/// Activations kept for the backward pass of one branch.
#[derive(Debug, Default)]
pub(crate) struct BranchWs {
    pub mean1: Vec<f32>,
    pub rstd1: Vec<f32>,
    pub a1: Vec<f32>,
    pub qkv: Vec<f32>,
    pub probs: Vec<f32>,
    /// The dropped probabilities `P ⊙ M` (empty without dropout).
    pub probs_drop: Vec<f32>,
    pub att: Vec<f32>,
    pub u: Vec<f32>,
    pub mean2: Vec<f32>,
    pub rstd2: Vec<f32>,
    pub a2: Vec<f32>,
    /// `gelu'(a2·W1 + b1)`: the pre-activation itself is not needed by backward.
    pub dgelu: Vec<f32>,
    pub g: Vec<f32>,
    pub z: Vec<f32>,
    /// This branch's part of `∂L/∂h` after the backward pass.
    pub dh: Vec<f32>,
}

/// Scratch of one branch's backward pass (one per branch computed side by side).
#[derive(Debug, Default)]
pub(crate) struct BwdScratch {
    dz: Vec<f32>,
    dbig: Vec<f32>,
    da: Vec<f32>,
    datt: Vec<f32>,
    dqkv: Vec<f32>,
    dprobs: Vec<f32>,
    /// Bias and LayerNorm gradient sums.
    pub sums: ColSums,
}

/// Resizes a reusable buffer to `n` elements (no allocation once it has been that large).
pub(crate) fn fit(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

impl BranchWs {
    fn fit(&mut self, n: usize, d: usize, probs: usize, drop: bool) {
        fit(&mut self.probs_drop, if drop { probs } else { 0 });
        for (v, len) in [
            (&mut self.mean1, n),
            (&mut self.rstd1, n),
            (&mut self.a1, n * d),
            (&mut self.qkv, n * 3 * d),
            (&mut self.probs, probs),
            (&mut self.att, n * d),
            (&mut self.u, n * d),
            (&mut self.mean2, n),
            (&mut self.rstd2, n),
            (&mut self.a2, n * d),
            (&mut self.dgelu, n * 4 * d),
            (&mut self.g, n * 4 * d),
            (&mut self.z, n * d),
        ] {
            fit(v, len);
        }
    }
}

impl BwdScratch {
    fn fit(&mut self, n: usize, d: usize, probs: usize) {
        for (v, len) in [
            (&mut self.dz, n * d),
            (&mut self.dbig, n * 4 * d),
            (&mut self.da, n * d),
            (&mut self.datt, n * d),
            (&mut self.dqkv, n * 3 * d),
            (&mut self.dprobs, probs),
        ] {
            fit(v, len);
        }
    }
}

fn sizes(s: AttnShape) -> (usize, usize, usize) {
    let d = s.heads * s.head_dim;
    (s.batch * s.seq, d, s.batch * s.heads * s.seq * s.seq)
}

/// Forward of one branch block on input `h` (`[n, d]`), filling `bw`.
///
/// # Shapes
/// `h`, `bw.z`: `[n, d]` with `n = B·T`; `bw.qkv`: `[n, 3d]`; `bw.g`: `[n, 4d]`;
/// `bw.probs`: `[B, H, T, T]`.
pub(crate) fn branch_fwd(
    bp: &BranchParams,
    bw: &mut BranchWs,
    h: &[f32],
    s: AttnShape,
    o: BlockOpts,
) {
    let (n, d, probs) = sizes(s);
    bw.fit(n, d, probs, o.drop.is_some());
    layernorm_fwd(
        &mut bw.a1,
        &mut bw.mean1,
        &mut bw.rstd1,
        h,
        &bp.ln1_gain,
        &bp.ln1_bias,
    );
    linear_fwd(o.prec, &mut bw.qkv, &bw.a1, &bp.qkv_w, &bp.qkv_b, n, d);
    if let Some((table, pos)) = o.rope {
        rope_fwd(&mut bw.qkv, 3 * d, 2 * d, table, pos);
    }
    let site = |k| o.drop.map(|dr| dr.site(k));
    let pd = site(SITE_PROBS).map(|k| (&mut bw.probs_drop[..], k));
    attn_fwd(&mut bw.att, &mut bw.probs, &bw.qkv, s, pd);
    let att = Mat::new(&bw.att, n, d);
    residual(
        o.prec,
        &mut bw.u,
        h,
        att,
        &bp.out_w,
        &bp.out_b,
        site(SITE_ATTN_OUT),
    );
    layernorm_fwd(
        &mut bw.a2,
        &mut bw.mean2,
        &mut bw.rstd2,
        &bw.u,
        &bp.ln2_gain,
        &bp.ln2_bias,
    );
    linear_nobias_fwd(o.prec, &mut bw.dgelu, &bw.a2, &bp.fc_w, n, d, 4 * d);
    bias_gelu_fwd(&mut bw.g, &mut bw.dgelu, &bp.fc_b);
    if let Some(k) = site(SITE_GELU) {
        dropout_apply(&mut bw.g, k, 0);
    }
    let g = Mat::new(&bw.g, n, 4 * d);
    residual(
        o.prec,
        &mut bw.z,
        &bw.u,
        g,
        &bp.proj_w,
        &bp.proj_b,
        site(SITE_MLP_OUT),
    );
}

/// `y = x + M ⊙ (a·W + b)` with `M` the mask of the dropout site `drop`, or `y = x + a·W + b`
/// without one (`y`: `[n, d_out]`).
fn residual(
    prec: Precision,
    y: &mut [f32],
    x: &[f32],
    a: Mat<'_>,
    w: &[f32],
    b: &[f32],
    drop: Option<Dropout>,
) {
    let Some(site) = drop else {
        return residual_linear_fwd(prec, y, x, a, w, b);
    };
    linear_fwd(prec, y, a.data, w, b, a.rows, a.cols);
    dropout_apply(y, site, 0);
    for (o, &v) in y.iter_mut().zip(x) {
        *o += v;
    }
}

/// Backward of one branch after [`branch_fwd`]: `dh_out` (`∂L/∂h'`, scaled by `alpha`)
/// → `bw.dh` (this branch's part of `∂L/∂h`) and the branch's gradients `gb`
/// (overwritten). `h` is the block's input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn branch_bwd(
    bp: &BranchParams,
    bw: &mut BranchWs,
    gb: &mut BranchParams,
    sc: &mut BwdScratch,
    dh_out: &[f32],
    alpha: f32,
    h: &[f32],
    s: AttnShape,
    o: BlockOpts,
) {
    let (n, d, probs) = sizes(s);
    sc.fit(n, d, probs);
    fit(&mut bw.dh, n * d);
    let site = |k| o.drop.map(|dr| dr.site(k));
    scale_colsum(&mut sc.dz, alpha, dh_out, &mut gb.proj_b, &mut sc.sums);
    // z = u + g·W2 + b2 (with dropout z = u + M₃ ⊙ (g·W2 + b2): the branch gets M₃ ⊙ ∂L/∂z,
    // built in `datt`, free until the attention backward)
    let dbig = Some((&mut sc.dbig[..], false));
    match site(SITE_MLP_OUT) {
        Some(k) => {
            sc.datt.copy_from_slice(&sc.dz);
            dropout_apply(&mut sc.datt, k, 0);
            sc.sums.of(&mut gb.proj_b, &sc.datt);
            linear_bwd(
                o.prec,
                dbig,
                &mut gb.proj_w,
                &bw.g,
                &bp.proj_w,
                &sc.datt,
                n,
                4 * d,
                d,
            );
        }
        None => linear_bwd(
            o.prec,
            dbig,
            &mut gb.proj_w,
            &bw.g,
            &bp.proj_w,
            &sc.dz,
            n,
            4 * d,
            d,
        ),
    }
    if let Some(k) = site(SITE_GELU) {
        dropout_apply(&mut sc.dbig, k, 0);
    }
    gelu_bwd_colsum(&mut sc.dbig, &bw.dgelu, &mut gb.fc_b, &mut sc.sums);
    // f = a2·W1 + b1
    let da = Some((&mut sc.da[..], false));
    linear_bwd(
        o.prec,
        da,
        &mut gb.fc_w,
        &bw.a2,
        &bp.fc_w,
        &sc.dbig,
        n,
        d,
        4 * d,
    );
    // u → a2 = LN2(u), plus the residual path dz; `bw.dh` holds ∂L/∂u from here on.
    bw.dh.copy_from_slice(&sc.dz);
    layernorm_bwd(
        &mut bw.dh,
        true,
        &mut gb.ln2_gain,
        &mut gb.ln2_bias,
        &sc.da,
        &bw.u,
        &bw.mean2,
        &bw.rstd2,
        &bp.ln2_gain,
        &mut sc.sums,
    );
    // u = h + att·Wo + bo (with dropout the branch gets M₂ ⊙ ∂L/∂u, built in `dz`)
    let du: &[f32] = match site(SITE_ATTN_OUT) {
        Some(k) => {
            sc.dz.copy_from_slice(&bw.dh);
            dropout_apply(&mut sc.dz, k, 0);
            &sc.dz
        }
        None => &bw.dh,
    };
    sc.sums.of(&mut gb.out_b, du);
    let datt = Some((&mut sc.datt[..], false));
    linear_bwd(o.prec, datt, &mut gb.out_w, &bw.att, &bp.out_w, du, n, d, d);
    attn_bwd(
        &mut sc.dqkv,
        &mut sc.dprobs,
        &sc.datt,
        &bw.probs,
        &bw.qkv,
        s,
        site(SITE_PROBS),
    );
    if let Some((table, pos)) = o.rope {
        rope_bwd(&mut sc.dqkv, 3 * d, 2 * d, table, pos);
    }
    sc.sums.of(&mut gb.qkv_b, &sc.dqkv);
    let da = Some((&mut sc.da[..], false));
    linear_bwd(
        o.prec,
        da,
        &mut gb.qkv_w,
        &bw.a1,
        &bp.qkv_w,
        &sc.dqkv,
        n,
        d,
        3 * d,
    );
    // h → a1 = LN1(h), plus the residual path ∂L/∂u.
    layernorm_bwd(
        &mut bw.dh,
        true,
        &mut gb.ln1_gain,
        &mut gb.ln1_bias,
        &sc.da,
        h,
        &bw.mean1,
        &bw.rstd1,
        &bp.ln1_gain,
        &mut sc.sums,
    );
}

/// Runs `f(item, scratch)` on every item, `count` of them: two threads take items from
/// a shared queue one at a time (their products single-threaded, scratch `0` and `1`),
/// so the layer waits once for the slower thread rather than once per pair; an odd last
/// item runs alone with every thread (scratch `0`).
pub(crate) fn run_pairwise<T: Send, S: Send>(
    mut items: impl Iterator<Item = T> + Send,
    count: usize,
    scratch: &mut [S; 2],
    f: impl Fn(T, &mut S) + Sync,
) {
    let [s0, s1] = scratch;
    let paired = count / 2 * 2;
    if paired > 0 {
        let queue = Mutex::new(items.by_ref().take(paired));
        // a poisoned queue means the other thread panicked; its panic propagates from join
        let next = || queue.lock().ok().and_then(|mut q| q.next());
        let work = |s: &mut S| {
            serial_gemm(|| {
                while let Some(item) = next() {
                    f(item, s);
                }
            })
        };
        rayon::join(|| work(s0), || work(s1));
    }
    for item in items {
        f(item, s0);
    }
}
