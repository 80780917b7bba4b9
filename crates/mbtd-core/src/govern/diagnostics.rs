//! Per-layer diagnostics of the branches of an MBT layer (metric names are the interface).
//!
//! Inputs for one layer with `K` branches: the output energies `e_i = mean(z_i²)` of every
//! branch on the batch, the `K×K` cosine matrix `c_ij` of the flattened branch outputs, the
//! active mask `m_i`, and how often each branch was active (`n_i`). Only active branches
//! enter the energy-based measures; `A` is the set of active branches, `K_a = |A|`.
//!
//! * `p = softmax(e)` over `A`, `H = -Σ_{i∈A} p_i ln p_i` (nats).
//! * `path_starvation_index = 1 - H / ln K_a`, in `[0, 1]`; `0` when `K_a ≤ 1` (no other path
//!   can starve). 0: energy spread evenly; 1: one branch carries everything.
//! * `effective_num_paths = exp(H)`, in `[1, K_a]`.
//! * `gini_concentration = Σ_{i,j∈A} |p_i - p_j| / (2 K_a² p̄)` with `p̄ = 1/K_a`, i.e.
//!   `Σ|p_i - p_j| / (2 K_a)`; `0` when even, `(K_a-1)/K_a` when one-hot.
//! * `top1_share = max p`; `margin_top1_top2 = p_(1) - p_(2)` (`1` when `K_a = 1`).
//! * `diversity_cosine_distance_mean = mean_{i<j∈A} (1 - c_ij)`; `0` when `K_a < 2`.
//! * `branch_correlation_mean = mean_{i<j∈A} c_ij`; `1` when `K_a < 2` (a lone branch is
//!   perfectly correlated with itself).
//! * `output_energy_cv = std(e_A) / mean(e_A)` (population std); `0` if the mean is `0`.
//! * `branch_select_gini` = Gini of the activation counts `n` over all `K` branches
//!   (`Σ_{i,j}|n_i - n_j| / (2 K² n̄)`, `0` if all counts are 0);
//!   `branch_select_top1_share = max n / Σ n` (`0` if `Σ n = 0`).

use serde::{Deserialize, Serialize};

/// Mean, population standard deviation, min and max of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Arithmetic mean (`0` for an empty sample).
    pub mean: f64,
    /// Population standard deviation `sqrt(mean((x - mean)²))`.
    pub std: f64,
    /// Smallest value (`0` for an empty sample).
    pub min: f64,
    /// Largest value (`0` for an empty sample).
    pub max: f64,
}

/// Arithmetic mean; `0` for an empty slice.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Population standard deviation `sqrt(mean((x - mean)²))`; `0` for an empty slice.
pub fn std_dev(xs: &[f64]) -> f64 {
    let m = mean(xs);
    mean(&xs.iter().map(|x| (x - m) * (x - m)).collect::<Vec<_>>()).sqrt()
}

/// [`Stats`] of a sample (all zero for an empty one).
pub fn stats(xs: &[f64]) -> Stats {
    if xs.is_empty() {
        return Stats {
            mean: 0.0,
            std: 0.0,
            min: 0.0,
            max: 0.0,
        };
    }
    Stats {
        mean: mean(xs),
        std: std_dev(xs),
        min: xs.iter().copied().fold(f64::INFINITY, f64::min),
        max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// Gini coefficient `Σ_{i,j}|x_i - x_j| / (2 n² x̄)` of non-negative values; `0` when the
/// slice is empty or sums to 0.
pub fn gini(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let total: f64 = xs.iter().sum();
    if xs.is_empty() || total <= 0.0 {
        return 0.0;
    }
    let abs_diff: f64 = xs
        .iter()
        .map(|a| xs.iter().map(|b| (a - b).abs()).sum::<f64>())
        .sum();
    abs_diff / (2.0 * n * total)
}

/// Numerically stable softmax (`exp(x_i - max x) / Σ`); empty in, empty out.
pub fn softmax(xs: &[f64]) -> Vec<f64> {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = xs.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = ex.iter().sum();
    ex.into_iter().map(|e| e / s).collect()
}

/// Branch output energy `mean(z²)` of one branch's output (`0` for an empty output).
pub fn energy(z: &[f32]) -> f64 {
    if z.is_empty() {
        0.0
    } else {
        z.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / z.len() as f64
    }
}

/// `K×K` row-major cosine matrix of the flattened branch outputs (all of equal length).
/// A zero vector has cosine 0 with everything but itself (1 on the diagonal).
pub fn cosine_matrix(outputs: &[&[f32]]) -> Vec<f64> {
    let k = outputs.len();
    let norms: Vec<f64> = outputs
        .iter()
        .map(|z| {
            z.iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let mut c = vec![0.0; k * k];
    for i in 0..k {
        c[i * k + i] = 1.0;
        for j in i + 1..k {
            let dot: f64 = outputs[i]
                .iter()
                .zip(outputs[j])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let den = norms[i] * norms[j];
            let v = if den > 0.0 {
                (dot / den).clamp(-1.0, 1.0)
            } else {
                0.0
            };
            c[i * k + j] = v;
            c[j * k + i] = v;
        }
    }
    c
}

/// The diagnostics of one layer (see the module doc for the formulas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDiagnostics {
    /// Number of active branches `K_a`.
    pub active: usize,
    /// `p = softmax(e)` over active branches, `0` for inactive ones (length `K`).
    #[serde(with = "super::float_json::vec_nan_as_null")]
    pub energy_share: Vec<f64>,
    /// `H = -Σ p ln p`, nats.
    #[serde(with = "super::float_json::nan_as_null")]
    pub entropy: f64,
    /// `1 - H / ln K_a`.
    #[serde(with = "super::float_json::nan_as_null")]
    pub path_starvation_index: f64,
    /// `exp(H)`.
    #[serde(with = "super::float_json::nan_as_null")]
    pub effective_num_paths: f64,
    /// Gini of `p` over active branches.
    #[serde(with = "super::float_json::nan_as_null")]
    pub gini_concentration: f64,
    /// `max p`.
    #[serde(with = "super::float_json::nan_as_null")]
    pub top1_share: f64,
    /// `p_(1) - p_(2)`.
    #[serde(with = "super::float_json::nan_as_null")]
    pub margin_top1_top2: f64,
    /// Mean `1 - cos` over active pairs.
    #[serde(with = "super::float_json::nan_as_null")]
    pub diversity_cosine_distance_mean: f64,
    /// Mean `cos` over active pairs.
    #[serde(with = "super::float_json::nan_as_null")]
    pub branch_correlation_mean: f64,
    /// `std(e) / mean(e)` over active branches.
    #[serde(with = "super::float_json::nan_as_null")]
    pub output_energy_cv: f64,
    /// Gini of activation counts over all branches.
    #[serde(with = "super::float_json::nan_as_null")]
    pub branch_select_gini: f64,
    /// `max n / Σ n` of activation counts.
    #[serde(with = "super::float_json::nan_as_null")]
    pub branch_select_top1_share: f64,
}

/// Errors: the inputs of one layer do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiagnosticsError {
    /// Lengths differ.
    #[error(
        "diagnostics inputs do not match: {energies} energies, {mask} mask entries, {counts} activation counts, cosine matrix of {cos} values (need K, K, K and K*K)"
    )]
    Shape {
        /// Energies given.
        energies: usize,
        /// Mask entries given.
        mask: usize,
        /// Counts given.
        counts: usize,
        /// Cosine values given.
        cos: usize,
    },
}

/// Computes [`LayerDiagnostics`] from energies `e` (length `K`), the row-major `K×K` cosine
/// matrix, the active mask and the activation counts (both length `K`).
pub fn layer_diagnostics(
    energies: &[f64],
    cosine: &[f64],
    active: &[bool],
    counts: &[u64],
) -> Result<LayerDiagnostics, DiagnosticsError> {
    let k = energies.len();
    if active.len() != k || counts.len() != k || cosine.len() != k * k {
        return Err(DiagnosticsError::Shape {
            energies: k,
            mask: active.len(),
            counts: counts.len(),
            cos: cosine.len(),
        });
    }
    let idx: Vec<usize> = (0..k).filter(|&i| active[i]).collect();
    let ka = idx.len();
    let e_act: Vec<f64> = idx.iter().map(|&i| energies[i]).collect();
    let p = softmax(&e_act);
    let entropy: f64 = -p
        .iter()
        .filter(|&&x| x != 0.0)
        .map(|x| x * x.ln())
        .sum::<f64>();
    let mut energy_share = vec![0.0; k];
    for (&i, &pi) in idx.iter().zip(&p) {
        energy_share[i] = pi;
    }
    let mut sorted = p.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let top1 = sorted.first().copied().unwrap_or(0.0);
    let top2 = sorted.get(1).copied().unwrap_or(0.0);
    let pairs: Vec<f64> = idx
        .iter()
        .enumerate()
        .flat_map(|(a, &i)| idx[a + 1..].iter().map(move |&j| cosine[i * k + j]))
        .collect();
    let (diversity, correlation) = if pairs.is_empty() {
        (0.0, 1.0)
    } else {
        (
            mean(&pairs.iter().map(|c| 1.0 - c).collect::<Vec<_>>()),
            mean(&pairs),
        )
    };
    let e_mean = mean(&e_act);
    let counts_f: Vec<f64> = counts.iter().map(|&n| n as f64).collect();
    let count_total: f64 = counts_f.iter().sum();
    Ok(LayerDiagnostics {
        active: ka,
        energy_share,
        entropy,
        path_starvation_index: if ka <= 1 {
            0.0
        } else {
            (1.0 - entropy / (ka as f64).ln()).clamp(0.0, 1.0)
        },
        effective_num_paths: if ka == 0 { 0.0 } else { entropy.exp() },
        gini_concentration: gini(&p),
        top1_share: top1,
        margin_top1_top2: top1 - top2,
        diversity_cosine_distance_mean: diversity,
        branch_correlation_mean: correlation,
        output_energy_cv: if e_mean.abs() > 0.0 {
            std_dev(&e_act) / e_mean
        } else {
            0.0
        },
        branch_select_gini: gini(&counts_f),
        branch_select_top1_share: if count_total > 0.0 {
            counts_f.iter().copied().fold(0.0, f64::max) / count_total
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn identity_cos(k: usize) -> Vec<f64> {
        (0..k * k)
            .map(|x| if x / k == x % k { 1.0 } else { 0.0 })
            .collect()
    }

    #[test]
    fn stats_helpers() {
        assert_eq!(mean(&[]), 0.0);
        assert!(close(mean(&[1.0, 2.0, 3.0, 4.0]), 2.5));
        // Population std of 1..4: sqrt(1.25).
        assert!(close(std_dev(&[1.0, 2.0, 3.0, 4.0]), 1.25f64.sqrt()));
        let s = stats(&[3.0, -1.0, 2.0]);
        assert_eq!((s.min, s.max), (-1.0, 3.0));
        assert!(close(s.mean, 4.0 / 3.0));
        assert!(close(gini(&[1.0, 1.0, 1.0]), 0.0));
        // One-hot over n: (n-1)/n.
        assert!(close(gini(&[0.0, 0.0, 0.0, 5.0]), 0.75));
        // [1, 3]: Σ|d| = 2·2 = 4, 2·n²·mean = 2·4·2 = 16.
        assert!(close(gini(&[1.0, 3.0]), 0.25));
        let sm = softmax(&[0.0, 2f64.ln()]);
        assert!(close(sm[0], 1.0 / 3.0) && close(sm[1], 2.0 / 3.0));
        assert!(close(energy(&[1.0, -2.0, 2.0, 0.0]), 9.0 / 4.0));
    }

    #[test]
    fn equal_energies_are_not_starved() {
        let d = layer_diagnostics(&[2.0; 4], &identity_cos(4), &[true; 4], &[5; 4]).unwrap();
        assert!(close(d.entropy, 4f64.ln()));
        assert!(close(d.path_starvation_index, 0.0));
        assert!(close(d.effective_num_paths, 4.0));
        assert!(close(d.gini_concentration, 0.0));
        assert!(close(d.top1_share, 0.25) && close(d.margin_top1_top2, 0.0));
        assert!(close(d.diversity_cosine_distance_mean, 1.0));
        assert!(close(d.branch_correlation_mean, 0.0));
        assert!(close(d.output_energy_cv, 0.0));
        assert!(close(d.branch_select_gini, 0.0) && close(d.branch_select_top1_share, 0.25));
    }

    #[test]
    fn hand_computed_two_of_three_active() {
        // Active 0 and 2 with e = [0, ln 3]: p = [1/4, 3/4].
        let e = [0.0, 100.0, 3f64.ln()];
        let cos = vec![1.0, 0.9, 0.5, 0.9, 1.0, 0.1, 0.5, 0.1, 1.0];
        let d = layer_diagnostics(&e, &cos, &[true, false, true], &[10, 0, 30]).unwrap();
        let h = -(0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert_eq!(d.active, 2);
        assert!(
            close(d.energy_share[0], 0.25)
                && d.energy_share[1] == 0.0
                && close(d.energy_share[2], 0.75)
        );
        assert!(close(d.entropy, h));
        assert!(close(d.path_starvation_index, 1.0 - h / 2f64.ln()));
        assert!(close(d.effective_num_paths, h.exp()));
        // Σ|p_i - p_j| = 2·0.5 = 1, / (2·2) = 0.25.
        assert!(close(d.gini_concentration, 0.25));
        assert!(close(d.top1_share, 0.75) && close(d.margin_top1_top2, 0.5));
        // Only the active pair (0, 2) with cos 0.5 counts; the inactive branch's 0.9 does not.
        assert!(close(d.diversity_cosine_distance_mean, 0.5));
        assert!(close(d.branch_correlation_mean, 0.5));
        // e_A = [0, ln3]: mean ln3/2, std ln3/2 → cv 1.
        assert!(close(d.output_energy_cv, 1.0));
        // counts [10, 0, 30]: Σ|d| = 2·(10 + 20 + 30) = 120, 2·9·(40/3) = 240.
        assert!(close(d.branch_select_gini, 0.5));
        assert!(close(d.branch_select_top1_share, 0.75));
    }

    #[test]
    fn single_active_branch_and_extremes() {
        let d = layer_diagnostics(&[5.0, 1.0], &identity_cos(2), &[true, false], &[0, 0]).unwrap();
        assert_eq!(d.active, 1);
        assert_eq!(d.path_starvation_index, 0.0);
        assert!(close(d.effective_num_paths, 1.0));
        assert!(close(d.top1_share, 1.0) && close(d.margin_top1_top2, 1.0));
        assert_eq!(d.diversity_cosine_distance_mean, 0.0);
        assert_eq!(d.branch_correlation_mean, 1.0);
        assert_eq!(d.branch_select_gini, 0.0);
        assert_eq!(d.branch_select_top1_share, 0.0);
        // Near one-hot energies: starvation near 1, no NaN from huge energies.
        let d =
            layer_diagnostics(&[1000.0, 0.0, 0.0], &identity_cos(3), &[true; 3], &[1; 3]).unwrap();
        assert!(d.path_starvation_index > 0.999 && d.path_starvation_index <= 1.0);
        assert!(close(d.effective_num_paths, 1.0));
        assert!(close(d.gini_concentration, 2.0 / 3.0));
    }

    #[test]
    fn nan_energies_give_nan_metrics_that_still_serialise() {
        let d = layer_diagnostics(&[f64::NAN, 1.0], &identity_cos(2), &[true; 2], &[1, 1]).unwrap();
        assert!(d.entropy.is_nan() && d.effective_num_paths.is_nan());
        let json = serde_json::to_string(&d).unwrap();
        let back: LayerDiagnostics = serde_json::from_str(&json).unwrap();
        assert!(back.path_starvation_index.is_nan());
        assert_eq!(
            back.diversity_cosine_distance_mean,
            d.diversity_cosine_distance_mean
        );
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let err = layer_diagnostics(&[1.0, 2.0], &[1.0], &[true, true], &[1, 1]).unwrap_err();
        assert!(err.to_string().contains("cosine matrix of 1 values"));
    }

    #[test]
    fn cosine_matrix_of_outputs() {
        let a = [1.0f32, 0.0];
        let b = [1.0f32, 1.0];
        let z = [0.0f32, 0.0];
        let c = cosine_matrix(&[&a, &b, &z]);
        assert!(close(c[1], 1.0 / 2f64.sqrt()) && close(c[3], c[1]));
        assert_eq!(c[2], 0.0);
        assert_eq!((c[0], c[4], c[8]), (1.0, 1.0, 1.0));
    }
}
