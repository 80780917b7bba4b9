//! What a soak's samples say: memory and descriptors after warm-up, growth slope, rates.

use serde::Serialize;

/// One observation of the daemon.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the daemon answered its first `ping`.
    pub t_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Trainer step (`None` before the model exists, or when the trainer's status section
    /// was unavailable at that moment).
    pub step: Option<u64>,
    /// Tokens/s of the trainer's last step (`None` as `step`).
    pub tokens_per_sec: Option<f64>,
    /// Rows in the replay store (`None` when its section was unavailable).
    pub replay_rows: Option<u64>,
}

/// Least-squares slope of `y` over `x`: `Σ(x-x̄)(y-ȳ) / Σ(x-x̄)²`; `None` with fewer than two
/// distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The samples summarised around the end of warm-up (`warmup_s`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Samples taken after warm-up.
    pub samples_after_warmup: usize,
    /// RSS at the first sample after warm-up, KiB.
    pub rss_warmup_kib: u64,
    /// RSS at the last sample, KiB.
    pub rss_final_kib: u64,
    /// Largest RSS of any sample, KiB.
    pub rss_max_kib: u64,
    /// Least-squares slope of RSS over time after warm-up, KiB per minute.
    pub rss_growth_kib_per_min: Option<f64>,
    /// The same slope over the later half of the samples after warm-up (whether growth goes
    /// on or has levelled off).
    pub rss_growth_kib_per_min_later_half: Option<f64>,
    /// (final − warm-up) / warm-up RSS, percent.
    pub rss_growth_pct: f64,
    /// Descriptors at the first sample after warm-up and at the last one; range after warm-up.
    pub fds_warmup: u64,
    pub fds_final: u64,
    pub fds_min_after_warmup: u64,
    pub fds_max_after_warmup: u64,
    /// Steps per second between the first and the last sample after warm-up with a step.
    pub steps_per_sec_after_warmup: Option<f64>,
    /// Mean of the sampled tokens/s after warm-up.
    pub tokens_per_sec_mean_after_warmup: Option<f64>,
}

/// Summarises `samples` (in time order); `None` when no sample comes after warm-up.
pub fn summarize(samples: &[Sample], warmup_s: f64) -> Option<Summary> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= warmup_s).collect();
    let (first, last) = (*after.first()?, *after.last()?);
    let points: Vec<(f64, f64)> = after
        .iter()
        .map(|s| (s.t_s / 60.0, s.rss_kib as f64))
        .collect();
    let stepped: Vec<(f64, u64)> = after
        .iter()
        .filter_map(|s| s.step.map(|k| (s.t_s, k)))
        .collect();
    let steps_per_sec = match (stepped.first(), stepped.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => Some(b.1.saturating_sub(a.1) as f64 / (b.0 - a.0)),
        _ => None,
    };
    let rates: Vec<f64> = after.iter().filter_map(|s| s.tokens_per_sec).collect();
    Some(Summary {
        samples_after_warmup: after.len(),
        rss_warmup_kib: first.rss_kib,
        rss_final_kib: last.rss_kib,
        rss_max_kib: samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
        rss_growth_kib_per_min: slope(&points),
        rss_growth_kib_per_min_later_half: slope(&points[points.len() / 2..]),
        rss_growth_pct: 100.0 * (last.rss_kib as f64 - first.rss_kib as f64)
            / (first.rss_kib.max(1) as f64),
        fds_warmup: first.fds,
        fds_final: last.fds,
        fds_min_after_warmup: after.iter().map(|s| s.fds).min().unwrap_or(0),
        fds_max_after_warmup: after.iter().map(|s| s.fds).max().unwrap_or(0),
        steps_per_sec_after_warmup: steps_per_sec,
        tokens_per_sec_mean_after_warmup: (!rates.is_empty())
            .then(|| rates.iter().sum::<f64>() / rates.len() as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, rss_kib: u64, fds: u64, step: u64) -> Sample {
        Sample {
            t_s,
            rss_kib,
            fds,
            step: Some(step),
            tokens_per_sec: Some(100.0 + step as f64),
            replay_rows: None,
        }
    }

    #[test]
    fn slope_of_a_line_and_degenerate_inputs() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 7.0)).collect();
        assert!((slope(&pts).unwrap() - 3.0).abs() < 1e-12);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn summary_ignores_warmup_and_measures_growth_per_minute() {
        // Warm-up climbs 1000 → 5000 KiB; afterwards +60 KiB per minute (1 KiB/s).
        let mut s = vec![sample(0.0, 1000, 10, 0), sample(30.0, 5000, 12, 50)];
        for i in 0..=6 {
            let t = 60.0 + 10.0 * i as f64;
            s.push(sample(t, 5000 + 10 * i, 14 + (i % 2), 100 + 20 * i));
        }
        let m = summarize(&s, 60.0).unwrap();
        assert_eq!(m.samples_after_warmup, 7);
        assert_eq!(
            (m.rss_warmup_kib, m.rss_final_kib, m.rss_max_kib),
            (5000, 5060, 5060)
        );
        assert!((m.rss_growth_kib_per_min.unwrap() - 60.0).abs() < 1e-9);
        assert!((m.rss_growth_kib_per_min_later_half.unwrap() - 60.0).abs() < 1e-9);
        assert!((m.rss_growth_pct - 1.2).abs() < 1e-9);
        assert_eq!((m.fds_warmup, m.fds_final), (14, 14));
        assert_eq!((m.fds_min_after_warmup, m.fds_max_after_warmup), (14, 15));
        assert!((m.steps_per_sec_after_warmup.unwrap() - 2.0).abs() < 1e-9);
        assert!((m.tokens_per_sec_mean_after_warmup.unwrap() - 260.0).abs() < 1e-9);
        assert_eq!(summarize(&s, 1000.0), None);
        // A sample whose status was unavailable counts for memory, not for rates.
        s.push(Sample {
            t_s: 130.0,
            step: None,
            tokens_per_sec: None,
            ..sample(130.0, 5070, 14, 0)
        });
        let m = summarize(&s, 60.0).unwrap();
        assert_eq!(m.rss_final_kib, 5070);
        // Later half: 100, 110, 120, 130 s at 5040, 5050, 5060, 5070 KiB.
        let later = m.rss_growth_kib_per_min_later_half.unwrap();
        assert!((later - 60.0).abs() < 1e-9, "{later}");
        assert!((m.steps_per_sec_after_warmup.unwrap() - 2.0).abs() < 1e-9);
    }
}
