//! Parameter tensors of MBT-LM v1 with their ARCHITECTURE.md names and `[in, out]` shapes.
//! The same structure holds gradients and the AdamW moments.

use super::{ModelConfig, Positions, TimeEmbedding};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Names (after `layers.{l}.branches.{i}.`) of a branch's tensors, in storage order,
/// with whether the tensor is a matrix (weight decay applies).
pub const BRANCH_TENSORS: [(&str, bool); 12] = [
    ("ln1.gain", false),
    ("ln1.bias", false),
    ("attn.qkv.w", true),
    ("attn.qkv.b", false),
    ("attn.out.w", true),
    ("attn.out.b", false),
    ("ln2.gain", false),
    ("ln2.bias", false),
    ("mlp.fc.w", true),
    ("mlp.fc.b", false),
    ("mlp.proj.w", true),
    ("mlp.proj.b", false),
];

/// Shape of branch tensor `idx` (index into [`BRANCH_TENSORS`]) for width `d`.
pub fn branch_shape(idx: usize, d: usize) -> Vec<usize> {
    match idx {
        2 => vec![d, 3 * d],
        3 => vec![3 * d],
        4 => vec![d, d],
        8 => vec![d, 4 * d],
        9 => vec![4 * d],
        10 => vec![4 * d, d],
        _ => vec![d],
    }
}

/// One pre-LN GPT block.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchParams {
    /// `ln1.gain` `[d]`.
    pub ln1_gain: Vec<f32>,
    /// `ln1.bias` `[d]`.
    pub ln1_bias: Vec<f32>,
    /// `attn.qkv.w` `[d, 3d]`.
    pub qkv_w: Vec<f32>,
    /// `attn.qkv.b` `[3d]`.
    pub qkv_b: Vec<f32>,
    /// `attn.out.w` `[d, d]`.
    pub out_w: Vec<f32>,
    /// `attn.out.b` `[d]`.
    pub out_b: Vec<f32>,
    /// `ln2.gain` `[d]`.
    pub ln2_gain: Vec<f32>,
    /// `ln2.bias` `[d]`.
    pub ln2_bias: Vec<f32>,
    /// `mlp.fc.w` `[d, 4d]`.
    pub fc_w: Vec<f32>,
    /// `mlp.fc.b` `[4d]`.
    pub fc_b: Vec<f32>,
    /// `mlp.proj.w` `[4d, d]`.
    pub proj_w: Vec<f32>,
    /// `mlp.proj.b` `[d]`.
    pub proj_b: Vec<f32>,
}

impl BranchParams {
    /// All-zero tensors of the right shapes.
    pub fn zeros(d: usize) -> Self {
        let z = |i: usize| vec![0.0; branch_shape(i, d).iter().product()];
        Self {
            ln1_gain: z(0),
            ln1_bias: z(1),
            qkv_w: z(2),
            qkv_b: z(3),
            out_w: z(4),
            out_b: z(5),
            ln2_gain: z(6),
            ln2_bias: z(7),
            fc_w: z(8),
            fc_b: z(9),
            proj_w: z(10),
            proj_b: z(11),
        }
    }

    /// The tensors in [`BRANCH_TENSORS`] order.
    pub fn tensors(&self) -> [&Vec<f32>; 12] {
        [
            &self.ln1_gain,
            &self.ln1_bias,
            &self.qkv_w,
            &self.qkv_b,
            &self.out_w,
            &self.out_b,
            &self.ln2_gain,
            &self.ln2_bias,
            &self.fc_w,
            &self.fc_b,
            &self.proj_w,
            &self.proj_b,
        ]
    }

    /// The tensors in [`BRANCH_TENSORS`] order, mutable.
    pub fn tensors_mut(&mut self) -> [&mut Vec<f32>; 12] {
        [
            &mut self.ln1_gain,
            &mut self.ln1_bias,
            &mut self.qkv_w,
            &mut self.qkv_b,
            &mut self.out_w,
            &mut self.out_b,
            &mut self.ln2_gain,
            &mut self.ln2_bias,
            &mut self.fc_w,
            &mut self.fc_b,
            &mut self.proj_w,
            &mut self.proj_b,
        ]
    }
}

/// One MBT layer: aggregation logits and branches.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerParams {
    /// `alpha_logits` `[K]`.
    pub alpha_logits: Vec<f32>,
    /// The `K` branches.
    pub branches: Vec<BranchParams>,
}

/// Every trainable tensor of the model (also used for gradients and AdamW moments).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// `wte` `[V, d]`.
    pub wte: Vec<f32>,
    /// `wpe` `[T_max, d]` with learned positions; empty with rotary positions.
    pub wpe: Vec<f32>,
    /// `lnf.gain` `[d]`.
    pub lnf_gain: Vec<f32>,
    /// `lnf.bias` `[d]`.
    pub lnf_bias: Vec<f32>,
    /// `head.w` `[d, V]`.
    pub head_w: Vec<f32>,
    /// `time2vec.w` `[k+1]` (empty without a time embedding).
    pub t2v_w: Vec<f32>,
    /// `time2vec.b` `[k+1]` (empty without a time embedding).
    pub t2v_b: Vec<f32>,
    /// `time2vec.proj.w` `[k+1, d]` (empty without a time embedding).
    pub t2v_proj: Vec<f32>,
    /// The `L` layers.
    pub layers: Vec<LayerParams>,
}

/// Number of non-layer tensors.
pub const GLOBALS: usize = 8;

/// Names of the non-layer tensors, in [`global_shapes`] order.
pub const GLOBAL_NAMES: [&str; GLOBALS] = [
    "wte",
    "wpe",
    "lnf.gain",
    "lnf.bias",
    "head.w",
    "time2vec.w",
    "time2vec.b",
    "time2vec.proj.w",
];

/// Names (with whether each is a matrix) and shapes of the non-layer tensors (`wpe` has
/// no rows with rotary positions, the `time2vec.*` tensors none without a time embedding;
/// an empty tensor is neither stored nor trained).
pub fn global_shapes(cfg: &ModelConfig) -> [(&'static str, bool, Vec<usize>); GLOBALS] {
    let (v, d) = (cfg.vocab_size, cfg.d_model);
    let t = match cfg.positions {
        Positions::Learned => cfg.max_seq_len,
        Positions::Rope => 0,
    };
    let k1 = match cfg.time_embedding {
        TimeEmbedding::None => 0,
        TimeEmbedding::Time2vec => cfg.time_features + 1,
    };
    let n = GLOBAL_NAMES;
    [
        (n[0], true, vec![v, d]),
        (n[1], true, vec![t, d]),
        (n[2], false, vec![d]),
        (n[3], false, vec![d]),
        (n[4], true, vec![d, v]),
        (n[5], false, vec![k1]),
        (n[6], false, vec![k1]),
        (n[7], true, vec![k1, d]),
    ]
}

/// Standard normal sample by Box–Muller.
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl Params {
    /// The time embedding's tensors (empty without one).
    pub(crate) fn time2vec(&self) -> super::ops::time2vec::Time2Vec<'_> {
        super::ops::time2vec::Time2Vec {
            w: &self.t2v_w,
            b: &self.t2v_b,
            proj: &self.t2v_proj,
        }
    }

    /// All-zero tensors for the given widths.
    pub fn zeros(cfg: &ModelConfig, widths: &[usize]) -> Self {
        let g = global_shapes(cfg);
        let z = |s: &Vec<usize>| vec![0.0f32; s.iter().product()];
        Self {
            wte: z(&g[0].2),
            wpe: z(&g[1].2),
            lnf_gain: z(&g[2].2),
            lnf_bias: z(&g[3].2),
            head_w: z(&g[4].2),
            t2v_w: z(&g[5].2),
            t2v_b: z(&g[6].2),
            t2v_proj: z(&g[7].2),
            layers: widths
                .iter()
                .map(|&k| LayerParams {
                    alpha_logits: vec![0.0; k],
                    branches: (0..k).map(|_| BranchParams::zeros(cfg.d_model)).collect(),
                })
                .collect(),
        }
    }

    /// Initialisation of ARCHITECTURE.md: normal(0, init_std); `attn.out.w` and
    /// `mlp.proj.w` normal(0, init_std/√(2L)); LayerNorm gains 1; biases and `s` 0. With a
    /// time embedding, drawn after every other tensor (so the others are as without it):
    /// `time2vec.w` and `time2vec.b` normal(0, 1), `time2vec.proj.w` 0 (the embedding
    /// starts as a no-op; see [`super::ops::time2vec`]).
    pub fn init(cfg: &ModelConfig, seed: u64) -> Self {
        let widths = vec![cfg.branches; cfg.n_layers];
        let mut p = Self::zeros(cfg, &widths);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = cfg.init_std;
        let resid = std / (2.0 * cfg.n_layers as f32).sqrt();
        let mut fill = |v: &mut [f32], s: f32| v.iter_mut().for_each(|x| *x = normal(&mut rng) * s);
        fill(&mut p.wte, std);
        fill(&mut p.wpe, std);
        fill(&mut p.head_w, std);
        p.lnf_gain.fill(1.0);
        for layer in &mut p.layers {
            for b in &mut layer.branches {
                fill(&mut b.qkv_w, std);
                fill(&mut b.out_w, resid);
                fill(&mut b.fc_w, std);
                fill(&mut b.proj_w, resid);
                b.ln1_gain.fill(1.0);
                b.ln2_gain.fill(1.0);
            }
        }
        fill(&mut p.t2v_w, 1.0);
        fill(&mut p.t2v_b, 1.0);
        p
    }

    /// Width of every layer.
    pub fn widths(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.branches.len()).collect()
    }

    /// The non-layer tensors in [`global_shapes`] order.
    pub fn globals(&self) -> [&Vec<f32>; GLOBALS] {
        [
            &self.wte,
            &self.wpe,
            &self.lnf_gain,
            &self.lnf_bias,
            &self.head_w,
            &self.t2v_w,
            &self.t2v_b,
            &self.t2v_proj,
        ]
    }

    /// The non-layer tensors in [`global_shapes`] order, mutable.
    pub fn globals_mut(&mut self) -> [&mut Vec<f32>; GLOBALS] {
        [
            &mut self.wte,
            &mut self.wpe,
            &mut self.lnf_gain,
            &mut self.lnf_bias,
            &mut self.head_w,
            &mut self.t2v_w,
            &mut self.t2v_b,
            &mut self.t2v_proj,
        ]
    }

    /// Number of scalar parameters.
    pub fn count(&self) -> usize {
        self.globals().iter().map(|t| t.len()).sum::<usize>()
            + self
                .layers
                .iter()
                .map(|l| {
                    l.alpha_logits.len()
                        + l.branches
                            .iter()
                            .map(|b| b.tensors().iter().map(|t| t.len()).sum::<usize>())
                            .sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// Identifies one tensor of a [`Params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorId {
    /// Index into [`global_shapes`].
    Global(usize),
    /// `layers.{l}.alpha_logits`.
    Alpha(usize),
    /// `layers.{l}.branches.{i}.<BRANCH_TENSORS[t]>`.
    Branch(usize, usize, usize),
}

impl TensorId {
    /// The ARCHITECTURE.md name.
    pub fn name(&self) -> String {
        match *self {
            TensorId::Global(g) => GLOBAL_NAMES[g].to_string(),
            TensorId::Alpha(l) => format!("layers.{l}.alpha_logits"),
            TensorId::Branch(l, i, t) => format!("layers.{l}.branches.{i}.{}", BRANCH_TENSORS[t].0),
        }
    }

    /// Shape (`[in, out]` for matrices) given the layer width `k` for `Alpha`.
    pub fn shape(&self, cfg: &ModelConfig, k: usize) -> Vec<usize> {
        match *self {
            TensorId::Global(g) => global_shapes(cfg)[g].2.clone(),
            TensorId::Alpha(_) => vec![k],
            TensorId::Branch(_, _, t) => branch_shape(t, cfg.d_model),
        }
    }

    /// Whether weight decay applies (2-D tensors).
    pub fn is_matrix(&self) -> bool {
        match *self {
            TensorId::Global(g) => matches!(g, 0 | 1 | 4 | 7),
            TensorId::Alpha(_) => false,
            TensorId::Branch(_, _, t) => BRANCH_TENSORS[t].1,
        }
    }
}

impl Params {
    /// Every tensor, in canonical order (globals, then per layer `alpha_logits` and the
    /// branches' tensors); an empty global (`wpe` with rotary positions, `time2vec.*`
    /// without a time embedding) is left out.
    pub fn ids(&self) -> Vec<TensorId> {
        let globals = self.globals();
        let mut out: Vec<TensorId> = (0..GLOBALS)
            .filter(|&g| !globals[g].is_empty())
            .map(TensorId::Global)
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            out.push(TensorId::Alpha(l));
            for i in 0..layer.branches.len() {
                out.extend((0..12).map(|t| TensorId::Branch(l, i, t)));
            }
        }
        out
    }

    /// The tensor `id`.
    pub fn get(&self, id: TensorId) -> &Vec<f32> {
        match id {
            TensorId::Global(g) => self.globals()[g],
            TensorId::Alpha(l) => &self.layers[l].alpha_logits,
            TensorId::Branch(l, i, t) => self.layers[l].branches[i].tensors()[t],
        }
    }

    /// The tensor `id`, mutable.
    pub fn get_mut(&mut self, id: TensorId) -> &mut Vec<f32> {
        match id {
            TensorId::Global(g) => self
                .globals_mut()
                .into_iter()
                .nth(g)
                .expect("global index < GLOBALS"),
            TensorId::Alpha(l) => &mut self.layers[l].alpha_logits,
            TensorId::Branch(l, i, t) => self.layers[l].branches[i]
                .tensors_mut()
                .into_iter()
                .nth(t)
                .expect("branch tensor index < 12"),
        }
    }
}
