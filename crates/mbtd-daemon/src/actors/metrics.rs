//! The metrics actor: owns the snapshot side of the recorder, logs a JSON snapshot line every
//! `metrics.log_every_s`, appends one to the history file every `metrics.history_every_s`,
//! and answers `ctl metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kameo::error::Infallible;
use kameo::prelude::*;

use super::health::{Child, ChildHealth, child_actor};
use crate::store::fsutil::now_ms;
use crate::telemetry::history::{HistoryRecord, HistoryWriter};
use crate::telemetry::names::{self, events};
use crate::telemetry::{Snapshot, SnapshotRecorder};

#[derive(Clone)]
pub struct MetricsArgs {
    pub recorder: SnapshotRecorder,
    pub log_every: Duration,
    pub started: Instant,
    pub health: Arc<ChildHealth>,
    /// The history file, its period and size bound; `None` when the history is off.
    pub history: Option<HistoryArgs>,
}

#[derive(Clone)]
pub struct HistoryArgs {
    pub path: std::path::PathBuf,
    pub every: Duration,
    pub max_bytes: u64,
}

pub struct MetricsActor {
    args: MetricsArgs,
    tickers: Vec<AbortOnDrop>,
    history: Option<HistoryWriter>,
    /// Whether the last history append failed (logged once until one succeeds again).
    history_failing: bool,
}

/// Aborts a background task when its owner (an actor's state) is dropped, e.g. on restart.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

child_actor!(MetricsActor, "metrics", MetricsArgs, Infallible);

impl Child for MetricsActor {
    fn health(&self) -> &ChildHealth {
        &self.args.health
    }

    async fn stopping(&mut self, _: &ActorStopReason) {
        self.tickers.clear();
        self.log_snapshot();
        self.append_history();
    }
}

impl MetricsActor {
    async fn start(args: MetricsArgs, actor_ref: ActorRef<Self>) -> Result<Self, Infallible> {
        let mut tickers = vec![tick(&actor_ref, args.log_every, || LogSnapshot)];
        let history = args.history.as_ref().map(|h| {
            tickers.push(tick(&actor_ref, h.every, || AppendHistory));
            HistoryWriter::new(h.path.clone(), h.max_bytes)
        });
        let mut me = Self {
            args,
            tickers,
            history,
            history_failing: false,
        };
        me.append_history();
        Ok(me)
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

    /// Appends one snapshot to the history file (a failure is logged once, not fatal: the
    /// history serves reports, the daemon goes on without it).
    fn append_history(&mut self) {
        let rec = HistoryRecord::from_snapshot(
            now_ms(),
            self.args.started.elapsed().as_secs_f64(),
            &self.snapshot(),
        );
        let Some(w) = self.history.as_mut() else {
            return;
        };
        match w.append(&rec) {
            Ok(()) => self.history_failing = false,
            Err(e) => {
                if !self.history_failing {
                    tracing::warn!(event = events::METRICS_HISTORY_FAILED, actor = "metrics",
                        file = %w.path().display(), error = %e,
                        "cannot append to the metrics history; check the disk and the file's permissions");
                }
                self.history_failing = true;
            }
        }
    }
}

/// Sends `msg()` to `me` every `every` (first after one period) until the actor is gone.
fn tick<M>(
    me: &ActorRef<MetricsActor>,
    every: Duration,
    msg: impl Fn() -> M + Send + 'static,
) -> AbortOnDrop
where
    MetricsActor: Message<M>,
    M: Send + 'static,
{
    let me = me.clone();
    AbortOnDrop(tokio::spawn(async move {
        let mut iv = tokio::time::interval(every);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        iv.tick().await;
        loop {
            iv.tick().await;
            if me.tell(msg()).await.is_err() {
                return;
            }
        }
    }))
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

/// Appends one history line now.
pub struct AppendHistory;

impl Message<AppendHistory> for MetricsActor {
    type Reply = ();

    async fn handle(&mut self, _: AppendHistory, _: &mut Context<Self, Self::Reply>) {
        self.append_history();
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for MetricsActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: metrics actor told to crash");
    }
}
