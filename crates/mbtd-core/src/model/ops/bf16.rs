//! bf16 matrix products with fp32 accumulation: `C[m,n] (+)= bf16(A)[m,k]·bf16(B)[k,n]`
//! (`gemm_bf16`), used by the linear layers when `model.precision = "bf16"`.
//!
//! Both operands are rounded to bfloat16 (round to nearest, ties to even: [`to_bf16`]);
//! the product of two bf16 numbers is exact in fp32, so the only rounding after that is
//! the fp32 accumulation. On CPUs with AVX-512 BF16 the operands are packed in pairs of
//! consecutive `k` (the `vdpbf16ps` layout: one 32-bit lane holds `x[2q]` in its low half,
//! `x[2q+1]` in its high half), `A` in panels of `MR` rows and `B` in panels of `NR`
//! columns, and a register-blocked microkernel keeps an `MR × NR` tile of `C` in 24
//! vector registers while `k` runs by, in blocks of `KC`. Each element is then
//! `C[i,j] ← (C[i,j] + a₂q₊₁b₂q₊₁) + a₂qb₂q` for `q = 0, 1, …` in order (the instruction's
//! definition; denormal inputs count as zero). Elsewhere the portable path multiplies the
//! same bf16-rounded operands with the fp32 `gemm` crate: the same exact products,
//! summed in another order, so the two paths agree to fp32 accumulation error.
//!
//! Determinism: work is split only over blocks of output rows, never over `k`, so every
//! element's sum runs in the same order for any thread count.
//!
//! ```
//! use mbtd_core::model::ops::{Precision, bf16_round, mm_prec};
//!
//! let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
//! let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // [3, 2]
//! let mut c = [0.0f32; 4];
//! mm_prec(Precision::Bf16, &mut c, &a, &b, 2, 3, 2, false);
//! assert_eq!(c, [4.0, 5.0, 10.0, 11.0]); // small integers are exact in bf16
//! assert_eq!(bf16_round(1.0 + 1.0 / 256.0), 1.0); // a tie rounds to the even neighbour
//! ```

use super::gemm::{Operands, SharedOut, View, gemm_into};
use super::simd::simd;
use ::gemm::Parallelism;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Arithmetic of the linear layers' matrix products.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 operands and accumulation.
    #[default]
    F32,
    /// Operands rounded to bfloat16, fp32 accumulation; everything else stays fp32.
    Bf16,
}

impl Precision {
    /// The name in configuration files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

/// Rows of a microkernel tile.
const MR: usize = 12;
/// Columns of a microkernel tile (two vectors of 16 lanes).
const NR: usize = 32;
/// `k` per packed block (even, so pairs never straddle blocks).
const KC: usize = 256;
/// Rows of `A` per task (a whole number of [`MR`] panels).
const MC: usize = 8 * MR;

/// `x` rounded to bfloat16 (to nearest, ties to even; NaN stays a quiet NaN), as bits.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// `x` rounded to bfloat16 and widened back to fp32 (exact).
#[inline(always)]
pub fn bf16_round(x: f32) -> f32 {
    f32::from_bits((to_bf16(x) as u32) << 16)
}

/// Two values as one `vdpbf16ps` lane: `lo` (even `k`) in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | ((to_bf16(hi) as u32) << 16)
}

/// Whether the AVX-512 BF16 kernel runs on this CPU.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[m,n] (+)= bf16(A)[m,k]·bf16(B)[k,n]` with fp32 accumulation, `C` row-major of row
/// stride `c_rs`; `acc = false` overwrites `C`. Runs on `par`'s threads.
pub(crate) fn gemm_bf16(p: Operands<'_>, c: &mut [f32], c_rs: usize, acc: bool, par: Parallelism) {
    p.check(c.len(), c_rs, "gemm_bf16");
    if p.m == 0 || p.n == 0 || p.k == 0 || !has_avx512_bf16() {
        return gemm_bf16_portable(p, c, c_rs, acc, par);
    }
    #[cfg(target_arch = "x86_64")]
    gemm_bf16_avx512(p, c, c_rs, acc, par);
}

/// The portable path: the fp32 `gemm` on copies of `A` and `B` rounded to bf16.
pub(crate) fn gemm_bf16_portable(
    p: Operands<'_>,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
    par: Parallelism,
) {
    let Operands { m, n, k, a, b } = p;
    let round = |v: View<'_>, rows: usize, cols: usize| -> Vec<f32> {
        let mut out = vec![0.0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
            for (j, o) in row.iter_mut().enumerate() {
                *o = bf16_round(v.data[r * v.rs + j * v.cs]);
            }
        }
        out
    };
    let (ar, br) = (round(a, m, k), round(b, k, n));
    let (a, b) = (View::rm(&ar, k), View::rm(&br, n));
    gemm_into(Operands { m, n, k, a, b }, c, c_rs, acc, par);
}

thread_local! {
    /// Reusable packing buffers of this thread (`A` block, `B` block).
    static PACK: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's packing buffers (fresh ones if a caller up the stack of
/// this thread holds them).
fn with_pack<R>(f: impl FnOnce(&mut Vec<u32>, &mut Vec<u32>) -> R) -> R {
    let (mut pa, mut pb) = PACK.with(|p| p.take());
    let r = f(&mut pa, &mut pb);
    PACK.with(|p| p.set((pa, pb)));
    r
}

/// Zero row for a pair's missing second half (odd `k`).
const ZEROS: [f32; NR] = [0.0; NR];

/// `dst[i] = pair(lo[i], hi[i])` (contiguous: vectorises under [`simd`]).
#[inline(always)]
fn zip_pairs(dst: &mut [u32], lo: &[f32], hi: &[f32]) {
    for ((o, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
        *o = pair(l, h);
    }
}

/// Packs rows `p0..p0 + kc` of `B` (`k × n`) into `np` panels of `NR` columns, each
/// `[kc/2][NR]` pairs (zero beyond `k` or `n`).
fn pack_b(out: &mut [u32], b: View<'_>, p0: usize, kc: usize, k: usize, n: usize, par: bool) {
    let kc2 = kc.div_ceil(2);
    let at = |p: usize, j: usize| b.at_or_zero(p, j, k, n);
    let panel = |(jp, dst): (usize, &mut [u32])| {
        let j0 = jp * NR;
        simd(
            #[inline(always)]
            || {
                if b.cs == 1 && j0 + NR <= n {
                    for (q, row) in dst.chunks_exact_mut(NR).enumerate() {
                        let p = p0 + 2 * q;
                        let lo = &b.data[p * b.rs + j0..][..NR];
                        let hi = if p + 1 < k {
                            &b.data[(p + 1) * b.rs + j0..][..NR]
                        } else {
                            &ZEROS[..]
                        };
                        zip_pairs(row, lo, hi);
                    }
                } else {
                    for jj in 0..NR {
                        for q in 0..kc2 {
                            let p = p0 + 2 * q;
                            dst[q * NR + jj] = pair(at(p, j0 + jj), at(p + 1, j0 + jj));
                        }
                    }
                }
            },
        )
    };
    if par {
        out.par_chunks_mut(kc2 * NR).enumerate().for_each(panel);
    } else {
        out.chunks_mut(kc2 * NR).enumerate().for_each(panel);
    }
}

/// Packs rows `i0..i0 + mc`, columns `p0..p0 + kc` of `A` (`m × k`) into panels of `MR`
/// rows, each `[kc/2][MR]` pairs (zero beyond `m` or `k`).
#[allow(clippy::too_many_arguments)]
fn pack_a(
    out: &mut [u32],
    a: View<'_>,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    m: usize,
    k: usize,
) {
    let kc2 = kc.div_ceil(2);
    let at = |i: usize, p: usize| a.at_or_zero(i, p, m, k);
    let mut row = [0u32; KC / 2];
    for (ip, dst) in out[..mc.div_ceil(MR) * kc2 * MR]
        .chunks_exact_mut(kc2 * MR)
        .enumerate()
    {
        let r0 = i0 + ip * MR;
        simd(
            #[inline(always)]
            || {
                if r0 + MR > m {
                    for (q, col) in dst.chunks_exact_mut(MR).enumerate() {
                        let p = p0 + 2 * q;
                        for (r, o) in col.iter_mut().enumerate() {
                            *o = pair(at(r0 + r, p), at(r0 + r, p + 1));
                        }
                    }
                } else if a.rs == 1 {
                    // the transpose of a row-major matrix: rows of A lie side by side
                    for (q, col) in dst.chunks_exact_mut(MR).enumerate() {
                        let p = p0 + 2 * q;
                        let lo = &a.data[r0 + p * a.cs..][..MR];
                        let hi = if p + 1 < k {
                            &a.data[r0 + (p + 1) * a.cs..][..MR]
                        } else {
                            &ZEROS[..MR]
                        };
                        zip_pairs(col, lo, hi);
                    }
                } else {
                    for r in 0..MR {
                        let src = (r0 + r) * a.rs + p0 * a.cs;
                        let row = &mut row[..kc2];
                        if a.cs == 1 {
                            let x = &a.data[src..src + kc];
                            for (o, ch) in row.iter_mut().zip(x.chunks_exact(2)) {
                                *o = pair(ch[0], ch[1]);
                            }
                            if kc % 2 == 1 {
                                row[kc2 - 1] = pair(x[kc - 1], 0.0);
                            }
                        } else {
                            for (q, o) in row.iter_mut().enumerate() {
                                *o = pair(at(r0 + r, p0 + 2 * q), at(r0 + r, p0 + 2 * q + 1));
                            }
                        }
                        for (q, &v) in row.iter().enumerate() {
                            dst[q * MR + r] = v;
                        }
                    }
                }
            },
        )
    }
}

/// The AVX-512 BF16 path of [`gemm_bf16`] (`m, n, k > 0`, bounds checked by the caller).
#[cfg(target_arch = "x86_64")]
fn gemm_bf16_avx512(p: Operands<'_>, c: &mut [f32], c_rs: usize, acc: bool, par: Parallelism) {
    let Operands { m, n, k, a, b } = p;
    let threaded = matches!(par, Parallelism::Rayon(t) if t > 1);
    let np = n.div_ceil(NR);
    let cp = SharedOut(c.as_mut_ptr());
    with_pack(|_, pb| {
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let kc2 = kc.div_ceil(2);
            pb.clear();
            pb.resize(np * kc2 * NR, 0);
            pack_b(pb, b, p0, kc, k, n, threaded);
            let load = acc || p0 > 0;
            let pb: &[u32] = pb;
            let block = |ib: usize| {
                let (i0, mc) = (ib * MC, MC.min(m - ib * MC));
                with_pack(|pa, _| {
                    pa.clear();
                    pa.resize(mc.div_ceil(MR) * kc2 * MR, 0);
                    pack_a(pa, a, i0, mc, p0, kc, m, k);
                    for jp in 0..np {
                        let (j0, w) = (jp * NR, NR.min(n - jp * NR));
                        let bpanel = &pb[jp * kc2 * NR..(jp + 1) * kc2 * NR];
                        for (ip, apanel) in pa.chunks_exact(kc2 * MR).enumerate() {
                            let (r0, h) = (i0 + ip * MR, MR.min(mc - ip * MR));
                            // SAFETY: this task alone writes rows `i0..i0 + mc` of `C`;
                            // the tile's rows `r0..r0 + h` and columns `j0..j0 + w` lie
                            // inside `C` (checked by `gemm_bf16`'s assert), the panels
                            // hold `kc2` steps, and the CPU has AVX-512 BF16.
                            unsafe {
                                tile(kc2, apanel, bpanel, cp.at(r0 * c_rs + j0), c_rs, h, w, load)
                            };
                        }
                    }
                })
            };
            if threaded {
                (0..m.div_ceil(MC)).into_par_iter().for_each(block);
            } else {
                (0..m.div_ceil(MC)).for_each(block);
            }
        }
    });
}

/// One `h × w` tile of `C` at `c` (row stride `c_rs`): full tiles run the microkernel in
/// place, edge tiles through a full-size copy.
///
/// # Safety
/// Rows `0..h`, columns `0..w` at `c` must be valid and exclusively ours; the CPU must
/// have AVX-512 F and BF16; the panels hold `kc2` steps.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    kc2: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    c_rs: usize,
    h: usize,
    w: usize,
    load: bool,
) {
    assert!(a.len() >= kc2 * MR && b.len() >= kc2 * NR);
    if h == MR && w == NR {
        // SAFETY: the caller's contract; the panels are long enough (assert above).
        return unsafe { kernel(kc2, a.as_ptr(), b.as_ptr(), c, c_rs, load) };
    }
    let mut t = [0.0f32; MR * NR];
    // SAFETY: the caller's contract bounds rows `0..h`, columns `0..w` at `c`.
    unsafe {
        if load {
            for r in 0..h {
                std::ptr::copy_nonoverlapping(c.add(r * c_rs), t.as_mut_ptr().add(r * NR), w);
            }
        }
        kernel(kc2, a.as_ptr(), b.as_ptr(), t.as_mut_ptr(), NR, load);
        for r in 0..h {
            std::ptr::copy_nonoverlapping(t.as_ptr().add(r * NR), c.add(r * c_rs), w);
        }
    }
}

/// The microkernel: an `MR × NR` tile of `C` (loaded when `load`, else zero) plus the
/// products of an `A` panel (`[kc2][MR]` pairs) and a `B` panel (`[kc2][NR]` pairs).
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `a`, `b` must hold `kc2·MR`, `kc2·NR` pairs;
/// `MR` rows of `NR` floats at `c` (row stride `c_rs`) must be valid and exclusively ours.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(kc2: usize, a: *const u32, b: *const u32, c: *mut f32, c_rs: usize, load: bool) {
    use std::arch::x86_64::*;
    // SAFETY: every offset stays inside the panels (`q < kc2`) or the tile, per the
    // contract; `__m512i` and `__m512bh` are both 512 plain bits.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(r * c_rs));
                row[1] = _mm512_loadu_ps(c.add(r * c_rs + 16));
            }
        }
        for q in 0..kc2 {
            let bq = b.add(q * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const __m512i));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(bq.add(16) as *const __m512i));
            let aq = a.add(q * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * c_rs), row[0]);
            _mm512_storeu_ps(c.add(r * c_rs + 16), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::randv;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn rounding_is_to_nearest_even() {
        let ulp = 1.0 / 128.0; // bf16 spacing in [1, 2)
        assert_eq!(bf16_round(1.0 + ulp / 2.0), 1.0); // tie → even (1.0)
        assert_eq!(bf16_round(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp); // tie → even (2 ulp)
        assert_eq!(bf16_round(1.0 + ulp / 2.0 + 1e-6), 1.0 + ulp); // above the tie
        assert_eq!(bf16_round(-(1.0 + 0.49 * ulp)), -1.0);
        assert_eq!(bf16_round(f32::MAX), f32::INFINITY); // rounds past the largest bf16
        assert_eq!(bf16_round(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert!(bf16_round(f32::NAN).is_nan());
        assert!(bf16_round(f32::from_bits(0x7f80_0001)).is_nan()); // low-bit NaN stays NaN
        for i in 0..10_000u32 {
            let x = f32::from_bits(i.wrapping_mul(2_654_435_761) & 0x7f7f_ffff);
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
        }
    }

    /// The product of row-major `a` `[m, k]` and `b` `[k, n]`.
    fn rm<'a>(a: &'a [f32], b: &'a [f32], m: usize, k: usize, n: usize) -> Operands<'a> {
        let (a, b) = (View::rm(a, k), View::rm(b, n));
        Operands { m, n, k, a, b }
    }

    /// `C = C0 + bf16(A)·bf16(B)` in f64, and the bound `2⁻²⁴·(k+1)·(|C0| + Σ|a·b|)` on an
    /// fp32 accumulation of the exact products in any order.
    fn reference(m: usize, k: usize, n: usize, c0: &[f32], a: View, b: View) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut mag) = (c0[i * n + j] as f64, c0[i * n + j].abs() as f64);
                for p in 0..k {
                    let t = bf16_round(a.data[i * a.rs + p * a.cs]) as f64
                        * bf16_round(b.data[p * b.rs + j * b.cs]) as f64;
                    s += t;
                    mag += t.abs();
                }
                out.push((s, mag * (k as f64 + 1.0) * 2f64.powi(-24)));
            }
        }
        out
    }

    /// Every layout and both paths against the f64 reference, on shapes with edges in
    /// `m`, `n` and an odd `k` spanning two blocks.
    #[test]
    fn products_match_a_bf16_rounded_f64_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &(m, k, n) in &[(1, 1, 1), (13, 7, 33), (25, 300, 70), (96, 513, 64)] {
            let a = randv(&mut rng, m * k, 2.0);
            let b = randv(&mut rng, k * n, 0.5);
            let c0 = randv(&mut rng, m * n, 1.0);
            let views = [
                (View::rm(&a, k), View::rm(&b, n), "A·B"),
                (View::tr(&a, m), View::rm(&b, n), "Aᵀ·B"),
                (View::rm(&a, k), View::tr(&b, k), "A·Bᵀ"),
            ];
            for (av, bv, name) in views {
                let want = reference(m, k, n, &c0, av, bv);
                for (portable, par) in [
                    (false, Parallelism::None),
                    (false, Parallelism::Rayon(2)),
                    (true, Parallelism::None),
                ] {
                    let mut c = c0.clone();
                    let p = Operands {
                        m,
                        n,
                        k,
                        a: av,
                        b: bv,
                    };
                    if portable {
                        gemm_bf16_portable(p, &mut c, n, true, par);
                    } else {
                        gemm_bf16(p, &mut c, n, true, par);
                    }
                    for (idx, (&got, &(w, tol))) in c.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - w).abs() <= tol,
                            "{name} {m}×{k}×{n} portable={portable}: C[{idx}] = {got}, want {w} ± {tol}"
                        );
                    }
                    let mut z = vec![f32::NAN; m * n];
                    gemm_bf16(p, &mut z, n, false, par);
                    let zero = vec![0.0; m * n];
                    for (idx, (&got, &(w, tol))) in
                        z.iter().zip(&reference(m, k, n, &zero, av, bv)).enumerate()
                    {
                        assert!((got as f64 - w).abs() <= tol, "{name} overwrite C[{idx}]");
                    }
                }
            }
        }
    }

    /// On AVX-512 BF16 hardware the kernel sums each element exactly as the instruction
    /// defines: `(c + a₂q₊₁b₂q₊₁) + a₂qb₂q` per pair, pairs in order, blocks in order.
    #[test]
    fn kernel_sums_pairs_in_instruction_order() {
        if !has_avx512_bf16() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (m, k, n) = (30, 601, 45);
        let a = randv(&mut rng, m * k, 1.0);
        let b = randv(&mut rng, k * n, 1.0);
        let mut c = vec![0.25f32; m * n];
        gemm_bf16(rm(&a, &b, m, k, n), &mut c, n, true, Parallelism::Rayon(2));
        for i in 0..m {
            for j in 0..n {
                let t = |p: usize| {
                    if p < k {
                        bf16_round(a[i * k + p]) * bf16_round(b[p * n + j])
                    } else {
                        0.0
                    }
                };
                let want = (0..k.div_ceil(2)).fold(0.25f32, |s, q| (s + t(2 * q + 1)) + t(2 * q));
                assert_eq!(c[i * n + j].to_bits(), want.to_bits(), "C[{i},{j}]");
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (m, k, n) = (300, 260, 100);
        let a = randv(&mut rng, m * k, 1.0);
        let b = randv(&mut rng, k * n, 1.0);
        let run = |par| {
            let mut c = vec![0.5f32; m * n];
            gemm_bf16(rm(&a, &b, m, k, n), &mut c, n, true, par);
            c
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let one = run(Parallelism::None);
        let three = pool.install(|| run(Parallelism::Rayon(3)));
        assert!(one == three, "thread count changed the bits");
    }
}
