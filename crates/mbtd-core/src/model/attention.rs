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
//!
//! Packed windows ([`SegBounds`]): a window may hold several segments (rows of text),
//! and position `i` then attends to `j` only if `start(i) ≤ j ≤ i`, `start(i)` being the
//! first position of `i`'s segment. Row tiles also start at the segment start of their
//! first row (16-column panels wholly before it are skipped), and the transposed
//! products stop at the segment end of their last key, so a window of short segments
//! costs attention in proportion to `Σ len²`, not `T²`. The softmax of a segment row sums
//! its exponentials in 16 lanes counted from the segment start, so a segment gets the same
//! bits as the same row alone at position 0 of a window whose length is a multiple of 16.

use super::ops::dropout::Dropout;
use super::ops::{View, dot16, dot16_padded, fast_exp, max16, profile, simd, sum16, sum16_padded};
use super::tile::{TileRange, product};
use rayon::prelude::*;

/// Segment bounds of a packed batch, per position `n` of `[B·T]`: the segment holding
/// `n` covers positions `start[n]..end[n]` of its window (window-relative).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegBounds<'a> {
    pub start: &'a [u32],
    pub end: &'a [u32],
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape<'a> {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Segments of a packed batch; `None`: each window is one causal sequence.
    pub segs: Option<SegBounds<'a>>,
}

impl AttnShape<'_> {
    fn d(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Window `b`'s segment starts and ends (`None` without segments).
    fn window(&self, b: usize) -> Option<(&[u32], &[u32])> {
        let t = self.seq;
        self.segs
            .map(|g| (&g.start[b * t..(b + 1) * t], &g.end[b * t..(b + 1) * t]))
    }
}

/// Segment bounds and within-segment positions of a packed batch, from its per-position
/// segment ids (a segment is a run of equal ids within a window). Reused buffers.
#[derive(Debug, Default)]
pub(crate) struct Segments {
    on: bool,
    start: Vec<u32>,
    end: Vec<u32>,
    pos: Vec<u32>,
}

impl Segments {
    /// Bounds of the segments of `ids` (`[B, seq]`), or none when `ids` is `None`.
    pub fn fill(&mut self, ids: Option<&[u16]>, seq: usize) {
        let Some(ids) = ids else {
            self.on = false;
            return;
        };
        self.on = true;
        let n = ids.len();
        for v in [&mut self.start, &mut self.end, &mut self.pos] {
            v.resize(n, 0);
        }
        for (w, row) in ids.chunks_exact(seq).enumerate() {
            let base = w * seq;
            let mut s0 = 0;
            for t in 0..seq {
                if t > 0 && row[t] != row[t - 1] {
                    self.end[base + s0..base + t].fill(t as u32);
                    s0 = t;
                }
                self.start[base + t] = s0 as u32;
                self.pos[base + t] = (t - s0) as u32;
            }
            self.end[base + s0..base + seq].fill(seq as u32);
        }
    }

    /// The bounds for [`AttnShape::segs`].
    pub fn bounds(&self) -> Option<SegBounds<'_>> {
        self.on.then_some(SegBounds {
            start: &self.start,
            end: &self.end,
        })
    }

    /// Per position `[B·T]`, its offset within its segment (the position-embedding
    /// index), or `None` without segments (the offset within the window).
    pub fn positions(&self) -> Option<&[u32]> {
        self.on.then_some(self.pos.as_slice())
    }
}

/// First key a row tile starting at query `i0` may attend to.
fn first_key(w: Option<(&[u32], &[u32])>, i0: usize) -> usize {
    w.map_or(0, |(start, _)| start[i0] as usize)
}

/// One past the last query that may attend to key `j1 - 1`.
fn last_query(w: Option<(&[u32], &[u32])>, j1: usize, t: usize) -> usize {
    w.map_or(t, |(_, end)| end[j1 - 1] as usize)
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

/// Head `h`'s rows of `q`, `k` and `v` in batch row `b`'s `qkv` block.
fn heads<'a>(qkv: &'a [f32], s: AttnShape, b: usize, h: usize) -> [View<'a>; 3] {
    let d = s.d();
    [0, 1, 2].map(|part| View {
        data: &qkv[b * s.seq * 3 * d + part * d + h * s.head_dim..],
        rs: 3 * d,
        cs: 1,
    })
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

/// [`softmax_rows`] for a packed window: row `i` becomes `softmax(scale·S[i, lo..=i])`
/// (`lo = start[i]`) with zeros elsewhere; the sum runs in 16 lanes counted from `lo`.
fn softmax_rows_segmented(p: &mut [f32], t: usize, scale: f32, start: &[u32]) {
    simd(
        #[inline(always)]
        || {
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                let lo = start[i] as usize;
                let (before, rest) = row.split_at_mut(lo);
                before.fill(0.0);
                let (seg, after) = rest.split_at_mut(i + 1 - lo);
                after.fill(0.0);
                let mx = max16(seg) * scale;
                for e in seg.iter_mut() {
                    *e = fast_exp(*e * scale - mx);
                }
                let inv = 1.0 / sum16_padded(seg);
                for e in seg.iter_mut() {
                    *e *= inv;
                }
            }
        },
    )
}

/// [`softmax_bwd_rows`] for a packed window: nonzero only on `start[i]..=i`.
fn softmax_bwd_rows_segmented(dp: &mut [f32], p: &[f32], t: usize, scale: f32, start: &[u32]) {
    simd(
        #[inline(always)]
        || {
            for (i, (dr, pr)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                let lo = start[i] as usize;
                let (seg, pseg) = (&mut dr[lo..=i], &pr[lo..=i]);
                let dotp = dot16_padded(seg, pseg);
                for (a, &b) in seg.iter_mut().zip(pseg) {
                    *a = b * (*a - dotp) * scale;
                }
                dr[..lo].fill(0.0);
                dr[i + 1..].fill(0.0);
            }
        },
    )
}

/// `x_j ← m_{offset+j}·x_j` over one head's `[T, T]` block, on the current thread.
fn drop_rows(x: &mut [f32], site: Dropout, offset: usize) {
    for (j, v) in x.iter_mut().enumerate() {
        *v *= site.mask(offset + j);
    }
}

/// Forward: fills `probs` (`[B, H, T, T]`, upper triangle zero) and `att` (`[B·T, d]`).
/// With dropout, `Y = (P ⊙ M)·V` for the mask `M` of the site over the `[B, H, T, T]`
/// probabilities, `P ⊙ M` written to the given buffer (`probs` keeps `P`).
///
/// # Shapes
/// `qkv`: `[B·T, 3d]` → `att`: `[B·T, d]`, `probs` (and the dropped copy):
/// `[B, H, T, T]` (`d = H·hd`).
pub(crate) fn attn_fwd(
    att: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    s: AttnShape,
    drop: Option<(&mut [f32], Dropout)>,
) {
    let _prof = profile::scope(profile::ATTN);
    let (t, hd, d) = (s.seq, s.head_dim, s.d());
    let total = s.batch * s.heads * t * t;
    assert!(att.len() >= s.batch * t * d && probs.len() >= total);
    assert!(qkv.len() >= s.batch * t * 3 * d);
    let scale = 1.0 / (hd as f32).sqrt();
    let att_ptr = SendPtr(att.as_mut_ptr());
    let (dropped, site) = match drop {
        Some((buf, site)) => (Some(SendPtr(buf[..total].as_mut_ptr())), Some(site)),
        None => (None, None),
    };
    probs[..total]
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let win = s.window(b);
            let [q, k, v] = heads(qkv, s, b, h);
            // S = Q·Kᵀ, row tile [i0, i1) needs keys in [first_key(i0), i1)
            product(p, t, t, q, k.t(), (hd, t), false, |i0, i1| TileRange {
                col0: first_key(win, i0),
                cols: causal_cols(i1, t),
                red: (0, hd),
            });
            match win {
                Some((start, _)) => softmax_rows_segmented(p, t, scale, start),
                None => softmax_rows(p, t, scale),
            }
            // SAFETY: task (b, h) alone writes rows b·T..(b+1)·T, columns h·hd..(h+1)·hd.
            let out = unsafe { att_ptr.slice(b * t * d + h * hd, (t - 1) * d + hd) };
            let p: &[f32] = match (dropped, site) {
                (Some(buf), Some(site)) => {
                    // SAFETY: task (b, h) alone writes chunk bh of the dropped copy.
                    let pd = unsafe { buf.slice(bh * t * t, t * t) };
                    pd.copy_from_slice(p);
                    drop_rows(pd, site, bh * t * t);
                    pd
                }
                _ => p,
            };
            // Y = P·V over keys in [first_key(i0), i1)
            product(out, d, t, View::rm(p, t), v, (t, hd), false, |i0, i1| {
                TileRange {
                    col0: 0,
                    cols: hd,
                    red: (first_key(win, i0), i1),
                }
            });
        });
}

/// Backward: `datt` (`[B·T, d]`) → `dqkv` (`[B·T, 3d]`, overwritten). `dprobs` is scratch
/// of the size of `probs`. With the dropout site of the forward pass:
/// `dV = (P ⊙ M)ᵀ·dY` and `dP = M ⊙ (dY·Vᵀ)` before the softmax backward.
pub(crate) fn attn_bwd(
    dqkv: &mut [f32],
    dprobs: &mut [f32],
    datt: &[f32],
    probs: &[f32],
    qkv: &[f32],
    s: AttnShape,
    drop: Option<Dropout>,
) {
    let _prof = profile::scope(profile::ATTN);
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
            let win = s.window(b);
            let [q, k, v] = heads(qkv, s, b, h);
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
            // Row tiles of Pᵀ / dSᵀ over keys [j0, j1): only queries in
            // [j0, last_query(j1)) see them.
            let after = |j0: usize, j1: usize| TileRange {
                col0: 0,
                cols: hd,
                red: (j0, last_query(win, j1, t)),
            };
            // dV = Pᵀ·dY (with dropout the dropped P, rebuilt in the dP scratch)
            match drop {
                Some(site) => {
                    dp.copy_from_slice(p);
                    drop_rows(dp, site, bh * t * t);
                    product(dv, 3 * d, t, View::tr(dp, t), dy, (t, hd), false, after);
                }
                None => product(dv, 3 * d, t, View::tr(p, t), dy, (t, hd), false, after),
            }
            // dP = dY·Vᵀ (keys in [first_key(i0), i1))
            product(dp, t, t, dy, v.t(), (hd, t), false, |i0, i1| TileRange {
                col0: first_key(win, i0),
                cols: causal_cols(i1, t),
                red: (0, hd),
            });
            if let Some(site) = drop {
                drop_rows(dp, site, bh * t * t);
            }
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)), with the 1/√hd of S folded in
            match win {
                Some((start, _)) => softmax_bwd_rows_segmented(dp, p, t, scale, start),
                None => softmax_bwd_rows(dp, p, t, scale),
            }
            // dQ = dS·K (keys in [first_key(i0), i1)), dK = dSᵀ·Q
            product(
                dq,
                3 * d,
                t,
                View::rm(dp, t),
                k,
                (t, hd),
                false,
                |i0, i1| TileRange {
                    col0: 0,
                    cols: hd,
                    red: (first_key(win, i0), i1),
                },
            );
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
                segs: None,
            });
        }
    }

    /// Segment ids of two windows of 16: segments of 1, 7, 3, 5 and 12, 4 positions, so
    /// row tiles straddle segment starts and one segment starts mid-panel.
    fn packed_ids() -> Vec<u16> {
        [
            [0; 1].as_slice(),
            &[1; 7],
            &[2; 3],
            &[3; 5],
            &[0; 12],
            &[1; 4],
        ]
        .concat()
    }

    #[test]
    fn packed_attention_matches_naive_and_gradient() {
        let mut segs = Segments::default();
        segs.fill(Some(&packed_ids()), 16);
        for head_dim in [3, 16] {
            check_attention(AttnShape {
                batch: 2,
                seq: 16,
                heads: 2,
                head_dim,
                segs: segs.bounds(),
            });
        }
        assert_eq!(segs.start[8..11], [8, 8, 8]);
        assert_eq!(segs.end[8..11], [11, 11, 11]);
        assert_eq!(segs.positions().unwrap()[16..19], [0, 1, 2]);
        assert_eq!(segs.positions().unwrap()[28..32], [0, 1, 2, 3]);
    }

    /// Product terms of the attention tiles (forward and backward) on one thread.
    fn attention_work(s: AttnShape) -> u64 {
        let (d, n) = (s.d(), s.batch * s.seq);
        let qkv = randv(&mut ChaCha8Rng::seed_from_u64(1), n * 3 * d, 1.0);
        let mut att = vec![0.0; n * d];
        let mut p = vec![0.0; s.batch * s.heads * s.seq * s.seq];
        let (mut dqkv, mut dp) = (vec![0.0; n * 3 * d], p.clone());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            crate::model::tile::take_work();
            attn_fwd(&mut att, &mut p, &qkv, s, None);
            let datt = att.clone();
            attn_bwd(&mut dqkv, &mut dp, &datt, &p, &qkv, s, None);
            crate::model::tile::take_work()
        })
    }

    #[test]
    fn packed_short_segments_cost_less_attention_than_full_causal() {
        // a window of 128 positions holding 8 segments of 16
        let ids: Vec<u16> = (0..128).map(|i| (i / 16) as u16).collect();
        let mut segs = Segments::default();
        segs.fill(Some(&ids), 128);
        let shape = AttnShape {
            batch: 1,
            seq: 128,
            heads: 2,
            head_dim: 16,
            segs: None,
        };
        let full = attention_work(shape);
        let packed = attention_work(AttnShape {
            segs: segs.bounds(),
            ..shape
        });
        let ratio = packed as f64 / full as f64;
        eprintln!("attention work: packed {packed}, causal {full}, ratio {ratio:.3}");
        assert!(ratio < 0.45, "packed/causal attention work {ratio:.3}");
    }

    #[test]
    fn attention_with_dropout_matches_naive_and_gradient() {
        let mut segs = Segments::default();
        segs.fill(Some(&packed_ids()), 16);
        let site = Dropout::at(0.25, 3, 1, 0, 2, 0);
        for (seq, head_dim, bounds) in [(5, 3, None), (16, 16, segs.bounds())] {
            check_attention_dropout(
                AttnShape {
                    batch: 2,
                    seq,
                    heads: 2,
                    head_dim,
                    segs: bounds,
                },
                Some(site),
            );
        }
    }

    fn check_attention(s: AttnShape) {
        check_attention_dropout(s, None);
    }

    fn check_attention_dropout(s: AttnShape, drop: Option<Dropout>) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (d, hd) = (s.d(), s.head_dim);
        let n = s.batch * s.seq;
        let mut qkv = randv(&mut rng, n * 3 * d, 1.5);
        let w = randv(&mut rng, n * d, 1.0);
        let run = |qkv: &[f32]| {
            let mut att = vec![f32::NAN; n * d];
            let mut p = vec![f32::NAN; s.batch * s.heads * s.seq * s.seq];
            let mut pd = vec![f32::NAN; p.len()];
            attn_fwd(
                &mut att,
                &mut p,
                qkv,
                s,
                drop.map(|site| (&mut pd[..], site)),
            );
            (att, p)
        };
        let mask = |b: usize, h: usize, i: usize, j: usize| {
            let t = s.seq;
            drop.map_or(1.0, |site| {
                site.mask(((b * s.heads + h) * t + i) * t + j) as f64
            })
        };
        let (att, p) = run(&qkv);
        // naive reference
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.seq {
                    let row = |j: usize, part: usize, c: usize| {
                        qkv[(b * s.seq + j) * 3 * d + part * d + h * hd + c] as f64
                    };
                    let lo = s.segs.map_or(0, |g| g.start[b * s.seq + i] as usize);
                    let sc: Vec<f64> = (lo..=i)
                        .map(|j| {
                            (0..hd).map(|c| row(i, 0, c) * row(j, 1, c)).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|a| (a - mx).exp()).sum();
                    for c in 0..hd {
                        let y: f64 = (lo..=i)
                            .map(|j| (sc[j - lo] - mx).exp() / z * mask(b, h, i, j) * row(j, 2, c))
                            .sum();
                        let got = att[(b * s.seq + i) * d + h * hd + c] as f64;
                        assert!((got - y).abs() < 1e-5, "{got} vs {y}");
                    }
                }
            }
        }
        let mut dqkv = vec![f32::NAN; n * 3 * d];
        let mut dp = vec![f32::NAN; p.len()];
        attn_bwd(&mut dqkv, &mut dp, &w, &p, &qkv, s, drop);
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
