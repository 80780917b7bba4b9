//! The trainer's side of the expansion governor: feeding it ([`governor_inputs`]), carrying
//! out its decisions (set `η`, expand, roll back), manual expansions, and `ctl governor`.
//! The decision rule itself is pure: [`crate::govern::policy`].

use super::trainer_events::DriftMeasured;
use super::trainer_worker::{Live, Worker, step_seed};
use crate::govern::drift::drift;
use crate::govern::policy::{
    self, Decision, EvalPoint, ExpansionStart, GovernorInputs, GovernorState, LayerInput, Phase,
};
use crate::telemetry::event::InternalEvent;
use crate::telemetry::names::{self as n, events};

/// Noise standard deviation of the copied weights in automatic expansions (as `ctl expand`).
const AUTO_EXPAND_NOISE: f32 = 1e-3;
/// Most governor actions (expansions, keeps, rollbacks with their outcomes) kept for `ctl governor`.
const ACTIONS_CAP: usize = 32;

/// Parameters one more branch of width `d` adds: its block tensors and its aggregation logit.
pub fn branch_params(d: usize) -> u64 {
    (0..crate::model::params::BRANCH_TENSORS.len())
        .map(|i| {
            crate::model::params::branch_shape(i, d)
                .iter()
                .product::<usize>() as u64
        })
        .sum::<u64>()
        + 1
}

/// What the governor sees of the model now (`eval`: a fresh scheduled evaluation).
pub(super) fn governor_inputs(live: &Live, eval: Option<EvalPoint>) -> GovernorInputs {
    let model = live.trainer.model();
    let per_branch = branch_params(model.config.d_model);
    GovernorInputs {
        step: live.trainer.step(),
        eval,
        layers: model
            .widths()
            .iter()
            .enumerate()
            .map(|(l, &k)| LayerInput {
                branches: k,
                effective_paths: live
                    .st
                    .eff_paths_ema
                    .get(l)
                    .copied()
                    .flatten()
                    .unwrap_or(f64::NAN),
                branch_params: per_branch,
            })
            .collect(),
        params: model.num_params() as u64,
    }
}

/// The `decision` label of a governor decision.
fn decision_kind(d: &Decision) -> &'static str {
    match d {
        Decision::None { .. } => "none",
        Decision::Expand { .. } => "expand",
        Decision::SetEta { .. } => "set_eta",
        Decision::Keep { .. } => "keep",
        Decision::Rollback { .. } => "rollback",
    }
}

impl Worker {
    /// Asks the governor and carries out its decision. `eval`: a scheduled evaluation just
    /// taken (expansions are proposed and judged only then); `None`: the per-step call that
    /// advances the `η` ramp of an expansion in progress (nothing happens without one).
    pub(super) fn govern(&mut self, eval: Option<EvalPoint>) {
        let cfg = self.a.cfg.governor.clone();
        let live = &mut self.live;
        if eval.is_none() && live.st.governor.in_progress.is_none() {
            return;
        }
        let phase = |g: &GovernorState| g.in_progress.as_ref().map(|e| e.phase);
        let was_ramp = phase(&live.st.governor) == Some(Phase::Ramp);
        let scheduled = eval.is_some();
        let inputs = governor_inputs(live, eval);
        let d = policy::decide(&mut live.st.governor, &inputs, &cfg);
        let ramp_done =
            was_ramp && matches!(phase(&live.st.governor), Some(Phase::Probation { .. }));
        let outcome = match &d {
            Decision::None { .. } if !scheduled => return,
            Decision::None { .. } | Decision::Keep { .. } => None,
            Decision::SetEta { layer, eta, .. } => Some(self.apply_eta(*layer, *eta, ramp_done)),
            Decision::Expand {
                layer,
                branches,
                beta,
                ramp_steps,
                ..
            } => Some(self.expand(
                *layer,
                *branches,
                *beta,
                *ramp_steps,
                AUTO_EXPAND_NOISE,
                false,
            )),
            Decision::Rollback { checkpoint_id, .. } => Some(self.governor_rollback(checkpoint_id)),
        };
        self.record_decision(&d, outcome, ramp_done);
    }

    /// Sets `η` of the newest group of `layer`; at the end of the ramp, the logits drift
    /// against the pre-expansion model is published.
    fn apply_eta(
        &mut self,
        layer: usize,
        eta: f64,
        ramp_done: bool,
    ) -> Result<serde_json::Value, String> {
        let live = &mut self.live;
        live.trainer
            .set_eta(layer, eta as f32)
            .map_err(|e| e.to_string())?;
        metrics::gauge!(n::ETA_INJECTION_LAST).set(eta);
        let alphas = live.trainer.model().alphas(layer);
        let added = live
            .st
            .governor
            .in_progress
            .as_ref()
            .map_or(0, |e| e.branches)
            .min(alphas.len());
        let sum_new: f32 = alphas[alphas.len() - added..].iter().sum();
        metrics::gauge!(n::SUM_W_NEW_LAST).set(sum_new as f64);
        let mut out = serde_json::json!({"eta": eta, "sum_w_new": sum_new});
        if ramp_done
            && let Some(probe) = &self.probe
            && let Some(before) = &self.pre_expand_logits
        {
            let all_on = live.trainer.model().all_active();
            if let Ok(after) = live.trainer.logits(probe, &all_on) {
                let d = drift(before, &after, live.trainer.model().config.vocab_size);
                DriftMeasured { drift: &d }.emit();
                out["drift_at_beta"] = serde_json::to_value(d).unwrap_or_default();
            }
        }
        Ok(out)
    }

    /// Restores the pre-expansion checkpoint after a failed probation, keeping the live
    /// governor state (it holds the back-off), as the policy requires.
    fn governor_rollback(&mut self, checkpoint_id: &str) -> Result<serde_json::Value, String> {
        let gov = self.live.st.governor.clone();
        let r = self.restore_named(checkpoint_id)?;
        self.live.st.governor = gov;
        tracing::info!(event = events::ROLLBACK, actor = "trainer", id = %checkpoint_id,
            step = r["step"].as_u64().unwrap_or(0), manual = false);
        Ok(r)
    }

    /// Logs a decision (`governor_decision`, its numbers and the outcome as JSON), counts it,
    /// and keeps expansions, keeps and rollbacks for `ctl governor`.
    fn record_decision(
        &mut self,
        d: &Decision,
        outcome: Option<Result<serde_json::Value, String>>,
        ramp_done: bool,
    ) {
        let kind = decision_kind(d);
        metrics::counter!(n::GOVERNOR_DECISIONS_TOTAL, "decision" => kind).increment(1);
        let in_progress = self.live.st.governor.in_progress.is_some();
        metrics::gauge!(n::GOVERNOR_EXPANSION_IN_PROGRESS).set(in_progress as u8 as f64);
        let mut detail = serde_json::to_value(d).unwrap_or_default();
        let failed = match &outcome {
            Some(Ok(v)) => {
                detail["outcome"] = v.clone();
                None
            }
            Some(Err(e)) => {
                detail["outcome"] = serde_json::json!({ "error": e });
                Some(e.clone())
            }
            None => None,
        };
        let json = detail.to_string();
        if let Some(e) = &failed {
            tracing::warn!(event = events::GOVERNOR_DECISION, actor = "trainer", decision = kind,
                error = %e, detail = %json, "the governor's decision could not be carried out");
        } else if kind == "set_eta" && !ramp_done {
            tracing::debug!(event = events::GOVERNOR_DECISION, actor = "trainer", decision = kind, detail = %json);
        } else {
            tracing::info!(event = events::GOVERNOR_DECISION, actor = "trainer", decision = kind, detail = %json);
        }
        match d {
            Decision::Expand { step, layer, .. }
            | Decision::Keep { step, layer, .. }
            | Decision::Rollback { step, layer, .. } => {
                self.last_event = match &failed {
                    Some(e) => format!("governor {kind} of layer {layer} failed: {e}"),
                    None => format!("governor: {kind} (layer {layer}) at step {step}"),
                };
                self.push_action(serde_json::json!({
                    "step": step,
                    "action": kind,
                    "decision": detail,
                }));
            }
            _ => {}
        }
    }

    pub(super) fn push_action(&mut self, v: serde_json::Value) {
        self.gov_actions.push_back(v);
        while self.gov_actions.len() > ACTIONS_CAP {
            self.gov_actions.pop_front();
        }
    }

    /// Widens `layer` by `branches`: a fresh baseline eval (manual expansions), the
    /// pre-expansion checkpoint, the expansion at `η = 0` with a bitwise check, registration
    /// with the governor, whose ramp (`β` over `ramp_steps`) and probation apply, and a
    /// checkpoint of the expanded model, so that an acknowledged expansion survives a crash.
    pub(super) fn expand(
        &mut self,
        layer: usize,
        branches: usize,
        beta: f64,
        ramp_steps: u64,
        noise: f32,
        manual: bool,
    ) -> Result<serde_json::Value, String> {
        let gcfg = self.a.cfg.governor.clone();
        if !(0.0..=1.0).contains(&beta) {
            return Err(format!("beta = {beta}: must be in 0 ..= 1"));
        }
        let Some(probe) = self.probe.clone() else {
            return Err("no probe batch yet: let the trainer take one step first".into());
        };
        // Budgets and "one expansion at a time" (cool-downs bind automatic expansions only).
        self.live
            .st
            .governor
            .check_manual(layer, branches, &governor_inputs(&self.live, None), &gcfg)
            .map_err(|e| e.to_string())?;
        // The outcome is judged against an eval at the expansion step; an automatic
        // expansion was decided at one (the governor's latest).
        let baseline = if manual {
            self.evaluate()
                .ok()
                .map(|r| r.point(self.live.st.train_loss_ema))
        } else {
            None
        };
        // Everything that can refuse the expansion is checked before the checkpoint is written.
        if !(noise >= 0.0 && noise.is_finite()) {
            return Err(format!("noise = {noise}: must be finite and >= 0"));
        }
        let pre = self.checkpoint(Some(crate::checkpoint::TAG_PRE_EXPAND.into()))?;
        let pre_id = pre["id"].as_str().unwrap_or_default().to_string();
        let live = &mut self.live;
        let all_on = live.trainer.model().all_active();
        let before = live
            .trainer
            .logits(&probe, &all_on)
            .map_err(|e| e.to_string())?;
        let seed = step_seed(self.a.cfg.training.seed ^ 0xe8a, live.trainer.step());
        let rep = live
            .trainer
            .expand(layer, branches, noise, seed)
            .map_err(|e| e.to_string())?;
        let widths = live.trainer.model().widths();
        live.avail.sync_widths(&widths);
        live.st.select_counts[layer].resize(rep.width, 0);
        let after = live
            .trainer
            .logits(&probe, &live.trainer.model().all_active())
            .map_err(|e| e.to_string())?;
        let bitwise_equal = before.len() == after.len()
            && before
                .iter()
                .zip(&after)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        let drift0 = drift(&before, &after, live.trainer.model().config.vocab_size);
        DriftMeasured { drift: &drift0 }.emit();
        let step = live.trainer.step();
        live.st
            .governor
            .register_expansion(
                ExpansionStart {
                    layer,
                    branches,
                    step,
                    checkpoint_id: pre_id.clone(),
                    manual,
                    baseline,
                },
                &gcfg,
            )
            .map_err(|e| e.to_string())?;
        // The operator's β and ramp length (automatic: the config's, already set).
        if let Some(e) = live.st.governor.in_progress.as_mut() {
            e.beta = beta;
            e.ramp_steps = ramp_steps;
        }
        let expansion = serde_json::to_value(&live.st.governor.in_progress).unwrap_or_default();
        self.pre_expand_logits = Some(before);
        metrics::counter!(n::EXPANSION_EVENTS_TOTAL).increment(1);
        metrics::gauge!(n::ETA_INJECTION_LAST).set(0.0);
        metrics::gauge!(n::SUM_W_NEW_LAST).set(0.0);
        metrics::gauge!(n::GOVERNOR_EXPANSION_IN_PROGRESS).set(1.0);
        tracing::info!(
            event = events::EXPANSION,
            actor = "trainer",
            layer,
            branches,
            width = rep.width,
            beta,
            ramp_steps,
            manual,
            bitwise_equal
        );
        self.last_event = format!("layer {layer} expanded to {} branches", rep.width);
        // Durable before it is acknowledged: a crash resumes with the new widths.
        let (checkpoint, checkpoint_error) = match self.checkpoint(None) {
            Ok(c) => (c["id"].clone(), None),
            Err(e) => {
                tracing::error!(actor = "trainer", layer, error = %e,
                    "the expanded model could not be checkpointed: a crash before the next checkpoint resumes at the pre-expansion widths");
                self.last_event = format!(
                    "layer {layer} expanded to {} branches, but not checkpointed ({e}): a crash now loses the expansion",
                    rep.width
                );
                (serde_json::Value::Null, Some(e))
            }
        };
        let reply = serde_json::json!({
            "step": step,
            "layer": layer,
            "width": rep.width,
            "sources": rep.sources,
            "manual": manual,
            "beta": beta,
            "ramp_steps": ramp_steps,
            "pre_expand_checkpoint": pre_id,
            "pre_expand_probe_logits_blake3": pre["probe_logits_blake3"],
            "logits_bitwise_equal_at_eta0": bitwise_equal,
            "drift_at_eta0": drift0,
            "widths": widths,
            "governor_expansion": expansion,
            "checkpoint": checkpoint,
            "checkpoint_error": checkpoint_error,
        });
        if manual {
            self.push_action(serde_json::json!({
                "step": step,
                "action": "manual_expand",
                "outcome": reply,
            }));
        }
        Ok(reply)
    }

    /// `ctl governor`: config, expansion in progress, per-layer cool-downs and back-offs,
    /// the inputs it sees now, recent decisions and actions.
    pub(super) fn governor_report(&self) -> serde_json::Value {
        let cfg = &self.a.cfg.governor;
        let last_rollback = self
            .gov_actions
            .iter()
            .rev()
            .find(|a| a["action"] == "rollback")
            .cloned();
        let live = &self.live;
        let g = &live.st.governor;
        let step = live.trainer.step();
        let inputs = governor_inputs(live, None);
        let etas = live.trainer.model().etas();
        let layers: Vec<serde_json::Value> = inputs
            .layers
            .iter()
            .enumerate()
            .map(|(l, li)| {
                let ls = g.layers.get(l).copied().unwrap_or_default();
                serde_json::json!({
                    "layer": l,
                    "width": li.branches,
                    "effective_paths_ema": li.effective_paths.is_finite().then_some(li.effective_paths),
                    "saturation": (li.effective_paths / li.branches as f64).is_finite()
                        .then_some(li.effective_paths / li.branches as f64),
                    "eta": etas.get(l),
                    "cooldown_until": ls.cooldown_until,
                    "cooling_down": step < ls.cooldown_until,
                    "backoff": ls.backoff,
                    "kept": ls.kept,
                    "rolled_back": ls.rolled_back,
                })
            })
            .collect();
        let in_progress = g.in_progress.as_ref().map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            v["eta_now"] = serde_json::json!(etas.get(e.layer));
            v["eta_scheduled"] = serde_json::json!(e.eta_at(step));
            if let Phase::Probation { since } = e.phase {
                v["judged_at_first_eval_from_step"] =
                    serde_json::json!(since + cfg.probation_steps);
            }
            v
        });
        serde_json::json!({
            "enabled": cfg.enabled,
            "step": step,
            "params": inputs.params,
            "branch_params": inputs.layers.first().map(|l| l.branch_params),
            "train_loss_ema": live.st.train_loss_ema,
            "in_progress": in_progress,
            "layers": layers,
            "expansions_total": g.expansions_total,
            "rollbacks_total": g.rollbacks_total,
            "history": g.history,
            "last_decisions": g.last_decisions,
            "last_actions": self.gov_actions,
            "last_rollback": last_rollback,
            "config": cfg,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn branch_params_is_what_one_more_branch_adds() {
        let cfg = crate::model::ModelConfig {
            vocab_size: 50,
            d_model: 16,
            n_heads: 2,
            n_layers: 2,
            branches: 2,
            max_seq_len: 8,
            ..Default::default()
        };
        let mut m = Model::new(cfg, 1).unwrap();
        let before = m.num_params() as u64;
        m.expand(1, 1, 0.0, 7).unwrap();
        assert_eq!(m.num_params() as u64 - before, branch_params(16));
    }
}
