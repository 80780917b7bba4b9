//! The continual-learning core (pure, no async): turning stored rows into training windows
//! and batches, and the loop's configuration. The trainer actor drives it.

pub mod batch;
pub mod cl_bench;
pub mod config;
pub mod consolidate;
pub mod data_bench;
pub mod eval;
pub mod mix;
pub mod outage_bench;

pub use config::{EvalConfig, TokenizerSection, TrainingConfig};
