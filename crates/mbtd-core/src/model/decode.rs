//! One branch's decode step of a generation ([`BranchDecode`]): the weights as IEEE half
//! panels, the key/value cache of `max_seq_len` rows (a ring with rotary positions) and
//! the scratch of one position. The single-process generation (`model::generate`) keeps
//! one per computed branch; a branch host keeps one per branch of a generation session
//! (`model::remote::sessions`), so both compute each position with the same arithmetic.

use super::half::HalfPanels;
use super::ops::rope::rope_row;
use super::ops::{dot16, fast_exp, gelu_fwd, layernorm_fwd, max16, simd, sum16};
use super::params::BranchParams;

/// Decode state of one computed branch: weights, KV cache, scratch and its output `z`
/// (one per branch of a generation, here or on a branch host).
#[derive(Debug)]
pub(crate) struct BranchDecode {
    qkv: HalfPanels,
    out: HalfPanels,
    fc: HalfPanels,
    proj: HalfPanels,
    /// This position's `q | k | v` row.
    qkv_row: Vec<f32>,
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
    /// The decode state of a branch with weights `bp` after a prefill of `p` positions
    /// whose `q | k | v` rows are `qkv`: the matrices as half-precision panels, and the
    /// keys and values of positions `0..p` in a cache of `t_max` rows.
    ///
    /// # Shapes
    /// `qkv`: at least `[p, 3d]` with `p <= t_max`.
    pub(crate) fn new(bp: &BranchParams, d: usize, t_max: usize, qkv: &[f32], p: usize) -> Self {
        let mut st = BranchDecode {
            qkv: HalfPanels::new(&bp.qkv_w, d, 3 * d),
            out: HalfPanels::new(&bp.out_w, d, d),
            fc: HalfPanels::new(&bp.fc_w, d, 4 * d),
            proj: HalfPanels::new(&bp.proj_w, 4 * d, d),
            qkv_row: vec![0.0; 3 * d],
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
            let row = &qkv[t * 3 * d..(t + 1) * 3 * d];
            st.k[t * d..(t + 1) * d].copy_from_slice(&row[d..2 * d]);
            st.v[t * d..(t + 1) * d].copy_from_slice(&row[2 * d..]);
        }
        st
    }

    /// The output `z` (`[d]`) of the last [`BranchDecode::step`].
    pub(crate) fn z(&self) -> &[f32] {
        &self.z
    }

    /// Attention of this position's query over the first `keys` cached rows, per head:
    /// `att = Σ_j softmax(q·k_j/√hd)_j · v_j` (exponentials summed in 16 fixed lanes, the
    /// weighted sum normalised once at the end). Compiled for AVX2 where the CPU has it.
    fn attend(&mut self, keys: usize, heads: usize) {
        let d = self.q.len();
        let hd = d / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let scores = &mut self.scores[..keys];
        let (q, k, v) = (&self.q, &self.k, &self.v);
        simd(
            #[inline(always)]
            || {
                for (h, att) in self.att.chunks_exact_mut(hd).enumerate() {
                    let q = &q[h * hd..(h + 1) * hd];
                    for (sc, key) in scores.iter_mut().zip(k.chunks_exact(d)) {
                        *sc = dot16(q, &key[h * hd..(h + 1) * hd]) * scale;
                    }
                    let mx = max16(scores);
                    for sc in scores.iter_mut() {
                        *sc = fast_exp(*sc - mx);
                    }
                    let inv = 1.0 / sum16(scores);
                    att.fill(0.0);
                    for (&w, value) in scores.iter().zip(v.chunks_exact(d)) {
                        for (a, &b) in att.iter_mut().zip(&value[h * hd..(h + 1) * hd]) {
                            *a += w * b;
                        }
                    }
                    for a in att.iter_mut() {
                        *a *= inv;
                    }
                }
            },
        );
    }

    /// One token through the block: `z = u + gelu(LN2(u)·W1 + b1)·W2 + b2` with
    /// `u = x + Attn(LN1(x))·Wo + bo`, writing this position's key and value to cache row
    /// `pos mod rows` (rotated by `rope`'s cosines and sines when given).
    pub(crate) fn step(
        &mut self,
        bp: &BranchParams,
        x: &[f32],
        pos: usize,
        heads: usize,
        rope: Option<(&[f32], &[f32])>,
    ) {
        let d = x.len();
        let rows = self.k.len() / d;
        let (mut mu, mut rs) = ([0.0f32], [0.0f32]);
        layernorm_fwd(&mut self.a, &mut mu, &mut rs, x, &bp.ln1_gain, &bp.ln1_bias);
        self.qkv
            .matvec(&mut self.qkv_row, &self.a, Some(&bp.qkv_b), 0);
        if let Some((cos, sin)) = rope {
            rope_row(&mut self.qkv_row[..2 * d], d / heads, cos, sin, 1.0);
        }
        let slot = pos % rows;
        self.q.copy_from_slice(&self.qkv_row[..d]);
        self.k[slot * d..(slot + 1) * d].copy_from_slice(&self.qkv_row[d..2 * d]);
        self.v[slot * d..(slot + 1) * d].copy_from_slice(&self.qkv_row[2 * d..]);
        self.attend((pos + 1).min(rows), heads);
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
