//! The checkpointer actor: owns `checkpoints/`. Writes snapshots handed over by the trainer
//! (atomically, then `LATEST`), applies retention, lists, deletes, and loads for
//! resume/rollback.
//!
//! A failed write (a full disk above all) is an expected condition, not a crash: the actor
//! answers with the error and stays up; [`WriteHealth`], which outlives restarts of the actor,
//! records since when writes fail and the last error; `ctl status` (section `checkpoints`) and
//! the `checkpoint_failing` gauge show it; one log line marks each change of state (failing,
//! recovered) and repeated failures are logged at most every [`LOG_EVERY`]. Periodic writes
//! back off ([`BACKOFF_INITIAL`] doubling to [`BACKOFF_MAX`]) but are tried at once when the
//! free space needed is back; explicit writes (`ctl checkpoint`, pre-expansion, shutdown) are
//! always tried.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use kameo::prelude::*;
use kameo::reply::DelegatedReply;

use super::checkpoint_events::{
    CheckpointFailing, CheckpointRecovered, CheckpointRejected, CheckpointSkipped,
    CheckpointStillFailing, CheckpointWritten, CheckpointsDeleted, FinalCheckpointFailed,
    RetentionApplied, RetentionFailed,
};
use super::health::{Child, ChildHealth, child_actor};
use crate::checkpoint::{
    self, CheckpointConfig, CheckpointError, LoadedCheckpoint, Manifest, TAG_SHUTDOWN,
};
use crate::telemetry::event::{InternalEvent, RateLimit};
use crate::telemetry::names::{self, events};

/// First delay before a periodic write is tried again after a failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
/// Longest delay between tries of periodic writes while they fail.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// At most one log line per this interval for failures after the first.
pub const LOG_EVERY: Duration = Duration::from_secs(300);
/// Allowance for the manifest on top of the files' bytes when checking free space.
const MANIFEST_ALLOWANCE: u64 = 64 << 10;

#[derive(Clone)]
pub struct CheckpointerArgs {
    pub root: PathBuf,
    pub cfg: CheckpointConfig,
    pub health: Arc<ChildHealth>,
    /// Where the checkpoints section of `ctl status` is published (read without asking the
    /// actor, which may be busy writing).
    pub status: Arc<tokio::sync::watch::Sender<serde_json::Value>>,
    /// What outlives a restart of the actor, and what the daemon reads at exit.
    pub state: Arc<CheckpointState>,
}

/// The checkpointer's [`WriteHealth`], shared across restarts and with the daemon.
#[derive(Debug, Default)]
pub struct CheckpointState(Mutex<WriteHealth>);

impl CheckpointState {
    fn lock(&self) -> MutexGuard<'_, WriteHealth> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the final checkpoint at shutdown failed, naming the steps lost; `None` when it was
    /// written, not needed, or not attempted.
    pub fn final_failure(&self) -> Option<String> {
        self.lock().final_failure.clone()
    }
}

/// An episode of failing writes.
#[derive(Debug, Clone)]
struct Failing {
    since: SystemTime,
    started: Instant,
    last_error: String,
    disk_full: bool,
    failures: u64,
    backoff: Duration,
    next_attempt: Instant,
    /// At the last failure, the free space was below what a checkpoint needs.
    short_of_space: bool,
    log: RateLimit,
}

/// How a failure changed the state.
#[derive(Debug, PartialEq)]
enum FailureTransition {
    /// Writes were fine until now.
    Started { retry_in: Duration },
    /// Already failing; `log` is `Some(suppressed)` when this one may be logged.
    Continued {
        failures: u64,
        log: Option<u64>,
        retry_in: Duration,
    },
}

/// Write outcomes over time: pure bookkeeping, driven by the actor.
#[derive(Debug, Default)]
pub struct WriteHealth {
    /// Newest checkpoint written or resumed from: id and step.
    last_written: Option<(String, u64)>,
    failing: Option<Failing>,
    /// The last error, kept after recovery (cleared by nothing but a newer error).
    last_error: Option<String>,
    final_failure: Option<String>,
    /// Ids of snapshots that were not written → the parent they should have had, so that a
    /// later checkpoint's `parent` names a checkpoint that exists.
    failed_parents: HashMap<String, Option<String>>,
    rejected_at_start: Vec<String>,
    kept_bytes: Option<u64>,
    over_budget: bool,
}

impl WriteHealth {
    /// Whether a periodic write should be tried now: always while writes work; while they
    /// fail, once the back-off has passed, or at once when `space_ok` (the free space a
    /// checkpoint needs is there now) and it was not at the last failure.
    fn should_attempt(&self, now: Instant, space_ok: bool) -> bool {
        match &self.failing {
            None => true,
            Some(f) => now >= f.next_attempt || (f.short_of_space && space_ok),
        }
    }

    fn record_failure(
        &mut self,
        now: Instant,
        wall: SystemTime,
        error: String,
        disk_full: bool,
        short_of_space: bool,
    ) -> FailureTransition {
        self.last_error = Some(error.clone());
        match &mut self.failing {
            None => {
                let mut log = RateLimit::new(LOG_EVERY);
                log.admit(now);
                self.failing = Some(Failing {
                    since: wall,
                    started: now,
                    last_error: error,
                    disk_full,
                    failures: 1,
                    backoff: BACKOFF_INITIAL,
                    next_attempt: now + BACKOFF_INITIAL,
                    short_of_space,
                    log,
                });
                FailureTransition::Started {
                    retry_in: BACKOFF_INITIAL,
                }
            }
            Some(f) => {
                f.failures += 1;
                f.last_error = error;
                f.disk_full = disk_full;
                f.short_of_space = short_of_space;
                f.backoff = (f.backoff * 2).min(BACKOFF_MAX);
                f.next_attempt = now + f.backoff;
                FailureTransition::Continued {
                    failures: f.failures,
                    log: f.log.admit(now),
                    retry_in: f.backoff,
                }
            }
        }
    }

    /// Records a write; returns the episode it ended (time failing, failures), if any.
    fn record_success(&mut self, id: &str, step: u64, now: Instant) -> Option<(Duration, u64)> {
        self.last_written = Some((id.to_string(), step));
        self.failed_parents.clear();
        self.failing
            .take()
            .map(|f| (now.saturating_duration_since(f.started), f.failures))
    }

    /// The parent a snapshot should record: `parent`, or, when that snapshot was never
    /// written, the parent it would have had (transitively).
    fn correct_parent(&self, mut parent: Option<String>) -> Option<String> {
        for _ in 0..=self.failed_parents.len() {
            match parent.as_ref().and_then(|p| self.failed_parents.get(p)) {
                Some(p) => parent = p.clone(),
                None => break,
            }
        }
        parent
    }

    fn remember_unwritten(&mut self, id: &str, parent: Option<String>) {
        if self.failed_parents.len() < 1024 {
            self.failed_parents.insert(id.to_string(), parent);
        }
    }

    /// The `checkpoints` section of `ctl status`.
    fn status(&self, latest: Option<String>, now: Instant) -> serde_json::Value {
        let state = match &self.failing {
            None => "ok".to_string(),
            Some(f) => format!(
                "failing since {} ({} failures{}), next periodic try in {} s{}",
                checkpoint::manifest::format_rfc3339(f.since),
                f.failures,
                if f.disk_full { ", disk full" } else { "" },
                f.next_attempt.saturating_duration_since(now).as_secs(),
                if f.short_of_space {
                    " or as soon as space is free"
                } else {
                    ""
                }
            ),
        };
        serde_json::json!({
            "state": state,
            "last_error": self.last_error,
            "latest": latest,
            "last_written": self.last_written.as_ref().map(|(id, _)| id),
            "last_written_step": self.last_written.as_ref().map(|(_, s)| s),
            "disk_bytes": self.kept_bytes,
            "over_budget": self.over_budget,
            "rejected_at_start": self.rejected_at_start,
        })
    }
}

pub struct CheckpointerActor {
    args: CheckpointerArgs,
}

child_actor!(
    CheckpointerActor,
    "checkpointer",
    CheckpointerArgs,
    CheckpointError
);

impl Child for CheckpointerActor {
    fn health(&self) -> &ChildHealth {
        &self.args.health
    }
}

impl CheckpointerActor {
    async fn start(args: CheckpointerArgs, _: ActorRef<Self>) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(&args.root).map_err(|source| CheckpointError::Fs {
            op: "create directory",
            path: args.root.clone(),
            source,
        })?;
        metrics::counter!(names::CHECKPOINTS_TOTAL).increment(0);
        metrics::counter!(names::CHECKPOINT_FAILURES_TOTAL).increment(0);
        metrics::counter!(names::CHECKPOINTS_REJECTED_TOTAL).increment(0);
        metrics::counter!(names::CHECKPOINTS_SKIPPED_TOTAL).increment(0);
        metrics::counter!(names::CHECKPOINTS_DELETED_TOTAL).increment(0);
        metrics::gauge!(names::CHECKPOINT_WRITE_SECONDS).set(0.0);
        metrics::gauge!(names::CHECKPOINT_BYTES).set(0.0);
        let failing = args.state.lock().failing.is_some();
        metrics::gauge!(names::CHECKPOINT_FAILING).set(if failing { 1.0 } else { 0.0 });
        let me = Self { args };
        me.publish();
        Ok(me)
    }
}

/// A snapshot of the trainer, taken between steps: the manifest (without file hashes) and
/// the file contents.
pub struct Snapshot {
    pub manifest: Manifest,
    pub files: Vec<(&'static str, Vec<u8>)>,
}

/// Writes a snapshot. Sent with `ask`, an explicit checkpoint: always tried, the reply
/// carries the id or why it failed. Sent with `tell`, a periodic one: backed off while
/// writes fail, the outcome only reported (never an actor error). A `shutdown` snapshot
/// identical to `LATEST` (nothing trained since) is not written again; the reply names
/// `LATEST` with `"unchanged": true`.
pub struct Write(pub Snapshot);

impl Message<Write> for CheckpointerActor {
    type Reply = DelegatedReply<Result<serde_json::Value, String>>;

    async fn handle(
        &mut self,
        Write(s): Write,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        let (delegated, sender) = ctx.reply_sender();
        let periodic = sender.is_none();
        let result = tokio::task::block_in_place(|| self.write(s, periodic));
        if let Some(tx) = sender {
            tx.send(result);
        }
        delegated
    }
}

impl CheckpointerActor {
    fn publish(&self) {
        let latest = checkpoint::read_latest(&self.args.root).ok().flatten();
        let v = self.args.state.lock().status(latest, Instant::now());
        let _ = self.args.status.send(v);
    }

    fn write(&mut self, mut s: Snapshot, periodic: bool) -> Result<serde_json::Value, String> {
        let root = self.args.root.clone();
        let reserve = self.args.cfg.min_free_bytes;
        let needed = s.files.iter().map(|(_, b)| b.len() as u64).sum::<u64>() + MANIFEST_ALLOWANCE;
        let space_ok =
            || checkpoint::free_bytes(&root).is_ok_and(|f| f >= needed.saturating_add(reserve));
        let step = s.manifest.step;
        let id = s.manifest.id.clone();
        let is_final = !periodic && s.manifest.tag.as_deref() == Some(TAG_SHUTDOWN);
        {
            let mut st = self.args.state.lock();
            s.manifest.parent = st.correct_parent(s.manifest.parent.take());
            if periodic && !st.should_attempt(Instant::now(), space_ok()) {
                st.remember_unwritten(&id, s.manifest.parent.clone());
                CheckpointSkipped.emit();
                return Err("not attempted: checkpoint writes are failing and backing off".into());
            }
        }
        if is_final && let Some(same) = unchanged_since_parent(&root, &s) {
            self.args
                .state
                .lock()
                .record_success(&same, step, Instant::now());
            return Ok(serde_json::json!({"id": same, "step": step, "unchanged": true}));
        }
        let files: Vec<(&str, &[u8])> = s.files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let written = checkpoint::check_free_space(&root, needed, reserve)
            .and_then(|()| checkpoint::write_checkpoint(&root, &s.manifest, &files));
        let now = Instant::now();
        match written {
            Ok(info) => {
                CheckpointWritten {
                    id: &info.id,
                    step,
                    tag: s.manifest.tag.as_deref(),
                    bytes: info.bytes,
                    seconds: info.seconds,
                }
                .emit();
                let ended = self.args.state.lock().record_success(&info.id, step, now);
                if let Some((failing_for, failures)) = ended {
                    CheckpointRecovered {
                        id: &info.id,
                        failing_for_s: failing_for.as_secs_f64(),
                        failures,
                    }
                    .emit();
                }
                self.retain();
                self.publish();
                Ok(serde_json::json!({
                    "id": info.id,
                    "step": step,
                    "bytes": info.bytes,
                    "seconds": info.seconds,
                }))
            }
            Err(e) => {
                let error = e.to_string();
                let disk_full = e.is_disk_full();
                let short = !space_ok();
                let mut st = self.args.state.lock();
                st.remember_unwritten(&id, s.manifest.parent.clone());
                match st.record_failure(now, SystemTime::now(), error.clone(), disk_full, short) {
                    FailureTransition::Started { retry_in } => CheckpointFailing {
                        step,
                        error: &error,
                        disk_full,
                        retry_in_s: retry_in.as_secs_f64(),
                    }
                    .emit(),
                    FailureTransition::Continued {
                        failures,
                        log: Some(suppressed),
                        retry_in,
                    } => CheckpointStillFailing {
                        step,
                        error: &error,
                        disk_full,
                        failures,
                        suppressed,
                        retry_in_s: retry_in.as_secs_f64(),
                    }
                    .emit(),
                    FailureTransition::Continued { log: None, .. } => {}
                }
                if is_final {
                    let last = st.last_written.clone();
                    let steps_lost = step - last.as_ref().map_or(0, |(_, s)| *s).min(step);
                    st.final_failure = Some(format!(
                        "the final checkpoint at step {step} failed ({error}); {steps_lost} steps of training since {} are lost",
                        last.as_ref().map_or_else(
                            || "the start (no checkpoint was ever written)".to_string(),
                            |(id, s)| format!("checkpoint {id} (step {s})")
                        )
                    ));
                    FinalCheckpointFailed {
                        step,
                        last_written: last.as_ref().map(|(id, s)| (id.as_str(), *s)),
                        steps_lost,
                        error: &error,
                    }
                    .emit();
                }
                drop(st);
                self.publish();
                Err(error)
            }
        }
    }

    /// Applies retention (see [`checkpoint::retention`]); failures are logged and retried
    /// after the next write.
    fn retain(&self) {
        let root = &self.args.root;
        let policy = self.args.cfg.retention();
        let outcome = checkpoint::list(root).and_then(|l| {
            let plan = checkpoint::plan_retention(&l.checkpoints, &policy, SystemTime::now());
            checkpoint::remove_checkpoints(root, &plan.delete).map(|deleted| (plan, deleted))
        });
        match outcome {
            Ok((plan, deleted)) => {
                RetentionApplied {
                    deleted: &deleted,
                    kept_bytes: plan.kept_bytes,
                    over_budget: plan.over_budget,
                    max_bytes: policy.max_bytes,
                }
                .emit();
                let mut st = self.args.state.lock();
                st.kept_bytes = Some(plan.kept_bytes);
                st.over_budget = plan.over_budget;
            }
            Err(e) => RetentionFailed {
                error: &e.to_string(),
            }
            .emit(),
        }
    }
}

/// `LATEST`'s id when the snapshot's parent is `LATEST` and holds exactly this state: same
/// step, widths and loop state, and every file with the same size and blake3.
fn unchanged_since_parent(root: &Path, s: &Snapshot) -> Option<String> {
    let parent = s.manifest.parent.as_deref()?;
    if checkpoint::read_latest(root).ok()??.as_str() != parent {
        return None;
    }
    let m = checkpoint::format::read_manifest(&root.join(parent)).ok()?;
    let same = m.step == s.manifest.step
        && m.widths == s.manifest.widths
        && m.state == s.manifest.state
        && m.files.len() == s.files.len()
        && s.files.iter().all(|(name, bytes)| {
            m.files.get(*name).is_some_and(|e| {
                e.bytes == bytes.len() as u64 && e.blake3 == blake3::hash(bytes).to_hex().as_str()
            })
        });
    same.then(|| parent.to_string())
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

/// Deletes the checkpoint with this id, or every checkpoint with this tag
/// (`ctl checkpoint delete`); see [`checkpoint::delete`].
pub struct Delete(pub String);

impl Message<Delete> for CheckpointerActor {
    type Reply = Result<serde_json::Value, String>;

    async fn handle(
        &mut self,
        Delete(name): Delete,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        let root = self.args.root.clone();
        let ids = tokio::task::block_in_place(|| checkpoint::delete(&root, &name))
            .map_err(|e| e.to_string())?;
        CheckpointsDeleted {
            name: &name,
            ids: &ids,
        }
        .emit();
        tokio::task::block_in_place(|| self.retain());
        self.publish();
        Ok(serde_json::json!({ "deleted": ids }))
    }
}

/// Which checkpoint to load.
#[derive(Debug, Clone)]
pub enum Target {
    /// What the daemon resumes from at start: LATEST, or the newest valid one.
    Resume,
    /// An id, `previous` (the one before LATEST), or a tag (newest with it).
    Named(String),
}

/// Loads and verifies a checkpoint (resume or rollback). For a rollback, LATEST is moved to
/// it so that a restart resumes from the restored state.
pub struct Load(pub Target);

impl Message<Load> for CheckpointerActor {
    type Reply = Result<Option<LoadedCheckpoint>, String>;

    async fn handle(&mut self, Load(t): Load, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let root = self.args.root.clone();
        let resume = matches!(t, Target::Resume);
        let r = tokio::task::block_in_place(|| load(&root, t, &self.args.state));
        if let Ok(Some(c)) = &r {
            let mut st = self.args.state.lock();
            st.last_written = Some((c.manifest.id.clone(), c.manifest.step));
        }
        if resume {
            // A changed budget or rule applies from the start, not only after the next write.
            tokio::task::block_in_place(|| self.retain());
        }
        self.publish();
        r
    }
}

fn load(
    root: &Path,
    t: Target,
    state: &CheckpointState,
) -> Result<Option<LoadedCheckpoint>, String> {
    match t {
        Target::Resume => {
            let r = checkpoint::open_latest(root).map_err(|e| e.to_string())?;
            for rej in &r.rejected {
                CheckpointRejected {
                    id: &rej.id,
                    reason: &rej.reason,
                }
                .emit();
                state
                    .lock()
                    .rejected_at_start
                    .push(format!("{}: {}", rej.id, rej.reason));
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
            let id = list.resolve(&name).map_err(|e| e.to_string())?.id.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(h: &mut WriteHealth, now: Instant, short: bool) -> FailureTransition {
        h.record_failure(
            now,
            SystemTime::now(),
            "No space left on device".into(),
            true,
            short,
        )
    }

    #[test]
    fn failures_back_off_and_a_success_ends_the_episode() {
        let t0 = Instant::now();
        let mut h = WriteHealth::default();
        assert!(h.should_attempt(t0, false));
        assert_eq!(
            fail(&mut h, t0, false),
            FailureTransition::Started {
                retry_in: BACKOFF_INITIAL
            }
        );
        assert!(!h.should_attempt(t0 + Duration::from_secs(1), true));
        assert!(h.should_attempt(t0 + BACKOFF_INITIAL, false));
        let t1 = t0 + BACKOFF_INITIAL;
        assert_eq!(
            fail(&mut h, t1, false),
            FailureTransition::Continued {
                failures: 2,
                log: None,
                retry_in: BACKOFF_INITIAL * 2
            }
        );
        // The back-off doubles up to its cap.
        let mut t = t1;
        for _ in 0..10 {
            t += BACKOFF_MAX;
            fail(&mut h, t, false);
        }
        assert_eq!(h.failing.as_ref().unwrap().backoff, BACKOFF_MAX);
        let status = h.status(Some("a".into()), t);
        assert!(
            status["state"]
                .as_str()
                .unwrap()
                .starts_with("failing since "),
            "{status}"
        );
        assert_eq!(status["last_error"], "No space left on device");
        let ended = h
            .record_success("b", 7, t + Duration::from_secs(1))
            .unwrap();
        assert_eq!(ended.1, 12);
        assert!(h.should_attempt(t, false));
        let status = h.status(Some("b".into()), t);
        assert_eq!(status["state"], "ok");
        assert_eq!(status["last_written"], "b");
        // The last error stays visible after recovery.
        assert_eq!(status["last_error"], "No space left on device");
    }

    #[test]
    fn freed_space_allows_a_try_before_the_back_off_ends() {
        let t0 = Instant::now();
        let mut h = WriteHealth::default();
        fail(&mut h, t0, true);
        let soon = t0 + Duration::from_secs(1);
        assert!(!h.should_attempt(soon, false), "still no space");
        assert!(h.should_attempt(soon, true), "space is back");
        // A failure that was not for lack of space waits for the back-off.
        let mut h = WriteHealth::default();
        fail(&mut h, t0, false);
        assert!(!h.should_attempt(soon, true));
    }

    #[test]
    fn repeated_failures_are_logged_once_per_interval() {
        let t0 = Instant::now();
        let mut h = WriteHealth::default();
        fail(&mut h, t0, false);
        let mut logged = 0;
        for i in 1..=100 {
            if let FailureTransition::Continued { log: Some(_), .. } =
                fail(&mut h, t0 + Duration::from_secs(6 * i), false)
            {
                logged += 1;
            }
        }
        // 600 s of failures, one line per LOG_EVERY (300 s).
        assert_eq!(logged, 2);
    }

    #[test]
    fn parents_skip_snapshots_that_were_never_written() {
        let mut h = WriteHealth::default();
        h.record_success("a", 1, Instant::now());
        h.remember_unwritten("b", Some("a".into()));
        h.remember_unwritten("c", h.correct_parent(Some("b".into())));
        assert_eq!(h.correct_parent(Some("c".into())), Some("a".into()));
        assert_eq!(h.correct_parent(Some("a".into())), Some("a".into()));
        assert_eq!(h.correct_parent(None), None);
        h.record_success("d", 2, Instant::now());
        assert_eq!(h.correct_parent(Some("d".into())), Some("d".into()));
    }
}
