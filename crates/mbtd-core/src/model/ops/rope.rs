//! Rotary position encoding (RoPE, Su et al. 2021) on the query and key heads, in the
//! half-split pairing: within a head of even dimension `hd`, coordinate `i < hd/2` is
//! paired with `i + hd/2` and the pair is rotated by the angle `θ_i(p) = p·base^{−2i/hd}`
//! (`base = 10000`) of the row's position `p`:
//!
//! `y_i = x_i cos θ_i − x_{i+hd/2} sin θ_i`, `y_{i+hd/2} = x_i sin θ_i + x_{i+hd/2} cos θ_i`.
//!
//! A rotation is orthogonal, so the backward pass is the inverse rotation (angle `−θ_i`)
//! applied to the output gradient. Since `⟨R(p)q, R(s)k⟩ = ⟨q, R(s−p)k⟩`, attention
//! scores depend only on the offset between query and key: a key cached at an absolute
//! position stays valid however far generation runs. Angles are computed in f64 and then
//! rounded, so a position far beyond the training length still gets an accurate rotation.
//!
//! # Shapes
//! `x`: rows of width `stride` (`[n, stride]`), of which the first `cols` columns (a
//! multiple of `hd`; `2d` for the `q | k` part of a `qkv` row) are rotated head by head;
//! `positions`: `[n]`; the table: `[len, hd/2]` cosines and sines.

use super::{ROW_CHUNK, profile};
use rayon::prelude::*;

/// Base of the rotary frequencies.
pub const ROPE_BASE: f64 = 10000.0;

/// Cosines and sines of `θ_i(p)` for positions `0..len` and `i < hd/2`, row-major.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RopeTable {
    head_dim: usize,
    len: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Writes `cos θ_i(p)` and `sin θ_i(p)` for `i < cos.len()` (`= hd/2`).
pub fn rope_angles(cos: &mut [f32], sin: &mut [f32], p: usize, head_dim: usize) {
    for (i, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let theta = p as f64 * ROPE_BASE.powf(-2.0 * i as f64 / head_dim as f64);
        let (sv, cv) = theta.sin_cos();
        (*c, *s) = (cv as f32, sv as f32);
    }
}

impl RopeTable {
    /// The table for positions `0..len` and heads of (even) dimension `head_dim`.
    pub fn new(len: usize, head_dim: usize) -> Self {
        assert!(
            head_dim.is_multiple_of(2),
            "rotary heads need an even head dimension"
        );
        let half = head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0; len * half], vec![0.0; len * half]);
        for (p, (c, s)) in cos
            .chunks_exact_mut(half.max(1))
            .zip(sin.chunks_exact_mut(half.max(1)))
            .enumerate()
        {
            rope_angles(c, s, p, head_dim);
        }
        Self {
            head_dim,
            len,
            cos,
            sin,
        }
    }

    /// Whether the table covers positions `0..len` of heads of dimension `head_dim`.
    pub fn fits(&self, len: usize, head_dim: usize) -> bool {
        self.head_dim == head_dim && self.len >= len
    }

    /// Cosines and sines of position `p`.
    fn at(&self, p: usize) -> (&[f32], &[f32]) {
        let half = self.head_dim / 2;
        (
            &self.cos[p * half..(p + 1) * half],
            &self.sin[p * half..(p + 1) * half],
        )
    }
}

/// Rotates the heads of one row in place: `sign = 1` forward, `-1` the inverse.
#[inline]
pub fn rope_row(row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], sign: f32) {
    let half = head_dim / 2;
    for h in row.chunks_exact_mut(head_dim) {
        let (a, b) = h.split_at_mut(half);
        for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
            let s = sign * s;
            let (u, v) = (*x1, *x2);
            *x1 = u * c - v * s;
            *x2 = u * s + v * c;
        }
    }
}

fn rotate(
    x: &mut [f32],
    stride: usize,
    cols: usize,
    table: &RopeTable,
    positions: &[u32],
    sign: f32,
) {
    let _prof = profile::scope(profile::ELEM);
    let hd = table.head_dim;
    assert!(cols.is_multiple_of(hd) && cols <= stride && x.len() >= positions.len() * stride);
    x[..positions.len() * stride]
        .par_chunks_mut(stride * ROW_CHUNK)
        .zip(positions.par_chunks(ROW_CHUNK))
        .for_each(|(rows, pos)| {
            for (row, &p) in rows.chunks_exact_mut(stride).zip(pos) {
                let (c, s) = table.at(p as usize);
                rope_row(&mut row[..cols], hd, c, s, sign);
            }
        });
}

/// Forward: rotates the first `cols` columns of every row `n` of `x` (heads of the
/// table's dimension) by the angles of position `positions[n]`, in place.
///
/// ```
/// use mbtd_core::model::ops::rope::{RopeTable, rope_fwd};
///
/// // one head of dim 2: the pair (x0, x1) turns by θ_0(p) = p radians
/// let table = RopeTable::new(4, 2);
/// let mut x = [1.0f32, 0.0, 1.0, 0.0];
/// rope_fwd(&mut x, 2, 2, &table, &[0, 3]);
/// assert_eq!(x[..2], [1.0, 0.0]); // position 0: unchanged
/// assert!((x[2] - 3f32.cos()).abs() < 1e-6 && (x[3] - 3f32.sin()).abs() < 1e-6);
/// ```
pub fn rope_fwd(x: &mut [f32], stride: usize, cols: usize, table: &RopeTable, positions: &[u32]) {
    rotate(x, stride, cols, table, positions, 1.0);
}

/// Backward of [`rope_fwd`]: the inverse rotation of the output gradient, in place.
pub fn rope_bwd(dx: &mut [f32], stride: usize, cols: usize, table: &RopeTable, positions: &[u32]) {
    rotate(dx, stride, cols, table, positions, -1.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{fd, randv, rel_err, weighted};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn rope_gradient_and_relative_scores() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // rows of a qkv buffer: stride 3·d, d = 2 heads of 4; q and k rotated
        let (hd, d, n) = (4, 8, 5);
        let (stride, cols) = (3 * d, 2 * d);
        let table = RopeTable::new(16, hd);
        let positions = [0u32, 3, 1, 15, 7];
        let mut x = randv(&mut rng, n * stride, 1.0);
        let w = randv(&mut rng, n * stride, 1.0);
        let run = |x: &[f32]| {
            let mut y = x.to_vec();
            rope_fwd(&mut y, stride, cols, &table, &positions);
            y
        };
        let y = run(&x);
        // v columns and position 0 untouched, norms of each pair kept
        assert_eq!(y[cols..stride], x[cols..stride]);
        assert_eq!(y[..stride], x[..stride]);
        for n in 0..n {
            for c in 0..cols / 2 {
                let (h, i) = (c / 2, c % 2);
                let at = |v: &[f32], j| v[n * stride + h * hd + j];
                let before = at(&x, i).hypot(at(&x, i + 2));
                let after = at(&y, i).hypot(at(&y, i + 2));
                assert!((before - after).abs() < 1e-5);
            }
        }
        let mut dx = w.clone();
        rope_bwd(&mut dx, stride, cols, &table, &positions);
        let idx: Vec<usize> = (0..n * stride).collect();
        let num = fd(&mut x, &idx, 1e-2, |x| weighted(&run(x), &w));
        let an: Vec<f64> = dx.iter().map(|&a| a as f64).collect();
        assert!(rel_err(&an, &num) < 1e-4, "{}", rel_err(&an, &num));
        // the score of a rotated query and key depends only on their offset
        let (q, k) = (randv(&mut rng, hd, 1.0), randv(&mut rng, hd, 1.0));
        let score = |pq: usize, pk: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            let (mut c, mut s) = (vec![0.0; hd / 2], vec![0.0; hd / 2]);
            rope_angles(&mut c, &mut s, pq, hd);
            rope_row(&mut a, hd, &c, &s, 1.0);
            rope_angles(&mut c, &mut s, pk, hd);
            rope_row(&mut b, hd, &c, &s, 1.0);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(5, 2) - score(1005, 1002)).abs() < 1e-4);
        assert!((score(5, 2) - score(5, 4)).abs() > 1e-4);
    }
}
