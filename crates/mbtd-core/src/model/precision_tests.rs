//! Training in `model.precision = "bf16"`: its gradients and loss curve against fp32, and
//! the guarantees fp32 training keeps (thread-count determinism, bitwise resume, masked
//! branches untouched, expansion at `η = 0` exact) holding bitwise within bf16.

use super::net::tests::{random_batch, tiny_config};
use super::ops::tests::rel_err;
use super::train::tests::{ones, optim, pool_config, train_in_pool};
use super::{Batch, Model, ModelConfig, Params, Precision, Trainer, Workspace};

fn mid_config(precision: Precision) -> ModelConfig {
    ModelConfig {
        precision,
        ..pool_config()
    }
}

/// Windows of a learnable sequence: `t₊₁ = (5·t + 3) mod V` from a start drawn per
/// window, a target at every position.
fn pattern_batch(cfg: &ModelConfig, batch: usize, seq: usize, seed: u64) -> Batch {
    let v = cfg.vocab_size as u64;
    let mut inputs = Vec::with_capacity(batch * seq);
    let mut targets = Vec::with_capacity(batch * seq);
    for r in 0..batch as u64 {
        let mut t = (seed.wrapping_mul(7919) + r * 31) % v;
        for _ in 0..seq {
            inputs.push(t as u32);
            t = (5 * t + 3) % v;
            targets.push(t as u32);
        }
    }
    Batch {
        batch,
        seq,
        inputs,
        targets,
        loss_mask: vec![1.0; batch * seq],
        segments: None,
        times: None,
    }
}

/// The gradients of the bf16 forward and backward (products on bf16-rounded operands)
/// point where the fp32 ones do: every tensor within 3 % relative error.
#[test]
fn bf16_gradients_agree_with_fp32() {
    let grads = |precision| {
        let cfg = mid_config(precision);
        let model = Model::new(cfg.clone(), 4).unwrap();
        let batch = random_batch(&cfg, 4, 32, 6);
        let mut g = Params::zeros(&cfg, &model.widths());
        let mut ws = Workspace::default();
        let loss = model
            .loss_and_grad(&mut ws, &batch, &model.all_active(), &mut g)
            .unwrap();
        (loss, g)
    };
    let (lf, gf) = grads(Precision::F32);
    let (lb, gb) = grads(Precision::Bf16);
    assert!((lf - lb).abs() < 1e-3 * lf, "loss f32 {lf}, bf16 {lb}");
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (mut differ, mut worst) = (0, 0.0f64);
    for id in gf.ids() {
        let (a, b) = (to64(gb.get(id)), to64(gf.get(id)));
        let e = rel_err(&a, &b);
        assert!(e < 0.03, "{}: relative error {e}", id.name());
        differ += (a != b) as usize;
        worst = worst.max(e);
    }
    eprintln!("loss f32 {lf} bf16 {lb}; largest gradient relative error {worst:.4}");
    assert!(differ > 0, "bf16 gave the fp32 gradients bit for bit");
}

/// A short run on learnable data: the bf16 loss curve stays within 2 % (relative) of the
/// fp32 one at every tenth step while the loss falls several-fold.
#[test]
fn bf16_loss_curve_follows_fp32() {
    let curve = |precision| {
        let cfg = mid_config(precision);
        let mut t = Trainer::new(Model::new(cfg.clone(), 2).unwrap(), optim()).unwrap();
        let masks = t.model().all_active();
        let scales = ones(t.model());
        (0..60u64)
            .map(|s| {
                let batch = pattern_batch(&cfg, 8, 32, s);
                t.train_step(&batch, &masks, &scales).unwrap().loss
            })
            .collect::<Vec<f32>>()
    };
    let (f, b) = (curve(Precision::F32), curve(Precision::Bf16));
    for s in (0..60).step_by(10) {
        let (mf, mb) = (
            f[s..s + 10].iter().sum::<f32>(),
            b[s..s + 10].iter().sum::<f32>(),
        );
        eprintln!(
            "steps {s}..: mean loss f32 {:.4} bf16 {:.4}",
            mf / 10.0,
            mb / 10.0
        );
        assert!(
            (mf - mb).abs() <= 0.02 * mf,
            "steps {s}..{}: mean loss f32 {} bf16 {}",
            s + 10,
            mf / 10.0,
            mb / 10.0
        );
    }
    assert!(
        f[59] < 0.3 * f[0] && b[59] < 0.3 * b[0],
        "f32 {f:?}\nbf16 {b:?}"
    );
}

#[test]
fn bf16_training_is_bitwise_deterministic_across_thread_counts() {
    let one = train_in_pool(&mid_config(Precision::Bf16), 1);
    let two = train_in_pool(&mid_config(Precision::Bf16), 2);
    assert_eq!(one.2, two.2);
    assert!(one.0 == two.0, "weights differ between 1 and 2 threads");
    assert!(
        one.1 == two.1,
        "optimizer state differs between 1 and 2 threads"
    );
    assert!(train_in_pool(&mid_config(Precision::Bf16), 3).0 == one.0);
}

/// Checkpoints are fp32: a bf16 run resumed from its bytes continues bit for bit.
#[test]
fn bf16_resume_is_bitwise() {
    let cfg = mid_config(Precision::Bf16);
    let mut t = Trainer::new(Model::new(cfg.clone(), 9).unwrap(), optim()).unwrap();
    let masks = t.model().all_active();
    let scales = ones(t.model());
    let batches: Vec<Batch> = (0..5).map(|s| random_batch(&cfg, 4, 32, s)).collect();
    for b in &batches[..3] {
        t.train_step(b, &masks, &scales).unwrap();
    }
    let (mb, ob) = (t.model_bytes().unwrap(), t.optimizer_bytes().unwrap());
    let mut r = Trainer::from_bytes(cfg.clone(), optim(), &mb, Some(&ob)).unwrap();
    for b in &batches[3..] {
        let (a, c) = (
            t.train_step(b, &masks, &scales).unwrap().loss,
            r.train_step(b, &masks, &scales).unwrap().loss,
        );
        assert_eq!(a.to_bits(), c.to_bits());
    }
    assert!(t.model_bytes().unwrap() == r.model_bytes().unwrap());
    assert!(t.optimizer_bytes().unwrap() == r.optimizer_bytes().unwrap());
}

#[test]
fn bf16_masked_branches_are_untouched_and_expansion_at_eta_zero_is_exact() {
    let cfg = ModelConfig {
        precision: Precision::Bf16,
        ..tiny_config()
    };
    let mut t = Trainer::new(Model::new(cfg.clone(), 2).unwrap(), optim()).unwrap();
    let batch = random_batch(&cfg, 2, 6, 4);
    let masks = vec![vec![true, false, true], vec![false, false, true]];
    let before = t.model().clone();
    let scales = ones(&before);
    for _ in 0..3 {
        t.train_step(&batch, &masks, &scales).unwrap();
    }
    for (l, m) in masks.iter().enumerate() {
        for (i, &on) in m.iter().enumerate() {
            let same =
                t.model().params.layers[l].branches[i] == before.params.layers[l].branches[i];
            assert_eq!(same, !on, "layer {l} branch {i} active {on}");
        }
    }
    let all = t.model().all_active();
    let old = t.logits(&batch, &all).unwrap();
    t.expand(1, 2, 0.0, 7).unwrap();
    let all = t.model().all_active();
    let new = t.logits(&batch, &all).unwrap();
    assert!(
        old.iter()
            .zip(&new)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

#[test]
fn precision_is_read_by_its_config_name() {
    let c: ModelConfig = toml::from_str("precision = \"bf16\"").unwrap();
    assert_eq!(c.precision, Precision::Bf16);
    assert_eq!(ModelConfig::default().precision, Precision::F32);
    let err = toml::from_str::<ModelConfig>("precision = \"fp16\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`f32`") && err.contains("`bf16`"), "{err}");
}
