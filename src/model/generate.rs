//! Autoregressive generation with a KV cache (batch 1).
//!
//! The prompt is run once through the batched fp32 forward pass (prefill); the keys and
//! values of every computed branch are kept in a cache of `max_seq_len` rows per branch.
//! Each further token is one decode step over the cache. Batch-1 decoding is bound by
//! memory bandwidth (every weight is read once per token), so the decode step reads the
//! matrices as IEEE half precision (converted once when the generation starts;
//! accumulation stays fp32): the next-token logits differ from the
//! fp32 [`Model::logits`] by about 1e-3 relative. The branches of a layer run in
//! parallel, each on one thread; their outputs are summed in branch order. Sampling of the next token from the
//! logits `z`: repetition penalty `ρ` on every token already in the context
//! (`z ← z/ρ` if `z > 0`, else `z·ρ`), then greedy (`temperature = 0`) or
//! `softmax(z/temperature)` restricted to the `top_k` largest (0 = all) and to the
//! smallest set of highest-probability tokens whose mass reaches `top_p`, drawn from a
//! seeded ChaCha8 stream. Generation stops after `max_tokens`, at `end_token` (which is
//! not yielded), or when the context reaches `max_seq_len`.

use super::net::{Model, Workspace};
use super::ops::{dot16, fast_exp, gelu_fwd, layernorm_fwd};
use super::params::BranchParams;
use super::{Batch, Masks, ModelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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

/// Round-to-nearest-even conversion of an `f32` to IEEE half-precision bits.
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1 << shift) - 1);
        let mut h = m >> shift;
        if rem > half || (rem == half && h & 1 == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// IEEE half-precision bits to `f32` (exact).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    if exp == 0 {
        let v = man as f32 * (1.0 / 16_777_216.0);
        return if sign != 0 { -v } else { v };
    }
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// A matrix `W` `[din, dout]` in half precision (same layout as the fp32 tensor).
#[derive(Debug)]
struct Half {
    w: Vec<u16>,
    dout: usize,
}

fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Half {
    fn new(w: &[f32], dout: usize) -> Self {
        let mut h = vec![0u16; w.len()];
        h.par_chunks_mut(1 << 16)
            .zip(w.par_chunks(1 << 16))
            .for_each(|(h, w)| h.iter_mut().zip(w).for_each(|(o, &x)| *o = f32_to_f16(x)));
        Self { w: h, dout }
    }

    /// `y[j] = b[j] + Σ_i W[i, j0 + j]·x[i]` (rows summed in order) for `j < y.len()`.
    fn matvec(&self, y: &mut [f32], x: &[f32], b: Option<&[f32]>, j0: usize) {
        match b {
            Some(b) => y.copy_from_slice(&b[j0..j0 + y.len()]),
            None => y.fill(0.0),
        }
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: the CPU supports the features enabled on the callee (checked above).
            unsafe { matvec_x86(&self.w, self.dout, x, y, j0) };
            return;
        }
        for (i, &xi) in x.iter().enumerate() {
            let row = &self.w[i * self.dout + j0..i * self.dout + j0 + y.len()];
            for (a, &h) in y.iter_mut().zip(row) {
                *a = f16_to_f32(h).mul_add(xi, *a);
            }
        }
    }
}

/// Columns `j0..j0+y.len()` of `x·W` added to `y`: rows are streamed in order, eight at a
/// time, so the weights are read sequentially; every `y[j]` accumulates the rows in order
/// with fused multiply-adds (the same operations as the portable path).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matvec_x86(w: &[u16], dout: usize, x: &[f32], y: &mut [f32], j0: usize) {
    let n = y.len();
    assert!(x.len() * dout <= w.len() && j0 + n <= dout);
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: rows i..i+8 exist and columns j0..j0+n lie inside every row.
        unsafe { rows_x86::<8>(w, dout, &x[i..i + 8], y, i * dout + j0) };
        i += 8;
    }
    while i < x.len() {
        // SAFETY: as above, for one row.
        unsafe { rows_x86::<1>(w, dout, &x[i..i + 1], y, i * dout + j0) };
        i += 1;
    }
}

/// Adds `Σ_r x[r]·W[row r, ·]` for `R` consecutive rows starting at flat offset `off`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `off + (R-1)·dout + y.len() <= w.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_x86<const R: usize>(w: &[u16], dout: usize, x: &[f32], y: &mut [f32], off: usize) {
    use std::arch::x86_64::*;
    let n = y.len();
    let n8 = n / 8 * 8;
    let xv: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(x[r]));
    let wp = w.as_ptr();
    let yp = y.as_mut_ptr();
    let mut j = 0;
    while j < n8 {
        // SAFETY: j + 8 <= n8 <= y.len(); off + r·dout + j + 8 <= w.len() (caller).
        unsafe {
            let mut acc = _mm256_loadu_ps(yp.add(j));
            for (r, xr) in xv.iter().enumerate() {
                let h = _mm_loadu_si128(wp.add(off + r * dout + j) as *const __m128i);
                acc = _mm256_fmadd_ps(_mm256_cvtph_ps(h), *xr, acc);
            }
            _mm256_storeu_ps(yp.add(j), acc);
        }
        j += 8;
    }
    for (jj, o) in y.iter_mut().enumerate().skip(n8) {
        for (r, &xr) in x.iter().enumerate() {
            *o = f16_to_f32(w[off + r * dout + jj]).mul_add(xr, *o);
        }
    }
}

/// Decode state of one computed branch: weights, KV cache, scratch and its output `z`.
#[derive(Debug)]
struct BranchDecode {
    qkv: Half,
    out: Half,
    fc: Half,
    proj: Half,
    k: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    u: Vec<f32>,
    f: Vec<f32>,
    g: Vec<f32>,
    z: Vec<f32>,
    scores: Vec<f32>,
}

impl BranchDecode {
    /// One token through the block: `z = u + gelu(LN2(u)·W1 + b1)·W2 + b2` with
    /// `u = x + Attn(LN1(x))·Wo + bo`, appending this position's key and value.
    fn step(&mut self, bp: &BranchParams, x: &[f32], pos: usize, heads: usize) {
        let d = x.len();
        let hd = d / heads;
        let (mut mu, mut rs) = ([0.0f32], [0.0f32]);
        layernorm_fwd(&mut self.a, &mut mu, &mut rs, x, &bp.ln1_gain, &bp.ln1_bias);
        self.qkv.matvec(&mut self.q, &self.a, Some(&bp.qkv_b), 0);
        self.qkv.matvec(
            &mut self.k[pos * d..(pos + 1) * d],
            &self.a,
            Some(&bp.qkv_b),
            d,
        );
        self.qkv.matvec(
            &mut self.v[pos * d..(pos + 1) * d],
            &self.a,
            Some(&bp.qkv_b),
            2 * d,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        let scores = &mut self.scores[..=pos];
        for h in 0..heads {
            let q = &self.q[h * hd..(h + 1) * hd];
            let mut mx = f32::NEG_INFINITY;
            for (j, sc) in scores.iter_mut().enumerate() {
                *sc = dot16(q, &self.k[j * d + h * hd..j * d + (h + 1) * hd]) * scale;
                mx = mx.max(*sc);
            }
            let mut z = 0.0;
            for sc in scores.iter_mut() {
                *sc = fast_exp(*sc - mx);
                z += *sc;
            }
            let att = &mut self.att[h * hd..(h + 1) * hd];
            att.fill(0.0);
            for (j, &w) in scores.iter().enumerate() {
                let w = w / z;
                for (a, &b) in att
                    .iter_mut()
                    .zip(&self.v[j * d + h * hd..j * d + (h + 1) * hd])
                {
                    *a += w * b;
                }
            }
        }
        self.out.matvec(&mut self.u, &self.att, Some(&bp.out_b), 0);
        for (a, &b) in self.u.iter_mut().zip(x) {
            *a += b;
        }
        layernorm_fwd(
            &mut self.a,
            &mut mu,
            &mut rs,
            &self.u,
            &bp.ln2_gain,
            &bp.ln2_bias,
        );
        self.fc.matvec(&mut self.f, &self.a, Some(&bp.fc_b), 0);
        gelu_fwd(&mut self.g, &self.f);
        self.proj.matvec(&mut self.z, &self.g, Some(&bp.proj_b), 0);
        for (a, &b) in self.z.iter_mut().zip(&self.u) {
            *a += b;
        }
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
    seen: Vec<bool>,
}

/// A running generation: an iterator of token ids (stream them as they come).
#[derive(Debug)]
pub struct Generation<'a> {
    model: &'a Model,
    cfg: GenerateConfig,
    alpha_t: Vec<Vec<f32>>,
    branches: Vec<Vec<Option<BranchDecode>>>,
    head: Half,
    pos: usize,
    logits: Vec<f32>,
    pending: Option<u32>,
    produced: usize,
    done: bool,
    rng: ChaCha8Rng,
    s: Scratch,
}

impl Model {
    /// Starts generating after `prompt` with the branches of `masks` (usually all).
    pub fn generate<'a>(
        &'a self,
        prompt: &[u32],
        masks: &Masks,
        cfg: &GenerateConfig,
    ) -> Result<Generation<'a>, ModelError> {
        cfg.validate().map_err(ModelError::Generate)?;
        if prompt.is_empty() {
            return Err(ModelError::Generate(
                "empty prompt: give at least one token".to_string(),
            ));
        }
        let c = &self.config;
        let batch = Batch {
            batch: 1,
            seq: prompt.len(),
            inputs: prompt.to_vec(),
            targets: vec![0; prompt.len()],
            loss_mask: vec![0.0; prompt.len()],
        };
        let mut ws = Workspace::default();
        self.forward(&mut ws, &batch, masks)?;
        let (d, t_max, p) = (c.d_model, c.max_seq_len, prompt.len());
        let branches = ws
            .layers
            .iter()
            .zip(&self.params.layers)
            .map(|(lw, layer)| {
                lw.branches
                    .iter()
                    .zip(&lw.computed)
                    .zip(&layer.branches)
                    .map(|((bw, &on), bp)| {
                        on.then(|| {
                            let mut st = BranchDecode {
                                qkv: Half::new(&bp.qkv_w, 3 * d),
                                out: Half::new(&bp.out_w, d),
                                fc: Half::new(&bp.fc_w, 4 * d),
                                proj: Half::new(&bp.proj_w, d),
                                k: vec![0.0; t_max * d],
                                v: vec![0.0; t_max * d],
                                a: vec![0.0; d],
                                q: vec![0.0; d],
                                att: vec![0.0; d],
                                u: vec![0.0; d],
                                f: vec![0.0; 4 * d],
                                g: vec![0.0; 4 * d],
                                z: vec![0.0; d],
                                scores: vec![0.0; t_max],
                            };
                            for t in 0..p {
                                let row = &bw.qkv[t * 3 * d..(t + 1) * 3 * d];
                                st.k[t * d..(t + 1) * d].copy_from_slice(&row[d..2 * d]);
                                st.v[t * d..(t + 1) * d].copy_from_slice(&row[2 * d..]);
                            }
                            st
                        })
                    })
                    .collect()
            })
            .collect();
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
            ..Scratch::default()
        };
        for &t in prompt {
            s.seen[t as usize] = true;
        }
        Ok(Generation {
            model: self,
            cfg: cfg.clone(),
            alpha_t,
            branches,
            head: Half::new(&self.params.head_w, v),
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
    /// Logits for the next token (after the last yielded token has been fed).
    pub fn next_logits(&mut self) -> &[f32] {
        if let Some(t) = self.pending.take() {
            self.decode(t);
        }
        &self.logits
    }

    /// Tokens in the context (prompt plus fed tokens).
    pub fn context_len(&self) -> usize {
        self.pos
    }

    /// One decode step: feeds token `tok` at position `pos`, sets the next logits.
    fn decode(&mut self, tok: u32) {
        let m = self.model;
        let c = &m.config;
        let (d, heads) = (c.d_model, c.n_heads);
        let pos = self.pos;
        let p = &m.params;
        let s = &mut self.s;
        for j in 0..d {
            s.x[j] = p.wte[tok as usize * d + j] + p.wpe[pos * d + j];
        }
        for (l, layer) in p.layers.iter().enumerate() {
            let x = &s.x;
            self.branches[l]
                .par_iter_mut()
                .zip(layer.branches.par_iter())
                .for_each(|(st, bp)| {
                    if let Some(st) = st {
                        st.step(bp, x, pos, heads);
                    }
                });
            s.out.fill(0.0);
            for (i, st) in self.branches[l].iter().enumerate() {
                if let Some(st) = st {
                    let w = self.alpha_t[l][i];
                    for (o, &z) in s.out.iter_mut().zip(&st.z) {
                        *o += w * z;
                    }
                }
            }
            std::mem::swap(&mut s.x, &mut s.out);
        }
        let (mut mu, mut rs) = ([0.0f32], [0.0f32]);
        layernorm_fwd(&mut s.a, &mut mu, &mut rs, &s.x, &p.lnf_gain, &p.lnf_bias);
        let (head, a) = (&self.head, &s.a);
        self.logits
            .par_chunks_mut(512)
            .enumerate()
            .for_each(|(c, y)| head.matvec(y, a, None, c * 512));
        self.pos += 1;
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
        let mut weights: Vec<f64> = s.order[..keep]
            .iter()
            .map(|&i| ((z[i as usize] - mx) / cfg.temperature).exp() as f64)
            .collect();
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
            if self.pos >= self.model.config.max_seq_len {
                self.done = true;
                return None;
            }
            self.decode(t);
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
    use crate::model::net::tests::tiny_config;

    #[test]
    fn kv_cache_decode_matches_full_forward() {
        let cfg = tiny_config();
        let mut model = Model::new(cfg.clone(), 3).unwrap();
        model.expand(0, 1, 0.05, 1).unwrap();
        model.set_eta(0, 0.3).unwrap();
        let masks = vec![vec![true, false, true, true], vec![true, true, false]];
        let g = GenerateConfig {
            max_tokens: 3,
            temperature: 0.0,
            ..GenerateConfig::default()
        };
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
            let b = Batch {
                batch: 1,
                seq: ctx.len(),
                inputs: ctx.clone(),
                targets: vec![0; ctx.len()],
                loss_mask: vec![0.0; ctx.len()],
            };
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

    #[test]
    fn half_precision_conversion() {
        for h in 0u16..=0xffff {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f32_to_f16(x) & 0x7c00 == 0x7c00 && f32_to_f16(x) & 0x3ff != 0);
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#x} -> {x}");
            }
        }
        assert_eq!(f32_to_f16(1.0 + 1.0 / 4096.0), 0x3c00, "ties to even");
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        assert_eq!(f32_to_f16(1e-9), 0);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..10000 {
            let x: f32 = rng.random_range(-10.0..10.0);
            let r = f16_to_f32(f32_to_f16(x));
            assert!(
                (r - x).abs() <= x.abs() * (1.0 / 2048.0) + 1e-7,
                "{x} -> {r}"
            );
        }
        let (din, dout) = (5, 150);
        let w: Vec<f32> = (0..din * dout).map(|i| (i as f32 * 0.013).sin()).collect();
        let x: Vec<f32> = (0..din).map(|i| (i as f32 * 0.37).cos()).collect();
        let b: Vec<f32> = (0..dout).map(|j| j as f32 * 0.001).collect();
        let half = Half::new(&w, dout);
        let mut y = vec![f32::NAN; 140];
        half.matvec(&mut y, &x, Some(&b), 7);
        for (jj, &got) in y.iter().enumerate() {
            let j = jj + 7;
            let want: f32 = b[j]
                + (0..din)
                    .map(|i| f16_to_f32(half.w[i * dout + j]) * x[i])
                    .sum::<f32>();
            assert!((got - want).abs() < 1e-5, "column {j}: {got} vs {want}");
        }
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
