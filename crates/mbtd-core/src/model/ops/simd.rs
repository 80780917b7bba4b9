//! Vector helpers: [`simd`] runs a closure compiled for AVX-512 or AVX2+FMA, and the
//! lane-wise reductions (`sum16`, `max16`, `dot16`: 16 independent lanes over the slice in
//! order, lanes added at the end) and `fast_exp` that vectorise under it. Every path gives
//! the same bits: nothing here lets the compiler reassociate.
//!
//! ```
//! use mbtd_core::model::ops::{fast_exp, simd, sum16};
//!
//! let x: Vec<f32> = (0..40).map(|i| i as f32 * 0.1 - 2.0).collect();
//! let total = simd(
//!     #[inline(always)]
//!     || sum16(&x.iter().map(|&v| fast_exp(v)).collect::<Vec<_>>()),
//! );
//! let want: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
//! assert!((total as f64 - want).abs() < 1e-4 * want);
//! ```

use rayon::prelude::*;

/// Runs `f` compiled for AVX-512 (F, VL) or else AVX2+FMA, whichever the CPU has. Only
/// element-wise code and reductions written lane by lane go through here (nothing the
/// compiler may reassociate), so every path gives identical bits; AVX-512 lets the
/// compiler use 32 vector registers and 16-lane vectors.
/// Pass a closure marked `#[inline(always)]`: a closure compiled as a function of its
/// own does not inherit the target features and stays SSE2.
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU supports the enabled features (checked just above).
            return unsafe { run_avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the enabled features (checked just above).
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

/// `e^x` to about 2 ulp for `x` in `[-87.3, 88.3]` (clamped outside), branch-free so
/// that loops over it vectorise (Cephes `expf` polynomial in fused multiply-adds: call it
/// under [`simd`], where they are single instructions).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = (p * r).mul_add(r, r) + 1.0;
    // 2^n without a float→int conversion (which would not vectorise): the mantissa of
    // n + 127 + 2^23 holds the biased exponent n + 127 exactly.
    let biased = (n + 8_388_735.0).to_bits();
    p * f32::from_bits(biased << 23)
}

/// Sum with 16 independent lanes (vectorisable, fixed order), lanes added at the end.
#[inline(always)]
pub fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for &v in rest {
        s += v;
    }
    s
}

/// [`sum16`] of `x` followed by zeros up to a multiple of 16: the tail goes into the
/// lanes as well, so the bits depend only on the values counted from `x[0]`, not on
/// where the slice ends.
#[inline(always)]
pub(crate) fn sum16_padded(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for c in x.chunks(16) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    s
}

/// [`dot16`] with the tail in the lanes, as [`sum16_padded`].
#[inline(always)]
pub(crate) fn dot16_padded(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for (a, b) in x.chunks(16).zip(y.chunks(16)) {
        for ((s, &u), &v) in acc.iter_mut().zip(a).zip(b) {
            *s += u * v;
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    s
}

/// Maximum with 16 independent lanes.
#[inline(always)]
pub(crate) fn max16(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc.into_iter().chain(rest.iter().copied()) {
        m = if a > m { a } else { m };
    }
    m
}

/// Dot product with 16 independent lanes, fixed order.
#[inline(always)]
pub(crate) fn dot16(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let cx = x.chunks_exact(16);
    let cy = y.chunks_exact(16);
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for j in 0..16 {
            acc[j] += a[j] * b[j];
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for (a, b) in rx.iter().zip(ry) {
        s += a * b;
    }
    s
}

/// Dot product of long vectors: fixed 4096-element blocks (in parallel), each block's sum
/// converted to f64, blocks added in order — the same bits for any thread count.
pub(crate) fn dot_f64(x: &[f32], y: &[f32]) -> f64 {
    if x.len() <= 4096 {
        return simd(
            #[inline(always)]
            || dot16(x, y),
        ) as f64;
    }
    let parts: Vec<f64> = x
        .par_chunks(4096)
        .zip(y.par_chunks(4096))
        .map(|(a, b)| {
            simd(
                #[inline(always)]
                || dot16(a, b),
            ) as f64
        })
        .collect();
    parts.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let (a, e) = (fast_exp(x), x.exp());
            assert!(((a - e) / e).abs() < 3e-7, "exp({x}) = {a} vs {e}");
            x += 0.0137;
        }
        assert_eq!(fast_exp(-1e9), fast_exp(-87.3));
        assert!(fast_exp(1e9).is_finite());
    }
}
