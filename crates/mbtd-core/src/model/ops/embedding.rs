//! Token plus learned position embedding: `x[n] = wte[ids[n]] + wpe[pos(n)]`, where
//! `pos(n)` is the offset `n mod T` within its window or, for a packed batch, the given
//! offset within its segment; backward `dwte[id] = Σ_{n: ids[n] = id} dx[n]`,
//! `dwpe[p] = Σ_{n: pos(n) = p} dx[n]`. An empty `wpe` (rotary positions, which act in
//! attention instead) leaves the token embedding alone: `x[n] = wte[ids[n]]`.
//!
//! # Shapes
//! `ids`, `positions`: `[B·T]`, `wte`: `[V, d]`, `wpe`: `[T_max, d]`, `x`, `dx`:
//! `[B·T, d]`.

use super::profile;
use rayon::prelude::*;

/// Embedding forward `x[n] = wte[ids[n]] + wpe[pos(n)]` with `pos(n) = positions[n]`, or
/// `n mod seq` when `positions` is `None`.
///
/// ```
/// use mbtd_core::model::ops::embed_fwd;
///
/// let (d, seq) = (2, 2);
/// let wte = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]; // V = 3
/// let wpe = [0.0, 0.5, 0.0, -0.5]; // T_max = 2
/// let mut x = [0.0f32; 8];
/// embed_fwd(&mut x, &wte, &wpe, &[2, 0, 1, 1], None, seq, d);
/// assert_eq!(x, [3.0, 3.5, 1.0, 0.5, 2.0, 2.5, 2.0, 1.5]);
/// // one window of two segments: positions restart at each
/// embed_fwd(&mut x, &wte, &wpe, &[2, 0, 1, 1], Some(&[0, 0, 1, 0]), 4, d);
/// assert_eq!(x, [3.0, 3.5, 1.0, 1.5, 2.0, 1.5, 2.0, 2.5]);
/// // no position table (rotary positions): the token rows alone
/// embed_fwd(&mut x, &wte, &[], &[2, 0, 1, 1], None, seq, d);
/// assert_eq!(x, [3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
/// ```
pub fn embed_fwd(
    x: &mut [f32],
    wte: &[f32],
    wpe: &[f32],
    ids: &[u32],
    positions: Option<&[u32]>,
    seq: usize,
    d: usize,
) {
    let _prof = profile::scope(profile::ELEM);
    x.par_chunks_mut(d)
        .zip(ids.par_iter())
        .enumerate()
        .for_each(|(n, (row, &id))| {
            let t = positions.map_or(n % seq, |p| p[n] as usize);
            let e = &wte[id as usize * d..(id as usize + 1) * d];
            if wpe.is_empty() {
                row.copy_from_slice(e);
                return;
            }
            let p = &wpe[t * d..(t + 1) * d];
            for ((o, &a), &b) in row.iter_mut().zip(e).zip(p) {
                *o = a + b;
            }
        });
}

/// Embedding backward: `dwte[id] = Σ_{n: ids[n]=id} dx[n]`, `dwpe[p] = Σ_{n: pos(n)=p}
/// dx[n]` (rows in order, `pos` as in [`embed_fwd`]); both overwritten (untouched rows
/// are zero).
pub(crate) fn embed_bwd(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dx: &[f32],
    ids: &[u32],
    positions: Option<&[u32]>,
    seq: usize,
    d: usize,
) {
    let _prof = profile::scope(profile::ELEM);
    dwte.par_chunks_mut(1 << 14).for_each(|c| c.fill(0.0));
    dwpe.fill(0.0);
    for (n, (&id, row)) in ids.iter().zip(dx.chunks_exact(d)).enumerate() {
        let e = &mut dwte[id as usize * d..(id as usize + 1) * d];
        for (a, &v) in e.iter_mut().zip(row) {
            *a += v;
        }
        if dwpe.is_empty() {
            continue;
        }
        let t = positions.map_or(n % seq, |p| p[n] as usize);
        let p = &mut dwpe[t * d..(t + 1) * d];
        for (a, &v) in p.iter_mut().zip(row) {
            *a += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::randv;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn embedding_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (v, d, b, seq) = (5, 3, 2, 4);
        let wte = randv(&mut rng, v * d, 1.0);
        let wpe = randv(&mut rng, seq * d, 1.0);
        let ids = vec![1u32, 1, 4, 0, 2, 1, 3, 3];
        let dx = randv(&mut rng, b * seq * d, 1.0);
        let mut x = vec![0.0; b * seq * d];
        embed_fwd(&mut x, &wte, &wpe, &ids, None, seq, d);
        assert_eq!(
            x[d..2 * d],
            [
                wte[d] + wpe[d],
                wte[d + 1] + wpe[d + 1],
                wte[d + 2] + wpe[d + 2]
            ]
        );
        let (mut dwte, mut dwpe) = (vec![7.0; v * d], vec![7.0; seq * d]);
        embed_bwd(&mut dwte, &mut dwpe, &dx, &ids, None, seq, d);
        // The objective is linear: the gradient is exactly Σ dx over matching rows.
        for id in 0..v {
            for c in 0..d {
                let e: f32 = (0..b * seq)
                    .filter(|&n| ids[n] as usize == id)
                    .map(|n| dx[n * d + c])
                    .sum();
                assert!((dwte[id * d + c] - e).abs() < 1e-6);
            }
        }
        for t in 0..seq {
            for c in 0..d {
                let e: f32 = (0..b).map(|r| dx[(r * seq + t) * d + c]).sum();
                assert!((dwpe[t * d + c] - e).abs() < 1e-6);
            }
        }
        // Packed: positions restart per segment; `wpe[p]` gathers every position at offset p.
        let pos = [0u32, 1, 0, 1, 2, 3, 0, 1];
        embed_fwd(&mut x, &wte, &wpe, &ids, Some(&pos), seq, d);
        assert_eq!(x[4 * d], wte[2 * d] + wpe[2 * d], "position 4 is offset 2");
        embed_bwd(&mut dwte, &mut dwpe, &dx, &ids, Some(&pos), seq, d);
        for p in 0..seq {
            for c in 0..d {
                let e: f32 = (0..b * seq)
                    .filter(|&n| pos[n] as usize == p)
                    .map(|n| dx[n * d + c])
                    .sum();
                assert!((dwpe[p * d + c] - e).abs() < 1e-6);
            }
        }
    }
}
