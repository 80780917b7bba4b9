//! Logit drift between two forward passes of the same batch (before and after an expansion,
//! or across the `η` ramp): how far the model's predictions moved.
//!
//! For each position `p` with logit rows `a_p`, `b_p ∈ ℝ^V`:
//! `l2_p = ‖a_p − b_p‖₂` and `cos_p = max(0, 1 − a_p·b_p / (‖a_p‖₂ ‖b_p‖₂))`
//! (the denominator floored at `1e-30`); [`Drift`] holds their mean and population standard
//! deviation over positions. Identical logits give all zeros.

use serde::Serialize;

use super::diagnostics::stats;

/// Mean and standard deviation over positions of the L2 and cosine distances of logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Drift {
    pub l2_mean: f64,
    pub l2_std: f64,
    pub cos_dist_mean: f64,
    pub cos_dist_std: f64,
}

/// Drift of `after` against `before`, both `[positions, v]` row-major (accumulated in f64).
pub fn drift(before: &[f32], after: &[f32], v: usize) -> Drift {
    let mut l2 = Vec::new();
    let mut cos = Vec::new();
    for (a, b) in before.chunks(v).zip(after.chunks(v)) {
        let (mut d, mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            d += (x - y) * (x - y);
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        l2.push(d.sqrt());
        let denom = (aa.sqrt() * bb.sqrt()).max(1e-30);
        cos.push((1.0 - ab / denom).max(0.0));
    }
    let s1 = stats(&l2);
    let s2 = stats(&cos);
    Drift {
        l2_mean: s1.mean,
        l2_std: s1.std,
        cos_dist_mean: s2.mean,
        cos_dist_std: s2.std,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_zero_for_identical_logits_and_positive_otherwise() {
        let a = vec![1.0, 2.0, 3.0, 4.0];
        let d = drift(&a, &a, 2);
        assert_eq!((d.l2_mean, d.l2_std), (0.0, 0.0));
        assert!(d.cos_dist_mean.abs() < 1e-12 && d.cos_dist_std.abs() < 1e-12);
        let b = vec![1.0, 2.0, 3.0, 5.0];
        let d = drift(&a, &b, 2);
        // Position 0 unchanged, position 1 moved by 1: mean 0.5, std 0.5.
        assert!((d.l2_mean - 0.5).abs() < 1e-12);
        assert!((d.l2_std - 0.5).abs() < 1e-12);
        assert!(d.cos_dist_mean > 0.0);
    }

    #[test]
    fn opposite_logits_have_cosine_distance_two() {
        let a = vec![1.0, 0.0];
        let b = vec![-1.0, 0.0];
        let d = drift(&a, &b, 2);
        assert!((d.cos_dist_mean - 2.0).abs() < 1e-12);
        assert!((d.l2_mean - 2.0).abs() < 1e-12);
    }
}
