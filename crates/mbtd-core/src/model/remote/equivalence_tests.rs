//! A trainer whose branches sit on two [`BranchHost`]s, reached only through encoded
//! frames, against the single-process trainer: bitwise equal with an f32 wire (packed
//! batches, dropout, masked branches, clipping), close with bf16, and a silent, lossy or
//! NaN-returning host masks its branches exactly as the availability mask would.

use super::*;
use crate::model::net::tests::random_batch;
use crate::model::{Batch, BranchScales, Masks, Model, ModelConfig, ModelError, OptimConfig};
use crate::model::{Positions, Trainer};
use std::sync::{Arc, Mutex};

/// What the loopback transport does with one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Fault {
    /// Delivered, reply returned.
    None,
    /// The host never sees the request.
    Silent,
    /// The host handles the request, the reply is lost.
    Lost,
    /// The first value of the first output becomes NaN.
    Nan,
    /// The first output is multiplied by 10⁴.
    Huge,
}

pub(super) type Hosts = Arc<Mutex<Vec<BranchHost>>>;
pub(super) type FaultFn = Box<dyn FnMut(usize, &Request) -> Fault + Send>;

/// Hosts in this process behind encoded frames.
struct Loopback {
    hosts: Hosts,
    fault: FaultFn,
}

impl Transport for Loopback {
    fn exchange(&mut self, requests: Vec<(usize, Vec<u8>)>) -> Vec<Option<Vec<u8>>> {
        let mut hosts = self.hosts.lock().unwrap();
        requests
            .into_iter()
            .map(|(h, frame)| {
                let (req, _) = decode_request(&frame).unwrap();
                let fault = (self.fault)(h, &req);
                match fault {
                    Fault::Silent => None,
                    Fault::None => Some(hosts[h].handle_bytes(&frame)),
                    Fault::Lost => {
                        hosts[h].handle_bytes(&frame);
                        None
                    }
                    Fault::Nan | Fault::Huge => {
                        let (mut reply, wire) =
                            decode_reply(&hosts[h].handle_bytes(&frame)).unwrap();
                        if let Reply::Forward(f) = &mut reply {
                            let z = &mut f.outputs[0].1;
                            if fault == Fault::Nan {
                                z[0] = f32::NAN;
                            } else {
                                z.iter_mut().for_each(|x| *x *= 1e4);
                            }
                        }
                        Some(encode_reply(&reply, wire))
                    }
                }
            })
            .collect()
    }
}

pub(super) fn config(positions: Positions) -> ModelConfig {
    ModelConfig {
        vocab_size: 23,
        d_model: 8,
        n_heads: 2,
        n_layers: 2,
        branches: 3,
        max_seq_len: 8,
        agg_floor: 0.2,
        init_std: 0.3,
        dropout: 0.1,
        positions,
        ..ModelConfig::default()
    }
}

fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        warmup_steps: 3,
        weight_decay: 0.1,
        grad_clip: 1.0,
        ..OptimConfig::default()
    }
}

/// Packed batches: segments of 3, 2, 3 and 5, 3 positions.
pub(super) fn batches(cfg: &ModelConfig, n: usize) -> Vec<Batch> {
    (0..n as u64)
        .map(|s| {
            let mut b = random_batch(cfg, 2, 8, 100 + s);
            b.segments = Some(vec![0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 0, 0, 0, 1, 1, 1]);
            b
        })
        .collect()
}

/// Layer 0 on hosts 0, 1, 0; layer 1 on host 1, this process, host 0.
pub(super) fn mixed() -> Vec<Vec<Option<usize>>> {
    vec![
        vec![Some(0), Some(1), Some(0)],
        vec![Some(1), None, Some(0)],
    ]
}

/// Some branch masked in most steps.
pub(super) fn masks_at(s: usize) -> Masks {
    vec![vec![true, s % 3 != 1, true], vec![s % 4 != 2, true, true]]
}

pub(super) fn scales() -> BranchScales {
    vec![vec![1.0, 1.5, 1.2], vec![2.0, 1.0, 1.3]]
}

pub(super) fn trainer(cfg: &ModelConfig) -> Trainer {
    let mut t = Trainer::new(Model::new(cfg.clone(), 3).unwrap(), optim()).unwrap();
    t.set_dropout_seed(5);
    t
}

pub(super) fn remote_trainer(
    cfg: &ModelConfig,
    placement: Vec<Vec<Option<usize>>>,
    wire: WirePrecision,
    fault: FaultFn,
) -> (Trainer, Hosts) {
    let hosts: Hosts = Arc::new(Mutex::new(
        (0..2)
            .map(|_| BranchHost::new(cfg.clone()).unwrap())
            .collect(),
    ));
    let transport = Loopback {
        hosts: hosts.clone(),
        fault,
    };
    let mut t = trainer(cfg);
    t.attach_remote(RemoteBranches::new(placement, Box::new(transport), wire))
        .unwrap();
    (t, hosts)
}

/// Losses of training `t` on `batches` with `masks(step)`.
pub(super) fn train(
    t: &mut Trainer,
    batches: &[Batch],
    masks: impl Fn(usize) -> Masks,
) -> Vec<f32> {
    let sc = scales();
    (0..batches.len())
        .map(|s| t.train_step(&batches[s], &masks(s), &sc).unwrap().loss)
        .collect()
}

pub(super) fn assert_same_bytes(remote: &mut Trainer, local: &Trainer) {
    remote.pull_branches().unwrap();
    assert!(
        remote.model_bytes().unwrap() == local.model_bytes().unwrap(),
        "model bytes differ"
    );
    assert!(
        remote.optimizer_bytes().unwrap() == local.optimizer_bytes().unwrap(),
        "optimizer bytes differ"
    );
}

pub(super) fn no_fault() -> FaultFn {
    Box::new(|_, _| Fault::None)
}

fn equivalence(positions: Positions, placement: Vec<Vec<Option<usize>>>) {
    let cfg = config(positions);
    let data = batches(&cfg, 7);
    let mut local = trainer(&cfg);
    let want = train(&mut local, &data, masks_at);
    let (mut remote, hosts) = remote_trainer(&cfg, placement, WirePrecision::F32, no_fault());
    let got = train(&mut remote, &data, masks_at);
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let held: usize = hosts.lock().unwrap().iter().map(|h| h.held().len()).sum();
    assert!(held >= 5, "the hosts hold the placed branches");
    assert!(remote.model_bytes().is_err(), "stale copy refused");
    assert_same_bytes(&mut remote, &local);
    let r = remote.remote().unwrap();
    assert!(r.stats().bytes_sent > 0 && r.stats().bytes_received > 0);
    assert_eq!(r.stats().missed.concat().iter().sum::<u64>(), 0);
    // evaluation through the hosts is the local evaluation
    let masks = remote.model().all_active();
    assert_eq!(
        remote.eval_loss(&data[0], &masks).unwrap().to_bits(),
        local.eval_loss(&data[0], &masks).unwrap().to_bits()
    );
}

#[test]
fn f32_wire_trains_bitwise_like_one_process_packed_with_dropout() {
    equivalence(Positions::Learned, mixed());
}

#[test]
fn f32_wire_trains_bitwise_like_one_process_with_rope_all_remote() {
    equivalence(
        Positions::Rope,
        vec![
            vec![Some(0), Some(0), Some(1)],
            vec![Some(1), Some(1), Some(0)],
        ],
    );
}

/// A host that does not answer (never sees the request, or its reply is lost) and a host
/// that answers NaN: the run equals the local run with those branches masked.
#[test]
fn missing_and_non_finite_outputs_are_masked_like_the_availability_mask() {
    let cfg = config(Positions::Learned);
    let data = batches(&cfg, 7);
    let fault: FaultFn = Box::new(|host, req| match (host, req) {
        // host 1 (branches (0,1) and (1,0)) silent during step 2
        (1, Request::Forward(f)) if f.step == 2 => Fault::Silent,
        // host 0's reply for layer 1 (branch (1,2)) lost at step 4
        (0, Request::Forward(f)) if f.step == 4 && f.layer == 1 => Fault::Lost,
        // host 0's output of branch (0,0) is NaN at step 5
        (0, Request::Forward(f)) if f.step == 5 && f.layer == 0 => Fault::Nan,
        _ => Fault::None,
    });
    let effective = |s: usize| {
        let mut m = masks_at(s);
        match s {
            2 => (m[0][1], m[1][0]) = (false, false),
            4 => m[1][2] = false,
            5 => m[0][0] = false,
            _ => {}
        }
        m
    };
    let mut local = trainer(&cfg);
    let want = train(&mut local, &data, effective);
    let (mut remote, _) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    let sc = scales();
    let mut got = Vec::new();
    for (s, batch) in data.iter().enumerate() {
        let r = remote.train_step(batch, &masks_at(s), &sc).unwrap();
        assert_eq!(r.computed, effective(s), "step {s}");
        assert!(r.loss.is_finite());
        got.push(r.loss);
    }
    assert_eq!(got, want);
    let stats = remote.remote().unwrap().stats().clone();
    // step 2 masked (0,1) only where masks_at had it on: 2 % 3 != 1, and (1,0): 2 % 4 == 2
    assert_eq!(stats.missed, vec![vec![0, 1, 0], vec![0, 0, 1]]);
    assert_eq!(stats.non_finite, vec![vec![1, 0, 0], vec![0, 0, 0]]);
    assert!(stats.last_problem.is_some());
    assert_same_bytes(&mut remote, &local);
    for t in remote
        .model()
        .params
        .layers
        .iter()
        .flat_map(|l| &l.branches)
    {
        assert!(t.tensors().iter().all(|x| x.iter().all(|v| v.is_finite())));
    }
}

/// A backward reply that never comes abandons the step before any update anywhere; the
/// next step runs as if that batch had never been seen.
#[test]
fn a_missing_backward_abandons_the_step_without_update() {
    let cfg = config(Positions::Learned);
    let data = batches(&cfg, 5);
    let mut fired = false;
    let fault: FaultFn = Box::new(move |host, req| match (host, req) {
        (1, Request::Backward(b)) if b.step == 2 && !fired => {
            fired = true;
            Fault::Silent
        }
        _ => Fault::None,
    });
    let (mut remote, _) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    let sc = scales();
    let mut local = trainer(&cfg);
    for (s, batch) in data.iter().enumerate().take(2) {
        remote.train_step(batch, &masks_at(s), &sc).unwrap();
        local.train_step(batch, &masks_at(s), &sc).unwrap();
    }
    let err = remote.train_step(&data[2], &masks_at(2), &sc).unwrap_err();
    assert!(matches!(err, ModelError::Cluster(_)), "{err}");
    assert!(err.to_string().contains("abandoned"), "{err}");
    assert_eq!(remote.step(), 2);
    assert_eq!(remote.remote().unwrap().stats().steps_abandoned, 1);
    // the host that did answer holds step-2 gradients: it must not apply them later
    for (s, batch) in data.iter().enumerate().skip(3) {
        let m = masks_at(s - 1);
        remote.train_step(batch, &m, &sc).unwrap();
        local.train_step(batch, &m, &sc).unwrap();
    }
    assert_same_bytes(&mut remote, &local);
}

/// With a bf16 wire the loss curve follows the f32 one: every loss within 2 % of the
/// single-process loss over 40 steps of a model that learns.
#[test]
fn bf16_wire_loss_curve_agrees_within_two_percent() {
    let cfg = ModelConfig {
        dropout: 0.0,
        ..config(Positions::Learned)
    };
    let data = batches(&cfg, 4);
    let cycle: Vec<Batch> = (0..40).map(|s| data[s % 4].clone()).collect();
    let all = |_| vec![vec![true; 3]; 2];
    let mut local = trainer(&cfg);
    let want = train(&mut local, &cycle, all);
    let (mut remote, _) = remote_trainer(&cfg, mixed(), WirePrecision::Bf16, no_fault());
    let got = train(&mut remote, &cycle, all);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "bf16 wire: loss {} -> {} (f32 {} -> {}), worst relative difference {worst:.2e}",
        got[0], got[39], want[0], want[39]
    );
    assert!(want[39] < want[0] * 0.8, "the model learns");
    assert!(worst < 0.02, "worst relative loss difference {worst}");
    assert!(got != want, "bf16 really rounds");
}

#[test]
fn a_placement_that_does_not_fit_is_refused() {
    let cfg = config(Positions::Learned);
    let hosts: Hosts = Arc::new(Mutex::new(vec![BranchHost::new(cfg.clone()).unwrap()]));
    let transport = Loopback {
        hosts,
        fault: no_fault(),
    };
    let mut t = trainer(&cfg);
    let bad = RemoteBranches::new(
        vec![vec![Some(0); 2], vec![None; 3]],
        Box::new(transport),
        WirePrecision::F32,
    );
    let err = t.attach_remote(bad).unwrap_err();
    assert!(err.to_string().contains("widths [2, 3]"), "{err}");
}

/// An update reaches only branches whose forward *and* backward of that step the host
/// computed: not one it was never asked for, not one masked after its forward (no
/// backward), not one of an evaluation pass, not one whose layer moved on to a later pass.
#[test]
fn a_host_never_updates_a_branch_outside_its_forward_and_backward() {
    let cfg = config(Positions::Learned);
    let mut host = BranchHost::new(cfg.clone()).unwrap();
    let model = Model::new(cfg.clone(), 1).unwrap();
    let zeros = crate::model::BranchParams::zeros(8);
    let state = |i: usize| BranchState {
        layer: 0,
        branch: i,
        params: model.params.layers[0].branches[i].clone(),
        m: zeros.clone(),
        v: zeros.clone(),
    };
    assert_eq!(
        host.handle(Request::Push(vec![state(0), state(1)])),
        Reply::Pushed(2)
    );
    let adamw = AdamWStep {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
        bc1: 0.1,
        bc2: 0.05,
    };
    let update = |step| {
        Request::Update(Update {
            step,
            adamw,
            branches: vec![(0, 0, 1.0), (0, 1, 1.0)],
        })
    };
    let forward = |step, branches: Vec<usize>, train| {
        Request::Forward(Forward {
            step,
            layer: 0,
            branches,
            batch: 1,
            seq: 4,
            segments: None,
            rope: false,
            dropout: None,
            train,
            h: (0..32).map(|j| (j as f32 * 0.3).cos()).collect(),
        })
    };
    let backward = |step, branches: Vec<usize>| {
        Request::Backward(Backward {
            step,
            layer: 0,
            branches: branches.into_iter().map(|i| (i, 0.5)).collect(),
            dh: vec![0.1; 32],
        })
    };
    let pulled = |host: &mut BranchHost| host.handle(Request::Pull(vec![(0, 0), (0, 1)]));
    let before = pulled(&mut host);
    let refused_all = Reply::Update(UpdateReply {
        step: 0,
        applied: vec![],
        refused: vec![(0, 0), (0, 1)],
    });
    // never asked
    assert_eq!(host.handle(update(0)), refused_all);
    // forward of branch 0 only, then its backward; branch 1 was masked
    assert!(matches!(
        host.handle(forward(0, vec![0], true)),
        Reply::Forward(_)
    ));
    // a backward for the masked branch is refused as a whole
    let Reply::Refused(msg) = host.handle(backward(0, vec![0, 1])) else {
        panic!()
    };
    assert!(msg.contains("branch (0, 1) at step 0"), "{msg}");
    assert!(matches!(
        host.handle(backward(0, vec![0])),
        Reply::Backward(_)
    ));
    // the update of another step touches nothing
    let Reply::Update(u) = host.handle(update(1)) else {
        panic!()
    };
    assert!(u.applied.is_empty());
    let Reply::Update(u) = host.handle(update(0)) else {
        panic!()
    };
    assert_eq!((u.applied, u.refused), (vec![(0, 0)], vec![(0, 1)]));
    let after = pulled(&mut host);
    let (Reply::Pulled(b), Reply::Pulled(a)) = (&before, &after) else {
        panic!()
    };
    assert_ne!(a[0].params, b[0].params, "branch 0 updated");
    assert_eq!(a[1], b[1], "branch 1 untouched, moments too");
    // applied once only
    assert!(matches!(host.handle(update(0)), Reply::Update(u) if u.applied.is_empty()));
    // an evaluation forward cannot be back-propagated
    host.handle(forward(1, vec![0, 1], false));
    assert!(matches!(
        host.handle(backward(1, vec![0])),
        Reply::Refused(_)
    ));
    // forwarded and back-propagated at step 2, but a later pass of the layer left it out
    host.handle(forward(2, vec![1], true));
    assert!(matches!(
        host.handle(backward(2, vec![1])),
        Reply::Backward(_)
    ));
    host.handle(forward(3, vec![0], true));
    let Reply::Update(u) = host.handle(update(2)) else {
        panic!()
    };
    assert!(u.applied.is_empty(), "{u:?}");
    assert_eq!(pulled(&mut host), after);
    // a branch it does not hold, a wrong shape, garbage bytes
    assert!(
        matches!(host.handle(forward(4, vec![2], true)), Reply::Refused(m) if m.contains("not held"))
    );
    let (reply, _) = decode_reply(&host.handle_bytes(b"not a frame at all")).unwrap();
    assert!(matches!(reply, Reply::Refused(m) if m.contains("undecodable")));
}

/// A host restarted empty refuses its branches (masked, counted) until the coordinator
/// pushes its copy back; a rollback restores checkpoint bytes and pushes them to the
/// hosts. Both continue bitwise like the single-process run.
#[test]
fn rejoin_and_rollback_push_the_coordinators_copy() {
    let cfg = config(Positions::Learned);
    let data = batches(&cfg, 8);
    let sc = scales();
    // host 1 (branches (0,1) and (1,0)) is restarted empty before step 3
    let effective = |s: usize| {
        let mut m = masks_at(s);
        if s == 3 {
            (m[0][1], m[1][0]) = (false, false);
        }
        m
    };
    let mut local = trainer(&cfg);
    train(&mut local, &data[..6], effective);
    let (mut remote, hosts) = remote_trainer(&cfg, mixed(), WirePrecision::F32, no_fault());
    train(&mut remote, &data[..3], masks_at);
    remote.pull_branches().unwrap();
    hosts.lock().unwrap()[1] = BranchHost::new(cfg.clone()).unwrap();
    remote.train_step(&data[3], &masks_at(3), &sc).unwrap();
    let stats = remote.remote().unwrap().stats();
    assert_eq!((stats.missed[0][1], stats.missed[1][0]), (1, 1));
    assert!(stats.last_problem.as_deref().unwrap().contains("not held"));
    remote.push_branches(Some(1)).unwrap();
    assert_eq!(hosts.lock().unwrap()[1].held(), vec![(0, 1), (1, 0)]);
    for (s, batch) in data.iter().enumerate().take(6).skip(4) {
        remote.train_step(batch, &effective(s), &sc).unwrap();
    }
    assert_same_bytes(&mut remote, &local);
    // checkpoint at step 6, two more steps on the hosts, then roll back to the checkpoint
    let (mb, ob) = (
        remote.model_bytes().unwrap(),
        remote.optimizer_bytes().unwrap(),
    );
    train(&mut remote, &data[6..8], masks_at);
    let placement = remote.detach_remote().unwrap();
    let mut restored = Trainer::from_bytes(cfg.clone(), optim(), &mb, Some(&ob)).unwrap();
    restored.set_dropout_seed(5);
    restored.attach_remote(placement).unwrap();
    let mut reference = Trainer::from_bytes(cfg.clone(), optim(), &mb, Some(&ob)).unwrap();
    reference.set_dropout_seed(5);
    for (s, batch) in data.iter().enumerate().skip(6) {
        restored.train_step(batch, &masks_at(s), &sc).unwrap();
        reference.train_step(batch, &masks_at(s), &sc).unwrap();
    }
    assert_same_bytes(&mut restored, &reference);
}
