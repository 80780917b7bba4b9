//! Hosts that go away: a parked host is not asked and its branches are masked until the
//! coordinator's copy is pushed to it; a checkpoint pull completes without it; a layer
//! short of its quorum abandons the step before any update, and the same batch trained
//! again once the host answers gives the single-process result.

use super::equivalence_tests::*;
use super::*;
use crate::model::{ModelError, Positions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[test]
fn a_parked_host_is_not_asked_until_its_branches_are_pushed() {
    let cfg = config(Positions::Learned);
    let data = batches(&cfg, 7);
    let sc = scales();
    // host 1 (branches (0,1) and (1,0)) restarts empty after step 3 and is parked for
    // steps 3 and 4
    let effective = |s: usize| {
        let mut m = masks_at(s);
        if s == 3 || s == 4 {
            (m[0][1], m[1][0]) = (false, false);
        }
        m
    };
    let mut local = trainer(&cfg);
    train(&mut local, &data, effective);
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    let fault: FaultFn = Box::new(move |host, _| {
        if host == 1 {
            count.fetch_add(1, Ordering::SeqCst);
        }
        Fault::None
    });
    let (mut remote, hosts) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    train(&mut remote, &data[..3], masks_at);
    remote.pull_branches().unwrap();
    hosts.lock().unwrap()[1] = BranchHost::new(cfg.clone()).unwrap();
    remote.remote_mut().unwrap().park(1);
    let before = asked.load(Ordering::SeqCst);
    for (s, batch) in data.iter().enumerate().take(5).skip(3) {
        let r = remote.train_step(batch, &masks_at(s), &sc).unwrap();
        assert_eq!(r.computed, effective(s), "step {s}");
    }
    // a checkpoint completes: host 1 gives nothing, its branches keep the step-3 copy
    assert_eq!(remote.pull_branches_reachable().unwrap(), vec![1]);
    assert!(remote.model_bytes().is_ok(), "the copy counts as current");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        before,
        "a parked host is not asked"
    );
    assert!(hosts.lock().unwrap()[1].held().is_empty());
    let missed = &remote.remote().unwrap().stats().missed;
    // (0,1) is off in masks_at(4) anyway: masked where it was asked for only
    assert_eq!((missed[0][1], missed[1][0]), (1, 2));
    assert!(remote.push_branches_reachable(Some(1)).is_empty());
    assert!(remote.remote().unwrap().parked().is_empty());
    assert_eq!(hosts.lock().unwrap()[1].held(), vec![(0, 1), (1, 0)]);
    for (s, batch) in data.iter().enumerate().skip(5) {
        remote.train_step(batch, &effective(s), &sc).unwrap();
    }
    assert_same_bytes(&mut remote, &local);
}

#[test]
fn a_host_that_fails_a_push_or_a_pull_is_parked_and_the_others_go_on() {
    let cfg = config(Positions::Learned);
    let data = batches(&cfg, 4);
    let silent = Arc::new(Mutex::new(false));
    let flag = silent.clone();
    let fault: FaultFn = Box::new(move |host, _| {
        if host == 1 && *flag.lock().unwrap() {
            Fault::Silent
        } else {
            Fault::None
        }
    });
    let (mut remote, hosts) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    train(&mut remote, &data[..2], masks_at);
    *silent.lock().unwrap() = true;
    assert_eq!(remote.pull_branches_reachable().unwrap(), vec![1]);
    assert_eq!(remote.remote().unwrap().parked(), vec![1]);
    // host 0's branches came back: its copy equals what it holds
    let pulled = remote.model().params.layers[0].branches[0].clone();
    let held = hosts.lock().unwrap()[0].handle_bytes(&encode_request(
        &Request::Pull(vec![(0, 0)]),
        WirePrecision::F32,
    ));
    let Ok((Reply::Pulled(s), _)) = decode_reply(&held) else {
        panic!("host 0 answers a pull");
    };
    assert!(s[0].params == pulled);
    assert_eq!(remote.push_branches_reachable(None), vec![1]);
    assert!(
        remote.push_branches(Some(1)).is_err(),
        "strict push names it"
    );
    *silent.lock().unwrap() = false;
    assert!(remote.push_branches_reachable(Some(1)).is_empty());
    assert!(remote.remote().unwrap().parked().is_empty());
}

#[test]
fn a_layer_short_of_its_quorum_abandons_the_step_and_a_retry_is_exact() {
    let cfg = config(Positions::Learned);
    let data = batches(&cfg, 5);
    let sc = scales();
    let all = |_: usize| vec![vec![true; 3], vec![true; 3]];
    let mut fired = false;
    // host 1 silent in the first forward of step 2 only
    let fault: FaultFn = Box::new(move |host, req| match (host, req) {
        (1, Request::Forward(f)) if f.step == 2 && !fired => {
            fired = true;
            Fault::Silent
        }
        _ => Fault::None,
    });
    let (mut remote, _) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    remote.remote_mut().unwrap().set_quorum(3);
    let mut local = trainer(&cfg);
    train(&mut local, &data, all);
    train(&mut remote, &data[..2], all);
    let err = remote.train_step(&data[2], &all(2), &sc).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::Quorum {
                layer: 0,
                step: 2,
                answered: 2,
                need: 3
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("availability.min_active"), "{err}");
    assert_eq!(remote.step(), 2, "no update");
    for (s, batch) in data.iter().enumerate().skip(2) {
        remote.train_step(batch, &all(s), &sc).unwrap();
    }
    assert_same_bytes(&mut remote, &local);
    // a quorum of 2 lets a step with one branch of three missing through
    let mut fired = false;
    let fault: FaultFn = Box::new(move |host, req| match (host, req) {
        (1, Request::Forward(f)) if f.step == 1 && !fired => {
            fired = true;
            Fault::Silent
        }
        _ => Fault::None,
    });
    let (mut remote, _) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    remote.remote_mut().unwrap().set_quorum(2);
    train(&mut remote, &data[..3], all);
    assert_eq!(remote.step(), 3);
}

/// A host's output 10⁴ times the usual size is masked and counted like a missing one;
/// the run equals the single-process run with that branch masked in that step.
#[test]
fn an_output_far_out_of_line_is_masked_and_counted() {
    let cfg = config(Positions::Learned);
    let data = batches(&cfg, 7);
    // host 0's first output in layer 0 is branch (0, 0)
    let fault: FaultFn = Box::new(|host, req| match (host, req) {
        (0, Request::Forward(f)) if f.step == 5 && f.layer == 0 => Fault::Huge,
        _ => Fault::None,
    });
    let effective = |s: usize| {
        let mut m = masks_at(s);
        if s == 5 {
            m[0][0] = false;
        }
        m
    };
    let mut local = trainer(&cfg);
    let want = train(&mut local, &data, effective);
    let (mut remote, _) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    remote.remote_mut().unwrap().set_max_output_norm_ratio(10.0);
    let sc = scales();
    let mut got = Vec::new();
    for (s, batch) in data.iter().enumerate() {
        let r = remote.train_step(batch, &masks_at(s), &sc).unwrap();
        assert_eq!(r.computed, effective(s), "step {s}");
        got.push(r.loss);
    }
    assert_eq!(got, want);
    let stats = remote.remote().unwrap().stats();
    assert_eq!(stats.out_of_line, vec![vec![1, 0, 0], vec![0, 0, 0]]);
    assert_eq!(stats.missed.concat().iter().sum::<u64>(), 0);
    assert!(
        stats
            .last_problem
            .as_deref()
            .unwrap()
            .contains("out of line")
    );
    assert_same_bytes(&mut remote, &local);
}
