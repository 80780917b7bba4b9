//! Time2Vec embedding of a row's arrival time, added at the input (`model.time_embedding =
//! "time2vec"`).
//!
//! With `τ` the row's time in decades since 2000-01-01T00:00:00Z ([`tau_of_ms`]) and `k`
//! periodic features (`model.time_features`):
//!
//! ```text
//! f_0(τ) = w_0·τ + b_0
//! f_j(τ) = sin(w_j·τ + b_j)                 j = 1 ..= k
//! x[n]  += f(τ_n) · P                       P: [k+1, d]
//! ```
//!
//! at every position `n` of the row (each segment of a packed window has its own row's
//! `τ`). A position whose time is unknown (`τ` NaN: a row from a store written before rows
//! carried a time, padding, a prompt generated without a time) gets nothing added.
//!
//! Backward, with `g = ∂L/∂x`: `∂L/∂P = Σ_n f(τ_n)ᵀ g[n]`, `df_n = P·g[n]` (`[k+1]`),
//! `∂L/∂w_0 = Σ_n df_n0·τ_n`, `∂L/∂b_0 = Σ_n df_n0`, and for `j ≥ 1`
//! `∂L/∂w_j = Σ_n df_nj·cos(w_j τ_n + b_j)·τ_n`, `∂L/∂b_j = Σ_n df_nj·cos(w_j τ_n + b_j)`.
//! Sums run over positions in order on one thread, so the result does not depend on the
//! thread count.
//!
//! The unit keeps the sine arguments sane: every date from 1950 to 2050 has `|τ| ≤ 5`, so
//! with `w ~ N(0, 1)` at initialisation the arguments stay within a few radians, where f32
//! `sin` is accurate, while dates a year apart still differ by `Δτ = 0.1`. (Milliseconds
//! since the Unix epoch would give arguments near 10¹², where f32 cannot tell two days
//! apart.) `P` starts at zero, so a new model computes exactly what it would without the
//! embedding and learns to use time from there.
//!
//! # Shapes
//! `times`: `[N]` (`N = B·T`), `w`, `b`: `[k+1]`, `proj`: `[k+1, d]`, `feats`: `[N, k+1]`,
//! `x`, `dx`: `[N, d]`.

use super::profile;

/// Milliseconds in ten Julian years (3,652.5 days): the unit of `τ`.
const MS_PER_DECADE: f64 = 3_652.5 * 86_400_000.0;
/// 2000-01-01T00:00:00Z in milliseconds since the Unix epoch.
const EPOCH_2000_MS: i64 = 946_684_800_000;

/// `τ` of a time in milliseconds since the Unix epoch: decades since 2000-01-01T00:00Z.
///
/// ```
/// use mbtd_core::model::ops::time2vec::tau_of_ms;
/// assert_eq!(tau_of_ms(946_684_800_000), 0.0); // 2000-01-01
/// assert!((tau_of_ms(1_577_836_800_000) - 2.0).abs() < 1e-3); // 2020-01-01
/// ```
pub fn tau_of_ms(ms: i64) -> f32 {
    ((ms - EPOCH_2000_MS) as f64 / MS_PER_DECADE) as f32
}

/// The learned tensors of the embedding: `w`, `b` (`[k+1]`) and the projection `P`
/// (`[k+1, d]`).
#[derive(Clone, Copy, Debug)]
pub struct Time2Vec<'a> {
    pub w: &'a [f32],
    pub b: &'a [f32],
    pub proj: &'a [f32],
}

/// The `k + 1` features `f(τ)` into `out` (see the module doc).
fn features(out: &mut [f32], w: &[f32], b: &[f32], tau: f32) {
    out[0] = w[0] * tau + b[0];
    for j in 1..out.len() {
        out[j] = (w[j] * tau + b[j]).sin();
    }
}

/// Forward: `x[n] += f(τ_n)·P` for every position with a known time; `feats` keeps
/// `f(τ_n)` for the backward pass (zeros where the time is unknown).
///
/// ```
/// use mbtd_core::model::ops::time2vec::{Time2Vec, time2vec_fwd};
///
/// // k = 1, d = 2: f = [w0·τ + b0, sin(w1·τ + b1)]
/// let (w, b) = ([2.0, 0.0], [1.0, 0.0]);
/// let proj = [1.0, 0.0, 0.0, 1.0]; // identity [2, 2]
/// let mut x = [10.0f32; 4];
/// let mut feats = [0.0f32; 4];
/// let t2v = Time2Vec { w: &w, b: &b, proj: &proj };
/// time2vec_fwd(&mut x, &mut feats, &[0.5, f32::NAN], t2v, 2);
/// assert_eq!(x, [12.0, 10.0, 10.0, 10.0]); // 2·0.5 + 1 = 2, sin(0) = 0; NaN adds nothing
/// ```
pub fn time2vec_fwd(x: &mut [f32], feats: &mut [f32], times: &[f32], t2v: Time2Vec, d: usize) {
    let _prof = profile::scope(profile::ELEM);
    let Time2Vec { w, b, proj } = t2v;
    let k1 = w.len();
    for ((row, f), &tau) in x
        .chunks_exact_mut(d)
        .zip(feats.chunks_exact_mut(k1))
        .zip(times)
    {
        if tau.is_nan() {
            f.fill(0.0);
            continue;
        }
        features(f, w, b, tau);
        for (&fj, pj) in f.iter().zip(proj.chunks_exact(d)) {
            for (o, &p) in row.iter_mut().zip(pj) {
                *o += fj * p;
            }
        }
    }
}

/// The vector `f(τ)·P` (`[d]`) a position of time `τ` gets (zeros for NaN): what
/// generation adds to every decoded token.
pub fn time2vec_row(out: &mut [f32], w: &[f32], b: &[f32], proj: &[f32], tau: f32) {
    out.fill(0.0);
    if tau.is_nan() || w.is_empty() {
        return;
    }
    let mut f = vec![0.0; w.len()];
    time2vec_fwd(out, &mut f, &[tau], Time2Vec { w, b, proj }, out.len());
}

/// Backward (see the module doc): overwrites `dw`, `db` and `dproj` (`grads`, in that
/// order) from `dx`, the features `feats` of the forward pass and the times.
pub(crate) fn time2vec_bwd(
    grads: [&mut [f32]; 3],
    dx: &[f32],
    feats: &[f32],
    t2v: Time2Vec,
    times: &[f32],
    d: usize,
) {
    let _prof = profile::scope(profile::ELEM);
    let [dw, db, dproj] = grads;
    let Time2Vec { w, b, proj } = t2v;
    let k1 = w.len();
    dw.fill(0.0);
    db.fill(0.0);
    dproj.fill(0.0);
    let mut df = vec![0.0f32; k1];
    for ((g, f), &tau) in dx.chunks_exact(d).zip(feats.chunks_exact(k1)).zip(times) {
        if tau.is_nan() {
            continue;
        }
        for ((dfj, &fj), (pj, dpj)) in df
            .iter_mut()
            .zip(f)
            .zip(proj.chunks_exact(d).zip(dproj.chunks_exact_mut(d)))
        {
            let mut s = 0.0f32;
            for ((&gc, &pc), dp) in g.iter().zip(pj).zip(dpj.iter_mut()) {
                s += gc * pc;
                *dp += fj * gc;
            }
            *dfj = s;
        }
        dw[0] += df[0] * tau;
        db[0] += df[0];
        for j in 1..k1 {
            let c = (w[j] * tau + b[j]).cos();
            dw[j] += df[j] * c * tau;
            db[j] += df[j] * c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{fd, randv, rel_err, weighted};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Finite differences of `Σ x·G` (with `x = x_in + t2v`) against the analytic gradient
    /// for `w`, `b` and `P`, over rows of known and unknown time.
    #[test]
    fn time2vec_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(20);
        let (k1, d, n) = (5, 4, 6);
        let mut w = randv(&mut rng, k1, 1.5);
        let mut b = randv(&mut rng, k1, 1.0);
        let mut proj = randv(&mut rng, k1 * d, 1.0);
        let times = [2.0, 2.4, f32::NAN, -1.3, 0.7, 2.4];
        let x_in = randv(&mut rng, n * d, 1.0);
        let g = randv(&mut rng, n * d, 1.0);
        let objective = |w: &[f32], b: &[f32], proj: &[f32]| {
            let mut x = x_in.clone();
            let mut f = vec![0.0; n * k1];
            time2vec_fwd(&mut x, &mut f, &times, Time2Vec { w, b, proj }, d);
            weighted(&x, &g)
        };
        let mut x = x_in.clone();
        let mut feats = vec![0.0; n * k1];
        let t2v = Time2Vec {
            w: &w,
            b: &b,
            proj: &proj,
        };
        time2vec_fwd(&mut x, &mut feats, &times, t2v, d);
        assert_eq!(
            x[2 * d..3 * d],
            x_in[2 * d..3 * d],
            "unknown time adds nothing"
        );
        let (mut dw, mut db, mut dp) = (vec![9.0; k1], vec![9.0; k1], vec![9.0; k1 * d]);
        time2vec_bwd([&mut dw, &mut db, &mut dp], &g, &feats, t2v, &times, d);
        let h = 1e-2;
        let all = |len: usize| (0..len).collect::<Vec<_>>();
        let (b0, p0) = (b.clone(), proj.clone());
        let nw = fd(&mut w, &all(k1), h, |w| objective(w, &b0, &p0));
        let w0 = w.clone();
        let nb = fd(&mut b, &all(k1), h, |b| objective(&w0, b, &p0));
        let b1 = b.clone();
        let np = fd(&mut proj, &all(k1 * d), h, |p| objective(&w0, &b1, p));
        for (name, an, num) in [("w", &dw, nw), ("b", &db, nb), ("proj", &dp, np)] {
            let an: Vec<f64> = an.iter().map(|&v| v as f64).collect();
            let err = rel_err(&an, &num);
            assert!(err < 1e-3, "time2vec d{name}: relative error {err}");
        }
    }

    #[test]
    fn tau_is_decades_since_2000_and_the_row_helper_matches_the_forward() {
        let y2024: i64 = 1_704_067_200_000; // 2024-01-01T00:00Z
        assert!((tau_of_ms(y2024) - 2.4).abs() < 2e-3);
        assert!(
            tau_of_ms(0) < -2.9 && tau_of_ms(0) > -3.1,
            "1970 is −3 decades"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (k1, d) = (3, 5);
        let (w, b, p) = (
            randv(&mut rng, k1, 1.0),
            randv(&mut rng, k1, 1.0),
            randv(&mut rng, k1 * d, 1.0),
        );
        let mut x = vec![0.0; d];
        let mut f = vec![0.0; k1];
        let t2v = Time2Vec {
            w: &w,
            b: &b,
            proj: &p,
        };
        time2vec_fwd(&mut x, &mut f, &[1.7], t2v, d);
        let mut row = vec![7.0; d];
        time2vec_row(&mut row, &w, &b, &p, 1.7);
        assert_eq!(row, x);
        time2vec_row(&mut row, &w, &b, &p, f32::NAN);
        assert_eq!(row, vec![0.0; d]);
    }
}
