//! The trainer's internal events (see [`crate::telemetry::event`]): each struct's `emit()`
//! writes the log line and updates the metrics of one thing the trainer did.

use crate::govern::diagnostics::{LayerDiagnostics, Stats, stats};
use crate::govern::drift::Drift;
use crate::learn::eval::{EvalReport, era_name};
use crate::model::Masks;
use crate::model::availability::Availability;
use crate::model::train::StepReport;
use crate::telemetry::event::InternalEvent;
use crate::telemetry::names::{self as n, events};

/// One training step done: step counters, throughput, loss, masks, data mix and per-layer
/// branch diagnostics (debug-level log line; the metrics are the record).
pub struct StepDone<'a> {
    pub report: &'a StepReport,
    pub masks: &'a Masks,
    /// Branches under an operator's forced outage.
    pub forced_off: usize,
    /// Real (non-padding) input tokens per second of this step.
    pub tokens_per_sec: f64,
    /// Real input tokens / positions computed.
    pub position_utilization: f64,
    pub grad_norm_ratio: Stats,
    pub replay_delta_loss: Stats,
    pub steps_at_min_active_share: f64,
    pub coverage_ratio: f64,
    pub new_data_ratio: f64,
    pub replay_share: f64,
    /// Per layer: its diagnostics this step, when they could be computed.
    pub layers: &'a [Option<LayerDiagnostics>],
}

impl InternalEvent for StepDone<'_> {
    fn emit(self) {
        let r = self.report;
        tracing::debug!(
            actor = "trainer",
            step = r.step,
            loss = r.loss,
            tokens_per_sec = self.tokens_per_sec
        );
        metrics::counter!(n::TRAIN_STEPS_TOTAL).absolute(r.step);
        metrics::gauge!(n::TRAIN_STEP).set(r.step as f64);
        metrics::gauge!(n::BRANCHES_FORCED_OFF).set(self.forced_off as f64);
        for (l, m) in self.masks.iter().enumerate() {
            let lab = l.to_string();
            metrics::gauge!(n::LAYER_WIDTH, "layer" => lab.clone()).set(m.len() as f64);
            let on = m.iter().filter(|&&b| b).count();
            metrics::gauge!(n::LAYER_ACTIVE_BRANCHES, "layer" => lab).set(on as f64);
        }
        metrics::gauge!(n::TRAIN_TOKENS_PER_SEC).set(self.tokens_per_sec);
        metrics::gauge!(n::TRAIN_POSITION_UTILIZATION).set(self.position_utilization);
        metrics::gauge!(n::LOSS).set(r.loss as f64);
        metrics::gauge!(n::GRAD_NORM).set(r.grad_norm as f64);
        let active: Vec<f64> = self
            .masks
            .iter()
            .map(|m| m.iter().filter(|&&b| b).count() as f64)
            .collect();
        let sparsity: Vec<f64> = self
            .masks
            .iter()
            .map(|m| m.iter().filter(|&&b| !b).count() as f64 / m.len() as f64)
            .collect();
        let sa = stats(&active);
        metrics::gauge!(n::ACTIVE_BRANCHES_MEAN).set(sa.mean);
        metrics::gauge!(n::ACTIVE_BRANCHES_STD).set(sa.std);
        metrics::gauge!(n::ACTIVE_BRANCHES_MIN).set(sa.min);
        metrics::gauge!(n::ACTIVE_BRANCHES_MAX).set(sa.max);
        let ss = stats(&sparsity);
        metrics::gauge!(n::MASK_SPARSITY_MEAN).set(ss.mean);
        metrics::gauge!(n::MASK_SPARSITY_STD).set(ss.std);
        metrics::gauge!(n::STEPS_AT_MIN_ACTIVE_SHARE).set(self.steps_at_min_active_share);
        metrics::gauge!(n::GRAD_NORM_RATIO_MEAN).set(self.grad_norm_ratio.mean);
        metrics::gauge!(n::GRAD_NORM_RATIO_STD).set(self.grad_norm_ratio.std);
        metrics::gauge!(n::COVERAGE_RATIO).set(self.coverage_ratio);
        metrics::gauge!(n::NEW_DATA_RATIO).set(self.new_data_ratio);
        metrics::gauge!(n::REPLAY_SHARE).set(self.replay_share);
        metrics::gauge!(n::REPLAY_DELTA_LOSS_MEAN).set(self.replay_delta_loss.mean);
        metrics::gauge!(n::REPLAY_DELTA_LOSS_STD).set(self.replay_delta_loss.std);
        for (l, d) in self.layers.iter().enumerate() {
            let Some(d) = d else { continue };
            let lab = l.to_string();
            for (name, v) in [
                (n::PATH_STARVATION_INDEX, d.path_starvation_index),
                (n::EFFECTIVE_NUM_PATHS, d.effective_num_paths),
                (n::GINI_CONCENTRATION, d.gini_concentration),
                (n::TOP1_SHARE, d.top1_share),
                (n::MARGIN_TOP1_TOP2, d.margin_top1_top2),
                (
                    n::DIVERSITY_COSINE_DISTANCE_MEAN,
                    d.diversity_cosine_distance_mean,
                ),
                (n::BRANCH_CORRELATION_MEAN, d.branch_correlation_mean),
                (n::OUTPUT_ENERGY_CV, d.output_energy_cv),
                (n::BRANCH_SELECT_GINI, d.branch_select_gini),
                (n::BRANCH_SELECT_TOP1_SHARE, d.branch_select_top1_share),
            ] {
                metrics::gauge!(name, "layer" => lab.clone()).set(v);
            }
            for (i, a) in r.alpha[l].iter().enumerate() {
                metrics::gauge!(n::ALPHA, "layer" => lab.clone(), "branch" => i.to_string())
                    .set(*a as f64);
            }
        }
    }
}

/// A training step the model refused (the batch is skipped).
pub struct TrainStepFailed<'a> {
    pub error: &'a str,
}

impl InternalEvent for TrainStepFailed<'_> {
    fn emit(self) {
        tracing::warn!(event = events::TRAIN_STEP_FAILED, actor = "trainer", error = %self.error,
            "training step refused; the batch is skipped");
    }
}

/// A control-slice evaluation: per-group and pooled losses, retention deltas, branch-outage
/// losses. The pooled gauges carry the previous value of an era that was not measured.
pub struct EvalDone<'a> {
    pub report: &'a EvalReport,
}

impl InternalEvent for EvalDone<'_> {
    fn emit(self) {
        let r = self.report;
        for g in &r.groups {
            metrics::gauge!(n::LOSS_CONTROL_SOURCE, "source" => g.source.clone(),
                "era" => era_name(g.era))
            .set(g.loss);
        }
        let (old, new) = r.carried();
        let (d_old, d_new) = r.carried_deltas();
        if let (Some(v), Some(d)) = (old, d_old) {
            metrics::gauge!(n::LOSS_CONTROL_OLD).set(v);
            metrics::gauge!(n::RETENTION_DELTA_OLD).set(d);
        }
        if let (Some(v), Some(d)) = (new, d_new) {
            metrics::gauge!(n::LOSS_CONTROL_NEW).set(v);
            metrics::gauge!(n::RETENTION_DELTA_NEW).set(d);
        }
        for b in &r.branch_out {
            metrics::gauge!(n::LOSS_CONTROL_BRANCH_OUT, "layer" => b.layer.to_string(),
                "branch" => b.branch.to_string())
            .set(b.loss as f64);
        }
        tracing::info!(
            event = events::EVAL_DONE,
            actor = "trainer",
            step = r.step,
            loss_control_old = old.unwrap_or(f64::NAN),
            loss_control_new = new.unwrap_or(f64::NAN)
        );
    }
}

/// Logit drift of an expansion measured on the probe batch (at `η = 0`, or at `β` when the
/// ramp ends).
pub struct DriftMeasured<'a> {
    pub drift: &'a Drift,
}

impl InternalEvent for DriftMeasured<'_> {
    fn emit(self) {
        let d = self.drift;
        tracing::debug!(
            actor = "trainer",
            l2_mean = d.l2_mean,
            cos_dist_mean = d.cos_dist_mean,
            "expansion logit drift"
        );
        metrics::gauge!(n::EXPAND_DRIFT_L2_MEAN).set(d.l2_mean);
        metrics::gauge!(n::EXPAND_DRIFT_L2_STD).set(d.l2_std);
        metrics::gauge!(n::EXPAND_DRIFT_COS_MEAN).set(d.cos_dist_mean);
        metrics::gauge!(n::EXPAND_DRIFT_COS_STD).set(d.cos_dist_std);
    }
}

/// An operator masked or unmasked a branch.
pub struct BranchMasked<'a> {
    pub layer: usize,
    pub branch: usize,
    pub off: bool,
    pub avail: &'a Availability,
}

impl InternalEvent for BranchMasked<'_> {
    fn emit(self) {
        tracing::info!(
            event = events::BRANCH_MASKED,
            actor = "trainer",
            layer = self.layer,
            branch = self.branch,
            off = self.off
        );
        metrics::gauge!(n::BRANCHES_FORCED_OFF).set(forced_off_count(self.avail) as f64);
    }
}

/// Branches under an operator's forced outage.
pub fn forced_off_count(avail: &Availability) -> usize {
    avail
        .forced_off()
        .iter()
        .map(|l| l.iter().filter(|&&b| b).count())
        .sum()
}
