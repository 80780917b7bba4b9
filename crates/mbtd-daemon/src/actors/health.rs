//! Liveness bookkeeping for supervised actors: how often each one started, whether it runs,
//! and the restart back-off. Each actor gets a [`ChildHealth`] handle in its `Args` (which
//! survive restarts), so a restarted actor knows it is a restart and waits its back-off
//! before rebuilding its state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::DaemonConfig;
use crate::telemetry::names::{self, events};

/// Exponential back-off: `initial · 2^(n-1)` for the n-th restart within the window, capped.
pub fn backoff(initial_ms: u64, max_ms: u64, restarts_in_window: u32) -> Duration {
    if restarts_in_window == 0 {
        return Duration::ZERO;
    }
    let shift = (restarts_in_window - 1).min(30);
    Duration::from_millis(initial_ms.saturating_mul(1u64 << shift).min(max_ms))
}

/// A supervised child actor: [`child_actor!`] implements `kameo::Actor` for it, keeping its
/// [`ChildHealth`] up to date around the child's own `start` and [`Child::stopping`].
pub(crate) trait Child {
    fn health(&self) -> &ChildHealth;

    /// Work of an ordered stop (flushes, joins), before the health record says "stopped".
    async fn stopping(&mut self, _reason: &kameo::error::ActorStopReason) {}
}

/// `impl kameo::Actor` for a supervisor child: `on_start` records the (re)start in the
/// health record carried by `Args` (sleeping the restart back-off), then runs the actor's
/// inherent `async fn start(args, me) -> Result<Self, Error>`; `on_stop` runs
/// [`Child::stopping`] and records the stop.
macro_rules! child_actor {
    ($actor:ty, $name:literal, $args:ty, $error:ty) => {
        impl ::kameo::Actor for $actor {
            type Args = $args;
            type Error = $error;

            fn name() -> &'static str {
                $name
            }

            async fn on_start(
                args: Self::Args,
                me: ::kameo::actor::ActorRef<Self>,
            ) -> Result<Self, Self::Error> {
                args.health.on_start().await;
                Self::start(args, me).await
            }

            async fn on_stop(
                &mut self,
                _: ::kameo::actor::WeakActorRef<Self>,
                reason: ::kameo::error::ActorStopReason,
            ) -> Result<(), Self::Error> {
                $crate::actors::health::Child::stopping(self, &reason).await;
                $crate::actors::health::Child::health(self).on_stop(&reason.to_string());
                Ok(())
            }
        }
    };
}
pub(crate) use child_actor;

/// One supervised actor's health, shared between the actor and the status reporter.
#[derive(Debug)]
pub struct ChildHealth {
    name: &'static str,
    starts: AtomicU64,
    running: AtomicBool,
    recent_restarts: Mutex<Vec<Instant>>,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    window: Duration,
}

pub use crate::admin::protocol::ActorStatus;

impl ChildHealth {
    /// Called at the top of the actor's `on_start`: records the start and, when it is a
    /// restart, logs it, counts it and sleeps the back-off.
    pub async fn on_start(&self) {
        let previous_starts = self.starts.fetch_add(1, Ordering::SeqCst);
        if previous_starts > 0 {
            let in_window = {
                let mut recent = self
                    .recent_restarts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                recent.retain(|t| now.duration_since(*t) < self.window);
                recent.push(now);
                recent.len() as u32
            };
            let delay = backoff(self.backoff_initial_ms, self.backoff_max_ms, in_window);
            metrics::counter!(names::ACTOR_RESTARTS_TOTAL, "actor" => self.name).increment(1);
            tracing::warn!(
                event = events::ACTOR_RESTARTING,
                actor = self.name,
                restarts = previous_starts,
                backoff_ms = delay.as_millis() as u64,
                "actor {} restarting after a crash (restart {}), rebuilding its state",
                self.name,
                previous_starts
            );
            tokio::time::sleep(delay).await;
        }
        self.running.store(true, Ordering::SeqCst);
        tracing::info!(event = events::ACTOR_STARTED, actor = self.name);
    }

    /// Called from the actor's `on_stop`.
    pub fn on_stop(&self, reason: &str) {
        self.running.store(false, Ordering::SeqCst);
        tracing::info!(event = events::ACTOR_STOPPED, actor = self.name, reason);
    }

    pub fn restarts(&self) -> u64 {
        self.starts.load(Ordering::SeqCst).saturating_sub(1)
    }

    pub fn status(&self) -> ActorStatus {
        let state = if self.running.load(Ordering::SeqCst) {
            "running"
        } else if self.starts.load(Ordering::SeqCst) == 0 {
            "starting"
        } else {
            "down"
        };
        ActorStatus {
            name: self.name.to_string(),
            state: state.to_string(),
            restarts: self.restarts(),
        }
    }
}

/// The health handles of every supervised actor, in spawn order.
#[derive(Debug, Clone, Default)]
pub struct HealthBoard {
    children: Arc<Mutex<BTreeMap<usize, Arc<ChildHealth>>>>,
}

impl HealthBoard {
    /// Registers an actor and returns its handle.
    pub fn register(&self, name: &'static str, cfg: &DaemonConfig) -> Arc<ChildHealth> {
        let h = Arc::new(ChildHealth {
            name,
            starts: AtomicU64::new(0),
            running: AtomicBool::new(false),
            recent_restarts: Mutex::default(),
            backoff_initial_ms: cfg.restart_backoff_initial_ms,
            backoff_max_ms: cfg.restart_backoff_max_ms,
            window: Duration::from_secs(cfg.restart_window_s),
        });
        let mut map = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let idx = map.len();
        map.insert(idx, h.clone());
        metrics::counter!(names::ACTOR_RESTARTS_TOTAL, "actor" => name).increment(0);
        h
    }

    pub fn statuses(&self) -> Vec<ActorStatus> {
        let map = self.children.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|h| h.status()).collect()
    }

    /// True when every registered actor is running (the systemd watchdog is fed only then).
    pub fn all_running(&self) -> bool {
        let map = self.children.lock().unwrap_or_else(|e| e.into_inner());
        map.values().all(|h| h.running.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(100, 1000, 0), Duration::ZERO);
        assert_eq!(backoff(100, 1000, 1), Duration::from_millis(100));
        assert_eq!(backoff(100, 1000, 2), Duration::from_millis(200));
        assert_eq!(backoff(100, 1000, 4), Duration::from_millis(800));
        assert_eq!(backoff(100, 1000, 5), Duration::from_millis(1000));
        assert_eq!(backoff(100, 1000, 200), Duration::from_millis(1000));
    }

    #[tokio::test]
    async fn restart_is_counted_and_status_follows() {
        let board = HealthBoard::default();
        let h = board.register("x", &DaemonConfig::default());
        assert_eq!(board.statuses()[0].state, "starting");
        h.on_start().await;
        assert!(board.all_running());
        h.on_stop("panicked");
        assert_eq!(board.statuses()[0].state, "down");
        h.on_start().await;
        assert_eq!(board.statuses()[0].restarts, 1);
        assert_eq!(board.statuses()[0].state, "running");
    }
}
