//! Reductions across rows with a fixed order: the weighted sum of several buffers
//! ([`weighted_sum`], the branch aggregation `h' = Σ_i α̃_i z_i`) and column sums
//! `sum[c] = Σ_r x[r, c]` ([`ColSums`], bias and LayerNorm parameter gradients), summed in
//! blocks of [`SUM_ROWS`] rows whose partial sums are added in block order, so the bits
//! never depend on the number of threads.

use super::profile;
use super::simd::simd;
use rayon::prelude::*;

/// `out = Σ_k w_k·x_k` over `parts()` in order (`out = w_0·x_0`, then `out += w_k·x_k`),
/// chunk by chunk so that each output chunk stays in cache while every part is added:
/// one pass over memory instead of one per part. `parts` is called once per chunk.
///
/// ```
/// use mbtd_core::model::ops::weighted_sum;
///
/// let (z0, z1) = (vec![1.0f32; 5], vec![2.0f32; 5]);
/// let mut h = vec![0.0f32; 5];
/// weighted_sum(&mut h, || [(0.25, z0.as_slice()), (0.75, z1.as_slice())].into_iter());
/// assert_eq!(h, vec![1.75; 5]);
/// ```
pub fn weighted_sum<'a, I>(out: &mut [f32], parts: impl Fn() -> I + Sync)
where
    I: Iterator<Item = (f32, &'a [f32])>,
{
    let _prof = profile::scope(profile::ELEM);
    out.par_chunks_mut(8192).enumerate().for_each(|(c, o)| {
        let at = c * 8192;
        simd(
            #[inline(always)]
            || {
                for (k, (w, x)) in parts().enumerate() {
                    let x = &x[at..at + o.len()];
                    if k == 0 {
                        o.iter_mut().zip(x).for_each(|(a, &b)| *a = w * b);
                    } else {
                        o.iter_mut().zip(x).for_each(|(a, &b)| *a += w * b);
                    }
                }
            },
        )
    });
}

/// Rows per block of a [`ColSums`] sum.
pub(crate) const SUM_ROWS: usize = 64;

/// Column sums `sum[c] = Σ_r x[r, c]` of a row-major `[rows, cols]` buffer, in fixed
/// blocks of [`SUM_ROWS`] rows: each block sums its rows in order, then the block sums
/// are added in order, so the bits do not depend on the thread count. Holds the
/// per-block partial sums (reused: no allocation in the steady state).
#[derive(Debug, Default)]
pub(crate) struct ColSums {
    partials: Vec<f32>,
}

impl ColSums {
    /// `sum = Σ_rows x` (`cols = sum.len()`).
    pub fn of(&mut self, sum: &mut [f32], x: &[f32]) {
        let _prof = profile::scope(profile::ELEM);
        let cols = sum.len();
        self.prepare(x.len(), cols);
        x.par_chunks(SUM_ROWS * cols)
            .zip(self.partials.par_chunks_mut(cols))
            .for_each(|(block, part)| add_rows(part, block));
        self.combine(&mut [sum]);
    }

    /// Rewrites each block of rows of `x` with `f(first_row, block)`, then sums its
    /// columns as [`ColSums::of`] while the block is still in cache: one pass over memory
    /// for an element-wise producer of `dy` and its bias gradient `Σ_rows dy`. Pass an
    /// `#[inline(always)]` closure: it runs under [`simd`].
    pub fn map(&mut self, sum: &mut [f32], x: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
        let cols = sum.len();
        self.prepare(x.len(), cols);
        x.par_chunks_mut(SUM_ROWS * cols)
            .zip(self.partials.par_chunks_mut(cols))
            .enumerate()
            .for_each(|(k, (block, part))| {
                simd(
                    #[inline(always)]
                    || f(k * SUM_ROWS, block),
                );
                add_rows(part, block);
            });
        self.combine(&mut [sum]);
    }

    fn prepare(&mut self, len: usize, cols: usize) {
        assert!(
            cols > 0 && len.is_multiple_of(cols),
            "column sum: {len} values are not whole rows of {cols}"
        );
        self.slots(len / cols, cols);
    }

    /// One slot of `width` sums per block of [`SUM_ROWS`] rows (block `k` covers rows
    /// `k·SUM_ROWS..`), for kernels that fill them themselves before [`ColSums::combine`].
    pub(super) fn slots(&mut self, rows: usize, width: usize) -> &mut [f32] {
        self.partials.resize(rows.div_ceil(SUM_ROWS) * width, 0.0);
        &mut self.partials
    }

    /// `outs = Σ_blocks slot` in block order, each slot split into `outs` by their lengths.
    pub(super) fn combine(&self, outs: &mut [&mut [f32]]) {
        let width: usize = outs.iter().map(|o| o.len()).sum();
        for o in outs.iter_mut() {
            o.fill(0.0);
        }
        simd(
            #[inline(always)]
            || {
                for slot in self.partials.chunks_exact(width) {
                    let mut rest = slot;
                    for o in outs.iter_mut() {
                        let (part, tail) = rest.split_at(o.len());
                        o.iter_mut().zip(part).for_each(|(s, &p)| *s += p);
                        rest = tail;
                    }
                }
            },
        )
    }
}

/// `part = Σ_r block[r, ·]` over the rows of `block` in order.
fn add_rows(part: &mut [f32], block: &[f32]) {
    let cols = part.len();
    part.copy_from_slice(&block[..cols]);
    simd(
        #[inline(always)]
        || {
            for row in block.chunks_exact(cols).skip(1) {
                part.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
            }
        },
    )
}

/// `out = α·x` and `sum = Σ_rows out` in one pass (`cols = sum.len()`).
pub(crate) fn scale_colsum(
    out: &mut [f32],
    alpha: f32,
    x: &[f32],
    sum: &mut [f32],
    sums: &mut ColSums,
) {
    let _prof = profile::scope(profile::ELEM);
    let w = sum.len();
    sums.map(
        sum,
        out,
        #[inline(always)]
        |r0, rows| {
            let x = &x[r0 * w..r0 * w + rows.len()];
            rows.iter_mut().zip(x).for_each(|(a, &b)| *a = alpha * b);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::randv;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn column_sums_match_f64_sums_for_any_row_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut sums = ColSums::default();
        for rows in [1, SUM_ROWS - 1, SUM_ROWS, 3 * SUM_ROWS + 5] {
            let cols = 7;
            let x = randv(&mut rng, rows * cols, 1.0);
            let mut got = vec![f32::NAN; cols];
            sums.of(&mut got, &x);
            let mut doubled = x.clone();
            let mut mapped = vec![f32::NAN; cols];
            sums.map(&mut mapped, &mut doubled, |_, r| {
                r.iter_mut().for_each(|v| *v *= 2.0)
            });
            for c in 0..cols {
                let want: f64 = (0..rows).map(|r| x[r * cols + c] as f64).sum();
                assert!((got[c] as f64 - want).abs() < 1e-4, "{rows} rows, col {c}");
                assert_eq!(mapped[c], 2.0 * got[c], "{rows} rows, col {c}");
            }
            assert!(doubled.iter().zip(&x).all(|(&d, &v)| d == 2.0 * v));
        }
    }
}
