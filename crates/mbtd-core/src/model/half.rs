//! Half-precision weight matrices for batch-1 decoding.
//!
//! Decoding one token reads every weight once, so the decode step keeps its own copy of
//! each matrix `W` `[din, dout]` as IEEE half precision (`half::f16`, round to nearest
//! even) and accumulates in fp32. The copy is stored in column panels of [`PANEL`]
//! columns: panel `p` holds columns `p·PANEL..` of every row, rows one after another, so
//! `y = b + x·W` over a range of panels reads one contiguous stream of memory (which the
//! hardware prefetchers follow) instead of short strided pieces of every row.
//!
//! Every output `y[j] = b[j] + Σ_i W[i, j]·x[i]` accumulates its rows in order with fused
//! multiply-adds, on the AVX2 path and on the portable path alike, so both give the same
//! bits.

use half::f16;
use rayon::prelude::*;

/// Columns per panel (eight AVX2 registers of eight lanes).
pub(crate) const PANEL: usize = 64;

/// A matrix `W` `[din, dout]` in half precision, stored in column panels.
#[derive(Debug)]
pub(crate) struct HalfPanels {
    /// Panel `p` starts at `p·din·PANEL`; its rows have `panel_width(p)` entries.
    w: Vec<u16>,
    din: usize,
    dout: usize,
}

impl HalfPanels {
    /// Converts a row-major fp32 matrix `[din, dout]`.
    pub fn new(w: &[f32], din: usize, dout: usize) -> Self {
        assert_eq!(w.len(), din * dout, "HalfPanels: {din}×{dout} expected");
        let mut out = vec![0u16; din * dout];
        out.par_chunks_mut(din * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                let (c0, c1) = (p * PANEL, ((p + 1) * PANEL).min(dout));
                let rows = panel.chunks_exact_mut(c1 - c0).zip(w.chunks_exact(dout));
                for (dst, row) in rows {
                    for (o, &x) in dst.iter_mut().zip(&row[c0..c1]) {
                        *o = f16::from_f32(x).to_bits();
                    }
                }
            });
        Self { w: out, din, dout }
    }

    /// `W[i, j]` as fp32.
    #[cfg(test)]
    fn get(&self, i: usize, j: usize) -> f32 {
        let (p, c) = (j / PANEL, j % PANEL);
        let width = (self.dout - p * PANEL).min(PANEL);
        f16::from_bits(self.w[p * self.din * PANEL + i * width + c]).to_f32()
    }

    /// `y = b + x·W` over the columns of panels `p0..p0 + y.len().div_ceil(PANEL)`
    /// (`y[0]` is column `p0·PANEL`; `y` ends at a panel end or at `dout`). Without `b`
    /// the sums start at zero.
    pub fn matvec(&self, y: &mut [f32], x: &[f32], b: Option<&[f32]>, p0: usize) {
        let j0 = p0 * PANEL;
        assert_eq!(x.len(), self.din, "matvec: x has {} entries", x.len());
        assert!(
            j0 + y.len() <= self.dout
                && (y.len().is_multiple_of(PANEL) || j0 + y.len() == self.dout),
            "matvec: columns {j0}..{} do not end a panel",
            j0 + y.len()
        );
        match b {
            Some(b) => y.copy_from_slice(&b[j0..j0 + y.len()]),
            None => y.fill(0.0),
        }
        for (k, yp) in y.chunks_mut(PANEL).enumerate() {
            let start = (p0 + k) * self.din * PANEL;
            let panel = &self.w[start..start + self.din * yp.len()];
            panel_matvec(yp, x, panel);
        }
    }
}

/// `y += x·P` for one panel `P` `[x.len(), y.len()]` (row-major, half bits).
fn panel_matvec(y: &mut [f32], x: &[f32], panel: &[u16]) {
    #[cfg(target_arch = "x86_64")]
    if y.len() == PANEL && has_f16c() {
        // SAFETY: the CPU has the features the callee enables (checked just above) and
        // `panel` holds `x.len()` rows of `PANEL` entries.
        unsafe { panel_matvec_avx2(y, x, panel) };
        return;
    }
    let w = y.len();
    for (row, &xi) in panel.chunks_exact(w).zip(x) {
        for (a, &h) in y.iter_mut().zip(row) {
            *a = f16::from_bits(h).to_f32().mul_add(xi, *a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// A full panel with eight fp32 accumulators of eight lanes held in registers while the
/// rows stream by.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `y.len() == PANEL` and
/// `panel.len() >= x.len()·PANEL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_matvec_avx2(y: &mut [f32], x: &[f32], panel: &[u16]) {
    use std::arch::x86_64::*;
    assert!(y.len() == PANEL && panel.len() >= x.len() * PANEL);
    let yp = y.as_mut_ptr();
    let wp = panel.as_ptr();
    // SAFETY: every pointer offset stays inside `y` (64 floats) or inside row `i` of
    // `panel` (checked by the assert above).
    unsafe {
        let mut acc: [__m256; 8] = std::array::from_fn(|r| _mm256_loadu_ps(yp.add(8 * r)));
        for (i, &xi) in x.iter().enumerate() {
            let xv = _mm256_set1_ps(xi);
            let row = wp.add(i * PANEL);
            for (r, a) in acc.iter_mut().enumerate() {
                let h = _mm_loadu_si128(row.add(8 * r) as *const __m128i);
                *a = _mm256_fmadd_ps(_mm256_cvtph_ps(h), xv, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(yp.add(8 * r), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(h: &HalfPanels, x: &[f32], b: &[f32], j: usize) -> f32 {
        (0..x.len()).fold(b[j], |a, i| h.get(i, j).mul_add(x[i], a))
    }

    #[test]
    fn matvec_matches_rows_in_order_on_every_path() {
        // 150 columns: two full panels (vector path) and a tail of 22 (portable path)
        let (din, dout) = (37, 150);
        let w: Vec<f32> = (0..din * dout).map(|i| (i as f32 * 0.013).sin()).collect();
        let x: Vec<f32> = (0..din).map(|i| (i as f32 * 0.37).cos()).collect();
        let b: Vec<f32> = (0..dout).map(|j| j as f32 * 0.001).collect();
        let h = HalfPanels::new(&w, din, dout);
        for i in 0..din {
            for j in 0..dout {
                let (got, want) = (h.get(i, j), w[i * dout + j]);
                assert!((got - want).abs() <= want.abs() / 2048.0, "W[{i},{j}]");
            }
        }
        let mut y = vec![f32::NAN; dout];
        h.matvec(&mut y, &x, Some(&b), 0);
        for (j, &got) in y.iter().enumerate() {
            assert_eq!(
                got.to_bits(),
                reference(&h, &x, &b, j).to_bits(),
                "column {j}"
            );
        }
        // a panel range, no bias
        let zero = vec![0.0; dout];
        let mut y = vec![f32::NAN; dout - PANEL];
        h.matvec(&mut y, &x, None, 1);
        for (k, &got) in y.iter().enumerate() {
            let want = reference(&h, &x, &zero, PANEL + k);
            assert_eq!(got.to_bits(), want.to_bits(), "column {}", PANEL + k);
        }
    }

    #[test]
    #[should_panic(expected = "do not end a panel")]
    fn matvec_rejects_a_partial_panel() {
        let h = HalfPanels::new(&[0.0; 2 * 130], 2, 130);
        h.matvec(&mut [0.0; 10], &[1.0, 2.0], None, 0);
    }
}
