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

use super::gemm::{Operands, View, gemm_into};
use ::gemm::Parallelism;
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

    /// What computes the products in this precision on this CPU, for people to read:
    /// `bf16` without AVX-512 BF16 takes the portable path (the fp32 `gemm` on rounded
    /// copies), which costs more than `f32`.
    pub fn kernel(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 if has_avx512_bf16() => "bf16 (AVX-512 BF16)",
            Self::Bf16 => "bf16 (portable: this CPU lacks AVX-512 BF16, slower than f32)",
        }
    }
}

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

/// Whether the AVX-512 BF16 kernel runs on this CPU.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
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
    super::bf16_avx512::gemm_bf16_avx512(p, c, c_rs, acc, par);
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
        // edges in every dimension; `k` over one block (1,024) and odd at a block's end; a
        // `B` wide enough for shorter blocks; few rows (one block of rows split over
        // columns) and many (several blocks of rows)
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 7, 33),
            (25, 300, 70),
            (96, 513, 64),
            (37, 2_101, 40),
            (20, 70, 8_200),
            (200, 64, 100),
            (300, 33, 65),
        ] {
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
        let (m, k, n) = (30, 2_201, 45);
        let a = randv(&mut rng, m * k, 1.0);
        let b = randv(&mut rng, k * n, 1.0);
        let mut c = vec![0.25f32; m * n];
        gemm_bf16(rm(&a, &b, m, k, n), &mut c, n, true, Parallelism::Rayon(2));
        // the same product with `A` given as the transpose of its transpose (the other
        // packing of `A`) sums in the same order
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let mut c2 = vec![0.25f32; m * n];
        let p = Operands {
            m,
            n,
            k,
            a: View::tr(&at, m),
            b: View::rm(&b, n),
        };
        gemm_bf16(p, &mut c2, n, true, Parallelism::None);
        assert!(c == c2, "the two layouts of A sum differently");
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
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // many rows (tasks per block of rows) and few (one block split over columns)
        for (m, k, n) in [(300, 1_100, 100), (250, 1_500, 300)] {
            let a = randv(&mut rng, m * k, 1.0);
            let b = randv(&mut rng, k * n, 1.0);
            let run = |par| {
                let mut c = vec![0.5f32; m * n];
                gemm_bf16(rm(&a, &b, m, k, n), &mut c, n, true, par);
                c
            };
            let one = run(Parallelism::None);
            let three = pool.install(|| run(Parallelism::Rayon(3)));
            assert!(one == three, "{m}×{k}×{n}: thread count changed the bits");
        }
    }
}
