//! The replay actor: owns the replay store. Appends inbox files (for the ingestor), hands
//! rows to the trainer, control rows to the evaluator, and keeps the store within bounds.

use std::path::PathBuf;
use std::sync::Arc;

use kameo::prelude::*;
use rand::SeedableRng;

use super::health::ChildHealth;
use crate::ingest::{IngestConfig, process::FileOutcome, process_file};
use crate::store::replay::{ControlGroup, ReplayStats, ReplayStore};
use crate::store::{ReplayConfig, StoreError, format::Record};
use crate::telemetry::names::{self, events};

#[derive(Clone)]
pub struct ReplayArgs {
    pub dir: PathBuf,
    pub inbox: PathBuf,
    pub cfg: ReplayConfig,
    pub ingest: IngestConfig,
    pub health: Arc<ChildHealth>,
}

pub struct ReplayActor {
    store: ReplayStore,
    args: ReplayArgs,
    /// Highest sequence number the trainer has consumed (rows up to it may be evicted).
    consumed_through: u64,
}

impl Actor for ReplayActor {
    type Args = ReplayArgs;
    type Error = StoreError;

    fn name() -> &'static str {
        "replay"
    }

    async fn on_start(args: Self::Args, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        args.health.on_start().await;
        let (dir, cfg) = (args.dir.clone(), args.cfg.clone());
        let (store, report) = tokio::task::block_in_place(|| ReplayStore::open(&dir, &cfg))?;
        if !report.is_clean() {
            tracing::warn!(
                event = events::REPLAY_RECOVERED,
                actor = "replay",
                report = %serde_json::to_string(&report).unwrap_or_default(),
                "replay store recovered from an unclean stop (torn tails truncated, corrupt records skipped)"
            );
        }
        let stats = store.stats();
        tracing::info!(
            event = events::REPLAY_OPENED,
            actor = "replay",
            rows = stats.rows,
            control_rows = stats.control_rows,
            segments = stats.segments,
            dir = %args.dir.display()
        );
        let me = Self {
            store,
            args,
            consumed_through: 0,
        };
        me.publish(&stats);
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

impl ReplayActor {
    fn publish(&self, s: &ReplayStats) {
        metrics::gauge!(names::REPLAY_ROWS).set(s.rows as f64);
        metrics::gauge!(names::REPLAY_BYTES).set(s.bytes as f64);
        metrics::counter!(names::REPLAY_EVICTED_TOTAL).absolute(s.evicted_total);
    }

    fn enforce_capacity(&mut self) {
        match self.store.enforce_capacity(self.consumed_through) {
            Ok(r) if r.evicted > 0 => tracing::info!(
                event = events::REPLAY_EVICTED,
                actor = "replay",
                evicted = r.evicted,
                segments_rewritten = r.segments_rewritten,
                bytes_reclaimed = r.bytes_reclaimed
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(actor = "replay", error = %e, "eviction failed; will retry"),
        }
    }
}

/// Ingest one inbox file: rows appended durably, then the file moved with its sidecar.
pub struct IngestFile(pub PathBuf);

impl Message<IngestFile> for ReplayActor {
    type Reply = Result<FileOutcome, String>;

    async fn handle(
        &mut self,
        IngestFile(path): IngestFile,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        let (inbox, cfg) = (self.args.inbox.clone(), self.args.ingest.clone());
        let store = &mut self.store;
        let out = tokio::task::block_in_place(|| process_file(&inbox, &path, store, &cfg))
            .map_err(|e| e.to_string())?;
        self.enforce_capacity();
        let stats = self.store.stats();
        self.publish(&stats);
        Ok(out)
    }
}

/// Rows for one training step: every row after `cursor` (up to `n_new`), and `n_replay`
/// rows sampled from history with a seeded RNG (so a resumed run samples the same rows).
pub struct TrainRows {
    pub cursor: u64,
    pub n_new: usize,
    pub n_replay: usize,
    pub seed: u64,
}

/// Reply to [`TrainRows`].
#[derive(Debug, Clone, Default)]
pub struct TrainRowsReply {
    pub new: Vec<Record>,
    pub replay: Vec<Record>,
    /// Training rows in the store (for "is there history yet").
    pub training_rows: u64,
    pub last_seq: u64,
}

impl Message<TrainRows> for ReplayActor {
    type Reply = Result<TrainRowsReply, StoreError>;

    async fn handle(&mut self, m: TrainRows, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let new = self.store.rows_after(m.cursor, m.n_new)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(m.seed);
        let replay = if m.n_replay > 0 {
            self.store.sample(&mut rng, m.n_replay)?
        } else {
            Vec::new()
        };
        self.consumed_through = self.consumed_through.max(m.cursor);
        let s = self.store.stats();
        Ok(TrainRowsReply {
            new,
            replay,
            training_rows: s.training_rows,
            last_seq: self.store.last_durable_seq(),
        })
    }
}

/// The first `n` training rows (tokenizer bootstrap).
pub struct FirstRows(pub usize);

impl Message<FirstRows> for ReplayActor {
    type Reply = Result<Vec<Record>, StoreError>;

    async fn handle(&mut self, m: FirstRows, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.store.rows_after(0, m.0)
    }
}

/// Control rows grouped by source and era (`boundary`: first sequence number of "new").
pub struct ControlRows {
    pub boundary: u64,
    pub max_per_group: usize,
}

impl Message<ControlRows> for ReplayActor {
    type Reply = Result<Vec<ControlGroup>, StoreError>;

    async fn handle(&mut self, m: ControlRows, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.store.control_groups(m.boundary, m.max_per_group)
    }
}

/// Whether the store can take another inbox file now (asked by the ingestor before each
/// file). It cannot when it is at `max_rows` / `max_bytes` and rows the trainer has not
/// consumed yet are what keeps it there: eviction only takes consumed rows, so appending
/// more would pass the bound. The file then waits in the inbox (durable, nothing lost)
/// until training catches up. Before the trainer has consumed anything (tokenizer
/// bootstrap) there is always room, so the first rows can arrive.
pub struct Room;

/// Reply to [`Room`].
#[derive(Debug, Clone, Copy, Reply)]
pub struct RoomReply {
    pub room: bool,
    pub rows: u64,
    pub max_rows: u64,
    pub backlog: u64,
}

impl Message<Room> for ReplayActor {
    type Reply = RoomReply;

    async fn handle(&mut self, _: Room, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let backlog = self.store.backlog(self.consumed_through);
        RoomReply {
            room: self.consumed_through == 0 || backlog == 0 || !self.store.at_capacity(),
            rows: self.store.stats().rows,
            max_rows: self.store.config().max_rows,
            backlog,
        }
    }
}

/// Counters of the store.
pub struct Stats;

impl Message<Stats> for ReplayActor {
    type Reply = Result<ReplayStats, StoreError>;

    async fn handle(&mut self, _: Stats, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        Ok(self.store.stats())
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for ReplayActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: replay actor told to crash");
    }
}
