//! Model-core benchmarks: `cargo run --release --example bench_model -- train|generate|gemm [opts]`.
//! Prints one JSON object per run.

use clap::{Parser, Subcommand};
use mbtd::model::bench::{GenerateBenchArgs, TrainBenchArgs, bench_generate, bench_train};
use std::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Training-step throughput.
    Train(TrainBenchArgs),
    /// Batch-1 KV-cache generation throughput.
    Generate(GenerateBenchArgs),
    /// Raw sgemm GFLOP/s of `gemm` on the preset's shapes (x·W, xᵀ·dy, dy·Wᵀ).
    Gemm {
        /// Threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

/// GFLOP/s of `C[m,n] = A·B` with the given strides (A `m×k`, B `k×n`).
fn gflops(m: usize, k: usize, n: usize, a_t: bool, b_t: bool) -> f64 {
    gflops_c(m, k, n, a_t, b_t, false)
}

/// As [`gflops`], with `C` stored column-major when `c_t`.
fn gflops_c(m: usize, k: usize, n: usize, a_t: bool, b_t: bool, c_t: bool) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let (a_rs, a_cs) = if a_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if b_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        // SAFETY: the buffers hold exactly the m×k, k×n and m×n elements addressed.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                if c_t { m as isize } else { 1 },
                if c_t { 1 } else { n as isize },
                false,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            )
        }
    }
    2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// GFLOP/s of `C = A·B` (row-major, A `m×k`) with the rows of `C` split into fixed
/// chunks, each a single-threaded gemm, the chunks spread over the rayon pool.
fn gflops_split(m: usize, k: usize, n: usize, chunk: usize) -> f64 {
    use rayon::prelude::*;
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        c.par_chunks_mut(chunk * n)
            .zip(a.par_chunks(chunk * k))
            .for_each(|(c, a)| {
                let rows = c.len() / n;
                // SAFETY: `a` has rows×k, `b` k×n and `c` rows×n elements.
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
    }
    2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() -> anyhow::Result<()> {
    let out = match Cli::parse().cmd {
        Cmd::Train(a) => bench_train(&a)?,
        Cmd::Generate(a) => bench_generate(&a)?,
        Cmd::Gemm { threads } => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            pool.install(|| {
                serde_json::json!({
                    "x_w_2048x256x1024": gflops(2048, 256, 1024, false, false),
                    "x_w_2048x1024x256": gflops(2048, 1024, 256, false, false),
                    "xt_dy_256x2048x1024": gflops(256, 2048, 1024, true, false),
                    "dy_wt_2048x1024x256": gflops(2048, 1024, 256, false, true),
                    "head_2048x256x4096": gflops(2048, 256, 4096, false, false),
                    "dyt_x_colmajor_1024x2048x256": gflops_c(1024, 2048, 256, true, false, true),
                    "xt_dy_256x2048x768": gflops(256, 2048, 768, true, false),
                    "attn_qkt_128x64x128": gflops(128, 64, 128, false, true),
                    "split256_x_w_2048x256x1024": gflops_split(2048, 256, 1024, 256),
                    "split512_x_w_2048x256x1024": gflops_split(2048, 256, 1024, 512),
                    "split256_x_w_2048x1024x256": gflops_split(2048, 1024, 256, 256),
                })
            })
        }
    };
    println!("{out}");
    Ok(())
}
