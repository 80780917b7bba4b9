//! Configuration of the training loop, the evaluation and the tokenizer bootstrap.

use crate::config::{FieldError, Section};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[training]`: how batches are made and how fast an idle daemon consolidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Windows per step.
    pub batch_size: usize,
    /// Tokens per window (at most `model.max_seq_len`).
    pub seq_len: usize,
    /// Share of each batch drawn from history once there is history (0 ..= 1); the rest are
    /// newly arrived rows, each seen once before it counts as history.
    pub replay_share: f64,
    /// Replay-only steps per minute once consolidation has backed off to its floor (see
    /// [`super::consolidate`]); 0 = no replay-only steps (sleep until new rows arrive).
    pub idle_steps_per_min: u32,
    /// Cap on replay-only steps per minute at full speed (a CPU cap for shared hosts);
    /// 0 = no cap.
    pub max_idle_steps_per_min: u32,
    /// Scheduled evaluations without a new best control loss before consolidation backs off.
    pub consolidation_patience: usize,
    /// Seed of the model initialisation, masks and sampling.
    pub seed: u64,
    /// Stop training (the daemon keeps running) once this many steps are done; 0 = never.
    pub max_steps: u64,
    /// Pack the pieces of several rows into each window of `seq_len` (each attending only
    /// to itself, positions restarting per row) instead of one row per padded window; see
    /// [`super::mix`]. Off reproduces the unpacked trainer bit for bit.
    pub packing: bool,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            batch_size: 16,
            seq_len: 128,
            replay_share: 0.5,
            idle_steps_per_min: 60,
            max_idle_steps_per_min: 0,
            consolidation_patience: 3,
            seed: 42,
            max_steps: 0,
            packing: true,
        }
    }
}

impl Section for TrainingConfig {
    const NAME: &'static str = "training";

    /// `seq_len` is checked against `model.max_seq_len` by [`crate::config::Config::validate`].
    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("batch_size", self.batch_size, 1, 1024)?;
        Self::in_range("seq_len", self.seq_len, 2, 65536)?;
        Self::in_range("replay_share", self.replay_share, 0.0, 1.0)?;
        Self::in_range("idle_steps_per_min", self.idle_steps_per_min, 0, 60_000)?;
        Self::require(
            "max_idle_steps_per_min",
            self.max_idle_steps_per_min,
            self.max_idle_steps_per_min <= 60_000,
            "0 ..= 60000 (0 = no cap)",
        )?;
        Self::in_range(
            "consolidation_patience",
            self.consolidation_patience,
            1,
            1000,
        )
    }
}

/// `[eval]`: control-slice evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many steps (and on `ctl eval`).
    pub every_steps: u64,
    /// Control rows per (source, era) group used by an evaluation.
    pub max_rows_per_group: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every_steps: 200,
            max_rows_per_group: 64,
        }
    }
}

impl Section for EvalConfig {
    const NAME: &'static str = "eval";

    fn validate(&self) -> Result<(), FieldError> {
        Self::require(
            "every_steps",
            self.every_steps,
            self.every_steps >= 1,
            ">= 1",
        )?;
        Self::in_range("max_rows_per_group", self.max_rows_per_group, 1, 100_000)
    }
}

/// `[tokenizer]`: trained once from the first rows, or loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// Load this `tokenizer.json` instead of training one (its vocabulary must fit
    /// `model.vocab_size`).
    pub path: Option<PathBuf>,
    /// Rows the replay store must hold before the tokenizer is trained.
    pub bootstrap_rows: usize,
    /// A pair must occur this often in the bootstrap rows to become a merge.
    pub min_frequency: u64,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self {
            path: None,
            bootstrap_rows: 2000,
            min_frequency: 2,
        }
    }
}

impl Section for TokenizerSection {
    const NAME: &'static str = "tokenizer";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("bootstrap_rows", self.bootstrap_rows, 1, 10_000_000)?;
        Self::require(
            "min_frequency",
            self.min_frequency,
            self.min_frequency >= 1,
            ">= 1",
        )
    }
}
