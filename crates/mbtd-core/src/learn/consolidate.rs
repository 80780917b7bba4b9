//! Consolidation: how fast the trainer keeps stepping on replay once every new row has been
//! trained on.
//!
//! Replay steps are worth their CPU while the held-out control loss still falls, and turn
//! into overfitting once it does not. The policy, fed the overall control loss `c_k` of each
//! scheduled evaluation `k`:
//!
//! - **full** speed (no wait between steps, or `training.max_idle_steps_per_min` where set,
//!   a CPU cap for shared hosts) while `c_k` improves: `c_k < best · (1 − 10⁻³)` sets a new
//!   best (a gain below a thousandth is noise, not learning);
//! - after `patience` evaluations in a row without a new best, or at once when `c_k` rises
//!   above `c_{k−1}` (the overfitting guard), it **backs off** one level: to
//!   `max(floor, √(full · floor))` steps/min, the geometric middle between the full-speed
//!   rate measured since the last evaluation and the floor;
//! - one more evaluation without a new best (or with a rise) and it sits at the **floor**,
//!   `training.idle_steps_per_min`. So the floor is reached within `patience + 1`
//!   evaluations of the control loss stopping to improve.
//! - New rows arriving put it back at full speed and forget the best (the control slice's
//!   new era changes with them).
//!
//! The policy only decides *when* steps run, never what they train on, so training results
//! do not depend on it.

use std::time::Duration;

use serde::Serialize;

/// Relative gain of the control loss below which an evaluation is no improvement.
const MIN_RELATIVE_GAIN: f64 = 1e-3;

/// Where the policy stands.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Pace {
    /// As fast as the CPU (or the cap) allows.
    Full,
    /// Between full speed and the floor.
    BackingOff { steps_per_min: f64 },
    /// `training.idle_steps_per_min`.
    Floor,
}

/// The consolidation policy's state (not checkpointed: a restart begins at full speed).
#[derive(Debug, Clone, PartialEq)]
pub struct Consolidation {
    patience: usize,
    floor_per_min: f64,
    cap_per_min: Option<f64>,
    pace: Pace,
    best: Option<f64>,
    last: Option<f64>,
    since_best: usize,
    why: String,
}

impl Consolidation {
    /// `floor_per_min`: `training.idle_steps_per_min` (> 0); `cap_per_min`: the full-speed
    /// cap, `None` for none.
    pub fn new(patience: usize, floor_per_min: u32, cap_per_min: Option<u32>) -> Self {
        Self {
            patience: patience.max(1),
            floor_per_min: f64::from(floor_per_min.max(1)),
            cap_per_min: cap_per_min.filter(|&c| c > 0).map(f64::from),
            pace: Pace::Full,
            best: None,
            last: None,
            since_best: 0,
            why: "started: full speed until the control loss stops improving".into(),
        }
    }

    pub fn pace(&self) -> Pace {
        self.pace
    }

    /// Why it is at its pace, in words.
    pub fn why(&self) -> &str {
        &self.why
    }

    /// New rows arrived: full speed, best forgotten.
    pub fn new_rows(&mut self) {
        if self.pace != Pace::Full || self.best.is_some() {
            self.why = "new rows arrived: full speed".into();
        }
        self.pace = Pace::Full;
        self.best = None;
        self.last = None;
        self.since_best = 0;
    }

    /// A scheduled evaluation's overall control loss (`None`: nothing measured), and the
    /// replay steps per minute measured at full speed since the previous one.
    pub fn evaluated(&mut self, control: Option<f64>, full_rate_per_min: f64) {
        let Some(c) = control.filter(|c| c.is_finite()) else {
            return;
        };
        let rose = self.last.is_some_and(|l| c > l);
        self.last = Some(c);
        if self.best.is_none_or(|b| c < b * (1.0 - MIN_RELATIVE_GAIN)) && !rose {
            self.best = Some(c);
            self.since_best = 0;
            self.pace = Pace::Full;
            self.why = format!("control loss improving ({c:.4}): full speed");
            return;
        }
        self.since_best += 1;
        if !rose && self.since_best < self.patience && self.pace == Pace::Full {
            return;
        }
        let cause = if rose {
            format!("control loss rose to {c:.4}")
        } else {
            format!(
                "control loss not below its best {:.4} for {} evaluation(s)",
                self.best.unwrap_or(c),
                self.since_best
            )
        };
        self.pace = match self.pace {
            Pace::Full => {
                let full = self
                    .cap_per_min
                    .map_or(full_rate_per_min, |cap| full_rate_per_min.min(cap));
                let mid = (full.max(self.floor_per_min) * self.floor_per_min).sqrt();
                if mid > self.floor_per_min * 1.0001 {
                    Pace::BackingOff { steps_per_min: mid }
                } else {
                    Pace::Floor
                }
            }
            Pace::BackingOff { .. } | Pace::Floor => Pace::Floor,
        };
        self.why = match self.pace {
            Pace::BackingOff { steps_per_min } => {
                format!("{cause}: backing off to {steps_per_min:.0} steps/min")
            }
            _ => format!(
                "{cause}: at the floor, training.idle_steps_per_min = {}",
                self.floor_per_min
            ),
        };
    }

    /// The wait between replay-only steps: `None` at full speed without a cap.
    pub fn interval(&self) -> Option<Duration> {
        let per_min = match self.pace {
            Pace::Full => self.cap_per_min?,
            Pace::BackingOff { steps_per_min } => steps_per_min,
            Pace::Floor => self.floor_per_min,
        };
        Some(Duration::from_secs_f64(60.0 / per_min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn improving_stays_full_then_reaches_the_floor_within_patience_plus_one() {
        let mut c = Consolidation::new(3, 60, None);
        for (i, loss) in [5.0, 4.5, 4.2].into_iter().enumerate() {
            c.evaluated(Some(loss), 1200.0);
            assert_eq!(c.pace(), Pace::Full, "eval {i}");
            assert_eq!(c.interval(), None);
        }
        // Flat from here: patience evaluations back it off, one more reaches the floor.
        c.evaluated(Some(4.2), 1200.0);
        c.evaluated(Some(4.2), 1200.0);
        assert_eq!(c.pace(), Pace::Full);
        c.evaluated(Some(4.2), 1200.0);
        let Pace::BackingOff { steps_per_min } = c.pace() else {
            panic!("{:?}", c.pace());
        };
        assert!((steps_per_min - (1200.0f64 * 60.0).sqrt()).abs() < 1e-9);
        assert!(c.why().contains("backing off"), "{}", c.why());
        c.evaluated(Some(4.2), 1200.0);
        assert_eq!(c.pace(), Pace::Floor);
        assert_eq!(c.interval(), Some(Duration::from_secs(1)));
        assert!(c.why().contains("idle_steps_per_min"), "{}", c.why());
    }

    #[test]
    fn a_rise_backs_off_at_once_and_new_rows_restore_full_speed() {
        let mut c = Consolidation::new(5, 60, None);
        c.evaluated(Some(4.0), 600.0);
        c.evaluated(Some(4.1), 600.0);
        assert!(
            matches!(c.pace(), Pace::BackingOff { .. }),
            "{:?}",
            c.pace()
        );
        assert!(c.why().contains("rose"), "{}", c.why());
        c.evaluated(Some(4.05), 600.0);
        assert_eq!(c.pace(), Pace::Floor);
        c.new_rows();
        assert_eq!(c.pace(), Pace::Full);
        assert!(c.why().contains("new rows"));
        // The best was forgotten: the next loss, even a higher one, is an improvement.
        c.evaluated(Some(4.5), 600.0);
        assert_eq!(c.pace(), Pace::Full);
    }

    #[test]
    fn a_new_best_returns_to_full_speed_and_the_cap_bounds_it() {
        let mut c = Consolidation::new(1, 60, Some(240));
        c.evaluated(Some(4.0), 6000.0);
        assert_eq!(c.interval(), Some(Duration::from_millis(250)));
        c.evaluated(Some(4.0), 6000.0);
        let Pace::BackingOff { steps_per_min } = c.pace() else {
            panic!("{:?}", c.pace());
        };
        assert!((steps_per_min - 120.0).abs() < 1e-9, "sqrt(240 * 60)");
        c.evaluated(Some(3.9), 6000.0);
        assert_eq!(c.pace(), Pace::Full);
        // A full rate at or below the floor goes straight to the floor.
        let mut slow = Consolidation::new(1, 60, None);
        slow.evaluated(Some(1.0), 30.0);
        slow.evaluated(Some(1.0), 30.0);
        assert_eq!(slow.pace(), Pace::Floor);
        // Missing measurements change nothing.
        slow.evaluated(None, 30.0);
        assert_eq!(slow.pace(), Pace::Floor);
    }
}
