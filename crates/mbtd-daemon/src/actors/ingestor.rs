//! The ingestor actor: watches the inbox (notify, debounced), rescans it periodically as a
//! fallback and at start-up, picks files once complete, and ingests them: hashing and
//! parsing on a blocking thread, the rows handed to the replay actor in chunks, the
//! commit's fsyncs on that thread too ([`ReplaySink`]), so the trainer's requests to the
//! replay actor never wait for a whole file.
//!
//! A file is complete when no writer has it open (inotify close-write, see
//! [`super::ingestor_watch`]) and it has settled.
//!
//! A failure to store a file (a full disk above all) blocks ingestion: the file goes back
//! to the head of the queue, is retried with a back-off doubling from 1 s to 60 s, and
//! `ctl status` says `blocked: disk full`; one log line when it starts, one when it ends.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kameo::error::Infallible;
use kameo::prelude::*;

use super::health::{Child, ChildHealth, child_actor};
use super::ingestor_events::{
    IngestBlocked, IngestRetryFailed, IngestStillBlocked, IngestUnblocked,
};
pub use super::ingestor_watch::{Scan, WRITER_STALE};
use super::ingestor_watch::{spawn_pump, watch};
use super::metrics::AbortOnDrop;
use super::replay::{ReplayActor, ReplaySink, Room, RoomReply};
use crate::ingest::{
    FileOutcome, IngestConfig, IngestError, Outcome, Progress, ScanMemory, list_inbox,
    process_file_resuming, select_candidates,
};
use crate::store::fsutil::now_ms;
use crate::telemetry::event::{InternalEvent, RateLimit};
use crate::telemetry::names::{self, events};
use crate::telemetry::rate::RateWindow;

/// First and longest wait before retrying a file that could not be stored.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// At most one "still blocked" log line per this interval.
const STILL_BLOCKED_EVERY: Duration = Duration::from_secs(300);

/// Ingestion stopped by a failure to store a file.
struct Blocked {
    since: Instant,
    since_ms: u64,
    file: String,
    error: String,
    disk_full: bool,
    backoff: Duration,
    retry_at: Instant,
    failed_attempts: u64,
    log_limit: RateLimit,
}

#[derive(Clone)]
pub struct IngestorArgs {
    pub inbox: PathBuf,
    pub cfg: IngestConfig,
    pub replay: ActorRef<ReplayActor>,
    pub health: Arc<ChildHealth>,
}

pub struct IngestorActor {
    args: IngestorArgs,
    memory: ScanMemory,
    paused: bool,
    /// Set while the replay store is full of rows not trained on yet (see [`Room`]).
    held_back: Option<RoomReply>,
    refused_logged: HashSet<String>,
    rows_rate: RateWindow,
    events_rate: RateWindow,
    pending_peak: u64,
    files_done: u64,
    files_failed: u64,
    last_file: Option<String>,
    /// Ready files not taken yet, oldest first. One file is in flight at a time and the
    /// next starts when it ends, so a pause (or a stop) asked during a backlog takes
    /// effect after the file in hand.
    queue: VecDeque<String>,
    /// Names the watcher saw renamed in, kept until the next listing.
    renamed_in: HashSet<String>,
    /// Names a writer has open (from the watcher, as of the last scan).
    writing: HashSet<String>,
    /// Files settling or open for writing at the last listing.
    settling: usize,
    /// What was committed of files not moved yet (taken by the blocking task while it runs).
    progress: Option<Progress>,
    blocked: Option<Blocked>,
    /// The file being ingested now.
    in_flight: Option<String>,
    /// `pause-ingest` requests answered when the file in flight ends, so that a "paused"
    /// reply means no file is being ingested.
    pause_waiters: Vec<ReplySender<bool>>,
    /// When the inbox was last listed.
    last_listing: Option<Instant>,
    _watcher: Option<notify::RecommendedWatcher>,
    _pump: AbortOnDrop,
}

child_actor!(IngestorActor, "ingestor", IngestorArgs, Infallible);

impl Child for IngestorActor {
    fn health(&self) -> &ChildHealth {
        &self.args.health
    }
}

impl IngestorActor {
    async fn start(args: IngestorArgs, me: ActorRef<Self>) -> Result<Self, Infallible> {
        let (watcher, rx) = watch(&args.inbox);
        let rescan = Duration::from_millis(args.cfg.rescan_ms);
        let settle = Duration::from_millis(args.cfg.settle_ms.max(50));
        let pump = spawn_pump(rx, me, rescan.min(settle));
        Ok(Self {
            args,
            memory: ScanMemory::default(),
            paused: false,
            held_back: None,
            refused_logged: HashSet::new(),
            rows_rate: RateWindow::new(Duration::from_secs(10)),
            events_rate: RateWindow::new(Duration::from_secs(10)),
            pending_peak: 0,
            files_done: 0,
            files_failed: 0,
            last_file: None,
            queue: VecDeque::new(),
            renamed_in: HashSet::new(),
            writing: HashSet::new(),
            settling: 0,
            progress: Some(Progress::default()),
            blocked: None,
            in_flight: None,
            pause_waiters: Vec::new(),
            last_listing: None,
            _watcher: watcher,
            _pump: AbortOnDrop(pump),
        })
    }
}

impl Message<Scan> for IngestorActor {
    type Reply = ();

    async fn handle(&mut self, scan: Scan, ctx: &mut Context<Self, Self::Reply>) {
        let now = Instant::now();
        metrics::gauge!(names::INGEST_EVENTS_PER_SEC_WINDOW)
            .set(self.events_rate.add(now, scan.events));
        metrics::gauge!(names::INGEST_ROWS_PER_SEC_WINDOW).set(self.rows_rate.rate(now));
        self.renamed_in.extend(scan.renamed_in);
        self.writing = scan.writing;
        if self.paused {
            return;
        }
        // List the inbox when nothing is queued, else at most once per scan period (a long
        // backlog is not listed again for every file).
        let period =
            Duration::from_millis(self.args.cfg.rescan_ms.min(self.args.cfg.settle_ms.max(50)));
        if self.queue.is_empty() || self.last_listing.is_none_or(|t| t.elapsed() >= period) {
            self.last_listing = Some(now);
            self.list_and_select();
        }
        self.take_next(ctx.actor_ref().clone()).await;
    }
}

/// The ingestion of one file ended (sent by its blocking task).
pub struct IngestDone {
    name: String,
    result: Result<FileOutcome, IngestError>,
    progress: Progress,
}

impl Message<IngestDone> for IngestorActor {
    type Reply = ();

    async fn handle(&mut self, m: IngestDone, ctx: &mut Context<Self, Self::Reply>) {
        self.in_flight = None;
        self.progress = Some(m.progress);
        self.finished(m.name, m.result);
        self.answer_pause_waiters();
        self.take_next(ctx.actor_ref().clone()).await;
    }
}

/// One ingestion at a time in the process, also across a restart of the ingestor while
/// the blocking task of its previous incarnation still runs: two ingestions interleaving
/// their appends and commits in the replay actor could roll back each other's rows.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Raises the calling thread's niceness to `nice` (Linux: a thread id is a process id for
/// `setpriority`). A failure only costs priority, so it is logged once, not returned.
fn lower_this_threads_priority(nice: u8) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority only reads its integer arguments.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(
            libc::PRIO_PROCESS,
            tid as libc::id_t,
            libc::c_int::from(nice),
        )
    };
    if rc != 0 {
        tracing::warn!(actor = "ingestor", error = %std::io::Error::last_os_error(),
            "cannot lower the ingestion thread's priority to ingest.nice, so ingestion competes with training for the CPU; allow setpriority in the service's SystemCallFilter, or set ingest.nice = 0 to stop asking");
    }
}

impl IngestorActor {
    /// Lists the inbox and queues the files that became ready.
    fn list_and_select(&mut self) {
        let listing = match list_inbox(&self.args.inbox) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(
                    event = events::INGEST_ERROR,
                    actor = "ingestor",
                    inbox = %self.args.inbox.display(),
                    error = %e,
                    "cannot list the inbox"
                );
                return;
            }
        };
        let (sel, memory) = select_candidates(
            &listing,
            &self.memory,
            &std::mem::take(&mut self.renamed_in),
            &self.writing,
            now_ms(),
            self.args.cfg.settle_ms,
        );
        self.memory = memory;
        self.settling = sel.waiting.len();
        if let Some(p) = self.progress.as_mut() {
            p.retain_existing();
        }
        let queued: HashSet<String> = self.queue.iter().cloned().collect();
        // Entries to refuse (links, FIFOs) first: they need no store and no waiting.
        for name in sel.to_fail.into_iter().chain(sel.ready) {
            if !queued.contains(&name) {
                self.queue.push_back(name);
            }
        }
        let pending = (self.queue.len() + sel.waiting.len()) as u64;
        if pending > self.pending_peak {
            self.pending_peak = pending;
            metrics::gauge!(names::INGEST_PENDING_EVENTS_OBSERVED_PEAK).set(pending as f64);
        }
        for (name, why) in sel.refused {
            if self.refused_logged.insert(name.clone()) {
                tracing::warn!(
                    event = events::INGEST_REFUSED_ENTRY,
                    actor = "ingestor",
                    file = %name,
                    reason = %why,
                    "inbox entry refused"
                );
            }
        }
    }

    /// Asks the replay actor for room; logs and flags the transitions into and out of
    /// holding files back. An unreachable replay actor counts as room (the ingestion
    /// itself then fails and the file stays for a retry).
    async fn has_room(&mut self) -> bool {
        let Ok(r) = self.args.replay.ask(Room).await else {
            return true;
        };
        match (r.room, self.held_back.is_some()) {
            (false, false) => tracing::warn!(
                event = events::INGEST_HELD_BACK,
                actor = "ingestor",
                rows = r.rows,
                max_rows = r.max_rows,
                untrained_rows = r.backlog,
                waiting_files = self.queue.len(),
                "replay store full of rows not trained on yet; files wait in the inbox until training catches up"
            ),
            (true, true) => tracing::info!(
                event = events::INGEST_HOLD_RELEASED,
                actor = "ingestor",
                rows = r.rows,
                untrained_rows = r.backlog,
                "training caught up; taking files from the inbox again"
            ),
            _ => {}
        }
        self.held_back = (!r.room).then_some(r);
        metrics::gauge!(names::INGEST_HELD_BACK).set(if r.room { 0.0 } else { 1.0 });
        r.room
    }

    /// Starts the next queued file unless one is in flight, ingestion is paused, blocked
    /// until a retry time, or the store has no room.
    async fn take_next(&mut self, me: ActorRef<Self>) {
        if self.in_flight.is_some() || self.paused {
            return;
        }
        if self
            .blocked
            .as_ref()
            .is_some_and(|b| Instant::now() < b.retry_at)
        {
            return;
        }
        if self.queue.is_empty() || !self.has_room().await {
            return;
        }
        while let Some(name) = self.queue.pop_front() {
            let path = self.args.inbox.join(&name);
            if path.symlink_metadata().is_err() {
                // Queued, then removed by someone else before its turn.
                self.unblock_if(&name);
                continue;
            }
            self.in_flight = Some(name.clone());
            let mut progress = self.progress.take().unwrap_or_default();
            let mut sink = ReplaySink::new(self.args.replay.clone(), self.args.cfg.store_share_pct);
            let (inbox, cfg) = (self.args.inbox.clone(), self.args.cfg.clone());
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let nice = cfg.nice;
                let spawned = std::thread::Builder::new()
                    .name("mbtd-ingest".into())
                    .spawn(move || {
                        lower_this_threads_priority(nice);
                        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
                        let r =
                            process_file_resuming(&inbox, &path, &mut sink, &cfg, &mut progress);
                        let _ = tx.send((r, progress));
                    });
                let failed = |detail: String| {
                    (
                        Err(IngestError::StoreUnavailable { detail }),
                        Progress::default(),
                    )
                };
                let (result, progress) = match spawned {
                    Err(e) => failed(format!("cannot start the ingestion thread: {e}")),
                    Ok(_) => match rx.await {
                        Ok(done) => done,
                        Err(_) => failed("the ingestion thread panicked".into()),
                    },
                };
                let _ = me
                    .tell(IngestDone {
                        name,
                        result,
                        progress,
                    })
                    .await;
            });
            return;
        }
    }

    /// Accounts for the end of one file's ingestion.
    fn finished(&mut self, name: String, result: Result<FileOutcome, IngestError>) {
        let out = match result {
            Ok(out) => out,
            Err(IngestError::Changed { .. }) => {
                // Still being written: it has to settle again before the next try.
                self.memory.forget(&name);
                tracing::debug!(
                    actor = "ingestor",
                    file = %name,
                    "file changed while it was read; waiting for it to settle"
                );
                return;
            }
            Err(e) if e.is_gone() => {
                tracing::debug!(actor = "ingestor", file = %name, "file gone before it was ingested");
                self.unblock_if(&name);
                return;
            }
            Err(e) => {
                self.failed(name, &e);
                return;
            }
        };
        self.unblock_if(&name);
        let outcome = out.outcome.as_str();
        metrics::counter!(names::INGEST_FILES_TOTAL, "outcome" => outcome).increment(1);
        metrics::counter!(names::INGEST_ROWS_TOTAL).increment(out.rows_appended);
        metrics::counter!(names::INGEST_ROWS_REJECTED_TOTAL).increment(out.rows_rejected);
        metrics::counter!(names::INGEST_PARSE_ERRORS_TOTAL).increment(out.parse_errors);
        metrics::counter!(names::INGEST_BYTES_TOTAL).increment(out.bytes);
        metrics::gauge!(names::INGEST_ROWS_PER_SEC_WINDOW)
            .set(self.rows_rate.add(Instant::now(), out.rows_appended));
        self.last_file = Some(name.clone());
        match out.outcome {
            Outcome::Done => {
                self.files_done += 1;
                tracing::info!(
                    event = events::INGEST_FILE_DONE,
                    actor = "ingestor",
                    file = %name,
                    rows_accepted = out.rows_accepted,
                    rows_appended = out.rows_appended,
                    rows_rejected = out.rows_rejected,
                    bytes = out.bytes,
                    ms = out.total_ms,
                    sidecar = %out.sidecar_path.display()
                );
            }
            Outcome::Failed => {
                self.files_failed += 1;
                tracing::warn!(
                    event = events::INGEST_FILE_FAILED,
                    actor = "ingestor",
                    file = %name,
                    reason = out.reason.as_deref().unwrap_or(""),
                    sidecar = %out.sidecar_path.display()
                );
            }
        }
    }

    /// Ingestion is blocked on `name` and that file went through or went away.
    fn unblock_if(&mut self, name: &str) {
        if self.blocked.as_ref().is_some_and(|b| b.file == name)
            && let Some(b) = self.blocked.take()
        {
            IngestUnblocked {
                blocked_for: b.since.elapsed(),
                failed_attempts: b.failed_attempts,
            }
            .emit();
        }
    }

    /// A file could not be stored: back to the head of the queue, retried after a
    /// back-off; one log line when ingestion becomes blocked, rate-limited ones after.
    fn failed(&mut self, name: String, e: &IngestError) {
        let (disk_full, error, now) = (e.is_disk_full(), e.to_string(), Instant::now());
        let b = self.blocked.get_or_insert_with(|| Blocked {
            since: now,
            since_ms: now_ms(),
            file: name.clone(),
            error: error.clone(),
            disk_full,
            backoff: Duration::ZERO,
            retry_at: now,
            failed_attempts: 0,
            log_limit: RateLimit::new(STILL_BLOCKED_EVERY),
        });
        let first = b.failed_attempts == 0;
        let changed = b.disk_full != disk_full;
        b.failed_attempts += 1;
        b.backoff = (b.backoff * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
        b.retry_at = now + b.backoff;
        (b.file, b.error, b.disk_full) = (name.clone(), error, disk_full);
        if first || changed {
            b.log_limit.admit(now);
            IngestBlocked {
                file: &b.file,
                error: &b.error,
                disk_full,
                retry_in: b.backoff,
            }
            .emit();
        } else {
            IngestRetryFailed { disk_full }.emit();
            if let Some(suppressed) = b.log_limit.admit(now) {
                IngestStillBlocked {
                    file: &b.file,
                    error: &b.error,
                    disk_full,
                    retry_in: b.backoff,
                    suppressed,
                }
                .emit();
            }
        }
        self.queue.retain(|n| n != &name);
        self.queue.push_front(name);
    }
}

/// Stops or restarts taking files from the inbox (`ctl pause-ingest` / `resume-ingest`).
/// The reply is the paused state; a pause asked while a file is being ingested is
/// answered when that file ends ([`IngestDone`]), so after a `true` reply no file is
/// taken or in flight. Other messages (`status`) are handled meanwhile.
pub struct SetPaused(pub bool);

impl Message<SetPaused> for IngestorActor {
    type Reply = DelegatedReply<bool>;

    async fn handle(
        &mut self,
        m: SetPaused,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> DelegatedReply<bool> {
        if self.paused != m.0 {
            let ev = if m.0 {
                events::INGEST_PAUSED
            } else {
                events::INGEST_RESUMED
            };
            tracing::info!(event = ev, actor = "ingestor");
        }
        self.paused = m.0;
        if !self.paused {
            // Pauses still waiting for the file in hand are answered with the new state.
            self.answer_pause_waiters();
            return ctx.reply(false);
        }
        if self.in_flight.is_none() {
            return ctx.reply(true);
        }
        let (delegated, sender) = ctx.reply_sender();
        if let Some(sender) = sender {
            self.pause_waiters.push(sender);
        }
        delegated
    }
}

impl IngestorActor {
    /// Answers the `pause-ingest` requests waiting for the file in flight to end.
    fn answer_pause_waiters(&mut self) {
        for w in self.pause_waiters.drain(..) {
            w.send(self.paused);
        }
    }
}

/// The ingest line of `ctl status`.
pub struct IngestStatus;

impl Message<IngestStatus> for IngestorActor {
    type Reply = Result<serde_json::Value, Infallible>;

    async fn handle(&mut self, _: IngestStatus, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let state = match (self.paused, &self.blocked, &self.held_back) {
            (true, _, _) => "paused",
            (false, Some(b), _) if b.disk_full => "blocked: disk full",
            (false, Some(_), _) => "blocked: store error",
            (false, None, Some(_)) => "held back: replay store full of rows not trained on yet",
            (false, None, None) => "watching",
        };
        let now = Instant::now();
        Ok(serde_json::json!({
            "state": state,
            "ingesting": self.in_flight,
            "waiting_files": self.queue.len(),
            "settling_files": self.settling,
            "blocked": self.blocked.as_ref().map(|b| serde_json::json!({
                "since_ms": b.since_ms,
                "file": b.file,
                "last_error": b.error,
                "failed_attempts": b.failed_attempts,
                "retry_in_ms": b.retry_at.saturating_duration_since(now).as_millis() as u64,
            })),
            "held_back": self.held_back.map(|r| serde_json::json!({
                "store_rows": r.rows,
                "max_rows": r.max_rows,
                "untrained_rows": r.backlog,
            })),
            "inbox": self.args.inbox.display().to_string(),
            "files_done": self.files_done,
            "files_failed": self.files_failed,
            "rows_per_sec": self.rows_rate.rate(Instant::now()),
            "last_file": self.last_file,
        }))
    }
}

#[cfg(feature = "fault-injection")]
impl Message<super::Crash> for IngestorActor {
    type Reply = ();

    async fn handle(&mut self, _: super::Crash, _: &mut Context<Self, Self::Reply>) {
        panic!("fault injection: ingestor actor told to crash");
    }
}
