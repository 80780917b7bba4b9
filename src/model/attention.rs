//! Causal multi-head self-attention on a packed `qkv` buffer.
//!
//! Layout: `qkv` is `[B·T, 3d]` with columns `q | k | v`, each heads-contiguous (head
//! `h` owns columns `h·hd..(h+1)·hd` of its part). For each batch row `b` and head `h`:
//! `S = Q·Kᵀ/√hd`, `P = softmax(S + causal mask)` (row-wise, `j ≤ i`), `Y = P·V`, written
//! to `att[b·T + i, h·hd..]`. Only `P` is kept for the backward pass:
//! `dV = Pᵀ·dY`, `dP = dY·Vᵀ`, `dS = P ⊙ (dP - rowsum(dP ⊙ P))`,
//! `dQ = dS·K/√hd`, `dK = dSᵀ·Q/√hd`.
//!
//! The `(b, h)` pairs run in parallel on rayon; each writes disjoint output regions, so
//! the result does not depend on the thread count.

use super::ops::{View, dot16, fast_exp, gemm_into, max16, prof, simd, sum16};
use gemm::Parallelism;
use rayon::prelude::*;

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn d(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// A raw pointer that may cross threads; used only for disjoint writes.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every task writes a region no other task touches (see the call sites).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `off..off+len` must lie in the original buffer and no other live reference may
    /// touch it.
    unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }
}

/// Query rows per causal block: block `[r0, r1)` only needs keys `0..r1`, which skips most
/// of the masked upper triangle in the score and weighted-sum products.
const BLOCK: usize = 64;

/// Row blocks `[r0, r1)` of a sequence of length `t`.
fn blocks(t: usize, block: usize) -> impl DoubleEndedIterator<Item = (usize, usize)> {
    (0..t.div_ceil(block)).map(move |b| (b * block, ((b + 1) * block).min(t)))
}

/// A strided view of rows `r0..` of a `[rows, 3d]`-strided head slice.
fn rows_of(data: &[f32], r0: usize, rs: usize) -> View<'_> {
    View {
        data: &data[r0 * rs..],
        rs,
        cs: 1,
    }
}

/// Forward: fills `probs` (`[B, H, T, T]`, upper triangle zero) and `att` (`[B·T, d]`).
pub(crate) fn attn_fwd(att: &mut [f32], probs: &mut [f32], qkv: &[f32], s: AttnShape) {
    attn_fwd_blocked(att, probs, qkv, s, BLOCK);
}

fn attn_fwd_blocked(att: &mut [f32], probs: &mut [f32], qkv: &[f32], s: AttnShape, block: usize) {
    let _prof = prof::scope(prof::ATTN);
    let (t, hd, d) = (s.seq, s.head_dim, s.d());
    assert!(att.len() >= s.batch * t * d && probs.len() >= s.batch * s.heads * t * t);
    assert!(qkv.len() >= s.batch * t * 3 * d);
    let scale = 1.0 / (hd as f32).sqrt();
    let att_ptr = SendPtr(att.as_mut_ptr());
    probs[..s.batch * s.heads * t * t]
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let base = b * t * 3 * d;
            let q = &qkv[base + h * hd..];
            let k = View {
                data: &qkv[base + d + h * hd..],
                rs: 1,
                cs: 3 * d,
            };
            let v = View {
                data: &qkv[base + 2 * d + h * hd..],
                rs: 3 * d,
                cs: 1,
            };
            // SAFETY: task (b, h) alone writes rows b·T..(b+1)·T, columns h·hd..(h+1)·hd.
            let out = unsafe { att_ptr.slice(b * t * d + h * hd, (t - 1) * d + hd) };
            for (r0, r1) in blocks(t, block) {
                let pb = &mut p[r0 * t..r1 * t];
                gemm_into(
                    r1 - r0,
                    r1,
                    hd,
                    pb,
                    t,
                    false,
                    rows_of(q, r0, 3 * d),
                    k,
                    Parallelism::None,
                );
                simd(
                    #[inline(always)]
                    || {
                        for (ii, row) in pb.chunks_exact_mut(t).enumerate() {
                            let i = r0 + ii;
                            let live = &mut row[..=i];
                            let mx = max16(live) * scale;
                            for e in live.iter_mut() {
                                *e = fast_exp(*e * scale - mx);
                            }
                            let inv = 1.0 / sum16(live);
                            for e in live.iter_mut() {
                                *e *= inv;
                            }
                            row[i + 1..].fill(0.0);
                        }
                    },
                );
                gemm_into(
                    r1 - r0,
                    hd,
                    r1,
                    &mut out[r0 * d..],
                    d,
                    false,
                    View::rm(pb, t),
                    v,
                    Parallelism::None,
                );
            }
        });
}

/// Backward: `datt` (`[B·T, d]`) → `dqkv` (`[B·T, 3d]`, overwritten). `dprobs` is scratch
/// of the size of `probs`.
pub(crate) fn attn_bwd(
    dqkv: &mut [f32],
    dprobs: &mut [f32],
    datt: &[f32],
    probs: &[f32],
    qkv: &[f32],
    s: AttnShape,
) {
    attn_bwd_blocked(dqkv, dprobs, datt, probs, qkv, s, BLOCK);
}

fn attn_bwd_blocked(
    dqkv: &mut [f32],
    dprobs: &mut [f32],
    datt: &[f32],
    probs: &[f32],
    qkv: &[f32],
    s: AttnShape,
    block: usize,
) {
    let _prof = prof::scope(prof::ATTN);
    let (t, hd, d) = (s.seq, s.head_dim, s.d());
    assert!(dqkv.len() >= s.batch * t * 3 * d && datt.len() >= s.batch * t * d);
    assert!(dprobs.len() >= s.batch * s.heads * t * t);
    let scale = 1.0 / (hd as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    dprobs[..s.batch * s.heads * t * t]
        .par_chunks_mut(t * t)
        .zip(probs.par_chunks(t * t))
        .enumerate()
        .for_each(|(bh, (dp, p))| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let base = b * t * 3 * d;
            let q = &qkv[base + h * hd..];
            let k = View {
                data: &qkv[base + d + h * hd..],
                rs: 3 * d,
                cs: 1,
            };
            let vt = View {
                data: &qkv[base + 2 * d + h * hd..],
                rs: 1,
                cs: 3 * d,
            };
            let dy = &datt[b * t * d + h * hd..];
            let span = (t - 1) * 3 * d + hd;
            // SAFETY: task (b, h) alone writes rows b·T..(b+1)·T of dqkv at the columns
            // of head h in each of the q, k, v parts; the three regions are disjoint.
            let (dq, dk, dv) = unsafe {
                (
                    dptr.slice(base + h * hd, span),
                    dptr.slice(base + d + h * hd, span),
                    dptr.slice(base + 2 * d + h * hd, span),
                )
            };
            // The last block spans every key: it initialises dK and dV, earlier (shorter)
            // blocks accumulate into their prefix, always in the same order.
            for (r0, r1) in blocks(t, block).rev() {
                let first = r1 == t;
                let pb = &p[r0 * t..r1 * t];
                let dpb = &mut dp[r0 * t..r1 * t];
                let dyb = rows_of(dy, r0, d);
                // dV[0:r1] (+)= P[r0:r1, 0:r1]ᵀ·dY[r0:r1]
                gemm_into(
                    r1,
                    hd,
                    r1 - r0,
                    dv,
                    3 * d,
                    !first,
                    View::tr(pb, t),
                    dyb,
                    Parallelism::None,
                );
                // dP[r0:r1, 0:r1] = dY[r0:r1]·V[0:r1]ᵀ
                gemm_into(r1 - r0, r1, hd, dpb, t, false, dyb, vt, Parallelism::None);
                simd(
                    #[inline(always)]
                    || {
                        for (ii, (dr, pr)) in
                            dpb.chunks_exact_mut(t).zip(pb.chunks_exact(t)).enumerate()
                        {
                            let i = r0 + ii;
                            let dotp = dot16(&dr[..=i], &pr[..=i]);
                            for (a, &b) in dr[..=i].iter_mut().zip(&pr[..=i]) {
                                *a = b * (*a - dotp) * scale;
                            }
                            dr[i + 1..].fill(0.0);
                        }
                    },
                );
                // dQ[r0:r1] = dS[r0:r1, 0:r1]·K[0:r1]; dK[0:r1] (+)= dS[r0:r1, 0:r1]ᵀ·Q[r0:r1]
                // (the 1/√hd is folded into dS above)
                gemm_into(
                    r1 - r0,
                    hd,
                    r1,
                    &mut dq[r0 * 3 * d..],
                    3 * d,
                    false,
                    View::rm(dpb, t),
                    k,
                    Parallelism::None,
                );
                gemm_into(
                    r1,
                    hd,
                    r1 - r0,
                    dk,
                    3 * d,
                    !first,
                    View::tr(dpb, t),
                    rows_of(q, r0, 3 * d),
                    Parallelism::None,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{fd, randv, rel_err};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn attention_matches_naive_and_gradient() {
        // one block (the whole sequence) and causal blocks of 2 rows
        for block in [64, 2] {
            check_attention(block);
        }
    }

    fn check_attention(block: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let s = AttnShape {
            batch: 2,
            seq: 5,
            heads: 2,
            head_dim: 3,
        };
        let d = 6;
        let n = s.batch * s.seq;
        let mut qkv = randv(&mut rng, n * 3 * d, 1.5);
        let w = randv(&mut rng, n * d, 1.0);
        let run = |qkv: &[f32]| {
            let mut att = vec![f32::NAN; n * d];
            let mut p = vec![f32::NAN; s.batch * s.heads * s.seq * s.seq];
            attn_fwd_blocked(&mut att, &mut p, qkv, s, block);
            (att, p)
        };
        let (att, p) = run(&qkv);
        // naive reference
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.seq {
                    let row = |j: usize, part: usize, c: usize| {
                        qkv[(b * s.seq + j) * 3 * d + part * d + h * 3 + c] as f64
                    };
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..3).map(|c| row(i, 0, c) * row(j, 1, c)).sum::<f64>() / 3f64.sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|a| (a - mx).exp()).sum();
                    for c in 0..3 {
                        let y: f64 = (0..=i).map(|j| (sc[j] - mx).exp() / z * row(j, 2, c)).sum();
                        let got = att[(b * s.seq + i) * d + h * 3 + c] as f64;
                        assert!((got - y).abs() < 1e-5, "{got} vs {y}");
                    }
                }
            }
        }
        let mut dqkv = vec![f32::NAN; n * 3 * d];
        let mut dp = vec![f32::NAN; p.len()];
        attn_bwd_blocked(&mut dqkv, &mut dp, &w, &p, &qkv, s, block);
        let idx: Vec<usize> = (0..n * 3 * d).collect();
        let num = fd(&mut qkv, &idx, 1e-2, |x| {
            run(x)
                .0
                .iter()
                .zip(&w)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        });
        let an: Vec<f64> = dqkv.iter().map(|&a| a as f64).collect();
        assert!(rel_err(&an, &num) < 2e-3, "{}", rel_err(&an, &num));
    }
}
