//! Generation with branches on two [`BranchHost`]s, reached only through encoded frames,
//! against the single-process generation with the same weights: bitwise the same tokens
//! and logits with an f32 wire; a host that stops answering mid-generation gives exactly
//! the local generation with its branches masked from that position on; the hosts'
//! session caches are bounded and closed.

use super::equivalence_tests::*;
use super::*;
use crate::model::generate::{GenerateConfig, Generation};
use crate::model::{Masks, ModelError, Positions};
use std::time::{Duration, Instant};

/// The logits (as bits) before each draw and the tokens drawn; `hook` runs before each
/// draw's logits are computed.
fn run(g: &mut Generation, mut hook: impl FnMut(&mut Generation)) -> (Vec<u32>, Vec<Vec<u32>>) {
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    loop {
        hook(g);
        logits.push(g.next_logits().iter().map(|x| x.to_bits()).collect());
        match g.next() {
            Some(t) => tokens.push(t),
            None => return (tokens, logits),
        }
    }
}

fn sampling(max_tokens: usize) -> GenerateConfig {
    GenerateConfig {
        max_tokens,
        temperature: 0.9,
        top_k: 12,
        seed: 11,
        ..GenerateConfig::default()
    }
}

const PROMPT: [u32; 3] = [1, 5, 2];

fn sessions(hosts: &Hosts) -> Vec<usize> {
    hosts.lock().unwrap().iter().map(|h| h.sessions()).collect()
}

/// Trained on the hosts (their weights differ from the coordinator's copy), a remote
/// generation equals, bitwise, the local one from the pulled weights, and differs from
/// the one from the stale copy.
fn bitwise(positions: Positions, max_tokens: usize) {
    let cfg = config(positions);
    let (mut remote, hosts) = remote_trainer(&cfg, mixed(), WirePrecision::F32, no_fault());
    train(&mut remote, &batches(&cfg, 4), masks_at);
    let g = sampling(max_tokens);
    let masks: Masks = vec![vec![true; 3], vec![true, false, true]];
    let stale = run(
        &mut remote.model().generate(&PROMPT, &masks, &g).unwrap(),
        |_| {},
    );
    let got = {
        let mut gen_ = remote.generate(&PROMPT, &masks, &g).unwrap();
        let got = run(&mut gen_, |_| {});
        assert!(gen_.lost().is_empty() && gen_.error().is_none());
        got
    };
    assert_eq!(sessions(&hosts), vec![0, 0], "the session is closed");
    remote.pull_branches().unwrap();
    let want = run(
        &mut remote.model().generate(&PROMPT, &masks, &g).unwrap(),
        |_| {},
    );
    assert_eq!(got.0.len(), max_tokens);
    assert_eq!(got, want, "tokens and logits bitwise");
    assert_ne!(got.1, stale.1, "the hosts' live weights are used");
    let stats = remote.remote().unwrap().stats();
    assert_eq!(stats.missed.concat().iter().sum::<u64>(), 0);
}

#[test]
fn f32_wire_generates_bitwise_like_one_process() {
    bitwise(Positions::Learned, 5);
}

#[test]
fn f32_wire_generates_bitwise_like_one_process_with_rope_past_max_seq_len() {
    // max_seq_len 8: the hosts' caches are rings, as the local one
    bitwise(Positions::Rope, 14);
}

/// Host 1 (branches (0,1) and (1,0)) stops answering at position 5: the generation goes
/// on and equals, token for token and logit for logit, the local generation in which
/// both branches are masked (α̃ renormalised) from position 5 on.
#[test]
fn a_host_that_stops_answering_mid_generation_is_masked_from_then_on() {
    let cfg = config(Positions::Learned);
    let fault: FaultFn = Box::new(|host, req| match (host, req) {
        (1, Request::Decode(d)) if d.pos >= 5 => Fault::Silent,
        (1, Request::Close(_)) => Fault::Silent,
        _ => Fault::None,
    });
    let (mut remote, hosts) = remote_trainer(&cfg, mixed(), WirePrecision::F32, fault);
    train(&mut remote, &batches(&cfg, 3), masks_at);
    let g = sampling(5);
    let masks = remote.model().all_active();
    let (got, lost) = {
        let mut gen_ = remote.generate(&PROMPT, &masks, &g).unwrap();
        let got = run(&mut gen_, |_| {});
        assert!(gen_.error().is_none());
        (got, gen_.lost().to_vec())
    };
    let where_: Vec<_> = lost
        .iter()
        .map(|b| (b.layer, b.branch, b.position))
        .collect();
    assert_eq!(where_, vec![(0, 1, 5), (1, 0, 5)]);
    assert!(
        lost[0].why.contains("host 1 gave no decode reply"),
        "{lost:?}"
    );
    assert_eq!(sessions(&hosts), vec![0, 1], "host 1 missed the close");
    remote.pull_branches().unwrap();
    let mut local = remote.model().generate(&PROMPT, &masks, &g).unwrap();
    let want = run(&mut local, |l| {
        if l.context_len() == 5 {
            l.mask_branch(0, 1).unwrap();
            l.mask_branch(1, 0).unwrap();
        }
    });
    assert_eq!(got, want);
    let unmasked = run(
        &mut remote.model().generate(&PROMPT, &masks, &g).unwrap(),
        |_| {},
    );
    assert_ne!(got.1, unmasked.1, "the masking changed the logits");
    assert_eq!(
        remote.remote().unwrap().stats().missed,
        vec![vec![0, 1, 0], vec![1, 0, 0]]
    );
}

/// A parked host's branches and a branch whose open is lost are masked for the whole
/// generation: the local generation with those branches off in the masks.
#[test]
fn branches_lost_at_the_prefill_are_masked_for_the_whole_generation() {
    let cfg = config(Positions::Rope);
    let fault: FaultFn = Box::new(|host, req| match (host, req) {
        (0, Request::Open(o)) if o.forward.layer == 1 => Fault::Lost,
        _ => Fault::None,
    });
    let placement = vec![vec![Some(0), Some(1), None], vec![Some(1), None, Some(0)]];
    let (mut remote, _) = remote_trainer(&cfg, placement, WirePrecision::F32, fault);
    train(&mut remote, &batches(&cfg, 2), masks_at);
    remote.pull_branches().unwrap();
    remote.remote_mut().unwrap().park(1);
    let g = sampling(6);
    let all = remote.model().all_active();
    let (got, lost) = {
        let mut gen_ = remote.generate(&PROMPT, &all, &g).unwrap();
        (run(&mut gen_, |_| {}), gen_.lost().to_vec())
    };
    let where_: Vec<_> = lost
        .iter()
        .map(|b| (b.layer, b.branch, b.position))
        .collect();
    assert_eq!(where_, vec![(0, 1, 0), (1, 0, 0), (1, 2, 0)]);
    assert!(lost[0].why.contains("parked"), "{lost:?}");
    let masks = vec![vec![true, false, true], vec![false, true, false]];
    let want = run(
        &mut remote.model().generate(&PROMPT, &masks, &g).unwrap(),
        |_| {},
    );
    assert_eq!(got, want);
}

/// A layer whose every branch is on a host that stops answering ends the generation
/// with an error naming the layer; the tokens drawn before it stand.
#[test]
fn a_layer_left_without_branches_ends_the_generation_with_an_error() {
    let cfg = config(Positions::Learned);
    let fault: FaultFn = Box::new(|host, req| match (host, req) {
        (1, Request::Decode(d)) if d.pos >= 3 => Fault::Silent,
        _ => Fault::None,
    });
    let placement = vec![vec![Some(1); 3], vec![Some(0), None, Some(1)]];
    let (mut remote, _) = remote_trainer(&cfg, placement, WirePrecision::F32, fault);
    let masks = remote.model().all_active();
    let mut gen_ = remote.generate(&PROMPT, &masks, &sampling(5)).unwrap();
    let (tokens, _) = run(&mut gen_, |_| {});
    assert_eq!(tokens.len(), 1, "one token drawn from the prefill's logits");
    let e = gen_.error().expect("an error");
    assert!(matches!(e, ModelError::Generate(_)));
    assert!(e.to_string().contains("layer 0 has no branch left"), "{e}");
}

/// A host pushed one branch, and a one-window open of session `id` at `now`.
fn open(host: &mut BranchHost, id: u64, now: Instant) -> Reply {
    let cfg = config(Positions::Learned);
    let forward = Forward {
        step: 0,
        layer: 0,
        branches: vec![0],
        batch: 1,
        seq: 2,
        segments: None,
        rope: false,
        dropout: None,
        train: false,
        h: (0..2 * cfg.d_model)
            .map(|j| (j as f32 * 0.3).sin())
            .collect(),
    };
    host.handle_at(
        Request::Open(Open {
            session: id,
            forward,
        }),
        now,
    )
}

fn decode(host: &mut BranchHost, id: u64, pos: u64, now: Instant) -> Reply {
    let d = config(Positions::Learned).d_model;
    let x = (0..d).map(|j| j as f32 * 0.1).collect();
    let req = Request::Decode(Decode {
        session: id,
        layer: 0,
        pos,
        branches: vec![0],
        x,
    });
    host.handle_at(req, now)
}

fn refusal(r: Reply) -> String {
    match r {
        Reply::Refused(msg) => msg,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn pushed_host(limits: SessionLimits) -> BranchHost {
    let cfg = config(Positions::Learned);
    let model = crate::model::Model::new(cfg.clone(), 1).unwrap();
    let mut host = BranchHost::with_session_limits(cfg.clone(), limits).unwrap();
    let p = model.params.layers[0].branches[0].clone();
    let zeros = crate::model::BranchParams::zeros(cfg.d_model);
    let state = BranchState {
        layer: 0,
        branch: 0,
        params: p,
        m: zeros.clone(),
        v: zeros,
    };
    assert_eq!(
        host.handle(Request::Push(vec![state.clone()])),
        Reply::Pushed(1)
    );
    host
}

#[test]
fn sessions_are_capped_least_recently_used_first_and_dropped_when_idle() {
    let limits = SessionLimits {
        max_sessions: 2,
        idle: Duration::from_secs(60),
    };
    let mut host = pushed_host(limits);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert!(matches!(open(&mut host, 1, at(0)), Reply::Forward(_)));
    assert!(matches!(open(&mut host, 2, at(1)), Reply::Forward(_)));
    assert!(matches!(decode(&mut host, 1, 2, at(2)), Reply::Decoded(_)));
    // at the cap: session 2 is the least recently used
    assert!(matches!(open(&mut host, 3, at(3)), Reply::Forward(_)));
    assert_eq!(host.sessions(), 2);
    let msg = refusal(decode(&mut host, 2, 2, at(4)));
    assert!(
        msg.contains("is not open on this host") && msg.contains("at most 2"),
        "{msg}"
    );
    assert!(matches!(decode(&mut host, 1, 3, at(5)), Reply::Decoded(_)));
    // the next position only
    let msg = refusal(decode(&mut host, 1, 3, at(6)));
    assert!(msg.contains("its next position is 4"), "{msg}");
    // session 3, last used at 3 s, is idle past 60 s at 64 s; session 1 (6 s) is not
    assert!(matches!(decode(&mut host, 1, 4, at(64)), Reply::Decoded(_)));
    assert_eq!(host.sessions(), 1);
    assert!(refusal(decode(&mut host, 3, 2, at(64))).contains("idle for more than 60s"));
    assert_eq!(host.handle_at(Request::Close(1), at(65)), Reply::Closed(1));
    assert_eq!(host.handle_at(Request::Close(1), at(65)), Reply::Closed(0));
    assert_eq!(host.sessions(), 0);
    refusal(decode(&mut host, 1, 5, at(66)));
}

#[test]
fn a_session_refuses_branches_changed_since_its_open_and_bad_opens() {
    let mut host = pushed_host(SessionLimits::default());
    let now = Instant::now();
    assert!(matches!(open(&mut host, 7, now), Reply::Forward(_)));
    let state = match host.handle(Request::Pull(vec![(0, 0)])) {
        Reply::Pulled(mut s) => s.remove(0),
        other => panic!("{other:?}"),
    };
    host.handle(Request::Push(vec![state]));
    let msg = refusal(decode(&mut host, 7, 2, now));
    assert!(msg.contains("updated or replaced since session"), "{msg}");
    // a training pass cannot open a session
    let mut o = Open {
        session: 8,
        forward: Forward {
            step: 0,
            layer: 0,
            branches: vec![0],
            batch: 1,
            seq: 1,
            segments: None,
            rope: false,
            dropout: None,
            train: true,
            h: vec![0.0; 8],
        },
    };
    assert!(refusal(host.handle(Request::Open(o.clone()))).contains("evaluation pass"));
    o.forward.train = false;
    o.forward.branches = vec![3];
    assert!(refusal(host.handle(Request::Open(o))).contains("not held here"));
    assert_eq!(host.sessions(), 1, "session 7 stays, 8 was never opened");
}
