//! `mbtd bench continual`: forgetting with and without replay.
//!
//! Task A then task B then A again (two different sparse Markov chains over the same
//! vocabulary); while training on B a share `r` of every batch replays A. Reported per `r`:
//! loss on A after A (its best), after B, after A again; forgetting = loss_A(after B) −
//! best_A; backward transfer = best_A − loss_A(after B) (negative = forgetting); loss on B.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use super::outage_bench::{BATCH, batch, chain, model_config};
use crate::model::{Batch, Model, ModelError, OptimConfig, Trainer};

/// Options of `mbtd bench continual`.
#[derive(Debug, Clone, clap::Args)]
pub struct ContinualBenchArgs {
    /// Steps per phase (A, B, A again).
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    /// Replay shares to compare while training on B (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5")]
    pub replay_share: Vec<f64>,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Concatenates two batches row-wise.
fn join(a: Batch, b: Batch) -> Batch {
    Batch {
        batch: a.batch + b.batch,
        seq: a.seq,
        inputs: [a.inputs, b.inputs].concat(),
        targets: [a.targets, b.targets].concat(),
        loss_mask: [a.loss_mask, b.loss_mask].concat(),
        segments: None,
        times: None,
    }
}

fn one(a: &ContinualBenchArgs, r: f64) -> Result<Value, ModelError> {
    let (ca, cb) = (chain(a.seed), chain(a.seed ^ 0x5151));
    let (ctl_a, ctl_b) = (
        batch(&ca, &mut ChaCha8Rng::seed_from_u64(1), 32),
        batch(&cb, &mut ChaCha8Rng::seed_from_u64(2), 32),
    );
    let optim = OptimConfig {
        lr: 3e-3,
        warmup_steps: 10,
        ..OptimConfig::default()
    };
    let mut tr = Trainer::new(Model::new(model_config(2), a.seed)?, optim.clone())?;
    let all = tr.model().all_active();
    let scales: Vec<Vec<f32>> = all.iter().map(|m| vec![1.0; m.len()]).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0x77);
    for _ in 0..a.steps {
        tr.train_step(&batch(&ca, &mut rng, BATCH), &all, &scales)?;
    }
    let best_a = tr.eval_loss(&ctl_a, &all)? as f64;
    let n_replay = ((BATCH as f64) * r).round() as usize;
    for _ in 0..a.steps {
        let new = batch(&cb, &mut rng, BATCH - n_replay);
        let b = if n_replay > 0 {
            join(new, batch(&ca, &mut rng, n_replay))
        } else {
            new
        };
        tr.train_step(&b, &all, &scales)?;
    }
    let a_after_b = tr.eval_loss(&ctl_a, &all)? as f64;
    let b_after_b = tr.eval_loss(&ctl_b, &all)? as f64;
    for _ in 0..a.steps {
        tr.train_step(&batch(&ca, &mut rng, BATCH), &all, &scales)?;
    }
    let a_again = tr.eval_loss(&ctl_a, &all)? as f64;
    Ok(json!({
        "replay_share": r,
        "loss_a_best": best_a,
        "loss_a_after_b": a_after_b,
        "loss_b_after_b": b_after_b,
        "loss_a_after_a_again": a_again,
        "forgetting": a_after_b - best_a,
        "backward_transfer": best_a - a_after_b,
    }))
}

/// Runs every replay share; one JSON object.
pub fn bench_continual(a: &ContinualBenchArgs) -> Result<Value, ModelError> {
    let pool = crate::model::bench::pool(a.threads)?;
    let rows = pool.install(|| {
        a.replay_share
            .iter()
            .map(|&r| one(a, r))
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(json!({"bench": "continual", "steps_per_phase": a.steps, "results": rows}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::tests::bench_args;

    #[test]
    fn a_short_run_reports_forgetting_per_share() {
        let a: ContinualBenchArgs =
            bench_args("--steps 2 --replay-share 0,0.5 --threads 1 --seed 3");
        assert_eq!(a.replay_share, [0.0, 0.5]);
        let v = bench_continual(&a).unwrap();
        let rows = v["results"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        for r in rows {
            let f = r["forgetting"].as_f64().unwrap();
            let bt = r["backward_transfer"].as_f64().unwrap();
            assert!((f + bt).abs() < 1e-12);
        }
    }
}
