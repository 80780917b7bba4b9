//! Operator commands of the trainer thread, answered between steps: the command type, the
//! answers before the model exists ([`Booting`]) and once it does ([`Worker`]), and the
//! durable pause marker.

use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};

use super::checkpointer::{Load, Target};
use super::trainer_boot::{Booting, restore};
use super::trainer_events::BranchMasked;
use super::trainer_worker::{Worker, ask_blocking};
use crate::model::Positions;
use crate::model::generate::GenerateConfig;
use crate::store::fsutil::{fsync_dir, write_atomic};
use crate::telemetry::event::InternalEvent;
use crate::telemetry::names::{self as n, events};

type Answer = oneshot::Sender<Result<serde_json::Value, String>>;

/// Operator commands, answered between steps.
pub enum Cmd {
    Pause(bool, oneshot::Sender<bool>),
    Mask {
        layer: usize,
        branch: usize,
        off: bool,
        reply: Answer,
    },
    Eval(Answer),
    Diagnostics(Answer),
    Generate {
        prompt: String,
        /// Answer the prompt as an instruction: `enc(prompt) ‖ <|response|>`, as trained.
        respond: bool,
        cfg: GenerateConfig,
        chunks: mpsc::Sender<String>,
        reply: Answer,
    },
    /// Manual expansion; `beta` / `ramp_steps` default to `governor.beta` / `.ramp_steps`.
    Expand {
        layer: usize,
        branches: usize,
        beta: Option<f32>,
        ramp_steps: Option<u64>,
        noise: f32,
        reply: Answer,
    },
    /// The governor's state, recent decisions and actions.
    Governor(Answer),
    Checkpoint(Option<String>, Answer),
    Rollback(String, Answer),
    /// Final checkpoint, then the thread ends.
    Stop(Answer),
}

const NO_MODEL: &str = "the model does not exist yet (waiting for the tokenizer)";

/// Whether training is paused by the operator, kept durably as the file
/// `<data dir>/trainer.paused` (present: paused), so a pause survives a restart.
pub struct PauseMarker {
    path: PathBuf,
    paused: bool,
}

impl PauseMarker {
    /// The marker of `data_dir`, read from disk.
    pub fn new(data_dir: &Path) -> Self {
        let path = data_dir.join("trainer.paused");
        Self {
            paused: path.exists(),
            path,
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses or resumes, durably. The in-memory state follows the request even when the
    /// marker cannot be written; the error says the pause will not survive a restart.
    pub fn set(&mut self, paused: bool) -> Result<(), String> {
        self.paused = paused;
        let r = if paused {
            write_atomic(
                &self.path,
                b"training paused by the operator (mbtd ctl pause)\n",
            )
        } else {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => self.path.parent().map_or(Ok(()), fsync_dir),
            }
        };
        r.map_err(|e| {
            format!(
                "cannot {} the pause marker {}: {e}; the {} holds until the daemon restarts only",
                if paused { "write" } else { "remove" },
                self.path.display(),
                if paused { "pause" } else { "resume" },
            )
        })
    }
}

/// Applies a pause command; the event line to show.
fn pause(marker: &mut PauseMarker, p: bool) -> String {
    match marker.set(p) {
        Ok(()) => if p {
            "training paused"
        } else {
            "training resumed"
        }
        .into(),
        Err(e) => {
            tracing::warn!(actor = "trainer", error = %e, "pause state not persisted");
            e
        }
    }
}

impl Booting {
    /// Answers a command before the model exists; true when the thread must end.
    pub(super) fn handle(&mut self, cmd: Cmd) -> bool {
        let no_model = |reply: Answer| {
            let _ = reply.send(Err(NO_MODEL.into()));
        };
        match cmd {
            Cmd::Pause(p, reply) => {
                self.last_event = pause(&mut self.paused, p);
                let _ = reply.send(p);
            }
            Cmd::Mask { reply, .. }
            | Cmd::Eval(reply)
            | Cmd::Diagnostics(reply)
            | Cmd::Generate { reply, .. }
            | Cmd::Expand { reply, .. }
            | Cmd::Rollback(_, reply) => no_model(reply),
            Cmd::Checkpoint(_, reply) => {
                let _ = reply.send(Err(
                    "nothing to checkpoint yet (waiting for the tokenizer)".into()
                ));
            }
            Cmd::Governor(reply) => {
                let cfg = &self.a.cfg.governor;
                let _ = reply.send(Ok(serde_json::json!({
                    "enabled": cfg.enabled,
                    "config": cfg,
                    "state": null,
                    "why": NO_MODEL,
                })));
            }
            Cmd::Stop(reply) => {
                let _ = reply.send(Ok(
                    serde_json::json!({"checkpoint": null, "why": "no model yet"}),
                ));
                return true;
            }
        }
        false
    }
}

impl Worker {
    /// Handles one command; true when the thread must end.
    pub(super) fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Pause(p, reply) => {
                self.last_event = pause(&mut self.paused, p);
                let _ = reply.send(p);
            }
            Cmd::Mask {
                layer,
                branch,
                off,
                reply,
            } => {
                let _ = reply.send(self.mask(layer, branch, off));
            }
            Cmd::Eval(reply) => {
                let _ = reply.send(self.evaluate().map(|r| r.to_json()));
            }
            Cmd::Diagnostics(reply) => {
                let _ = reply.send(Ok(self.diagnostics()));
            }
            Cmd::Generate {
                prompt,
                respond,
                cfg,
                chunks,
                reply,
            } => {
                let _ = reply.send(self.generate(&prompt, respond, cfg, &chunks));
            }
            Cmd::Expand {
                layer,
                branches,
                beta,
                ramp_steps,
                noise,
                reply,
            } => {
                let g = &self.a.cfg.governor;
                let beta = beta.map_or(g.beta, f64::from);
                let ramp_steps = ramp_steps.unwrap_or(g.ramp_steps);
                let _ = reply.send(self.expand(layer, branches, beta, ramp_steps, noise, true));
            }
            Cmd::Governor(reply) => {
                let _ = reply.send(Ok(self.governor_report()));
            }
            Cmd::Checkpoint(tag, reply) => {
                let _ = reply.send(self.checkpoint(tag));
            }
            Cmd::Rollback(target, reply) => {
                let _ = reply.send(self.rollback(target));
            }
            Cmd::Stop(reply) => {
                let _ = reply.send(self.checkpoint(Some("shutdown".into())));
                return true;
            }
        }
        false
    }

    /// Forces branch `branch` of `layer` off (or back on). Refused when the layer would
    /// keep fewer unmasked branches than `availability.min_active` (or its width, if less).
    fn mask(
        &mut self,
        layer: usize,
        branch: usize,
        off: bool,
    ) -> Result<serde_json::Value, String> {
        let avail = &mut self.live.avail;
        let min_active = avail.config().min_active;
        if off && let Some(row) = avail.forced_off().get(layer) {
            let available = row.iter().filter(|&&f| !f).count();
            let after = available - usize::from(row.get(branch) == Some(&false));
            let quorum = min_active.min(row.len());
            if after < quorum {
                return Err(format!(
                    "masking layer {layer} branch {branch} would leave {after} unmasked branch(es), \
                     fewer than availability.min_active = {min_active}; unmask another branch of \
                     layer {layer} first, or lower availability.min_active in the config"
                ));
            }
        }
        avail
            .set_forced_off(layer, branch, off)
            .map_err(|e| e.to_string())?;
        BranchMasked {
            layer,
            branch,
            off,
            avail,
        }
        .emit();
        Ok(
            serde_json::json!({"layer": layer, "branch": branch, "masked": off,
            "forced_off": avail.forced_off()}),
        )
    }

    fn diagnostics(&self) -> serde_json::Value {
        let live = &self.live;
        let model = live.trainer.model();
        let widths = model.widths();
        let etas = model.etas();
        let mut layers = Vec::new();
        for (l, &k) in widths.iter().enumerate() {
            layers.push(serde_json::json!({
                "layer": l,
                "width": k,
                "alpha": model.alphas(l),
                "eta": etas.get(l),
                "participation": live.avail.participation().get(l),
                "forced_off": live.avail.forced_off().get(l),
                "select_counts": live.st.select_counts.get(l),
            }));
        }
        for (entry, (d, energy)) in layers.iter_mut().zip(&self.last_diag) {
            let mut dj = serde_json::to_value(d).unwrap_or_default();
            dj["energy"] = serde_json::json!(energy);
            entry["last_step"] = dj;
        }
        serde_json::json!({
            "step": live.trainer.step(),
            "params": model.num_params(),
            "widths": widths,
            "layers": layers,
        })
    }

    fn generate(
        &mut self,
        prompt: &str,
        respond: bool,
        mut cfg: GenerateConfig,
        chunks: &mpsc::Sender<String>,
    ) -> Result<serde_json::Value, String> {
        let live = &mut self.live;
        let mut ids = live.tok.encode(prompt).map_err(|e| e.to_string())?;
        if respond {
            ids.push(live.tok.response_id());
        } else if ids.is_empty() {
            ids.push(live.tok.eot_id());
        }
        let max_seq_len = live.trainer.model().config.max_seq_len;
        let max_ctx = max_seq_len.saturating_sub(1).max(1);
        if ids.len() > max_ctx {
            ids.drain(..ids.len() - max_ctx);
        }
        cfg.end_token = Some(live.tok.eot_id());
        // rotary positions generate past max_seq_len with a sliding window
        if live.trainer.model().config.positions == Positions::Learned {
            cfg.max_tokens = cfg.max_tokens.min(max_seq_len - ids.len());
        }
        let masks = live.trainer.model().all_active();
        // with [cluster], the remote branches are computed by their nodes (live weights)
        let mut generated = live
            .trainer
            .generate(&ids, &masks, &cfg)
            .map_err(|e| e.to_string())?;
        let mut out: Vec<u32> = Vec::new();
        let mut sent = String::new();
        for id in generated.by_ref() {
            #[cfg(feature = "fault-injection")]
            super::injected_token_delay();
            if chunks.is_closed() {
                // The client went away: stop computing, whether or not a piece is due.
                break;
            }
            out.push(id);
            let text = live.tok.decode(&out).unwrap_or_default();
            if text.len() > sent.len() && text.starts_with(&sent) && !text.ends_with('\u{fffd}') {
                let piece = text[sent.len()..].to_string();
                sent = text;
                if chunks.blocking_send(piece).is_err() {
                    break;
                }
            }
        }
        let (lost, failed) = (
            generated.lost().to_vec(),
            generated.error().map(|e| e.to_string()),
        );
        // closes the generation's sessions on the nodes
        drop(generated);
        let text = live.tok.decode(&out).unwrap_or_default();
        if text.len() > sent.len() && text.starts_with(&sent) {
            let _ = chunks.blocking_send(text[sent.len()..].to_string());
        }
        let masked = self
            .cluster
            .as_ref()
            .map(|link| link.generation_lost(&self.live.trainer, &lost));
        if let Some(e) = failed {
            return Err(format!(
                "generation stopped after {} tokens: {e}",
                out.len()
            ));
        }
        let mut summary = serde_json::json!({"tokens": out.len(), "text": text});
        if let Some(masked) = masked {
            summary["masked"] = masked;
        }
        Ok(summary)
    }

    /// Restores checkpoint `target` (id, tag or `previous`): weights, optimizer, widths,
    /// loop state and step exactly; replay data stays.
    pub(super) fn restore_named(&mut self, target: &str) -> Result<serde_json::Value, String> {
        let loaded = ask_blocking(
            &self.a.checkpointer,
            Load(Target::Named(target.to_string())),
        )?
        .ok_or_else(|| format!("no checkpoint `{target}`"))?;
        let id = loaded.manifest.id.clone();
        let step = loaded.manifest.step;
        let live = restore(&self.a.cfg, &loaded)
            .map_err(|e| format!("cannot restore checkpoint {id}: {e}"))?;
        self.install(live);
        self.pre_expand_logits = None;
        metrics::counter!(n::ROLLBACKS_TOTAL).increment(1);
        self.last_event = format!("rolled back to {id}");
        let probe_logits = self.probe_hash();
        Ok(serde_json::json!({
            "id": id,
            "step": step,
            "widths": self.live.trainer.model().widths(),
            "probe_logits_blake3": probe_logits,
        }))
    }

    /// The operator's rollback. The governor keeps its live memory (cool-downs, back-offs,
    /// decisions); an expansion in progress is aborted unless the restored checkpoint was
    /// itself taken during one (its widths include the new branches, so that one goes on).
    fn rollback(&mut self, target: String) -> Result<serde_json::Value, String> {
        let mut g = self.live.st.governor.clone();
        let mut r = self.restore_named(&target)?;
        let live = &mut self.live;
        let restored = std::mem::take(&mut live.st.governor);
        let aborted = g.abort_expansion();
        if let Some(e) = restored.in_progress {
            g.in_progress = Some(e);
            g.history = restored.history;
        }
        r["governor_aborted_expansion"] = serde_json::to_value(&aborted).unwrap_or_default();
        r["governor_expansion"] = serde_json::to_value(&g.in_progress).unwrap_or_default();
        metrics::gauge!(n::GOVERNOR_EXPANSION_IN_PROGRESS)
            .set(g.in_progress.is_some() as u8 as f64);
        live.st.governor = g;
        tracing::info!(event = events::ROLLBACK, actor = "trainer", id = %r["id"].as_str().unwrap_or_default(),
            step = r["step"].as_u64().unwrap_or(0), manual = true,
            aborted_expansion = !r["governor_aborted_expansion"].is_null());
        if !r["governor_aborted_expansion"].is_null() {
            self.push_action(serde_json::json!({
                "step": r["step"],
                "action": "expansion_aborted_by_manual_rollback",
                "outcome": r.clone(),
            }));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_survives_a_new_marker_on_the_same_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = PauseMarker::new(dir.path());
        assert!(!m.is_paused());
        m.set(true).unwrap();
        assert!(PauseMarker::new(dir.path()).is_paused());
        m.set(false).unwrap();
        assert!(!PauseMarker::new(dir.path()).is_paused());
        // Resuming twice is not an error.
        m.set(false).unwrap();
    }

    #[test]
    fn an_unwritable_marker_is_reported_and_the_pause_still_holds() {
        let mut m = PauseMarker::new(Path::new("/nonexistent-dir-for-mbtd-test"));
        let e = m.set(true).unwrap_err();
        assert!(e.contains("until the daemon restarts"), "{e}");
        assert!(m.is_paused());
    }
}
