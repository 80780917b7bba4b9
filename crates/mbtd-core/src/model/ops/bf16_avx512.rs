//! The AVX-512 BF16 path of [`gemm_bf16`](super::bf16): operands packed in pairs of
//! consecutive `k` (the `vdpbf16ps` layout: one 32-bit lane holds `x[2q]` in its low half,
//! `x[2q+1]` in its high half), `A` in panels of `MR` rows and `B` in panels of `NR`
//! columns, and a register-blocked microkernel that keeps an `MR × NR` tile of `C` in 24
//! vector registers while `k` runs by, in blocks of up to `KC`.
//!
//! Besides the kernel, the time goes into packing, so every operand is packed in the
//! order it lies in memory: a row-major `A` (the activations of `x·W` and `dy·Wᵀ`) is
//! converted row by row and the kernel broadcasts from `MR` such rows side by side (no
//! transpose); the transpose of a row-major matrix (`xᵀ` in `xᵀ·dy`) and a row-major `B`
//! are read two rows at a time, left to right, and interleaved into pairs. A block of `k`
//! is as long as `KC` (1,024) allows, so `C` is loaded and stored once per 1,024 of `k`;
//! `B` is packed once per block (at most `B_PAIRS` pairs: wide products take shorter
//! blocks), `A` once per task, or once for all tasks when a few rows are split over
//! columns.
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
/// Most `k` per packed block (even, so pairs never straddle blocks).
const KC: usize = 1024;
/// Rows of `A` per task (a whole number of [`MR`] panels).
const MC: usize = 8 * MR;
/// A product with at most this many rows (a weight gradient) is one block of rows, split
/// over columns among threads.
const FEW_ROWS: usize = 256;
/// Most pairs of `B` packed at once (4 MiB): a block of `k` is shorter for a wide `B`.
const B_PAIRS: usize = 1 << 20;
/// Pairs from one row to the next in a row-layout `A` panel: a block's pairs, padded so
/// that the `MR` rows the kernel reads side by side do not share cache sets.
const ROW_STRIDE: usize = KC / 2 + 16;

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
    /// Reusable packing buffer of this thread for `A`.
    static PACK_A: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    /// Reusable packing buffer of this thread for `B`.
    static PACK_B: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's buffer `key`, grown to at least `len` (a fresh one if a
/// caller up the stack of this thread holds it). Packers write every element they hand to
/// the kernel, so the buffer is never cleared.
fn with_buf<R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<Vec<u32>>>,
    len: usize,
    f: impl FnOnce(&mut [u32]) -> R,
) -> R {
    let mut buf = key.with(|b| b.take());
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let r = f(&mut buf[..len]);
    key.with(|b| b.set(buf));
    r
}

/// Zero row for a pair's missing second half (odd `k`) in an `A` panel or block.
const ZEROS: [f32; FEW_ROWS] = [0.0; FEW_ROWS];

/// A packing buffer's base pointer, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct PackOut(*mut u32);
// SAFETY: used only by tasks that write disjoint elements (see `pack_b`).
unsafe impl Send for PackOut {}
unsafe impl Sync for PackOut {}

impl PackOut {
    /// The `len` elements from `off`.
    ///
    /// # Safety
    /// They must lie inside the buffer and be written by the caller alone.
    unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [u32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }
}

/// Packs rows `p0..p0 + kc` of `B` (`k × n`) into `n/NR` (rounded up) panels of `NR`
/// columns, each `[kc/2][NR]` pairs (zero beyond `k` or `n`).
fn pack_b(out: &mut [u32], b: View<'_>, p0: usize, kc: usize, k: usize, n: usize, par: bool) {
    let kc2 = kc.div_ceil(2);
    let psize = kc2 * NR;
    let out = &mut out[..n.div_ceil(NR) * psize];
    let at = |p: usize, j: usize| b.at_or_zero(p, j, k, n);
    let full = n / NR;
    let edge = |dst: &mut [u32], j0: usize| {
        for jj in 0..NR {
            for q in 0..kc2 {
                let p = p0 + 2 * q;
                dst[q * NR + jj] = pair(at(p, j0 + jj), at(p + 1, j0 + jj));
            }
        }
    };
    if b.cs == 1 && full > 0 {
        // a row-major `B`: each pair of rows is read once, left to right, into every panel
        let zeros = if p0 + kc == k && kc % 2 == 1 {
            vec![0.0f32; full * NR]
        } else {
            Vec::new()
        };
        let o = PackOut(out.as_mut_ptr());
        let rows = |q: usize| {
            let p = p0 + 2 * q;
            let lo = &b.data[p * b.rs..][..full * NR];
            let hi = if p + 1 < k {
                &b.data[(p + 1) * b.rs..][..full * NR]
            } else {
                &zeros[..]
            };
            for jp in 0..full {
                // SAFETY: step `q` of panel `jp` is `NR` pairs inside `out` (sized above),
                // written by this call alone; only reached on AVX-512 BF16 CPUs (module
                // contract).
                unsafe {
                    zip_pairs(
                        o.slice(jp * psize + q * NR, NR),
                        &lo[jp * NR..],
                        &hi[jp * NR..],
                    )
                };
            }
        };
        if par {
            (0..kc2).into_par_iter().with_min_len(16).for_each(rows);
        } else {
            (0..kc2).for_each(rows);
        }
        if full * NR < n {
            edge(&mut out[full * psize..], full * NR);
        }
        return;
    }
    let panel = |(jp, dst): (usize, &mut [u32])| {
        let j0 = jp * NR;
        simd(
            #[inline(always)]
            || {
                if b.rs == 1 && j0 + NR <= n {
                    // the transpose of a row-major matrix (a weight in `dy·Wᵀ`): the `k`
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
                    edge(dst, j0);
                }
            },
        )
    };
    if par {
        out.par_chunks_mut(psize).enumerate().for_each(panel);
    } else {
        out.chunks_mut(psize).enumerate().for_each(panel);
    }
}

/// Elements of one packed `A` panel: `MR` rows of [`ROW_STRIDE`] pairs when `rows` (a
/// row-major `A`), else `[kc2][MR]` pairs.
fn panel_len(rows: bool, kc2: usize) -> usize {
    if rows { MR * ROW_STRIDE } else { kc2 * MR }
}

/// Packs rows `i0..i0 + mc`, columns `p0..p0 + kc` of `A` (`m × k`) into panels of `MR`
/// rows (zero beyond `m` or `k`), laid out as [`panel_len`] says.
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
    let rows = a.cs == 1;
    let psize = panel_len(rows, kc2);
    let out = &mut out[..mc.div_ceil(MR) * psize];
    let at = |i: usize, p: usize| a.at_or_zero(i, p, m, k);
    simd(
        #[inline(always)]
        || {
            if rows {
                let even = kc / 2;
                for (r, row) in out.chunks_exact_mut(ROW_STRIDE).enumerate() {
                    let row = &mut row[..kc2];
                    if i0 + r >= m {
                        row.fill(0);
                        continue;
                    }
                    let x = &a.data[(i0 + r) * a.rs + p0..][..kc];
                    // SAFETY: only reached on AVX-512 BF16 CPUs (module contract).
                    unsafe { pairs_of(&mut row[..even], &x[..2 * even]) };
                    if kc % 2 == 1 {
                        row[kc2 - 1] = pair(x[kc - 1], 0.0);
                    }
                }
                return;
            }
            // full panels of the transpose of a row-major matrix: per step, the block's
            // rows lie side by side in two rows of the source, read once each
            let full = if a.rs == 1 { mc.min(m - i0) / MR } else { 0 };
            for q in (0..kc2).filter(|_| full > 0) {
                let p = p0 + 2 * q;
                let lo = &a.data[i0 + p * a.cs..][..full * MR];
                let hi = if p + 1 < k {
                    &a.data[i0 + (p + 1) * a.cs..][..full * MR]
                } else {
                    &ZEROS[..full * MR]
                };
                for ip in 0..full {
                    let dst = &mut out[ip * psize + q * MR..][..MR];
                    // SAFETY: only reached on AVX-512 BF16 CPUs (module contract).
                    unsafe { zip_pairs(dst, &lo[ip * MR..][..MR], &hi[ip * MR..][..MR]) };
                }
            }
            for (ip, dst) in out.chunks_exact_mut(psize).enumerate().skip(full) {
                let r0 = i0 + ip * MR;
                for (q, col) in dst.chunks_exact_mut(MR).enumerate() {
                    let p = p0 + 2 * q;
                    for (r, o) in col.iter_mut().enumerate() {
                        *o = pair(at(r0 + r, p), at(r0 + r, p + 1));
                    }
                }
            }
        },
    )
}

/// Tasks per thread a threaded product aims for (so work stealing evens out the blocks).
const TASKS_PER_THREAD: usize = 8;

/// The AVX-512 BF16 path of [`gemm_bf16`] (`m, n, k > 0`, bounds checked by the caller).
///
/// Per block of `k`, `B` is packed once (in parallel), then tasks of a block of rows × a
/// run of `NR`-column panels compute their tiles. A product with few rows (a weight
/// gradient: `m` = 256) is one block of rows split over columns, its `A` packed once for
/// all tasks; otherwise each task packs its own rows of `A`. Each element still sums its
/// `k` in one order, whatever the split.
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
    let mc_blk = if m <= FEW_ROWS {
        m.div_ceil(MR) * MR
    } else {
        MC
    };
    let (np, mb) = (n.div_ceil(NR), m.div_ceil(mc_blk));
    let chunks = if threaded {
        (TASKS_PER_THREAD * threads).div_ceil(mb).clamp(1, np)
    } else {
        1
    };
    let per_chunk = np.div_ceil(chunks);
    let rows = a.cs == 1;
    let kc_max = KC.min(2 * (B_PAIRS / (np * NR)).max(NR));
    let cp = SharedOut(c.as_mut_ptr());
    let kc2_max = kc_max.div_ceil(2);
    with_buf(&PACK_B, np * kc2_max * NR, |pb| {
        for p0 in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - p0);
            let kc2 = kc.div_ceil(2);
            let blk = mc_blk / MR * panel_len(rows, kc2);
            pack_b(pb, b, p0, kc, k, n, threaded);
            let pb: &[u32] = pb;
            let load = acc || p0 > 0;
            let tiles = |ib: usize, jc: usize, pa: &[u32]| {
                let (i0, mc) = (ib * mc_blk, mc_blk.min(m - ib * mc_blk));
                let psize = panel_len(rows, kc2);
                for jp in jc * per_chunk..np.min((jc + 1) * per_chunk) {
                    let (j0, w) = (jp * NR, NR.min(n - jp * NR));
                    let bpanel = &pb[jp * kc2 * NR..(jp + 1) * kc2 * NR];
                    for (ip, apanel) in pa[..mc.div_ceil(MR) * psize]
                        .chunks_exact(psize)
                        .enumerate()
                    {
                        let (r0, h) = (i0 + ip * MR, MR.min(mc - ip * MR));
                        // SAFETY: this task alone writes rows `i0..i0 + mc`, columns of
                        // panels `jc·per_chunk..` of `C`; the tile's rows `r0..r0 + h` and
                        // columns `j0..j0 + w` lie inside `C` (checked by `gemm_bf16`'s
                        // assert), the panels hold `kc2` steps, and the CPU has AVX-512
                        // BF16.
                        unsafe {
                            let out = cp.at(r0 * c_rs + j0);
                            if rows {
                                tile::<true>(kc2, apanel, bpanel, out, c_rs, h, w, load)
                            } else {
                                tile::<false>(kc2, apanel, bpanel, out, c_rs, h, w, load)
                            }
                        }
                    }
                }
            };
            let pack = |ib: usize, dst: &mut [u32]| {
                pack_a(
                    dst,
                    a,
                    ib * mc_blk,
                    mc_blk.min(m - ib * mc_blk),
                    p0,
                    kc,
                    m,
                    k,
                )
            };
            if chunks > 1 {
                with_buf(&PACK_A, mb * blk, |pa| {
                    pa.par_chunks_mut(blk)
                        .enumerate()
                        .for_each(|(ib, dst)| pack(ib, dst));
                    let pa: &[u32] = pa;
                    (0..mb * chunks).into_par_iter().for_each(|t| {
                        let ib = t / chunks;
                        tiles(ib, t % chunks, &pa[ib * blk..][..blk])
                    });
                });
            } else {
                let task = |ib: usize| {
                    with_buf(&PACK_A, blk, |pa| {
                        pack(ib, pa);
                        tiles(ib, 0, pa)
                    })
                };
                if threaded {
                    (0..mb).into_par_iter().for_each(task);
                } else {
                    (0..mb).for_each(task);
                }
            }
        }
    });
}

/// One `h × w` tile of `C` at `c` (row stride `c_rs`): full tiles run the microkernel in
/// place, edge tiles through a full-size copy.
///
/// # Safety
/// Rows `0..h`, columns `0..w` at `c` must be valid and exclusively ours; the CPU must
/// have AVX-512 F and BF16; the panels hold `kc2` steps in the layout `ROWS` names.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const ROWS: bool>(
    kc2: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    c_rs: usize,
    h: usize,
    w: usize,
    load: bool,
) {
    assert!(a.len() >= panel_len(ROWS, kc2) && b.len() >= kc2 * NR);
    if h == MR && w == NR {
        // SAFETY: the caller's contract; the panels are long enough (assert above).
        return unsafe { kernel::<ROWS>(kc2, a.as_ptr(), b.as_ptr(), c, c_rs, load) };
    }
    let mut t = [0.0f32; MR * NR];
    // SAFETY: the caller's contract bounds rows `0..h`, columns `0..w` at `c`.
    unsafe {
        if load {
            for r in 0..h {
                std::ptr::copy_nonoverlapping(c.add(r * c_rs), t.as_mut_ptr().add(r * NR), w);
            }
        }
        kernel::<ROWS>(kc2, a.as_ptr(), b.as_ptr(), t.as_mut_ptr(), NR, load);
        for r in 0..h {
            std::ptr::copy_nonoverlapping(t.as_ptr().add(r * NR), c.add(r * c_rs), w);
        }
    }
}

/// The microkernel: an `MR × NR` tile of `C` (loaded when `load`, else zero) plus the
/// products of an `A` panel and a `B` panel (`[kc2][NR]` pairs). The `A` panel is `MR`
/// rows of [`ROW_STRIDE`] pairs when `ROWS`, else `[kc2][MR]` pairs.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `a` must hold [`panel_len`]`(ROWS, kc2)` pairs
/// and `b` `kc2·NR`; `MR` rows of `NR` floats at `c` (row stride `c_rs`) must be valid and
/// exclusively ours.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const ROWS: bool>(
    kc2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    load: bool,
) {
    // SAFETY: every offset stays inside the panels (`q < kc2 <= ROW_STRIDE`) or the tile,
    // per the contract; `__m512i` and `__m512bh` are both 512 plain bits.
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
            for (r, row) in acc.iter_mut().enumerate() {
                let e = if ROWS {
                    *a.add(r * ROW_STRIDE + q)
                } else {
                    *a.add(q * MR + r)
                };
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(e as i32));
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
