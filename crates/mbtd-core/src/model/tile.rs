//! Register-tiled small matrix products for attention (one `(batch, head)` pair at a
//! time, operands in L1/L2): `C[m, n] (+)= A·B` where `A` and `B` are any strided views,
//! and each tile of rows may name its own column count and reduction range (the causal
//! structure: a row tile `[i0, i1)` needs keys `< i1` only).
//!
//! `B` is first copied into panels of 16 columns (`[k, 16]` each, contiguous, the last
//! one zero-padded) in a per-thread buffer: a head's rows lie 1–3 KiB apart in the
//! activations, a stride that maps them onto a few L1 sets, whereas a panel is read
//! sequentially and stays in L1 while every row tile passes over it. Each 6×16 tile of
//! `C` is accumulated in registers with one fused multiply-add per product term, in
//! reduction order, so the result does not depend on threads.

use super::ops::{View, simd, span};
use std::cell::RefCell;

/// Rows per register tile.
const MR: usize = 6;
/// Columns per register tile and panel (two AVX2 vectors).
const NR: usize = 16;

/// What a tile of rows `[i0, i1)` computes: columns `0..cols` of `C`, summing the
/// reduction index over `red.0..red.1`.
pub(crate) struct TileRange {
    pub cols: usize,
    pub red: (usize, usize),
}

thread_local! {
    /// `B` of the product running on this thread, in 16-column panels.
    static PANELS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Copies `B` (`[k, n]`) into `out` as `n.div_ceil(16)` panels: panel `q` holds
/// `B[p, 16q + j]` at `q·16k + 16p + j`, zero where `16q + j >= n`.
fn pack(out: &mut Vec<f32>, b: View<'_>, k: usize, n: usize) {
    let len = n.div_ceil(NR) * NR * k;
    if out.len() < len {
        out.resize(len, 0.0);
    }
    assert!(
        span(k, n, b.rs, b.cs) <= b.data.len(),
        "tile::pack: B too small"
    );
    simd(
        #[inline(always)]
        || {
            for (q, panel) in out[..len].chunks_exact_mut(NR * k).enumerate() {
                let width = (n - q * NR).min(NR);
                if width < NR {
                    panel.fill(0.0);
                }
                if b.cs == 1 && width == NR {
                    for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                        let src = p * b.rs + q * NR;
                        let src: &[f32; NR] = b.data[src..src + NR].try_into().expect("16");
                        row.copy_from_slice(src);
                    }
                } else if width == NR {
                    // 16 source columns side by side, each read at stride `rs`
                    let cols: [&[f32]; NR] =
                        std::array::from_fn(|j| &b.data[(q * NR + j) * b.cs..]);
                    for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                        for (o, col) in row.iter_mut().zip(&cols) {
                            *o = col[p * b.rs];
                        }
                    }
                } else {
                    for j in 0..width {
                        let col = &b.data[(q * NR + j) * b.cs..];
                        for (p, o) in panel.iter_mut().skip(j).step_by(NR).enumerate() {
                            *o = col[p * b.rs];
                        }
                    }
                }
            }
        },
    )
}

/// One `R × NR` tile: `C[r, 0..w] (+)= Σ_{p∈p0..p1} A(r, p)·B[p, 0..w]` (`B` a panel).
///
/// # Safety
/// Every address `a + r·ars + p·acs`, `b + p·NR + j`, `c + r·crs + j'` for `r < R`,
/// `p ∈ p0..p1`, `j < NR`, `j' < w` must be valid (`c` for writes, no aliasing with
/// `a`/`b`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    (p0, p1): (usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    c: *mut f32,
    crs: usize,
    w: usize,
    acc: bool,
) {
    let mut t = [[0f32; NR]; R];
    for p in p0..p1 {
        // SAFETY: in bounds by the caller's contract.
        let br = unsafe { &*(b.add(p * NR) as *const [f32; NR]) };
        for (r, tr) in t.iter_mut().enumerate() {
            let x = unsafe { *a.add(r * ars + p * acs) };
            for (o, &bv) in tr.iter_mut().zip(br) {
                *o = x.mul_add(bv, *o);
            }
        }
    }
    if w == NR {
        for (r, tr) in t.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract; `c` does not alias `a`/`b`.
            let cr = unsafe { &mut *(c.add(r * crs) as *mut [f32; NR]) };
            store(cr, tr, acc);
        }
    } else {
        // a copy, so that `t` itself is only ever indexed by constants (and stays in
        // registers through the loop above)
        let part = t;
        for (r, tr) in part.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract; `c` does not alias `a`/`b`.
            let cr = unsafe { std::slice::from_raw_parts_mut(c.add(r * crs), w) };
            store(cr, &tr[..w], acc);
        }
    }
}

/// `out (+)= v` element by element (`acc`), or `out = v`.
#[inline(always)]
fn store(out: &mut [f32], v: &[f32], acc: bool) {
    if acc {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += x;
        }
    } else {
        out.copy_from_slice(v);
    }
}

/// `C (+)= A·B` over `m` rows with `B` of shape `[k, n]`: for each tile of rows
/// `[i0, i1)` (6 rows; the last may be shorter),
/// `C[i, 0..cols] (+)= Σ_{p∈red} A(i, p)·B[p, 0..cols]` with
/// `range(i0, i1) = TileRange { cols, red }` (`cols <= n`, `red.1 <= k`).
/// `acc = false` overwrites those columns. Panels outer, row tiles inner.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    c: &mut [f32],
    crs: usize,
    m: usize,
    a: View<'_>,
    b: View<'_>,
    (k, n): (usize, usize),
    acc: bool,
    range: impl Fn(usize, usize) -> TileRange,
) {
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + MR).min(m);
        let TileRange { cols, red } = range(i0, i1);
        assert!(
            cols <= n && red.1 <= k && span(i1, cols, crs, 1) <= c.len(),
            "tile::product: range outside B or C"
        );
        assert!(
            red.0 >= red.1 || span(i1, red.1, a.rs, a.cs) <= a.data.len(),
            "tile::product: A too small"
        );
        i0 = i1;
    }
    PANELS.with(|buf| {
        let mut panels = buf.borrow_mut();
        pack(&mut panels, b, k, n);
        simd(
            #[inline(always)]
            || {
                let len = n.div_ceil(NR) * NR * k;
                for (q, panel) in panels[..len].chunks_exact(NR * k).enumerate() {
                    let j0 = q * NR;
                    let mut i0 = 0;
                    while i0 < m {
                        let i1 = (i0 + MR).min(m);
                        let TileRange { cols, red } = range(i0, i1);
                        if j0 < cols {
                            let w = (cols - j0).min(NR);
                            row_tile(c, crs, (i0, i1), a, panel, j0, w, red, acc);
                        }
                        i0 = i1;
                    }
                }
            },
        )
    })
}

/// Rows `i0..i1` (at most [`MR`]), columns `j0..j0 + w` of [`product`], bounds already
/// checked.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_tile(
    c: &mut [f32],
    crs: usize,
    (i0, i1): (usize, usize),
    a: View<'_>,
    panel: &[f32],
    j0: usize,
    w: usize,
    red: (usize, usize),
    acc: bool,
) {
    if red.0 >= red.1 {
        // an empty sum
        if !acc {
            for i in i0..i1 {
                c[i * crs + j0..i * crs + j0 + w].fill(0.0);
            }
        }
        return;
    }
    let ap = a.data[i0 * a.rs..].as_ptr();
    let cp = c[i0 * crs + j0..].as_mut_ptr();
    let (bp, strides) = (panel.as_ptr(), (a.rs, a.cs));
    // SAFETY: `product` checked the last row, column and reduction index of every
    // operand; the panel holds `k` rows of 16; `c` is a distinct mutable borrow.
    unsafe {
        match i1 - i0 {
            6 => tile::<6>(red, ap, strides, bp, cp, crs, w, acc),
            5 => tile::<5>(red, ap, strides, bp, cp, crs, w, acc),
            4 => tile::<4>(red, ap, strides, bp, cp, crs, w, acc),
            3 => tile::<3>(red, ap, strides, bp, cp, crs, w, acc),
            2 => tile::<2>(red, ap, strides, bp, cp, crs, w, acc),
            _ => tile::<1>(red, ap, strides, bp, cp, crs, w, acc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::randv;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Every tile size, column remainder, transposed `A` and `B`, causal ranges.
    #[test]
    fn product_matches_naive_on_ragged_causal_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (m, n, k) in [(13, 37, 20), (6, 16, 5), (1, 3, 1), (29, 64, 29)] {
            let a = randv(&mut rng, m * k, 1.0);
            let b = randv(&mut rng, k * n, 1.0);
            for transposed in [false, true] {
                for acc in [false, true] {
                    let av = if transposed {
                        // the same matrix stored column-major
                        let mut t = vec![0.0; m * k];
                        for i in 0..m {
                            for p in 0..k {
                                t[p * m + i] = a[i * k + p];
                            }
                        }
                        t
                    } else {
                        a.clone()
                    };
                    let view = if transposed {
                        View::tr(&av, m)
                    } else {
                        View::rm(&av, k)
                    };
                    let range = |i0: usize, i1: usize| TileRange {
                        cols: (n * i1).div_ceil(m).min(n),
                        red: (i0 * k / m / 2, (k * i1).div_ceil(m).min(k)),
                    };
                    // `B` from a row-major buffer, or from a column-major one seen transposed
                    let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                    let bview = if transposed {
                        View::rm(&bt, k).t()
                    } else {
                        View::rm(&b, n)
                    };
                    let mut c = vec![0.25; m * n];
                    product(&mut c, n, m, view, bview, (k, n), acc, range);
                    for i in 0..m {
                        let i0 = i / MR * MR;
                        let TileRange { cols, red } = range(i0, (i0 + MR).min(m));
                        for j in 0..n {
                            let want = if j < cols {
                                let s: f32 =
                                    (red.0..red.1).map(|p| a[i * k + p] * b[p * n + j]).sum();
                                if acc { 0.25 + s } else { s }
                            } else {
                                0.25
                            };
                            let got = c[i * n + j];
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{m}x{n}x{k} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
