//! Register-tiled small matrix products for attention (one `(batch, head)` pair at a
//! time, operands in L1/L2): `C[m, n] (+)= A·B` where `A` is any strided view, `B` has
//! contiguous rows, and each tile of rows may name its own column count and reduction
//! range (the causal structure: a row tile `[i0, i1)` needs keys `< i1` only).
//!
//! Each 6×16 tile of `C` is accumulated in registers with one fused multiply-add per
//! product term, in reduction order, so the result does not depend on threads. No
//! packing: `A` values are broadcast from where they lie, `B` rows are read directly.

use super::ops::{View, simd, span};

/// Rows per register tile.
const MR: usize = 6;
/// Columns per register tile (two AVX2 vectors).
const NR: usize = 16;

/// What a tile of rows `[i0, i1)` computes: columns `0..cols` of `C`, summing the
/// reduction index over `red.0..red.1`.
pub(crate) struct TileRange {
    pub cols: usize,
    pub red: (usize, usize),
}

/// One `R × NR` tile: `C[r, 0..NR] (+)= Σ_{p∈p0..p1} A(r, p)·B[p, 0..NR]`.
///
/// # Safety
/// Every address `a + r·ars + p·acs`, `b + p·brs + j`, `c + r·crs + j` for `r < R`,
/// `p ∈ p0..p1`, `j < NR` must be valid (`c` for writes, no aliasing with `a`/`b`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
    (p0, p1): (usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    brs: usize,
    c: *mut f32,
    crs: usize,
    acc: bool,
) {
    let mut t = [[0f32; NR]; R];
    for p in p0..p1 {
        // SAFETY: in bounds by the caller's contract.
        let br = unsafe { &*(b.add(p * brs) as *const [f32; NR]) };
        for (r, tr) in t.iter_mut().enumerate() {
            let x = unsafe { *a.add(r * ars + p * acs) };
            for (o, &bv) in tr.iter_mut().zip(br) {
                *o = x.mul_add(bv, *o);
            }
        }
    }
    for (r, tr) in t.iter().enumerate() {
        // SAFETY: in bounds by the caller's contract; `c` does not alias `a`/`b`.
        let cr = unsafe { &mut *(c.add(r * crs) as *mut [f32; NR]) };
        if acc {
            for (o, &v) in cr.iter_mut().zip(tr) {
                *o += v;
            }
        } else {
            *cr = *tr;
        }
    }
}

/// `C (+)= A·B` over `m` rows: for each tile of rows `[i0, i1)` (6 rows; the last may be
/// shorter), `C[i, 0..cols] (+)= Σ_{p∈red} A(i, p)·B[p, 0..cols]` with
/// `range(i0, i1) = TileRange { cols, red }`. `B` must have unit column stride.
/// `acc = false` overwrites those columns.
pub(crate) fn product(
    c: &mut [f32],
    crs: usize,
    m: usize,
    a: View<'_>,
    b: View<'_>,
    acc: bool,
    range: impl Fn(usize, usize) -> TileRange,
) {
    assert_eq!(b.cs, 1, "tile::product: B needs contiguous rows");
    simd(
        #[inline(always)]
        || {
            let mut i0 = 0;
            while i0 < m {
                let i1 = (i0 + MR).min(m);
                let TileRange { cols, red } = range(i0, i1);
                let rows = i1 - i0;
                if cols == 0 || red.0 >= red.1 {
                    // an empty sum
                    if !acc {
                        for i in i0..i1 {
                            c[i * crs..i * crs + cols].fill(0.0);
                        }
                    }
                } else {
                    assert!(
                        span(i1, cols, crs, 1) <= c.len()
                            && span(i1, red.1, a.rs, a.cs) <= a.data.len()
                            && span(red.1, cols, b.rs, 1) <= b.data.len(),
                        "tile::product: operand too small"
                    );
                    row_tile(c, crs, i0, rows, a, b, cols, red, acc);
                }
                i0 = i1;
            }
        },
    )
}

/// Rows `i0..i0+rows` (at most [`MR`]) of [`product`], bounds already checked.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_tile(
    c: &mut [f32],
    crs: usize,
    i0: usize,
    rows: usize,
    a: View<'_>,
    b: View<'_>,
    cols: usize,
    red: (usize, usize),
    acc: bool,
) {
    let full = cols / NR * NR;
    let ap = a.data[i0 * a.rs..].as_ptr();
    let cp = c[i0 * crs..].as_mut_ptr();
    let strides = (a.rs, a.cs);
    for j0 in (0..full).step_by(NR) {
        let bp = b.data[j0..].as_ptr();
        // SAFETY: `product` checked the last row, column and reduction index of every
        // operand; `c` is a distinct mutable borrow.
        unsafe {
            let cj = cp.add(j0);
            match rows {
                6 => tile::<6>(red, ap, strides, bp, b.rs, cj, crs, acc),
                5 => tile::<5>(red, ap, strides, bp, b.rs, cj, crs, acc),
                4 => tile::<4>(red, ap, strides, bp, b.rs, cj, crs, acc),
                3 => tile::<3>(red, ap, strides, bp, b.rs, cj, crs, acc),
                2 => tile::<2>(red, ap, strides, bp, b.rs, cj, crs, acc),
                _ => tile::<1>(red, ap, strides, bp, b.rs, cj, crs, acc),
            }
        }
    }
    for r in 0..rows {
        let i = i0 + r;
        for j in full..cols {
            let mut s = 0f32;
            for p in red.0..red.1 {
                s = a.data[i * a.rs + p * a.cs].mul_add(b.data[p * b.rs + j], s);
            }
            let o = &mut c[i * crs + j];
            *o = if acc { *o + s } else { s };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::randv;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Every tile size, column remainder, strided and transposed `A`, causal ranges.
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
                    let mut c = vec![0.25; m * n];
                    product(&mut c, n, m, view, View::rm(&b, n), acc, range);
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
