//! The checkpointer actor: owns `checkpoints/`. Writes snapshots handed over by the trainer
//! (atomically, then `LATEST`), applies retention, lists, and loads for resume/rollback.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use kameo::prelude::*;

use super::health::ChildHealth;
use crate::checkpoint::{
    self, CheckpointConfig, CheckpointError, LoadedCheckpoint, Manifest, apply_retention,
    plan_retention,
};
use crate::telemetry::names::{self, events};

#[derive(Clone)]
pub struct CheckpointerArgs {
    pub root: PathBuf,
    pub cfg: CheckpointConfig,
    pub health: Arc<ChildHealth>,
    /// Where the checkpoints line of `ctl status` is published (read without asking the
    /// actor, which may be busy writing).
    pub status: Arc<tokio::sync::watch::Sender<serde_json::Value>>,
}

pub struct CheckpointerActor {
    args: CheckpointerArgs,
    /// Checkpoints found corrupt or partial when resuming (shown by `ctl status`).
    rejected: Vec<String>,
    last_written: Option<String>,
    last_error: Option<String>,
}

impl Actor for CheckpointerActor {
    type Args = CheckpointerArgs;
    type Error = CheckpointError;

    fn name() -> &'static str {
        "checkpointer"
    }

    async fn on_start(args: Self::Args, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        args.health.on_start().await;
        std::fs::create_dir_all(&args.root).map_err(|e| {
            CheckpointError::InvalidInput(format!("cannot create {}: {e}", args.root.display()))
        })?;
        metrics::counter!(names::CHECKPOINTS_TOTAL).increment(0);
        metrics::counter!(names::CHECKPOINT_FAILURES_TOTAL).increment(0);
        metrics::counter!(names::CHECKPOINTS_REJECTED_TOTAL).increment(0);
        metrics::gauge!(names::CHECKPOINT_WRITE_SECONDS).set(0.0);
        metrics::gauge!(names::CHECKPOINT_BYTES).set(0.0);
        let me = Self {
            args,
            rejected: Vec::new(),
            last_written: None,
            last_error: None,
        };
        me.publish();
        Ok(me)
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        reason: ActorStopReason,
    ) -> Result<(), Self::Error> {
        self.args.health.on_stop(&reason.to_string());
        Ok(())
    }
}

/// A snapshot of the trainer, taken between steps: the manifest (without file hashes) and
/// the file contents.
pub struct Snapshot {
    pub manifest: Manifest,
    pub files: Vec<(&'static str, Vec<u8>)>,
}

/// Writes a snapshot; the reply carries the id or why it failed (previous checkpoints stay).
pub struct Write(pub Snapshot);

impl Message<Write> for CheckpointerActor {
    type Reply = Result<serde_json::Value, String>;

    async fn handle(&mut self, Write(s): Write, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let root = self.args.root.clone();
        let files: Vec<(&str, &[u8])> = s.files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let written = tokio::task::block_in_place(|| {
            checkpoint::write_checkpoint(&root, &s.manifest, &files)
        });
        match written {
            Ok(info) => {
                metrics::counter!(names::CHECKPOINTS_TOTAL).increment(1);
                metrics::gauge!(names::CHECKPOINT_WRITE_SECONDS).set(info.seconds);
                metrics::gauge!(names::CHECKPOINT_BYTES).set(info.bytes as f64);
                tracing::info!(
                    event = events::CHECKPOINT_WRITTEN,
                    actor = "checkpointer",
                    id = %info.id,
                    step = s.manifest.step,
                    tag = s.manifest.tag.as_deref().unwrap_or(""),
                    bytes = info.bytes,
                    seconds = info.seconds
                );
                self.retain();
                self.last_written = Some(info.id.clone());
                self.last_error = None;
                self.publish();
                Ok(serde_json::json!({
                    "id": info.id,
                    "step": s.manifest.step,
                    "bytes": info.bytes,
                    "seconds": info.seconds,
                }))
            }
            Err(e) => {
                metrics::counter!(names::CHECKPOINT_FAILURES_TOTAL).increment(1);
                tracing::error!(
                    event = events::CHECKPOINT_FAILED,
                    actor = "checkpointer",
                    step = s.manifest.step,
                    error = %e,
                    "checkpoint write failed; previous checkpoints are intact, will retry at the next trigger"
                );
                self.last_error = Some(e.to_string());
                self.publish();
                Err(e.to_string())
            }
        }
    }
}

impl CheckpointerActor {
    fn publish(&self) {
        let _ = self.args.status.send(serde_json::json!({
            "latest": checkpoint::read_latest(&self.args.root).ok().flatten(),
            "last_written": self.last_written,
            "last_error": self.last_error,
            "rejected_at_start": self.rejected,
        }));
    }

    fn retain(&self) {
        let root = &self.args.root;
        let Ok(list) = checkpoint::list(root) else {
            return;
        };
        let doomed = plan_retention(
            &list.checkpoints,
            &self.args.cfg.retention(),
            SystemTime::now(),
        );
        if !doomed.is_empty()
            && let Err(e) = apply_retention(root, &doomed)
        {
            tracing::warn!(actor = "checkpointer", error = %e, "retention could not remove old checkpoints");
        }
    }
}

/// Lists every checkpoint (`ctl checkpoints`).
pub struct List;

impl Message<List> for CheckpointerActor {
    type Reply = Result<checkpoint::CheckpointList, CheckpointError>;

    async fn handle(&mut self, _: List, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let root = self.args.root.clone();
        tokio::task::block_in_place(|| checkpoint::list(&root))
    }
}

/// Which checkpoint to load.
#[derive(Debug, Clone)]
pub enum Target {
    /// What the daemon resumes from at start: LATEST, or the newest valid one.
    Resume,
    /// An id, `previous` (parent of LATEST, else the one before it), or a tag (newest with it).
    Named(String),
}

/// Loads and verifies a checkpoint (resume or rollback). For a rollback, LATEST is moved to
/// it so that a restart resumes from the restored state.
pub struct Load(pub Target);

impl Message<Load> for CheckpointerActor {
    type Reply = Result<Option<LoadedCheckpoint>, String>;

    async fn handle(&mut self, Load(t): Load, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let root = self.args.root.clone();
        let r = tokio::task::block_in_place(|| load(&root, t, &mut self.rejected));
        self.publish();
        r
    }
}

fn load(
    root: &std::path::Path,
    t: Target,
    rejected: &mut Vec<String>,
) -> Result<Option<LoadedCheckpoint>, String> {
    match t {
        Target::Resume => {
            let r = checkpoint::open_latest(root).map_err(|e| e.to_string())?;
            for rej in &r.rejected {
                metrics::counter!(names::CHECKPOINTS_REJECTED_TOTAL).increment(1);
                tracing::error!(
                    event = events::CHECKPOINT_REJECTED,
                    actor = "checkpointer",
                    id = %rej.id,
                    reason = %rej.reason,
                    "checkpoint is corrupt or partial; falling back to an older valid one"
                );
                rejected.push(format!("{}: {}", rej.id, rej.reason));
            }
            if let Some(id) = checkpoint::repair_latest(root, &r).map_err(|e| e.to_string())? {
                tracing::warn!(
                    event = events::CHECKPOINT_LATEST_REPAIRED,
                    actor = "checkpointer",
                    id = %id,
                    was = ?r.latest_pointer,
                    "LATEST was missing or bad; it now names the checkpoint resumed from"
                );
            }
            Ok(r.checkpoint)
        }
        Target::Named(name) => {
            let list = checkpoint::list(root).map_err(|e| e.to_string())?;
            let latest = checkpoint::read_latest(root).map_err(|e| e.to_string())?;
            let valid: Vec<_> = list.checkpoints.iter().filter(|c| c.valid).collect();
            let id = if name == "previous" {
                let cur = valid.iter().position(|c| Some(&c.id) == latest.as_ref());
                match cur {
                    Some(i) if i > 0 => valid[i - 1].id.clone(),
                    _ => return Err("no checkpoint before LATEST to roll back to".into()),
                }
            } else if let Some(c) = valid.iter().find(|c| c.id == name) {
                c.id.clone()
            } else if let Some(c) = valid.iter().rev().find(|c| c.tag.as_deref() == Some(&name)) {
                c.id.clone()
            } else {
                return Err(format!(
                    "no valid checkpoint with id or tag `{name}`; `mbtd ctl checkpoints` lists them"
                ));
            };
            let loaded = checkpoint::load_checkpoint(&root.join(&id)).map_err(|e| e.to_string())?;
            checkpoint::set_latest(root, &id).map_err(|e| e.to_string())?;
            Ok(Some(loaded))
        }
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for CheckpointerActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: checkpointer actor told to crash");
    }
}
