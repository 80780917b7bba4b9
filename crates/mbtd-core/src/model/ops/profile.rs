//! Opt-in profile of the kernels by category (for `bench train --phases`): the time spent
//! in each, summed over the threads that ran it (a layer's branches run two at a time, so
//! the sum exceeds the wall time). Off by default; when off a scope costs one relaxed
//! atomic load.
//!
//! ```
//! use mbtd_core::model::ops::profile;
//!
//! profile::enable(true);
//! {
//!     let _scope = profile::scope(profile::LN);
//!     std::thread::sleep(std::time::Duration::from_millis(2));
//! }
//! let secs = profile::take();
//! profile::enable(false);
//! assert_eq!(profile::NAMES[profile::LN], "layernorm");
//! assert!(secs[profile::LN] >= 0.002);
//! assert_eq!(profile::take(), [0.0; 6], "take resets the counters");
//! ```

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
