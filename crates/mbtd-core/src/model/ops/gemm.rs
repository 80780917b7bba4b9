//! Matrix products through the `gemm` crate: `C (+)= A·B` on strided views ([`gemm_into`])
//! and the three row-major shapes of a linear layer, `A·B` ([`mm`], [`mm_prec`]), `Aᵀ·B`
//! ([`mm_tn`], weight gradients) and `A·Bᵀ` ([`mm_nt`], input gradients). With
//! [`Precision::Bf16`] the three shapes run through `bf16::gemm_bf16` instead.
//!
//! Determinism: `gemm` splits only the output among threads, never a reduction, so each
//! element `C[i,j] = Σ_p A[i,p]·B[p,j]` is summed in the same order for any thread count.
//! [`serial_gemm`] keeps a thread's products on that thread (for branches that already run
//! side by side) without changing their results.

use super::bf16::{Precision, gemm_bf16};
use ::gemm::Parallelism;
use rayon::prelude::*;

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
    /// Element `(r, c)`, or 0 outside `rows × cols` (the padding of packed panels).
    #[inline(always)]
    pub fn at_or_zero(self, r: usize, c: usize, rows: usize, cols: usize) -> f32 {
        if r < rows && c < cols {
            self.data[r * self.rs + c * self.cs]
        } else {
            0.0
        }
    }
}

/// A dense row-major matrix `[rows, cols]`: the first `rows·cols` elements of `data`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols }
    }
}

/// The operands of one product `C[m,n] (+)= A[m,k]·B[k,n]` on strided views.
#[derive(Clone, Copy)]
pub(crate) struct Operands<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: View<'a>,
    pub b: View<'a>,
}

impl Operands<'_> {
    /// Panics, naming `kernel`, unless a `C` of `c_len` elements with row stride `c_rs`,
    /// `A` and `B` hold every element the product addresses.
    pub fn check(&self, c_len: usize, c_rs: usize, kernel: &str) {
        let Self { m, n, k, a, b } = *self;
        assert!(span(m, n, c_rs, 1) <= c_len, "{kernel}: C too small");
        assert!(
            span(m, k, a.rs, a.cs) <= a.data.len(),
            "{kernel}: A too small"
        );
        assert!(
            span(k, n, b.rs, b.cs) <= b.data.len(),
            "{kernel}: B too small"
        );
    }
}

/// `C[m,n] (+)= A[m,k]·B[k,n]` with `C` row-major of row stride `c_rs`.
/// `acc = false` overwrites `C` (its old contents are never read).
pub(crate) fn gemm_into(p: Operands<'_>, c: &mut [f32], c_rs: usize, acc: bool, par: Parallelism) {
    p.check(c.len(), c_rs, "gemm");
    let Operands { m, n, k, .. } = p;
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
    // SAFETY: `check` bounds every element the strided views address, `c` is
    // exclusively borrowed and does not alias `a`/`b` (Rust borrow rules).
    unsafe { gemm_raw(p, c.as_mut_ptr(), c_rs, acc, par) }
}

/// [`gemm_into`] on a raw `C` pointer, `k > 0`.
///
/// # Safety
/// `C` rows `0..m`, columns `0..n` at `c + i·c_rs + j` must be valid for writes and
/// touched by nothing else meanwhile; `a`, `b` must cover `m × k`, `k × n`.
unsafe fn gemm_raw(p: Operands<'_>, c: *mut f32, c_rs: usize, acc: bool, par: Parallelism) {
    let Operands { m, n, k, a, b } = p;
    // SAFETY: the caller's contract.
    unsafe {
        ::gemm::gemm(
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
///
/// ```
/// use mbtd_core::model::ops::mm;
///
/// let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
/// let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // [3, 2]
/// let mut c = [100.0f32; 4];
/// mm(&mut c, &a, &b, 2, 3, 2, false);
/// assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
/// mm(&mut c, &a, &b, 2, 3, 2, true); // accumulate
/// assert_eq!(c, [8.0, 10.0, 20.0, 22.0]);
/// ```
pub fn mm(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, acc: bool) {
    mm_prec(Precision::F32, c, a, b, m, k, n, acc);
}

/// `C[m,n] (+)= A·B` in `prec` for a row-major, dense `C`, on every thread.
fn product(prec: Precision, p: Operands<'_>, c: &mut [f32], acc: bool) {
    let kernel = match prec {
        Precision::F32 => gemm_into,
        Precision::Bf16 => gemm_bf16,
    };
    kernel(p, c, p.n, acc, par_all());
}

/// [`mm`] in the given precision (see [`super::bf16`] for `Bf16`).
#[allow(clippy::too_many_arguments)]
pub fn mm_prec(
    prec: Precision,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
) {
    let (a, b) = (View::rm(a, k), View::rm(b, n));
    product(prec, Operands { m, n, k, a, b }, c, acc);
}

/// Output columns per task of [`mm_tn`].
const DW_COLS: usize = 128;

/// `C[k,n] (+)= A[m,k]ᵀ·B[m,n]` (weight gradient `dW = xᵀ·dy`), in tasks of
/// [`DW_COLS`] output columns, each a single-threaded `gemm` (rayon spreads the
/// tasks; a branch pair's idle thread takes some). `gemm` runs these long reductions
/// 3–15 % faster per 128 columns than on the whole width (measured on our shapes), and
/// every element's arithmetic is the same whoever runs its task. In bf16 it is one
/// [`gemm_bf16`] over the whole width (which splits rows of `C` among threads).
pub(crate) fn mm_tn(prec: Precision, c: &mut [f32], a: Mat<'_>, b: Mat<'_>, acc: bool) {
    assert_eq!(a.rows, b.rows, "mm_tn: A and B differ in rows");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (av, bv) = (View::tr(a.data, k), View::rm(b.data, n));
    let p = Operands {
        m: k,
        n,
        k: m,
        a: av,
        b: bv,
    };
    if prec == Precision::Bf16 {
        return gemm_bf16(p, c, n, acc, par_all());
    }
    p.check(c.len(), n, "gemm");
    if m == 0 || k == 0 {
        return gemm_into(p, c, n, acc, Parallelism::None);
    }
    let cp = SharedOut(c.as_mut_ptr());
    (0..n.div_ceil(DW_COLS)).into_par_iter().for_each(|q| {
        let j0 = q * DW_COLS;
        let w = DW_COLS.min(n - j0);
        let bq = View {
            data: &b.data[j0..],
            ..bv
        };
        let task = Operands { n: w, b: bq, ..p };
        // SAFETY: task `q` alone writes columns `j0..j0 + w` of `C` (bounded by `check`
        // above); `A` and this `B` view are in bounds by the same check.
        unsafe { gemm_raw(task, cp.at(j0), n, acc, Parallelism::None) }
    });
}

/// The output of a product whose tasks write disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: used only by tasks that write disjoint elements (see `mm_tn`, `gemm_bf16`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `off` must lie within the original buffer.
    pub(crate) unsafe fn at(self, off: usize) -> *mut f32 {
        unsafe { self.0.add(off) }
    }
}

/// `C[m,n] (+)= A[m,k]·B[n,k]ᵀ` (input gradient `dx = dy·Wᵀ`).
pub(crate) fn mm_nt(prec: Precision, c: &mut [f32], a: Mat<'_>, b: Mat<'_>, acc: bool) {
    assert_eq!(a.cols, b.cols, "mm_nt: A and B differ in columns");
    let (m, k, n) = (a.rows, a.cols, b.rows);
    let (a, b) = (View::rm(a.data, k), View::tr(b.data, k));
    product(prec, Operands { m, n, k, a, b }, c, acc);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::randv;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

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
        mm_tn(
            Precision::F32,
            &mut t,
            Mat::new(&a, m, k),
            Mat::new(&c, m, n),
            false,
        );
        for p in 0..k {
            for j in 0..n {
                let e: f32 = (0..m).map(|i| a[i * k + p] * c[i * n + j]).sum();
                assert!((t[p * n + j] - e).abs() < 1e-4);
            }
        }
        // C·Bᵀ: [m,k] from C [m,n], B [k,n]
        let mut u = vec![1.0; m * k];
        mm_nt(
            Precision::F32,
            &mut u,
            Mat::new(&c, m, n),
            Mat::new(&b, k, n),
            true,
        );
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
            mm_tn(
                Precision::F32,
                &mut e,
                Mat::new(&a, m, k),
                Mat::new(&c, m, n),
                false,
            );
            let mut c2 = vec![0.5; m * n];
            let mut e2 = vec![0.5; k * n];
            serial_gemm(|| {
                assert!(matches!(par_all(), Parallelism::None));
                mm(&mut c2, &a, &b, m, k, n, true);
                mm_tn(
                    Precision::F32,
                    &mut e2,
                    Mat::new(&a, m, k),
                    Mat::new(&c2, m, n),
                    false,
                );
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
        mm_nt(
            Precision::F32,
            &mut d,
            Mat::new(&c, m, n),
            Mat::new(&b, k, n),
            false,
        );
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
}
