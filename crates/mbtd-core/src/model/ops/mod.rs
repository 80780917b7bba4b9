//! Tensor kernels on fp32 row-major slices, each with its hand-written gradient.
//!
//! Determinism: every reduction has a fixed order that does not depend on the number
//! of rayon threads (parallel loops split rows or columns into fixed-size chunks and
//! never reduce across chunks in a thread-dependent order). `gemm` splits only the
//! output among threads, so its results do not depend on the thread count either.
//!
//! One file per op family, each stating its maths and shapes:
//! [`gemm`] (matrix products), [`bf16`] (bf16 products with fp32 accumulation), [`linear`],
//! [`norm`] (LayerNorm), [`activation`] (GELU), [`loss`] (softmax cross-entropy),
//! [`embedding`], [`rope`] (rotary positions), [`time2vec`] (arrival-time embedding),
//! [`dropout`], [`reduce`] (weighted sums,
//! column sums), [`simd`] (vector dispatch and lane-wise reductions) and [`profile`].

pub mod activation;
pub mod bf16;
#[cfg(target_arch = "x86_64")]
mod bf16_avx512;
pub mod dropout;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod profile;
pub mod reduce;
pub mod rope;
pub mod simd;
pub mod time2vec;

pub use activation::gelu_fwd;
pub(crate) use activation::{bias_gelu_fwd, gelu_bwd_colsum};
pub use bf16::{Precision, bf16_round, has_avx512_bf16, to_bf16};
pub(crate) use embedding::embed_bwd;
pub use embedding::embed_fwd;
pub(crate) use gemm::{Mat, View, mm_nt, mm_tn, serial_gemm, span};
pub use gemm::{mm, mm_prec};
pub use linear::linear_fwd;
pub(crate) use linear::{linear_bwd, linear_nobias_fwd, residual_linear_fwd};
pub use loss::xent_fwd_bwd;
pub(crate) use norm::layernorm_bwd;
pub use norm::{LN_EPS, layernorm_fwd};
pub use reduce::weighted_sum;
pub(crate) use reduce::{ColSums, scale_colsum};
pub(crate) use simd::{dot_f64, dot16, dot16_padded, max16, sum16_padded};
pub use simd::{fast_exp, simd, sum16};

/// Rows per parallel task in row-wise kernels.
const ROW_CHUNK: usize = 16;

#[cfg(test)]
pub(crate) mod tests {
    use rand::Rng;
    use rand_chacha::ChaCha8Rng;

    pub(crate) fn randv(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-1.0..1.0) * scale)
            .collect()
    }

    /// Central differences of the scalar `f` at `x` for the listed coordinates, in f32
    /// with step `h`; returns `(numeric, index)` pairs.
    pub(crate) fn fd(
        x: &mut [f32],
        idx: &[usize],
        h: f32,
        mut f: impl FnMut(&[f32]) -> f64,
    ) -> Vec<f64> {
        idx.iter()
            .map(|&i| {
                let old = x[i];
                x[i] = old + h;
                let fp = f(x);
                x[i] = old - h;
                let fm = f(x);
                x[i] = old;
                (fp - fm) / (2.0 * h as f64)
            })
            .collect()
    }

    /// Relative error `‖a - n‖ / max(‖n‖, floor)` of analytic vs numeric gradients.
    pub(crate) fn rel_err(analytic: &[f64], numeric: &[f64]) -> f64 {
        let diff: f64 = analytic
            .iter()
            .zip(numeric)
            .map(|(a, n)| (a - n) * (a - n))
            .sum();
        let norm: f64 = numeric.iter().map(|n| n * n).sum();
        diff.sqrt() / norm.sqrt().max(1e-6)
    }

    /// `Σ y_i·w_i` in f64: a scalar objective whose gradient with respect to `y` is `w`.
    pub(crate) fn weighted(y: &[f32], w: &[f32]) -> f64 {
        y.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
    }
}
