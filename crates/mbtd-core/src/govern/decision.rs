//! The expansion governor's vocabulary: its settings (`[governor]`), what it is fed each
//! call (evals, per-layer inputs), and what it decides (decisions, judgements, the
//! expansion in progress). The rule that turns one into the other is in [`super::policy`].

use crate::config::{FieldError, Section};
use serde::{Deserialize, Serialize};

use super::compare::{SourceChange, SourceLoss};

/// Governor settings (`[governor]` in the daemon config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GovernorConfig {
    /// Automatic expansion on; manual expansions go through ramp and probation regardless.
    pub enabled: bool,
    /// Evals without enough improvement that make a plateau.
    pub patience: usize,
    /// Relative improvement over `patience` evals below which the loss has plateaued.
    pub plateau_tolerance: f64,
    /// A layer is saturated when `effective_num_paths / K ≥` this.
    pub saturation_threshold: f64,
    /// Steps after an expansion outcome before the same layer may grow again.
    pub cooldown_steps: u64,
    /// Most branches a layer may have.
    pub max_branches_per_layer: usize,
    /// Most parameters the model may have.
    pub max_params: u64,
    /// Branches added per expansion.
    pub branches_per_expansion: usize,
    /// Injection rate `β`: the total aggregation weight the new branches reach.
    pub beta: f64,
    /// Steps over which `η` ramps linearly from 0 to `β`.
    pub ramp_steps: u64,
    /// Steps after the ramp before the expansion is judged.
    pub probation_steps: u64,
    /// Least decrease of the new-data control loss (nats) for an expansion to be kept.
    pub min_gain: f64,
    /// Most increase of the old-data control loss (nats) tolerated.
    pub max_regression: f64,
    /// A rolled-back layer's cool-down multiplier grows by this factor.
    pub backoff_factor: f64,
}

impl Default for GovernorConfig {
    /// Automatic expansion is off by default (`enabled = false`): growing the model changes
    /// its step time and memory on its own, so it is opted into once the budgets fit the
    /// machine. Manual expansions are judged by probation either way.
    fn default() -> Self {
        Self {
            enabled: false,
            patience: 3,
            plateau_tolerance: 0.005,
            saturation_threshold: 0.75,
            cooldown_steps: 2000,
            max_branches_per_layer: 8,
            max_params: 50_000_000,
            branches_per_expansion: 1,
            beta: 0.1,
            ramp_steps: 500,
            probation_steps: 2000,
            min_gain: 0.0,
            max_regression: 0.05,
            backoff_factor: 2.0,
        }
    }
}

impl Section for GovernorConfig {
    const NAME: &'static str = "governor";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("patience", self.patience, 1, 1000)?;
        Self::in_range("plateau_tolerance", self.plateau_tolerance, 0.0, 1.0)?;
        Self::in_range("saturation_threshold", self.saturation_threshold, 0.0, 1.0)?;
        Self::in_range(
            "max_branches_per_layer",
            self.max_branches_per_layer,
            1,
            1024,
        )?;
        Self::require("max_params", self.max_params, self.max_params >= 1, ">= 1")?;
        Self::in_range("branches_per_expansion", self.branches_per_expansion, 1, 64)?;
        let beta = self.beta;
        Self::require("beta", beta, beta > 0.0 && beta < 1.0, "0 < beta < 1")?;
        Self::in_range("min_gain", self.min_gain, -10.0, 10.0)?;
        Self::in_range("max_regression", self.max_regression, 0.0, 10.0)?;
        Self::in_range("backoff_factor", self.backoff_factor, 1.0, 100.0)
    }
}

/// One evaluation on the held-out control set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Step of the eval.
    pub step: u64,
    /// Control loss on data that arrived before the current era (`loss_control_old`).
    pub control_old: Option<f64>,
    /// Control loss on recent data (`loss_control_new`).
    pub control_new: Option<f64>,
    /// EMA of the training loss.
    #[serde(with = "super::float_json::nan_as_null")]
    pub train_loss_ema: f64,
    /// Control loss per source on its old-era rows (empty in states written before it).
    #[serde(default)]
    pub old_sources: Vec<SourceLoss>,
}

/// What the governor knows about one layer at a call.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerInput {
    /// Branches `K`.
    pub branches: usize,
    /// `effective_num_paths` of the layer (see [`super::diagnostics`]).
    #[serde(with = "super::float_json::nan_as_null")]
    pub effective_paths: f64,
    /// Parameters one more branch in this layer adds.
    pub branch_params: u64,
}

/// Inputs of one [`decide`] call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GovernorInputs {
    /// Current step.
    pub step: u64,
    /// A fresh eval taken at this step, if any.
    pub eval: Option<EvalPoint>,
    /// Per-layer view.
    pub layers: Vec<LayerInput>,
    /// Current parameter count.
    pub params: u64,
}

/// Per-layer governor memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerState {
    /// The layer may not grow before this step.
    pub cooldown_until: u64,
    /// Cool-down multiplier; ×`backoff_factor` per rollback, back to 1 on a kept expansion.
    pub backoff: f64,
    /// Expansions kept.
    pub kept: u32,
    /// Expansions rolled back.
    pub rolled_back: u32,
}

impl Default for LayerState {
    fn default() -> Self {
        Self {
            cooldown_until: 0,
            backoff: 1.0,
            kept: 0,
            rolled_back: 0,
        }
    }
}

/// Phase of the expansion in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// `η` is ramping up.
    Ramp,
    /// `η = β`; judged at the first eval at or after `since + probation_steps`.
    Probation {
        /// Step the probation began.
        since: u64,
    },
}

/// The expansion in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expansion {
    /// Layer widened.
    pub layer: usize,
    /// Branches added.
    pub branches: usize,
    /// Step the new branches were added (= step of the pre-expansion checkpoint).
    pub start_step: u64,
    /// Ramp or probation.
    pub phase: Phase,
    /// Checkpoint written just before the expansion (the rollback target).
    pub checkpoint_id: String,
    /// The eval the outcome is compared against.
    pub baseline: Option<EvalPoint>,
    /// Requested by the operator.
    pub manual: bool,
    /// Injection rate reached at the end of the ramp.
    pub beta: f64,
    /// Ramp length.
    pub ramp_steps: u64,
}

impl Expansion {
    /// `η` at `step`: `β · min(1, (step - start_step) / ramp_steps)` (`β` if `ramp_steps = 0`).
    pub fn eta_at(&self, step: u64) -> f64 {
        if self.ramp_steps == 0 {
            return self.beta;
        }
        let done = step.saturating_sub(self.start_step).min(self.ramp_steps);
        self.beta * done as f64 / self.ramp_steps as f64
    }
}

/// The plateau test and its numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlateauCheck {
    /// `control_same_rows`, `control_loss_new` or `train_loss_ema`.
    pub metric: String,
    /// The `patience + 1` values tested, oldest first.
    #[serde(with = "super::float_json::vec_nan_as_null")]
    pub window: Vec<f64>,
    /// Relative improvement of the best recent value over the oldest.
    #[serde(with = "super::float_json::nan_as_null")]
    pub relative_improvement: f64,
    /// Relative rise of the latest value over the oldest.
    #[serde(with = "super::float_json::nan_as_null")]
    pub relative_rise: f64,
    /// The tolerance it is compared with.
    pub tolerance: f64,
    /// Whether it is a plateau.
    pub plateau: bool,
}

/// Why a layer can or cannot grow now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCheck {
    /// Layer index.
    pub layer: usize,
    /// Branches now.
    pub branches: usize,
    /// Effective number of paths.
    #[serde(with = "super::float_json::nan_as_null")]
    pub effective_paths: f64,
    /// `effective_paths / branches`.
    #[serde(with = "super::float_json::nan_as_null")]
    pub saturation: f64,
    /// Cool-down end.
    pub cooldown_until: u64,
    /// Branches that could be added within the budgets.
    pub addable: usize,
    /// Why it cannot grow (`None`: eligible).
    pub blocked: Option<String>,
}

/// The numbers a no-op or expansion decision was based on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Basis {
    /// The plateau test (`None` with fewer than `patience + 1` evals).
    pub plateau: Option<PlateauCheck>,
    /// Per-layer eligibility.
    pub layers: Vec<LayerCheck>,
    /// Parameters now.
    pub params: u64,
    /// Parameter budget.
    pub max_params: u64,
}

/// The numbers a probation outcome was based on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// The judged loss: `control_same_rows`, `control` (new-era control loss),
    /// `train_loss_ema` (no control loss at both evals), or `none` (no baseline eval: the
    /// expansion is kept).
    pub metric: String,
    /// Judged loss at the baseline eval.
    pub baseline: Option<f64>,
    /// Judged loss now.
    #[serde(with = "super::float_json::nan_as_null")]
    pub now: f64,
    /// `baseline - now` (0 without a baseline).
    #[serde(with = "super::float_json::nan_as_null")]
    pub gain: f64,
    /// Compared with `max_regression`: the largest per-source increase on the same rows
    /// (`control_same_rows`), the old-era control increase (`control`), else 0.
    #[serde(with = "super::float_json::nan_as_null")]
    pub regression: f64,
    /// Per-source losses on the same rows (`control_same_rows`).
    pub sources: Vec<SourceChange>,
    /// Old-era control loss at the baseline (as reported; its rows may differ from now).
    pub baseline_old: Option<f64>,
    /// Old-era control loss now.
    pub now_old: Option<f64>,
    /// Required gain.
    pub min_gain: f64,
    /// Tolerated regression.
    pub max_regression: f64,
}

/// A governor decision; every variant carries the step and the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Nothing to do.
    None {
        /// Step.
        step: u64,
        /// Why.
        reason: String,
        /// The numbers (absent during an expansion).
        basis: Option<Basis>,
    },
    /// Add `branches` branches to `layer` (write a pre-expansion checkpoint first, then call
    /// [`GovernorState::register_expansion`]).
    Expand {
        /// Step.
        step: u64,
        /// Layer to widen.
        layer: usize,
        /// Branches to add.
        branches: usize,
        /// Injection rate.
        beta: f64,
        /// Ramp length.
        ramp_steps: u64,
        /// Why.
        reason: String,
        /// The numbers.
        basis: Basis,
    },
    /// Set the new branches' share `η` of `layer`.
    SetEta {
        /// Step.
        step: u64,
        /// Layer.
        layer: usize,
        /// `η`.
        eta: f64,
    },
    /// Probation passed: the expansion stays.
    Keep {
        /// Step.
        step: u64,
        /// Layer.
        layer: usize,
        /// Branches added.
        branches: usize,
        /// The numbers.
        judgement: Judgement,
    },
    /// Probation failed: restore `checkpoint_id`.
    Rollback {
        /// Step.
        step: u64,
        /// Checkpoint to restore.
        checkpoint_id: String,
        /// Layer whose expansion failed.
        layer: usize,
        /// Why.
        reason: String,
        /// The numbers.
        judgement: Judgement,
    },
}

/// Errors of the governor's state changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GovernorError {
    /// Another expansion is still in ramp or probation.
    #[error(
        "an expansion of layer {layer} (started at step {start_step}) is still in progress; wait for its probation to end, or roll back to its pre-expand checkpoint (`mbtd ctl rollback pre-expand`)"
    )]
    Busy {
        /// Layer of the running expansion.
        layer: usize,
        /// Its start step.
        start_step: u64,
    },
    /// A requested manual expansion is not allowed.
    #[error("expansion of layer {layer} by {branches} branches refused: {reason}")]
    Refused {
        /// Layer.
        layer: usize,
        /// Branches asked for.
        branches: usize,
        /// Why.
        reason: String,
    },
}

/// What [`GovernorState::register_expansion`] needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpansionStart {
    /// Layer widened.
    pub layer: usize,
    /// Branches added.
    pub branches: usize,
    /// Step at which they were added.
    pub step: u64,
    /// The pre-expansion checkpoint.
    pub checkpoint_id: String,
    /// Operator-requested.
    pub manual: bool,
    /// Baseline eval (default: the latest eval the governor saw).
    pub baseline: Option<EvalPoint>,
}
