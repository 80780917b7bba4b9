//! The trainer actor: a thin, always-responsive owner of the trainer's compute thread
//! ([`super::trainer_worker`]). Commands are forwarded to the thread and answered between
//! steps; status is read from a watch channel the thread updates, so `ctl status` never
//! waits for a step. Rows appended to the replay store wake the thread. A thread that dies,
//! or cannot resume from its checkpoint, makes the actor fail with the cause, and the
//! supervisor restarts it (the new thread resumes from the latest checkpoint).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Sender;

use kameo::prelude::*;
use tokio::sync::{oneshot, watch};

use super::checkpointer::CheckpointerActor;
use super::health::{Child, ChildHealth, child_actor};
use super::metrics::AbortOnDrop;
use super::replay::ReplayActor;
use super::trainer_worker::{self, Cmd, ResumeError, Wake, WorkerArgs};
use crate::config::Config;

#[derive(Clone)]
pub struct TrainerArgs {
    pub cfg: Config,
    pub replay: ActorRef<ReplayActor>,
    pub checkpointer: ActorRef<CheckpointerActor>,
    /// The daemon's data directory.
    pub data_dir: PathBuf,
    /// Changes when the replay store appended rows.
    pub appended: watch::Receiver<u64>,
    pub health: Arc<ChildHealth>,
    /// The coordinator's nodes (`[cluster]`).
    pub cluster: Option<Arc<crate::cluster::ClusterView>>,
}

pub struct TrainerActor {
    wakes: Sender<Wake>,
    status: watch::Receiver<serde_json::Value>,
    health: Arc<ChildHealth>,
    thread: Option<std::thread::JoinHandle<()>>,
    _watch: AbortOnDrop,
    _rows: AbortOnDrop,
}

/// Why the trainer actor failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("cannot start the trainer thread: {0}")]
    Spawn(std::io::Error),
    #[error("the trainer thread stopped unexpectedly (see the panic above); restarting")]
    ThreadDied,
    #[error(transparent)]
    Resume(#[from] ResumeError),
}

child_actor!(TrainerActor, "trainer", TrainerArgs, TrainerError);

impl Child for TrainerActor {
    fn health(&self) -> &ChildHealth {
        &self.health
    }

    async fn stopping(&mut self, reason: &ActorStopReason) {
        if reason.is_normal()
            && let Some(t) = self.thread.take()
        {
            // The supervisor sent `Cmd::Stop` first; wait for the thread to finish.
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl TrainerActor {
    async fn start(args: TrainerArgs, me: ActorRef<Self>) -> Result<Self, TrainerError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (st_tx, st_rx) = watch::channel(serde_json::json!({"state": "starting"}));
        let (done_tx, done_rx) = oneshot::channel::<Result<(), ResumeError>>();
        let wargs = WorkerArgs {
            cfg: args.cfg.clone(),
            data_dir: args.data_dir.clone(),
            replay: args.replay.clone(),
            checkpointer: args.checkpointer.clone(),
            wakes: rx,
            status: st_tx,
            cluster: args.cluster.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("mbtd-trainer".into())
            .spawn(move || {
                let _ = done_tx.send(trainer_worker::run(wargs));
            })
            .map_err(TrainerError::Spawn)?;
        // If the thread ends without a Stop (a panic, a failed resume), fail the actor so it
        // is restarted.
        let watch = tokio::spawn(async move {
            let failure = match done_rx.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => {
                    tracing::error!(actor = "trainer", error = %e, "the trainer cannot start");
                    TrainerError::Resume(e)
                }
                Err(_) => TrainerError::ThreadDied,
            };
            let _ = me.tell(ThreadFailed(failure)).await;
        });
        let mut appended = args.appended.clone();
        let rows_tx = tx.clone();
        let rows = tokio::spawn(async move {
            while appended.changed().await.is_ok() {
                if rows_tx.send(Wake::Rows).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            wakes: tx,
            status: st_rx,
            health: args.health,
            thread: Some(thread),
            _watch: AbortOnDrop(watch),
            _rows: AbortOnDrop(rows),
        })
    }
}

struct ThreadFailed(TrainerError);

impl Message<ThreadFailed> for TrainerActor {
    type Reply = Result<(), TrainerError>;

    async fn handle(
        &mut self,
        ThreadFailed(e): ThreadFailed,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        Err(e)
    }
}

/// Forwards a command to the compute thread (its reply channel is inside the command).
pub struct Forward(pub Cmd);

impl Message<Forward> for TrainerActor {
    type Reply = Result<(), String>;

    async fn handle(
        &mut self,
        Forward(c): Forward,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.wakes
            .send(Wake::Cmd(c))
            .map_err(|_| "the trainer thread is not running".to_string())
    }
}

/// The trainer line of `ctl status`, as last published by the thread.
pub struct TrainerStatus;

impl Message<TrainerStatus> for TrainerActor {
    type Reply = Result<serde_json::Value, kameo::error::Infallible>;

    async fn handle(
        &mut self,
        _: TrainerStatus,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        Ok(self.status.borrow().clone())
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for TrainerActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: trainer actor told to crash");
    }
}
