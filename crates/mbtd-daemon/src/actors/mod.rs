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
pub mod trainer_commands;
mod trainer_events;
mod trainer_governor;
mod trainer_wake;
pub mod trainer_worker;

/// Test-only fault: makes the receiving actor panic (compiled with `--features fault-injection`).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy)]
pub struct Crash;
