//! The kameo actors: thin owners of one piece of state and one kind of I/O each, under a
//! root supervisor that restarts them with back-off.

pub mod admin;
pub mod checkpoint_events;
pub mod checkpointer;
pub mod dispatch;
pub mod health;
pub mod ingestor;
pub mod ingestor_events;
pub mod ingestor_watch;
pub mod metrics;
pub mod replay;
pub mod supervisor;
pub mod trainer;
mod trainer_boot;
mod trainer_cluster;
pub mod trainer_commands;
mod trainer_events;
mod trainer_governor;
mod trainer_wake;
pub mod trainer_worker;

/// Test-only fault: makes the receiving actor panic (compiled with `--features fault-injection`).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy)]
pub struct Crash;

/// Test-only fault: with `MBTD_FAULT_TOKEN_DELAY_MS` set, generation sleeps this long after
/// each token, so a test can act while a reply is still streaming (compiled with
/// `--features fault-injection`).
#[cfg(feature = "fault-injection")]
pub(crate) fn injected_token_delay() {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        std::env::var("MBTD_FAULT_TOKEN_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(d) = delay {
        std::thread::sleep(*d);
    }
}
