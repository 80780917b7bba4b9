//! Softmax cross-entropy with per-position loss weights, forward and backward fused:
//! `loss = Σ_n w_n·(lse(z_n) − z_n[t_n]) / Σ_n w_n`, gradient
//! `∂loss/∂z_n = w_n/Σw·(softmax(z_n) − onehot(t_n))`.
//!
//! # Shapes
//! `logits`: `[N, V]` (overwritten by the gradient), `targets`, `weights`, `row_loss`:
//! `[N]`.

use super::ROW_CHUNK;
use super::profile;
use super::simd::{fast_exp, max16, simd, sum16};
use rayon::prelude::*;

/// Fused softmax cross-entropy over rows of `logits` (`[N, V]`), in place:
/// with `w_n` the loss weight and `W = Σ w_n`, the loss is `Σ_n w_n·(lse_n - z_n[t_n]) / W`
/// and `logits` is overwritten by its gradient `w_n/W·(softmax(z_n) - onehot(t_n))`.
/// Returns the loss (0 with all-zero gradient when `W = 0`).
///
/// ```
/// use mbtd_core::model::ops::xent_fwd_bwd;
///
/// // two positions over a vocabulary of 3; the second is masked out (weight 0)
/// let mut z = [0.0f32, 0.0, 0.0, 5.0, -1.0, 2.0];
/// let mut row_loss = [0.0f64; 2];
/// let loss = xent_fwd_bwd(&mut z, &mut row_loss, &[1, 0], &[1.0, 0.0], 3);
/// assert!((loss - 3f32.ln()).abs() < 1e-6, "uniform logits: ln V");
/// let third = 1.0 / 3.0;
/// assert!((z[0] - third).abs() < 1e-6 && (z[1] - (third - 1.0)).abs() < 1e-6);
/// assert_eq!(&z[3..], &[0.0; 3], "no gradient at a masked position");
/// ```
pub fn xent_fwd_bwd(
    logits: &mut [f32],
    row_loss: &mut [f64],
    targets: &[u32],
    weights: &[f32],
    v: usize,
) -> f32 {
    let _prof = profile::scope(profile::XENT);
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let inv = if total > 0.0 {
        (1.0 / total) as f32
    } else {
        0.0
    };
    logits
        .par_chunks_mut(v * ROW_CHUNK)
        .zip(row_loss.par_chunks_mut(ROW_CHUNK))
        .zip(
            targets
                .par_chunks(ROW_CHUNK)
                .zip(weights.par_chunks(ROW_CHUNK)),
        )
        .for_each(|((z, loss), (t, w))| {
            simd(
                #[inline(always)]
                || {
                    for (((z, l), &t), &w) in z.chunks_exact_mut(v).zip(loss).zip(t).zip(w) {
                        if w == 0.0 {
                            z.fill(0.0);
                            *l = 0.0;
                            continue;
                        }
                        let zt = z[t as usize];
                        let mx = max16(z);
                        for e in z.iter_mut() {
                            *e = fast_exp(*e - mx);
                        }
                        let s = sum16(z);
                        *l = w as f64 * ((s.ln() + mx - zt) as f64);
                        let k = w * inv / s;
                        for e in z.iter_mut() {
                            *e *= k;
                        }
                        z[t as usize] -= w * inv;
                    }
                },
            )
        });
    (row_loss.iter().sum::<f64>() * inv as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{fd, randv, rel_err};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn xent_gradient_and_mask() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, v) = (6, 11);
        let mut z = randv(&mut rng, n * v, 3.0);
        let t: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
        let w = vec![1.0, 0.0, 2.0, 1.0, 0.5, 1.0];
        let run = |z: &[f32]| {
            let mut zz = z.to_vec();
            let mut rl = vec![0.0; n];
            xent_fwd_bwd(&mut zz, &mut rl, &t, &w, v) as f64
        };
        let mut g = z.clone();
        let mut rl = vec![0.0; n];
        let loss = xent_fwd_bwd(&mut g, &mut rl, &t, &w, v);
        // reference loss in f64
        let mut refl = 0.0;
        for r in 0..n {
            let row = &z[r * v..(r + 1) * v];
            let lse = row.iter().map(|&a| (a as f64).exp()).sum::<f64>().ln();
            refl += w[r] as f64 * (lse - row[t[r] as usize] as f64);
        }
        refl /= w.iter().sum::<f32>() as f64;
        assert!((loss as f64 - refl).abs() < 1e-5);
        assert!(
            g[v..2 * v].iter().all(|&a| a == 0.0),
            "masked row has zero gradient"
        );
        let num = fd(&mut z, &(0..n * v).collect::<Vec<_>>(), 1e-2, run);
        let an: Vec<f64> = g.iter().map(|&a| a as f64).collect();
        assert!(rel_err(&an, &num) < 2e-3, "{}", rel_err(&an, &num));
    }
}
