//! `mbtd bench outage`: does training with availability masks make the model robust to a
//! branch outage, and what does it cost at full width?
//!
//! The same small MBT model is trained on the same synthetic stream (a sparse first-order
//! Markov chain: each token has `fanout` possible successors, so the best achievable loss is
//! `ln fanout`) with availability `p` ∈ {1.0, 0.9, 0.75, 0.5}, then evaluated on held-out
//! sequences with all branches, with each single branch removed, and with random masks.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::model::availability::{Availability, AvailabilityConfig};
use crate::model::{Batch, Masks, Model, ModelConfig, ModelError, OptimConfig, Trainer};

/// Options of `mbtd bench outage`.
#[derive(Debug, Clone, clap::Args)]
pub struct OutageBenchArgs {
    /// Training steps per setting.
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Availability probabilities to compare (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1.0,0.9,0.75,0.5")]
    pub p: Vec<f64>,
    /// Branches per layer.
    #[arg(long, default_value_t = 4)]
    pub branches: usize,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

const VOCAB: usize = 256;
pub(crate) const FANOUT: usize = 4;
const SEQ: usize = 32;
pub(crate) const BATCH: usize = 16;

/// The chain: `next[t]` lists the successors of token `t`.
pub(crate) fn chain(seed: u64) -> Vec<[u32; FANOUT]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..VOCAB)
        .map(|_| std::array::from_fn(|_| rng.random_range(0..VOCAB as u32)))
        .collect()
}

pub(crate) fn batch(next: &[[u32; FANOUT]], rng: &mut ChaCha8Rng, n: usize) -> Batch {
    let mut inputs = Vec::with_capacity(n * SEQ);
    let mut targets = Vec::with_capacity(n * SEQ);
    for _ in 0..n {
        let mut t = rng.random_range(0..VOCAB as u32);
        for _ in 0..SEQ {
            let nx = next[t as usize][rng.random_range(0..FANOUT)];
            inputs.push(t);
            targets.push(nx);
            t = nx;
        }
    }
    Batch {
        batch: n,
        seq: SEQ,
        inputs,
        targets,
        loss_mask: vec![1.0; n * SEQ],
        segments: None,
        times: None,
    }
}

pub(crate) fn model_config(branches: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: VOCAB,
        d_model: 64,
        n_heads: 2,
        n_layers: 2,
        branches,
        max_seq_len: SEQ,
        ..ModelConfig::default()
    }
}

fn one_setting(
    a: &OutageBenchArgs,
    p: f64,
    next: &[[u32; FANOUT]],
    control: &Batch,
) -> Result<Value, ModelError> {
    let cfg = model_config(a.branches);
    let optim = OptimConfig {
        lr: 3e-3,
        warmup_steps: 10,
        ..OptimConfig::default()
    };
    let mut tr = Trainer::new(Model::new(cfg, a.seed)?, optim.clone())?;
    let widths = tr.model().widths();
    let av_cfg = AvailabilityConfig {
        p,
        ..AvailabilityConfig::default()
    };
    let mut av = Availability::new(av_cfg, &widths, a.seed ^ 0xa5)
        .map_err(|e| ModelError::Config(e.to_string()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0xbeef);
    let started = Instant::now();
    let mut tokens = 0usize;
    for _ in 0..a.steps {
        let b = batch(next, &mut rng, BATCH);
        let masks = av.draw();
        let scales = av.scales(optim.max_scale);
        tokens += tr.train_step(&b, &masks, &scales)?.tokens;
    }
    let secs = started.elapsed().as_secs_f64();
    let all: Masks = tr.model().all_active();
    let full = tr.eval_loss(control, &all)?;
    let mut single = Vec::new();
    for (l, &k) in widths.iter().enumerate() {
        for i in 0..k {
            let mut m = all.clone();
            m[l][i] = false;
            single.push(tr.eval_loss(control, &m)? as f64);
        }
    }
    let mut mask_rng = ChaCha8Rng::seed_from_u64(99);
    let mut random = Vec::new();
    for _ in 0..10 {
        let m: Masks = widths
            .iter()
            .map(|&k| {
                let mut row: Vec<bool> = (0..k).map(|_| mask_rng.random_bool(0.5)).collect();
                if !row.iter().any(|&x| x) {
                    row[mask_rng.random_range(0..k)] = true;
                }
                row
            })
            .collect();
        random.push(tr.eval_loss(control, &m)? as f64);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(json!({
        "p": p,
        "tokens_per_sec": tokens as f64 / secs,
        "loss_full": full,
        "loss_one_branch_out_mean": mean(&single),
        "loss_one_branch_out_max": single.iter().copied().fold(f64::MIN, f64::max),
        "loss_random_half_masks_mean": mean(&random),
    }))
}

/// Runs every setting; one JSON object with a row per `p`.
pub fn bench_outage(a: &OutageBenchArgs) -> Result<Value, ModelError> {
    let pool = crate::model::bench::pool(a.threads)?;
    let next = chain(a.seed);
    let control = batch(&next, &mut ChaCha8Rng::seed_from_u64(a.seed ^ 0xc0), 32);
    let rows = pool.install(|| {
        a.p.iter()
            .map(|&p| one_setting(a, p, &next, &control))
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(json!({
        "bench": "outage",
        "steps": a.steps,
        "branches": a.branches,
        "loss_floor_ln_fanout": (FANOUT as f64).ln(),
        "results": rows,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::tests::bench_args;

    #[test]
    fn chain_batches_follow_the_chain() {
        let next = chain(1);
        let b = batch(&next, &mut ChaCha8Rng::seed_from_u64(2), 2);
        for (x, y) in b.inputs.iter().zip(&b.targets) {
            assert!(next[*x as usize].contains(y));
        }
    }

    #[test]
    fn a_short_run_reports_every_setting() {
        let a: OutageBenchArgs =
            bench_args("--steps 3 --p 1.0,0.5 --branches 2 --threads 1 --seed 1");
        assert_eq!(a.p, [1.0, 0.5]);
        let v = bench_outage(&a).unwrap();
        let rows = v["results"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter()
                .all(|r| r["loss_full"].as_f64().unwrap().is_finite())
        );
    }
}
