//! Causal multi-head self-attention on a packed `qkv` buffer.
//!
//! Layout: `qkv` is `[B·T, 3d]` with columns `q | k | v`, each heads-contiguous (head
//! `h` owns columns `h·hd..(h+1)·hd` of its part). For each batch row `b` and head `h`:
//! `S = Q·Kᵀ/√hd`, `P = softmax(S + causal mask)` (row-wise, `j ≤ i`), `Y = P·V`, written
//! to `att[b·T + i, h·hd..]`. Only `P` is kept for the backward pass:
//! `dV = Pᵀ·dY`, `dP = dY·Vᵀ`, `dS = P ⊙ (dP - rowsum(dP ⊙ P))`,
//! `dQ = dS·K/√hd`, `dK = dSᵀ·Q/√hd`.
//!
//! Every product runs in register tiles of 6 rows (`tile.rs`) that stop at the
//! causal boundary: a tile of query rows `[i0, i1)` reads keys `< i1` only, so about half
//! of the `T×T` work is skipped. The `(b, h)` pairs run in parallel on rayon; each writes
//! disjoint output regions, so the result does not depend on the thread count.

use super::ops::{View, dot16, fast_exp, max16, prof, simd, sum16};
use super::tile::{TileRange, product};
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

/// `n` rounded up to whole register tiles of 16 columns, at most `t` (the extra columns
/// of a causal row tile lie in the masked upper triangle and are overwritten).
fn causal_cols(n: usize, t: usize) -> usize {
    n.next_multiple_of(16).min(t)
}

/// Head `h`'s rows of part `part` (0 = q, 1 = k, 2 = v) of batch row `b`'s `qkv` block.
fn head<'a>(qkv: &'a [f32], s: AttnShape, b: usize, part: usize, h: usize) -> View<'a> {
    let d = s.d();
    View {
        data: &qkv[b * s.seq * 3 * d + part * d + h * s.head_dim..],
        rs: 3 * d,
        cs: 1,
    }
}

/// Row `i`'s causal prefix `0..=i` rounded up to whole 16-lane chunks (at most `t`):
/// the score products computed at least these columns, so every value in it is fresh.
fn padded(i: usize, t: usize) -> usize {
    (i + 1).next_multiple_of(16).min(t)
}

/// In place over the `[t, t]` scores of one head: row `i` becomes
/// `softmax(scale·S[i, 0..=i])` followed by zeros. Whole 16-lane chunks, masked lanes
/// cleared, so that no scalar tail runs per row.
fn softmax_rows(p: &mut [f32], t: usize, scale: f32) {
    simd(
        #[inline(always)]
        || {
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                let w = padded(i, t);
                let mx = max16(&row[..=i]) * scale;
                for e in &mut row[..w] {
                    *e = fast_exp(*e * scale - mx);
                }
                row[i + 1..].fill(0.0);
                let inv = 1.0 / sum16(&row[..w]);
                for e in &mut row[..w] {
                    *e *= inv;
                }
            }
        },
    )
}

/// In place over one head's `dP` given `P`: `dS = scale·P ⊙ (dP − rowsum(dP ⊙ P))`
/// (zero above the diagonal, where `P` is zero).
fn softmax_bwd_rows(dp: &mut [f32], p: &[f32], t: usize, scale: f32) {
    simd(
        #[inline(always)]
        || {
            for (i, (dr, pr)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                let w = padded(i, t);
                let dotp = dot16(&dr[..w], &pr[..w]);
                for (a, &b) in dr[..w].iter_mut().zip(&pr[..w]) {
                    *a = b * (*a - dotp) * scale;
                }
                dr[w..].fill(0.0);
            }
        },
    )
}

/// Forward: fills `probs` (`[B, H, T, T]`, upper triangle zero) and `att` (`[B·T, d]`).
pub(crate) fn attn_fwd(att: &mut [f32], probs: &mut [f32], qkv: &[f32], s: AttnShape) {
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
            let (q, k, v) = (
                head(qkv, s, b, 0, h),
                head(qkv, s, b, 1, h),
                head(qkv, s, b, 2, h),
            );
            // S = Q·Kᵀ, row tile [i0, i1) needs keys < i1
            product(p, t, t, q, k.t(), (hd, t), false, |_, i1| TileRange {
                cols: causal_cols(i1, t),
                red: (0, hd),
            });
            softmax_rows(p, t, scale);
            // SAFETY: task (b, h) alone writes rows b·T..(b+1)·T, columns h·hd..(h+1)·hd.
            let out = unsafe { att_ptr.slice(b * t * d + h * hd, (t - 1) * d + hd) };
            // Y = P·V over keys < i1
            product(out, d, t, View::rm(p, t), v, (t, hd), false, |_, i1| {
                TileRange {
                    cols: hd,
                    red: (0, i1),
                }
            });
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
            let (q, k, v) = (
                head(qkv, s, b, 0, h),
                head(qkv, s, b, 1, h),
                head(qkv, s, b, 2, h),
            );
            let dy = View {
                data: &datt[b * t * d + h * hd..],
                rs: d,
                cs: 1,
            };
            let base = b * t * 3 * d;
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
            // Row tiles of Pᵀ / dSᵀ start at key j0: only queries i ≥ j0 see it.
            let after = |j0: usize, _| TileRange {
                cols: hd,
                red: (j0, t),
            };
            // dV = Pᵀ·dY
            product(dv, 3 * d, t, View::tr(p, t), dy, (t, hd), false, after);
            // dP = dY·Vᵀ (keys < i1)
            product(dp, t, t, dy, v.t(), (hd, t), false, |_, i1| TileRange {
                cols: causal_cols(i1, t),
                red: (0, hd),
            });
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)), with the 1/√hd of S folded in
            softmax_bwd_rows(dp, p, t, scale);
            // dQ = dS·K (keys < i1), dK = dSᵀ·Q
            product(dq, 3 * d, t, View::rm(dp, t), k, (t, hd), false, |_, i1| {
                TileRange {
                    cols: hd,
                    red: (0, i1),
                }
            });
            product(dk, 3 * d, t, View::tr(dp, t), q, (t, hd), false, after);
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
        // head_dim 3: every column outside the 16-wide register tiles; head_dim 16 and 13
        // rows: full tiles, a short last row tile and causal column rounding.
        for (seq, head_dim) in [(5, 3), (13, 16)] {
            check_attention(AttnShape {
                batch: 2,
                seq,
                heads: 2,
                head_dim,
            });
        }
    }

    fn check_attention(s: AttnShape) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (d, hd) = (s.d(), s.head_dim);
        let n = s.batch * s.seq;
        let mut qkv = randv(&mut rng, n * 3 * d, 1.5);
        let w = randv(&mut rng, n * d, 1.0);
        let run = |qkv: &[f32]| {
            let mut att = vec![f32::NAN; n * d];
            let mut p = vec![f32::NAN; s.batch * s.heads * s.seq * s.seq];
            attn_fwd(&mut att, &mut p, qkv, s);
            (att, p)
        };
        let (att, p) = run(&qkv);
        // naive reference
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.seq {
                    let row = |j: usize, part: usize, c: usize| {
                        qkv[(b * s.seq + j) * 3 * d + part * d + h * hd + c] as f64
                    };
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd).map(|c| row(i, 0, c) * row(j, 1, c)).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|a| (a - mx).exp()).sum();
                    for c in 0..hd {
                        let y: f64 = (0..=i).map(|j| (sc[j] - mx).exp() / z * row(j, 2, c)).sum();
                        let got = att[(b * s.seq + i) * d + h * hd + c] as f64;
                        assert!((got - y).abs() < 1e-5, "{got} vs {y}");
                    }
                }
            }
        }
        let mut dqkv = vec![f32::NAN; n * 3 * d];
        let mut dp = vec![f32::NAN; p.len()];
        attn_bwd(&mut dqkv, &mut dp, &w, &p, &qkv, s);
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
