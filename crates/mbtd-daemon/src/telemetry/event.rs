//! Internal events as types (Vector's pattern): one struct per thing that happens, whose
//! [`InternalEvent::emit`] writes the structured log line *and* updates the metric, so the
//! two can never drift apart. Events that can repeat (a retry loop, a refused peer) go
//! through a [`RateLimit`], which lets the first one through, then at most one per interval
//! with the count of those suppressed meanwhile.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use mbtd::telemetry::event::{InternalEvent, RateLimit};
//!
//! /// A file could not be read (log line + counter).
//! struct FileUnreadable<'a> {
//!     path: &'a str,
//!     suppressed: u64,
//! }
//!
//! impl InternalEvent for FileUnreadable<'_> {
//!     fn emit(self) {
//!         tracing::warn!(event = "file_unreadable", path = self.path, suppressed = self.suppressed);
//!         metrics::counter!("files_unreadable_total").increment(1 + self.suppressed);
//!     }
//! }
//!
//! let mut limit = RateLimit::new(Duration::from_secs(10));
//! let t0 = Instant::now();
//! assert_eq!(limit.admit(t0), Some(0)); // the first one goes out
//! assert_eq!(limit.admit(t0 + Duration::from_secs(1)), None); // held back, counted
//! let suppressed = limit.admit(t0 + Duration::from_secs(11)).unwrap();
//! assert_eq!(suppressed, 1);
//! FileUnreadable { path: "inbox/a.csv", suppressed }.emit();
//! ```

use std::time::{Duration, Instant};

/// Something that happened inside the daemon, reported once: the log line and the metric.
pub trait InternalEvent {
    /// Writes the log line and updates the metric(s) of this event.
    fn emit(self);
}

/// At most one emission per `interval`; counts what it held back.
#[derive(Debug, Clone)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when an event at `now` may be emitted (`n` = events held back since the
    /// last emission, to report with it); `None` when it is to be held back.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_admits_one_per_interval_and_counts_the_rest() {
        let mut l = RateLimit::new(Duration::from_millis(100));
        let t = Instant::now();
        assert_eq!(l.admit(t), Some(0));
        for i in 1..10 {
            assert_eq!(l.admit(t + Duration::from_millis(i * 5)), None);
        }
        assert_eq!(l.admit(t + Duration::from_millis(100)), Some(9));
        assert_eq!(l.admit(t + Duration::from_millis(150)), None);
        assert_eq!(l.admit(t + Duration::from_millis(250)), Some(1));
    }
}
