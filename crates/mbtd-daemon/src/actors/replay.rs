//! The replay actor: owns the replay store. Takes the rows of inbox files in chunks (the
//! ingestor parses, hashes and fsyncs outside it, see [`ReplaySink`]), hands rows to the
//! trainer, control rows to the evaluator, and keeps the store within bounds.
//!
//! The trainer asks this actor for rows every step, so no handler here does work that
//! grows with a file: a chunk append is at most `CHUNK_ROWS` rows written to a buffer, a
//! commit is split into [`PrepareCommit`] (flush to the OS) and [`PublishCommit`] (index
//! the rows, one journal entry) with the segment fsyncs between them done by the caller.

use std::path::PathBuf;
use std::sync::Arc;

use kameo::error::SendError;
use kameo::prelude::*;
use rand::SeedableRng;

use super::health::{Child, ChildHealth, child_actor};
use crate::ingest::{IngestError, RowSink, SinkResult};
use crate::store::replay::{ControlGroup, PendingSync, ReplayStats, ReplayStore};
use crate::store::{ReplayConfig, StoreError, format::Record};
use crate::telemetry::names::{self, events};
use crate::text::csv_rows::CsvRow;

#[derive(Clone)]
pub struct ReplayArgs {
    pub dir: PathBuf,
    pub cfg: ReplayConfig,
    pub health: Arc<ChildHealth>,
    /// Signalled with the newest durable sequence number when rows were appended (wakes the trainer).
    pub appended: Arc<tokio::sync::watch::Sender<u64>>,
}

pub struct ReplayActor {
    store: ReplayStore,
    args: ReplayArgs,
    /// Highest sequence number the trainer has consumed (rows up to it may be evicted).
    consumed_through: u64,
}

child_actor!(ReplayActor, "replay", ReplayArgs, StoreError);

impl Child for ReplayActor {
    fn health(&self) -> &ChildHealth {
        &self.args.health
    }
}

impl ReplayActor {
    async fn start(args: ReplayArgs, _: ActorRef<Self>) -> Result<Self, StoreError> {
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
}

impl ReplayActor {
    fn publish(&self, s: &ReplayStats) {
        metrics::gauge!(names::REPLAY_ROWS).set(s.rows as f64);
        metrics::gauge!(names::REPLAY_BYTES).set(s.bytes as f64);
        metrics::counter!(names::REPLAY_EVICTED_TOTAL).absolute(s.evicted_total);
    }

    /// Refuses a message of an ingestion that began before the store was reopened.
    fn check_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        if epoch == self.store.epoch() {
            Ok(())
        } else {
            Err(StoreError::StaleCommit {
                dir: self.args.dir.clone(),
            })
        }
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

/// Whether a file is completely ingested; also tells the caller the store's epoch.
pub struct IsCommitted(pub [u8; 32]);

/// Reply to [`IsCommitted`].
#[derive(Debug, Clone, Copy, Reply)]
pub struct IsCommittedReply {
    /// The store's epoch (see `ReplayStore::epoch`).
    pub epoch: u64,
    /// The file is in the journal.
    pub committed: bool,
}

impl Message<IsCommitted> for ReplayActor {
    type Reply = IsCommittedReply;

    async fn handle(&mut self, m: IsCommitted, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        IsCommittedReply {
            epoch: self.store.epoch(),
            committed: self.store.journal_entry(&m.0).is_some(),
        }
    }
}

/// Append one chunk of a file's rows (pending until the commit).
pub struct AppendChunk {
    pub epoch: u64,
    pub hash: [u8; 32],
    pub rows: Vec<CsvRow>,
    pub ingest_ms: u64,
}

impl Message<AppendChunk> for ReplayActor {
    type Reply = Result<(), StoreError>;

    async fn handle(&mut self, m: AppendChunk, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        self.check_epoch(m.epoch)?;
        for r in m.rows {
            self.store.append_row(
                &m.hash,
                r.line,
                &r.source,
                &r.body,
                r.time_ms.unwrap_or(m.ingest_ms as i64),
                m.ingest_ms,
            )?;
        }
        Ok(())
    }
}

/// First step of a commit: flush the pending rows; the caller fsyncs the returned files.
pub struct PrepareCommit {
    pub epoch: u64,
}

impl Message<PrepareCommit> for ReplayActor {
    type Reply = Result<PendingSync, StoreError>;

    async fn handle(
        &mut self,
        m: PrepareCommit,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        self.check_epoch(m.epoch)?;
        self.store.prepare_commit()
    }
}

/// Last step of a commit, after the fsyncs: rows visible, journal entry written, store
/// bounds enforced. Replies the rows of the file first made durable.
pub struct PublishCommit {
    pub synced: PendingSync,
    pub hash: [u8; 32],
    pub accepted: u64,
    pub rejected: u64,
}

impl Message<PublishCommit> for ReplayActor {
    type Reply = Result<u64, StoreError>;

    async fn handle(
        &mut self,
        m: PublishCommit,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        let c = self
            .store
            .publish_commit(m.synced, &m.hash, m.accepted, m.rejected)?;
        self.enforce_capacity();
        let stats = self.store.stats();
        self.publish(&stats);
        let last = self.store.last_durable_seq();
        self.args
            .appended
            .send_if_modified(|v| std::mem::replace(v, last) != last);
        Ok(c.appended)
    }
}

/// Forget the rows appended since the last commit (the ingestion of a file failed).
pub struct AbortIngest;

impl Message<AbortIngest> for ReplayActor {
    type Reply = ();

    async fn handle(&mut self, _: AbortIngest, _: &mut Context<Self, Self::Reply>) {
        if let Err(e) = self.store.abort_pending() {
            tracing::warn!(
                actor = "replay",
                error = %e,
                "rolling back an interrupted ingestion failed; retried before the next append"
            );
        }
    }
}

/// The ingestor's [`RowSink`]: the replay actor, asked from a blocking thread. The
/// commit's fsyncs run on that thread, between [`PrepareCommit`] and [`PublishCommit`].
pub struct ReplaySink {
    replay: ActorRef<ReplayActor>,
    epoch: Option<u64>,
    share_pct: u8,
}

impl ReplaySink {
    /// A sink whose appends keep the store's work near `share_pct` % of one core
    /// (`ingest.store_share_pct`).
    pub fn new(replay: ActorRef<ReplayActor>, share_pct: u8) -> Self {
        Self {
            replay,
            epoch: None,
            share_pct: share_pct.clamp(1, 100),
        }
    }

    /// After a chunk the store took `took` for, waits so that share holds.
    fn pace(&self, took: std::time::Duration) {
        if self.share_pct < 100 {
            let p = u32::from(self.share_pct);
            std::thread::sleep(took * (100 - p) / p);
        }
    }

    fn unreachable<M>(e: SendError<M, StoreError>) -> IngestError {
        match e {
            SendError::HandlerError(source) => IngestError::Store { source },
            SendError::ActorNotRunning(_) => unavailable("not running"),
            SendError::ActorStopped => unavailable("stopped before replying"),
            SendError::ActorRestarting(_) => unavailable("restarting"),
            SendError::MailboxFull(_) => unavailable("mailbox full"),
            SendError::Timeout(_) => unavailable("timed out"),
        }
    }
}

fn unavailable(detail: &str) -> IngestError {
    IngestError::StoreUnavailable {
        detail: format!("replay actor {detail}"),
    }
}

impl RowSink for ReplaySink {
    fn is_committed(&mut self, hash: &[u8; 32]) -> SinkResult<bool> {
        let r = self
            .replay
            .ask(IsCommitted(*hash))
            .blocking_send()
            .map_err(|_| unavailable("not reachable"))?;
        self.epoch = Some(r.epoch);
        Ok(r.committed)
    }

    fn append(&mut self, hash: &[u8; 32], rows: Vec<CsvRow>, ingest_ms: u64) -> SinkResult<()> {
        let epoch = self.epoch.unwrap_or(0);
        let t = std::time::Instant::now();
        self.replay
            .ask(AppendChunk {
                epoch,
                hash: *hash,
                rows,
                ingest_ms,
            })
            .blocking_send()
            .map_err(Self::unreachable)?;
        self.pace(t.elapsed());
        Ok(())
    }

    fn commit(&mut self, hash: &[u8; 32], accepted: u64, rejected: u64) -> SinkResult<u64> {
        let epoch = self.epoch.unwrap_or(0);
        let synced = self
            .replay
            .ask(PrepareCommit { epoch })
            .blocking_send()
            .map_err(Self::unreachable)?;
        synced
            .fsync()
            .map_err(|source| IngestError::Store { source })?;
        self.replay
            .ask(PublishCommit {
                synced,
                hash: *hash,
                accepted,
                rejected,
            })
            .blocking_send()
            .map_err(Self::unreachable)
    }

    fn abort(&mut self) {
        let _ = self.replay.ask(AbortIngest).blocking_send();
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
