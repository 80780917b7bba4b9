//! Speed benchmarks of the model core (`mbtd bench train|generate`), each returning one
//! JSON object. The `default` preset is ARCHITECTURE.md's: V 4096, d 256, 4 heads, L 4,
//! K 4, T 128, batch 16, random tokens, AdamW + clipping.

use super::generate::GenerateConfig;
use super::{
    Availability, AvailabilityConfig, Batch, Model, ModelConfig, ModelError, OptimConfig, Trainer,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::time::Instant;

/// The model a speed benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPreset {
    /// ARCHITECTURE.md's yardstick: V 4096, d 256, 4 heads, L 4, K 4 (14.77 M params).
    Default,
    /// A quick check: V 512, d 64, 2 heads, L 2, K 2 (0.27 M params).
    Small,
}

impl BenchPreset {
    /// The preset's model, with room for sequences of `seq` tokens.
    pub fn config(self, seq: usize) -> ModelConfig {
        let base = match self {
            Self::Default => ModelConfig::default(),
            Self::Small => ModelConfig {
                vocab_size: 512,
                d_model: 64,
                n_heads: 2,
                n_layers: 2,
                branches: 2,
                ..ModelConfig::default()
            },
        };
        ModelConfig {
            max_seq_len: seq.max(base.max_seq_len),
            ..base
        }
    }

    /// The name `--preset` takes.
    pub(crate) fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .expect("every preset has a name")
            .get_name()
            .to_owned()
    }
}

/// Options of `mbtd bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// Model to train.
    #[arg(long, value_enum, default_value_t = BenchPreset::Default)]
    pub preset: BenchPreset,
    /// Timed training steps (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Rayon threads (gemm and the kernels); 0 = all cores.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Availability probability of every branch (1 = all active).
    #[arg(long, default_value_t = 1.0)]
    pub p_active: f64,
    /// Train on the rows of this CSV file, batched as the daemon batches new rows, instead
    /// of random full windows; reports real (text) tokens per second and the share of
    /// positions that hold text (see `mbtd::learn::data_bench`).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// With `--data`: pack rows into windows as the daemon does (`training.packing`);
    /// `false` = one row per padded window.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub packing: bool,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Report the wall time of each phase (forward, backward, optimizer) and the time of
    /// each kernel category summed over threads (`kernel_thread_ms`) too.
    #[arg(long, default_value_t = false)]
    pub phases: bool,
    /// Seed of the model, the tokens and the masks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Arithmetic of the linear layers' products (`model.precision`).
    #[arg(long, value_enum, default_value_t = super::Precision::F32)]
    pub precision: super::Precision,
}

impl TrainBenchArgs {
    /// The model these options train: the preset with room for `seq` tokens, in
    /// `precision`.
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            precision: self.precision,
            ..self.preset.config(self.seq)
        }
    }

    /// A `bench train` result: the options it ran with, then `fields`.
    pub fn report(&self, fields: Value) -> Value {
        let mut out = json!({
            "bench": "train",
            "preset": self.preset.name(),
            "threads": self.threads,
            "p_active": self.p_active,
            "batch": self.batch,
            "seq": self.seq,
            "steps": self.steps,
            "precision": self.precision.name(),
            "avx512_bf16": super::ops::has_avx512_bf16(),
        });
        if let (Value::Object(out), Value::Object(fields)) = (&mut out, fields) {
            out.extend(fields);
        }
        out
    }
}

impl Default for TrainBenchArgs {
    fn default() -> Self {
        Self {
            preset: BenchPreset::Default,
            steps: 10,
            warmup: 2,
            threads: 2,
            p_active: 1.0,
            data: None,
            packing: true,
            batch: 16,
            seq: 128,
            phases: false,
            seed: 1,
            precision: super::Precision::F32,
        }
    }
}

/// Options of `mbtd bench generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateBenchArgs {
    /// Model to generate with.
    #[arg(long, value_enum, default_value_t = BenchPreset::Default)]
    pub preset: BenchPreset,
    /// Tokens to generate (batch 1).
    #[arg(long, default_value_t = 100)]
    pub tokens: usize,
    /// Prompt length (random tokens).
    #[arg(long, default_value_t = 16)]
    pub prompt: usize,
    /// Rayon threads; 0 = all cores.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seed of the model, prompt and sampling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Generations timed (each from its own random prompt); the figure is their median.
    #[arg(long, default_value_t = 7)]
    pub repeats: usize,
}

impl Default for GenerateBenchArgs {
    fn default() -> Self {
        Self {
            preset: BenchPreset::Default,
            tokens: 100,
            prompt: 16,
            threads: 2,
            seed: 1,
            repeats: 7,
        }
    }
}

/// Peak resident set size in KiB (`VmHWM` of `/proc/self/status`), when readable.
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) used by this process so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` fills the zero-initialised struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Share of the machine's CPU time that was idle over the last `ms` milliseconds
/// (from `/proc/stat`), to report how loaded the machine was around a measurement.
pub fn machine_idle_share(ms: u64) -> Option<f64> {
    let read = || -> Option<(u64, u64)> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = s
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        Some((v.iter().take(8).sum(), v.get(3)? + v.get(4)?))
    };
    let (t1, i1) = read()?;
    std::thread::sleep(std::time::Duration::from_millis(ms));
    let (t2, i2) = read()?;
    (t2 > t1).then(|| (i2 - i1) as f64 / (t2 - t1) as f64)
}

/// A fresh model of `cfg` (seed `opts.seed`) with its trainer (no warm-up) and an
/// availability model of `opts.p_active`; also the parameter count.
pub(crate) fn bench_trainer(
    cfg: &ModelConfig,
    opts: &TrainBenchArgs,
) -> Result<(Trainer, Availability, usize), ModelError> {
    let model = Model::new(cfg.clone(), opts.seed)?;
    let params = model.num_params();
    let widths = model.widths();
    let trainer = Trainer::new(
        model,
        OptimConfig {
            warmup_steps: 0,
            ..OptimConfig::default()
        },
    )?;
    let acfg = AvailabilityConfig {
        p: opts.p_active,
        ..AvailabilityConfig::default()
    };
    let avail = Availability::new(acfg, &widths, opts.seed)
        .map_err(|e| ModelError::Config(e.to_string()))?;
    Ok((trainer, avail, params))
}

/// A rayon pool of `threads` threads for a benchmark.
pub(crate) fn pool(threads: usize) -> Result<rayon::ThreadPool, ModelError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| {
            ModelError::Config(format!(
                "bench threads = {threads}: cannot build the thread pool: {e}"
            ))
        })
}

/// A batch of uniformly random token ids (inputs and targets drawn from `rng` in that
/// order), every position a loss target except the first `prompt` of each row.
pub fn random_batch(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    prompt: usize,
    rng: &mut ChaCha8Rng,
) -> Batch {
    let n = batch * seq;
    let v = cfg.vocab_size as u32;
    Batch {
        batch,
        seq,
        inputs: (0..n).map(|_| rng.random_range(0..v)).collect(),
        targets: (0..n).map(|_| rng.random_range(0..v)).collect(),
        loss_mask: (0..n)
            .map(|i| if i % seq < prompt { 0.0 } else { 1.0 })
            .collect(),
        segments: None,
        times: None,
    }
}

fn stats_ms(times: &mut [f64]) -> (f64, f64) {
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    times.sort_by(f64::total_cmp);
    let p50 = times.get(times.len() / 2).copied().unwrap_or(0.0);
    (mean * 1e3, p50 * 1e3)
}

/// Training-step throughput on the chosen preset's model.
pub fn bench_train(opts: &TrainBenchArgs) -> Result<Value, ModelError> {
    if opts.steps == 0 || !(0.0..=1.0).contains(&opts.p_active) {
        return Err(ModelError::Config(format!(
            "bench: steps = {} must be >= 1 and p_active = {} in [0, 1]",
            opts.steps, opts.p_active
        )));
    }
    let cfg = opts.model_config();
    pool(opts.threads)?.install(|| {
        let (mut trainer, mut avail, params) = bench_trainer(&cfg, opts)?;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let batches: Vec<Batch> = (0..4)
            .map(|_| random_batch(&cfg, opts.batch, opts.seq, 0, &mut rng))
            .collect();
        let mut times = Vec::with_capacity(opts.steps);
        let mut cpu0 = 0.0;
        super::ops::profile::enable(opts.phases);
        let mut phases = [0.0f64; 3];
        let mut active = 0usize;
        let mut loss = 0.0;
        for s in 0..opts.warmup + opts.steps {
            if s == opts.warmup {
                super::ops::profile::take();
                cpu0 = cpu_seconds();
            }
            let masks = avail.draw();
            let scales = avail.scales(trainer.optim().max_scale);
            let batch = &batches[s % batches.len()];
            let t0 = Instant::now();
            let r = if opts.phases {
                let (report, ph) = trainer.train_step_timed(batch, &masks, &scales)?;
                if s >= opts.warmup {
                    for (a, b) in phases.iter_mut().zip(ph) {
                        *a += b;
                    }
                }
                report
            } else {
                trainer.train_step(batch, &masks, &scales)?
            };
            let dt = t0.elapsed().as_secs_f64();
            if s >= opts.warmup {
                times.push(dt);
                active += r.computed.iter().flatten().filter(|&&c| c).count();
                loss = r.loss;
            }
        }
        let total: f64 = times.iter().sum();
        let cpu_per_step = (cpu_seconds() - cpu0) / opts.steps as f64;
        let tokens = (opts.batch * opts.seq * opts.steps) as f64;
        let (mean, p50) = stats_ms(&mut times);
        let mut out = opts.report(json!({
            "params": params,
            "tokens_per_sec": tokens / total,
            "step_ms_mean": mean,
            "step_ms_p50": p50,
            "cpu_ms_per_step": cpu_per_step * 1e3,
            "machine_idle_share_after": machine_idle_share(500),
            "active_branches_mean": active as f64 / (opts.steps * cfg.n_layers) as f64,
            "final_loss": loss,
            "peak_rss_kib": peak_rss_kib(),
        }));
        if opts.phases {
            let n = opts.steps as f64 * 1e-3;
            out["phase_ms"] = json!({
                "forward": phases[0] / n,
                "backward": phases[1] / n,
                "optimizer": phases[2] / n,
            });
            let kernels = super::ops::profile::take();
            super::ops::profile::enable(false);
            let mut k = serde_json::Map::new();
            for (name, t) in super::ops::profile::NAMES.iter().zip(kernels) {
                k.insert(name.to_string(), json!(t / n));
            }
            out["kernel_thread_ms"] = Value::Object(k);
        }
        Ok(out)
    })
}

/// Batch-1 KV-cache generation throughput on the chosen preset's model.
pub fn bench_generate(opts: &GenerateBenchArgs) -> Result<Value, ModelError> {
    let cfg = opts.preset.config(0);
    if opts.prompt == 0 || opts.prompt + opts.tokens > cfg.max_seq_len {
        return Err(ModelError::Config(format!(
            "bench: prompt = {} must be >= 1 and prompt + tokens = {} <= max_seq_len = {}",
            opts.prompt,
            opts.prompt + opts.tokens,
            cfg.max_seq_len
        )));
    }
    pool(opts.threads)?.install(|| {
        let model = Model::new(cfg.clone(), opts.seed)?;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let gcfg = GenerateConfig {
            max_tokens: opts.tokens,
            temperature: 1.0,
            top_k: 50,
            seed: opts.seed,
            ..GenerateConfig::default()
        };
        let masks = model.all_active();
        let (mut rates, mut prefill, mut n) = (Vec::new(), Vec::new(), 0);
        for _ in 0..opts.repeats.max(1) {
            let prompt: Vec<u32> = (0..opts.prompt)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            let t0 = Instant::now();
            let mut generation = model.generate(&prompt, &masks, &gcfg)?;
            prefill.push(t0.elapsed().as_secs_f64());
            let t1 = Instant::now();
            n = generation.by_ref().count();
            rates.push(n as f64 / t1.elapsed().as_secs_f64());
        }
        let (_, prefill_ms) = stats_ms(&mut prefill);
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        Ok(json!({
            "machine_idle_share_after": machine_idle_share(500),
            "bench": "generate",
            "preset": opts.preset.name(),
            "threads": opts.threads,
            "prompt": opts.prompt,
            "tokens": n,
            "repeats": rates.len(),
            "tokens_per_sec": median,
            "tokens_per_sec_min": rates[0],
            "tokens_per_sec_max": rates[rates.len() - 1],
            "prefill_ms_p50": prefill_ms,
            "ms_per_token": 1e3 / median,
            "params": model.num_params(),
            "peak_rss_kib": peak_rss_kib(),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_bench_reports_the_median_of_its_repeats() {
        let out = bench_generate(&GenerateBenchArgs {
            tokens: 4,
            repeats: 3,
            ..GenerateBenchArgs::default()
        })
        .unwrap();
        assert_eq!(out["bench"], "generate");
        assert_eq!(
            (out["tokens"].as_u64(), out["repeats"].as_u64()),
            (Some(4), Some(3))
        );
        let rate = |k: &str| out[k].as_f64().unwrap();
        assert!(rate("tokens_per_sec_min") <= rate("tokens_per_sec"));
        assert!(rate("tokens_per_sec") <= rate("tokens_per_sec_max"));
        assert!((rate("ms_per_token") - 1e3 / rate("tokens_per_sec")).abs() < 1e-9);
        assert_eq!(out["params"], 14_766_608);
        let too_long = GenerateBenchArgs {
            tokens: 200,
            ..GenerateBenchArgs::default()
        };
        assert!(bench_generate(&too_long).is_err());
    }

    #[test]
    fn train_bench_runs_the_chosen_preset() {
        let opts = TrainBenchArgs {
            preset: BenchPreset::Small,
            steps: 2,
            warmup: 1,
            batch: 2,
            seq: 16,
            phases: true,
            ..TrainBenchArgs::default()
        };
        let out = bench_train(&opts).unwrap();
        assert_eq!(
            (out["bench"].as_str(), out["preset"].as_str()),
            (Some("train"), Some("small"))
        );
        let small = Model::new(BenchPreset::Small.config(16), 1).unwrap();
        assert_eq!(out["params"].as_u64(), Some(small.num_params() as u64));
        assert!(out["tokens_per_sec"].as_f64().unwrap() > 0.0);
        assert!(out["final_loss"].as_f64().unwrap().is_finite());
        assert!(out["kernel_thread_ms"]["linear_gemm"].as_f64().unwrap() > 0.0);
        assert_eq!(out["active_branches_mean"].as_f64(), Some(2.0));
        let bad = TrainBenchArgs {
            p_active: 1.5,
            ..opts.clone()
        };
        assert!(bench_train(&bad).is_err());
        // in this test, not one of its own: the kernel profiler is process-wide
        let opts = TrainBenchArgs {
            phases: false,
            precision: crate::model::Precision::Bf16,
            ..opts
        };
        let bf16 = bench_train(&opts).unwrap();
        let f32 = bench_train(&TrainBenchArgs {
            precision: crate::model::Precision::F32,
            ..opts.clone()
        })
        .unwrap();
        assert_eq!(bf16["precision"], "bf16");
        assert_eq!(f32["precision"], "f32");
        let (lb, lf) = (
            bf16["final_loss"].as_f64().unwrap(),
            f32["final_loss"].as_f64().unwrap(),
        );
        // the same steps on the same batches: the losses differ only by bf16 rounding
        assert!(
            lb != lf && (lb - lf).abs() < 0.01 * lf,
            "bf16 {lb} vs f32 {lf}"
        );
    }
}
