//! The root supervisor: spawns every actor as a supervised child (restart on crash, with
//! back-off, up to `daemon.restart_limit` restarts per `daemon.restart_window_s`), stops them
//! in order on shutdown, and reports a crash loop so the daemon can exit non-zero.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kameo::error::Infallible;
use kameo::prelude::*;
use kameo::supervision::RestartPolicy;
use tokio::sync::mpsc;

use super::admin::{AdminActor, AdminArgs};
use super::checkpointer::{CheckpointerActor, CheckpointerArgs};
use super::dispatch::{Dispatcher, StopRequest};
use super::health::HealthBoard;
use super::ingestor::{IngestorActor, IngestorArgs};
use super::metrics::{HistoryArgs, MetricsActor, MetricsArgs};
use super::replay::{ReplayActor, ReplayArgs};
use super::trainer::{TrainerActor, TrainerArgs};
use crate::config::Config;
use crate::telemetry::SnapshotRecorder;
use crate::telemetry::names::events;

#[derive(Clone)]
pub struct RootArgs {
    pub cfg: Config,
    pub data_dir: PathBuf,
    pub admin_gid: Option<u32>,
    pub recorder: SnapshotRecorder,
    pub board: HealthBoard,
    pub started: Instant,
    pub stop_tx: mpsc::Sender<StopRequest>,
    /// Receives the name of an actor that crash-looped; the daemon then exits non-zero.
    pub fatal_tx: mpsc::UnboundedSender<String>,
    /// The checkpointer's write health, kept across its restarts and read by the daemon at
    /// exit (a failed final checkpoint makes the exit non-zero).
    pub checkpoint_state: std::sync::Arc<super::checkpointer::CheckpointState>,
    /// The coordinator's nodes (`[cluster]`), started before the actors.
    pub cluster: Option<std::sync::Arc<crate::cluster::ClusterView>>,
}

/// A child as the supervisor knows it, in stop order.
#[derive(Clone)]
pub enum Child {
    Metrics(ActorRef<MetricsActor>),
    Admin(ActorRef<AdminActor>),
    Replay(ActorRef<ReplayActor>),
    Ingestor(ActorRef<IngestorActor>),
    Checkpointer(ActorRef<CheckpointerActor>),
    Trainer(ActorRef<TrainerActor>),
}

macro_rules! stop_and_wait {
    ($r:expr) => {{
        let _ = $r.stop_gracefully().await;
        $r.wait_for_shutdown().await;
    }};
}

impl Child {
    /// Stops the child (it finishes its current message first) and waits until it is gone.
    /// Must not run inside the supervisor's own handler: the supervisor has to process the
    /// child's exit signal for the stop to complete.
    pub async fn stop(&self) {
        if let Child::Trainer(r) = self {
            // The trainer finishes its step and writes the final checkpoint before it stops.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let stop = super::trainer_worker::Cmd::Stop(tx);
            if r.ask(super::trainer::Forward(stop)).await.is_ok() {
                match rx.await {
                    Ok(Ok(v)) => {
                        tracing::info!(actor = "trainer", checkpoint = %v, "final checkpoint written")
                    }
                    Ok(Err(e)) => {
                        tracing::error!(actor = "trainer", error = %e, "final checkpoint failed")
                    }
                    Err(_) => tracing::warn!(
                        actor = "trainer",
                        "trainer thread ended before the final checkpoint"
                    ),
                }
            }
        }
        match self {
            Child::Metrics(r) => stop_and_wait!(r),
            Child::Admin(r) => stop_and_wait!(r),
            Child::Replay(r) => stop_and_wait!(r),
            Child::Ingestor(r) => stop_and_wait!(r),
            Child::Checkpointer(r) => stop_and_wait!(r),
            Child::Trainer(r) => stop_and_wait!(r),
        }
    }
}

pub struct Root {
    /// Children in the order they must stop.
    stop_order: Vec<Child>,
    names: HashMap<ActorId, &'static str>,
    fatal_tx: mpsc::UnboundedSender<String>,
}

/// Spawns the root's children, each with the same supervision: restarted when it crashes
/// (`Transient`), at most `restart_limit` times per `restart_window`.
struct Children<'a> {
    parent: &'a ActorRef<Root>,
    restart_limit: u32,
    restart_window: Duration,
    names: HashMap<ActorId, &'static str>,
}

impl Children<'_> {
    async fn spawn<C>(&mut self, name: &'static str, args: C::Args) -> ActorRef<C>
    where
        C: Actor,
        C::Args: Clone + Sync,
    {
        let child = C::supervise(self.parent, args)
            .restart_policy(RestartPolicy::Transient)
            .restart_limit(self.restart_limit, self.restart_window)
            .spawn()
            .await;
        self.names.insert(child.id(), name);
        child
    }
}

impl Actor for Root {
    type Args = RootArgs;
    type Error = Infallible;

    fn name() -> &'static str {
        "supervisor"
    }

    async fn on_start(args: Self::Args, me: ActorRef<Self>) -> Result<Self, Self::Error> {
        let d = &args.cfg.daemon;
        let mut children = Children {
            parent: &me,
            restart_limit: d.restart_limit,
            restart_window: Duration::from_secs(d.restart_window_s),
            names: HashMap::new(),
        };

        let metrics: ActorRef<MetricsActor> = children
            .spawn(
                "metrics",
                MetricsArgs {
                    recorder: args.recorder.clone(),
                    log_every: Duration::from_secs(args.cfg.metrics.log_every_s),
                    started: args.started,
                    health: args.board.register("metrics", d),
                    history: (args.cfg.metrics.history_every_s > 0).then(|| HistoryArgs {
                        path: args.cfg.metrics.history_file.clone(),
                        every: Duration::from_secs(args.cfg.metrics.history_every_s),
                        max_bytes: args.cfg.metrics.history_max_bytes,
                    }),
                },
            )
            .await;

        // Appended rows wake the trainer (instead of it polling the store).
        let appended = std::sync::Arc::new(tokio::sync::watch::channel(0u64).0);
        let replay: ActorRef<ReplayActor> = children
            .spawn(
                "replay",
                ReplayArgs {
                    dir: args.cfg.paths.replay.clone(),
                    cfg: args.cfg.replay.clone(),
                    health: args.board.register("replay", d),
                    appended: appended.clone(),
                },
            )
            .await;

        let ingestor: ActorRef<IngestorActor> = children
            .spawn(
                "ingestor",
                IngestorArgs {
                    inbox: args.cfg.paths.inbox.clone(),
                    cfg: args.cfg.ingest.clone(),
                    replay: replay.clone(),
                    health: args.board.register("ingestor", d),
                },
            )
            .await;

        let (ck_tx, ck_rx) = tokio::sync::watch::channel(serde_json::json!({"state": "starting"}));
        let checkpointer: ActorRef<CheckpointerActor> = children
            .spawn(
                "checkpointer",
                CheckpointerArgs {
                    root: args.cfg.paths.checkpoints.clone(),
                    cfg: args.cfg.checkpoints.clone(),
                    health: args.board.register("checkpointer", d),
                    status: std::sync::Arc::new(ck_tx),
                    state: args.checkpoint_state.clone(),
                },
            )
            .await;

        let trainer: ActorRef<TrainerActor> = children
            .spawn(
                "trainer",
                TrainerArgs {
                    cfg: args.cfg.clone(),
                    replay: replay.clone(),
                    checkpointer: checkpointer.clone(),
                    data_dir: args.data_dir.clone(),
                    appended: appended.subscribe(),
                    health: args.board.register("trainer", d),
                    cluster: args.cluster.clone(),
                },
            )
            .await;

        let admin_health = args.board.register("admin", d);
        #[cfg(feature = "fault-injection")]
        let crash_targets = vec![
            ("metrics", metrics.clone().recipient()),
            ("replay", replay.clone().recipient()),
            ("ingestor", ingestor.clone().recipient()),
            ("checkpointer", checkpointer.clone().recipient()),
            ("trainer", trainer.clone().recipient()),
        ];
        let dispatcher = Dispatcher {
            board: args.board.clone(),
            started: args.started,
            data_dir: args.data_dir.clone(),
            metrics: metrics.clone(),
            replay: replay.clone(),
            ingestor: ingestor.clone(),
            trainer: trainer.clone(),
            checkpointer: checkpointer.clone(),
            checkpoint_status: ck_rx,
            stop: args.stop_tx.clone(),
            cluster: args.cluster.clone(),
            #[cfg(feature = "fault-injection")]
            crash_targets,
        };
        let admin: ActorRef<AdminActor> = children
            .spawn(
                "admin",
                AdminArgs {
                    socket: args.cfg.admin.socket.clone(),
                    group_gid: args.admin_gid,
                    limits: crate::admin::server::Limits::from(&args.cfg.admin),
                    dispatcher,
                    health: admin_health,
                },
            )
            .await;

        Ok(Root {
            stop_order: vec![
                Child::Ingestor(ingestor),
                Child::Trainer(trainer),
                Child::Checkpointer(checkpointer),
                Child::Replay(replay),
                Child::Admin(admin),
                Child::Metrics(metrics),
            ],
            names: children.names,
            fatal_tx: args.fatal_tx,
        })
    }

    async fn on_link_died(
        &mut self,
        _: WeakActorRef<Self>,
        id: ActorId,
        reason: ActorStopReason,
    ) -> Result<std::ops::ControlFlow<ActorStopReason>, Self::Error> {
        if matches!(
            reason,
            ActorStopReason::Normal | ActorStopReason::SupervisorRestart
        ) {
            return Ok(std::ops::ControlFlow::Continue(()));
        }
        let name = self.names.get(&id).copied().unwrap_or("unknown");
        tracing::error!(
            event = events::ACTOR_CRASH_LOOP,
            actor = name,
            reason = %reason,
            "actor {name} crashed more often than daemon.restart_limit allows within \
             daemon.restart_window_s; exiting non-zero so the service manager restarts mbtd"
        );
        let _ = self.fatal_tx.send(name.to_string());
        Ok(std::ops::ControlFlow::Continue(()))
    }
}

/// Asks for the children in the order they must stop.
pub struct StopOrder;

impl Message<StopOrder> for Root {
    type Reply = Vec<Child>;

    async fn handle(&mut self, _: StopOrder, _: &mut Context<Self, Self::Reply>) -> Vec<Child> {
        self.stop_order.clone()
    }
}
