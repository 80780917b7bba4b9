//! Control-slice evaluation: the model's loss on held-out rows, per (source, era) group and
//! pooled per era, and its robustness to losing one branch.
//!
//! Each control row contributes its first window (see [`super::batch::windows`]). A group's
//! loss is the loss-mask-weighted mean cross-entropy over its rows' target tokens:
//! `L_g = Σ_b L_b·W_b / Σ_b W_b` over chunks `b` of `batch_size` windows, with `L_b` the
//! batch's weighted mean loss and `W_b` its number of target tokens. An era's loss pools its
//! groups the same way (token-weighted). The branch-outage losses mask one branch of one
//! layer at a time (layers of width ≥ 2) on a pooled sample of at most two windows per group,
//! `batch_size` windows in all.
//!
//! The result is an [`EvalReport`]: the governor reads [`EvalReport::point`] directly, and
//! [`EvalReport::to_json`] is the admin reply (`ctl eval`).

use std::collections::BTreeMap;

use crate::govern::{EvalPoint, SourceLoss};
use crate::model::{ModelError, Trainer};
use crate::store::replay::{ControlGroup, Era};
use crate::text::tokenizer::Tokenizer;

use super::batch::{Window, assemble, tokenize_record, windows};

/// Loss of one (source, era) group of the control slice, and which rows were measured (so
/// that the governor compares like with like).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupLoss {
    pub source: String,
    pub era: Era,
    /// Rows measured.
    pub rows: u64,
    /// Sequence number of the last row measured (0 when none).
    pub last_seq: u64,
    /// Target tokens measured.
    pub tokens: u64,
    pub loss: f64,
}

/// Loss with one branch masked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BranchOutLoss {
    pub layer: usize,
    pub branch: usize,
    pub loss: f32,
}

/// One control-slice evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Trainer step it was taken at.
    pub step: u64,
    /// Pooled loss of the old / new era; `None` where the era had no measurable rows.
    pub control_old: Option<f64>,
    pub control_new: Option<f64>,
    /// The previous evaluation's pooled losses (as carried in the loop state).
    pub previous: (Option<f64>, Option<f64>),
    pub groups: Vec<GroupLoss>,
    pub branch_out: Vec<BranchOutLoss>,
}

/// Why an evaluation could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("control evaluation failed in the model: {0}")]
    Model(#[from] ModelError),
}

/// The name of an era as it appears in metric labels and admin replies.
pub fn era_name(e: Era) -> &'static str {
    if e == Era::Old { "old" } else { "new" }
}

/// Evaluates `trainer`'s model (all branches on) on the control `groups`. `previous`: the
/// last evaluation's pooled losses, for the retention deltas.
pub fn evaluate(
    trainer: &mut Trainer,
    tok: &Tokenizer,
    groups: &[ControlGroup],
    seq_len: usize,
    batch_size: usize,
    previous: (Option<f64>, Option<f64>),
) -> Result<EvalReport, EvalError> {
    let eot = tok.eot_id();
    let all_on = trainer.model().all_active();
    let mut by_era = [(0.0f64, 0.0f64), (0.0, 0.0)];
    let mut out = Vec::new();
    let mut pooled: Vec<Window> = Vec::new();
    for g in groups {
        let ws: Vec<Window> = g
            .records
            .iter()
            .filter_map(|r| tokenize_record(tok, r).ok())
            .filter_map(|t| windows(&t, seq_len).into_iter().next())
            .collect();
        let (mut sum, mut w) = (0.0f64, 0.0f64);
        for chunk in ws.chunks(batch_size) {
            let refs: Vec<&Window> = chunk.iter().collect();
            let b = assemble(&refs, seq_len, eot);
            let weight: f64 = b.loss_mask.iter().map(|&x| x as f64).sum();
            let loss = trainer.eval_loss(&b, &all_on)?;
            sum += loss as f64 * weight;
            w += weight;
        }
        if w == 0.0 {
            continue;
        }
        let era = if g.era == Era::Old { 0 } else { 1 };
        by_era[era].0 += sum;
        by_era[era].1 += w;
        out.push(GroupLoss {
            source: g.source.clone(),
            era: g.era,
            rows: g.records.len() as u64,
            last_seq: g.records.last().map_or(0, |r| r.seq),
            tokens: w as u64,
            loss: sum / w,
        });
        pooled.extend(ws.into_iter().take(2));
    }
    let mean = |(s, w): (f64, f64)| if w > 0.0 { Some(s / w) } else { None };
    let mut branch_out = Vec::new();
    pooled.truncate(batch_size);
    if !pooled.is_empty() {
        let refs: Vec<&Window> = pooled.iter().collect();
        let b = assemble(&refs, seq_len, eot);
        for (l, &k) in trainer.model().widths().iter().enumerate() {
            if k < 2 {
                continue;
            }
            for i in 0..k {
                let mut m = all_on.clone();
                m[l][i] = false;
                if let Ok(loss) = trainer.eval_loss(&b, &m) {
                    branch_out.push(BranchOutLoss {
                        layer: l,
                        branch: i,
                        loss,
                    });
                }
            }
        }
    }
    Ok(EvalReport {
        step: trainer.step(),
        control_old: mean(by_era[0]),
        control_new: mean(by_era[1]),
        previous,
        groups: out,
        branch_out,
    })
}

fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite())
}

impl EvalReport {
    /// The pooled losses to carry forward: this evaluation's where an era was measured, the
    /// previous one's where it was not (`None` where neither is finite).
    pub fn carried(&self) -> (Option<f64>, Option<f64>) {
        (
            finite(self.control_old.or(self.previous.0)),
            finite(self.control_new.or(self.previous.1)),
        )
    }

    /// Change of the carried loss of each era against the previous evaluation (`0` when
    /// there was no previous value; `None` when there is no value at all).
    pub fn carried_deltas(&self) -> (Option<f64>, Option<f64>) {
        let (o, n) = self.carried();
        let d =
            |cur: Option<f64>, prev: Option<f64>| cur.map(|c| finite(prev).map_or(0.0, |p| c - p));
        (d(o, self.previous.0), d(n, self.previous.1))
    }

    /// The token-weighted control loss over every measured group (`None` without one).
    pub fn overall(&self) -> Option<f64> {
        let tokens: u64 = self.groups.iter().map(|g| g.tokens).sum();
        let sum: f64 = self.groups.iter().map(|g| g.loss * g.tokens as f64).sum();
        (tokens > 0).then(|| sum / tokens as f64)
    }

    /// The governor's view: only freshly measured, finite control losses (a missing era is
    /// `None`, never a stale value), and the per-source losses of the old era.
    pub fn point(&self, train_loss_ema: Option<f64>) -> EvalPoint {
        EvalPoint {
            step: self.step,
            control_old: finite(self.control_old),
            control_new: finite(self.control_new),
            train_loss_ema: train_loss_ema.unwrap_or(f64::NAN),
            old_sources: self
                .groups
                .iter()
                .filter(|g| g.era == Era::Old)
                .map(|g| SourceLoss {
                    source: g.source.clone(),
                    rows: g.rows,
                    last_seq: g.last_seq,
                    tokens: g.tokens,
                    loss: g.loss,
                })
                .collect(),
        }
    }

    /// The admin reply of `ctl eval`: pooled losses, retention deltas against the previous
    /// evaluation (`null` without one), `per_source` (`"source/era"` → loss), the groups and
    /// the branch-outage losses.
    pub fn to_json(&self) -> serde_json::Value {
        let delta =
            |cur: Option<f64>, prev: Option<f64>| finite(prev).and_then(|p| cur.map(|c| c - p));
        let per_source: BTreeMap<String, f64> = self
            .groups
            .iter()
            .map(|g| (format!("{}/{}", g.source, era_name(g.era)), g.loss))
            .collect();
        let groups: Vec<serde_json::Value> = self
            .groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "source": g.source, "era": era_name(g.era), "rows": g.rows,
                    "last_seq": g.last_seq, "tokens": g.tokens, "loss": g.loss,
                })
            })
            .collect();
        let branch_out: Vec<serde_json::Value> = self
            .branch_out
            .iter()
            .map(|b| serde_json::json!({"layer": b.layer, "branch": b.branch, "loss": b.loss}))
            .collect();
        serde_json::json!({
            "step": self.step,
            "loss_control_old": self.control_old,
            "loss_control_new": self.control_new,
            "retention_delta_old": delta(self.control_old, self.previous.0),
            "retention_delta_new": delta(self.control_new, self.previous.1),
            "per_source": per_source,
            "groups": groups,
            "branch_out": branch_out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> EvalReport {
        let g = |source: &str, era, tokens, loss| GroupLoss {
            source: source.into(),
            era,
            rows: 2,
            last_seq: 9,
            tokens,
            loss,
        };
        EvalReport {
            step: 40,
            control_old: Some(2.0),
            control_new: None,
            previous: (Some(2.5), Some(3.0)),
            groups: vec![g("a", Era::Old, 30, 1.0), g("b", Era::Old, 10, 5.0)],
            branch_out: vec![BranchOutLoss {
                layer: 0,
                branch: 1,
                loss: 2.5,
            }],
        }
    }

    #[test]
    fn the_governor_sees_only_fresh_losses_and_the_old_sources() {
        let r = report();
        let p = r.point(Some(1.5));
        assert_eq!(
            (p.step, p.control_old, p.control_new),
            (40, Some(2.0), None)
        );
        assert_eq!(p.train_loss_ema, 1.5);
        let sources: Vec<&str> = p.old_sources.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(sources, ["a", "b"]);
        assert!(r.point(None).train_loss_ema.is_nan());
        let mut nan = r.clone();
        nan.control_old = Some(f64::NAN);
        assert_eq!(nan.point(None).control_old, None);
    }

    #[test]
    fn an_unmeasured_era_carries_the_previous_loss_with_a_zero_delta() {
        let r = report();
        assert_eq!(r.carried(), (Some(2.0), Some(3.0)));
        assert_eq!(r.carried_deltas(), (Some(-0.5), Some(0.0)));
        assert_eq!(r.overall(), Some((30.0 + 50.0) / 40.0));
    }

    #[test]
    fn the_admin_reply_keeps_its_keys() {
        let v = report().to_json();
        assert_eq!(v["loss_control_old"], 2.0);
        assert!(v["loss_control_new"].is_null());
        assert_eq!(v["retention_delta_old"], -0.5);
        assert!(v["retention_delta_new"].is_null());
        assert_eq!(v["per_source"]["b/old"], 5.0);
        assert_eq!(v["groups"][0]["era"], "old");
        assert_eq!(v["branch_out"][0]["branch"], 1);
    }
}
