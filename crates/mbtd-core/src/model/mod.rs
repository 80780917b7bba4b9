//! The MBT-LM v1 model core: tensor kernels with hand-written backward passes, the
//! multi-branch layer and its aggregation, AdamW, availability masks, width expansion,
//! KV-cache generation, safetensors save/load and the speed benchmarks.
//!
//! Everything here is pure, synchronous code over fp32 row-major buffers. The maths of
//! the model (ARCHITECTURE.md, "The model: MBT-LM v1"):
//!
//! * `x0 = wte[ids] + wpe[pos]`, `pos` the offset within the window, or within the segment
//!   of a packed batch ([`Batch::segments`], where attention also stays inside a segment)
//! * per layer `l`, per active branch `i` (a pre-LN GPT block):
//!   `u = h + Attn(LN1(h))·Wo + bo`, `z_i = u + gelu_tanh(LN2(u)·W1 + b1)·W2 + b2`
//! * aggregation `α_i = w_g·(floor/K_g + (1-floor)·softmax_g(s)_i)` (see [`agg`]; with a
//!   single group `w_g = 1`, `K_g = K` it is the plain `floor/K + (1-floor)·softmax(s)_i`),
//!   masked renormalisation `α̃_i = m_i α_i / Σ_j m_j α_j`, `h' = Σ_i α̃_i z_i`
//! * `logits = LN_f(h_L)·W_out`, loss = loss-mask-weighted mean cross-entropy.
//!
//! Threads: every kernel (and `gemm`) runs on the *current* rayon pool, so run the trainer
//! inside `ThreadPool::install` of the configured size. A layer's branches run two at a
//! time, one per thread, with single-threaded products (see `block.rs`). Results are
//! bitwise identical for any pool size (fixed chunking and reduction orders; see [`ops`]).
//!
//! Typical use: [`Trainer::new`] (or [`Trainer::from_bytes`] to resume), per step
//! `masks = availability.draw()`, `scales = availability.scales(optim.max_scale)`,
//! [`Trainer::train_step`]; after [`Trainer::expand`] call [`Availability::sync_widths`].

pub mod agg;
pub mod attention;
pub mod availability;
pub mod bench;
mod block;
mod branches;
mod decode;
pub mod generate;
mod half;
pub mod io;
pub mod net;
pub mod ops;
pub mod params;
#[cfg(test)]
mod precision_tests;
pub mod products_bench;
pub mod remote;
mod tile;
pub mod train;

pub use availability::{Availability, AvailabilityConfig, AvailabilityError, BranchP};
pub use generate::{GenerateConfig, Generation, LostBranch};
pub use net::{Model, Workspace};
pub use ops::Precision;
pub use params::{BranchParams, LayerParams, Params};
pub use train::{ExpandReport, Expanded, StepReport, Trainer};

use crate::config::{FieldError, Section};
use serde::{Deserialize, Serialize};

/// Errors of the model core. Every message names what is wrong, where, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration field is out of range.
    #[error("invalid model configuration: {0}")]
    Field(#[from] FieldError),
    /// A configuration does not fit what it is used for (a benchmark's options).
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A batch does not fit the model (shape, token id, sequence length).
    #[error("invalid batch: {0}")]
    Batch(String),
    /// Masks or branch scales do not match the model's widths.
    #[error("invalid branch masks/scales: {0}")]
    Masks(String),
    /// A tensor in a safetensors buffer is missing or has the wrong shape/dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor's name as in ARCHITECTURE.md.
        name: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// The safetensors container itself could not be read or written.
    #[error("safetensors {what}: {source}; the buffer is not a valid safetensors file")]
    SafeTensors {
        /// Which file (model or optimizer) was being handled.
        what: &'static str,
        /// The underlying error.
        source: safetensors::SafeTensorError,
    },
    /// An expansion or aggregation request is invalid.
    #[error("expansion: {0}")]
    Expand(String),
    /// A generation request is invalid.
    #[error("generation: {0}")]
    Generate(String),
    /// Branches on other machines: a host did not give what a step needs, or a
    /// placement does not fit the model (see [`remote`]).
    #[error("branch hosts: {0}")]
    Cluster(String),
    /// Fewer branches of a layer answered a training pass than the quorum
    /// (`availability.min_active`); the step was abandoned before any update.
    #[error(
        "layer {layer} at step {step}: {answered} branch(es) answered, fewer than the quorum of {need} (availability.min_active); the step was abandoned before any update — check that the hosts of layer {layer} are up"
    )]
    Quorum {
        /// The layer short of answers.
        layer: usize,
        /// Step counter (unchanged).
        step: u64,
        /// Branches whose outputs arrived.
        answered: usize,
        /// Branches the quorum wants: `min(min_active, branches asked)`.
        need: usize,
    },
    /// The loss or gradient norm is not finite; the update was skipped.
    #[error(
        "non-finite training step {step}: loss {loss}, gradient norm {grad_norm}; the update was skipped and the weights are unchanged — lower the learning rate or roll back to a checkpoint"
    )]
    NonFinite {
        /// Step counter (unchanged).
        step: u64,
        /// Loss of the batch.
        loss: f32,
        /// Scaled gradient norm.
        grad_norm: f32,
    },
}

/// Shape of the model. `branches` is the initial width `K` of every layer; widths grow
/// later through expansion and are then read back from checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size `V` (token ids are `0..V`).
    pub vocab_size: usize,
    /// Width `d` (a multiple of `n_heads`).
    pub d_model: usize,
    /// Attention heads; head dim is `d_model / n_heads`.
    pub n_heads: usize,
    /// Number of MBT layers `L`.
    pub n_layers: usize,
    /// Initial branches per layer `K`.
    pub branches: usize,
    /// Maximum sequence length `T_max` (rows of `wpe`; the training window and, with
    /// learned positions, the generation context).
    pub max_seq_len: usize,
    /// Anti-collapse floor of the aggregation, in `[0, 1]`.
    pub agg_floor: f32,
    /// Standard deviation of the normal initialisation (residual projections get
    /// `init_std / sqrt(2·L)`).
    pub init_std: f32,
    /// Position encoding: `learned` (the `wpe` table, added at the input) or `rope`
    /// (rotary, applied to queries and keys per head; no `wpe` tensor; generation may run
    /// past `max_seq_len` with a sliding KV window).
    pub positions: Positions,
    /// Dropout probability `p` in `[0, 1)` on the attention probabilities, the MLP hidden
    /// activations and both residual branch outputs of every block, while training only
    /// (0 = off).
    pub dropout: f32,
    /// Arithmetic of the linear layers' products: `f32`, or `bf16` operands with fp32
    /// accumulation (weights, optimizer state, norms, softmax and loss stay fp32).
    pub precision: ops::Precision,
    /// Embedding of each row's arrival time added at the input: `none`, or `time2vec`
    /// (one linear and `time_features` periodic components, learned; see
    /// [`ops::time2vec`]).
    pub time_embedding: TimeEmbedding,
    /// Periodic components `k` of the Time2Vec embedding, `1 ..= 256` (used with
    /// `time_embedding = "time2vec"`).
    pub time_features: usize,
}

/// Whether the model knows when a row arrived (`model.time_embedding`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeEmbedding {
    /// No time input (no tensors).
    #[default]
    None,
    /// Time2Vec of the row's time, projected to `d` and added to every position of the row.
    Time2vec,
}

/// How the model knows where a token is (`model.positions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// A learned table `wpe` `[T_max, d]` added to the token embedding.
    #[default]
    Learned,
    /// Rotary position encoding of queries and keys (see [`ops::rope`]).
    Rope,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 4096,
            d_model: 256,
            n_heads: 4,
            n_layers: 4,
            branches: 4,
            max_seq_len: 128,
            agg_floor: 0.2,
            init_std: 0.02,
            positions: Positions::Learned,
            dropout: 0.0,
            precision: ops::Precision::F32,
            time_embedding: TimeEmbedding::None,
            time_features: 8,
        }
    }
}

impl Section for ModelConfig {
    const NAME: &'static str = "model";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("vocab_size", self.vocab_size, 2, 1 << 24)?;
        Self::in_range("n_heads", self.n_heads, 1, 256)?;
        let heads = self.n_heads;
        Self::require(
            "d_model",
            self.d_model,
            (1..=16384).contains(&self.d_model) && self.d_model.is_multiple_of(heads),
            format!("1 ..= 16384 and a multiple of model.n_heads ({heads})"),
        )?;
        Self::in_range("n_layers", self.n_layers, 1, 256)?;
        Self::in_range("branches", self.branches, 1, 256)?;
        Self::in_range("max_seq_len", self.max_seq_len, 1, 65536)?;
        Self::in_range("agg_floor", self.agg_floor, 0.0, 1.0)?;
        let std = self.init_std;
        Self::require("init_std", std, std > 0.0 && std <= 1.0, "(0, 1]")?;
        let (d, h) = (self.d_model, self.n_heads);
        Self::require(
            "positions",
            "\"rope\"",
            self.positions != Positions::Rope || self.head_dim().is_multiple_of(2),
            format!(
                "\"learned\", or \"rope\" with an even head dimension, but model.d_model / model.n_heads = {d} / {h} = {}; change either",
                self.head_dim()
            ),
        )?;
        let p = self.dropout;
        Self::require("dropout", p, (0.0..1.0).contains(&p), "[0, 1) (0 = off)")?;
        Self::in_range("time_features", self.time_features, 1, 256)
    }
}

impl ModelConfig {
    /// Head dimension `d / n_heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// AdamW with global-norm clipping, linear warm-up then a constant learning rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak (and final, constant) learning rate.
    pub lr: f32,
    /// Steps of linear warm-up: `lr_t = lr·min(1, (t+1)/warmup_steps)`.
    pub warmup_steps: u64,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay, applied to 2-D tensors only (embeddings, head, branch
    /// matrices), never to biases, LayerNorm parameters or aggregation logits.
    pub weight_decay: f32,
    /// Global gradient-norm clip (after inverse participation scaling); 0 disables.
    pub grad_clip: f32,
    /// Cap of the inverse participation gradient scale `min(1/π_i, max_scale)`.
    pub max_scale: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            warmup_steps: 100,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            max_scale: 4.0,
        }
    }
}

impl Section for OptimConfig {
    const NAME: &'static str = "optim";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("lr", self.lr, 0.0, 1.0)?;
        let (b1, b2) = (self.beta1, self.beta2);
        Self::require("beta1", b1, (0.0..1.0).contains(&b1), "[0, 1)")?;
        Self::require("beta2", b2, (0.0..1.0).contains(&b2), "[0, 1)")?;
        let eps = self.eps;
        Self::require("eps", eps, eps > 0.0 && eps <= 1.0, "(0, 1]")?;
        Self::in_range("weight_decay", self.weight_decay, 0.0, 1.0)?;
        let clip = self.grad_clip;
        Self::require(
            "grad_clip",
            clip,
            clip >= 0.0 && clip.is_finite(),
            ">= 0 (0 disables clipping)",
        )?;
        let s = self.max_scale;
        Self::require("max_scale", s, s >= 1.0 && s.is_finite(), ">= 1")
    }
}

impl OptimConfig {
    /// Learning rate of the 0-based step `t`: linear warm-up, then constant forever.
    pub fn lr_at(&self, t: u64) -> f32 {
        if self.warmup_steps == 0 || t.saturating_add(1) >= self.warmup_steps {
            self.lr
        } else {
            self.lr * ((t + 1) as f32 / self.warmup_steps as f32)
        }
    }
}

/// One batch of token rows, row-major `[batch, seq]`. `loss_mask[n]` weights the
/// cross-entropy of predicting `targets[n]` from the prefix ending at `inputs[n]`
/// (0 excludes a position, e.g. a prompt token).
///
/// A *packed* batch (`segments` set) holds several texts per window: a segment is a run of
/// equal ids within a window, its position `i` attends only to positions `j ≤ i` of the
/// same segment, and positions restart at 0 at each segment start. Each segment's logits
/// are those it gets alone (see `learn::batch::pack`, which builds such windows).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows in the batch.
    pub batch: usize,
    /// Positions per row (`<= max_seq_len`).
    pub seq: usize,
    /// Input token ids, `[batch, seq]`.
    pub inputs: Vec<u32>,
    /// Target token ids, `[batch, seq]`.
    pub targets: Vec<u32>,
    /// Loss weight per position, `[batch, seq]`, each `>= 0`.
    pub loss_mask: Vec<f32>,
    /// Segment id per position, `[batch, seq]`, non-decreasing within each window (the
    /// index of the text a position belongs to within its window); `None`: every window is
    /// one text.
    pub segments: Option<Vec<u16>>,
    /// Arrival time `τ` of each position's row ([`ops::time2vec::tau_of_ms`]), `[batch,
    /// seq]`, NaN where unknown (padding, rows stored without a time); `None`: all
    /// unknown. Used only with `model.time_embedding = "time2vec"`.
    pub times: Option<Vec<f32>>,
}

impl Batch {
    /// Checks lengths, ids and weights against the model configuration.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), ModelError> {
        let n = self.batch * self.seq;
        if self.batch == 0 || self.seq == 0 {
            return Err(ModelError::Batch(format!(
                "batch = {}, seq = {}: both must be >= 1",
                self.batch, self.seq
            )));
        }
        if self.seq > cfg.max_seq_len {
            return Err(ModelError::Batch(format!(
                "seq = {} exceeds model.max_seq_len = {}; cut rows into windows",
                self.seq, cfg.max_seq_len
            )));
        }
        for (field, len) in [
            ("inputs", self.inputs.len()),
            ("targets", self.targets.len()),
            ("loss_mask", self.loss_mask.len()),
        ] {
            if len != n {
                return Err(ModelError::Batch(format!(
                    "{field} has {len} entries, expected batch*seq = {n}"
                )));
            }
        }
        for (field, ids) in [("inputs", &self.inputs), ("targets", &self.targets)] {
            if let Some(p) = ids.iter().position(|&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::Batch(format!(
                    "{field}[{p}] = {} is not below model.vocab_size = {}",
                    ids[p], cfg.vocab_size
                )));
            }
        }
        if let Some(p) = self
            .loss_mask
            .iter()
            .position(|&w| !(w >= 0.0 && w.is_finite()))
        {
            return Err(ModelError::Batch(format!(
                "loss_mask[{p}] = {}: weights must be finite and >= 0",
                self.loss_mask[p]
            )));
        }
        if let Some(times) = &self.times {
            if times.len() != n {
                return Err(ModelError::Batch(format!(
                    "times has {} entries, expected batch*seq = {n}",
                    times.len()
                )));
            }
            if let Some(p) = times.iter().position(|t| t.is_infinite()) {
                return Err(ModelError::Batch(format!(
                    "times[{p}] = {}: a time must be finite (NaN = unknown)",
                    times[p]
                )));
            }
        }
        if let Some(segs) = &self.segments {
            if segs.len() != n {
                return Err(ModelError::Batch(format!(
                    "segments has {} entries, expected batch*seq = {n}",
                    segs.len()
                )));
            }
            for (r, row) in segs.chunks_exact(self.seq).enumerate() {
                if let Some(t) = (1..self.seq).find(|&t| row[t] < row[t - 1]) {
                    return Err(ModelError::Batch(format!(
                        "segments[{}] = {} after {} in window {r}: segment ids must not decrease within a window (each text is one contiguous run)",
                        r * self.seq + t,
                        row[t],
                        row[t - 1]
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Per layer, which branches are active this step (at least one per layer).
pub type Masks = Vec<Vec<bool>>;

/// Per layer, per branch gradient multipliers (inverse participation scaling).
pub type BranchScales = Vec<Vec<f32>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_with_defaults_and_reject_unknown_fields() {
        let m: ModelConfig = toml::from_str("d_model = 128\nn_heads = 2").unwrap();
        assert_eq!((m.d_model, m.n_heads, m.vocab_size), (128, 2, 4096));
        assert!(m.validate().is_ok());
        assert!(toml::from_str::<ModelConfig>("width = 3").is_err());
        let bad = ModelConfig {
            d_model: 30,
            n_heads: 4,
            ..ModelConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("model.d_model")
        );
        let bad = ModelConfig {
            agg_floor: 1.5,
            ..ModelConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("model.agg_floor")
        );
        let t: ModelConfig =
            toml::from_str("time_embedding = \"time2vec\"\ntime_features = 4").unwrap();
        assert_eq!(
            (t.time_embedding, t.time_features),
            (TimeEmbedding::Time2vec, 4)
        );
        assert!(toml::from_str::<ModelConfig>("time_embedding = \"clock\"").is_err());
        let bad = ModelConfig {
            time_features: 0,
            ..ModelConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("model.time_features")
        );
        let o: OptimConfig = toml::from_str("lr = 0.001\nwarmup_steps = 4").unwrap();
        assert!(o.validate().is_ok());
        assert!(toml::from_str::<OptimConfig>("lr_decay = 1").is_err());
        let bad = OptimConfig {
            beta2: 1.0,
            ..OptimConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("optim.beta2")
        );
    }

    #[test]
    fn learning_rate_warms_up_then_stays_constant() {
        let o = OptimConfig {
            lr: 1.0,
            warmup_steps: 4,
            ..OptimConfig::default()
        };
        let lrs: Vec<f32> = (0..6).map(|t| o.lr_at(t)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(o.lr_at(u64::MAX), 1.0);
        let none = OptimConfig {
            warmup_steps: 0,
            ..o
        };
        assert_eq!(none.lr_at(0), 1.0);
    }

    #[test]
    fn batch_validation_names_the_problem() {
        let cfg = ModelConfig {
            vocab_size: 10,
            max_seq_len: 4,
            ..ModelConfig::default()
        };
        let ok = Batch {
            batch: 1,
            seq: 2,
            inputs: vec![1, 2],
            targets: vec![2, 3],
            loss_mask: vec![0.0, 1.0],
            segments: None,
            times: None,
        };
        assert!(ok.validate(&cfg).is_ok());
        let packed = Batch {
            segments: Some(vec![0, 1]),
            ..ok.clone()
        };
        assert!(packed.validate(&cfg).is_ok());
        let err = Batch {
            segments: Some(vec![1, 0]),
            ..ok.clone()
        }
        .validate(&cfg)
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("segments[1]") && err.contains("must not decrease"),
            "{err}"
        );
        let err = Batch {
            times: Some(vec![f32::NAN, f32::INFINITY]),
            ..ok.clone()
        }
        .validate(&cfg)
        .unwrap_err()
        .to_string();
        assert!(err.contains("times[1]"), "{err}");
        assert!(
            Batch {
                times: Some(vec![f32::NAN, 2.4]),
                ..ok.clone()
            }
            .validate(&cfg)
            .is_ok()
        );
        let err = Batch {
            segments: Some(vec![0]),
            ..ok.clone()
        }
        .validate(&cfg)
        .unwrap_err()
        .to_string();
        assert!(err.contains("segments has 1 entries"), "{err}");
        let long = Batch {
            seq: 5,
            inputs: vec![0; 5],
            targets: vec![0; 5],
            loss_mask: vec![1.0; 5],
            ..ok.clone()
        };
        assert!(
            long.validate(&cfg)
                .unwrap_err()
                .to_string()
                .contains("max_seq_len")
        );
        let short = Batch {
            targets: vec![1],
            ..ok.clone()
        };
        assert!(
            short
                .validate(&cfg)
                .unwrap_err()
                .to_string()
                .contains("targets")
        );
        let neg = Batch {
            loss_mask: vec![-1.0, 1.0],
            ..ok
        };
        assert!(
            neg.validate(&cfg)
                .unwrap_err()
                .to_string()
                .contains("loss_mask[0]")
        );
    }
}
