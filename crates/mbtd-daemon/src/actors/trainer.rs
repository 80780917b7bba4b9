//! The trainer actor: a thin, always-responsive owner of the trainer's compute thread
//! ([`super::trainer_worker`]). Commands are forwarded to the thread and answered between
//! steps; status is read from a watch channel the thread updates, so `ctl status` never
//! waits for a step. A thread that dies makes the actor fail, and the supervisor restarts it
//! (the new thread resumes from the latest checkpoint).

use std::sync::Arc;
use std::sync::mpsc::Sender;

use kameo::prelude::*;
use tokio::sync::{oneshot, watch};

use super::checkpointer::CheckpointerActor;
use super::health::ChildHealth;
use super::metrics::AbortOnDrop;
use super::replay::ReplayActor;
use super::trainer_worker::{self, Cmd, WorkerArgs};
use crate::config::Config;

#[derive(Clone)]
pub struct TrainerArgs {
    pub cfg: Config,
    pub replay: ActorRef<ReplayActor>,
    pub checkpointer: ActorRef<CheckpointerActor>,
    pub health: Arc<ChildHealth>,
}

pub struct TrainerActor {
    cmds: Sender<Cmd>,
    status: watch::Receiver<serde_json::Value>,
    health: Arc<ChildHealth>,
    thread: Option<std::thread::JoinHandle<()>>,
    _watch: AbortOnDrop,
}

/// Why the trainer actor failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("cannot start the trainer thread: {0}")]
    Spawn(std::io::Error),
    #[error("the trainer thread stopped unexpectedly (see the panic above); restarting")]
    ThreadDied,
}

impl Actor for TrainerActor {
    type Args = TrainerArgs;
    type Error = TrainerError;

    fn name() -> &'static str {
        "trainer"
    }

    async fn on_start(args: Self::Args, me: ActorRef<Self>) -> Result<Self, Self::Error> {
        args.health.on_start().await;
        let (tx, rx) = std::sync::mpsc::channel();
        let (st_tx, st_rx) = watch::channel(serde_json::json!({"state": "starting"}));
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let wargs = WorkerArgs {
            cfg: args.cfg.clone(),
            replay: args.replay.clone(),
            checkpointer: args.checkpointer.clone(),
            cmds: rx,
            status: st_tx,
        };
        let thread = std::thread::Builder::new()
            .name("mbtd-trainer".into())
            .spawn(move || {
                trainer_worker::run(wargs);
                let _ = done_tx.send(());
            })
            .map_err(TrainerError::Spawn)?;
        // If the thread ends without a Stop (a panic), fail the actor so it is restarted.
        let watch = tokio::spawn(async move {
            if done_rx.await.is_err() {
                let _ = me.tell(ThreadDied).await;
            }
        });
        Ok(Self {
            cmds: tx,
            status: st_rx,
            health: args.health,
            thread: Some(thread),
            _watch: AbortOnDrop(watch),
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        reason: ActorStopReason,
    ) -> Result<(), Self::Error> {
        if reason.is_normal()
            && let Some(t) = self.thread.take()
        {
            // The supervisor sent `Cmd::Stop` first; wait for the thread to finish.
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.health.on_stop(&reason.to_string());
        Ok(())
    }
}

struct ThreadDied;

impl Message<ThreadDied> for TrainerActor {
    type Reply = Result<(), TrainerError>;

    async fn handle(&mut self, _: ThreadDied, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        Err(TrainerError::ThreadDied)
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
        self.cmds
            .send(c)
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
