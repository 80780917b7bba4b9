//! Linear layers `y = x·W + b` over `N` rows (`x` `[N, in]`, `W` `[in, out]` row-major,
//! `b` `[out]`) and their gradients: `dW = xᵀ·dy`, `dx = dy·Wᵀ`, `db = Σ_rows dy` (the
//! last from [`super::ColSums`], fused with whichever pass produced `dy`). The three
//! products run in the given [`Precision`]: with `Bf16` their operands are rounded to
//! bfloat16 and accumulated in fp32; the bias, residual and sums stay fp32.
//!
//! # Shapes
//! `x`: `[N, in]`, `W`: `[in, out]`, `b`: `[out]`, `y`: `[N, out]`.

use super::ROW_CHUNK;
use super::bf16::Precision;
use super::gemm::{Mat, mm_nt, mm_prec, mm_tn};
use super::profile;
use super::simd::simd;
use rayon::prelude::*;

/// Linear forward `y[N,out] = x[N,in]·W[in,out] + b[out]`.
///
/// ```
/// use mbtd_core::model::ops::{Precision, linear_fwd};
///
/// let x = [1.0, 2.0, 3.0, 4.0]; // 2 rows, in = 2
/// let w = [1.0, 0.0, -1.0, 0.0, 1.0, 1.0]; // [2, 3]
/// let b = [0.5, 0.5, 0.5];
/// let mut y = [0.0f32; 6];
/// linear_fwd(Precision::F32, &mut y, &x, &w, &b, 2, 2);
/// assert_eq!(y, [1.5, 2.5, 1.5, 3.5, 4.5, 1.5]);
/// linear_fwd(Precision::Bf16, &mut y, &x, &w, &b, 2, 2); // exact in bf16 too
/// assert_eq!(y, [1.5, 2.5, 1.5, 3.5, 4.5, 1.5]);
/// ```
pub fn linear_fwd(
    prec: Precision,
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    din: usize,
) {
    let _prof = profile::scope(profile::LINEAR);
    fill_rows(y, None, b, n);
    mm_prec(prec, y, x, w, n, din, b.len(), true);
}

/// Linear forward without bias `y[N,out] = x[N,in]·W[in,out]` (the bias is added by the
/// consumer, e.g. [`super::bias_gelu_fwd`]).
pub(crate) fn linear_nobias_fwd(
    prec: Precision,
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) {
    let _prof = profile::scope(profile::LINEAR);
    mm_prec(prec, y, x, w, n, din, dout, false);
}

/// Residual linear forward `y[N,out] = r[N,out] + x[N,in]·W[in,out] + b[out]` (the residual
/// and bias are written first, the product is accumulated onto them by `gemm`).
pub(crate) fn residual_linear_fwd(
    prec: Precision,
    y: &mut [f32],
    r: &[f32],
    x: Mat<'_>,
    w: &[f32],
    b: &[f32],
) {
    let _prof = profile::scope(profile::LINEAR);
    fill_rows(y, Some(r), b, x.rows);
    mm_prec(prec, y, x.data, w, x.rows, x.cols, b.len(), true);
}

/// Every row of `y` `[n, out]` set to `b` `[out]`, plus the same row of `r` when given.
fn fill_rows(y: &mut [f32], r: Option<&[f32]>, b: &[f32], n: usize) {
    let dout = b.len();
    let rows = y[..n * dout].par_chunks_mut(dout * ROW_CHUNK);
    match r {
        None => rows.for_each(|rows| {
            for row in rows.chunks_exact_mut(dout) {
                row.copy_from_slice(b);
            }
        }),
        Some(r) => rows
            .zip(r.par_chunks(dout * ROW_CHUNK))
            .for_each(|(rows, res)| {
                simd(
                    #[inline(always)]
                    || {
                        for (row, rr) in rows.chunks_exact_mut(dout).zip(res.chunks_exact(dout)) {
                            for ((o, &a), &bb) in row.iter_mut().zip(rr).zip(b) {
                                *o = a + bb;
                            }
                        }
                    },
                )
            }),
    }
}

/// Linear backward: `dW = xᵀ·dy` and, when `dx` is given, `dx (+)= dy·Wᵀ` (the bias
/// gradient `Σ_rows dy` comes from [`super::ColSums`], fused with the pass that produced `dy`
/// where there is one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd(
    prec: Precision,
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) {
    let _prof = profile::scope(profile::LINEAR);
    let dy = Mat::new(dy, n, dout);
    mm_tn(prec, dw, Mat::new(x, n, din), dy, false);
    if let Some((dx, acc)) = dx {
        mm_nt(prec, dx, dy, Mat::new(w, din, dout), acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::ColSums;
    use crate::model::ops::tests::{fd, randv, rel_err, weighted};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn linear_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n, din, dout) = (6, 5, 7);
        let mut x = randv(&mut rng, n * din, 1.0);
        let mut w = randv(&mut rng, din * dout, 1.0);
        let mut b = randv(&mut rng, dout, 1.0);
        let wt = randv(&mut rng, n * dout, 1.0);
        let run = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![f32::NAN; n * dout];
            linear_fwd(Precision::F32, &mut y, x, w, b, n, din);
            weighted(&y, &wt)
        };
        let mut dx = vec![0.0; n * din];
        let (mut dw, mut db) = (vec![0.0; din * dout], vec![0.0; dout]);
        linear_bwd(
            Precision::F32,
            Some((&mut dx, false)),
            &mut dw,
            &x,
            &w,
            &wt,
            n,
            din,
            dout,
        );
        ColSums::default().of(&mut db, &wt);
        let (xc, wc, bc) = (x.clone(), w.clone(), b.clone());
        let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let num = fd(&mut x, &(0..n * din).collect::<Vec<_>>(), 1e-2, |x| {
            run(x, &wc, &bc)
        });
        assert!(rel_err(&to64(&dx), &num) < 1e-3);
        let num = fd(&mut w, &(0..din * dout).collect::<Vec<_>>(), 1e-2, |w| {
            run(&xc, w, &bc)
        });
        assert!(rel_err(&to64(&dw), &num) < 1e-3);
        let num = fd(&mut b, &(0..dout).collect::<Vec<_>>(), 1e-2, |b| {
            run(&xc, &wc, b)
        });
        assert!(rel_err(&to64(&db), &num) < 1e-3);
    }
}
