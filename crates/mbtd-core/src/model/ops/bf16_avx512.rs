//! The AVX-512 BF16 path of [`gemm_bf16`](super::bf16): operands packed in pairs of
//! consecutive `k` (the `vdpbf16ps` layout: one 32-bit lane holds `x[2q]` in its low half,
//! `x[2q+1]` in its high half), `A` in panels of `MR` rows and `B` in panels of `NR`
//! columns, and a register-blocked microkernel that keeps an `MR × NR` tile of `C` in 24
//! vector registers while `k` runs by, in blocks of `KC`.
//!
//! Packing rounds as `vcvtneps2bf16` does (to nearest even, NaN quiet, a denormal input
//! to a zero of its sign: the kernel's `vdpbf16ps` counts denormals as zero anyway) and
//! uses that instruction for whole runs of 16 values, the scalar [`pair`] for the edges,
//! so a value packs to the same bits on either path.
//!
//! Only reached when [`has_avx512_bf16`](super::bf16::has_avx512_bf16) holds (AVX-512 F,
//! BW and BF16).

use super::bf16::to_bf16;
use super::gemm::{Operands, SharedOut, View};
use super::simd::simd;
use ::gemm::Parallelism;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows of a microkernel tile.
const MR: usize = 12;
/// Columns of a microkernel tile (two vectors of 16 lanes).
const NR: usize = 32;
/// `k` per packed block (even, so pairs never straddle blocks).
const KC: usize = 256;
/// Rows of `A` per task (a whole number of [`MR`] panels).
const MC: usize = 8 * MR;

/// Two values as one `vdpbf16ps` lane: `lo` (even `k`) in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16_daz(lo) as u32 | ((to_bf16_daz(hi) as u32) << 16)
}

/// `x` as bf16 bits, rounded as `vcvtneps2bf16` rounds (a denormal to a signed zero).
#[inline(always)]
fn to_bf16_daz(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        (b >> 16) as u16 & 0x8000
    } else {
        to_bf16(x)
    }
}

/// `dst[q] = pair(x[2q], x[2q+1])`: the `2·dst.len()` values of `x` as one bf16 array.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs_of(dst: &mut [u32], x: &[f32]) {
    assert_eq!(x.len(), 2 * dst.len());
    let full = dst.len() / 16 * 16;
    for q in (0..full).step_by(16) {
        // SAFETY: `q + 16 <= full <= dst.len()` and `2q + 32 <= x.len()`; `__m512bh` and
        // `__m512i` are both 512 plain bits.
        unsafe {
            let lo = _mm512_loadu_ps(x.as_ptr().add(2 * q));
            let hi = _mm512_loadu_ps(x.as_ptr().add(2 * q + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(q) as *mut __m512i, v);
        }
    }
    for (q, o) in dst.iter_mut().enumerate().skip(full) {
        *o = pair(x[2 * q], x[2 * q + 1]);
    }
}

/// Word order that interleaves the two halves of a `vcvtne2ps2bf16` result.
const INTERLEAVE: [u16; 32] = {
    let mut idx = [0u16; 32];
    let mut j = 0;
    while j < 16 {
        idx[2 * j] = j as u16;
        idx[2 * j + 1] = 16 + j as u16;
        j += 1;
    }
    idx
};

/// `dst[i] = pair(lo[i], hi[i])` for `i < dst.len()`, 16 lanes at a time (masked tail).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn zip_pairs(dst: &mut [u32], lo: &[f32], hi: &[f32]) {
    let n = dst.len();
    assert!(lo.len() >= n && hi.len() >= n);
    // SAFETY: every access is masked to lanes `i..n`, inside all three slices (assert
    // above); `INTERLEAVE` holds 64 bytes; the casts are between 512-bit plain types.
    unsafe {
        let idx = _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const __m512i);
        for i in (0..n).step_by(16) {
            let w = (n - i).min(16);
            let mask: __mmask16 = if w == 16 { 0xffff } else { (1u16 << w) - 1 };
            let l = _mm512_maskz_loadu_ps(mask, lo.as_ptr().add(i));
            let h = _mm512_maskz_loadu_ps(mask, hi.as_ptr().add(i));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(h, l));
            let r = _mm512_permutexvar_epi16(idx, v);
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(i) as *mut i32, mask, r);
        }
    }
}

thread_local! {
    /// Reusable packing buffers of this thread (`A` block, `B` block).
    static PACK: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's packing buffers (fresh ones if a caller up the stack of
/// this thread holds them).
fn with_pack<R>(f: impl FnOnce(&mut Vec<u32>, &mut Vec<u32>) -> R) -> R {
    let (mut pa, mut pb) = PACK.with(|p| p.take());
    let r = f(&mut pa, &mut pb);
    PACK.with(|p| p.set((pa, pb)));
    r
}

/// Zero row for a pair's missing second half (odd `k`).
const ZEROS: [f32; NR] = [0.0; NR];

/// Packs rows `p0..p0 + kc` of `B` (`k × n`) into `np` panels of `NR` columns, each
/// `[kc/2][NR]` pairs (zero beyond `k` or `n`).
fn pack_b(out: &mut [u32], b: View<'_>, p0: usize, kc: usize, k: usize, n: usize, par: bool) {
    let kc2 = kc.div_ceil(2);
    let at = |p: usize, j: usize| b.at_or_zero(p, j, k, n);
    let panel = |(jp, dst): (usize, &mut [u32])| {
        let j0 = jp * NR;
        simd(
            #[inline(always)]
            || {
                if b.cs == 1 && j0 + NR <= n {
                    for (q, row) in dst.chunks_exact_mut(NR).enumerate() {
                        let p = p0 + 2 * q;
                        let lo = &b.data[p * b.rs + j0..][..NR];
                        let hi = if p + 1 < k {
                            &b.data[(p + 1) * b.rs + j0..][..NR]
                        } else {
                            &ZEROS[..]
                        };
                        // SAFETY: only reached on AVX-512 BF16 CPUs (module contract).
                        unsafe { zip_pairs(row, lo, hi) };
                    }
                } else if b.rs == 1 && j0 + NR <= n {
                    // the transpose of a row-major matrix (a weight in `x·Wᵀ`): the `k`
                    // of one column lie side by side, so a column packs as one run
                    let even = kc / 2;
                    let mut col = [0u32; KC / 2];
                    for jj in 0..NR {
                        let x = &b.data[(j0 + jj) * b.cs + p0..][..kc];
                        // SAFETY: only reached on AVX-512 BF16 CPUs (module contract).
                        unsafe { pairs_of(&mut col[..even], &x[..2 * even]) };
                        if kc % 2 == 1 {
                            col[kc2 - 1] = pair(x[kc - 1], 0.0);
                        }
                        for (q, &v) in col[..kc2].iter().enumerate() {
                            dst[q * NR + jj] = v;
                        }
                    }
                } else {
                    for jj in 0..NR {
                        for q in 0..kc2 {
                            let p = p0 + 2 * q;
                            dst[q * NR + jj] = pair(at(p, j0 + jj), at(p + 1, j0 + jj));
                        }
                    }
                }
            },
        )
    };
    if par {
        out.par_chunks_mut(kc2 * NR).enumerate().for_each(panel);
    } else {
        out.chunks_mut(kc2 * NR).enumerate().for_each(panel);
    }
}

/// Packs rows `i0..i0 + mc`, columns `p0..p0 + kc` of `A` (`m × k`) into panels of `MR`
/// rows, each `[kc/2][MR]` pairs (zero beyond `m` or `k`).
#[allow(clippy::too_many_arguments)]
fn pack_a(
    out: &mut [u32],
    a: View<'_>,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
    m: usize,
    k: usize,
) {
    let kc2 = kc.div_ceil(2);
    let at = |i: usize, p: usize| a.at_or_zero(i, p, m, k);
    let mut row = [0u32; KC / 2];
    for (ip, dst) in out[..mc.div_ceil(MR) * kc2 * MR]
        .chunks_exact_mut(kc2 * MR)
        .enumerate()
    {
        let r0 = i0 + ip * MR;
        simd(
            #[inline(always)]
            || {
                if r0 + MR > m {
                    for (q, col) in dst.chunks_exact_mut(MR).enumerate() {
                        let p = p0 + 2 * q;
                        for (r, o) in col.iter_mut().enumerate() {
                            *o = pair(at(r0 + r, p), at(r0 + r, p + 1));
                        }
                    }
                } else if a.rs == 1 {
                    // the transpose of a row-major matrix: rows of A lie side by side
                    for (q, col) in dst.chunks_exact_mut(MR).enumerate() {
                        let p = p0 + 2 * q;
                        let lo = &a.data[r0 + p * a.cs..][..MR];
                        let hi = if p + 1 < k {
                            &a.data[r0 + (p + 1) * a.cs..][..MR]
                        } else {
                            &ZEROS[..MR]
                        };
                        // SAFETY: only reached on AVX-512 BF16 CPUs (module contract).
                        unsafe { zip_pairs(col, lo, hi) };
                    }
                } else {
                    for r in 0..MR {
                        let src = (r0 + r) * a.rs + p0 * a.cs;
                        let row = &mut row[..kc2];
                        if a.cs == 1 {
                            let x = &a.data[src..src + kc];
                            let even = kc / 2;
                            // SAFETY: only reached on AVX-512 BF16 CPUs (module contract).
                            unsafe { pairs_of(&mut row[..even], &x[..2 * even]) };
                            if kc % 2 == 1 {
                                row[kc2 - 1] = pair(x[kc - 1], 0.0);
                            }
                        } else {
                            for (q, o) in row.iter_mut().enumerate() {
                                *o = pair(at(r0 + r, p0 + 2 * q), at(r0 + r, p0 + 2 * q + 1));
                            }
                        }
                        for (q, &v) in row.iter().enumerate() {
                            dst[q * MR + r] = v;
                        }
                    }
                }
            },
        )
    }
}

/// Tasks per thread a threaded product aims for (so work stealing evens out the blocks).
const TASKS_PER_THREAD: usize = 8;

/// The AVX-512 BF16 path of [`gemm_bf16`] (`m, n, k > 0`, bounds checked by the caller).
///
/// Per block of `KC` steps of `k`, both operands are packed once (in parallel), then
/// tasks of `MC` rows × a run of `NR`-column panels compute their tiles. A product with
/// few rows (a weight gradient: `m` = 256) is split over columns too, so two threads
/// never wait on one row block; each element still sums its `k` in one order.
pub(super) fn gemm_bf16_avx512(
    p: Operands<'_>,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
    par: Parallelism,
) {
    let Operands { m, n, k, a, b } = p;
    let threads = match par {
        Parallelism::Rayon(t) if t > 1 => t,
        _ => 1,
    };
    let threaded = threads > 1;
    let (np, mb) = (n.div_ceil(NR), m.div_ceil(MC));
    let chunks = if threaded {
        (TASKS_PER_THREAD * threads).div_ceil(mb).clamp(1, np)
    } else {
        1
    };
    let per_chunk = np.div_ceil(chunks);
    let cp = SharedOut(c.as_mut_ptr());
    with_pack(|pa, pb| {
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let kc2 = kc.div_ceil(2);
            pb.clear();
            pb.resize(np * kc2 * NR, 0);
            pack_b(pb, b, p0, kc, k, n, threaded);
            pa.clear();
            pa.resize(m.div_ceil(MR) * kc2 * MR, 0);
            let block_a = |(ib, dst): (usize, &mut [u32])| {
                pack_a(dst, a, ib * MC, MC.min(m - ib * MC), p0, kc, m, k)
            };
            let a_block = (MC / MR) * kc2 * MR;
            if threaded {
                pa.par_chunks_mut(a_block).enumerate().for_each(block_a);
            } else {
                pa.chunks_mut(a_block).enumerate().for_each(block_a);
            }
            let load = acc || p0 > 0;
            let (pa, pb): (&[u32], &[u32]) = (pa, pb);
            let task = |t: usize| {
                let (ib, jc) = (t / chunks, t % chunks);
                let (i0, mc) = (ib * MC, MC.min(m - ib * MC));
                let apanels = &pa[ib * a_block..][..mc.div_ceil(MR) * kc2 * MR];
                for jp in jc * per_chunk..np.min((jc + 1) * per_chunk) {
                    let (j0, w) = (jp * NR, NR.min(n - jp * NR));
                    let bpanel = &pb[jp * kc2 * NR..(jp + 1) * kc2 * NR];
                    for (ip, apanel) in apanels.chunks_exact(kc2 * MR).enumerate() {
                        let (r0, h) = (i0 + ip * MR, MR.min(mc - ip * MR));
                        // SAFETY: this task alone writes rows `i0..i0 + mc`, columns of
                        // panels `jc·per_chunk..` of `C`; the tile's rows `r0..r0 + h`
                        // and columns `j0..j0 + w` lie inside `C` (checked by
                        // `gemm_bf16`'s assert), the panels hold `kc2` steps, and the
                        // CPU has AVX-512 BF16.
                        unsafe {
                            tile(kc2, apanel, bpanel, cp.at(r0 * c_rs + j0), c_rs, h, w, load)
                        };
                    }
                }
            };
            if threaded {
                (0..mb * chunks).into_par_iter().for_each(task);
            } else {
                (0..mb * chunks).for_each(task);
            }
        }
    });
}

/// One `h × w` tile of `C` at `c` (row stride `c_rs`): full tiles run the microkernel in
/// place, edge tiles through a full-size copy.
///
/// # Safety
/// Rows `0..h`, columns `0..w` at `c` must be valid and exclusively ours; the CPU must
/// have AVX-512 F and BF16; the panels hold `kc2` steps.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    kc2: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    c_rs: usize,
    h: usize,
    w: usize,
    load: bool,
) {
    assert!(a.len() >= kc2 * MR && b.len() >= kc2 * NR);
    if h == MR && w == NR {
        // SAFETY: the caller's contract; the panels are long enough (assert above).
        return unsafe { kernel(kc2, a.as_ptr(), b.as_ptr(), c, c_rs, load) };
    }
    let mut t = [0.0f32; MR * NR];
    // SAFETY: the caller's contract bounds rows `0..h`, columns `0..w` at `c`.
    unsafe {
        if load {
            for r in 0..h {
                std::ptr::copy_nonoverlapping(c.add(r * c_rs), t.as_mut_ptr().add(r * NR), w);
            }
        }
        kernel(kc2, a.as_ptr(), b.as_ptr(), t.as_mut_ptr(), NR, load);
        for r in 0..h {
            std::ptr::copy_nonoverlapping(t.as_ptr().add(r * NR), c.add(r * c_rs), w);
        }
    }
}

/// The microkernel: an `MR × NR` tile of `C` (loaded when `load`, else zero) plus the
/// products of an `A` panel (`[kc2][MR]` pairs) and a `B` panel (`[kc2][NR]` pairs).
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `a`, `b` must hold `kc2·MR`, `kc2·NR` pairs;
/// `MR` rows of `NR` floats at `c` (row stride `c_rs`) must be valid and exclusively ours.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(kc2: usize, a: *const u32, b: *const u32, c: *mut f32, c_rs: usize, load: bool) {
    // SAFETY: every offset stays inside the panels (`q < kc2`) or the tile, per the
    // contract; `__m512i` and `__m512bh` are both 512 plain bits.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(r * c_rs));
                row[1] = _mm512_loadu_ps(c.add(r * c_rs + 16));
            }
        }
        for q in 0..kc2 {
            let bq = b.add(q * NR);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const __m512i));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(bq.add(16) as *const __m512i));
            let aq = a.add(q * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * c_rs), row[0]);
            _mm512_storeu_ps(c.add(r * c_rs + 16), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::has_avx512_bf16;

    /// Values of every kind: normal, denormal, zero, infinite, NaN, ties, both signs.
    fn awkward(n: usize) -> Vec<f32> {
        let special = [
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            f32::from_bits(0x007f_ffff), // largest denormal: to_bf16 rounds it up to a normal
            -f32::from_bits(1),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001), // NaN whose payload sits below bf16's bits
            1.0 + 1.0 / 256.0,           // a tie
            f32::MAX,
        ];
        (0..n)
            .map(|i| match special.get(i % 29) {
                Some(&v) => v,
                None => f32::from_bits((i as u32).wrapping_mul(2_654_435_761)),
            })
            .collect()
    }

    #[test]
    fn vector_packing_gives_the_scalar_bits() {
        if !has_avx512_bf16() {
            eprintln!("no AVX-512 BF16 on this CPU: the vector packers never run here");
            return;
        }
        for n in [1, 5, 12, 16, 17, 32, 45] {
            let (lo, hi) = (awkward(n), awkward(n + 7)[7..].to_vec());
            let mut got = vec![0u32; n];
            // SAFETY: the CPU has AVX-512 F, BW and BF16 (checked above).
            unsafe { zip_pairs(&mut got, &lo, &hi) };
            let want: Vec<u32> = lo.iter().zip(&hi).map(|(&l, &h)| pair(l, h)).collect();
            assert_eq!(got, want, "zip_pairs, n = {n}");

            let x = awkward(2 * n);
            // SAFETY: as above.
            unsafe { pairs_of(&mut got, &x) };
            let want: Vec<u32> = x.chunks_exact(2).map(|p| pair(p[0], p[1])).collect();
            assert_eq!(got, want, "pairs_of, n = {n}");
        }
        assert_eq!(to_bf16_daz(f32::from_bits(0x807f_ffff)), 0x8000);
        assert_eq!(to_bf16_daz(1.5), to_bf16(1.5));
    }
}
