//! Inverted dropout with counter-based masks: element `j` of a site with key `κ` is kept
//! with probability `1 − p` and then scaled, `m_j = [u(κ, j) ≥ p] / (1 − p)`, where
//! `u(κ, j) ∈ [0, 1)` is the top 24 bits of `splitmix64(κ + (j+1)·φ)` (`φ` the 64-bit
//! golden ratio). `y = m ⊙ x`, and since the mask is fixed the backward is the same
//! multiplication, `dx = m ⊙ dy`.
//!
//! The mask is a pure function of the key and the element index: it does not depend on
//! the thread count, the order of evaluation or anything kept between steps, so a resumed
//! run draws exactly the masks of an uninterrupted one. Keys are derived per training step,
//! layer, branch and site with [`Dropout::at`].
//!
//! # Shapes
//! Element-wise over a slice; `offset` is the index of its first element within the site.

use super::profile;
use rayon::prelude::*;

const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One dropout site: probability and key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Drop probability `p` in `(0, 1)`.
    pub p: f32,
    /// Mask key `κ`.
    pub key: u64,
}

impl Dropout {
    /// The site `(seed, step, layer, branch, site)` with drop probability `p`.
    pub fn at(p: f32, seed: u64, step: u64, layer: usize, branch: usize, site: u64) -> Self {
        let mut k = splitmix64(seed ^ PHI);
        for part in [step, layer as u64, branch as u64, site] {
            k = splitmix64(k ^ part.wrapping_mul(PHI));
        }
        Self { p, key: k }
    }

    /// The same probability at another site of the same branch.
    pub fn site(self, site: u64) -> Self {
        Self {
            p: self.p,
            key: splitmix64(self.key ^ site.wrapping_add(1).wrapping_mul(PHI)),
        }
    }

    /// Mask value `m_j` of element `j`: `0` or `1/(1−p)`.
    #[inline(always)]
    pub fn mask(&self, j: usize) -> f32 {
        let u = splitmix64(
            self.key
                .wrapping_add((j as u64).wrapping_add(1).wrapping_mul(PHI)),
        );
        let threshold = (self.p as f64 * (1u64 << 24) as f64) as u64;
        if (u >> 40) < threshold {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

/// `x_j ← m_{offset+j} · x_j` in place (forward, and the backward of the same mask).
///
/// ```
/// use mbtd_core::model::ops::dropout::{Dropout, dropout_apply};
///
/// let site = Dropout::at(0.5, 7, 0, 0, 0, 0);
/// let mut x = vec![1.0f32; 1000];
/// dropout_apply(&mut x, site, 0);
/// let kept = x.iter().filter(|&&v| v == 2.0).count();
/// assert_eq!(kept + x.iter().filter(|&&v| v == 0.0).count(), 1000);
/// assert!((400..600).contains(&kept));
/// // the same key and offsets give the same mask
/// let mut y = vec![1.0f32; 10];
/// dropout_apply(&mut y, site, 990);
/// assert_eq!(y, x[990..]);
/// ```
pub fn dropout_apply(x: &mut [f32], d: Dropout, offset: usize) {
    let _prof = profile::scope(profile::ELEM);
    const CHUNK: usize = 4096;
    x.par_chunks_mut(CHUNK).enumerate().for_each(|(c, xs)| {
        let base = offset + c * CHUNK;
        for (j, v) in xs.iter_mut().enumerate() {
            *v *= d.mask(base + j);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{fd, randv, rel_err, weighted};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn dropout_rate_keys_and_gradient() {
        let d = Dropout::at(0.1, 1, 5, 2, 3, 0);
        let n = 200_000;
        let dropped = (0..n).filter(|&j| d.mask(j) == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "drop rate {dropped}");
        // every part of the key changes the mask
        let base: Vec<f32> = (0..256).map(|j| d.mask(j)).collect();
        for other in [
            Dropout::at(0.1, 2, 5, 2, 3, 0),
            Dropout::at(0.1, 1, 6, 2, 3, 0),
            Dropout::at(0.1, 1, 5, 1, 3, 0),
            Dropout::at(0.1, 1, 5, 2, 4, 0),
            Dropout::at(0.1, 1, 5, 2, 3, 1),
            d.site(0),
        ] {
            assert_ne!(base, (0..256).map(|j| other.mask(j)).collect::<Vec<_>>());
        }
        // the backward of a fixed mask, against finite differences
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let site = Dropout::at(0.3, 4, 0, 0, 0, 2);
        let mut x = randv(&mut rng, 5000, 1.0);
        let w = randv(&mut rng, 5000, 1.0);
        let run = |x: &[f32]| {
            let mut y = x.to_vec();
            dropout_apply(&mut y, site, 17);
            weighted(&y, &w)
        };
        let mut dx = w.clone();
        dropout_apply(&mut dx, site, 17);
        let idx: Vec<usize> = (0..5000).step_by(7).collect();
        let num = fd(&mut x, &idx, 1e-2, run);
        let an: Vec<f64> = idx.iter().map(|&i| dx[i] as f64).collect();
        assert!(rel_err(&an, &num) < 1e-4, "{}", rel_err(&an, &num));
        assert!(an.contains(&0.0) && an.iter().any(|&g| g != 0.0));
    }
}
