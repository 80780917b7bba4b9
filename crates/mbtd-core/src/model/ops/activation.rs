//! GELU, tanh form: `gelu(x) = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, evaluated as
//! `x·σ(2√(2/π)(x + 0.044715x³))`, with its derivative
//! `gelu'(x) = σ(z) + x·σ(z)(1 − σ(z))·2√(2/π)(1 + 3·0.044715x²)`.
//! The MLP's forward keeps `gelu'` ([`bias_gelu_fwd`]) so its backward is one multiply.
//!
//! # Shapes
//! Element-wise: `y` and `x` of the same length; the bias variants work on rows of
//! width `b.len()`.

use super::profile;
use super::simd::{fast_exp, simd};
use super::{ColSums, ROW_CHUNK};
use rayon::prelude::*;

const GELU_C: f32 = 0.797_884_6; // sqrt(2/π)
const GELU_A: f32 = 0.044_715;

/// GELU (tanh form) `y = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
///
/// ```
/// use mbtd_core::model::ops::gelu_fwd;
///
/// let x = [-3.0f32, 0.0, 1.0, 3.0];
/// let mut y = [0.0f32; 4];
/// gelu_fwd(&mut y, &x);
/// for (&g, &v) in y.iter().zip(&x) {
///     let want = 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh());
///     assert!((g - want).abs() < 1e-6);
/// }
/// assert_eq!(y[1], 0.0);
/// ```
pub fn gelu_fwd(y: &mut [f32], x: &[f32]) {
    let _prof = profile::scope(profile::GELU);
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(y, x)| {
            simd(
                #[inline(always)]
                || {
                    for (o, &v) in y.iter_mut().zip(x) {
                        *o = gelu_and_grad(v).0;
                    }
                },
            )
        });
}

/// GELU and its derivative at `x`, through `½(1 + tanh(w/2)) = σ(w)`:
/// `gelu(x) = x·σ(z)` with `z = 2c(x + a·x³)`, `c = √(2/π)`, `a = 0.044715`, and
/// `gelu'(x) = σ(z) + x·σ(z)(1 − σ(z))·2c(1 + 3a·x²)`. Fused multiply-adds: call it
/// under [`super::simd`].
#[inline(always)]
fn gelu_and_grad(x: f32) -> (f32, f32) {
    let u = x * x;
    let z = x * u.mul_add(2.0 * GELU_C * GELU_A, 2.0 * GELU_C);
    let s = 1.0 / (1.0 + fast_exp(-z));
    let y = x * s;
    let d = (y * (1.0 - s)).mul_add(u.mul_add(6.0 * GELU_C * GELU_A, 2.0 * GELU_C), s);
    (y, d)
}

/// Bias, GELU and its derivative in one pass (rows of width `b.len()`): with
/// `x = f + b`, `y = gelu(x)` and `f ← gelu'(x)`, all the backward pass needs
/// ([`gelu_bwd_colsum`]), so the tanh is evaluated once per element per step.
pub(crate) fn bias_gelu_fwd(y: &mut [f32], f: &mut [f32], b: &[f32]) {
    let _prof = profile::scope(profile::GELU);
    let w = b.len();
    y.par_chunks_mut(w * ROW_CHUNK)
        .zip(f.par_chunks_mut(w * ROW_CHUNK))
        .for_each(|(y, f)| {
            simd(
                #[inline(always)]
                || {
                    for (yr, fr) in y.chunks_exact_mut(w).zip(f.chunks_exact_mut(w)) {
                        for ((o, v), &bb) in yr.iter_mut().zip(fr.iter_mut()).zip(b) {
                            (*o, *v) = gelu_and_grad(*v + bb);
                        }
                    }
                },
            )
        });
}

/// GELU backward in place from the derivative kept by [`bias_gelu_fwd`],
/// `g ← g ⊙ gelu'(x)`, and the bias gradient `db = Σ_rows g` in the same pass.
pub(crate) fn gelu_bwd_colsum(g: &mut [f32], dgelu: &[f32], db: &mut [f32], sums: &mut ColSums) {
    let _prof = profile::scope(profile::GELU);
    let w = db.len();
    sums.map(
        db,
        g,
        #[inline(always)]
        |r0, rows| {
            let d = &dgelu[r0 * w..r0 * w + rows.len()];
            rows.iter_mut().zip(d).for_each(|(a, &b)| *a *= b);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::ColSums;
    use crate::model::ops::tests::{fd, randv, rel_err, weighted};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn gelu_matches_reference_and_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut x = randv(&mut rng, 64, 4.0);
        let mut y = vec![0.0; 64];
        gelu_fwd(&mut y, &x);
        for (&a, &v) in y.iter().zip(&x) {
            let r = 0.5 * v * (1.0 + (GELU_C * (v + GELU_A * v * v * v)).tanh());
            assert!((a - r).abs() < 2e-6, "gelu({v}) = {a} vs {r}");
        }
        // the fused forward keeps gelu'(x); backward multiplies the incoming gradient by it
        let (mut y2, mut dg) = (vec![0.0; 64], x.clone());
        bias_gelu_fwd(&mut y2, &mut dg, &[0.0]);
        assert_eq!(y, y2);
        let w = randv(&mut rng, 64, 1.0);
        let mut g = w.clone();
        // as 4 rows of 16: the fused bias gradient is the column sum of the result
        let mut db = vec![f32::NAN; 16];
        gelu_bwd_colsum(&mut g, &dg, &mut db, &mut ColSums::default());
        for (c, &v) in db.iter().enumerate() {
            let want: f32 = (0..4).map(|r| g[r * 16 + c]).sum();
            assert!((v - want).abs() < 1e-6, "db[{c}] = {v} vs {want}");
        }
        let idx: Vec<usize> = (0..64).collect();
        let num = fd(&mut x, &idx, 1e-3, |x| {
            let mut y = vec![0.0; 64];
            gelu_fwd(&mut y, x);
            weighted(&y, &w)
        });
        let an: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&an, &num) < 1e-3, "{}", rel_err(&an, &num));
    }

    #[test]
    fn bias_gelu_equals_gelu_of_shifted_input() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (rows, w) = (20, 12);
        let f0 = randv(&mut rng, rows * w, 3.0);
        let b = randv(&mut rng, w, 1.0);
        let mut f = f0.clone();
        let mut y = vec![0.0; rows * w];
        bias_gelu_fwd(&mut y, &mut f, &b);
        let shifted: Vec<f32> = f0.iter().enumerate().map(|(i, &v)| v + b[i % w]).collect();
        let mut y2 = vec![0.0; rows * w];
        gelu_fwd(&mut y2, &shifted);
        assert_eq!(y, y2);
        let (mut y3, mut dg) = (vec![0.0; rows * w], shifted.clone());
        bias_gelu_fwd(&mut y3, &mut dg, &vec![0.0; w]);
        assert_eq!(f, dg, "f holds gelu'(f + b)");
    }
}
