//! The metrics actor: owns the snapshot side of the recorder, logs a JSON snapshot line every
//! `metrics.log_every_s`, and answers `ctl metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kameo::error::Infallible;
use kameo::prelude::*;

use super::health::ChildHealth;
use crate::telemetry::names::{self, events};
use crate::telemetry::{Snapshot, SnapshotRecorder};

#[derive(Clone)]
pub struct MetricsArgs {
    pub recorder: SnapshotRecorder,
    pub log_every: Duration,
    pub started: Instant,
    pub health: Arc<ChildHealth>,
}

pub struct MetricsActor {
    args: MetricsArgs,
    ticker: AbortOnDrop,
}

/// Aborts a background task when its owner (an actor's state) is dropped, e.g. on restart.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Actor for MetricsActor {
    type Args = MetricsArgs;
    type Error = Infallible;

    fn name() -> &'static str {
        "metrics"
    }

    async fn on_start(args: Self::Args, actor_ref: ActorRef<Self>) -> Result<Self, Self::Error> {
        args.health.on_start().await;
        let me = actor_ref.clone();
        let every = args.log_every;
        let ticker = AbortOnDrop(tokio::spawn(async move {
            let mut iv = tokio::time::interval(every);
            iv.tick().await;
            loop {
                iv.tick().await;
                if me.tell(LogSnapshot).await.is_err() {
                    return;
                }
            }
        }));
        Ok(Self { args, ticker })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        reason: ActorStopReason,
    ) -> Result<(), Self::Error> {
        self.ticker.0.abort();
        self.log_snapshot();
        self.args.health.on_stop(&reason.to_string());
        Ok(())
    }
}

impl MetricsActor {
    fn snapshot(&self) -> Snapshot {
        metrics::gauge!(names::UPTIME_SECONDS).set(self.args.started.elapsed().as_secs_f64());
        self.args.recorder.snapshot()
    }

    fn log_snapshot(&self) {
        let snap = self.snapshot();
        let json = serde_json::to_string(&snap).unwrap_or_default();
        tracing::info!(event = events::METRICS_SNAPSHOT, actor = "metrics", metrics = %json);
    }
}

/// Asks for a copy of every metric.
pub struct GetSnapshot;

impl Message<GetSnapshot> for MetricsActor {
    type Reply = Snapshot;

    async fn handle(&mut self, _: GetSnapshot, _: &mut Context<Self, Self::Reply>) -> Snapshot {
        self.snapshot()
    }
}

/// Logs one snapshot line now.
pub struct LogSnapshot;

impl Message<LogSnapshot> for MetricsActor {
    type Reply = ();

    async fn handle(&mut self, _: LogSnapshot, _: &mut Context<Self, Self::Reply>) {
        self.log_snapshot();
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for MetricsActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: metrics actor told to crash");
    }
}
