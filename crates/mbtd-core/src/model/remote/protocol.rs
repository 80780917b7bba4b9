//! The step protocol between a coordinator and a branch host, as plain data.
//!
//! Per training step `t` and layer `l` the coordinator sends [`Forward`] (the layer input
//! `h` and everything a branch block needs besides its weights) to each host of the
//! layer's computed branches and gets [`ForwardReply`] (each branch's output `z_i`).
//! Backward sends [`Backward`] (`∂L/∂h'` and each branch's `α̃_i`) and gets
//! [`BackwardReply`] (each branch's part of `∂L/∂h` and the squared norm of its
//! gradient). After the global norm is known, [`Update`] carries each branch's gradient
//! factor `k = clip·c_i` and the AdamW constants; the host applies it only to branches
//! whose forward *and* backward of step `t` it computed. [`Request::Pull`] and
//! [`Request::Push`] move weights and AdamW moments between the coordinator's copy and a
//! host (checkpoints, rollback, rejoin).
//!
//! Generation (batch 1) keeps per-session key/value caches on the hosts: [`Open`] is an
//! evaluation [`Forward`] of the prompt (one window) that also keeps, for session
//! `session`, each requested branch's keys and values (answered like a forward); each
//! further token is one [`Decode`] per layer (the layer input row of that position,
//! answered with each branch's output row, [`DecodeReply`]); [`Request::Close`] drops
//! the session. A host keeps a bounded number of sessions (see `super::sessions`); a
//! decode of a session it does not hold is refused with a message saying so.
//!
//! Branches are named by `(layer, branch)` indices of the coordinator's model. The binary
//! encoding is in [`super::wire`].

use crate::model::params::BranchParams;

/// `(layer, branch)` of a hosted branch.
pub type BranchKey = (usize, usize);

/// A message from the coordinator to a branch host.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Compute the outputs of some branches of one layer.
    Forward(Forward),
    /// Back-propagate through branches computed by the last [`Forward`] of their layer.
    Backward(Backward),
    /// Apply AdamW to branches whose step-`t` backward this host computed.
    Update(Update),
    /// Send back the weights and moments of these branches.
    Pull(Vec<BranchKey>),
    /// Hold these branches from now on (replacing any held copy), idle.
    Push(Vec<BranchState>),
    /// Prefill of a generation session: a forward that keeps keys and values.
    Open(Open),
    /// One generated position of a session through some branches of one layer.
    Decode(Decode),
    /// Drop a generation session's caches (no error when it is not held).
    Close(u64),
}

/// The prefill of generation session `session`: `forward` (an evaluation pass,
/// `train = false`, of one window: `batch = 1`, no segments, no dropout) computed as a
/// [`Forward`] and answered with a [`ForwardReply`]; each requested branch's keys and
/// values of the window's positions `0..seq` are kept for the session (created by its
/// first open, one open per layer), replacing what the session held for that layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    /// Session id, chosen by the coordinator.
    pub session: u64,
    /// The prompt's pass through the layer.
    pub forward: Forward,
}

/// One position of a generation session through branches `branches` of layer `layer`.
///
/// # Shapes
/// `x`: `[d]`, the layer input row at position `pos`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decode {
    /// Session id of the [`Open`].
    pub session: u64,
    /// Layer index.
    pub layer: usize,
    /// Position of the row: the session's next one (the prompt length, then one more per
    /// decode of the branch).
    pub pos: u64,
    /// Branches to compute, ascending; each must have been opened in the session.
    pub branches: Vec<usize>,
    /// The layer input row.
    pub x: Vec<f32>,
}

/// The outputs of a [`Decode`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeReply {
    /// Session of the request.
    pub session: u64,
    /// Layer of the request.
    pub layer: usize,
    /// Position of the request.
    pub pos: u64,
    /// `(branch, z_i)` for every requested branch, in request order (`z_i`: `[d]`).
    pub outputs: Vec<(usize, Vec<f32>)>,
}

/// Forward of the branches `branches` of layer `layer` on the input `h`.
///
/// # Shapes
/// `h`: `[batch·seq, d]`; `segments`: `[batch·seq]` when present.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Training step the pass belongs to (the coordinator's step counter).
    pub step: u64,
    /// Layer index.
    pub layer: usize,
    /// Branches to compute, ascending.
    pub branches: Vec<usize>,
    /// Rows (windows) in the batch.
    pub batch: usize,
    /// Positions per window.
    pub seq: usize,
    /// Segment id per position of a packed batch (`None`: each window is one text).
    pub segments: Option<Vec<u16>>,
    /// Rotary positions on (the host's model configuration must agree).
    pub rope: bool,
    /// Dropout of a training step: probability and training seed; the masks of branch
    /// `i` are keyed by `(seed, step, layer, i, site)`. `None`: no dropout.
    pub dropout: Option<(f32, u64)>,
    /// A training pass: keep the activations for [`Backward`]. `false` (evaluation):
    /// the branches computed here cannot be back-propagated or updated for this step.
    pub train: bool,
    /// The layer input.
    pub h: Vec<f32>,
}

/// The outputs of a [`Forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardReply {
    /// Step of the request.
    pub step: u64,
    /// Layer of the request.
    pub layer: usize,
    /// `(branch, z_i)` for every requested branch, in request order (`z_i`:
    /// `[batch·seq, d]`).
    pub outputs: Vec<(usize, Vec<f32>)>,
}

/// Backward of layer `layer` at step `step`, after that step's [`Forward`].
///
/// # Shapes
/// `dh`: `[batch·seq, d]`, the gradient of the layer output `h' = Σ α̃_i z_i`.
#[derive(Debug, Clone, PartialEq)]
pub struct Backward {
    /// Training step.
    pub step: u64,
    /// Layer index.
    pub layer: usize,
    /// `(branch, α̃_i)`: each branch receives `∂L/∂z_i = α̃_i·dh`.
    pub branches: Vec<(usize, f32)>,
    /// `∂L/∂h'`.
    pub dh: Vec<f32>,
}

/// One branch's result of a [`Backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct BranchGrad {
    /// Branch index.
    pub branch: usize,
    /// The branch's part of `∂L/∂h` (`[batch·seq, d]`).
    pub dh: Vec<f32>,
    /// `‖G_i‖²`: the sum over the branch's tensors, in storage order, of each tensor's
    /// squared norm in f64 (unscaled).
    pub sq_norm: f64,
}

/// The results of a [`Backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardReply {
    /// Step of the request.
    pub step: u64,
    /// Layer of the request.
    pub layer: usize,
    /// One entry per requested branch, in request order.
    pub grads: Vec<BranchGrad>,
}

/// The AdamW constants of one step (see `model::train`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of the step.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (matrices only).
    pub weight_decay: f32,
    /// Bias correction `1 − β1^{t+1}`.
    pub bc1: f32,
    /// Bias correction `1 − β2^{t+1}`.
    pub bc2: f32,
}

/// AdamW on the hosted gradients of step `step`.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Training step whose gradients are applied.
    pub step: u64,
    /// The AdamW constants.
    pub adamw: AdamWStep,
    /// `(layer, branch, k)`: the branch's gradient is multiplied by `k = clip·c_i`.
    pub branches: Vec<(usize, usize, f32)>,
}

/// What an [`Update`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateReply {
    /// Step of the request.
    pub step: u64,
    /// Branches updated.
    pub applied: Vec<BranchKey>,
    /// Branches not updated: not held, or their forward and backward of this step were
    /// not both computed here (masked, missed, or an evaluation pass).
    pub refused: Vec<BranchKey>,
}

/// Weights and AdamW moments of one branch.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchState {
    /// Layer index.
    pub layer: usize,
    /// Branch index.
    pub branch: usize,
    /// Weights.
    pub params: BranchParams,
    /// First moments.
    pub m: BranchParams,
    /// Second moments.
    pub v: BranchParams,
}

/// A branch host's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Answer to [`Request::Forward`].
    Forward(ForwardReply),
    /// Answer to [`Request::Backward`].
    Backward(BackwardReply),
    /// Answer to [`Request::Update`].
    Update(UpdateReply),
    /// Answer to [`Request::Pull`], in request order.
    Pulled(Vec<BranchState>),
    /// Answer to [`Request::Push`]: how many branches are now held.
    Pushed(usize),
    /// Answer to [`Request::Decode`].
    Decoded(DecodeReply),
    /// Answer to [`Request::Close`]: how many branch caches were dropped.
    Closed(usize),
    /// The request was not carried out; the message says why.
    Refused(String),
}

impl Request {
    /// The message's name in diagnostics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Forward(_) => "forward",
            Request::Backward(_) => "backward",
            Request::Update(_) => "update",
            Request::Pull(_) => "pull",
            Request::Push(_) => "push",
            Request::Open(_) => "open",
            Request::Decode(_) => "decode",
            Request::Close(_) => "close",
        }
    }
}

impl Reply {
    /// The message's name in diagnostics.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Forward(_) => "forward reply",
            Reply::Backward(_) => "backward reply",
            Reply::Update(_) => "update reply",
            Reply::Pulled(_) => "pull reply",
            Reply::Pushed(_) => "push reply",
            Reply::Decoded(_) => "decode reply",
            Reply::Closed(_) => "close reply",
            Reply::Refused(_) => "refusal",
        }
    }
}
