//! LayerNorm over rows of width `d`: `μ = mean(x)`, `σ² = mean((x−μ)²)`,
//! `r = 1/√(σ² + ε)` (`ε` = [`LN_EPS`]), `y = (x−μ)·r ⊙ g + b`; backward with
//! `x̂ = (x−μ)·r`, `ĝ = dy ⊙ g`: `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))`,
//! `dg = Σ_rows dy ⊙ x̂`, `db = Σ_rows dy`.
//!
//! # Shapes
//! `x`, `y`, `dx`, `dy`: `[N, d]`; `g`, `b`, `dg`, `db`: `[d]`; `mean`, `rstd`: `[N]`.

use super::profile;
use super::reduce::SUM_ROWS;
use super::simd::{simd, sum16};
use super::{ColSums, ROW_CHUNK};
use rayon::prelude::*;

/// LayerNorm epsilon.
pub const LN_EPS: f32 = 1e-5;

/// LayerNorm forward over rows of width `d`:
/// `μ = mean(x)`, `σ² = mean((x-μ)²)`, `r = 1/√(σ²+1e-5)`, `y = (x-μ)·r·g + b`.
/// Stores `μ` and `r` per row for the backward pass.
///
/// ```
/// use mbtd_core::model::ops::layernorm_fwd;
///
/// let x = [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0]; // 2 rows, d = 4
/// let (g, b) = ([1.0f32; 4], [0.0f32; 4]);
/// let (mut y, mut mean, mut rstd) = ([0.0f32; 8], [0.0f32; 2], [0.0f32; 2]);
/// layernorm_fwd(&mut y, &mut mean, &mut rstd, &x, &g, &b);
/// assert_eq!(mean, [2.5, 10.0]);
/// // row 0: zero mean, unit variance; row 1 is constant and maps to the bias
/// let var: f32 = y[..4].iter().map(|v| v * v).sum::<f32>() / 4.0;
/// assert!(y[..4].iter().sum::<f32>().abs() < 1e-6 && (var - 1.0).abs() < 1e-4);
/// assert_eq!(&y[4..], &[0.0; 4]);
/// ```
pub fn layernorm_fwd(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    g: &[f32],
    b: &[f32],
) {
    let _prof = profile::scope(profile::LN);
    let d = g.len();
    y.par_chunks_mut(d * ROW_CHUNK)
        .zip(x.par_chunks(d * ROW_CHUNK))
        .zip(mean.par_chunks_mut(ROW_CHUNK))
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .for_each(|(((y, x), mean), rstd)| {
            simd(
                #[inline(always)]
                || {
                    for (((y, x), m), r) in y
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d))
                        .zip(mean.iter_mut())
                        .zip(rstd.iter_mut())
                    {
                        let mu = sum16(x) / d as f32;
                        let mut acc = [0.0f32; 16];
                        let cx = x.chunks_exact(16);
                        let rest = cx.remainder();
                        for c in cx {
                            for j in 0..16 {
                                let t = c[j] - mu;
                                acc[j] += t * t;
                            }
                        }
                        let mut var = 0.0;
                        for a in acc {
                            var += a;
                        }
                        for &v in rest {
                            var += (v - mu) * (v - mu);
                        }
                        let rs = 1.0 / (var / d as f32 + LN_EPS).sqrt();
                        *m = mu;
                        *r = rs;
                        for (((o, &v), &gg), &bb) in y.iter_mut().zip(x).zip(g).zip(b) {
                            *o = (v - mu) * rs * gg + bb;
                        }
                    }
                },
            )
        });
}

/// LayerNorm backward. With `x̂ = (x-μ)·r` and `ĝ = dy·g`:
/// `dx (+)= r·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂))`, `dg = Σ_rows dy·x̂`, `db = Σ_rows dy`
/// (`dg`, `db` overwritten; summed in the same pass as `dx`, in the row blocks of
/// [`super::ColSums`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_bwd(
    dx: &mut [f32],
    acc: bool,
    dg: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    g: &[f32],
    sums: &mut ColSums,
) {
    let _prof = profile::scope(profile::LN);
    let d = g.len();
    let rows = mean.len();
    let slots = sums.slots(rows, 2 * d);
    dx[..rows * d]
        .par_chunks_mut(d * SUM_ROWS)
        .zip(dy.par_chunks(d * SUM_ROWS))
        .zip(x.par_chunks(d * SUM_ROWS))
        .zip(mean.par_chunks(SUM_ROWS).zip(rstd.par_chunks(SUM_ROWS)))
        .zip(slots.par_chunks_mut(2 * d))
        .for_each(|((((dx, dy), x), (mean, rstd)), slot)| {
            let (sg, sb) = slot.split_at_mut(d);
            sg.fill(0.0);
            sb.fill(0.0);
            simd(
                #[inline(always)]
                || {
                    for ((((dx, dy), x), &mu), &rs) in dx
                        .chunks_exact_mut(d)
                        .zip(dy.chunks_exact(d))
                        .zip(x.chunks_exact(d))
                        .zip(mean)
                        .zip(rstd)
                    {
                        let mut s1 = [0.0f32; 16];
                        let mut s2 = [0.0f32; 16];
                        let (cd, cx, cg) =
                            (dy.chunks_exact(16), x.chunks_exact(16), g.chunks_exact(16));
                        let (rd, rx, rg) = (cd.remainder(), cx.remainder(), cg.remainder());
                        for ((a, xv), gg) in cd.zip(cx).zip(cg) {
                            for j in 0..16 {
                                let gh = a[j] * gg[j];
                                s1[j] += gh;
                                s2[j] += gh * ((xv[j] - mu) * rs);
                            }
                        }
                        let (mut t1, mut t2) = (0.0f32, 0.0f32);
                        for ((&a, &xv), &gg) in rd.iter().zip(rx).zip(rg) {
                            let gh = a * gg;
                            t1 += gh;
                            t2 += gh * ((xv - mu) * rs);
                        }
                        let m1 = (s1.iter().sum::<f32>() + t1) / d as f32;
                        let m2 = (s2.iter().sum::<f32>() + t2) / d as f32;
                        let sums = sg.iter_mut().zip(sb.iter_mut());
                        for ((((o, &a), &xv), &gg), (sgj, sbj)) in
                            dx.iter_mut().zip(dy).zip(x).zip(g).zip(sums)
                        {
                            let xh = (xv - mu) * rs;
                            let v = rs * (a * gg - m1 - xh * m2);
                            if acc {
                                *o += v;
                            } else {
                                *o = v;
                            }
                            *sgj += a * xh;
                            *sbj += a;
                        }
                    }
                },
            )
        });
    sums.combine(&mut [dg, db]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::ColSums;
    use crate::model::ops::tests::{fd, randv, rel_err, weighted};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn layernorm_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (rows, d) = (5, 24);
        let mut x = randv(&mut rng, rows * d, 2.0);
        let mut g = randv(&mut rng, d, 1.0);
        let mut b = randv(&mut rng, d, 1.0);
        let w = randv(&mut rng, rows * d, 1.0);
        let run = |x: &[f32], g: &[f32], b: &[f32]| {
            let mut y = vec![0.0; rows * d];
            let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
            layernorm_fwd(&mut y, &mut m, &mut r, x, g, b);
            (y, m, r)
        };
        let (_, m, r) = run(&x, &g, &b);
        let mut dx = vec![0.5; rows * d];
        let (mut dg, mut db) = (vec![9.0; d], vec![9.0; d]);
        layernorm_bwd(
            &mut dx,
            true,
            &mut dg,
            &mut db,
            &w,
            &x,
            &m,
            &r,
            &g,
            &mut ColSums::default(),
        );
        let idx: Vec<usize> = (0..rows * d).collect();
        let (gc, bc) = (g.clone(), b.clone());
        let num = fd(&mut x, &idx, 1e-2, |x| weighted(&run(x, &gc, &bc).0, &w));
        let an: Vec<f64> = dx.iter().map(|&v| v as f64 - 0.5).collect();
        assert!(rel_err(&an, &num) < 2e-3, "dx {}", rel_err(&an, &num));
        let gi: Vec<usize> = (0..d).collect();
        let xc = x.clone();
        let num = fd(&mut g, &gi, 1e-2, |g| weighted(&run(&xc, g, &bc).0, &w));
        let an: Vec<f64> = dg.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&an, &num) < 2e-3, "dg {}", rel_err(&an, &num));
        let gc = g.clone();
        let num = fd(&mut b, &gi, 1e-2, |b| weighted(&run(&xc, &gc, b).0, &w));
        let an: Vec<f64> = db.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&an, &num) < 2e-3, "db {}", rel_err(&an, &num));
    }
}
