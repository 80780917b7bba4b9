//! The trainer thread before its model exists: resume from the latest checkpoint (or
//! bootstrap a tokenizer and a fresh model from the first rows), answering commands
//! meanwhile; and [`restore`], which rebuilds a model and its loop state from a checkpoint
//! (resume and rollback). Once a model exists, [`super::trainer_worker::Worker`] takes over.

use std::time::Instant;

use super::checkpointer::{Load, Target};
use super::replay::FirstRows;
use super::trainer_commands::PauseMarker;
use super::trainer_wake::{Next, Woken, wait};
use super::trainer_worker::{
    Live, LoopState, PEER_RETRY, TOKENIZER_RETRY, WorkerArgs, ask_blocking,
};
use crate::checkpoint::LoadedCheckpoint;
use crate::config::Config;
use crate::govern::GovernorState;
use crate::model::{Model, Trainer, availability::Availability};
use crate::store::state::splitmix64;
use crate::telemetry::names::events;
use crate::text::csv_rows::RowBody;
use crate::text::tokenizer::Tokenizer;

/// Why the trainer thread cannot start: the checkpoint it must resume from is unreadable or
/// does not fit. The supervisor sees it as the trainer actor's failure.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(
        "the trainer cannot ask the checkpointer for its checkpoint: {0}; see the checkpointer's error above"
    )]
    Checkpointer(String),
    #[error(
        "the trainer cannot resume from checkpoint {id}: {reason}; roll back to an older checkpoint (`mbtd inspect checkpoint`), or start on a new data dir"
    )]
    Restore { id: String, reason: RestoreError },
}

/// Why a checkpoint cannot be restored into the trainer (resume and rollback).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the checkpoint lacks {0}")]
    MissingFile(&'static str),
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    #[error("model or optimizer: {0}")]
    Model(String),
    #[error("widths in model.safetensors {file:?} disagree with the manifest {manifest:?}")]
    Widths {
        file: Vec<usize>,
        manifest: Vec<usize>,
    },
    #[error("manifest loop state: {0}")]
    State(String),
}

/// Rebuilds the model and loop state of a checkpoint (resume and rollback).
pub(super) fn restore(cfg: &Config, c: &LoadedCheckpoint) -> Result<Live, RestoreError> {
    let f = |name: &'static str| c.file(name).ok_or(RestoreError::MissingFile(name));
    let tok_json = std::str::from_utf8(f("tokenizer.json")?)
        .map_err(|e| RestoreError::Tokenizer(e.to_string()))?;
    let tok = Tokenizer::from_json(tok_json, "tokenizer.json")
        .map_err(|e| RestoreError::Tokenizer(e.to_string()))?;
    let mut trainer = Trainer::from_bytes(
        cfg.model.clone(),
        cfg.optim.clone(),
        f("model.safetensors")?,
        Some(f("optimizer.safetensors")?),
    )
    .map_err(|e| RestoreError::Model(e.to_string()))?;
    trainer.set_dropout_seed(cfg.training.seed);
    if trainer.model().widths() != c.manifest.widths {
        return Err(RestoreError::Widths {
            file: trainer.model().widths(),
            manifest: c.manifest.widths.clone(),
        });
    }
    let st: LoopState = serde_json::from_value(c.manifest.state.clone())
        .map_err(|e| RestoreError::State(e.to_string()))?;
    let avail = Availability::try_from(st.availability.clone())
        .map_err(|e| RestoreError::State(e.to_string()))?;
    Ok(Live {
        tok,
        trainer,
        avail,
        st,
        parent: Some(c.manifest.id.clone()),
    })
}

/// The thread before the model exists.
pub(super) struct Booting {
    pub a: WorkerArgs,
    pub paused: PauseMarker,
    pub state_name: &'static str,
    pub last_event: String,
}

impl Booting {
    /// Loads LATEST (or the newest valid checkpoint) if there is one.
    pub(super) fn resume(&mut self) -> Result<Option<Live>, ResumeError> {
        let loaded = ask_blocking(&self.a.checkpointer, Load(Target::Resume))
            .map_err(ResumeError::Checkpointer)?;
        let Some(c) = loaded else {
            self.state_name = "waiting_for_tokenizer";
            tracing::info!(event = events::TRAINER_STARTED_FRESH, actor = "trainer");
            return Ok(None);
        };
        let id = c.manifest.id.clone();
        let live = restore(&self.a.cfg, &c).map_err(|reason| ResumeError::Restore {
            id: id.clone(),
            reason,
        })?;
        self.last_event = format!("resumed from checkpoint {id}");
        tracing::info!(event = events::TRAINER_RESUMED, actor = "trainer", id = %id,
            step = live.trainer.step());
        Ok(Some(live))
    }

    /// Waits for the tokenizer's rows (or file) and builds the model; `None` on `Stop`.
    pub(super) fn run(&mut self) -> Option<Live> {
        self.state_name = "waiting_for_tokenizer";
        let mut next = Next::Now;
        loop {
            self.publish();
            match wait(&self.a.wakes, next) {
                Woken::Closed => return None,
                Woken::Cmd(c) => {
                    if self.handle(c) {
                        return None;
                    }
                }
                Woken::Work => {}
            }
            if self.paused.is_paused() {
                next = Next::Wake;
                continue;
            }
            match self.bootstrap() {
                Ok(live) => return Some(live),
                Err(wait_for) => next = wait_for,
            }
        }
    }

    pub(super) fn publish(&self) {
        let state = if self.paused.is_paused() {
            "paused"
        } else {
            self.state_name
        };
        let _ = self.a.status.send(serde_json::json!({
            "state": state,
            "last_event": self.last_event,
        }));
    }

    /// Trains the tokenizer once the store holds `tokenizer.bootstrap_rows` rows (or loads
    /// `tokenizer.path`), then builds a fresh model. `Err`: what to wait for before trying
    /// again (`last_event` says why).
    pub(super) fn bootstrap(&mut self) -> Result<Live, Next> {
        let cfg = &self.a.cfg;
        let tok = if let Some(p) = &cfg.tokenizer.path {
            Tokenizer::load(p).map_err(|e| {
                self.last_event = format!("cannot load tokenizer {}: {e}", p.display());
                Next::At(Instant::now() + TOKENIZER_RETRY)
            })?
        } else {
            let rows = ask_blocking(&self.a.replay, FirstRows(cfg.tokenizer.bootstrap_rows))
                .map_err(|e| {
                    self.last_event = format!("replay unavailable: {e}");
                    Next::At(Instant::now() + PEER_RETRY)
                })?;
            if rows.len() < cfg.tokenizer.bootstrap_rows {
                self.last_event = format!(
                    "waiting for {} rows to train the tokenizer ({} so far)",
                    cfg.tokenizer.bootstrap_rows,
                    rows.len()
                );
                return Err(Next::Wake);
            }
            let texts = rows.into_iter().map(|r| match r.body {
                RowBody::Text { text } => text,
                RowBody::PromptResponse { prompt, response } => format!("{prompt} {response}"),
            });
            Tokenizer::train(texts, cfg.model.vocab_size, cfg.tokenizer.min_frequency).map_err(
                |e| {
                    self.last_event = format!("tokenizer training failed: {e}");
                    Next::Wake
                },
            )?
        };
        let seed = cfg.training.seed;
        let fresh = Model::new(cfg.model.clone(), seed)
            .map_err(|e| e.to_string())
            .and_then(|model| {
                let widths = model.widths();
                let mut trainer =
                    Trainer::new(model, cfg.optim.clone()).map_err(|e| e.to_string())?;
                trainer.set_dropout_seed(seed);
                let avail = Availability::new(cfg.availability.clone(), &widths, splitmix64(seed))
                    .map_err(|e| e.to_string())?;
                Ok((trainer, avail, widths))
            });
        let (trainer, avail, widths) = fresh.map_err(|e| {
            self.last_event = format!("cannot build the model from the config: {e}");
            Next::Wake
        })?;
        tracing::info!(
            event = events::TOKENIZER_READY,
            actor = "trainer",
            vocab = tok.vocab_size()
        );
        self.last_event = "tokenizer trained; training started".into();
        Ok(Live {
            tok,
            trainer,
            st: LoopState {
                cursor: 0,
                partial: None,
                tokens_total: 0,
                availability: avail.clone().into(),
                eval_boundary: 0,
                select_counts: widths.iter().map(|&k| vec![0; k]).collect(),
                steps_at_min_active: 0,
                last_control: (None, None),
                governor: GovernorState::default(),
                train_loss_ema: None,
                eff_paths_ema: Vec::new(),
            },
            avail,
            parent: None,
        })
    }
}
