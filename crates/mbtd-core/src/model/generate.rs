//! Autoregressive generation with a KV cache (batch 1).
//!
//! The prompt is run once through the batched fp32 forward pass (prefill); the keys and
//! values of every computed branch are kept in a cache of `max_seq_len` rows per branch.
//! Each further token is one decode step over the cache. Batch-1 decoding is bound by
//! memory bandwidth (every weight is read once per token), so the decode step reads the
//! matrices as IEEE half precision in column panels ([`HalfPanels`], converted once when
//! the generation starts; accumulation stays fp32): the next-token logits differ from the
//! fp32 [`Model::logits`] by about 1e-3 relative. The branches of a layer run in
//! parallel, each on one thread; their outputs are summed in branch order. Sampling of the next token from the
//! logits `z`: repetition penalty `ρ` on every token already in the context
//! (`z ← z/ρ` if `z > 0`, else `z·ρ`), then greedy (`temperature = 0`) or
//! `softmax(z/temperature)` restricted to the `top_k` largest (0 = all) and to the
//! smallest set of highest-probability tokens whose mass reaches `top_p`, drawn from a
//! seeded ChaCha8 stream. Generation stops after `max_tokens`, at `end_token` (which is
//! not yielded), or, with learned positions, when the context reaches `max_seq_len`.
//!
//! With rotary positions (`model.positions = "rope"`) the cache is a ring of the last
//! `max_seq_len` keys and values: position `p` is written to row `p mod max_seq_len`, each
//! key rotated at its absolute position, and a query attends to the rows present. The
//! scores depend only on query–key offsets, so generation runs past `max_seq_len` with a
//! sliding window of that many tokens (the prompt itself must fit in `max_seq_len`).
//!
//! With a time embedding (`model.time_embedding = "time2vec"`), every position of the
//! prompt and of the reply gets the embedding of [`GenerateConfig::as_of_ms`] (the model
//! is asked "as of" that time), or nothing when it is `None`.
//!
//! Branches may be computed away from this process ([`AwayBranches`]: on branch hosts,
//! see `remote::generation`), each keeping its own cache there. A branch whose output
//! cannot be had at some position is masked from that position to the end of the
//! generation: its bit of the layer's mask cleared and `α̃` renormalised over the rest
//! (`agg::renormalise`, the availability maths), recorded as a [`LostBranch`]. A layer
//! left with no weighted branch ends the generation with an error
//! ([`Generation::error`]).

use super::agg;
use super::decode::BranchDecode;
use super::half::{HalfPanels, PANEL};
use super::net::{Model, Workspace};
use super::ops::layernorm_fwd;
use super::ops::rope::rope_angles;
use super::ops::time2vec::{tau_of_ms, time2vec_row};
use super::{Batch, Masks, ModelError, Positions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Panels of the output head per parallel task of a decode step.
const HEAD_PANELS: usize = 8;

/// Sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Most tokens to produce.
    pub max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Nucleus mass in `(0, 1]` (1 = no limit).
    pub top_p: f32,
    /// Repetition penalty `>= 1` (1 = none).
    pub repetition_penalty: f32,
    /// Seed of the sampling stream.
    pub seed: u64,
    /// Stop when this token is drawn (it is not yielded).
    pub end_token: Option<u32>,
    /// The time the prompt and the reply are from, in milliseconds since the Unix epoch
    /// (used by a time embedding; `None`: unknown, the embedding adds nothing).
    pub as_of_ms: Option<i64>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            end_token: None,
            as_of_ms: None,
        }
    }
}

impl GenerateConfig {
    /// Checks every field; the error names the field and its allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "generate.temperature = {}: must be >= 0 (0 = greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "generate.top_p = {}: must be in (0, 1]",
                self.top_p
            ));
        }
        if !(self.repetition_penalty >= 1.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "generate.repetition_penalty = {}: must be >= 1",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Sampling buffers.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    out: Vec<f32>,
    a: Vec<f32>,
    probs: Vec<f32>,
    order: Vec<u32>,
    weights: Vec<f64>,
    seen: Vec<bool>,
    /// Rotary cosines and sines of the position being decoded.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The time embedding every decoded token gets (`[d]`; empty without one).
    time: Vec<f32>,
}

/// Where one branch's decode step runs during a generation.
#[derive(Debug)]
enum Slot {
    /// Not computed: masked, of zero weight, or lost during the generation.
    Off,
    /// In this process.
    Here(Box<BranchDecode>),
    /// Away ([`AwayBranches`]), with its output of the last decode step.
    Away(Vec<f32>),
}

/// Branches of a generation computed outside this process, each with its own cache.
pub(crate) trait AwayBranches {
    /// Whether branch `i` of layer `l` is computed away (when it is computed at all).
    fn is_away(&self, l: usize, i: usize) -> bool;

    /// The prefill: [`Model::forward`] of the prompt's one-window `batch`, the away
    /// branches opening their caches. Returns the branches masked because their output
    /// could not be had, with why (the workspace's masks and `α̃` already exclude them).
    fn prefill(
        &mut self,
        model: &Model,
        ws: &mut Workspace,
        batch: &Batch,
        masks: &Masks,
    ) -> Result<Vec<(usize, usize, String)>, ModelError>;

    /// The outputs (`[d]` each) of the away branches `want` (ascending) of layer `l` for
    /// its input row `x` at position `pos`, in `want`'s order; `Err(why)` for each one
    /// whose output cannot be had.
    fn decode(
        &mut self,
        l: usize,
        x: &[f32],
        pos: usize,
        want: &[usize],
    ) -> Vec<Result<Vec<f32>, String>>;
}

/// A branch masked during a generation because its output could not be had.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LostBranch {
    /// Layer index.
    pub layer: usize,
    /// Branch index.
    pub branch: usize,
    /// First context position computed without it (0: the whole generation).
    pub position: usize,
    /// What went wrong.
    pub why: String,
}

/// A running generation: an iterator of token ids (stream them as they come).
pub struct Generation<'a> {
    model: &'a Model,
    cfg: GenerateConfig,
    /// Per layer: unmasked weights `α`, the mask, and `α̃ = renormalise(α, mask)`.
    alpha: Vec<Vec<f32>>,
    mask: Vec<Vec<bool>>,
    alpha_t: Vec<Vec<f32>>,
    branches: Vec<Vec<Slot>>,
    away: Option<Box<dyn AwayBranches + 'a>>,
    lost: Vec<LostBranch>,
    error: Option<ModelError>,
    head: HalfPanels,
    pos: usize,
    logits: Vec<f32>,
    pending: Option<u32>,
    produced: usize,
    done: bool,
    rng: ChaCha8Rng,
    s: Scratch,
}

impl std::fmt::Debug for Generation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("cfg", &self.cfg)
            .field("pos", &self.pos)
            .field("alpha_t", &self.alpha_t)
            .field("lost", &self.lost)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Starts generating after `prompt` with the branches of `masks` (usually all).
    pub fn generate<'a>(
        &'a self,
        prompt: &[u32],
        masks: &Masks,
        cfg: &GenerateConfig,
    ) -> Result<Generation<'a>, ModelError> {
        self.generate_via(prompt, masks, cfg, None)
    }

    /// [`Model::generate`] with some branches computed by `away` (their weights in this
    /// model are not read).
    pub(crate) fn generate_via<'a>(
        &'a self,
        prompt: &[u32],
        masks: &Masks,
        cfg: &GenerateConfig,
        mut away: Option<Box<dyn AwayBranches + 'a>>,
    ) -> Result<Generation<'a>, ModelError> {
        cfg.validate().map_err(ModelError::Generate)?;
        if prompt.is_empty() {
            return Err(ModelError::Generate(
                "empty prompt: give at least one token".to_string(),
            ));
        }
        let c = &self.config;
        let tau = cfg.as_of_ms.map_or(f32::NAN, tau_of_ms);
        let batch = Batch {
            batch: 1,
            seq: prompt.len(),
            inputs: prompt.to_vec(),
            targets: vec![0; prompt.len()],
            loss_mask: vec![0.0; prompt.len()],
            segments: None,
            times: Some(vec![tau; prompt.len()]),
        };
        let mut ws = Workspace::default();
        let lost = match away.as_deref_mut() {
            Some(a) => a.prefill(self, &mut ws, &batch, masks)?,
            None => {
                self.forward(&mut ws, &batch, masks)?;
                Vec::new()
            }
        };
        let lost = lost
            .into_iter()
            .map(|(layer, branch, why)| LostBranch {
                layer,
                branch,
                position: 0,
                why,
            })
            .collect();
        let (d, t_max, p) = (c.d_model, c.max_seq_len, prompt.len());
        let branches = ws
            .layers
            .iter()
            .zip(&self.params.layers)
            .enumerate()
            .map(|(l, (lw, layer))| {
                lw.branches
                    .iter()
                    .zip(&lw.computed)
                    .zip(&layer.branches)
                    .enumerate()
                    .map(|(i, ((bw, &on), bp))| match on {
                        false => Slot::Off,
                        true if away.as_deref().is_some_and(|a| a.is_away(l, i)) => {
                            Slot::Away(vec![0.0; d])
                        }
                        true => Slot::Here(Box::new(BranchDecode::new(bp, d, t_max, &bw.qkv, p))),
                    })
                    .collect()
            })
            .collect();
        let alpha = ws.layers.iter().map(|lw| lw.alpha.clone()).collect();
        let mask = ws.layers.iter().map(|lw| lw.mask.clone()).collect();
        let alpha_t = (0..c.n_layers)
            .map(|l| ws.alpha_tilde(l).to_vec())
            .collect();
        let v = c.vocab_size;
        let logits = ws.logits()[(p - 1) * v..p * v].to_vec();
        let mut s = Scratch {
            seen: vec![false; v],
            x: vec![0.0; d],
            out: vec![0.0; d],
            a: vec![0.0; d],
            cos: vec![0.0; c.head_dim() / 2],
            sin: vec![0.0; c.head_dim() / 2],
            ..Scratch::default()
        };
        let pr = &self.params;
        if !pr.t2v_w.is_empty() {
            s.time = vec![0.0; d];
            time2vec_row(&mut s.time, &pr.t2v_w, &pr.t2v_b, &pr.t2v_proj, tau);
        }
        for &t in prompt {
            s.seen[t as usize] = true;
        }
        Ok(Generation {
            model: self,
            cfg: cfg.clone(),
            alpha,
            mask,
            alpha_t,
            branches,
            away,
            lost,
            error: None,
            head: HalfPanels::new(&self.params.head_w, d, v),
            pos: p,
            logits,
            pending: None,
            produced: 0,
            done: false,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            s,
        })
    }
}

impl Generation<'_> {
    /// Logits for the next token (after the last yielded token has been fed); after a
    /// failed decode step ([`Generation::error`]), the last logits computed.
    pub fn next_logits(&mut self) -> &[f32] {
        if let Some(t) = self.pending.take() {
            self.feed(t);
        }
        &self.logits
    }

    /// Tokens in the context (prompt plus fed tokens).
    pub fn context_len(&self) -> usize {
        self.pos
    }

    /// The branches masked during the generation because their output could not be had.
    pub fn lost(&self) -> &[LostBranch] {
        &self.lost
    }

    /// Why the generation ended early: a layer was left without a weighted branch.
    pub fn error(&self) -> Option<&ModelError> {
        self.error.as_ref()
    }

    /// Masks branch `i` of layer `l` from the next position on: `α̃` of the layer is
    /// renormalised over the branches left. An error when no weighted branch is left.
    pub(crate) fn mask_branch(&mut self, l: usize, i: usize) -> Result<(), ModelError> {
        self.branches[l][i] = Slot::Off;
        self.mask[l][i] = false;
        agg::renormalise(&mut self.alpha_t[l], &self.alpha[l], &self.mask[l]);
        let left = (self.branches[l].iter().zip(&self.alpha_t[l]))
            .any(|(s, &a)| !matches!(s, Slot::Off) && a > 0.0);
        if left {
            return Ok(());
        }
        let lost: Vec<(usize, usize)> = self.lost.iter().map(|b| (b.layer, b.branch)).collect();
        Err(ModelError::Generate(format!(
            "layer {l} has no branch left at position {} (lost: {lost:?}); check that the branch hosts are up and generate again",
            self.pos
        )))
    }

    /// [`Generation::decode`], a failure ending the generation.
    fn feed(&mut self, tok: u32) {
        if let Err(e) = self.decode(tok) {
            self.error = Some(e);
            self.done = true;
        }
    }

    /// One decode step: feeds token `tok` at position `pos`, sets the next logits.
    fn decode(&mut self, tok: u32) -> Result<(), ModelError> {
        let m = self.model;
        let c = &m.config;
        let (d, heads) = (c.d_model, c.n_heads);
        let pos = self.pos;
        let p = &m.params;
        let rope = c.positions == Positions::Rope;
        let s = &mut self.s;
        if rope {
            s.x.copy_from_slice(&p.wte[tok as usize * d..(tok as usize + 1) * d]);
            rope_angles(&mut s.cos, &mut s.sin, pos, c.head_dim());
        } else {
            for j in 0..d {
                s.x[j] = p.wte[tok as usize * d + j] + p.wpe[pos * d + j];
            }
        }
        for (x, &t) in s.x.iter_mut().zip(&s.time) {
            *x += t;
        }
        for (l, layer) in p.layers.iter().enumerate() {
            let want: Vec<usize> = (0..self.branches[l].len())
                .filter(|&i| matches!(self.branches[l][i], Slot::Away(_)))
                .collect();
            let s = &self.s;
            let got = match self.away.as_deref_mut() {
                Some(a) if !want.is_empty() => a.decode(l, &s.x, pos, &want),
                _ => Vec::new(),
            };
            let x = &s.x;
            let angles = rope.then_some((s.cos.as_slice(), s.sin.as_slice()));
            self.branches[l]
                .par_iter_mut()
                .zip(layer.branches.par_iter())
                .for_each(|(st, bp)| {
                    if let Slot::Here(st) = st {
                        st.step(bp, x, pos, heads, angles);
                    }
                });
            for (&i, z) in want.iter().zip(got) {
                match z {
                    Ok(z) if z.len() == d => self.branches[l][i] = Slot::Away(z),
                    Ok(z) => self.lose(l, i, format!("{} values, d_model is {d}", z.len()))?,
                    Err(why) => self.lose(l, i, why)?,
                }
            }
            let s = &mut self.s;
            s.out.fill(0.0);
            for (i, slot) in self.branches[l].iter().enumerate() {
                let z = match slot {
                    Slot::Here(st) => st.z(),
                    Slot::Away(z) => z,
                    Slot::Off => continue,
                };
                let w = self.alpha_t[l][i];
                for (o, &z) in s.out.iter_mut().zip(z) {
                    *o += w * z;
                }
            }
            std::mem::swap(&mut s.x, &mut s.out);
        }
        let s = &mut self.s;
        let (mut mu, mut rs) = ([0.0f32], [0.0f32]);
        layernorm_fwd(&mut s.a, &mut mu, &mut rs, &s.x, &p.lnf_gain, &p.lnf_bias);
        let (head, a) = (&self.head, &s.a);
        self.logits
            .par_chunks_mut(HEAD_PANELS * PANEL)
            .enumerate()
            .for_each(|(c, y)| head.matvec(y, a, None, c * HEAD_PANELS));
        self.pos += 1;
        Ok(())
    }

    /// Masks a branch whose output could not be had at this position.
    fn lose(&mut self, l: usize, i: usize, why: String) -> Result<(), ModelError> {
        self.lost.push(LostBranch {
            layer: l,
            branch: i,
            position: self.pos,
            why,
        });
        self.mask_branch(l, i)
    }

    /// Draws the next token from `self.logits`.
    fn sample(&mut self) -> u32 {
        let cfg = &self.cfg;
        let s = &mut self.s;
        s.probs.clear();
        s.probs.extend_from_slice(&self.logits);
        if cfg.repetition_penalty != 1.0 {
            for (z, &seen) in s.probs.iter_mut().zip(&s.seen) {
                if seen {
                    *z = if *z > 0.0 {
                        *z / cfg.repetition_penalty
                    } else {
                        *z * cfg.repetition_penalty
                    };
                }
            }
        }
        let argmax = |z: &[f32]| {
            let mut best = 0;
            for (i, &x) in z.iter().enumerate() {
                if x > z[best] {
                    best = i;
                }
            }
            best as u32
        };
        if cfg.temperature == 0.0 {
            return argmax(&s.probs);
        }
        s.order.clear();
        s.order.extend(0..s.probs.len() as u32);
        let z = &s.probs;
        let by_logit = |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b));
        let keep = if cfg.top_k > 0 && cfg.top_k < s.order.len() {
            s.order.select_nth_unstable_by(cfg.top_k - 1, by_logit);
            s.order[..cfg.top_k].sort_by(by_logit);
            cfg.top_k
        } else {
            if cfg.top_p < 1.0 {
                s.order.sort_by(by_logit);
            }
            s.order.len()
        };
        let mx = s.order[..keep]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &i| m.max(z[i as usize]));
        let weights = &mut s.weights;
        weights.clear();
        weights.extend(
            s.order[..keep]
                .iter()
                .map(|&i| ((z[i as usize] - mx) / cfg.temperature).exp() as f64),
        );
        let total: f64 = weights.iter().sum();
        let mut cum = 0.0;
        let mut n = weights.len();
        for (j, w) in weights.iter().enumerate() {
            cum += w / total;
            if cum >= cfg.top_p as f64 {
                n = j + 1;
                break;
            }
        }
        weights.truncate(n);
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (j, w) in weights.iter().enumerate() {
            if u < *w {
                return s.order[j];
            }
            u -= w;
        }
        s.order[n - 1]
    }
}

impl Iterator for Generation<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.done {
            return None;
        }
        if let Some(t) = self.pending.take() {
            let c = &self.model.config;
            if c.positions == Positions::Learned && self.pos >= c.max_seq_len {
                self.done = true;
                return None;
            }
            self.feed(t);
            if self.done {
                return None;
            }
        }
        if self.produced >= self.cfg.max_tokens {
            self.done = true;
            return None;
        }
        let tok = self.sample();
        if Some(tok) == self.cfg.end_token {
            self.done = true;
            return None;
        }
        self.produced += 1;
        self.s.seen[tok as usize] = true;
        self.pending = Some(tok);
        Some(tok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::model::net::tests::tiny_config;

    /// One window holding `tokens` (no loss), every position at `time` if given:
    /// the full forward pass a decoded position is compared with.
    fn one_window(tokens: &[u32], time: Option<f32>) -> Batch {
        Batch {
            batch: 1,
            seq: tokens.len(),
            inputs: tokens.to_vec(),
            targets: vec![0; tokens.len()],
            loss_mask: vec![0.0; tokens.len()],
            segments: None,
            times: time.map(|t| vec![t; tokens.len()]),
        }
    }

    #[test]
    fn kv_cache_decode_matches_full_forward() {
        decode_matches_full_forward(tiny_config(), None);
    }

    /// With a time embedding, every decoded token gets the `as_of` time's embedding, as
    /// every position of the full forward pass does; a different time changes the logits.
    #[test]
    fn kv_cache_decode_matches_full_forward_with_time2vec() {
        let cfg = ModelConfig {
            time_embedding: crate::model::TimeEmbedding::Time2vec,
            ..tiny_config()
        };
        let as_of = 1_704_067_200_000; // 2024-01-01
        decode_matches_full_forward(cfg.clone(), Some(as_of));
        let mut model = Model::new(cfg, 3).unwrap();
        model.params.t2v_proj.iter_mut().for_each(|x| *x = 0.2);
        let masks = model.all_active();
        let first = |ms: i64| {
            let g = GenerateConfig {
                as_of_ms: Some(ms),
                ..GenerateConfig::default()
            };
            model
                .generate(&[1, 5, 2], &masks, &g)
                .unwrap()
                .next_logits()
                .to_vec()
        };
        assert_ne!(first(as_of), first(1_577_836_800_000));
    }

    fn decode_matches_full_forward(cfg: ModelConfig, as_of_ms: Option<i64>) {
        let mut model = Model::new(cfg.clone(), 3).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for x in model.params.t2v_proj.iter_mut() {
            *x = rng.random_range(-0.3..0.3);
        }
        model.expand(0, 1, 0.05, 1).unwrap();
        model.set_eta(0, 0.3).unwrap();
        let masks = vec![vec![true, false, true, true], vec![true, true, false]];
        let g = GenerateConfig {
            max_tokens: 3,
            temperature: 0.0,
            as_of_ms,
            ..GenerateConfig::default()
        };
        let tau = as_of_ms.map_or(f32::NAN, crate::model::ops::time2vec::tau_of_ms);
        let prompt = [1u32, 5, 2];
        let mut gen_ = model.generate(&prompt, &masks, &g).unwrap();
        let mut ctx = prompt.to_vec();
        let mut ws = Workspace::default();
        for _ in 0..3 {
            // greedy: the yielded token is the argmax of the current next-token logits
            let z = gen_.next_logits().to_vec();
            let best = (0..z.len()).fold(0, |b, i| if z[i] > z[b] { i } else { b }) as u32;
            let tok = gen_.next().unwrap();
            assert_eq!(tok, best);
            ctx.push(tok);
            let dec = gen_.next_logits().to_vec();
            let b = one_window(&ctx, Some(tau));
            let full = model.logits(&mut ws, &b, &masks).unwrap();
            let last = &full[(ctx.len() - 1) * cfg.vocab_size..];
            let scale = last.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (a, b) in dec.iter().zip(last) {
                assert!(
                    (a - b).abs() < 5e-3 * scale,
                    "{a} vs {b} (half-precision weights)"
                );
            }
        }
        assert_eq!(gen_.next(), None);
    }

    /// With rotary positions, a one-layer model's decode at position `p >= T` sees the last
    /// `T` tokens at their offsets from `p`: exactly what a fresh forward pass over those
    /// `T` tokens sees (the layer's keys depend only on token and position). So the ring
    /// cache's next-token logits match the full forward pass over the sliding window.
    #[test]
    fn rope_generation_runs_past_max_seq_len_with_a_sliding_window() {
        let cfg = ModelConfig {
            positions: Positions::Rope,
            n_layers: 1,
            ..tiny_config()
        };
        let t = cfg.max_seq_len;
        let model = Model::new(cfg.clone(), 5).unwrap();
        let masks = model.all_active();
        let g = GenerateConfig {
            max_tokens: 2 * t,
            temperature: 0.0,
            ..GenerateConfig::default()
        };
        let prompt = [3u32, 1];
        let mut gen_ = model.generate(&prompt, &masks, &g).unwrap();
        let mut ctx = prompt.to_vec();
        let mut ws = Workspace::default();
        while let Some(tok) = gen_.next() {
            ctx.push(tok);
            let dec = gen_.next_logits().to_vec();
            let window = &ctx[ctx.len().saturating_sub(t)..];
            let b = one_window(window, None);
            let full = model.logits(&mut ws, &b, &masks).unwrap();
            let last = &full[(window.len() - 1) * cfg.vocab_size..];
            let scale = last.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            for (a, b) in dec.iter().zip(last) {
                assert!(
                    (a - b).abs() < 5e-3 * scale,
                    "position {}: {a} vs {b}",
                    ctx.len() - 1
                );
            }
        }
        assert_eq!(ctx.len(), prompt.len() + 2 * t, "2 × max_seq_len tokens");
        assert_eq!(gen_.context_len(), ctx.len());
        // a deeper model generates as far
        let deep = Model::new(
            ModelConfig {
                positions: Positions::Rope,
                ..tiny_config()
            },
            5,
        )
        .unwrap();
        let n = deep
            .generate(&prompt, &deep.all_active(), &g)
            .unwrap()
            .count();
        assert_eq!(n, 2 * t);
        // learned positions still stop at max_seq_len: 4 fed + 1 drawn
        let learned = Model::new(tiny_config(), 5).unwrap();
        let n = learned
            .generate(&prompt, &learned.all_active(), &g)
            .unwrap()
            .count();
        assert_eq!(n, t - prompt.len() + 1);
    }

    /// In a one-layer model the keys of every branch depend only on the tokens, so masking
    /// a branch at position `p` gives the full forward pass with that branch masked at
    /// `p`: α̃ renormalised over the rest, the other branches' caches unchanged.
    #[test]
    fn a_branch_masked_mid_generation_renormalises_its_layer() {
        let cfg = ModelConfig {
            n_layers: 1,
            ..tiny_config()
        };
        let model = Model::new(cfg.clone(), 6).unwrap();
        let all = model.all_active();
        let g = GenerateConfig {
            max_tokens: 3,
            temperature: 0.0,
            ..GenerateConfig::default()
        };
        let mut gen_ = model.generate(&[2, 4], &all, &g).unwrap();
        let mut ctx = vec![2u32, 4];
        ctx.push(gen_.next().unwrap());
        gen_.mask_branch(0, 1).unwrap();
        let mut masks = all.clone();
        masks[0][1] = false;
        let dec = gen_.next_logits().to_vec();
        let b = one_window(&ctx, None);
        let mut ws = Workspace::default();
        let full = model.logits(&mut ws, &b, &masks).unwrap();
        assert_eq!(gen_.alpha_t[0], ws.alpha_tilde(0), "α̃ renormalised");
        let last = &full[(ctx.len() - 1) * cfg.vocab_size..];
        let scale = last.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for (a, b) in dec.iter().zip(last) {
            assert!((a - b).abs() < 5e-3 * scale, "{a} vs {b}");
        }
        let unmasked = model.logits(&mut ws, &b, &all).unwrap();
        let far = last
            .iter()
            .zip(&unmasked[(ctx.len() - 1) * cfg.vocab_size..]);
        assert!(far.map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) > 2e-2 * scale);
        // masking every branch left is an error naming the layer
        gen_.mask_branch(0, 0).unwrap();
        let e = gen_.mask_branch(0, 2).unwrap_err();
        assert!(e.to_string().contains("layer 0 has no branch left"), "{e}");
    }

    #[test]
    fn sampling_is_seeded_and_respects_limits() {
        let cfg = tiny_config();
        let model = Model::new(cfg.clone(), 4).unwrap();
        let masks = model.all_active();
        let g = GenerateConfig {
            max_tokens: 10,
            temperature: 1.5,
            top_k: 3,
            top_p: 0.9,
            seed: 7,
            ..GenerateConfig::default()
        };
        let a: Vec<u32> = model.generate(&[1, 2], &masks, &g).unwrap().collect();
        let b: Vec<u32> = model.generate(&[1, 2], &masks, &g).unwrap().collect();
        assert_eq!(a, b);
        // the context limit (max_seq_len 6, prompt 2) stops after 4 fed + 1 drawn token
        assert_eq!(a.len(), 5);
        let greedy = GenerateConfig {
            temperature: 0.0,
            top_k: 1,
            ..g.clone()
        };
        let mut first = model.generate(&[1, 2], &masks, &greedy).unwrap();
        let expected = {
            let z = first.next_logits().to_vec();
            (0..z.len()).fold(0, |b, i| if z[i] > z[b] { i } else { b }) as u32
        };
        assert_eq!(first.next(), Some(expected));
        let stop = GenerateConfig {
            end_token: Some(expected),
            ..greedy
        };
        assert_eq!(model.generate(&[1, 2], &masks, &stop).unwrap().count(), 0);
        assert!(model.generate(&[], &masks, &g).is_err());
        assert!(GenerateConfig { top_p: 0.0, ..g }.validate().is_err());
    }
}
