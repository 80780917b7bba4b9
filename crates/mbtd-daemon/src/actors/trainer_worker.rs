//! Why over 600 lines: the step loop and the per-step state it carries (batch assembly from
//! the mix, the step, eval scheduling, checkpoint snapshots) are one piece; boot, commands,
//! governor glue and events are in trainer_{boot,commands,governor,events}.rs.
//!
//! The trainer's compute thread: owns the model, the optimizer, the tokenizer and the
//! availability model, runs training steps back to back, and handles operator commands
//! between steps (so a step never blocks the async runtime or the admin socket).
//!
//! It only orchestrates: which windows a step trains on is [`crate::learn::mix`], the
//! control evaluation [`crate::learn::eval`], the governor's rule [`crate::govern::policy`]
//! (glue in [`super::trainer_governor`]), commands [`super::trainer_commands`], metrics
//! [`super::trainer_events`]. Between steps it blocks on its wake-up channel: commands, and
//! a notification from the replay actor when rows were appended. The only timed wake-ups are
//! the idle-step rate (`training.idle_steps_per_min`) and the retry after a peer failed.
//!
//! Two phases, typed: [`Booting`] until the model exists (resume from a checkpoint, or
//! tokenizer bootstrap and a fresh model), then a [`Worker`] that always holds a [`Live`]
//! model.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime};

use kameo::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::checkpointer::{CheckpointerActor, Snapshot, Write};
use super::replay::{ControlRows, ReplayActor, TrainRows};
use super::trainer_boot::Booting;
pub use super::trainer_boot::{RestoreError, ResumeError};
use super::trainer_cluster::{ClusterLink, QUORUM_RETRY, retryable};
pub use super::trainer_commands::Cmd;
use super::trainer_commands::PauseMarker;
use super::trainer_events::{EvalDone, StepDone, TrainStepFailed, forced_off_count};
pub use super::trainer_wake::Wake;
use super::trainer_wake::{Next, Woken, wait};
use crate::checkpoint::Manifest;
use crate::config::Config;
use crate::govern::GovernorState;
use crate::govern::diagnostics::{LayerDiagnostics, layer_diagnostics, stats};
use crate::learn::consolidate::Consolidation;
use crate::learn::eval::{self, EvalReport};
use crate::learn::mix::{NewWindows, StepInputs, StepMix, replay_round_seed};
use crate::model::train::StepReport;
use crate::model::{Batch, Masks, Trainer, availability::Availability};
use crate::store::format::Record;
use crate::store::state::splitmix64;
use crate::telemetry::event::InternalEvent;
use crate::telemetry::names as n;
use crate::text::tokenizer::Tokenizer;

/// Decay per step of the training-loss EMA fed to the governor (horizon about 20 steps).
const TRAIN_LOSS_EMA_DECAY: f64 = 0.95;
/// Decay per step of the per-layer `effective_num_paths` EMA fed to the governor.
const EFF_PATHS_EMA_DECAY: f64 = 0.95;
/// Wait before asking a peer actor (replay, checkpointer) again after it failed.
pub(super) const PEER_RETRY: Duration = Duration::from_millis(500);
/// Wait before loading a configured tokenizer file again after it failed.
pub(super) const TOKENIZER_RETRY: Duration = Duration::from_secs(1);

/// Loop state that is saved in every checkpoint's manifest (`state`), for exact resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Every new row with a sequence number up to `cursor` has been trained on.
    pub cursor: u64,
    /// Unpacked training: the next row, when some of its pieces were already trained:
    /// (seq, pieces done).
    #[serde(default)]
    pub partial: Option<(u64, usize)>,
    /// Packed training: the pieces `(row, piece)` of rows after `cursor` already trained
    /// (packing trains them out of order; see [`crate::learn::mix`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ahead: Vec<(u64, usize)>,
    pub tokens_total: u64,
    pub availability: crate::model::availability::AvailabilityState,
    /// First sequence number of the "new" era of the control slice.
    pub eval_boundary: u64,
    /// Per layer and branch, steps in which the branch was active.
    pub select_counts: Vec<Vec<u64>>,
    pub steps_at_min_active: u64,
    /// Last control losses (old era, new era); `None` where an era had no rows.
    pub last_control: (Option<f64>, Option<f64>),
    /// The expansion governor's memory: the expansion in ramp or probation (its `η` ramp is
    /// the only one applied), cool-downs, back-offs, recent decisions. After a governor
    /// rollback the live copy is kept, not this checkpoint's (it holds the back-off).
    #[serde(default)]
    pub governor: GovernorState,
    /// EMA of the training loss (a governor input).
    #[serde(default)]
    pub train_loss_ema: Option<f64>,
    /// Per layer, EMA of `effective_num_paths` (a governor input).
    #[serde(default)]
    pub eff_paths_ema: Vec<Option<f64>>,
}

pub struct WorkerArgs {
    pub cfg: Config,
    /// The daemon's data directory (the pause marker lives there).
    pub data_dir: PathBuf,
    pub replay: ActorRef<ReplayActor>,
    pub checkpointer: ActorRef<CheckpointerActor>,
    pub wakes: Receiver<Wake>,
    pub status: watch::Sender<serde_json::Value>,
    /// The coordinator's nodes (`[cluster]`); `None`: every branch in this process.
    pub cluster: Option<std::sync::Arc<crate::cluster::ClusterView>>,
}

/// The model and everything that goes with it, once it exists.
pub(super) struct Live {
    pub tok: Tokenizer,
    pub trainer: Trainer,
    pub avail: Availability,
    pub st: LoopState,
    /// The checkpoint this state descends from.
    pub parent: Option<String>,
}

pub(super) fn ask_blocking<A, M>(r: &ActorRef<A>, m: M) -> Result<<A::Reply as Reply>::Ok, String>
where
    A: Actor + Message<M>,
    M: Send + 'static,
    <A::Reply as Reply>::Error: std::fmt::Display,
{
    r.ask(m).blocking_send().map_err(|e| e.to_string())
}

/// Seed of step `t`'s sampling: independent of thread timing, so resume is exact.
pub(super) fn step_seed(seed: u64, t: u64) -> u64 {
    splitmix64(seed ^ splitmix64(t.wrapping_add(0x9e37)))
}

/// Runs until `Cmd::Stop` or the wake-up channel closes; `Err` when the checkpoint to
/// resume from cannot be restored.
pub fn run(a: WorkerArgs) -> Result<(), ResumeError> {
    init_metrics();
    let mut boot = Booting {
        paused: PauseMarker::new(&a.data_dir),
        a,
        state_name: "starting",
        last_event: String::new(),
    };
    let mut live = match boot.resume()? {
        Some(live) => live,
        None => match boot.run() {
            Some(live) => live,
            None => return Ok(()),
        },
    };
    // a resumed model pushes the checkpoint's branches to the nodes before its first step
    let quorum = live.avail.config().min_active;
    let cluster = boot
        .a
        .cluster
        .clone()
        .map(|v| ClusterLink::attach(v, &mut live.trainer, quorum));
    let mut worker = Worker::new(boot, live);
    worker.cluster = cluster;
    worker.run();
    Ok(())
}

fn init_metrics() {
    for c in [
        n::TRAIN_STEPS_TOTAL,
        n::EXPANSION_EVENTS_TOTAL,
        n::ROLLBACKS_TOTAL,
    ] {
        metrics::counter!(c).increment(0);
    }
    for d in ["none", "expand", "set_eta", "keep", "rollback"] {
        metrics::counter!(n::GOVERNOR_DECISIONS_TOTAL, "decision" => d).absolute(0);
    }
    metrics::gauge!(n::GOVERNOR_EXPANSION_IN_PROGRESS).set(0.0);
    for g in [
        n::ETA_INJECTION_LAST,
        n::SUM_W_NEW_LAST,
        n::EXPAND_DRIFT_L2_MEAN,
        n::EXPAND_DRIFT_L2_STD,
        n::EXPAND_DRIFT_COS_MEAN,
        n::EXPAND_DRIFT_COS_STD,
    ] {
        metrics::gauge!(g).set(0.0);
    }
}

/// Counts of pieces of new rows (see [`Worker::new_pieces`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct NewPieces {
    pub queued: u64,
    pub trained: u64,
}

/// The thread once the model exists.
pub(super) struct Worker {
    pub a: WorkerArgs,
    pub live: Live,
    pub paused: PauseMarker,
    /// Pieces of new rows not trained yet.
    pub pending: NewWindows,
    /// Pieces of new rows queued and pieces trained by completed steps, since the start
    /// (a step skipped for its quorum puts its pieces back; a rollback queues the pieces
    /// after its checkpoint again).
    pub new_pieces: NewPieces,
    pub last_seq: u64,
    pub training_rows: u64,
    pub ratios: VecDeque<f64>,
    pub replay_deltas: VecDeque<f64>,
    pub last_loss: Option<f32>,
    pub tok_rate: f64,
    pub last_ckpt: (u64, Instant),
    pub last_idle_step: Instant,
    pub last_event: String,
    /// The first batch trained (drift and bitwise checks run on it).
    pub probe: Option<Batch>,
    pub pre_expand_logits: Option<Vec<f32>>,
    /// Per layer, the last step's diagnostics and branch output energies.
    pub last_diag: Vec<(LayerDiagnostics, Vec<f64>)>,
    /// Recent governor actions and manual expansions with their outcomes (not checkpointed).
    pub gov_actions: VecDeque<serde_json::Value>,
    /// The pace of replay-only steps.
    pub pace: Consolidation,
    /// Steps and time since the last scheduled evaluation (the full-speed rate).
    pub since_eval: (u64, Instant),
    /// The branches on other machines (`[cluster]`).
    pub cluster: Option<ClusterLink>,
}

impl Worker {
    fn new(boot: Booting, live: Live) -> Self {
        let tc = &boot.a.cfg.training;
        let pace = Consolidation::new(
            tc.consolidation_patience,
            tc.idle_steps_per_min,
            Some(tc.max_idle_steps_per_min),
        );
        Self {
            pending: NewWindows::new(live.st.cursor, live.st.partial, &live.st.ahead),
            new_pieces: NewPieces::default(),
            last_ckpt: (live.trainer.step(), Instant::now()),
            live,
            a: boot.a,
            paused: boot.paused,
            last_seq: 0,
            training_rows: 0,
            ratios: VecDeque::new(),
            replay_deltas: VecDeque::new(),
            last_loss: None,
            tok_rate: 0.0,
            last_idle_step: Instant::now() - Duration::from_secs(3600),
            last_event: boot.last_event,
            probe: None,
            pre_expand_logits: None,
            last_diag: Vec::new(),
            gov_actions: VecDeque::new(),
            pace,
            since_eval: (0, Instant::now()),
            cluster: None,
        }
    }

    fn run(mut self) {
        let mut next = Next::Now;
        loop {
            self.publish();
            match wait(&self.a.wakes, next) {
                Woken::Closed => return,
                Woken::Cmd(c) => {
                    if self.handle(c) {
                        return;
                    }
                    // Commands queued behind it go first.
                    next = Next::Now;
                    continue;
                }
                Woken::Work => {}
            }
            next = if self.paused.is_paused() {
                Next::Wake
            } else {
                self.train_once()
            };
        }
    }

    /// Replaces the live state with a restored checkpoint's (rollback).
    pub(super) fn install(&mut self, mut live: Live) {
        if let Some(link) = self.cluster.as_mut() {
            link.reattach(&mut self.live.trainer, &mut live.trainer);
        }
        self.pending = NewWindows::new(live.st.cursor, live.st.partial, &live.st.ahead);
        self.last_ckpt = (live.trainer.step(), Instant::now());
        self.live = live;
    }

    /// The time between idle (replay-only) steps: `Some(None)` at full speed, `None` when
    /// they are off (`training.idle_steps_per_min = 0`).
    fn idle_interval(&self) -> Option<Option<Duration>> {
        (self.a.cfg.training.idle_steps_per_min > 0).then(|| self.pace.interval())
    }

    /// Tops the queue of new pieces up to what a step looks at (the same steps whatever the
    /// fetch history, so a resumed run trains exactly what a straight run would) and samples
    /// the replay rows of step seed `seed`.
    fn fetch(&mut self, seed: u64) -> Result<Vec<Record>, String> {
        let tc = &self.a.cfg.training;
        let mut replay = None;
        loop {
            let want_new = self.pending.wanted(tc);
            let rows = ask_blocking(
                &self.a.replay,
                TrainRows {
                    cursor: self.pending.fetched_through(),
                    n_new: want_new,
                    n_replay: if replay.is_none() {
                        NewWindows::replay_rows(tc)
                    } else {
                        0
                    },
                    seed,
                },
            )?;
            if replay.is_none() {
                replay = Some(rows.replay);
                self.last_seq = rows.last_seq;
                self.training_rows = rows.training_rows;
            }
            let before = self.pending.len();
            self.pending
                .push_rows(&self.live.tok, &rows.new, tc.seq_len);
            self.new_pieces.queued += (self.pending.len() - before) as u64;
            if self.pending.wanted(tc) == 0 || rows.new.len() < want_new || want_new == 0 {
                return Ok(replay.unwrap_or_default());
            }
        }
    }

    /// One training step, or nothing when there is no data and no idle step is due; says
    /// when to try again.
    fn train_once(&mut self) -> Next {
        let cfg = self.a.cfg.clone();
        let tc = &cfg.training;
        let t = self.live.trainer.step();
        let seed = step_seed(tc.seed, t);
        if tc.max_steps > 0 && t >= tc.max_steps {
            // Said by the status's state; `last_event` keeps what happened last.
            return Next::Wake;
        }
        self.cluster_sync();
        let replay_rows = match self.fetch(seed) {
            Ok(r) => r,
            Err(e) => {
                self.last_event = format!("replay unavailable: {e}");
                return Next::At(Instant::now() + PEER_RETRY);
            }
        };
        let history = self.training_rows > 0 && !replay_rows.is_empty();
        if self.pending.is_empty() {
            let Some(every) = self.idle_interval().filter(|_| history) else {
                return Next::Wake;
            };
            if let Some(due) = every.map(|e| self.last_idle_step + e)
                && Instant::now() < due
            {
                return Next::At(due);
            }
            self.last_idle_step = Instant::now();
        } else {
            self.pace.new_rows();
        }
        // with branches on other machines a step can be skipped: its rows go back
        let undo = self.cluster.is_some().then(|| {
            let st = &self.live.st;
            (
                self.pending.clone(),
                st.cursor,
                st.partial,
                st.ahead.clone(),
            )
        });
        let mix = match self.take(&replay_rows, history, seed) {
            Ok(m) => m,
            Err(e) => {
                self.last_event = format!("replay unavailable: {e}");
                return Next::At(Instant::now() + PEER_RETRY);
            }
        };
        self.live.st.cursor = mix.cursor;
        self.live.st.partial = mix.partial;
        self.live.st.ahead = mix.ahead.clone();
        if mix.is_empty() {
            // The sampled replay rows gave no window: try again at the idle rate.
            let wait = self.idle_interval().flatten().unwrap_or(PEER_RETRY);
            return Next::At(Instant::now() + wait);
        }
        let batch = mix.batch(tc.seq_len, self.live.tok.eot_id());
        // The governor's η ramp of an expansion in progress (no-op otherwise).
        self.govern(None);
        let live = &mut self.live;
        let masks = live.avail.draw();
        let scales = live.avail.scales(cfg.optim.max_scale);
        let started = Instant::now();
        let quorum_wait = self
            .a
            .cfg
            .cluster
            .as_ref()
            .map_or(Duration::ZERO, |c| Duration::from_millis(c.quorum_wait_ms));
        let mut tries = 0u32;
        let report = loop {
            tries += 1;
            let e = match live.trainer.train_step(&batch, &masks, &scales) {
                Ok(r) => break r,
                Err(e) => e,
            };
            let error = e.to_string();
            let Some(link) = self.cluster.as_mut().filter(|_| retryable(&e)) else {
                TrainStepFailed { error: &error }.emit();
                self.last_event = format!("step refused: {error}");
                return Next::Now;
            };
            if started.elapsed() < quorum_wait {
                // A node lost mid-step is suspect now and masked, so the first retry goes
                // at once; later ones wait for nodes to come back.
                if tries > 1 {
                    std::thread::sleep(QUORUM_RETRY);
                }
                link.before_step(&mut live.trainer);
                continue;
            }
            link.skipped();
            link.publish(&live.trainer, None);
            if let Some((pending, cursor, partial, ahead)) = undo {
                self.pending = pending;
                (live.st.cursor, live.st.partial, live.st.ahead) = (cursor, partial, ahead);
            }
            crate::cluster::events::StepSkippedQuorum {
                step: t,
                waited_s: started.elapsed().as_secs_f64(),
                error: &error,
            }
            .emit();
            self.last_event = format!("step skipped: {error}");
            return Next::Now;
        };
        if let Some(link) = self.cluster.as_mut() {
            link.publish(&live.trainer, Some(&report));
        }
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!(n::TRAIN_STEP_SECONDS).record(secs);
        live.st.tokens_total += report.loss_tokens as u64;
        self.new_pieces.trained += mix.new.len() as u64;
        self.tok_rate = mix.real_tokens() as f64 / secs.max(1e-9);
        self.last_loss = Some(report.loss);
        if report.loss.is_finite() {
            live.st.train_loss_ema = Some(ema(
                live.st.train_loss_ema,
                report.loss as f64,
                TRAIN_LOSS_EMA_DECAY,
            ));
        }
        if self.probe.is_none() {
            self.probe = Some(batch.clone());
        }
        // Replay-vs-new loss gap, measured every 10th step that has both.
        if report.step % 10 == 0
            && let Some((nb, rb)) = mix.part_batches(tc.seq_len, live.tok.eot_id())
        {
            let all_on = live.trainer.model().all_active();
            if let (Ok(ln), Ok(lr)) = (
                live.trainer.eval_loss(&nb, &all_on),
                live.trainer.eval_loss(&rb, &all_on),
            ) {
                push_window(&mut self.replay_deltas, (lr - ln) as f64, 100);
            }
        }
        push_window(&mut self.ratios, report.grad_norm_ratio as f64, 100);
        self.after_step(&report, &masks, &mix);
        if self
            .live
            .trainer
            .step()
            .is_multiple_of(cfg.eval.every_steps)
        {
            // Scheduled evaluations (evenly spaced, unlike `ctl eval`) feed the governor.
            if let Ok(r) = self.evaluate() {
                let (steps, since) = self.since_eval;
                let per_min = (self.live.trainer.step().saturating_sub(steps)) as f64 * 60.0
                    / since.elapsed().as_secs_f64().max(1e-3);
                self.pace.evaluated(r.overall(), per_min);
                self.since_eval = (self.live.trainer.step(), Instant::now());
                self.govern(Some(r.point(self.live.st.train_loss_ema)));
            }
        }
        // A governor rollback may have moved the step back.
        let step = self.live.trainer.step();
        let (last_step, last_time) = self.last_ckpt;
        if cfg.checkpoints.is_due(
            step.saturating_sub(last_step),
            last_time.elapsed().as_secs_f64(),
        ) {
            let _ = self.checkpoint_with(None, true);
        }
        Next::Now
    }

    /// The pieces of the next step (see [`crate::learn::mix`]): packed or one per window;
    /// a packed step may sample further rounds of replay rows.
    fn take(
        &mut self,
        replay_rows: &[Record],
        history: bool,
        seed: u64,
    ) -> Result<StepMix, String> {
        let tc = &self.a.cfg.training;
        let inputs = StepInputs {
            tok: &self.live.tok,
            replay_rows,
            history,
            tc,
            seed,
        };
        if !tc.packing {
            return Ok(self.pending.take_step(inputs));
        }
        let (replay, cursor) = (&self.a.replay, self.pending.fetched_through());
        self.pending.take_packed_step(inputs, |round| {
            let rows = ask_blocking(
                replay,
                TrainRows {
                    cursor,
                    n_new: 0,
                    n_replay: NewWindows::replay_rows(tc),
                    seed: replay_round_seed(seed, round),
                },
            )?;
            Ok(rows.replay)
        })
    }

    /// Loop-state bookkeeping of a step (branch selection counts, diagnostics and their
    /// EMAs), then its metrics.
    fn after_step(&mut self, r: &StepReport, masks: &Masks, mix: &StepMix) {
        let live = &mut self.live;
        let min_active = live.avail.config().min_active;
        if masks
            .iter()
            .any(|m| m.len() > min_active && m.iter().filter(|&&b| b).count() <= min_active)
        {
            live.st.steps_at_min_active += 1;
        }
        self.last_diag.clear();
        let mut layers = Vec::with_capacity(masks.len());
        for (l, m) in masks.iter().enumerate() {
            let counts = &mut live.st.select_counts[l];
            counts.resize(m.len(), 0);
            for (c, &on) in counts.iter_mut().zip(m) {
                *c += on as u64;
            }
            let e: Vec<f64> = r.branch_energy[l]
                .iter()
                .map(|x| x.unwrap_or(0.0) as f64)
                .collect();
            let cos: Vec<f64> = r.branch_cosine[l]
                .iter()
                .map(|x| x.unwrap_or(0.0) as f64)
                .collect();
            let Ok(d) = layer_diagnostics(&e, &cos, &r.computed[l], counts) else {
                layers.push(None);
                continue;
            };
            if d.effective_num_paths.is_finite() {
                let emas = &mut live.st.eff_paths_ema;
                if emas.len() <= l {
                    emas.resize(l + 1, None);
                }
                emas[l] = Some(ema(emas[l], d.effective_num_paths, EFF_PATHS_EMA_DECAY));
            }
            self.last_diag.push((d.clone(), e));
            layers.push(Some(d));
        }
        let consumed = live.st.cursor.min(self.last_seq) as f64;
        let avail_rows = self.training_rows.max(1) as f64;
        let unseen =
            self.pending.len() as f64 + (self.last_seq - live.st.cursor.min(self.last_seq)) as f64;
        let windows = mix.new.len() + mix.replay.len();
        StepDone {
            report: r,
            masks,
            forced_off: forced_off_count(&live.avail),
            tokens_per_sec: self.tok_rate,
            position_utilization: mix.real_tokens() as f64 / r.tokens.max(1) as f64,
            grad_norm_ratio: stats(&self.ratios.iter().copied().collect::<Vec<_>>()),
            replay_delta_loss: stats(&self.replay_deltas.iter().copied().collect::<Vec<_>>()),
            steps_at_min_active_share: live.st.steps_at_min_active as f64 / r.step.max(1) as f64,
            coverage_ratio: (consumed / avail_rows).min(1.0),
            new_data_ratio: (unseen / avail_rows).min(1.0),
            replay_share: mix.replay.len() as f64 / windows.max(1) as f64,
            layers: &layers,
        }
        .emit();
    }

    /// Control-slice evaluation (see [`crate::learn::eval`]); moves the era boundary to the
    /// newest row.
    pub(super) fn evaluate(&mut self) -> Result<EvalReport, String> {
        let cfg = &self.a.cfg;
        let live = &mut self.live;
        let groups = ask_blocking(
            &self.a.replay,
            ControlRows {
                boundary: live.st.eval_boundary,
                max_per_group: cfg.eval.max_rows_per_group,
            },
        )?;
        let r = eval::evaluate(
            &mut live.trainer,
            &live.tok,
            &groups,
            cfg.training.seq_len,
            cfg.training.batch_size,
            live.st.last_control,
        )
        .map_err(|e| e.to_string())?;
        EvalDone { report: &r }.emit();
        live.st.last_control = r.carried();
        live.st.eval_boundary = self.last_seq + 1;
        Ok(r)
    }

    /// Takes a snapshot between steps and has the checkpointer write it, waiting for the
    /// write (manual and tagged checkpoints, shutdown, expansions).
    pub(super) fn checkpoint(&mut self, tag: Option<String>) -> Result<serde_json::Value, String> {
        self.checkpoint_with(tag, false)
    }

    /// `periodic`: the trainer does not wait for the write (it keeps training meanwhile).
    fn checkpoint_with(
        &mut self,
        tag: Option<String>,
        periodic: bool,
    ) -> Result<serde_json::Value, String> {
        if let Some(link) = self.cluster.as_mut() {
            link.before_step(&mut self.live.trainer);
            link.pull(&mut self.live.trainer)?;
        }
        let live = &mut self.live;
        live.st.availability = live.avail.clone().into();
        let t = live.trainer.step();
        let mut m = Manifest::new(SystemTime::now(), t, live.st.tokens_total);
        m.parent = live.parent.clone();
        m.tag = tag;
        m.pins = live
            .st
            .governor
            .in_progress
            .iter()
            .map(|e| e.checkpoint_id.clone())
            .collect();
        m.widths = live.trainer.model().widths();
        m.config = serde_json::to_value(&self.a.cfg).unwrap_or_default();
        m.state = serde_json::to_value(&live.st).map_err(|e| e.to_string())?;
        m.control_loss = live.st.last_control.0.map(|o| o as f32);
        let files = vec![
            (
                "model.safetensors",
                live.trainer.model_bytes().map_err(|e| e.to_string())?,
            ),
            (
                "optimizer.safetensors",
                live.trainer.optimizer_bytes().map_err(|e| e.to_string())?,
            ),
            (
                "tokenizer.json",
                live.tok.to_json().map_err(|e| e.to_string())?.into_bytes(),
            ),
        ];
        let id = m.id.clone();
        self.last_ckpt = (t, Instant::now());
        let snapshot = Write(Snapshot { manifest: m, files });
        if periodic {
            // Periodic: hand the snapshot over and keep training while it is written.
            self.a
                .checkpointer
                .tell(snapshot)
                .blocking_send()
                .map_err(|e| e.to_string())?;
            self.live.parent = Some(id.clone());
            return Ok(serde_json::json!({ "id": id, "step": t, "queued": true }));
        }
        let mut r = ask_blocking(&self.a.checkpointer, snapshot)?;
        r["probe_logits_blake3"] = serde_json::json!(self.probe_hash());
        self.live.parent = Some(id);
        self.last_event = format!("checkpoint at step {t}");
        Ok(r)
    }

    /// blake3 of the logits of the fixed probe batch (all branches): equal hashes mean
    /// bitwise-equal logits.
    pub(super) fn probe_hash(&mut self) -> Option<String> {
        let p = self.probe.as_ref()?;
        let m = self.live.trainer.model().all_active();
        let l = self.live.trainer.logits(p, &m).ok()?;
        let mut h = blake3::Hasher::new();
        for x in l {
            h.update(&x.to_le_bytes());
        }
        Some(h.finalize().to_hex().to_string())
    }

    fn publish(&self) {
        let l = &self.live;
        let max_steps = self.a.cfg.training.max_steps;
        let state = if self.paused.is_paused() {
            "paused"
        } else if max_steps > 0 && l.trainer.step() >= max_steps {
            "stopped at training.max_steps"
        } else if self.pending.is_empty() {
            "training (idle: replay only)"
        } else {
            "training"
        };
        let _ = self.a.status.send(serde_json::json!({
            "state": state,
            "step": l.trainer.step(),
            "tokens": l.st.tokens_total,
            "loss": self.last_loss,
            "tokens_per_sec": self.tok_rate,
            "widths": l.trainer.model().widths(),
            "params": l.trainer.model().num_params(),
            "precision": l.trainer.model().config.precision.kernel(),
            "cursor": l.st.cursor,
            "pending_windows": self.pending.len(),
            "new_pieces_queued": self.new_pieces.queued,
            "new_pieces_trained": self.new_pieces.trained,
            "loss_control_old": l.st.last_control.0,
            "loss_control_new": l.st.last_control.1,
            "forced_off": l.avail.forced_off(),
            "governor_expansion": l.st.governor.in_progress.as_ref()
                .map(|e| serde_json::json!({"layer": e.layer, "branches": e.branches, "phase": e.phase, "manual": e.manual})),
            "consolidation": {
                "pace": self.pace.pace(),
                "why": self.pace.why(),
            },
            "last_event": self.last_event,
        }));
    }
}

/// Exponential moving average: `x` alone when there is no finite previous value.
fn ema(prev: Option<f64>, x: f64, decay: f64) -> f64 {
    match prev {
        Some(p) if p.is_finite() => decay * p + (1.0 - decay) * x,
        _ => x,
    }
}

fn push_window(q: &mut VecDeque<f64>, v: f64, cap: usize) {
    if v.is_finite() {
        q.push_back(v);
        if q.len() > cap {
            q.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_state_with_missing_eras_round_trips_through_json() {
        let av = Availability::new(Default::default(), &[2], 1).unwrap();
        let st = LoopState {
            cursor: 3,
            partial: None,
            ahead: vec![(4, 0), (6, 2)],
            tokens_total: 9,
            availability: av.into(),
            eval_boundary: 2,
            select_counts: vec![vec![1, 2]],
            steps_at_min_active: 0,
            last_control: (None, Some(1.5)),
            governor: GovernorState::default(),
            train_loss_ema: None,
            eff_paths_ema: Vec::new(),
        };
        let back: LoopState = serde_json::from_value(serde_json::to_value(&st).unwrap()).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn ema_starts_at_the_first_value() {
        assert_eq!(ema(None, 3.0, 0.9), 3.0);
        assert_eq!(ema(Some(f64::NAN), 3.0, 0.9), 3.0);
        assert!((ema(Some(1.0), 3.0, 0.9) - 1.2).abs() < 1e-12);
    }

    #[test]
    fn loop_state_of_older_checkpoints_still_loads() {
        // Written before the governor was wired in (with the old `ramps` list).
        let old = serde_json::json!({
            "cursor": 5, "tokens_total": 10,
            "availability": serde_json::to_value(
                crate::model::availability::AvailabilityState::from(
                    Availability::new(Default::default(), &[2, 2], 1).unwrap()
                )
            ).unwrap(),
            "eval_boundary": 0, "ramps": [], "select_counts": [[0, 0], [0, 0]],
            "steps_at_min_active": 0, "last_control": [null, null]
        });
        let st: LoopState = serde_json::from_value(old).unwrap();
        assert!(st.governor.in_progress.is_none());
        assert!(st.train_loss_ema.is_none() && st.eff_paths_ema.is_empty());
        assert!(
            st.partial.is_none() && st.ahead.is_empty(),
            "no packing progress"
        );
        // And the new state round-trips through the manifest's JSON, NaN EMA inputs included.
        let mut st2 = st.clone();
        st2.eff_paths_ema = vec![Some(1.5), None];
        st2.train_loss_ema = Some(2.0);
        let back: LoopState = serde_json::from_value(serde_json::to_value(&st2).unwrap()).unwrap();
        assert_eq!(back, st2);
    }

    #[test]
    fn step_seeds_differ_by_step_and_repeat() {
        assert_eq!(step_seed(1, 5), step_seed(1, 5));
        assert_ne!(step_seed(1, 5), step_seed(1, 6));
    }

    #[test]
    fn the_wait_returns_on_a_wake_up_before_its_deadline() {
        let (tx, rx) = std::sync::mpsc::channel();
        let far = Instant::now() + Duration::from_secs(3600);
        tx.send(Wake::Rows).unwrap();
        assert!(matches!(wait(&rx, Next::At(far)), Woken::Work));
        assert!(matches!(wait(&rx, Next::Now), Woken::Work));
        let t = Instant::now();
        assert!(matches!(
            wait(&rx, Next::At(t + Duration::from_millis(20))),
            Woken::Work
        ));
        assert!(t.elapsed() >= Duration::from_millis(20));
        drop(tx);
        assert!(matches!(wait(&rx, Next::Wake), Woken::Closed));
    }
}
