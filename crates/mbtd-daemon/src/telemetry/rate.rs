//! A sliding-window rate: events (or rows) per second over the last `window`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateWindow {
    window: Duration,
    points: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            points: VecDeque::new(),
        }
    }

    /// Records `n` at `now` and returns the rate per second over the window.
    pub fn add(&mut self, now: Instant, n: u64) -> f64 {
        self.points.push_back((now, n));
        self.rate(now)
    }

    /// Σ n over the window / window seconds.
    pub fn rate(&mut self, now: Instant) -> f64 {
        while let Some(&(t, _)) = self.points.front() {
            if now.duration_since(t) > self.window {
                self.points.pop_front();
            } else {
                break;
            }
        }
        let total: u64 = self.points.iter().map(|&(_, n)| n).sum();
        total as f64 / self.window.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_only_the_window() {
        let t0 = Instant::now();
        let mut r = RateWindow::new(Duration::from_secs(10));
        assert_eq!(r.add(t0, 50), 5.0);
        assert_eq!(r.add(t0 + Duration::from_secs(5), 50), 10.0);
        assert_eq!(r.rate(t0 + Duration::from_secs(12)), 5.0);
        assert_eq!(r.rate(t0 + Duration::from_secs(30)), 0.0);
    }
}
