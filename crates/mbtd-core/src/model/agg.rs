//! Branch aggregation weights with expansion groups.
//!
//! The `K` branches of a layer are split into contiguous groups `g = 0..G` (group 0 holds
//! the original branches; each expansion appends one group). Group `g` has a share
//! `w_g` and an in-group weight from the anti-collapse floor and the learned logits `s`:
//!
//! `a_i = floor/K_g + (1-floor)·softmax_{j∈g}(s)_i`, `α_i = w_{g(i)}·a_i`,
//!
//! with `w_{G-1} = η_{G-1}`, `w_g = η_g·Π_{g'>g}(1-η_{g'})` and `η_0 = 1`, so `Σ α_i = 1`.
//! With one group this is exactly `α_i = floor/K + (1-floor)·softmax(s)_i`. A new group
//! enters with `η = 0`: every older `α_i` is then computed with the same operations and
//! factors `1·…` as before, so the function is bitwise unchanged. `η` is not trained;
//! [`crate::model::Trainer::set_eta`] ramps it. Stored as `layers.{l}.agg.group_start`
//! (I64 `[G]`, first branch of each group) and `layers.{l}.agg.group_eta` (F32 `[G]`).
//!
//! Masked renormalisation: `α̃_i = m_i α_i / Σ_j m_j α_j` (`S = Σ_j m_j α_j`). When every
//! active branch has `α = 0` (only new, `η = 0` branches active) the active branches get
//! equal weights and no gradient reaches `s`.
//!
//! Gradients (`g_i = ∂L/∂α̃_i = ⟨∂L/∂h', z_i⟩`): `∂L/∂α_i = m_i (g_i - Σ_j α̃_j g_j)/S`,
//! `∂L/∂a_i = w_g ∂L/∂α_i`, `∂L/∂s_i = (1-floor)·p_i (∂L/∂a_i - Σ_{j∈g} p_j ∂L/∂a_j)`.

use serde::{Deserialize, Serialize};

/// Expansion groups of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggGroups {
    /// First branch index of each group; `start[0] = 0`, strictly increasing.
    pub start: Vec<usize>,
    /// `η` of each group; `eta[0]` is unused and kept at 1.
    pub eta: Vec<f32>,
}

impl AggGroups {
    /// One group holding every branch.
    pub fn single() -> Self {
        Self {
            start: vec![0],
            eta: vec![1.0],
        }
    }

    /// Checks the groups against the layer width `k`.
    pub fn validate(&self, k: usize) -> Result<(), String> {
        if self.start.is_empty() || self.start.len() != self.eta.len() || self.start[0] != 0 {
            return Err(format!(
                "group_start {:?} / group_eta {:?}: need equal non-empty lengths and start[0] = 0",
                self.start, self.eta
            ));
        }
        if self.start.windows(2).any(|w| w[0] >= w[1]) || *self.start.last().unwrap_or(&0) >= k {
            return Err(format!(
                "group_start {:?}: must be strictly increasing and below the width {k}",
                self.start
            ));
        }
        if self.eta.iter().any(|e| !(0.0..=1.0).contains(e)) {
            return Err(format!(
                "group_eta {:?}: every η must be in [0, 1]",
                self.eta
            ));
        }
        Ok(())
    }

    /// Branch range of group `g` in a layer of width `k`.
    pub fn range(&self, g: usize, k: usize) -> std::ops::Range<usize> {
        self.start[g]..self.start.get(g + 1).copied().unwrap_or(k)
    }

    /// Share `w_g` of each group, written to `w`.
    fn shares(&self, w: &mut [f32]) {
        let mut rem = 1.0f32;
        for g in (0..self.start.len()).rev() {
            if g == 0 {
                w[0] = rem;
            } else {
                w[g] = rem * self.eta[g];
                rem *= 1.0 - self.eta[g];
            }
        }
    }
}

/// Maximum number of groups handled without allocation.
const MAX_GROUPS: usize = 64;

/// Computes `α` (length `K`) from logits `s`, and the in-group softmax `p` when given.
pub fn alphas(alpha: &mut [f32], p: &mut [f32], s: &[f32], groups: &AggGroups, floor: f32) {
    let k = s.len();
    let mut w = [0.0f32; MAX_GROUPS];
    groups.shares(&mut w[..groups.start.len()]);
    for (g, &wg) in w.iter().enumerate().take(groups.start.len()) {
        let r = groups.range(g, k);
        let kg = r.len() as f32;
        let mx = s[r.clone()]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut z = 0.0;
        for i in r.clone() {
            p[i] = (s[i] - mx).exp();
            z += p[i];
        }
        for i in r {
            p[i] /= z;
            alpha[i] = wg * (floor / kg + (1.0 - floor) * p[i]);
        }
    }
}

/// Masked renormalisation `α̃ = m·α / Σ m·α` into `out`; returns `S = Σ m·α`.
pub fn renormalise(out: &mut [f32], alpha: &[f32], mask: &[bool]) -> f32 {
    let mut s = 0.0f32;
    for (&a, &m) in alpha.iter().zip(mask) {
        if m {
            s += a;
        }
    }
    let n_active = mask.iter().filter(|&&m| m).count() as f32;
    for ((o, &a), &m) in out.iter_mut().zip(alpha).zip(mask) {
        *o = if !m {
            0.0
        } else if s > 0.0 {
            a / s
        } else {
            1.0 / n_active
        };
    }
    s
}

/// Gradient of the logits `s` (written to `ds`) from `g_i = ∂L/∂α̃_i` of the active
/// branches (`g` ignored where inactive). `p` is the in-group softmax from [`alphas`].
#[allow(clippy::too_many_arguments)]
pub fn logits_grad(
    ds: &mut [f32],
    g: &[f32],
    alpha: &[f32],
    alpha_tilde: &[f32],
    p: &[f32],
    mask: &[bool],
    groups: &AggGroups,
    floor: f32,
) {
    let k = ds.len();
    ds.fill(0.0);
    let s: f32 = alpha
        .iter()
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|(a, _)| *a)
        .sum();
    if s <= 0.0 {
        return;
    }
    let mean_g: f32 = (0..k)
        .filter(|&i| mask[i])
        .map(|i| alpha_tilde[i] * g[i])
        .sum();
    let mut w = [0.0f32; MAX_GROUPS];
    groups.shares(&mut w[..groups.start.len()]);
    for (gi, &wg) in w.iter().enumerate().take(groups.start.len()) {
        let r = groups.range(gi, k);
        let da = |i: usize| {
            if mask[i] {
                wg * (g[i] - mean_g) / s
            } else {
                0.0
            }
        };
        let inner: f32 = r.clone().map(|j| p[j] * da(j)).sum();
        for i in r {
            ds[i] = (1.0 - floor) * p[i] * (da(i) - inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objective(s: &[f32], groups: &AggGroups, mask: &[bool], g: &[f32]) -> f64 {
        let k = s.len();
        let (mut a, mut p, mut t) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
        alphas(&mut a, &mut p, s, groups, 0.2);
        renormalise(&mut t, &a, mask);
        t.iter().zip(g).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    #[test]
    fn single_group_is_the_plain_formula_and_sums_to_one() {
        let s = [0.3f32, -1.0, 2.0, 0.0];
        let (mut a, mut p) = ([0.0; 4], [0.0; 4]);
        alphas(&mut a, &mut p, &s, &AggGroups::single(), 0.2);
        let z: f32 = s.iter().map(|x| x.exp()).sum();
        for i in 0..4 {
            assert!((a[i] - (0.05 + 0.8 * s[i].exp() / z)).abs() < 1e-6);
        }
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn new_group_at_eta_zero_leaves_old_weights_bitwise() {
        let s = [0.3f32, -1.0, 2.0];
        let (mut a, mut p) = ([0.0; 3], [0.0; 3]);
        alphas(&mut a, &mut p, &s, &AggGroups::single(), 0.2);
        let s2 = [0.3f32, -1.0, 2.0, 0.0, 0.0];
        let groups = AggGroups {
            start: vec![0, 3],
            eta: vec![1.0, 0.0],
        };
        let (mut a2, mut p2) = ([0.0; 5], [0.0; 5]);
        alphas(&mut a2, &mut p2, &s2, &groups, 0.2);
        assert_eq!(a.map(f32::to_bits), [a2[0], a2[1], a2[2]].map(f32::to_bits));
        assert_eq!(&a2[3..], &[0.0, 0.0]);
        let groups = AggGroups {
            start: vec![0, 3],
            eta: vec![1.0, 0.25],
        };
        alphas(&mut a2, &mut p2, &s2, &groups, 0.2);
        assert!((a2[3] + a2[4] - 0.25).abs() < 1e-6);
        assert!((a2.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn logits_gradient_matches_finite_differences() {
        let groups = AggGroups {
            start: vec![0, 3, 5],
            eta: vec![1.0, 0.3, 0.2],
        };
        let g = [0.7f32, -0.2, 1.1, 0.4, -0.9, 0.5];
        let mut s = vec![0.1f32, -0.5, 0.9, 0.2, -0.3, 0.6];
        for mask in [[true; 6], [true, false, true, true, false, true]] {
            let (mut a, mut p, mut t, mut ds) =
                (vec![0.0; 6], vec![0.0; 6], vec![0.0; 6], vec![0.0; 6]);
            alphas(&mut a, &mut p, &s, &groups, 0.2);
            renormalise(&mut t, &a, &mask);
            logits_grad(&mut ds, &g, &a, &t, &p, &mask, &groups, 0.2);
            for i in 0..6 {
                let old = s[i];
                s[i] = old + 1e-2;
                let fp = objective(&s, &groups, &mask, &g);
                s[i] = old - 1e-2;
                let fm = objective(&s, &groups, &mask, &g);
                s[i] = old;
                let num = (fp - fm) / 2e-2;
                assert!(
                    (num - ds[i] as f64).abs() < 1e-4,
                    "s[{i}]: {num} vs {}",
                    ds[i]
                );
            }
        }
    }

    #[test]
    fn validate_rejects_bad_groups() {
        assert!(AggGroups::single().validate(3).is_ok());
        assert!(
            AggGroups {
                start: vec![0, 3],
                eta: vec![1.0, 0.0]
            }
            .validate(3)
            .is_err()
        );
        assert!(
            AggGroups {
                start: vec![1],
                eta: vec![1.0]
            }
            .validate(3)
            .is_err()
        );
        assert!(
            AggGroups {
                start: vec![0, 1],
                eta: vec![1.0, 1.5]
            }
            .validate(3)
            .is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn weights_are_a_distribution_over_active_branches(
            s in proptest::collection::vec(-8.0f32..8.0, 1..12),
            split in 0usize..12,
            eta in 0.0f32..=1.0,
            floor in 0.0f32..=1.0,
            mask_bits in 0u32..4096,
        ) {
            let k = s.len();
            let groups = if split > 0 && split < k {
                AggGroups { start: vec![0, split], eta: vec![1.0, eta] }
            } else {
                AggGroups::single()
            };
            proptest::prop_assert!(groups.validate(k).is_ok());
            let mut mask: Vec<bool> = (0..k).map(|i| mask_bits >> i & 1 == 1).collect();
            if !mask.iter().any(|&m| m) {
                mask[0] = true;
            }
            let (mut a, mut p, mut t) = (vec![0.0; k], vec![0.0; k], vec![0.0; k]);
            alphas(&mut a, &mut p, &s, &groups, floor);
            proptest::prop_assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            proptest::prop_assert!(a.iter().all(|&x| x >= 0.0));
            renormalise(&mut t, &a, &mask);
            proptest::prop_assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            proptest::prop_assert!(t.iter().zip(&mask).all(|(&x, &m)| m || x == 0.0));
        }
    }
}
