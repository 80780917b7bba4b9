//! The trainer's compute thread: owns the model, the optimizer, the tokenizer and the
//! availability model, runs training steps back to back, and handles operator commands
//! between steps (so a step never blocks the async runtime or the admin socket).

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use kameo::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::checkpointer::{CheckpointerActor, Load, Snapshot, Target, Write};
use super::replay::{ControlRows, FirstRows, ReplayActor, TrainRows};
use crate::checkpoint::{LoadedCheckpoint, Manifest};
use crate::config::Config;
use crate::govern::SourceLoss;
use crate::govern::diagnostics::{layer_diagnostics, stats};
use crate::govern::policy::{
    self, Decision, EvalPoint, ExpansionStart, GovernorInputs, GovernorState, LayerInput, Phase,
};
use crate::learn::batch::{Window, assemble, tokenize, windows};
use crate::model::generate::GenerateConfig;
use crate::model::{Masks, Model, Trainer, availability::Availability};
use crate::store::replay::Era;
use crate::store::state::splitmix64;
use crate::telemetry::names::{self as n, events};
use crate::text::csv_rows::RowBody;
use crate::text::tokenizer::Tokenizer;

/// Operator commands, answered between steps.
pub enum Cmd {
    Pause(bool, oneshot::Sender<bool>),
    Mask {
        layer: usize,
        branch: usize,
        off: bool,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    Eval(oneshot::Sender<Result<serde_json::Value, String>>),
    Diagnostics(oneshot::Sender<Result<serde_json::Value, String>>),
    Generate {
        prompt: String,
        /// Answer the prompt as an instruction: `enc(prompt) ‖ <|response|>`, as trained.
        respond: bool,
        cfg: GenerateConfig,
        chunks: mpsc::Sender<String>,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// Manual expansion; `beta` / `ramp_steps` default to `governor.beta` / `.ramp_steps`.
    Expand {
        layer: usize,
        branches: usize,
        beta: Option<f32>,
        ramp_steps: Option<u64>,
        noise: f32,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// The governor's state, recent decisions and actions.
    Governor(oneshot::Sender<Result<serde_json::Value, String>>),
    Checkpoint(
        Option<String>,
        oneshot::Sender<Result<serde_json::Value, String>>,
    ),
    Rollback(String, oneshot::Sender<Result<serde_json::Value, String>>),
    /// Final checkpoint, then the thread ends.
    Stop(oneshot::Sender<Result<serde_json::Value, String>>),
}

/// Decay per step of the training-loss EMA fed to the governor (horizon about 20 steps).
const TRAIN_LOSS_EMA_DECAY: f64 = 0.95;
/// Decay per step of the per-layer `effective_num_paths` EMA fed to the governor.
const EFF_PATHS_EMA_DECAY: f64 = 0.95;
/// Noise standard deviation of the copied weights in automatic expansions (as `ctl expand`).
const AUTO_EXPAND_NOISE: f32 = 1e-3;
/// Most governor actions (expansions, keeps, rollbacks with their outcomes) kept for `ctl governor`.
const ACTIONS_CAP: usize = 32;

/// Loop state that is saved in every checkpoint's manifest (`state`), for exact resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Every new row with a sequence number up to `cursor` has been trained on.
    pub cursor: u64,
    /// The next row, when some of its windows were already trained: (seq, windows done).
    #[serde(default)]
    pub partial: Option<(u64, usize)>,
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
    pub replay: ActorRef<ReplayActor>,
    pub checkpointer: ActorRef<CheckpointerActor>,
    pub cmds: Receiver<Cmd>,
    pub status: watch::Sender<serde_json::Value>,
}

struct Live {
    tok: Tokenizer,
    trainer: Trainer,
    avail: Availability,
    st: LoopState,
    parent: Option<String>,
}

struct Worker {
    a: WorkerArgs,
    live: Option<Live>,
    paused: bool,
    /// Windows of new rows not trained yet: (row seq, window index, window).
    pending: VecDeque<(u64, usize, Window)>,
    /// Highest row sequence number already turned into pending windows.
    fetch_cursor: u64,
    last_seq: u64,
    training_rows: u64,
    ratios: VecDeque<f64>,
    replay_deltas: VecDeque<f64>,
    last_loss: Option<f32>,
    tok_rate: f64,
    last_ckpt: (u64, Instant),
    last_idle_step: Instant,
    state_name: &'static str,
    last_event: String,
    probe: Option<crate::model::Batch>,
    pre_expand_logits: Option<Vec<f32>>,
    last_diag: Vec<serde_json::Value>,
    /// Recent governor actions and manual expansions with their outcomes (not checkpointed).
    gov_actions: VecDeque<serde_json::Value>,
}

fn ask_blocking<A, M>(r: &ActorRef<A>, m: M) -> Result<<A::Reply as Reply>::Ok, String>
where
    A: Actor + Message<M>,
    M: Send + 'static,
    <A::Reply as Reply>::Error: std::fmt::Display,
{
    r.ask(m).blocking_send().map_err(|e| e.to_string())
}

/// Seed of step `t`'s sampling: independent of thread timing, so resume is exact.
fn step_seed(seed: u64, t: u64) -> u64 {
    splitmix64(seed ^ splitmix64(t.wrapping_add(0x9e37)))
}

/// Runs until `Cmd::Stop` or the command channel closes.
pub fn run(a: WorkerArgs) {
    let mut w = Worker {
        a,
        live: None,
        paused: false,
        pending: VecDeque::new(),
        fetch_cursor: 0,
        last_seq: 0,
        training_rows: 0,
        ratios: VecDeque::new(),
        replay_deltas: VecDeque::new(),
        last_loss: None,
        tok_rate: 0.0,
        last_ckpt: (0, Instant::now()),
        last_idle_step: Instant::now() - Duration::from_secs(3600),
        state_name: "starting",
        last_event: String::new(),
        probe: None,
        pre_expand_logits: None,
        last_diag: Vec::new(),
        gov_actions: VecDeque::new(),
    };
    w.init_metrics();
    if let Err(e) = w.resume() {
        panic!("trainer cannot resume from its checkpoint: {e}");
    }
    loop {
        w.publish();
        let wait = if w.can_work_now() {
            Duration::ZERO
        } else {
            Duration::from_millis(200)
        };
        match w.a.cmds.recv_timeout(wait) {
            Ok(cmd) => {
                if w.handle(cmd) {
                    return;
                }
                // Commands queued behind it go first, but a steady stream of them (an
                // operator polling `ctl governor`) must not starve the tokenizer bootstrap.
                if w.live.is_some() {
                    continue;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if w.paused {
            continue;
        }
        if w.live.is_none() {
            w.bootstrap();
            continue;
        }
        w.train_once();
    }
}

impl Worker {
    fn init_metrics(&self) {
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

    fn can_work_now(&self) -> bool {
        !self.paused && self.live.is_some() && self.state_name == "training"
    }

    /// Loads LATEST (or the newest valid checkpoint) if there is one.
    fn resume(&mut self) -> Result<(), String> {
        let loaded = ask_blocking(&self.a.checkpointer, Load(Target::Resume))?;
        match loaded {
            Some(c) => {
                let id = c.manifest.id.clone();
                self.restore(c)?;
                self.last_event = format!("resumed from checkpoint {id}");
                tracing::info!(event = events::TRAINER_RESUMED, actor = "trainer", id = %id,
                    step = self.live.as_ref().map(|l| l.trainer.step()).unwrap_or(0));
            }
            None => {
                self.state_name = "waiting_for_tokenizer";
                tracing::info!(event = events::TRAINER_STARTED_FRESH, actor = "trainer");
            }
        }
        Ok(())
    }

    /// Rebuilds everything from a checkpoint (resume and rollback).
    fn restore(&mut self, c: LoadedCheckpoint) -> Result<(), String> {
        let f = |name: &str| {
            c.file(name)
                .ok_or_else(|| format!("checkpoint {} lacks {name}", c.manifest.id))
        };
        let tok_json = std::str::from_utf8(f("tokenizer.json")?).map_err(|e| e.to_string())?;
        let tok = Tokenizer::from_json(tok_json, "tokenizer.json").map_err(|e| e.to_string())?;
        let trainer = Trainer::from_bytes(
            self.a.cfg.model.clone(),
            self.a.cfg.optim.clone(),
            f("model.safetensors")?,
            Some(f("optimizer.safetensors")?),
        )
        .map_err(|e| e.to_string())?;
        if trainer.model().widths() != c.manifest.widths {
            return Err(format!(
                "checkpoint {}: widths in model.safetensors {:?} disagree with the manifest {:?}",
                c.manifest.id,
                trainer.model().widths(),
                c.manifest.widths
            ));
        }
        let st: LoopState =
            serde_json::from_value(c.manifest.state.clone()).map_err(|e| e.to_string())?;
        let avail = Availability::try_from(st.availability.clone()).map_err(|e| e.to_string())?;
        self.pending.clear();
        self.fetch_cursor = st.cursor;
        self.live = Some(Live {
            tok,
            trainer,
            avail,
            st,
            parent: Some(c.manifest.id.clone()),
        });
        self.last_ckpt = (self.live.as_ref().unwrap().trainer.step(), Instant::now());
        self.state_name = "training";
        Ok(())
    }

    /// Trains the tokenizer once the store holds `tokenizer.bootstrap_rows` rows (or loads
    /// `tokenizer.path`), then builds a fresh model.
    fn bootstrap(&mut self) {
        let cfg = &self.a.cfg;
        let tok = if let Some(p) = &cfg.tokenizer.path {
            match Tokenizer::load(p) {
                Ok(t) => t,
                Err(e) => {
                    self.last_event = format!("cannot load tokenizer {}: {e}", p.display());
                    std::thread::sleep(Duration::from_secs(1));
                    return;
                }
            }
        } else {
            let rows = match ask_blocking(&self.a.replay, FirstRows(cfg.tokenizer.bootstrap_rows)) {
                Ok(r) => r,
                Err(e) => {
                    self.last_event = format!("replay unavailable: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                    return;
                }
            };
            if rows.len() < cfg.tokenizer.bootstrap_rows {
                self.last_event = format!(
                    "waiting for {} rows to train the tokenizer ({} so far)",
                    cfg.tokenizer.bootstrap_rows,
                    rows.len()
                );
                std::thread::sleep(Duration::from_millis(300));
                return;
            }
            let texts = rows.into_iter().map(|r| match r.body {
                RowBody::Text { text } => text,
                RowBody::PromptResponse { prompt, response } => format!("{prompt} {response}"),
            });
            match Tokenizer::train(texts, cfg.model.vocab_size, cfg.tokenizer.min_frequency) {
                Ok(t) => t,
                Err(e) => {
                    self.last_event = format!("tokenizer training failed: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    return;
                }
            }
        };
        let seed = cfg.training.seed;
        let model = Model::new(cfg.model.clone(), seed).expect("model config validated at load");
        let widths = model.widths();
        let trainer = Trainer::new(model, cfg.optim.clone()).expect("optim config validated");
        let avail = Availability::new(cfg.availability.clone(), &widths, splitmix64(seed))
            .expect("availability config validated");
        tracing::info!(
            event = events::TOKENIZER_READY,
            actor = "trainer",
            vocab = tok.vocab_size()
        );
        self.live = Some(Live {
            tok,
            trainer,
            st: LoopState {
                cursor: 0,
                partial: None,
                tokens_total: 0,
                availability: avail.clone().into(),
                eval_boundary: 0,
                select_counts: widths.iter().map(|&k| vec![0; k]).collect(),
                steps_at_min_active: 0,
                last_control: (None, None),
                governor: GovernorState::default(),
                train_loss_ema: None,
                eff_paths_ema: Vec::new(),
            },
            avail,
            parent: None,
        });
        self.state_name = "training";
        self.last_event = "tokenizer trained; training started".into();
    }

    /// One training step (or nothing, when there is no data and idle steps are not due).
    fn train_once(&mut self) {
        let cfg = self.a.cfg.clone();
        let tc = &cfg.training;
        let live = self.live.as_mut().expect("live");
        let t = live.trainer.step();
        let seed = step_seed(tc.seed, t);
        let b = tc.batch_size;
        if tc.max_steps > 0 && t >= tc.max_steps {
            self.last_event = format!("stopped at training.max_steps = {}", tc.max_steps);
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        // Top the queue of new windows up to a batch (the same windows whatever the fetch
        // history, so a resumed run trains exactly what a straight run would).
        let mut first = true;
        let mut replay_rows = Vec::new();
        loop {
            let want_new = if self.pending.len() >= b { 0 } else { b };
            let rows = match ask_blocking(
                &self.a.replay,
                TrainRows {
                    cursor: self.fetch_cursor,
                    n_new: want_new,
                    n_replay: if first { b } else { 0 },
                    seed,
                },
            ) {
                Ok(r) => r,
                Err(e) => {
                    self.last_event = format!("replay unavailable: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                    return;
                }
            };
            if first {
                replay_rows = rows.replay;
                self.last_seq = rows.last_seq;
                self.training_rows = rows.training_rows;
                first = false;
            }
            for r in &rows.new {
                if let Ok(tk) = tokenize(&live.tok, &r.body) {
                    let skip = match live.st.partial {
                        Some((seq, k)) if seq == r.seq => k,
                        _ => 0,
                    };
                    for (i, w) in windows(&tk, tc.seq_len).into_iter().enumerate().skip(skip) {
                        self.pending.push_back((r.seq, i, w));
                    }
                }
                self.fetch_cursor = self.fetch_cursor.max(r.seq);
            }
            if self.pending.len() >= b || rows.new.len() < want_new || want_new == 0 {
                break;
            }
        }
        let rows = super::replay::TrainRowsReply {
            new: Vec::new(),
            replay: replay_rows,
            training_rows: self.training_rows,
            last_seq: self.last_seq,
        };
        let history = rows.training_rows > 0 && !rows.replay.is_empty();
        let has_new = !self.pending.is_empty();
        if !has_new {
            let per_min = tc.idle_steps_per_min;
            if !history
                || per_min == 0
                || self.last_idle_step.elapsed() < Duration::from_secs_f64(60.0 / per_min as f64)
            {
                self.state_name = "training";
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
            self.last_idle_step = Instant::now();
        }
        let n_replay_target = if history && has_new {
            ((b as f64) * tc.replay_share).round() as usize
        } else if history {
            b
        } else {
            0
        };
        let n_new = (b - n_replay_target.min(b)).min(self.pending.len());
        let new_ws: Vec<Window> = self.pending.drain(..n_new).map(|(_, _, w)| w).collect();
        match self.pending.front() {
            None => {
                live.st.cursor = self.fetch_cursor;
                live.st.partial = None;
            }
            Some(&(seq, i, _)) => {
                live.st.cursor = seq - 1;
                live.st.partial = (i > 0).then_some((seq, i));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let mut replay_ws = Vec::new();
        for r in rows.replay.iter() {
            if new_ws.len() + replay_ws.len() >= b {
                break;
            }
            if let Ok(tk) = tokenize(&live.tok, &r.body) {
                let ws = windows(&tk, tc.seq_len);
                if !ws.is_empty() {
                    let i = rng.random_range(0..ws.len());
                    replay_ws.push(ws[i].clone());
                }
            }
        }
        let all: Vec<&Window> = new_ws.iter().chain(replay_ws.iter()).collect();
        if all.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        let batch = assemble(&all, tc.seq_len, live.tok.eot_id());
        // The governor's η ramp of an expansion in progress (no-op otherwise).
        self.govern(None);
        let live = self.live.as_mut().expect("live");
        let masks = live.avail.draw();
        let scales = live.avail.scales(cfg.optim.max_scale);
        let started = Instant::now();
        let report = match live.trainer.train_step(&batch, &masks, &scales) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(event = events::TRAIN_STEP_FAILED, actor = "trainer", error = %e,
                    "training step refused; the batch is skipped");
                self.last_event = format!("step refused: {e}");
                return;
            }
        };
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!(n::TRAIN_STEP_SECONDS).record(secs);
        live.st.tokens_total += report.loss_tokens as u64;
        self.tok_rate = report.tokens as f64 / secs.max(1e-9);
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
        if report.step % 10 == 0 && !new_ws.is_empty() && !replay_ws.is_empty() {
            let all_on = live.trainer.model().all_active();
            let nb: Vec<&Window> = new_ws.iter().collect();
            let rb: Vec<&Window> = replay_ws.iter().collect();
            let eot = live.tok.eot_id();
            if let (Ok(ln), Ok(lr)) = (
                live.trainer
                    .eval_loss(&assemble(&nb, tc.seq_len, eot), &all_on),
                live.trainer
                    .eval_loss(&assemble(&rb, tc.seq_len, eot), &all_on),
            ) {
                push_window(&mut self.replay_deltas, (lr - ln) as f64, 100);
            }
        }
        push_window(&mut self.ratios, report.grad_norm_ratio as f64, 100);
        self.step_metrics(&report, &masks, all.len(), replay_ws.len());
        let live = self.live.as_ref().expect("live");
        let step = live.trainer.step();
        if step % cfg.eval.every_steps == 0 {
            // Scheduled evaluations (evenly spaced, unlike `ctl eval`) feed the governor.
            if let Ok(v) = self.evaluate() {
                let e = self.eval_point(&v);
                self.govern(e);
            }
        }
        // A governor rollback may have moved the step back.
        let step = self.live.as_ref().expect("live").trainer.step();
        let (last_step, last_time) = self.last_ckpt;
        if cfg.checkpoints.is_due(
            step.saturating_sub(last_step),
            last_time.elapsed().as_secs_f64(),
        ) {
            let _ = self.checkpoint_with(None, true);
        }
    }
}

/// Exponential moving average: `x` alone when there is no finite previous value.
fn ema(prev: Option<f64>, x: f64, decay: f64) -> f64 {
    match prev {
        Some(p) if p.is_finite() => decay * p + (1.0 - decay) * x,
        _ => x,
    }
}

/// Parameters one more branch of width `d` adds: its block tensors and its aggregation logit.
pub fn branch_params(d: usize) -> u64 {
    (0..crate::model::params::BRANCH_TENSORS.len())
        .map(|i| {
            crate::model::params::branch_shape(i, d)
                .iter()
                .product::<usize>() as u64
        })
        .sum::<u64>()
        + 1
}

/// What the governor sees of the model now (`eval`: a fresh scheduled evaluation).
fn governor_inputs(live: &Live, eval: Option<EvalPoint>) -> GovernorInputs {
    let model = live.trainer.model();
    let per_branch = branch_params(model.config.d_model);
    GovernorInputs {
        step: live.trainer.step(),
        eval,
        layers: model
            .widths()
            .iter()
            .enumerate()
            .map(|(l, &k)| LayerInput {
                branches: k,
                effective_paths: live
                    .st
                    .eff_paths_ema
                    .get(l)
                    .copied()
                    .flatten()
                    .unwrap_or(f64::NAN),
                branch_params: per_branch,
            })
            .collect(),
        params: model.num_params() as u64,
    }
}

/// The `decision` label of a governor decision.
fn decision_kind(d: &Decision) -> &'static str {
    match d {
        Decision::None { .. } => "none",
        Decision::Expand { .. } => "expand",
        Decision::SetEta { .. } => "set_eta",
        Decision::Keep { .. } => "keep",
        Decision::Rollback { .. } => "rollback",
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

/// Drift of logits per position (`[positions, V]` rows): L2 distance and cosine distance,
/// mean and std over positions.
pub fn drift(before: &[f32], after: &[f32], v: usize) -> (f64, f64, f64, f64) {
    let mut l2 = Vec::new();
    let mut cos = Vec::new();
    for (a, b) in before.chunks(v).zip(after.chunks(v)) {
        let (mut d, mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            d += (x - y) * (x - y);
            ab += x * y;
            aa += x * x;
            bb += y * y;
        }
        l2.push(d.sqrt());
        let denom = (aa.sqrt() * bb.sqrt()).max(1e-30);
        cos.push((1.0 - ab / denom).max(0.0));
    }
    let s1 = stats(&l2);
    let s2 = stats(&cos);
    (s1.mean, s1.std, s2.mean, s2.std)
}

/// Number of branches under an operator's forced outage.
fn publish_forced_off(avail: &Availability) {
    let n_off: usize = avail
        .forced_off()
        .iter()
        .map(|l| l.iter().filter(|&&b| b).count())
        .sum();
    metrics::gauge!(n::BRANCHES_FORCED_OFF).set(n_off as f64);
}

fn publish_drift(before: &[f32], after: &[f32], v: usize) -> serde_json::Value {
    let (lm, ls, cm, cs) = drift(before, after, v);
    metrics::gauge!(n::EXPAND_DRIFT_L2_MEAN).set(lm);
    metrics::gauge!(n::EXPAND_DRIFT_L2_STD).set(ls);
    metrics::gauge!(n::EXPAND_DRIFT_COS_MEAN).set(cm);
    metrics::gauge!(n::EXPAND_DRIFT_COS_STD).set(cs);
    serde_json::json!({"l2_mean": lm, "l2_std": ls, "cos_dist_mean": cm, "cos_dist_std": cs})
}

impl Worker {
    fn step_metrics(
        &mut self,
        r: &crate::model::train::StepReport,
        masks: &Masks,
        windows: usize,
        replay_windows: usize,
    ) {
        let live = self.live.as_mut().expect("live");
        metrics::counter!(n::TRAIN_STEPS_TOTAL).absolute(r.step);
        metrics::gauge!(n::TRAIN_STEP).set(r.step as f64);
        publish_forced_off(&live.avail);
        for (l, m) in masks.iter().enumerate() {
            let lab = l.to_string();
            metrics::gauge!(n::LAYER_WIDTH, "layer" => lab.clone()).set(m.len() as f64);
            let on = m.iter().filter(|&&b| b).count();
            metrics::gauge!(n::LAYER_ACTIVE_BRANCHES, "layer" => lab).set(on as f64);
        }
        metrics::gauge!(n::TRAIN_TOKENS_PER_SEC).set(self.tok_rate);
        metrics::gauge!(n::LOSS).set(r.loss as f64);
        metrics::gauge!(n::GRAD_NORM).set(r.grad_norm as f64);
        let active: Vec<f64> = masks
            .iter()
            .map(|m| m.iter().filter(|&&b| b).count() as f64)
            .collect();
        let sparsity: Vec<f64> = masks
            .iter()
            .map(|m| m.iter().filter(|&&b| !b).count() as f64 / m.len() as f64)
            .collect();
        let sa = stats(&active);
        metrics::gauge!(n::ACTIVE_BRANCHES_MEAN).set(sa.mean);
        metrics::gauge!(n::ACTIVE_BRANCHES_STD).set(sa.std);
        metrics::gauge!(n::ACTIVE_BRANCHES_MIN).set(sa.min);
        metrics::gauge!(n::ACTIVE_BRANCHES_MAX).set(sa.max);
        let ss = stats(&sparsity);
        metrics::gauge!(n::MASK_SPARSITY_MEAN).set(ss.mean);
        metrics::gauge!(n::MASK_SPARSITY_STD).set(ss.std);
        let min_active = live.avail.config().min_active;
        if masks
            .iter()
            .any(|m| m.len() > min_active && m.iter().filter(|&&b| b).count() <= min_active)
        {
            live.st.steps_at_min_active += 1;
        }
        metrics::gauge!(n::STEPS_AT_MIN_ACTIVE_SHARE)
            .set(live.st.steps_at_min_active as f64 / r.step.max(1) as f64);
        let rs = stats(&self.ratios.iter().copied().collect::<Vec<_>>());
        metrics::gauge!(n::GRAD_NORM_RATIO_MEAN).set(rs.mean);
        metrics::gauge!(n::GRAD_NORM_RATIO_STD).set(rs.std);
        let consumed = live.st.cursor.min(self.last_seq) as f64;
        let avail_rows = self.training_rows.max(1) as f64;
        metrics::gauge!(n::COVERAGE_RATIO).set((consumed / avail_rows).min(1.0));
        let unseen =
            self.pending.len() as f64 + (self.last_seq - live.st.cursor.min(self.last_seq)) as f64;
        metrics::gauge!(n::NEW_DATA_RATIO).set((unseen / avail_rows).min(1.0));
        metrics::gauge!(n::REPLAY_SHARE).set(replay_windows as f64 / windows.max(1) as f64);
        let ds = stats(&self.replay_deltas.iter().copied().collect::<Vec<_>>());
        metrics::gauge!(n::REPLAY_DELTA_LOSS_MEAN).set(ds.mean);
        metrics::gauge!(n::REPLAY_DELTA_LOSS_STD).set(ds.std);
        // Per-layer diagnostics.
        self.last_diag.clear();
        for (l, m) in masks.iter().enumerate() {
            let counts = &mut live.st.select_counts[l];
            counts.resize(m.len(), 0);
            for (c, &on) in counts.iter_mut().zip(m) {
                *c += on as u64;
            }
            let k = m.len();
            let e: Vec<f64> = r.branch_energy[l]
                .iter()
                .map(|x| x.unwrap_or(0.0) as f64)
                .collect();
            let cos: Vec<f64> = r.branch_cosine[l]
                .iter()
                .map(|x| x.unwrap_or(0.0) as f64)
                .collect();
            let Ok(d) = layer_diagnostics(&e, &cos, &r.computed[l], counts) else {
                continue;
            };
            if d.effective_num_paths.is_finite() {
                let emas = &mut live.st.eff_paths_ema;
                if emas.len() <= l {
                    emas.resize(l + 1, None);
                }
                emas[l] = Some(ema(emas[l], d.effective_num_paths, EFF_PATHS_EMA_DECAY));
            }
            let lab = l.to_string();
            let mut dj = serde_json::to_value(&d).unwrap_or_default();
            dj["energy"] = serde_json::json!(e);
            self.last_diag.push(dj);
            for (name, v) in [
                (n::PATH_STARVATION_INDEX, d.path_starvation_index),
                (n::EFFECTIVE_NUM_PATHS, d.effective_num_paths),
                (n::GINI_CONCENTRATION, d.gini_concentration),
                (n::TOP1_SHARE, d.top1_share),
                (n::MARGIN_TOP1_TOP2, d.margin_top1_top2),
                (
                    n::DIVERSITY_COSINE_DISTANCE_MEAN,
                    d.diversity_cosine_distance_mean,
                ),
                (n::BRANCH_CORRELATION_MEAN, d.branch_correlation_mean),
                (n::OUTPUT_ENERGY_CV, d.output_energy_cv),
                (n::BRANCH_SELECT_GINI, d.branch_select_gini),
                (n::BRANCH_SELECT_TOP1_SHARE, d.branch_select_top1_share),
            ] {
                metrics::gauge!(name, "layer" => lab.clone()).set(v);
            }
            for i in 0..k {
                metrics::gauge!(n::ALPHA, "layer" => lab.clone(), "branch" => i.to_string())
                    .set(r.alpha[l][i] as f64);
            }
        }
    }

    /// Control-slice evaluation: loss per (source, era) group, old/new means, retention
    /// deltas, and the loss with each single branch masked.
    fn evaluate(&mut self) -> Result<serde_json::Value, String> {
        let cfg = &self.a.cfg;
        let live = self
            .live
            .as_mut()
            .ok_or("the model does not exist yet (waiting for the tokenizer)")?;
        let groups = ask_blocking(
            &self.a.replay,
            ControlRows {
                boundary: live.st.eval_boundary,
                max_per_group: cfg.eval.max_rows_per_group,
            },
        )?;
        let seq = cfg.training.seq_len;
        let eot = live.tok.eot_id();
        let all_on = live.trainer.model().all_active();
        let mut by_era = [(0.0f64, 0.0f64), (0.0, 0.0)];
        let mut per_source = serde_json::Map::new();
        let mut group_losses = Vec::new();
        let mut pooled: Vec<Window> = Vec::new();
        for g in &groups {
            let ws: Vec<Window> = g
                .records
                .iter()
                .filter_map(|r| tokenize(&live.tok, &r.body).ok())
                .filter_map(|t| windows(&t, seq).into_iter().next())
                .collect();
            let (mut sum, mut w) = (0.0f64, 0.0f64);
            for chunk in ws.chunks(cfg.training.batch_size) {
                let refs: Vec<&Window> = chunk.iter().collect();
                let b = assemble(&refs, seq, eot);
                let weight: f64 = b.loss_mask.iter().map(|&x| x as f64).sum();
                let loss = live
                    .trainer
                    .eval_loss(&b, &all_on)
                    .map_err(|e| e.to_string())?;
                sum += loss as f64 * weight;
                w += weight;
            }
            if w == 0.0 {
                continue;
            }
            let loss = sum / w;
            let era = if g.era == Era::Old { 0 } else { 1 };
            by_era[era].0 += sum;
            by_era[era].1 += w;
            let era_name = if era == 0 { "old" } else { "new" };
            let key = format!("{}/{era_name}", g.source);
            per_source.insert(key, serde_json::json!(loss));
            // Which rows were measured, so that the governor compares like with like.
            group_losses.push(serde_json::json!({
                "source": g.source, "era": era_name, "rows": g.records.len(),
                "last_seq": g.records.last().map_or(0, |r| r.seq), "tokens": w as u64,
                "loss": loss,
            }));
            metrics::gauge!(n::LOSS_CONTROL_SOURCE, "source" => g.source.clone(),
                "era" => if era == 0 { "old" } else { "new" })
            .set(loss);
            pooled.extend(ws.into_iter().take(2));
        }
        let mean = |(s, w): (f64, f64)| if w > 0.0 { Some(s / w) } else { None };
        let old = mean(by_era[0]);
        let new = mean(by_era[1]);
        let prev_old = live.st.last_control.0.unwrap_or(f64::NAN);
        let prev_new = live.st.last_control.1.unwrap_or(f64::NAN);
        let cur_old = old.unwrap_or(prev_old);
        let cur_new = new.unwrap_or(prev_new);
        if cur_old.is_finite() {
            metrics::gauge!(n::LOSS_CONTROL_OLD).set(cur_old);
            metrics::gauge!(n::RETENTION_DELTA_OLD).set(if prev_old.is_finite() {
                cur_old - prev_old
            } else {
                0.0
            });
        }
        if cur_new.is_finite() {
            metrics::gauge!(n::LOSS_CONTROL_NEW).set(cur_new);
            metrics::gauge!(n::RETENTION_DELTA_NEW).set(if prev_new.is_finite() {
                cur_new - prev_new
            } else {
                0.0
            });
        }
        // Robustness to an outage: each single branch masked, on a pooled sample.
        let mut outage = Vec::new();
        pooled.truncate(cfg.training.batch_size);
        if !pooled.is_empty() {
            let refs: Vec<&Window> = pooled.iter().collect();
            let b = assemble(&refs, seq, eot);
            for (l, &k) in live.trainer.model().widths().iter().enumerate() {
                for i in 0..k {
                    if k < 2 {
                        continue;
                    }
                    let mut m = all_on.clone();
                    m[l][i] = false;
                    if let Ok(loss) = live.trainer.eval_loss(&b, &m) {
                        metrics::gauge!(n::LOSS_CONTROL_BRANCH_OUT, "layer" => l.to_string(),
                            "branch" => i.to_string())
                        .set(loss as f64);
                        outage.push(serde_json::json!({"layer": l, "branch": i, "loss": loss}));
                    }
                }
            }
        }
        live.st.last_control = (
            cur_old.is_finite().then_some(cur_old),
            cur_new.is_finite().then_some(cur_new),
        );
        live.st.eval_boundary = self.last_seq + 1;
        let step = live.trainer.step();
        tracing::info!(
            event = events::EVAL_DONE,
            actor = "trainer",
            step,
            loss_control_old = cur_old,
            loss_control_new = cur_new
        );
        Ok(serde_json::json!({
            "step": step,
            "loss_control_old": old,
            "loss_control_new": new,
            "retention_delta_old": if prev_old.is_finite() { old.map(|o| o - prev_old) } else { None },
            "retention_delta_new": if prev_new.is_finite() { new.map(|o| o - prev_new) } else { None },
            "per_source": per_source,
            "groups": group_losses,
            "branch_out": outage,
        }))
    }

    /// Takes a snapshot between steps and has the checkpointer write it, waiting for the
    /// write (manual and tagged checkpoints, shutdown, pre-expansion).
    fn checkpoint(&mut self, tag: Option<String>) -> Result<serde_json::Value, String> {
        self.checkpoint_with(tag, false)
    }

    /// `periodic`: the trainer does not wait for the write (it keeps training meanwhile).
    fn checkpoint_with(
        &mut self,
        tag: Option<String>,
        periodic: bool,
    ) -> Result<serde_json::Value, String> {
        let live = self
            .live
            .as_mut()
            .ok_or("nothing to checkpoint yet (waiting for the tokenizer)")?;
        live.st.availability = live.avail.clone().into();
        let t = live.trainer.step();
        let mut m = Manifest::new(SystemTime::now(), t, live.st.tokens_total);
        m.parent = live.parent.clone();
        m.tag = tag;
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
            if let Some(live) = self.live.as_mut() {
                live.parent = Some(id.clone());
            }
            return Ok(serde_json::json!({ "id": id, "step": t, "queued": true }));
        }
        let mut r = ask_blocking(&self.a.checkpointer, snapshot)?;
        r["probe_logits_blake3"] = serde_json::json!(self.probe_hash());
        if let Some(live) = self.live.as_mut() {
            live.parent = Some(id);
        }
        self.last_event = format!("checkpoint at step {t}");
        Ok(r)
    }

    /// blake3 of the logits of the fixed probe batch (all branches): equal hashes mean
    /// bitwise-equal logits.
    fn probe_hash(&mut self) -> Option<String> {
        let live = self.live.as_mut()?;
        let p = self.probe.as_ref()?;
        let m = live.trainer.model().all_active();
        let l = live.trainer.logits(p, &m).ok()?;
        let mut h = blake3::Hasher::new();
        for x in l {
            h.update(&x.to_le_bytes());
        }
        Some(h.finalize().to_hex().to_string())
    }

    fn diagnostics(&mut self) -> Result<serde_json::Value, String> {
        let live = self
            .live
            .as_mut()
            .ok_or("the model does not exist yet (waiting for the tokenizer)")?;
        let model = live.trainer.model();
        let widths = model.widths();
        let etas = model.etas();
        let mut layers = Vec::new();
        for (l, &k) in widths.iter().enumerate() {
            layers.push(serde_json::json!({
                "layer": l,
                "width": k,
                "alpha": model.alphas(l),
                "eta": etas.get(l),
                "participation": live.avail.participation().get(l),
                "forced_off": live.avail.forced_off().get(l),
                "select_counts": live.st.select_counts.get(l),
            }));
        }
        for (entry, d) in layers.iter_mut().zip(&self.last_diag) {
            entry["last_step"] = d.clone();
        }
        Ok(serde_json::json!({
            "step": live.trainer.step(),
            "params": live.trainer.model().num_params(),
            "widths": widths,
            "layers": layers,
        }))
    }
}

impl Worker {
    /// Handles one command; true when the thread must end.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Pause(p, reply) => {
                self.paused = p;
                self.last_event = if p {
                    "training paused"
                } else {
                    "training resumed"
                }
                .into();
                let _ = reply.send(p);
            }
            Cmd::Mask {
                layer,
                branch,
                off,
                reply,
            } => {
                let r = match self.live.as_mut() {
                    None => Err("the model does not exist yet (waiting for the tokenizer)".into()),
                    Some(l) => l
                        .avail
                        .set_forced_off(layer, branch, off)
                        .map(|_| {
                            publish_forced_off(&l.avail);
                            tracing::info!(
                                event = events::BRANCH_MASKED,
                                actor = "trainer",
                                layer,
                                branch,
                                off
                            );
                            serde_json::json!({"layer": layer, "branch": branch, "masked": off,
                                "forced_off": l.avail.forced_off()})
                        })
                        .map_err(|e| e.to_string()),
                };
                let _ = reply.send(r);
            }
            Cmd::Eval(reply) => {
                let _ = reply.send(self.evaluate());
            }
            Cmd::Diagnostics(reply) => {
                let _ = reply.send(self.diagnostics());
            }
            Cmd::Generate {
                prompt,
                respond,
                cfg,
                chunks,
                reply,
            } => {
                let _ = reply.send(self.generate(&prompt, respond, cfg, &chunks));
            }
            Cmd::Expand {
                layer,
                branches,
                beta,
                ramp_steps,
                noise,
                reply,
            } => {
                let g = &self.a.cfg.governor;
                let beta = beta.map_or(g.beta, f64::from);
                let ramp_steps = ramp_steps.unwrap_or(g.ramp_steps);
                let _ = reply.send(self.expand(layer, branches, beta, ramp_steps, noise, true));
            }
            Cmd::Governor(reply) => {
                let _ = reply.send(self.governor_report());
            }
            Cmd::Checkpoint(tag, reply) => {
                let _ = reply.send(self.checkpoint(tag));
            }
            Cmd::Rollback(target, reply) => {
                let _ = reply.send(self.rollback(target));
            }
            Cmd::Stop(reply) => {
                let r = if self.live.is_some() {
                    self.checkpoint(Some("shutdown".into()))
                } else {
                    Ok(serde_json::json!({"checkpoint": null, "why": "no model yet"}))
                };
                let _ = reply.send(r);
                return true;
            }
        }
        false
    }

    fn publish(&self) {
        let v = match &self.live {
            None => serde_json::json!({
                "state": if self.paused { "paused" } else { self.state_name },
                "last_event": self.last_event,
            }),
            Some(l) => serde_json::json!({
                "state": if self.paused { "paused" } else if self.pending.is_empty() { "training (idle: replay only)" } else { "training" },
                "step": l.trainer.step(),
                "tokens": l.st.tokens_total,
                "loss": self.last_loss,
                "tokens_per_sec": self.tok_rate,
                "widths": l.trainer.model().widths(),
                "params": l.trainer.model().num_params(),
                "cursor": l.st.cursor,
                "pending_windows": self.pending.len(),
                "loss_control_old": l.st.last_control.0,
                "loss_control_new": l.st.last_control.1,
                "forced_off": l.avail.forced_off(),
                "governor_expansion": l.st.governor.in_progress.as_ref()
                    .map(|e| serde_json::json!({"layer": e.layer, "branches": e.branches, "phase": e.phase, "manual": e.manual})),
                "last_checkpoint": l.parent,
                "last_event": self.last_event,
            }),
        };
        let _ = self.a.status.send(v);
    }

    fn generate(
        &mut self,
        prompt: &str,
        respond: bool,
        mut cfg: GenerateConfig,
        chunks: &mpsc::Sender<String>,
    ) -> Result<serde_json::Value, String> {
        let live = self
            .live
            .as_mut()
            .ok_or("the model does not exist yet (waiting for the tokenizer)")?;
        let mut ids = live.tok.encode(prompt).map_err(|e| e.to_string())?;
        if respond {
            ids.push(live.tok.response_id());
        } else if ids.is_empty() {
            ids.push(live.tok.eot_id());
        }
        let max_ctx = live
            .trainer
            .model()
            .config
            .max_seq_len
            .saturating_sub(1)
            .max(1);
        if ids.len() > max_ctx {
            ids.drain(..ids.len() - max_ctx);
        }
        cfg.end_token = Some(live.tok.eot_id());
        cfg.max_tokens = cfg
            .max_tokens
            .min(live.trainer.model().config.max_seq_len - ids.len());
        let masks = live.trainer.model().all_active();
        let gen_ = live
            .trainer
            .model()
            .generate(&ids, &masks, &cfg)
            .map_err(|e| e.to_string())?;
        let mut out: Vec<u32> = Vec::new();
        let mut sent = String::new();
        for id in gen_ {
            out.push(id);
            let text = live.tok.decode(&out).unwrap_or_default();
            if text.len() > sent.len() && text.starts_with(&sent) && !text.ends_with('\u{fffd}') {
                let piece = text[sent.len()..].to_string();
                sent = text;
                if chunks.blocking_send(piece).is_err() {
                    break;
                }
            }
        }
        let text = live.tok.decode(&out).unwrap_or_default();
        if text.len() > sent.len() && text.starts_with(&sent) {
            let _ = chunks.blocking_send(text[sent.len()..].to_string());
        }
        Ok(serde_json::json!({"tokens": out.len(), "text": text}))
    }

    /// Widens `layer` by `branches`: a fresh baseline eval (manual expansions), the
    /// pre-expansion checkpoint, the expansion at `η = 0` with a bitwise check, then
    /// registration with the governor, whose ramp (`β` over `ramp_steps`) and probation apply.
    fn expand(
        &mut self,
        layer: usize,
        branches: usize,
        beta: f64,
        ramp_steps: u64,
        noise: f32,
        manual: bool,
    ) -> Result<serde_json::Value, String> {
        let gcfg = self.a.cfg.governor.clone();
        let live = self
            .live
            .as_ref()
            .ok_or("the model does not exist yet (waiting for the tokenizer)")?;
        if !(0.0..=1.0).contains(&beta) {
            return Err(format!("beta = {beta}: must be in 0 ..= 1"));
        }
        if self.probe.is_none() {
            return Err("no probe batch yet: let the trainer take one step first".into());
        }
        // Budgets and "one expansion at a time" (cool-downs bind automatic expansions only).
        live.st
            .governor
            .check_manual(layer, branches, &governor_inputs(live, None), &gcfg)
            .map_err(|e| e.to_string())?;
        // The outcome is judged against an eval at the expansion step; an automatic
        // expansion was decided at one (the governor's latest).
        // (Without a control slice: the governor's latest eval.)
        let baseline = if manual {
            self.evaluate().ok().and_then(|v| self.eval_point(&v))
        } else {
            None
        };
        let pre = self.checkpoint(Some("pre-expand".into()))?;
        let pre_id = pre["id"].as_str().unwrap_or_default().to_string();
        let live = self.live.as_mut().expect("live");
        let probe = self.probe.clone().expect("checked above");
        let all_on = live.trainer.model().all_active();
        let before = live
            .trainer
            .logits(&probe, &all_on)
            .map_err(|e| e.to_string())?;
        let seed = step_seed(self.a.cfg.training.seed ^ 0xe8a, live.trainer.step());
        let rep = live
            .trainer
            .expand(layer, branches, noise, seed)
            .map_err(|e| e.to_string())?;
        let widths = live.trainer.model().widths();
        live.avail.sync_widths(&widths);
        live.st.select_counts[layer].resize(rep.width, 0);
        let after = live
            .trainer
            .logits(&probe, &live.trainer.model().all_active())
            .map_err(|e| e.to_string())?;
        let bitwise_equal = before.len() == after.len()
            && before
                .iter()
                .zip(&after)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        let v = live.trainer.model().config.vocab_size;
        let drift0 = publish_drift(&before, &after, v);
        let step = live.trainer.step();
        live.st
            .governor
            .register_expansion(
                ExpansionStart {
                    layer,
                    branches,
                    step,
                    checkpoint_id: pre_id.clone(),
                    manual,
                    baseline,
                },
                &gcfg,
            )
            .map_err(|e| e.to_string())?;
        // The operator's β and ramp length (automatic: the config's, already set).
        if let Some(e) = live.st.governor.in_progress.as_mut() {
            e.beta = beta;
            e.ramp_steps = ramp_steps;
        }
        let expansion = serde_json::to_value(&live.st.governor.in_progress).unwrap_or_default();
        self.pre_expand_logits = Some(before);
        metrics::counter!(n::EXPANSION_EVENTS_TOTAL).increment(1);
        metrics::gauge!(n::ETA_INJECTION_LAST).set(0.0);
        metrics::gauge!(n::SUM_W_NEW_LAST).set(0.0);
        metrics::gauge!(n::GOVERNOR_EXPANSION_IN_PROGRESS).set(1.0);
        tracing::info!(
            event = events::EXPANSION,
            actor = "trainer",
            layer,
            branches,
            width = rep.width,
            beta,
            ramp_steps,
            manual,
            bitwise_equal
        );
        self.last_event = format!("layer {layer} expanded to {} branches", rep.width);
        let reply = serde_json::json!({
            "step": step,
            "layer": layer,
            "width": rep.width,
            "sources": rep.sources,
            "manual": manual,
            "beta": beta,
            "ramp_steps": ramp_steps,
            "pre_expand_checkpoint": pre_id,
            "pre_expand_probe_logits_blake3": pre["probe_logits_blake3"],
            "logits_bitwise_equal_at_eta0": bitwise_equal,
            "drift_at_eta0": drift0,
            "widths": widths,
            "governor_expansion": expansion,
        });
        if manual {
            self.push_action(serde_json::json!({
                "step": step,
                "action": "manual_expand",
                "outcome": reply,
            }));
        }
        Ok(reply)
    }

    /// Restores checkpoint `target` (id, tag or `previous`): weights, optimizer, widths,
    /// loop state and step exactly; replay data stays.
    fn restore_named(&mut self, target: &str) -> Result<serde_json::Value, String> {
        let loaded = ask_blocking(
            &self.a.checkpointer,
            Load(Target::Named(target.to_string())),
        )?
        .ok_or_else(|| format!("no checkpoint `{target}`"))?;
        let id = loaded.manifest.id.clone();
        let step = loaded.manifest.step;
        self.restore(loaded)?;
        self.pre_expand_logits = None;
        metrics::counter!(n::ROLLBACKS_TOTAL).increment(1);
        self.last_event = format!("rolled back to {id}");
        let probe_logits = self.probe_hash();
        let live = self.live.as_mut().expect("restored");
        Ok(serde_json::json!({
            "id": id,
            "step": step,
            "widths": live.trainer.model().widths(),
            "probe_logits_blake3": probe_logits,
        }))
    }

    /// The operator's rollback. The governor keeps its live memory (cool-downs, back-offs,
    /// decisions); an expansion in progress is aborted unless the restored checkpoint was
    /// itself taken during one (its widths include the new branches, so that one goes on).
    fn rollback(&mut self, target: String) -> Result<serde_json::Value, String> {
        let live_gov = self.live.as_ref().map(|l| l.st.governor.clone());
        let mut r = self.restore_named(&target)?;
        let live = self.live.as_mut().expect("restored");
        if let Some(mut g) = live_gov {
            let restored = std::mem::take(&mut live.st.governor);
            let aborted = g.abort_expansion();
            if let Some(e) = restored.in_progress {
                g.in_progress = Some(e);
                g.history = restored.history;
            }
            r["governor_aborted_expansion"] = serde_json::to_value(&aborted).unwrap_or_default();
            r["governor_expansion"] = serde_json::to_value(&g.in_progress).unwrap_or_default();
            metrics::gauge!(n::GOVERNOR_EXPANSION_IN_PROGRESS)
                .set(g.in_progress.is_some() as u8 as f64);
            live.st.governor = g;
        }
        tracing::info!(event = events::ROLLBACK, actor = "trainer", id = %r["id"].as_str().unwrap_or_default(),
            step = r["step"].as_u64().unwrap_or(0), manual = true,
            aborted_expansion = !r["governor_aborted_expansion"].is_null());
        if !r["governor_aborted_expansion"].is_null() {
            self.push_action(serde_json::json!({
                "step": r["step"],
                "action": "expansion_aborted_by_manual_rollback",
                "outcome": r.clone(),
            }));
        }
        Ok(r)
    }
}

impl Worker {
    /// Builds the governor's view of an evaluation reply (only freshly measured control
    /// losses; a missing era is `None`, never a stale value).
    fn eval_point(&self, v: &serde_json::Value) -> Option<EvalPoint> {
        let live = self.live.as_ref()?;
        let fresh = |k: &str| v[k].as_f64().filter(|x| x.is_finite());
        let old_sources = v["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["era"] == "old")
            .filter_map(|g| {
                Some(SourceLoss {
                    source: g["source"].as_str()?.to_string(),
                    rows: g["rows"].as_u64()?,
                    last_seq: g["last_seq"].as_u64()?,
                    tokens: g["tokens"].as_u64()?,
                    loss: g["loss"].as_f64()?,
                })
            })
            .collect();
        Some(EvalPoint {
            step: v["step"].as_u64()?,
            control_old: fresh("loss_control_old"),
            control_new: fresh("loss_control_new"),
            train_loss_ema: live.st.train_loss_ema.unwrap_or(f64::NAN),
            old_sources,
        })
    }

    /// Asks the governor and carries out its decision. `eval`: a scheduled evaluation just
    /// taken (expansions are proposed and judged only then); `None`: the per-step call that
    /// advances the `η` ramp of an expansion in progress (nothing happens without one).
    fn govern(&mut self, eval: Option<EvalPoint>) {
        let cfg = self.a.cfg.governor.clone();
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if eval.is_none() && live.st.governor.in_progress.is_none() {
            return;
        }
        let phase = |g: &GovernorState| g.in_progress.as_ref().map(|e| e.phase);
        let was_ramp = phase(&live.st.governor) == Some(Phase::Ramp);
        let scheduled = eval.is_some();
        let inputs = governor_inputs(live, eval);
        let d = policy::decide(&mut live.st.governor, &inputs, &cfg);
        let ramp_done =
            was_ramp && matches!(phase(&live.st.governor), Some(Phase::Probation { .. }));
        let outcome = match &d {
            Decision::None { .. } if !scheduled => return,
            Decision::None { .. } | Decision::Keep { .. } => None,
            Decision::SetEta { layer, eta, .. } => Some(self.apply_eta(*layer, *eta, ramp_done)),
            Decision::Expand {
                layer,
                branches,
                beta,
                ramp_steps,
                ..
            } => Some(self.expand(
                *layer,
                *branches,
                *beta,
                *ramp_steps,
                AUTO_EXPAND_NOISE,
                false,
            )),
            Decision::Rollback { checkpoint_id, .. } => Some(self.governor_rollback(checkpoint_id)),
        };
        self.record_decision(&d, outcome, ramp_done);
    }

    /// Sets `η` of the newest group of `layer`; at the end of the ramp, the logits drift
    /// against the pre-expansion model is published.
    fn apply_eta(
        &mut self,
        layer: usize,
        eta: f64,
        ramp_done: bool,
    ) -> Result<serde_json::Value, String> {
        let live = self.live.as_mut().expect("live");
        live.trainer
            .set_eta(layer, eta as f32)
            .map_err(|e| e.to_string())?;
        metrics::gauge!(n::ETA_INJECTION_LAST).set(eta);
        let alphas = live.trainer.model().alphas(layer);
        let added = live
            .st
            .governor
            .in_progress
            .as_ref()
            .map_or(0, |e| e.branches)
            .min(alphas.len());
        let sum_new: f32 = alphas[alphas.len() - added..].iter().sum();
        metrics::gauge!(n::SUM_W_NEW_LAST).set(sum_new as f64);
        let mut out = serde_json::json!({"eta": eta, "sum_w_new": sum_new});
        if ramp_done
            && let Some(probe) = &self.probe
            && let Some(before) = &self.pre_expand_logits
        {
            let all_on = live.trainer.model().all_active();
            if let Ok(after) = live.trainer.logits(probe, &all_on) {
                out["drift_at_beta"] =
                    publish_drift(before, &after, live.trainer.model().config.vocab_size);
            }
        }
        Ok(out)
    }

    /// Restores the pre-expansion checkpoint after a failed probation, keeping the live
    /// governor state (it holds the back-off), as the policy requires.
    fn governor_rollback(&mut self, checkpoint_id: &str) -> Result<serde_json::Value, String> {
        let gov = self
            .live
            .as_ref()
            .map(|l| l.st.governor.clone())
            .unwrap_or_default();
        let r = self.restore_named(checkpoint_id)?;
        self.live.as_mut().expect("restored").st.governor = gov;
        tracing::info!(event = events::ROLLBACK, actor = "trainer", id = %checkpoint_id,
            step = r["step"].as_u64().unwrap_or(0), manual = false);
        Ok(r)
    }

    /// Logs a decision (`governor_decision`, its numbers and the outcome as JSON), counts it,
    /// and keeps expansions, keeps and rollbacks for `ctl governor`.
    fn record_decision(
        &mut self,
        d: &Decision,
        outcome: Option<Result<serde_json::Value, String>>,
        ramp_done: bool,
    ) {
        let kind = decision_kind(d);
        metrics::counter!(n::GOVERNOR_DECISIONS_TOTAL, "decision" => kind).increment(1);
        let in_progress = self
            .live
            .as_ref()
            .is_some_and(|l| l.st.governor.in_progress.is_some());
        metrics::gauge!(n::GOVERNOR_EXPANSION_IN_PROGRESS).set(in_progress as u8 as f64);
        let mut detail = serde_json::to_value(d).unwrap_or_default();
        let failed = match &outcome {
            Some(Ok(v)) => {
                detail["outcome"] = v.clone();
                None
            }
            Some(Err(e)) => {
                detail["outcome"] = serde_json::json!({ "error": e });
                Some(e.clone())
            }
            None => None,
        };
        let json = detail.to_string();
        if let Some(e) = &failed {
            tracing::warn!(event = events::GOVERNOR_DECISION, actor = "trainer", decision = kind,
                error = %e, detail = %json, "the governor's decision could not be carried out");
        } else if kind == "set_eta" && !ramp_done {
            tracing::debug!(event = events::GOVERNOR_DECISION, actor = "trainer", decision = kind, detail = %json);
        } else {
            tracing::info!(event = events::GOVERNOR_DECISION, actor = "trainer", decision = kind, detail = %json);
        }
        match d {
            Decision::Expand { step, layer, .. }
            | Decision::Keep { step, layer, .. }
            | Decision::Rollback { step, layer, .. } => {
                self.last_event = match &failed {
                    Some(e) => format!("governor {kind} of layer {layer} failed: {e}"),
                    None => format!("governor: {kind} (layer {layer}) at step {step}"),
                };
                self.push_action(serde_json::json!({
                    "step": step,
                    "action": kind,
                    "decision": detail,
                }));
            }
            _ => {}
        }
    }

    fn push_action(&mut self, v: serde_json::Value) {
        self.gov_actions.push_back(v);
        while self.gov_actions.len() > ACTIONS_CAP {
            self.gov_actions.pop_front();
        }
    }

    /// `ctl governor`: config, expansion in progress, per-layer cool-downs and back-offs,
    /// the inputs it sees now, recent decisions and actions.
    fn governor_report(&self) -> Result<serde_json::Value, String> {
        let cfg = &self.a.cfg.governor;
        let last_rollback = self
            .gov_actions
            .iter()
            .rev()
            .find(|a| a["action"] == "rollback")
            .cloned();
        let Some(live) = self.live.as_ref() else {
            return Ok(serde_json::json!({
                "enabled": cfg.enabled,
                "config": cfg,
                "state": null,
                "why": "the model does not exist yet (waiting for the tokenizer)",
            }));
        };
        let g = &live.st.governor;
        let step = live.trainer.step();
        let inputs = governor_inputs(live, None);
        let etas = live.trainer.model().etas();
        let layers: Vec<serde_json::Value> = inputs
            .layers
            .iter()
            .enumerate()
            .map(|(l, li)| {
                let ls = g.layers.get(l).copied().unwrap_or_default();
                serde_json::json!({
                    "layer": l,
                    "width": li.branches,
                    "effective_paths_ema": li.effective_paths.is_finite().then_some(li.effective_paths),
                    "saturation": (li.effective_paths / li.branches as f64).is_finite()
                        .then_some(li.effective_paths / li.branches as f64),
                    "eta": etas.get(l),
                    "cooldown_until": ls.cooldown_until,
                    "cooling_down": step < ls.cooldown_until,
                    "backoff": ls.backoff,
                    "kept": ls.kept,
                    "rolled_back": ls.rolled_back,
                })
            })
            .collect();
        let in_progress = g.in_progress.as_ref().map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            v["eta_now"] = serde_json::json!(etas.get(e.layer));
            v["eta_scheduled"] = serde_json::json!(e.eta_at(step));
            if let Phase::Probation { since } = e.phase {
                v["judged_at_first_eval_from_step"] =
                    serde_json::json!(since + cfg.probation_steps);
            }
            v
        });
        Ok(serde_json::json!({
            "enabled": cfg.enabled,
            "step": step,
            "params": inputs.params,
            "branch_params": inputs.layers.first().map(|l| l.branch_params),
            "train_loss_ema": live.st.train_loss_ema,
            "in_progress": in_progress,
            "layers": layers,
            "expansions_total": g.expansions_total,
            "rollbacks_total": g.rollbacks_total,
            "history": g.history,
            "last_decisions": g.last_decisions,
            "last_actions": self.gov_actions,
            "last_rollback": last_rollback,
            "config": cfg,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_zero_for_identical_logits_and_positive_otherwise() {
        let a = vec![1.0, 2.0, 3.0, 4.0];
        let (l2, l2s, cos, coss) = drift(&a, &a, 2);
        assert_eq!((l2, l2s), (0.0, 0.0));
        assert!(cos.abs() < 1e-12 && coss.abs() < 1e-12);
        let b = vec![1.0, 2.0, 3.0, 5.0];
        let (l2, _, cos, _) = drift(&a, &b, 2);
        assert!((l2 - 0.5).abs() < 1e-12);
        assert!(cos > 0.0);
    }

    #[test]
    fn loop_state_with_missing_eras_round_trips_through_json() {
        let av = Availability::new(Default::default(), &[2], 1).unwrap();
        let st = LoopState {
            cursor: 3,
            partial: Some((4, 1)),
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
    fn branch_params_is_what_one_more_branch_adds() {
        let cfg = crate::model::ModelConfig {
            vocab_size: 50,
            d_model: 16,
            n_heads: 2,
            n_layers: 2,
            branches: 2,
            max_seq_len: 8,
            ..Default::default()
        };
        let mut m = Model::new(cfg, 1).unwrap();
        let before = m.num_params() as u64;
        m.expand(1, 1, 0.0, 7).unwrap();
        assert_eq!(m.num_params() as u64 - before, branch_params(16));
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
}
