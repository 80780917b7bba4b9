//! `mbtd bench products`: the matrix products of one training step of a preset, each
//! timed alone, in either precision. Every linear layer `y = x·W` (`W` stored
//! `[d_in, d_out]`) does three products per step: the forward `x·W` (`m = tokens`,
//! `k = d_in`, `n = d_out`), the input gradient `dy·Wᵀ` (`k = d_out`, `n = d_in`) and the
//! weight gradient `xᵀ·dy` (`m = d_in`, `k = tokens`, `n = d_out`), with the operands laid
//! out as the trainer lays them out. The report gives each product's GFLOP/s (median of
//! `repeats`) and the products' share of a step: their time weighted by how often a step
//! runs them (once per branch and layer for the block's four linears, once for the head).

use super::bench::{BenchPreset, pool};
use super::ops::{Mat, Precision, mm_nt, mm_prec, mm_tn};
use super::{ModelConfig, ModelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::time::Instant;

/// Options of `mbtd bench products`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProductsBenchArgs {
    /// Model whose products are timed.
    #[arg(long, value_enum, default_value_t = BenchPreset::Default)]
    pub preset: BenchPreset,
    /// Rayon threads each product runs on (1: as a branch's products run during a
    /// training step, where branches take a thread each; 0 = all cores).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Arithmetic of the products.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Tokens per step (rows of the activations).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Timed runs of each product; the figure is their median.
    #[arg(long, default_value_t = 7)]
    pub repeats: usize,
}

/// One linear layer of the preset: its name, `d_in`, `d_out` and how many a step runs.
fn linears(cfg: &ModelConfig) -> Vec<(&'static str, usize, usize, usize)> {
    let (d, h, blocks) = (cfg.d_model, 4 * cfg.d_model, cfg.n_layers * cfg.branches);
    vec![
        ("qkv", d, 3 * d, blocks),
        ("out", d, d, blocks),
        ("ffn_up", d, h, blocks),
        ("ffn_down", h, d, blocks),
        ("head", d, cfg.vocab_size, 1),
    ]
}

/// Median seconds of `repeats` runs of `f` (after one untimed run).
fn median_secs(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Times every product of one training step of the preset (see the module docs).
pub fn bench_products(opts: &ProductsBenchArgs) -> Result<Value, ModelError> {
    let cfg = opts.preset.config(0);
    let m = opts.tokens;
    if m == 0 {
        return Err(ModelError::Config(
            "bench products: --tokens must be >= 1".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut randv =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let prec = opts.precision;
    pool(opts.threads)?.install(|| {
        let mut rows = Vec::new();
        let mut step_secs = 0.0;
        let mut step_flop = 0.0;
        for (name, din, dout, count) in linears(&cfg) {
            let (x, w, dy) = (randv(m * din), randv(din * dout), randv(m * dout));
            let mut y = vec![0.0f32; m * dout];
            let mut dx = vec![0.0f32; m * din];
            let mut dw = vec![0.0f32; din * dout];
            let flop = 2.0 * (m * din * dout) as f64;
            let runs: [(&str, usize, usize, usize, f64); 3] = [
                (
                    "forward",
                    m,
                    din,
                    dout,
                    median_secs(opts.repeats, || {
                        mm_prec(prec, &mut y, &x, &w, m, din, dout, false)
                    }),
                ),
                (
                    "input_grad",
                    m,
                    dout,
                    din,
                    median_secs(opts.repeats, || {
                        mm_nt(
                            prec,
                            &mut dx,
                            Mat::new(&dy, m, dout),
                            Mat::new(&w, din, dout),
                            false,
                        )
                    }),
                ),
                (
                    "weight_grad",
                    din,
                    m,
                    dout,
                    median_secs(opts.repeats, || {
                        mm_tn(
                            prec,
                            &mut dw,
                            Mat::new(&x, m, din),
                            Mat::new(&dy, m, dout),
                            false,
                        )
                    }),
                ),
            ];
            for (product, mm, kk, nn, secs) in runs {
                step_secs += secs * count as f64;
                step_flop += flop * count as f64;
                rows.push(json!({
                    "layer": name,
                    "product": product,
                    "m": mm, "k": kk, "n": nn,
                    "per_step": count,
                    "ms": secs * 1e3,
                    "gflop_per_sec": flop / secs / 1e9,
                }));
            }
        }
        Ok(json!({
            "bench": "products",
            "preset": opts.preset.name(),
            "precision": prec.name(),
            "threads": rayon::current_num_threads(),
            "tokens": m,
            "repeats": opts.repeats,
            "avx512_bf16": super::ops::has_avx512_bf16(),
            "step_products_ms": step_secs * 1e3,
            "step_gflop_per_sec": step_flop / step_secs / 1e9,
            "products": rows,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_bench_reports_every_product_of_a_step() {
        let opts = ProductsBenchArgs {
            preset: BenchPreset::Small,
            threads: 1,
            precision: Precision::Bf16,
            tokens: 64,
            repeats: 1,
        };
        let out = bench_products(&opts).unwrap();
        let rows = out["products"].as_array().unwrap();
        assert_eq!(rows.len(), 15, "five linears × three products");
        let head_grad = &rows[14];
        assert_eq!(head_grad["layer"], "head");
        assert_eq!(head_grad["product"], "weight_grad");
        assert_eq!(
            (head_grad["m"].as_u64(), head_grad["k"].as_u64()),
            (Some(64), Some(64))
        );
        assert!(
            rows.iter()
                .all(|r| r["gflop_per_sec"].as_f64().unwrap() > 0.0)
        );
        assert!(out["step_products_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(out["precision"], "bf16");
    }
}
