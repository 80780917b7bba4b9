//! The expansion governor's decision rule: when to widen which layer, how to ramp the new
//! branches in, and whether to keep or roll back an expansion after probation.
//!
//! State machine (one expansion at a time):
//! ```text
//!   idle ──(eval: plateau ∧ a layer saturated ∧ budget ∧ no cool-down)──▶ Expand decision
//!   caller writes the pre-expansion checkpoint, expands, calls register_expansion
//!   ramp:  every call → SetEta{η = β·min(1, (step - start)/ramp_steps)}; at the end → probation
//!   probation: first eval at step ≥ since + probation_steps →
//!        gain = L_base - L_now ≥ min_gain  ∧  regression ≤ max_regression
//!          ? Keep (cool-down, back-off reset to 1)
//!          : Rollback to the pre-expansion checkpoint (back-off ×= backoff_factor,
//!            cool-down = cooldown_steps · back-off, counted from the expansion's start step,
//!            which is the step the restored checkpoint resumes at)
//! ```
//! The judged loss `L` is, in order of preference (see [`super::compare`] for why):
//! * `control_same_rows`: the control loss on the held-out rows measured at both the
//!   baseline and the judging eval (old-era groups of the same rows, token-weighted);
//!   `regression` is the largest increase of one source's loss on them;
//! * `control`: the new-era control loss (`regression`: increase of the old-era one);
//! * `train_loss_ema` (`regression` 0); with no baseline at all the expansion is kept.
//!
//! Plateau: over the last `patience + 1` evals the monitored series `x` is, in order of
//! preference, the control loss on the same rows (every old-era source of the latest eval
//! measured on the same rows throughout the window), `control_loss_new` (every eval has it),
//! the train loss EMA. With `x_ref` the oldest value, the relative improvement is
//! `(x_ref - min(x_later)) / |x_ref|` and the relative rise `(x_last - x_ref) / |x_ref|`.
//! It is a plateau when the improvement is below `plateau_tolerance` and, for the two
//! series measured on changing data, the rise is not above it either: a jump of the new-era
//! or training loss means harder data arrived, not that learning stalled, so the governor
//! waits until the model has worked on it. On the same rows a rise is a plateau (the model
//! is losing ground on fixed data). Saturation of layer `l`: `effective_num_paths / K_l`; a
//! layer whose branches all carry energy (ratio ≥ `saturation_threshold`) uses its width
//! and is the one to widen; the most saturated eligible layer wins (lowest index on ties).
//!
//! Expansions are proposed only on calls that carry a fresh eval, so a caller that registers
//! the expansion before its next eval never gets the same proposal twice.
//! After a governor rollback the caller restores the checkpoint's weights but must keep this
//! live `GovernorState` (it records the back-off), not the one stored in the checkpoint.

use serde::{Deserialize, Serialize};

use super::compare::{self, SourceLoss};

/// Most evals kept in [`GovernorState::history`].
pub const HISTORY_CAP: usize = 64;
/// Most decisions kept in [`GovernorState::last_decisions`].
pub const DECISIONS_CAP: usize = 32;

pub use super::decision::*;

/// Everything the governor remembers (serde: stored in checkpoints' `state`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GovernorState {
    /// Evals since the last expansion outcome, oldest first (at most [`HISTORY_CAP`]).
    pub history: Vec<EvalPoint>,
    /// Per-layer memory.
    pub layers: Vec<LayerState>,
    /// The expansion in progress.
    pub in_progress: Option<Expansion>,
    /// Recent decisions other than `SetEta` and eval-less `None`s, oldest first.
    pub last_decisions: Vec<Decision>,
    /// Expansions registered (metric `expansion_events_total`).
    pub expansions_total: u64,
    /// Rollbacks decided (metric `rollbacks_total`).
    pub rollbacks_total: u64,
}

fn push_capped<T>(v: &mut Vec<T>, x: T, cap: usize) {
    v.push(x);
    if v.len() > cap {
        v.drain(..v.len() - cap);
    }
}

impl GovernorState {
    fn layer_mut(&mut self, layer: usize) -> &mut LayerState {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, LayerState::default());
        }
        &mut self.layers[layer]
    }

    /// `Err(Busy)` while an expansion is in progress.
    fn not_busy(&self) -> Result<(), GovernorError> {
        match &self.in_progress {
            Some(e) => Err(GovernorError::Busy {
                layer: e.layer,
                start_step: e.start_step,
            }),
            None => Ok(()),
        }
    }

    /// Starts the ramp and probation of an expansion that the caller has performed (after
    /// an `Expand` decision or an operator's `expand`).
    pub fn register_expansion(
        &mut self,
        start: ExpansionStart,
        cfg: &GovernorConfig,
    ) -> Result<(), GovernorError> {
        self.not_busy()?;
        let baseline = start.baseline.or_else(|| self.history.last().cloned());
        self.layer_mut(start.layer);
        self.in_progress = Some(Expansion {
            layer: start.layer,
            branches: start.branches,
            start_step: start.step,
            phase: Phase::Ramp,
            checkpoint_id: start.checkpoint_id,
            baseline,
            manual: start.manual,
            beta: cfg.beta,
            ramp_steps: cfg.ramp_steps,
        });
        self.history.clear();
        self.expansions_total += 1;
        Ok(())
    }

    /// Drops the expansion in progress (e.g. the operator rolled back by hand) and returns it.
    pub fn abort_expansion(&mut self) -> Option<Expansion> {
        self.history.clear();
        self.in_progress.take()
    }

    /// Whether the operator may add `branches` to `layer` now: no expansion in progress,
    /// the layer exists, and the width and parameter budgets hold (cool-downs do not apply
    /// to manual expansions).
    pub fn check_manual(
        &self,
        layer: usize,
        branches: usize,
        inputs: &GovernorInputs,
        cfg: &GovernorConfig,
    ) -> Result<(), GovernorError> {
        self.not_busy()?;
        let refuse = |reason: String| {
            Err(GovernorError::Refused {
                layer,
                branches,
                reason,
            })
        };
        let Some(l) = inputs.layers.get(layer) else {
            return refuse(format!("the model has {} layers", inputs.layers.len()));
        };
        if branches == 0 {
            return refuse("add at least 1 branch".to_string());
        }
        if l.branches + branches > cfg.max_branches_per_layer {
            return refuse(format!(
                "{} + {branches} branches exceeds governor.max_branches_per_layer = {}",
                l.branches, cfg.max_branches_per_layer
            ));
        }
        let after = inputs
            .params
            .saturating_add(l.branch_params.saturating_mul(branches as u64));
        if after > cfg.max_params {
            return refuse(format!(
                "{after} parameters would exceed governor.max_params = {}",
                cfg.max_params
            ));
        }
        Ok(())
    }
}

fn plateau_check(history: &[EvalPoint], cfg: &GovernorConfig) -> Option<PlateauCheck> {
    let n = cfg.patience + 1;
    if history.len() < n {
        return None;
    }
    let window = &history[history.len() - n..];
    let groups: Vec<&[SourceLoss]> = window.iter().map(|e| e.old_sources.as_slice()).collect();
    let control: Option<Vec<f64>> = window.iter().map(|e| e.control_new).collect();
    let (metric, values, same_rows) = match (compare::same_rows_series(&groups), control) {
        (Some(v), _) => ("control_same_rows", v, true),
        (None, Some(v)) => ("control_loss_new", v, false),
        (None, None) => (
            "train_loss_ema",
            window.iter().map(|e| e.train_loss_ema).collect(),
            false,
        ),
    };
    let reference = values[0];
    let best = values[1..].iter().copied().fold(f64::INFINITY, f64::min);
    let scale = if reference.abs() > 0.0 {
        reference.abs()
    } else {
        1.0
    };
    let rel = (reference - best) / scale;
    let rise = (values[n - 1] - reference) / scale;
    Some(PlateauCheck {
        metric: metric.to_string(),
        // A non-finite loss (diverged) is never a plateau.
        plateau: values.iter().all(|v| v.is_finite())
            && rel < cfg.plateau_tolerance
            && (same_rows || rise <= cfg.plateau_tolerance),
        window: values,
        relative_improvement: rel,
        relative_rise: rise,
        tolerance: cfg.plateau_tolerance,
    })
}

fn layer_checks(
    state: &GovernorState,
    inputs: &GovernorInputs,
    cfg: &GovernorConfig,
) -> Vec<LayerCheck> {
    inputs
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let ls = state.layers.get(i).copied().unwrap_or_default();
            let saturation = if l.branches > 0 {
                l.effective_paths / l.branches as f64
            } else {
                0.0
            };
            let room_width = cfg.max_branches_per_layer.saturating_sub(l.branches);
            let room_params = cfg.max_params.saturating_sub(inputs.params) / l.branch_params.max(1);
            let addable = cfg
                .branches_per_expansion
                .min(room_width)
                .min(usize::try_from(room_params).unwrap_or(usize::MAX));
            let blocked = if room_width == 0 {
                Some(format!(
                    "at governor.max_branches_per_layer = {}",
                    cfg.max_branches_per_layer
                ))
            } else if addable == 0 {
                Some(format!(
                    "one more branch ({} params) would exceed governor.max_params = {} (now {})",
                    l.branch_params, cfg.max_params, inputs.params
                ))
            } else if inputs.step < ls.cooldown_until {
                Some(format!("cooling down until step {}", ls.cooldown_until))
            } else if saturation.is_nan() || saturation < cfg.saturation_threshold {
                Some(format!(
                    "not saturated: {saturation:.3} < governor.saturation_threshold = {}",
                    cfg.saturation_threshold
                ))
            } else {
                None
            };
            LayerCheck {
                layer: i,
                branches: l.branches,
                effective_paths: l.effective_paths,
                saturation,
                cooldown_until: ls.cooldown_until,
                addable,
                blocked,
            }
        })
        .collect()
}

fn consider_expansion(
    state: &GovernorState,
    inputs: &GovernorInputs,
    cfg: &GovernorConfig,
) -> Decision {
    let step = inputs.step;
    let basis = Basis {
        plateau: plateau_check(&state.history, cfg),
        layers: layer_checks(state, inputs, cfg),
        params: inputs.params,
        max_params: cfg.max_params,
    };
    let none = |reason: String, basis: Basis| Decision::None {
        step,
        reason,
        basis: Some(basis),
    };
    if !cfg.enabled {
        return none(
            "automatic expansion is off (governor.enabled = false)".to_string(),
            basis,
        );
    }
    let Some(p) = &basis.plateau else {
        return none(
            format!(
                "{} of {} evals needed for the plateau test",
                state.history.len(),
                cfg.patience + 1
            ),
            basis,
        );
    };
    if !p.plateau {
        return none(
            format!(
                "no plateau: {} improved by {:.5} (relative) over {} evals, tolerance {}",
                p.metric, p.relative_improvement, cfg.patience, p.tolerance
            ),
            basis,
        );
    }
    let best =
        basis
            .layers
            .iter()
            .filter(|l| l.blocked.is_none())
            .fold(None::<&LayerCheck>, |acc, l| match acc {
                Some(a) if a.saturation >= l.saturation => Some(a),
                _ => Some(l),
            });
    let Some(l) = best else {
        return none(
            "loss plateau, but no layer can grow (see basis.layers)".to_string(),
            basis,
        );
    };
    let reason = format!(
        "loss plateau ({} improved {:.5} < {} over {} evals) and layer {} saturated (effective paths {:.2} / {} = {:.3} >= {})",
        p.metric,
        p.relative_improvement,
        p.tolerance,
        cfg.patience,
        l.layer,
        l.effective_paths,
        l.branches,
        l.saturation,
        cfg.saturation_threshold
    );
    Decision::Expand {
        step,
        layer: l.layer,
        branches: l.addable,
        beta: cfg.beta,
        ramp_steps: cfg.ramp_steps,
        reason,
        basis,
    }
}

fn judge(exp: &Expansion, now: &EvalPoint, cfg: &GovernorConfig) -> Judgement {
    let base = exp.baseline.as_ref();
    let sources = base.map_or_else(Vec::new, |b| {
        compare::changes(&b.old_sources, &now.old_sources)
    });
    let control = base.and_then(|b| b.control_new).zip(now.control_new);
    let (metric, baseline, now_loss, regression) = match (base, control) {
        (Some(_), _) if !sources.is_empty() => {
            let (b, n) = compare::means(&sources);
            let worst = sources
                .iter()
                .map(|c| c.after - c.before)
                .fold(f64::NEG_INFINITY, f64::max);
            ("control_same_rows", Some(b), n, worst)
        }
        (Some(b), Some((bn, nn))) => {
            let regression = b
                .control_old
                .zip(now.control_old)
                .map_or(0.0, |(bo, no)| no - bo);
            ("control", Some(bn), nn, regression)
        }
        (Some(b), None) => (
            "train_loss_ema",
            Some(b.train_loss_ema),
            now.train_loss_ema,
            0.0,
        ),
        (None, _) => (
            "none",
            None,
            now.control_new.unwrap_or(now.train_loss_ema),
            0.0,
        ),
    };
    Judgement {
        metric: metric.to_string(),
        baseline,
        now: now_loss,
        gain: baseline.map_or(0.0, |b| b - now_loss),
        regression,
        sources,
        baseline_old: base.and_then(|b| b.control_old),
        now_old: now.control_old,
        min_gain: cfg.min_gain,
        max_regression: cfg.max_regression,
    }
}

fn advance_expansion(
    state: &mut GovernorState,
    mut exp: Expansion,
    inputs: &GovernorInputs,
    cfg: &GovernorConfig,
) -> Decision {
    let step = inputs.step;
    match exp.phase {
        Phase::Ramp => {
            let eta = exp.eta_at(step);
            if step >= exp.start_step + exp.ramp_steps {
                exp.phase = Phase::Probation { since: step };
            }
            let layer = exp.layer;
            state.in_progress = Some(exp);
            Decision::SetEta { step, layer, eta }
        }
        Phase::Probation { since } => {
            let due = since + cfg.probation_steps;
            let Some(now) = inputs.eval.as_ref().filter(|_| step >= due) else {
                return Decision::None {
                    step,
                    reason: format!(
                        "expansion of layer {} in probation until the first eval at step >= {due}",
                        exp.layer
                    ),
                    basis: None,
                };
            };
            let j = judge(&exp, now, cfg);
            let gain_ok = j.metric == "none" || j.gain >= j.min_gain;
            // NaN (a diverged loss) passes neither test.
            let regression_ok = j.regression <= j.max_regression;
            state.in_progress = None;
            state.history = vec![now.clone()];
            if gain_ok && regression_ok {
                let ls = state.layer_mut(exp.layer);
                ls.backoff = 1.0;
                ls.kept += 1;
                ls.cooldown_until = step + cfg.cooldown_steps;
                Decision::Keep {
                    step,
                    layer: exp.layer,
                    branches: exp.branches,
                    judgement: j,
                }
            } else {
                let reason = if gain_ok {
                    format!(
                        "{} regression {:.5} > governor.max_regression = {}",
                        j.metric, j.regression, j.max_regression
                    )
                } else {
                    format!(
                        "{} improved by {:.5} < governor.min_gain = {}",
                        j.metric, j.gain, j.min_gain
                    )
                };
                let ls = state.layer_mut(exp.layer);
                ls.backoff *= cfg.backoff_factor;
                ls.rolled_back += 1;
                let cooldown =
                    (cfg.cooldown_steps as f64 * ls.backoff).min(u64::MAX as f64 / 2.0) as u64;
                ls.cooldown_until = exp.start_step.saturating_add(cooldown);
                state.history.clear();
                state.rollbacks_total += 1;
                Decision::Rollback {
                    step,
                    checkpoint_id: exp.checkpoint_id,
                    layer: exp.layer,
                    reason,
                    judgement: j,
                }
            }
        }
    }
}

/// The governor's decision at `inputs.step`; updates `state` (eval history, expansion
/// phase, cool-downs, back-offs, decision log). Pure: same state and inputs, same result.
pub fn decide(
    state: &mut GovernorState,
    inputs: &GovernorInputs,
    cfg: &GovernorConfig,
) -> Decision {
    if let Some(e) = &inputs.eval {
        push_capped(&mut state.history, e.clone(), HISTORY_CAP);
    }
    let decision = match state.in_progress.clone() {
        Some(exp) => advance_expansion(state, exp, inputs, cfg),
        None if inputs.eval.is_some() => consider_expansion(state, inputs, cfg),
        None => Decision::None {
            step: inputs.step,
            reason: "expansions are decided at evals".to_string(),
            basis: None,
        },
    };
    let log = match &decision {
        Decision::SetEta { .. } => false,
        Decision::None { .. } => inputs.eval.is_some(),
        _ => true,
    };
    if log {
        push_capped(&mut state.last_decisions, decision.clone(), DECISIONS_CAP);
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Section;

    /// [`cfg`] with one change.
    fn cfg_with(edit: impl FnOnce(&mut GovernorConfig)) -> GovernorConfig {
        let mut c = cfg();
        edit(&mut c);
        c
    }

    fn cfg() -> GovernorConfig {
        GovernorConfig {
            patience: 2,
            plateau_tolerance: 0.01,
            saturation_threshold: 0.7,
            cooldown_steps: 100,
            max_branches_per_layer: 4,
            max_params: 10_000,
            branches_per_expansion: 1,
            beta: 0.2,
            ramp_steps: 10,
            probation_steps: 50,
            min_gain: 0.01,
            max_regression: 0.05,
            backoff_factor: 2.0,
            enabled: true,
        }
    }

    fn eval(step: u64, old: f64, new: f64) -> EvalPoint {
        EvalPoint {
            step,
            control_old: Some(old),
            control_new: Some(new),
            train_loss_ema: new + 0.1,
            old_sources: vec![],
        }
    }

    /// Layer 0 barely used (1.2 of 3 paths), layer 1 saturated (2.8 of 3).
    fn inputs(step: u64, e: Option<EvalPoint>) -> GovernorInputs {
        GovernorInputs {
            step,
            eval: e,
            layers: vec![
                LayerInput {
                    branches: 3,
                    effective_paths: 1.2,
                    branch_params: 1000,
                },
                LayerInput {
                    branches: 3,
                    effective_paths: 2.8,
                    branch_params: 1000,
                },
            ],
            params: 6000,
        }
    }

    /// Feeds evals with the given new-era losses at steps 10, 20, ...; returns the last decision.
    fn feed(state: &mut GovernorState, losses: &[f64], c: &GovernorConfig) -> Decision {
        let evals = losses.iter().enumerate().map(|(i, &l)| {
            let step = 10 * (i as u64 + 1);
            eval(step, 3.0, l)
        });
        feed_evals(state, evals, c)
    }

    /// Feeds each eval at its step; returns the last decision.
    fn feed_evals(
        state: &mut GovernorState,
        evals: impl IntoIterator<Item = EvalPoint>,
        c: &GovernorConfig,
    ) -> Decision {
        let mut last = None;
        for e in evals {
            last = Some(decide(state, &inputs(e.step, Some(e)), c));
        }
        last.expect("at least one eval")
    }

    #[test]
    fn improving_loss_does_not_expand() {
        let mut s = GovernorState::default();
        let d = feed(&mut s, &[4.0, 3.5, 3.0, 2.5], &cfg());
        match d {
            Decision::None {
                reason,
                basis: Some(b),
                ..
            } => {
                assert!(reason.contains("no plateau"), "{reason}");
                let p = b.plateau.unwrap();
                assert_eq!(p.window, vec![3.5, 3.0, 2.5]);
                assert!((p.relative_improvement - 1.0 / 3.5).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        let mut s = GovernorState::default();
        let d = feed(&mut s, &[4.0, 4.0], &cfg());
        assert!(
            matches!(d, Decision::None { ref reason, .. } if reason.contains("2 of 3 evals")),
            "{d:?}"
        );
    }

    #[test]
    fn plateau_expands_the_most_saturated_layer() {
        let mut s = GovernorState::default();
        let d = feed(&mut s, &[4.0, 3.0, 2.999, 2.998], &cfg());
        match &d {
            Decision::Expand {
                step,
                layer,
                branches,
                beta,
                ramp_steps,
                reason,
                basis,
            } => {
                assert_eq!(
                    (*step, *layer, *branches, *beta, *ramp_steps),
                    (40, 1, 1, 0.2, 10)
                );
                assert!(reason.contains("layer 1 saturated"), "{reason}");
                assert!(
                    basis.layers[0]
                        .blocked
                        .as_ref()
                        .unwrap()
                        .contains("not saturated")
                );
                assert!((basis.layers[1].saturation - 2.8 / 3.0).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        assert!(s.last_decisions.last() == Some(&d));
        // No new proposal on a step without eval.
        assert!(matches!(
            decide(&mut s, &inputs(41, None), &cfg()),
            Decision::None { .. }
        ));
    }

    #[test]
    fn diverged_loss_is_not_a_plateau_and_state_still_round_trips() {
        let mut s = GovernorState::default();
        let d = feed(&mut s, &[3.0, f64::NAN, 3.0], &cfg());
        let Decision::None { basis: Some(b), .. } = d else {
            panic!("{d:?}")
        };
        assert!(!b.plateau.unwrap().plateau);
        let e = eval_rows(40, f64::NAN, vec![]);
        decide(&mut s, &inputs(40, Some(e)), &cfg());
        let json = serde_json::to_string(&s).unwrap();
        let back: GovernorState = serde_json::from_str(&json).unwrap();
        assert!(back.history.last().unwrap().train_loss_ema.is_nan());
        assert_eq!(back.history.len(), s.history.len());
        assert_eq!(back.last_decisions.len(), s.last_decisions.len());
    }

    /// The plateau metric a decision was based on (`None` when it has no plateau basis).
    fn plateau_metric(d: &Decision) -> Option<&str> {
        let basis = match d {
            Decision::Expand { basis, .. } => Some(basis),
            Decision::None { basis, .. } => basis.as_ref(),
            _ => None,
        };
        Some(basis?.plateau.as_ref()?.metric.as_str())
    }

    #[test]
    fn plateau_falls_back_to_train_loss_without_control() {
        let mut s = GovernorState::default();
        let evals = [10, 20, 30].map(|step| eval_rows(step, 2.0, vec![]));
        let d = feed_evals(&mut s, evals, &cfg());
        assert!(matches!(d, Decision::Expand { .. }), "{d:?}");
        assert_eq!(plateau_metric(&d), Some("train_loss_ema"));
    }

    #[test]
    fn budgets_are_respected() {
        let c = cfg_with(|c| c.branches_per_expansion = 3);
        // Width: layer 1 may get only 1 more branch (3 → 4).
        let mut s = GovernorState::default();
        let Decision::Expand { branches, .. } = feed(&mut s, &[3.0, 3.0, 3.0], &c) else {
            panic!()
        };
        assert_eq!(branches, 1);
        // Params: 6000 + 2·1000 ≤ 8000 allows 2 with a larger width budget.
        let c2 = GovernorConfig {
            max_branches_per_layer: 8,
            max_params: 8000,
            ..c.clone()
        };
        let mut s = GovernorState::default();
        let Decision::Expand { branches, .. } = feed(&mut s, &[3.0, 3.0, 3.0], &c2) else {
            panic!()
        };
        assert_eq!(branches, 2);
        // Params: no room for even one branch.
        let c3 = GovernorConfig {
            max_params: 6500,
            ..c
        };
        let mut s = GovernorState::default();
        match feed(&mut s, &[3.0, 3.0, 3.0], &c3) {
            Decision::None {
                reason,
                basis: Some(b),
                ..
            } => {
                assert!(reason.contains("no layer can grow"));
                assert!(b.layers[1].blocked.as_ref().unwrap().contains("max_params"));
            }
            other => panic!("{other:?}"),
        }
        // Width: at the maximum.
        let c4 = cfg_with(|c| c.max_branches_per_layer = 3);
        let mut s = GovernorState::default();
        assert!(matches!(
            feed(&mut s, &[3.0, 3.0, 3.0], &c4),
            Decision::None { .. }
        ));
        // Manual checks use the same budgets.
        let s = GovernorState::default();
        assert!(s.check_manual(0, 1, &inputs(0, None), &cfg()).is_ok());
        assert!(
            s.check_manual(0, 2, &inputs(0, None), &cfg())
                .unwrap_err()
                .to_string()
                .contains("max_branches_per_layer")
        );
        assert!(s.check_manual(5, 1, &inputs(0, None), &cfg()).is_err());
        assert!(
            s.check_manual(0, 1, &inputs(0, None), &c3)
                .unwrap_err()
                .to_string()
                .contains("max_params")
        );
    }

    fn start(s: &mut GovernorState, step: u64, manual: bool, c: &GovernorConfig) {
        s.register_expansion(
            ExpansionStart {
                layer: 1,
                branches: 1,
                step,
                checkpoint_id: "ckpt-pre".into(),
                manual,
                baseline: None,
            },
            c,
        )
        .unwrap();
    }

    /// Runs the ramp from `from` and probation; returns the decision at the judging eval.
    fn run_expansion(
        s: &mut GovernorState,
        from: u64,
        old: f64,
        new: f64,
        c: &GovernorConfig,
    ) -> Decision {
        let mut etas = Vec::new();
        for step in from..=from + c.ramp_steps {
            match decide(s, &inputs(step, None), c) {
                Decision::SetEta { layer: 1, eta, .. } => etas.push(eta),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(etas.len() as u64, c.ramp_steps + 1);
        assert_eq!(etas[0], 0.0);
        assert!((etas[c.ramp_steps as usize / 2] - c.beta / 2.0).abs() < 1e-12);
        assert_eq!(*etas.last().unwrap(), c.beta);
        let since = from + c.ramp_steps;
        assert_eq!(
            s.in_progress.as_ref().unwrap().phase,
            Phase::Probation { since }
        );
        // An eval before the end of probation does not judge.
        let d = decide(s, &inputs(since + 1, Some(eval(since + 1, old, new))), c);
        assert!(
            matches!(d, Decision::None { ref reason, .. } if reason.contains("probation")),
            "{d:?}"
        );
        let end = since + c.probation_steps;
        assert!(matches!(
            decide(s, &inputs(end, None), c),
            Decision::None { .. }
        ));
        decide(s, &inputs(end, Some(eval(end, old, new))), c)
    }

    #[test]
    fn probation_pass_keeps_and_cools_down() {
        let c = cfg();
        let mut s = GovernorState::default();
        feed(&mut s, &[3.0, 3.0, 3.0], &c); // baseline: old 3.0, new 3.0
        start(&mut s, 40, false, &c);
        assert_eq!(s.expansions_total, 1);
        let d = run_expansion(&mut s, 40, 3.02, 2.95, &c);
        let Decision::Keep {
            layer: 1,
            branches: 1,
            judgement,
            step,
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!(judgement.metric, "control");
        assert!((judgement.gain - 0.05).abs() < 1e-12);
        assert!((judgement.regression - 0.02).abs() < 1e-12);
        assert!(s.in_progress.is_none());
        assert_eq!(s.layers[1].kept, 1);
        assert_eq!(s.layers[1].cooldown_until, step + c.cooldown_steps);
        // Cool-down: a plateau right after does not grow layer 1 again.
        let evals = (1..=3).map(|i| eval(step + i, 3.0, 2.95));
        match feed_evals(&mut s, evals, &c) {
            Decision::None { basis: Some(b), .. } => {
                assert!(
                    b.layers[1]
                        .blocked
                        .as_ref()
                        .unwrap()
                        .contains("cooling down")
                );
            }
            other => panic!("{other:?}"),
        }
        // After the cool-down it may.
        let later = step + c.cooldown_steps;
        let evals = (0..3).map(|i| eval(later + i, 3.0, 2.95));
        assert!(matches!(
            feed_evals(&mut s, evals, &c),
            Decision::Expand { layer: 1, .. }
        ));
    }

    #[test]
    fn old_era_regression_rolls_back_and_backs_off() {
        let c = cfg();
        let mut s = GovernorState::default();
        feed(&mut s, &[3.0, 3.0, 3.0], &c);
        start(&mut s, 40, false, &c);
        let d = run_expansion(&mut s, 40, 3.2, 2.9, &c);
        let Decision::Rollback {
            checkpoint_id,
            layer,
            reason,
            judgement,
            ..
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!((checkpoint_id.as_str(), layer), ("ckpt-pre", 1));
        assert!(reason.contains("control regression 0.2"), "{reason}");
        assert!((judgement.regression - 0.2).abs() < 1e-12);
        assert_eq!(s.rollbacks_total, 1);
        assert_eq!(s.layers[1].backoff, 2.0);
        // Cool-down counts from the restored step (the expansion's start).
        assert_eq!(s.layers[1].cooldown_until, 40 + 200);
        assert!(s.history.is_empty() && s.in_progress.is_none());
        // A second failure doubles the back-off again; a success resets it.
        start(&mut s, 40, false, &c);
        s.in_progress.as_mut().unwrap().baseline = Some(eval(40, 3.0, 3.0));
        let d = run_expansion(&mut s, 40, 3.0, 3.0, &c);
        assert!(
            matches!(&d, Decision::Rollback { reason, .. } if reason.contains("control improved by")),
            "{d:?}"
        );
        assert_eq!(s.layers[1].backoff, 4.0);
        assert_eq!(s.layers[1].cooldown_until, 40 + 400);
        start(&mut s, 40, false, &c);
        s.in_progress.as_mut().unwrap().baseline = Some(eval(40, 3.0, 3.0));
        assert!(matches!(
            run_expansion(&mut s, 40, 3.0, 2.5, &c),
            Decision::Keep { .. }
        ));
        assert_eq!(s.layers[1].backoff, 1.0);
    }

    #[test]
    fn disabled_never_auto_expands_but_manual_goes_through_probation() {
        let c = cfg_with(|c| c.enabled = false);
        let mut s = GovernorState::default();
        let d = feed(&mut s, &[3.0; 8], &c);
        assert!(
            matches!(&d, Decision::None { reason, .. } if reason.contains("governor.enabled")),
            "{d:?}"
        );
        assert!(
            s.last_decisions
                .iter()
                .all(|d| matches!(d, Decision::None { .. }))
        );
        start(&mut s, 80, true, &c);
        assert!(s.in_progress.as_ref().unwrap().manual);
        let err = s
            .register_expansion(
                ExpansionStart {
                    layer: 0,
                    branches: 1,
                    step: 80,
                    checkpoint_id: "x".into(),
                    manual: true,
                    baseline: None,
                },
                &c,
            )
            .unwrap_err();
        assert!(matches!(
            err,
            GovernorError::Busy {
                layer: 1,
                start_step: 80
            }
        ));
        assert!(matches!(
            run_expansion(&mut s, 80, 3.0, 3.5, &c),
            Decision::Rollback { .. }
        ));
    }

    fn src(source: &str, rows: u64, loss: f64) -> SourceLoss {
        SourceLoss {
            source: source.into(),
            rows,
            last_seq: 100 + rows,
            tokens: 5 * rows,
            loss,
        }
    }

    /// An eval without new-era rows: old-era groups and a train EMA only.
    fn eval_rows(step: u64, train: f64, old_sources: Vec<SourceLoss>) -> EvalPoint {
        EvalPoint {
            step,
            control_old: None,
            control_new: None,
            train_loss_ema: train,
            old_sources,
        }
    }

    #[test]
    fn a_jump_of_the_training_or_new_era_loss_is_harder_data_not_a_plateau() {
        let c = cfg_with(|c| c.plateau_tolerance = 0.05);
        // New data arrived at the third eval: the train EMA jumps (seen in a benchmark run).
        let mut s = GovernorState::default();
        let evals = [0.102, 0.107, 2.818]
            .into_iter()
            .enumerate()
            .map(|(i, t)| eval_rows(10 * (i as u64 + 1), t, vec![]));
        let last = Some(feed_evals(&mut s, evals, &c));
        let Some(Decision::None {
            basis: Some(b),
            reason,
            ..
        }) = last
        else {
            panic!("{last:?}")
        };
        let p = b.plateau.unwrap();
        assert_eq!(p.metric, "train_loss_ema");
        assert!(
            p.relative_improvement < 0.05 && p.relative_rise > 20.0,
            "{p:?}"
        );
        assert!(!p.plateau && reason.contains("no plateau"), "{reason}");
        // Same for the new-era control loss.
        let mut s = GovernorState::default();
        assert!(matches!(
            feed(&mut s, &[2.0, 2.0, 2.5], &c),
            Decision::None { .. }
        ));
        // Once the model has worked on it and stalled, it is one.
        assert!(matches!(
            feed(&mut s, &[2.5, 2.5], &c),
            Decision::Expand { .. }
        ));
    }

    #[test]
    fn the_plateau_is_measured_on_the_same_rows_when_every_source_has_them() {
        let c = cfg_with(|c| c.plateau_tolerance = 0.05);
        let a = |l| src("a", 64, l);
        // The train EMA still falls fast (new rows of b keep arriving), but on the same
        // held-out rows of a and b nothing improves: a plateau on control_same_rows.
        let mut s = GovernorState::default();
        let evals = [
            eval_rows(10, 3.0, vec![a(1.0), src("b", 30, 2.0)]),
            eval_rows(20, 2.5, vec![a(1.0), src("b", 30, 2.01)]),
            eval_rows(30, 2.0, vec![a(1.02), src("b", 30, 2.0)]),
        ];
        let mut last = Some(feed_evals(&mut s, evals, &c));
        let Some(Decision::Expand { ref basis, .. }) = last else {
            panic!("{last:?}")
        };
        let p = basis.plateau.clone().unwrap();
        assert_eq!(p.metric, "control_same_rows");
        // Token-weighted: a has 320 tokens, b 150.
        assert!((p.window[0] - (320.0 + 150.0 * 2.0) / 470.0).abs() < 1e-12);
        // A rise on the same rows (forgetting) counts as a plateau too.
        let mut s = GovernorState::default();
        let evals = [1.0, 1.1, 1.2]
            .into_iter()
            .enumerate()
            .map(|(i, l)| eval_rows(10 * (i as u64 + 1), 2.0, vec![a(l)]));
        last = Some(feed_evals(&mut s, evals, &c));
        assert!(matches!(last, Some(Decision::Expand { .. })), "{last:?}");
        // b's rows changed inside the window: fall back to the train EMA (falling fast).
        let mut s = GovernorState::default();
        let evals = [
            eval_rows(10, 3.0, vec![a(1.0), src("b", 10, 2.0)]),
            eval_rows(20, 2.5, vec![a(1.0), src("b", 30, 2.0)]),
            eval_rows(30, 2.0, vec![a(1.0), src("b", 30, 2.0)]),
        ];
        let d = feed_evals(&mut s, evals, &c);
        assert!(matches!(d, Decision::None { .. }), "{d:?}");
        assert_eq!(plateau_metric(&d), Some("train_loss_ema"));
    }

    #[test]
    fn probation_judges_on_the_same_rows_so_harder_new_data_is_not_blamed() {
        let c = GovernorConfig {
            min_gain: 0.0,
            max_regression: 0.05,
            ..cfg()
        };
        let base = eval_rows(40, 1.0, vec![src("a", 64, 1.0), src("b", 64, 2.0)]);
        let judged = |now: Vec<SourceLoss>, train: f64| {
            let mut s = GovernorState::default();
            s.register_expansion(
                ExpansionStart {
                    layer: 1,
                    branches: 1,
                    step: 40,
                    checkpoint_id: "pre".into(),
                    manual: false,
                    baseline: Some(base.clone()),
                },
                &c,
            )
            .unwrap();
            decide(&mut s, &inputs(50, None), &c);
            let end = 50 + c.probation_steps;
            let mut e = eval_rows(end, train, now);
            // The old-era mean now includes the hard new source c.
            e.control_old = Some(3.0);
            decide(&mut s, &inputs(end, Some(e)), &c)
        };
        // Source c arrived during probation (train EMA and old-era mean jump); on the rows
        // measured at both evals the loss fell: kept.
        let d = judged(
            vec![src("a", 64, 0.98), src("b", 64, 1.9), src("c", 64, 5.0)],
            4.0,
        );
        let Decision::Keep { judgement: j, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(j.metric, "control_same_rows");
        assert_eq!(j.sources.len(), 2);
        let b = (320.0 * 1.0 + 320.0 * 2.0) / 640.0;
        let n = (320.0 * 0.98 + 320.0 * 1.9) / 640.0;
        assert!((j.gain - (b - n)).abs() < 1e-12, "{j:?}");
        assert!((j.regression - -0.02).abs() < 1e-12, "{j:?}");
        // One source worse by more than max_regression: rolled back, although the mean fell.
        let d = judged(vec![src("a", 64, 1.1), src("b", 64, 1.5)], 0.5);
        let Decision::Rollback {
            reason,
            judgement: j,
            ..
        } = d
        else {
            panic!("{d:?}")
        };
        assert!(j.gain > 0.0 && (j.regression - 0.1).abs() < 1e-12, "{j:?}");
        assert!(reason.contains("control_same_rows regression"), "{reason}");
        // No gain on the same rows: rolled back although the train EMA fell.
        let d = judged(vec![src("a", 64, 1.0), src("b", 64, 2.01)], 0.1);
        assert!(
            matches!(&d, Decision::Rollback { reason, .. } if reason.contains("improved by")),
            "{d:?}"
        );
    }

    #[test]
    fn states_written_before_per_source_losses_still_load() {
        let old = r#"{"step": 5, "control_old": 1.0, "control_new": null, "train_loss_ema": 2.0}"#;
        let e: EvalPoint = serde_json::from_str(old).unwrap();
        assert!(e.old_sources.is_empty() && e.control_new.is_none());
    }

    #[test]
    fn zero_ramp_and_missing_baseline() {
        let c = cfg_with(|c| c.ramp_steps = 0);
        let mut s = GovernorState::default();
        start(&mut s, 5, true, &c);
        assert!(
            matches!(decide(&mut s, &inputs(5, None), &c), Decision::SetEta { eta, .. } if eta == 0.2)
        );
        let d = decide(&mut s, &inputs(60, Some(eval(60, 9.0, 9.0))), &c);
        let Decision::Keep { judgement, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(judgement.metric, "none");
        assert!(s.abort_expansion().is_none());
    }

    #[test]
    fn state_and_decisions_round_trip_through_json() {
        let c = cfg();
        let mut s = GovernorState::default();
        feed(&mut s, &[3.0, 3.0, 3.0], &c);
        start(&mut s, 40, false, &c);
        decide(&mut s, &inputs(45, None), &c);
        let json = serde_json::to_string(&s).unwrap();
        let back: GovernorState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["last_decisions"][0]["decision"], "none");
        assert_eq!(v["last_decisions"][2]["decision"], "expand");
        assert_eq!(v["in_progress"]["phase"]["phase"], "ramp");
    }

    #[test]
    fn config_defaults_and_validation() {
        assert!(GovernorConfig::default().validate().is_ok());
        assert!(cfg().validate().is_ok());
        for (bad, field) in [
            (GovernorConfig { beta: 1.0, ..cfg() }, "governor.beta"),
            (cfg_with(|c| c.patience = 0), "governor.patience"),
            (
                cfg_with(|c| c.saturation_threshold = 1.5),
                "governor.saturation_threshold",
            ),
            (
                cfg_with(|c| c.backoff_factor = 0.5),
                "governor.backoff_factor",
            ),
            (
                cfg_with(|c| c.max_regression = f64::NAN),
                "governor.max_regression",
            ),
            (
                cfg_with(|c| c.branches_per_expansion = 0),
                "governor.branches_per_expansion",
            ),
        ] {
            assert!(
                bad.validate().unwrap_err().to_string().contains(field),
                "{field}"
            );
        }
        let parsed: GovernorConfig = toml::from_str("enabled = false\nbeta = 0.3").unwrap();
        assert!(!parsed.enabled);
        assert_eq!(parsed.patience, GovernorConfig::default().patience);
        assert!(toml::from_str::<GovernorConfig>("betta = 0.3").is_err());
    }
}
