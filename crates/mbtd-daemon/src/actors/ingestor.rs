//! The ingestor actor: watches the inbox (notify, debounced), rescans it periodically as a
//! fallback and at start-up, picks files once complete, and has the replay actor append them.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kameo::error::Infallible;
use kameo::prelude::*;
use notify::Watcher;

use super::health::ChildHealth;
use super::metrics::AbortOnDrop;
use super::replay::{IngestFile, ReplayActor, Room, RoomReply};
use crate::ingest::{IngestConfig, Outcome, ScanMemory, list_inbox, select_candidates};
use crate::store::fsutil::now_ms;
use crate::telemetry::names::{self, events};
use crate::telemetry::rate::RateWindow;

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
    /// Ready files not taken yet, oldest first. One file is taken per [`Scan`] message, so
    /// that a pause (or a stop) asked during a backlog takes effect after the file in hand.
    queue: VecDeque<String>,
    /// Names the watcher saw renamed in, kept until the next listing.
    renamed_in: HashSet<String>,
    /// When the inbox was last listed.
    last_listing: Option<Instant>,
    _watcher: Option<notify::RecommendedWatcher>,
    _pump: AbortOnDrop,
}

/// How many inbox events have been seen and which names were renamed in.
pub struct Scan {
    pub renamed_in: HashSet<String>,
    pub events: u64,
}

impl Actor for IngestorActor {
    type Args = IngestorArgs;
    type Error = Infallible;

    fn name() -> &'static str {
        "ingestor"
    }

    async fn on_start(args: Self::Args, me: ActorRef<Self>) -> Result<Self, Self::Error> {
        args.health.on_start().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, Vec<PathBuf>)>();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(mut ev) = ev {
                use notify::event::{ModifyKind, RenameMode};
                // Only the destination of a rename is a file renamed *in*: a name moved out
                // (to `.done/`, or away by a producer) must not make a new file written in
                // place under that name ready before it settles.
                let renamed = match ev.kind {
                    notify::EventKind::Modify(ModifyKind::Name(RenameMode::From)) => false,
                    notify::EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                        ev.paths.drain(..ev.paths.len().saturating_sub(1));
                        true
                    }
                    notify::EventKind::Modify(ModifyKind::Name(_)) => true,
                    _ => false,
                };
                let _ = tx.send((renamed, ev.paths));
            }
        })
        .and_then(|mut w| {
            w.watch(&args.inbox, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    actor = "ingestor",
                    error = %e,
                    "cannot watch the inbox; relying on the periodic rescan"
                );
                None
            }
        };
        let rescan = Duration::from_millis(args.cfg.rescan_ms);
        let settle = Duration::from_millis(args.cfg.settle_ms.max(50));
        // A strong reference: after a supervisor restart, `me` is a fresh `ActorRef` (same
        // mailbox) that nobody else holds, so a weak one would stop upgrading as soon as
        // `on_start` returns and the restarted ingestor would never scan again. The task is
        // aborted when this state is dropped, which releases the reference.
        let pump = tokio::spawn(async move {
            let mut renamed_in = HashSet::new();
            let mut events = 0u64;
            // First scan at once: whatever arrived while the daemon was down.
            let mut deadline = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    ev = rx.recv() => {
                        let Some((renamed, paths)) = ev else { return };
                        events += 1;
                        if renamed {
                            for p in paths {
                                if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                                    renamed_in.insert(n.to_string());
                                }
                            }
                        }
                        // Debounce: scan shortly after a burst of events.
                        let soon = tokio::time::Instant::now() + Duration::from_millis(100);
                        deadline = deadline.min(soon);
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        let scan = Scan { renamed_in: std::mem::take(&mut renamed_in), events };
                        events = 0;
                        // `ask`, not `tell`: the next file is taken only once this one is
                        // done, so requests queued meanwhile (pause, stop) come first.
                        let more = match me.ask(scan).await {
                            Ok(more) => more,
                            Err(_) => return,
                        };
                        deadline = if more {
                            // More files are queued: take the next one at once.
                            tokio::time::Instant::now()
                        } else {
                            // Files still settling need another look after `settle`.
                            tokio::time::Instant::now() + rescan.min(settle)
                        };
                    }
                }
            }
        });
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
            last_listing: None,
            _watcher: watcher,
            _pump: AbortOnDrop(pump),
        })
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

impl Message<Scan> for IngestorActor {
    /// True when more ready files are queued (the pump then sends the next scan at once).
    type Reply = bool;

    async fn handle(&mut self, scan: Scan, _: &mut Context<Self, Self::Reply>) -> bool {
        let now = Instant::now();
        metrics::gauge!(names::INGEST_EVENTS_PER_SEC_WINDOW)
            .set(self.events_rate.add(now, scan.events));
        metrics::gauge!(names::INGEST_ROWS_PER_SEC_WINDOW).set(self.rows_rate.rate(now));
        self.renamed_in.extend(scan.renamed_in);
        if self.paused {
            return false;
        }
        // List the inbox when nothing is queued, else at most once per scan period (a long
        // backlog is not listed again for every file).
        let period =
            Duration::from_millis(self.args.cfg.rescan_ms.min(self.args.cfg.settle_ms.max(50)));
        if self.queue.is_empty() || self.last_listing.is_none_or(|t| t.elapsed() >= period) {
            self.last_listing = Some(now);
            self.list_and_select();
        }
        if self.queue.is_empty() || !self.has_room().await {
            return false;
        }
        if let Some(name) = self.queue.pop_front() {
            self.ingest(name).await;
        }
        !self.queue.is_empty()
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
            now_ms(),
            self.args.cfg.settle_ms,
        );
        self.memory = memory;
        let queued: HashSet<String> = self.queue.iter().cloned().collect();
        for name in sel.ready {
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

    async fn ingest(&mut self, name: String) {
        let path = self.args.inbox.join(&name);
        if path.symlink_metadata().is_err() {
            // Queued, then removed by someone else before its turn.
            return;
        }
        let out = match self.args.replay.ask(IngestFile(path)).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(
                    event = events::INGEST_ERROR,
                    actor = "ingestor",
                    file = %name,
                    error = %e,
                    "ingestion failed; the file stays in the inbox and is retried"
                );
                return;
            }
        };
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
}

/// Stops or restarts taking files from the inbox (`ctl pause-ingest` / `resume-ingest`).
pub struct SetPaused(pub bool);

impl Message<SetPaused> for IngestorActor {
    type Reply = bool;

    async fn handle(&mut self, m: SetPaused, _: &mut Context<Self, Self::Reply>) -> bool {
        if self.paused != m.0 {
            let ev = if m.0 {
                events::INGEST_PAUSED
            } else {
                events::INGEST_RESUMED
            };
            tracing::info!(event = ev, actor = "ingestor");
        }
        self.paused = m.0;
        self.paused
    }
}

/// The ingest line of `ctl status`.
pub struct IngestStatus;

impl Message<IngestStatus> for IngestorActor {
    type Reply = Result<serde_json::Value, Infallible>;

    async fn handle(&mut self, _: IngestStatus, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        Ok(serde_json::json!({
            "state": match (self.paused, &self.held_back) {
                (true, _) => "paused",
                (false, Some(_)) => "held back: replay store full of rows not trained on yet",
                (false, None) => "watching",
            },
            "waiting_files": self.queue.len(),
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
