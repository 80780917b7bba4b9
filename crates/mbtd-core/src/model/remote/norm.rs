//! Norm control of the outputs hosts return: an output `z` whose root mean square
//! `‖z‖ / √n` is more than `ratio` times the median RMS of the layer's last
//! [`WINDOW`] accepted outputs is *out of line* — masked like a missing output and
//! counted. The median needs [`MIN_SAMPLES`] accepted outputs first; `ratio = 0` turns
//! the check off. Rejected outputs do not enter the window, so a host that keeps sending
//! huge outputs cannot drag the median up.
//!
//! ```
//! use mbtd_core::model::remote::NormGuard;
//! let mut g = NormGuard::new(100.0);
//! for _ in 0..8 {
//!     assert!(g.admit(0, &[1.0, -1.0]).is_ok());
//! }
//! assert!(g.admit(0, &[1e4, 1e4]).is_err()); // RMS 10⁴ > 100 × median 1
//! assert!(g.admit(0, &[50.0, 50.0]).is_ok());
//! ```

use std::collections::VecDeque;

/// Accepted outputs per layer the median is taken over.
pub const WINDOW: usize = 64;
/// Accepted outputs of a layer before the check applies.
pub const MIN_SAMPLES: usize = 8;

/// `sqrt(mean(z²))` in f64 (0 for an empty slice).
pub fn rms(z: &[f32]) -> f64 {
    if z.is_empty() {
        return 0.0;
    }
    (z.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / z.len() as f64).sqrt()
}

/// The running windows of output RMS per layer and the allowed ratio.
#[derive(Debug, Clone, Default)]
pub struct NormGuard {
    ratio: f64,
    windows: Vec<VecDeque<f64>>,
}

impl NormGuard {
    /// A guard rejecting outputs above `ratio` × the layer's running median (0: off).
    pub fn new(ratio: f64) -> Self {
        Self {
            ratio,
            windows: Vec::new(),
        }
    }

    /// Accepts output `z` of layer `l` (it joins the window), or gives its RMS and the
    /// median it was measured against when it is out of line.
    pub fn admit(&mut self, l: usize, z: &[f32]) -> Result<(), (f64, f64)> {
        if self.windows.len() <= l {
            self.windows.resize(l + 1, VecDeque::new());
        }
        let r = rms(z);
        let w = &mut self.windows[l];
        if self.ratio > 0.0 && w.len() >= MIN_SAMPLES {
            let mut s: Vec<f64> = w.iter().copied().collect();
            s.sort_by(f64::total_cmp);
            let median = s[s.len() / 2];
            if r > self.ratio * median {
                return Err((r, median));
            }
        }
        if w.len() == WINDOW {
            w.pop_front();
        }
        w.push_back(r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_waits_for_samples_and_follows_the_median() {
        let mut g = NormGuard::new(10.0);
        // before MIN_SAMPLES anything goes (and counts)
        for k in 0..MIN_SAMPLES {
            assert!(g.admit(1, &[1.0 + k as f32 * 0.01]).is_ok());
        }
        let (r, median) = g.admit(1, &[20.0]).unwrap_err();
        assert_eq!(r, 20.0);
        assert!((median - 1.04).abs() < 1e-6, "{median}");
        assert!(g.admit(1, &[9.0]).is_ok(), "within 10 × the median");
        // rejected outputs do not move the median; layers are separate
        for _ in 0..WINDOW {
            assert!(g.admit(1, &[100.0]).is_err());
        }
        assert!(g.admit(1, &[9.0]).is_ok());
        assert!(g.admit(0, &[1e6]).is_ok());
        let mut g = NormGuard::new(10.0);
        for k in 0..WINDOW * 2 {
            assert!(
                g.admit(0, &[1.0 + k as f32]).is_ok(),
                "steady growth passes"
            );
        }
        assert_eq!(g.windows[0].len(), WINDOW);
    }

    #[test]
    fn ratio_zero_is_off_and_rms_is_exact() {
        let mut g = NormGuard::new(0.0);
        for _ in 0..MIN_SAMPLES {
            g.admit(0, &[1.0]).unwrap();
        }
        assert!(g.admit(0, &[1e30]).is_ok());
        assert_eq!(rms(&[3.0, -4.0]), (12.5f64).sqrt());
        assert_eq!(rms(&[]), 0.0);
    }
}
