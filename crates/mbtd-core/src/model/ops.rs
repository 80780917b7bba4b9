//! Tensor kernels on fp32 row-major slices, each with its hand-written gradient.
//!
//! Determinism: every reduction has a fixed order that does not depend on the number
//! of rayon threads (parallel loops split rows or columns into fixed-size chunks and
//! never reduce across chunks in a thread-dependent order). `gemm` splits only the
//! output among threads, so its results do not depend on the thread count either.

use gemm::Parallelism;
use rayon::prelude::*;

/// Rows per parallel task in row-wise kernels.
const ROW_CHUNK: usize = 16;
/// LayerNorm epsilon.
pub const LN_EPS: f32 = 1e-5;

/// Opt-in profile of the kernels by category (for `bench train --phases`): the time spent
/// in each, summed over the threads that ran it (a layer's branches run two at a time, so
/// the sum exceeds the wall time). Off by default; when off a scope costs one relaxed
/// atomic load.
pub mod prof {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    /// Category names, indexed like [`take`]'s result.
    pub const NAMES: [&str; 6] = [
        "linear_gemm",
        "attention",
        "layernorm",
        "gelu",
        "xent",
        "elementwise",
    ];
    /// Linear layers (gemm, bias broadcast and bias gradients).
    pub const LINEAR: usize = 0;
    /// Attention core (scores, softmax, weighted sums, their gradients).
    pub const ATTN: usize = 1;
    /// LayerNorm forward and backward.
    pub const LN: usize = 2;
    /// GELU forward and backward.
    pub const GELU: usize = 3;
    /// Softmax cross-entropy.
    pub const XENT: usize = 4;
    /// Embedding, residual adds, aggregation.
    pub const ELEM: usize = 5;

    static ON: AtomicBool = AtomicBool::new(false);
    static NS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

    /// Turns profiling on or off (process-wide).
    pub fn enable(on: bool) {
        ON.store(on, Ordering::Relaxed);
    }

    /// Seconds per category since the last call; resets the counters.
    pub fn take() -> [f64; 6] {
        std::array::from_fn(|i| NS[i].swap(0, Ordering::Relaxed) as f64 * 1e-9)
    }

    /// Adds the time until drop to a category.
    pub struct Scope(usize, Option<Instant>);

    impl Drop for Scope {
        fn drop(&mut self) {
            if let Some(t) = self.1 {
                NS[self.0].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Starts timing category `cat` (no-op unless enabled).
    pub fn scope(cat: usize) -> Scope {
        Scope(cat, ON.load(Ordering::Relaxed).then(Instant::now))
    }
}

thread_local! {
    /// Set while this thread runs one of several independent tasks side by side (see
    /// [`serial_gemm`]): its products then stay on this thread.
    static SERIAL_GEMM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's `gemm` calls single-threaded: for tasks that already run
/// in parallel with each other, where splitting every product across threads would only
/// add synchronisation. The products' results do not depend on it.
pub(crate) fn serial_gemm<R>(f: impl FnOnce() -> R) -> R {
    let old = SERIAL_GEMM.with(|s| s.replace(true));
    let r = f();
    SERIAL_GEMM.with(|s| s.set(old));
    r
}

/// `gemm` parallelism using every thread of the current rayon pool (one thread inside
/// [`serial_gemm`]).
pub(crate) fn par_all() -> Parallelism {
    if SERIAL_GEMM.with(|s| s.get()) {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads().max(1))
    }
}

/// Highest index touched by a strided `rows × cols` view, plus one.
pub(crate) fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// A strided read-only matrix view: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `[rows, cols]`.
    pub fn rm(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `[rows, cols]` buffer.
    pub fn tr(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }
    /// The transpose of this view (the same elements, strides swapped).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `C[m,n] (+)= A[m,k]·B[k,n]` with `C` row-major of row stride `c_rs`.
/// `acc = false` overwrites `C` (its old contents are never read).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_rs: usize,
    acc: bool,
    a: View<'_>,
    b: View<'_>,
    par: Parallelism,
) {
    assert!(span(m, n, c_rs, 1) <= c.len(), "gemm: C too small");
    assert!(span(m, k, a.rs, a.cs) <= a.data.len(), "gemm: A too small");
    assert!(span(k, n, b.rs, b.cs) <= b.data.len(), "gemm: B too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                c[r * c_rs..r * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above bound every element the strided views address, `c`
    // is exclusively borrowed and does not alias `a`/`b` (Rust borrow rules).
    unsafe { gemm_raw(m, n, k, c.as_mut_ptr(), c_rs, acc, a, b, par) }
}

/// [`gemm_into`] on a raw `C` pointer, `k > 0`.
///
/// # Safety
/// `C` rows `0..m`, columns `0..n` at `c + i·c_rs + j` must be valid for writes and
/// touched by nothing else meanwhile; `a`, `b` must cover `m × k`, `k × n`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    acc: bool,
    a: View<'_>,
    b: View<'_>,
    par: Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `C[m,n] (+)= A[m,k]·B[k,n]`, all contiguous row-major.
pub(crate) fn mm(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, acc: bool) {
    gemm_into(
        m,
        n,
        k,
        c,
        n,
        acc,
        View::rm(a, k),
        View::rm(b, n),
        par_all(),
    );
}

/// Output columns per task of [`mm_tn`].
const DW_COLS: usize = 128;

/// `C[k,n] (+)= A[m,k]ᵀ·B[m,n]` (weight gradient `dW = xᵀ·dy`), in tasks of
/// [`DW_COLS`] output columns, each a single-threaded `gemm` (rayon spreads the
/// tasks; a branch pair's idle thread takes some). `gemm` runs these long reductions
/// 3–15 % faster per 128 columns than on the whole width (measured on our shapes), and
/// every element's arithmetic is the same whoever runs its task.
pub(crate) fn mm_tn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, acc: bool) {
    let (av, bv) = (View::tr(a, k), View::rm(b, n));
    assert!(span(k, n, n, 1) <= c.len(), "gemm: C too small");
    assert!(span(k, m, av.rs, av.cs) <= a.len(), "gemm: A too small");
    assert!(span(m, n, bv.rs, bv.cs) <= b.len(), "gemm: B too small");
    if m == 0 || k == 0 {
        return gemm_into(k, n, m, c, n, acc, av, bv, Parallelism::None);
    }
    let cp = SharedOut(c.as_mut_ptr());
    (0..n.div_ceil(DW_COLS)).into_par_iter().for_each(|q| {
        let j0 = q * DW_COLS;
        let w = DW_COLS.min(n - j0);
        let bq = View {
            data: &b[j0..],
            ..bv
        };
        // SAFETY: task `q` alone writes columns `j0..j0 + w` of `C` (bounded by the
        // assert above); `A` and this `B` view are in bounds by the asserts above.
        unsafe { gemm_raw(k, w, m, cp.at(j0), n, acc, av, bq, Parallelism::None) }
    });
}

/// The output of a product whose tasks write disjoint columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: used only by tasks that write disjoint elements (see `mm_tn`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `off` must lie within the original buffer.
    unsafe fn at(self, off: usize) -> *mut f32 {
        unsafe { self.0.add(off) }
    }
}

/// `C[m,n] (+)= A[m,k]·B[n,k]ᵀ` (input gradient `dx = dy·Wᵀ`).
pub(crate) fn mm_nt(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, acc: bool) {
    gemm_into(
        m,
        n,
        k,
        c,
        n,
        acc,
        View::rm(a, k),
        View::tr(b, k),
        par_all(),
    );
}

/// Linear forward `y[N,out] = x[N,in]·W[in,out] + b[out]`.
pub(crate) fn linear_fwd(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], n: usize, din: usize) {
    let _prof = prof::scope(prof::LINEAR);
    let dout = b.len();
    y[..n * dout]
        .par_chunks_mut(dout * ROW_CHUNK)
        .for_each(|rows| {
            for row in rows.chunks_exact_mut(dout) {
                row.copy_from_slice(b);
            }
        });
    mm(y, x, w, n, din, dout, true);
}

/// Linear forward without bias `y[N,out] = x[N,in]·W[in,out]` (the bias is added by the
/// consumer, e.g. [`bias_gelu_fwd`]).
pub(crate) fn linear_nobias_fwd(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) {
    let _prof = prof::scope(prof::LINEAR);
    mm(y, x, w, n, din, dout, false);
}

/// Residual linear forward `y[N,out] = r[N,out] + x[N,in]·W[in,out] + b[out]` (the residual
/// and bias are written first, the product is accumulated onto them by `gemm`).
pub(crate) fn residual_linear_fwd(
    y: &mut [f32],
    r: &[f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    din: usize,
) {
    let _prof = prof::scope(prof::LINEAR);
    let dout = b.len();
    y[..n * dout]
        .par_chunks_mut(dout * ROW_CHUNK)
        .zip(r.par_chunks(dout * ROW_CHUNK))
        .for_each(|(rows, res)| {
            simd(
                #[inline(always)]
                || {
                    for (row, rr) in rows.chunks_exact_mut(dout).zip(res.chunks_exact(dout)) {
                        for ((o, &a), &bb) in row.iter_mut().zip(rr).zip(b) {
                            *o = a + bb;
                        }
                    }
                },
            )
        });
    mm(y, x, w, n, din, dout, true);
}

/// Linear backward: `dW = xᵀ·dy` and, when `dx` is given, `dx (+)= dy·Wᵀ` (the bias
/// gradient `Σ_rows dy` comes from [`ColSums`], fused with the pass that produced `dy`
/// where there is one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd(
    dx: Option<(&mut [f32], bool)>,
    dw: &mut [f32],
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    din: usize,
    dout: usize,
) {
    let _prof = prof::scope(prof::LINEAR);
    mm_tn(dw, x, dy, n, din, dout, false);
    if let Some((dx, acc)) = dx {
        mm_nt(dx, dy, w, n, dout, din, acc);
    }
}

/// `out = Σ_k w_k·x_k` over `parts()` in order (`out = w_0·x_0`, then `out += w_k·x_k`),
/// chunk by chunk so that each output chunk stays in cache while every part is added:
/// one pass over memory instead of one per part. `parts` is called once per chunk.
pub(crate) fn weighted_sum<'a, I>(out: &mut [f32], parts: impl Fn() -> I + Sync)
where
    I: Iterator<Item = (f32, &'a [f32])>,
{
    let _prof = prof::scope(prof::ELEM);
    out.par_chunks_mut(8192).enumerate().for_each(|(c, o)| {
        let at = c * 8192;
        simd(
            #[inline(always)]
            || {
                for (k, (w, x)) in parts().enumerate() {
                    let x = &x[at..at + o.len()];
                    if k == 0 {
                        o.iter_mut().zip(x).for_each(|(a, &b)| *a = w * b);
                    } else {
                        o.iter_mut().zip(x).for_each(|(a, &b)| *a += w * b);
                    }
                }
            },
        )
    });
}

/// Rows per block of a [`ColSums`] sum.
const SUM_ROWS: usize = 64;

/// Column sums `sum[c] = Σ_r x[r, c]` of a row-major `[rows, cols]` buffer, in fixed
/// blocks of [`SUM_ROWS`] rows: each block sums its rows in order, then the block sums
/// are added in order, so the bits do not depend on the thread count. Holds the
/// per-block partial sums (reused: no allocation in the steady state).
#[derive(Debug, Default)]
pub(crate) struct ColSums {
    partials: Vec<f32>,
}

impl ColSums {
    /// `sum = Σ_rows x` (`cols = sum.len()`).
    pub fn of(&mut self, sum: &mut [f32], x: &[f32]) {
        let _prof = prof::scope(prof::ELEM);
        let cols = sum.len();
        self.prepare(x.len(), cols);
        x.par_chunks(SUM_ROWS * cols)
            .zip(self.partials.par_chunks_mut(cols))
            .for_each(|(block, part)| add_rows(part, block));
        self.combine(&mut [sum]);
    }

    /// Rewrites each block of rows of `x` with `f(first_row, block)`, then sums its
    /// columns as [`ColSums::of`] while the block is still in cache: one pass over memory
    /// for an element-wise producer of `dy` and its bias gradient `Σ_rows dy`. Pass an
    /// `#[inline(always)]` closure: it runs under [`simd`].
    pub fn map(&mut self, sum: &mut [f32], x: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
        let cols = sum.len();
        self.prepare(x.len(), cols);
        x.par_chunks_mut(SUM_ROWS * cols)
            .zip(self.partials.par_chunks_mut(cols))
            .enumerate()
            .for_each(|(k, (block, part))| {
                simd(
                    #[inline(always)]
                    || f(k * SUM_ROWS, block),
                );
                add_rows(part, block);
            });
        self.combine(&mut [sum]);
    }

    fn prepare(&mut self, len: usize, cols: usize) {
        assert!(
            cols > 0 && len % cols == 0,
            "column sum: {len} values are not whole rows of {cols}"
        );
        self.slots(len / cols, cols);
    }

    /// One slot of `width` sums per block of [`SUM_ROWS`] rows (block `k` covers rows
    /// `k·SUM_ROWS..`), for kernels that fill them themselves before [`ColSums::combine`].
    fn slots(&mut self, rows: usize, width: usize) -> &mut [f32] {
        self.partials.resize(rows.div_ceil(SUM_ROWS) * width, 0.0);
        &mut self.partials
    }

    /// `outs = Σ_blocks slot` in block order, each slot split into `outs` by their lengths.
    fn combine(&self, outs: &mut [&mut [f32]]) {
        let width: usize = outs.iter().map(|o| o.len()).sum();
        for o in outs.iter_mut() {
            o.fill(0.0);
        }
        simd(
            #[inline(always)]
            || {
                for slot in self.partials.chunks_exact(width) {
                    let mut rest = slot;
                    for o in outs.iter_mut() {
                        let (part, tail) = rest.split_at(o.len());
                        o.iter_mut().zip(part).for_each(|(s, &p)| *s += p);
                        rest = tail;
                    }
                }
            },
        )
    }
}

/// `part = Σ_r block[r, ·]` over the rows of `block` in order.
fn add_rows(part: &mut [f32], block: &[f32]) {
    let cols = part.len();
    part.copy_from_slice(&block[..cols]);
    simd(
        #[inline(always)]
        || {
            for row in block.chunks_exact(cols).skip(1) {
                part.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
            }
        },
    )
}

/// Runs `f` compiled for AVX-512 (F, VL) or else AVX2+FMA, whichever the CPU has. Only
/// element-wise code and reductions written lane by lane go through here (nothing the
/// compiler may reassociate), so every path gives identical bits; AVX-512 lets the
/// compiler use 32 vector registers and 16-lane vectors.
/// Pass a closure marked `#[inline(always)]`: a closure compiled as a function of its
/// own does not inherit the target features and stays SSE2.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU supports the enabled features (checked just above).
            return unsafe { run_avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the enabled features (checked just above).
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

/// `e^x` to about 2 ulp for `x` in `[-87.3, 88.3]` (clamped outside), branch-free so
/// that loops over it vectorise (Cephes `expf` polynomial in fused multiply-adds: call it
/// under [`simd`], where they are single instructions).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = (p * r).mul_add(r, r) + 1.0;
    // 2^n without a float→int conversion (which would not vectorise): the mantissa of
    // n + 127 + 2^23 holds the biased exponent n + 127 exactly.
    let biased = (n + 8_388_735.0).to_bits();
    p * f32::from_bits(biased << 23)
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2/π)
const GELU_A: f32 = 0.044_715;

/// GELU (tanh form) `y = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
pub(crate) fn gelu_fwd(y: &mut [f32], x: &[f32]) {
    let _prof = prof::scope(prof::GELU);
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(y, x)| {
            simd(
                #[inline(always)]
                || {
                    for (o, &v) in y.iter_mut().zip(x) {
                        *o = gelu_and_grad(v).0;
                    }
                },
            )
        });
}

/// GELU and its derivative at `x`, through `½(1 + tanh(w/2)) = σ(w)`:
/// `gelu(x) = x·σ(z)` with `z = 2c(x + a·x³)`, `c = √(2/π)`, `a = 0.044715`, and
/// `gelu'(x) = σ(z) + x·σ(z)(1 − σ(z))·2c(1 + 3a·x²)`. Fused multiply-adds: call it
/// under [`simd`].
#[inline(always)]
fn gelu_and_grad(x: f32) -> (f32, f32) {
    let u = x * x;
    let z = x * u.mul_add(2.0 * GELU_C * GELU_A, 2.0 * GELU_C);
    let s = 1.0 / (1.0 + fast_exp(-z));
    let y = x * s;
    let d = (y * (1.0 - s)).mul_add(u.mul_add(6.0 * GELU_C * GELU_A, 2.0 * GELU_C), s);
    (y, d)
}

/// Bias, GELU and its derivative in one pass (rows of width `b.len()`): with
/// `x = f + b`, `y = gelu(x)` and `f ← gelu'(x)`, all the backward pass needs
/// ([`gelu_bwd_colsum`]), so the tanh is evaluated once per element per step.
pub(crate) fn bias_gelu_fwd(y: &mut [f32], f: &mut [f32], b: &[f32]) {
    let _prof = prof::scope(prof::GELU);
    let w = b.len();
    y.par_chunks_mut(w * ROW_CHUNK)
        .zip(f.par_chunks_mut(w * ROW_CHUNK))
        .for_each(|(y, f)| {
            simd(
                #[inline(always)]
                || {
                    for (yr, fr) in y.chunks_exact_mut(w).zip(f.chunks_exact_mut(w)) {
                        for ((o, v), &bb) in yr.iter_mut().zip(fr.iter_mut()).zip(b) {
                            (*o, *v) = gelu_and_grad(*v + bb);
                        }
                    }
                },
            )
        });
}

/// GELU backward in place from the derivative kept by [`bias_gelu_fwd`],
/// `g ← g ⊙ gelu'(x)`, and the bias gradient `db = Σ_rows g` in the same pass.
pub(crate) fn gelu_bwd_colsum(g: &mut [f32], dgelu: &[f32], db: &mut [f32], sums: &mut ColSums) {
    let _prof = prof::scope(prof::GELU);
    let w = db.len();
    sums.map(
        db,
        g,
        #[inline(always)]
        |r0, rows| {
            let d = &dgelu[r0 * w..r0 * w + rows.len()];
            rows.iter_mut().zip(d).for_each(|(a, &b)| *a *= b);
        },
    );
}

/// `out = α·x` and `sum = Σ_rows out` in one pass (`cols = sum.len()`).
pub(crate) fn scale_colsum(
    out: &mut [f32],
    alpha: f32,
    x: &[f32],
    sum: &mut [f32],
    sums: &mut ColSums,
) {
    let _prof = prof::scope(prof::ELEM);
    let w = sum.len();
    sums.map(
        sum,
        out,
        #[inline(always)]
        |r0, rows| {
            let x = &x[r0 * w..r0 * w + rows.len()];
            rows.iter_mut().zip(x).for_each(|(a, &b)| *a = alpha * b);
        },
    );
}

/// Sum with 16 independent lanes (vectorisable, fixed order), lanes added at the end.
#[inline(always)]
pub(crate) fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for &v in rest {
        s += v;
    }
    s
}

/// Maximum with 16 independent lanes.
#[inline(always)]
pub(crate) fn max16(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc.into_iter().chain(rest.iter().copied()) {
        m = if a > m { a } else { m };
    }
    m
}

/// Dot product with 16 independent lanes, fixed order.
#[inline(always)]
pub(crate) fn dot16(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let cx = x.chunks_exact(16);
    let cy = y.chunks_exact(16);
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for j in 0..16 {
            acc[j] += a[j] * b[j];
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for (a, b) in rx.iter().zip(ry) {
        s += a * b;
    }
    s
}

/// Dot product of long vectors: fixed 4096-element blocks (in parallel), each block's sum
/// converted to f64, blocks added in order — the same bits for any thread count.
pub(crate) fn dot_f64(x: &[f32], y: &[f32]) -> f64 {
    if x.len() <= 4096 {
        return simd(
            #[inline(always)]
            || dot16(x, y),
        ) as f64;
    }
    let parts: Vec<f64> = x
        .par_chunks(4096)
        .zip(y.par_chunks(4096))
        .map(|(a, b)| {
            simd(
                #[inline(always)]
                || dot16(a, b),
            ) as f64
        })
        .collect();
    parts.iter().sum()
}

/// LayerNorm forward over rows of width `d`:
/// `μ = mean(x)`, `σ² = mean((x-μ)²)`, `r = 1/√(σ²+1e-5)`, `y = (x-μ)·r·g + b`.
/// Stores `μ` and `r` per row for the backward pass.
pub(crate) fn layernorm_fwd(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    g: &[f32],
    b: &[f32],
) {
    let _prof = prof::scope(prof::LN);
    let d = g.len();
    y.par_chunks_mut(d * ROW_CHUNK)
        .zip(x.par_chunks(d * ROW_CHUNK))
        .zip(mean.par_chunks_mut(ROW_CHUNK))
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .for_each(|(((y, x), mean), rstd)| {
            simd(
                #[inline(always)]
                || {
                    for (((y, x), m), r) in y
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d))
                        .zip(mean.iter_mut())
                        .zip(rstd.iter_mut())
                    {
                        let mu = sum16(x) / d as f32;
                        let mut acc = [0.0f32; 16];
                        let cx = x.chunks_exact(16);
                        let rest = cx.remainder();
                        for c in cx {
                            for j in 0..16 {
                                let t = c[j] - mu;
                                acc[j] += t * t;
                            }
                        }
                        let mut var = 0.0;
                        for a in acc {
                            var += a;
                        }
                        for &v in rest {
                            var += (v - mu) * (v - mu);
                        }
                        let rs = 1.0 / (var / d as f32 + LN_EPS).sqrt();
                        *m = mu;
                        *r = rs;
                        for (((o, &v), &gg), &bb) in y.iter_mut().zip(x).zip(g).zip(b) {
                            *o = (v - mu) * rs * gg + bb;
                        }
                    }
                },
            )
        });
}

/// LayerNorm backward. With `x̂ = (x-μ)·r` and `ĝ = dy·g`:
/// `dx (+)= r·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂))`, `dg = Σ_rows dy·x̂`, `db = Σ_rows dy`
/// (`dg`, `db` overwritten; summed in the same pass as `dx`, in the row blocks of
/// [`ColSums`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_bwd(
    dx: &mut [f32],
    acc: bool,
    dg: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    g: &[f32],
    sums: &mut ColSums,
) {
    let _prof = prof::scope(prof::LN);
    let d = g.len();
    let rows = mean.len();
    let slots = sums.slots(rows, 2 * d);
    dx[..rows * d]
        .par_chunks_mut(d * SUM_ROWS)
        .zip(dy.par_chunks(d * SUM_ROWS))
        .zip(x.par_chunks(d * SUM_ROWS))
        .zip(mean.par_chunks(SUM_ROWS).zip(rstd.par_chunks(SUM_ROWS)))
        .zip(slots.par_chunks_mut(2 * d))
        .for_each(|((((dx, dy), x), (mean, rstd)), slot)| {
            let (sg, sb) = slot.split_at_mut(d);
            sg.fill(0.0);
            sb.fill(0.0);
            simd(
                #[inline(always)]
                || {
                    for ((((dx, dy), x), &mu), &rs) in dx
                        .chunks_exact_mut(d)
                        .zip(dy.chunks_exact(d))
                        .zip(x.chunks_exact(d))
                        .zip(mean)
                        .zip(rstd)
                    {
                        let mut s1 = [0.0f32; 16];
                        let mut s2 = [0.0f32; 16];
                        let (cd, cx, cg) =
                            (dy.chunks_exact(16), x.chunks_exact(16), g.chunks_exact(16));
                        let (rd, rx, rg) = (cd.remainder(), cx.remainder(), cg.remainder());
                        for ((a, xv), gg) in cd.zip(cx).zip(cg) {
                            for j in 0..16 {
                                let gh = a[j] * gg[j];
                                s1[j] += gh;
                                s2[j] += gh * ((xv[j] - mu) * rs);
                            }
                        }
                        let (mut t1, mut t2) = (0.0f32, 0.0f32);
                        for ((&a, &xv), &gg) in rd.iter().zip(rx).zip(rg) {
                            let gh = a * gg;
                            t1 += gh;
                            t2 += gh * ((xv - mu) * rs);
                        }
                        let m1 = (s1.iter().sum::<f32>() + t1) / d as f32;
                        let m2 = (s2.iter().sum::<f32>() + t2) / d as f32;
                        let sums = sg.iter_mut().zip(sb.iter_mut());
                        for ((((o, &a), &xv), &gg), (sgj, sbj)) in
                            dx.iter_mut().zip(dy).zip(x).zip(g).zip(sums)
                        {
                            let xh = (xv - mu) * rs;
                            let v = rs * (a * gg - m1 - xh * m2);
                            if acc {
                                *o += v;
                            } else {
                                *o = v;
                            }
                            *sgj += a * xh;
                            *sbj += a;
                        }
                    }
                },
            )
        });
    sums.combine(&mut [dg, db]);
}

/// Fused softmax cross-entropy over rows of `logits` (`[N, V]`), in place:
/// with `w_n` the loss weight and `W = Σ w_n`, the loss is `Σ_n w_n·(lse_n - z_n[t_n]) / W`
/// and `logits` is overwritten by its gradient `w_n/W·(softmax(z_n) - onehot(t_n))`.
/// Returns the loss (0 with all-zero gradient when `W = 0`).
pub(crate) fn xent_fwd_bwd(
    logits: &mut [f32],
    row_loss: &mut [f64],
    targets: &[u32],
    weights: &[f32],
    v: usize,
) -> f32 {
    let _prof = prof::scope(prof::XENT);
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let inv = if total > 0.0 {
        (1.0 / total) as f32
    } else {
        0.0
    };
    logits
        .par_chunks_mut(v * ROW_CHUNK)
        .zip(row_loss.par_chunks_mut(ROW_CHUNK))
        .zip(
            targets
                .par_chunks(ROW_CHUNK)
                .zip(weights.par_chunks(ROW_CHUNK)),
        )
        .for_each(|((z, loss), (t, w))| {
            simd(
                #[inline(always)]
                || {
                    for (((z, l), &t), &w) in z.chunks_exact_mut(v).zip(loss).zip(t).zip(w) {
                        if w == 0.0 {
                            z.fill(0.0);
                            *l = 0.0;
                            continue;
                        }
                        let zt = z[t as usize];
                        let mx = max16(z);
                        for e in z.iter_mut() {
                            *e = fast_exp(*e - mx);
                        }
                        let s = sum16(z);
                        *l = w as f64 * ((s.ln() + mx - zt) as f64);
                        let k = w * inv / s;
                        for e in z.iter_mut() {
                            *e *= k;
                        }
                        z[t as usize] -= w * inv;
                    }
                },
            )
        });
    (row_loss.iter().sum::<f64>() * inv as f64) as f32
}

/// Embedding forward `x[b,t] = wte[ids[b,t]] + wpe[t]`.
pub(crate) fn embed_fwd(
    x: &mut [f32],
    wte: &[f32],
    wpe: &[f32],
    ids: &[u32],
    seq: usize,
    d: usize,
) {
    let _prof = prof::scope(prof::ELEM);
    x.par_chunks_mut(d)
        .zip(ids.par_iter())
        .enumerate()
        .for_each(|(n, (row, &id))| {
            let t = n % seq;
            let e = &wte[id as usize * d..(id as usize + 1) * d];
            let p = &wpe[t * d..(t + 1) * d];
            for ((o, &a), &b) in row.iter_mut().zip(e).zip(p) {
                *o = a + b;
            }
        });
}

/// Embedding backward: `dwte[id] = Σ_{n: ids[n]=id} dx[n]` (rows in order),
/// `dwpe[t] = Σ_b dx[b,t]`; both overwritten (untouched rows are zero).
pub(crate) fn embed_bwd(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dx: &[f32],
    ids: &[u32],
    seq: usize,
    d: usize,
) {
    let _prof = prof::scope(prof::ELEM);
    dwte.par_chunks_mut(1 << 14).for_each(|c| c.fill(0.0));
    dwpe.fill(0.0);
    for (n, (&id, row)) in ids.iter().zip(dx.chunks_exact(d)).enumerate() {
        let e = &mut dwte[id as usize * d..(id as usize + 1) * d];
        for (a, &v) in e.iter_mut().zip(row) {
            *a += v;
        }
        let t = n % seq;
        let p = &mut dwpe[t * d..(t + 1) * d];
        for (a, &v) in p.iter_mut().zip(row) {
            *a += v;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub(crate) fn randv(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-1.0..1.0) * scale)
            .collect()
    }

    /// Central differences of the scalar `f` at `x` for the listed coordinates, in f32
    /// with step `h`; returns `(numeric, index)` pairs.
    pub(crate) fn fd(
        x: &mut [f32],
        idx: &[usize],
        h: f32,
        mut f: impl FnMut(&[f32]) -> f64,
    ) -> Vec<f64> {
        idx.iter()
            .map(|&i| {
                let old = x[i];
                x[i] = old + h;
                let fp = f(x);
                x[i] = old - h;
                let fm = f(x);
                x[i] = old;
                (fp - fm) / (2.0 * h as f64)
            })
            .collect()
    }

    /// Relative error `‖a - n‖ / max(‖n‖, floor)` of analytic vs numeric gradients.
    pub(crate) fn rel_err(analytic: &[f64], numeric: &[f64]) -> f64 {
        let diff: f64 = analytic
            .iter()
            .zip(numeric)
            .map(|(a, n)| (a - n) * (a - n))
            .sum();
        let norm: f64 = numeric.iter().map(|n| n * n).sum();
        diff.sqrt() / norm.sqrt().max(1e-6)
    }

    fn weighted(y: &[f32], w: &[f32]) -> f64 {
        y.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    #[test]
    fn gemm_variants_match_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (m, k, n) = (7, 5, 9);
        let a = randv(&mut rng, m * k, 1.0);
        let b = randv(&mut rng, k * n, 1.0);
        let mut c = vec![f32::NAN; m * n];
        mm(&mut c, &a, &b, m, k, n, false);
        for i in 0..m {
            for j in 0..n {
                let e: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                assert!((c[i * n + j] - e).abs() < 1e-5);
            }
        }
        // Aᵀ·C: [k,n] from A [m,k], C [m,n]
        let mut t = vec![f32::NAN; k * n];
        mm_tn(&mut t, &a, &c, m, k, n, false);
        for p in 0..k {
            for j in 0..n {
                let e: f32 = (0..m).map(|i| a[i * k + p] * c[i * n + j]).sum();
                assert!((t[p * n + j] - e).abs() < 1e-4);
            }
        }
        // C·Bᵀ: [m,k] from C [m,n], B [k,n]
        let mut u = vec![1.0; m * k];
        mm_nt(&mut u, &c, &b, m, n, k, true);
        for i in 0..m {
            for p in 0..k {
                let e: f32 = 1.0 + (0..n).map(|j| c[i * n + j] * b[p * n + j]).sum::<f32>();
                assert!((u[i * k + p] - e).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn serial_gemm_gives_the_same_bits_as_threaded_gemm() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (m, k, n) = (512, 300, 257);
        let a = randv(&mut rng, m * k, 1.0);
        let b = randv(&mut rng, k * n, 1.0);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (threaded, serial) = pool.install(|| {
            let mut c = vec![0.5; m * n];
            let mut e = vec![0.5; k * n];
            mm(&mut c, &a, &b, m, k, n, true);
            mm_tn(&mut e, &a, &c, m, k, n, false);
            let mut c2 = vec![0.5; m * n];
            let mut e2 = vec![0.5; k * n];
            serial_gemm(|| {
                assert!(matches!(par_all(), Parallelism::None));
                mm(&mut c2, &a, &b, m, k, n, true);
                mm_tn(&mut e2, &a, &c2, m, k, n, false);
            });
            assert!(matches!(par_all(), Parallelism::Rayon(2)));
            ((c, e), (c2, e2))
        });
        assert!(threaded == serial, "serial and threaded gemm differ");
    }

    #[test]
    fn larger_gemm_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (m, k, n) = (600, 9, 5);
        let a = randv(&mut rng, m * k, 1.0);
        let b = randv(&mut rng, k * n, 1.0);
        let mut c = vec![1.0; m * n];
        mm(&mut c, &a, &b, m, k, n, true);
        let mut d = vec![f32::NAN; m * k];
        mm_nt(&mut d, &c, &b, m, n, k, false);
        for i in (0..m).step_by(37) {
            for j in 0..n {
                let e: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
                assert!((c[i * n + j] - e).abs() < 1e-4);
            }
            for p in 0..k {
                let e: f32 = (0..n).map(|j| c[i * n + j] * b[p * n + j]).sum();
                assert!((d[i * k + p] - e).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let (a, e) = (fast_exp(x), x.exp());
            assert!(((a - e) / e).abs() < 3e-7, "exp({x}) = {a} vs {e}");
            x += 0.0137;
        }
        assert_eq!(fast_exp(-1e9), fast_exp(-87.3));
        assert!(fast_exp(1e9).is_finite());
    }

    #[test]
    fn gelu_matches_reference_and_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut x = randv(&mut rng, 64, 4.0);
        let mut y = vec![0.0; 64];
        gelu_fwd(&mut y, &x);
        for (&a, &v) in y.iter().zip(&x) {
            let r = 0.5 * v * (1.0 + (GELU_C * (v + GELU_A * v * v * v)).tanh());
            assert!((a - r).abs() < 2e-6, "gelu({v}) = {a} vs {r}");
        }
        // the fused forward keeps gelu'(x); backward multiplies the incoming gradient by it
        let (mut y2, mut dg) = (vec![0.0; 64], x.clone());
        bias_gelu_fwd(&mut y2, &mut dg, &[0.0]);
        assert_eq!(y, y2);
        let w = randv(&mut rng, 64, 1.0);
        let mut g = w.clone();
        // as 4 rows of 16: the fused bias gradient is the column sum of the result
        let mut db = vec![f32::NAN; 16];
        gelu_bwd_colsum(&mut g, &dg, &mut db, &mut ColSums::default());
        for (c, &v) in db.iter().enumerate() {
            let want: f32 = (0..4).map(|r| g[r * 16 + c]).sum();
            assert!((v - want).abs() < 1e-6, "db[{c}] = {v} vs {want}");
        }
        let idx: Vec<usize> = (0..64).collect();
        let num = fd(&mut x, &idx, 1e-3, |x| {
            let mut y = vec![0.0; 64];
            gelu_fwd(&mut y, x);
            weighted(&y, &w)
        });
        let an: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&an, &num) < 1e-3, "{}", rel_err(&an, &num));
    }

    #[test]
    fn bias_gelu_equals_gelu_of_shifted_input() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (rows, w) = (20, 12);
        let f0 = randv(&mut rng, rows * w, 3.0);
        let b = randv(&mut rng, w, 1.0);
        let mut f = f0.clone();
        let mut y = vec![0.0; rows * w];
        bias_gelu_fwd(&mut y, &mut f, &b);
        let shifted: Vec<f32> = f0.iter().enumerate().map(|(i, &v)| v + b[i % w]).collect();
        let mut y2 = vec![0.0; rows * w];
        gelu_fwd(&mut y2, &shifted);
        assert_eq!(y, y2);
        let (mut y3, mut dg) = (vec![0.0; rows * w], shifted.clone());
        bias_gelu_fwd(&mut y3, &mut dg, &vec![0.0; w]);
        assert_eq!(f, dg, "f holds gelu'(f + b)");
    }

    #[test]
    fn layernorm_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (rows, d) = (5, 24);
        let mut x = randv(&mut rng, rows * d, 2.0);
        let mut g = randv(&mut rng, d, 1.0);
        let mut b = randv(&mut rng, d, 1.0);
        let w = randv(&mut rng, rows * d, 1.0);
        let run = |x: &[f32], g: &[f32], b: &[f32]| {
            let mut y = vec![0.0; rows * d];
            let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
            layernorm_fwd(&mut y, &mut m, &mut r, x, g, b);
            (y, m, r)
        };
        let (_, m, r) = run(&x, &g, &b);
        let mut dx = vec![0.5; rows * d];
        let (mut dg, mut db) = (vec![9.0; d], vec![9.0; d]);
        layernorm_bwd(
            &mut dx,
            true,
            &mut dg,
            &mut db,
            &w,
            &x,
            &m,
            &r,
            &g,
            &mut ColSums::default(),
        );
        let idx: Vec<usize> = (0..rows * d).collect();
        let (gc, bc) = (g.clone(), b.clone());
        let num = fd(&mut x, &idx, 1e-2, |x| weighted(&run(x, &gc, &bc).0, &w));
        let an: Vec<f64> = dx.iter().map(|&v| v as f64 - 0.5).collect();
        assert!(rel_err(&an, &num) < 2e-3, "dx {}", rel_err(&an, &num));
        let gi: Vec<usize> = (0..d).collect();
        let xc = x.clone();
        let num = fd(&mut g, &gi, 1e-2, |g| weighted(&run(&xc, g, &bc).0, &w));
        let an: Vec<f64> = dg.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&an, &num) < 2e-3, "dg {}", rel_err(&an, &num));
        let gc = g.clone();
        let num = fd(&mut b, &gi, 1e-2, |b| weighted(&run(&xc, &gc, b).0, &w));
        let an: Vec<f64> = db.iter().map(|&v| v as f64).collect();
        assert!(rel_err(&an, &num) < 2e-3, "db {}", rel_err(&an, &num));
    }

    #[test]
    fn linear_gradients() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n, din, dout) = (6, 5, 7);
        let mut x = randv(&mut rng, n * din, 1.0);
        let mut w = randv(&mut rng, din * dout, 1.0);
        let mut b = randv(&mut rng, dout, 1.0);
        let wt = randv(&mut rng, n * dout, 1.0);
        let run = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![f32::NAN; n * dout];
            linear_fwd(&mut y, x, w, b, n, din);
            weighted(&y, &wt)
        };
        let mut dx = vec![0.0; n * din];
        let (mut dw, mut db) = (vec![0.0; din * dout], vec![0.0; dout]);
        linear_bwd(Some((&mut dx, false)), &mut dw, &x, &w, &wt, n, din, dout);
        ColSums::default().of(&mut db, &wt);
        let (xc, wc, bc) = (x.clone(), w.clone(), b.clone());
        let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let num = fd(&mut x, &(0..n * din).collect::<Vec<_>>(), 1e-2, |x| {
            run(x, &wc, &bc)
        });
        assert!(rel_err(&to64(&dx), &num) < 1e-3);
        let num = fd(&mut w, &(0..din * dout).collect::<Vec<_>>(), 1e-2, |w| {
            run(&xc, w, &bc)
        });
        assert!(rel_err(&to64(&dw), &num) < 1e-3);
        let num = fd(&mut b, &(0..dout).collect::<Vec<_>>(), 1e-2, |b| {
            run(&xc, &wc, b)
        });
        assert!(rel_err(&to64(&db), &num) < 1e-3);
    }

    #[test]
    fn column_sums_match_f64_sums_for_any_row_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut sums = ColSums::default();
        for rows in [1, SUM_ROWS - 1, SUM_ROWS, 3 * SUM_ROWS + 5] {
            let cols = 7;
            let x = randv(&mut rng, rows * cols, 1.0);
            let mut got = vec![f32::NAN; cols];
            sums.of(&mut got, &x);
            let mut doubled = x.clone();
            let mut mapped = vec![f32::NAN; cols];
            sums.map(&mut mapped, &mut doubled, |_, r| {
                r.iter_mut().for_each(|v| *v *= 2.0)
            });
            for c in 0..cols {
                let want: f64 = (0..rows).map(|r| x[r * cols + c] as f64).sum();
                assert!((got[c] as f64 - want).abs() < 1e-4, "{rows} rows, col {c}");
                assert_eq!(mapped[c], 2.0 * got[c], "{rows} rows, col {c}");
            }
            assert!(doubled.iter().zip(&x).all(|(&d, &v)| d == 2.0 * v));
        }
    }

    #[test]
    fn xent_gradient_and_mask() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, v) = (6, 11);
        let mut z = randv(&mut rng, n * v, 3.0);
        let t: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
        let w = vec![1.0, 0.0, 2.0, 1.0, 0.5, 1.0];
        let run = |z: &[f32]| {
            let mut zz = z.to_vec();
            let mut rl = vec![0.0; n];
            xent_fwd_bwd(&mut zz, &mut rl, &t, &w, v) as f64
        };
        let mut g = z.clone();
        let mut rl = vec![0.0; n];
        let loss = xent_fwd_bwd(&mut g, &mut rl, &t, &w, v);
        // reference loss in f64
        let mut refl = 0.0;
        for r in 0..n {
            let row = &z[r * v..(r + 1) * v];
            let lse = row.iter().map(|&a| (a as f64).exp()).sum::<f64>().ln();
            refl += w[r] as f64 * (lse - row[t[r] as usize] as f64);
        }
        refl /= w.iter().sum::<f32>() as f64;
        assert!((loss as f64 - refl).abs() < 1e-5);
        assert!(
            g[v..2 * v].iter().all(|&a| a == 0.0),
            "masked row has zero gradient"
        );
        let num = fd(&mut z, &(0..n * v).collect::<Vec<_>>(), 1e-2, run);
        let an: Vec<f64> = g.iter().map(|&a| a as f64).collect();
        assert!(rel_err(&an, &num) < 2e-3, "{}", rel_err(&an, &num));
    }

    #[test]
    fn embedding_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (v, d, b, seq) = (5, 3, 2, 4);
        let wte = randv(&mut rng, v * d, 1.0);
        let wpe = randv(&mut rng, seq * d, 1.0);
        let ids = vec![1u32, 1, 4, 0, 2, 1, 3, 3];
        let dx = randv(&mut rng, b * seq * d, 1.0);
        let mut x = vec![0.0; b * seq * d];
        embed_fwd(&mut x, &wte, &wpe, &ids, seq, d);
        assert_eq!(
            x[d..2 * d],
            [
                wte[d] + wpe[d],
                wte[d + 1] + wpe[d + 1],
                wte[d + 2] + wpe[d + 2]
            ]
        );
        let (mut dwte, mut dwpe) = (vec![7.0; v * d], vec![7.0; seq * d]);
        embed_bwd(&mut dwte, &mut dwpe, &dx, &ids, seq, d);
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
    }
}
