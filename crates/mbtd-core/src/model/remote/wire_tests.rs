//! Round trips and decoding errors of the branch protocol's encoding.

use super::protocol::*;
use super::wire::*;
use crate::model::params::BranchParams;
use proptest::prelude::*;

fn params(d: usize, seed: f32) -> BranchParams {
    let mut p = BranchParams::zeros(d);
    for (t, x) in p.tensors_mut().into_iter().enumerate() {
        for (j, v) in x.iter_mut().enumerate() {
            *v = seed + (t * 1000 + j) as f32 * 1e-3 - 0.7;
        }
    }
    p
}

fn state(l: usize, i: usize) -> BranchState {
    BranchState {
        layer: l,
        branch: i,
        params: params(4, 0.1),
        m: params(4, 1e-6),
        v: params(4, 3e-9),
    }
}

fn act(n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| (j as f32 * 0.37).sin() * 3.1 + 1e-7)
        .collect()
}

fn requests() -> Vec<Request> {
    vec![
        Request::Forward(Forward {
            step: 9,
            layer: 1,
            branches: vec![0, 2],
            batch: 2,
            seq: 3,
            segments: Some(vec![0, 0, 1, 0, 1, 1]),
            rope: true,
            dropout: Some((0.1, 77)),
            train: true,
            h: act(24),
        }),
        Request::Forward(Forward {
            step: 0,
            layer: 0,
            branches: vec![1],
            batch: 1,
            seq: 1,
            segments: None,
            rope: false,
            dropout: None,
            train: false,
            h: act(4),
        }),
        Request::Backward(Backward {
            step: u64::MAX,
            layer: 3,
            branches: vec![(0, 0.25), (5, 0.75)],
            dh: act(12),
        }),
        Request::Update(Update {
            step: 4,
            adamw: AdamWStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                bc1: 0.1,
                bc2: 0.05,
            },
            branches: vec![(0, 1, 0.5), (2, 0, 1.0)],
        }),
        Request::Pull(vec![(0, 2), (1, 0)]),
        Request::Push(vec![state(0, 1), state(1, 2)]),
        Request::Open(Open {
            session: u64::MAX - 3,
            forward: Forward {
                step: 12,
                layer: 2,
                branches: vec![0, 4],
                batch: 1,
                seq: 3,
                segments: None,
                rope: true,
                dropout: None,
                train: false,
                h: act(12),
            },
        }),
        Request::Decode(Decode {
            session: 0x5eed,
            layer: 1,
            pos: 300,
            branches: vec![1, 2, 7],
            x: act(4),
        }),
        Request::Close(42),
    ]
}

fn replies() -> Vec<Reply> {
    vec![
        Reply::Forward(ForwardReply {
            step: 3,
            layer: 0,
            outputs: vec![(0, act(8)), (3, act(8))],
        }),
        Reply::Backward(BackwardReply {
            step: 3,
            layer: 0,
            grads: vec![BranchGrad {
                branch: 1,
                dh: act(8),
                sq_norm: 12.5e-3,
            }],
        }),
        Reply::Update(UpdateReply {
            step: 3,
            applied: vec![(0, 1)],
            refused: vec![(1, 1), (1, 2)],
        }),
        Reply::Pulled(vec![state(2, 0)]),
        Reply::Pushed(7),
        Reply::Refused("branch (0, 9) is not held here — ünïcode".into()),
        Reply::Decoded(DecodeReply {
            session: 0x5eed,
            layer: 1,
            pos: 300,
            outputs: vec![(1, act(4)), (7, act(4))],
        }),
        Reply::Closed(3),
    ]
}

#[test]
fn every_message_round_trips_bit_exactly_in_f32() {
    for r in requests() {
        let bytes = encode_request(&r, WirePrecision::F32);
        assert_eq!(decode_request(&bytes).unwrap(), (r, WirePrecision::F32));
    }
    for r in replies() {
        let bytes = encode_reply(&r, WirePrecision::F32);
        assert_eq!(decode_reply(&bytes).unwrap(), (r, WirePrecision::F32));
    }
}

fn bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

#[test]
fn bf16_rounds_activations_and_keeps_weights_exact() {
    for r in requests() {
        let bytes = encode_request(&r, WirePrecision::Bf16);
        let (got, prec) = decode_request(&bytes).unwrap();
        assert_eq!(prec, WirePrecision::Bf16);
        let want = match r.clone() {
            Request::Forward(f) => Request::Forward(Forward { h: bf16(&f.h), ..f }),
            Request::Backward(b) => Request::Backward(Backward {
                dh: bf16(&b.dh),
                ..b
            }),
            Request::Open(o) => Request::Open(Open {
                forward: Forward {
                    h: bf16(&o.forward.h),
                    ..o.forward
                },
                ..o
            }),
            Request::Decode(d) => Request::Decode(Decode { x: bf16(&d.x), ..d }),
            other => other,
        };
        assert_eq!(got, want);
        if let Request::Forward(f) = &r {
            assert_ne!(bf16(&f.h), f.h, "bf16 really rounds");
            let f32_len = encode_request(&r, WirePrecision::F32).len();
            assert_eq!(f32_len - bytes.len(), f.h.len() * 2);
        }
    }
    let push = Request::Push(vec![state(0, 0)]);
    let (got, _) = decode_request(&encode_request(&push, WirePrecision::Bf16)).unwrap();
    assert_eq!(
        got, push,
        "weights and moments travel in f32 whatever the wire"
    );
    let fwd = replies().remove(0);
    let (got, _) = decode_reply(&encode_reply(&fwd, WirePrecision::Bf16)).unwrap();
    let Reply::Forward(g) = got else { panic!() };
    assert_eq!(g.outputs[1].1, bf16(&act(8)));
    let decoded = replies().remove(6);
    let (got, _) = decode_reply(&encode_reply(&decoded, WirePrecision::Bf16)).unwrap();
    let Reply::Decoded(g) = got else { panic!() };
    assert_eq!(g.outputs[1].1, bf16(&act(4)));
}

/// Version 2 added the generation messages and left the others' bytes as they were:
/// a version-1 frame differs from its version-2 frame in the version field and the
/// checksum only, and is refused with the version error.
#[test]
fn version_two_keeps_the_version_one_encodings() {
    for r in requests().into_iter().take(6) {
        let v2 = encode_request(&r, WirePrecision::F32);
        let v1 = patch_header(&v2, 4, 1);
        assert_eq!(v1[..4], v2[..4]);
        assert_eq!((v1[4], v2[4]), (1, 2));
        assert_eq!(v1[5..16], v2[5..16]);
        assert_eq!(v1[HEADER_LEN..], v2[HEADER_LEN..]);
        assert_eq!(
            decode_request(&v1).unwrap_err(),
            WireError::Version { found: 1 }
        );
    }
}

#[test]
fn generation_message_kinds_are_pinned() {
    let kinds: Vec<u8> = requests()[6..]
        .iter()
        .map(|r| encode_request(r, WirePrecision::F32)[6])
        .collect();
    assert_eq!(kinds, vec![6, 7, 8]);
    let kinds: Vec<u8> = replies()[6..]
        .iter()
        .map(|r| encode_reply(r, WirePrecision::F32)[6])
        .collect();
    assert_eq!(kinds, vec![71, 72]);
    // decode: session 8, layer 4, pos 8, branches 4 + 3·4, then x
    let frame = encode_request(&requests()[7], WirePrecision::F32);
    let body = &frame[HEADER_LEN..];
    assert_eq!(body[..8], 0x5eed_u64.to_le_bytes());
    assert_eq!(body[12..20], 300u64.to_le_bytes());
    assert_eq!(body[36], 0, "x is an f32 activation");
}

#[test]
fn frame_len_reads_the_header() {
    let bytes = encode_request(&requests()[0], WirePrecision::F32);
    let head: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
    assert_eq!(frame_len(&head).unwrap(), bytes.len() as u64);
    let mut bad = head;
    bad[0] = b'X';
    assert!(matches!(frame_len(&bad), Err(WireError::Magic { .. })));
}

/// `frame` with its body replaced and the length and checksum made consistent.
fn reframe(frame: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = frame[..HEADER_LEN].to_vec();
    out[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = super::codec::checksum(&out[..16], &out[HEADER_LEN..]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

/// `frame` with header byte `at` set to `v` and the checksum made consistent.
fn patch_header(frame: &[u8], at: usize, v: u8) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[at] = v;
    let body = out[HEADER_LEN..].to_vec();
    reframe(&out, &body)
}

#[test]
fn each_decoding_error_names_what_was_wrong() {
    let pull = encode_request(&Request::Pull(vec![(1, 2)]), WirePrecision::F32);
    let err = |b: &[u8]| decode_request(b).unwrap_err();
    assert_eq!(err(&pull[..7]), WireError::Short { len: 7 });
    let mut magic = pull.clone();
    magic[..4].copy_from_slice(b"HTTP");
    assert!(
        err(&magic)
            .to_string()
            .contains("not speaking the mbtd branch protocol")
    );
    let v3 = patch_header(&pull, 4, 3);
    assert_eq!(err(&v3), WireError::Version { found: 3 });
    assert!(err(&v3).to_string().contains("same mbtd version"));
    let kind = patch_header(&pull, 6, 99);
    assert_eq!(
        err(&kind),
        WireError::Kind {
            kind: 99,
            expected: "request"
        }
    );
    let reply = encode_reply(&Reply::Pushed(1), WirePrecision::F32);
    assert!(matches!(err(&reply), WireError::Kind { kind: 69, .. }));
    assert!(matches!(
        decode_reply(&pull).unwrap_err(),
        WireError::Kind {
            kind: 4,
            expected: "reply"
        }
    ));
    assert_eq!(
        err(&patch_header(&pull, 7, 5)),
        WireError::Precision { tag: 5 }
    );
    let mut long = pull.clone();
    long.push(0);
    assert!(matches!(
        err(&long),
        WireError::Length {
            declared: 12,
            actual: 13
        }
    ));
    let mut flipped = pull.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(matches!(err(&flipped), WireError::Checksum { .. }));
    // consistent frames whose body ends early: the list or tensor length is checked
    // against the bytes left before anything is read
    let body = &pull[HEADER_LEN..pull.len() - 2];
    assert_eq!(
        err(&reframe(&pull, body)),
        WireError::Truncated {
            field: "branches",
            need: 8,
            left: 6
        }
    );
    let fwd = encode_request(&requests()[1], WirePrecision::F32);
    let body = &fwd[HEADER_LEN..fwd.len() - 2];
    assert_eq!(
        err(&reframe(&fwd, body)),
        WireError::Truncated {
            field: "h",
            need: 16,
            left: 14
        }
    );
    let mut extra = pull[HEADER_LEN..].to_vec();
    extra.extend_from_slice(&[0, 0, 0]);
    assert_eq!(
        err(&reframe(&pull, &extra)),
        WireError::Trailing {
            extra: 3,
            message: "pull"
        }
    );
    // a list count far beyond the bytes left is refused before allocating
    let mut huge = pull[HEADER_LEN..].to_vec();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        err(&reframe(&pull, &huge)),
        WireError::Truncated {
            field: "branches",
            ..
        }
    ));
}

#[test]
fn invalid_field_values_are_named() {
    let Request::Forward(f) = requests().remove(1) else {
        panic!()
    };
    let frame = encode_request(&Request::Forward(f), WirePrecision::F32);
    let mut body = frame[HEADER_LEN..].to_vec();
    // step 8, layer 4, branches 4 + 4, batch 4, seq 4, segments flag at 28, rope at 29
    body[29] = 7;
    let e = decode_request(&reframe(&frame, &body)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field `rope`: byte 7 is not a boolean (0 or 1)"
    );
    let mut body = frame[HEADER_LEN..].to_vec();
    // dropout flag 30, train 31, then the tensor's dtype byte
    body[32] = 9;
    let e = decode_request(&reframe(&frame, &body)).unwrap_err();
    assert!(e.to_string().contains("field `h`: dtype byte 9"), "{e}");
    // a pushed branch whose tensors do not have a branch's shapes
    let push = encode_request(&Request::Push(vec![state(0, 0)]), WirePrecision::F32);
    let mut body = push[HEADER_LEN..].to_vec();
    // count 4, layer 4, branch 4, ln1.gain: dtype 1 + len 8 + 16 bytes, ln1.bias dtype at 37
    body[38..46].copy_from_slice(&3u64.to_le_bytes());
    body.drain(46..50);
    let e = decode_request(&reframe(&push, &body)).unwrap_err();
    assert!(
        e.to_string().contains("tensor `ln1.bias` has 3 elements"),
        "{e}"
    );
    let refused = encode_reply(&Reply::Refused("ok".into()), WirePrecision::F32);
    let mut body = refused[HEADER_LEN..].to_vec();
    body[4] = 0xff;
    let e = decode_reply(&reframe(&refused, &body)).unwrap_err();
    assert!(e.to_string().contains("not UTF-8"), "{e}");
}

fn arb_forward() -> impl Strategy<Value = Forward> {
    (1usize..4, 1usize..5, 1usize..4).prop_flat_map(|(batch, seq, d)| {
        let n = batch * seq;
        (
            any::<u64>(),
            0usize..300,
            proptest::collection::btree_set(0usize..300, 0..5),
            proptest::option::of(proptest::collection::vec(any::<u16>(), n)),
            any::<bool>(),
            proptest::option::of((0.0f32..1.0, any::<u64>())),
            any::<bool>(),
            proptest::collection::vec(any::<f32>(), n * d),
        )
            .prop_map(
                move |(step, layer, branches, segments, rope, dropout, train, h)| Forward {
                    step,
                    layer,
                    branches: branches.into_iter().collect(),
                    batch,
                    seq,
                    segments,
                    rope,
                    dropout,
                    train,
                    h,
                },
            )
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #[test]
    fn forwards_round_trip_bitwise(f in arb_forward()) {
        let bytes = encode_request(&Request::Forward(f.clone()), WirePrecision::F32);
        let (Request::Forward(g), _) = decode_request(&bytes).unwrap() else {
            panic!("not a forward")
        };
        // compare bits: NaN payloads survive too
        prop_assert_eq!(bits(&g.h), bits(&f.h));
        prop_assert_eq!(
            Forward { h: vec![], ..g },
            Forward { h: vec![], ..f }
        );
    }

    #[test]
    fn backward_replies_round_trip(
        step in any::<u64>(),
        grads in proptest::collection::vec(
            (0usize..64, proptest::collection::vec(-1e6f32..1e6, 0..40), any::<f64>()),
            0..4,
        ),
    ) {
        let r = Reply::Backward(BackwardReply {
            step,
            layer: 2,
            grads: grads
                .into_iter()
                .map(|(branch, dh, sq_norm)| BranchGrad { branch, dh, sq_norm })
                .collect(),
        });
        let (got, _) = decode_reply(&encode_reply(&r, WirePrecision::F32)).unwrap();
        let (Reply::Backward(a), Reply::Backward(b)) = (&got, &r) else { panic!() };
        prop_assert_eq!(a.grads.len(), b.grads.len());
        for (x, y) in a.grads.iter().zip(&b.grads) {
            prop_assert_eq!(x.sq_norm.to_bits(), y.sq_norm.to_bits());
            prop_assert_eq!(&x.dh, &y.dh);
        }
    }

    #[test]
    fn bf16_is_within_half_an_ulp_of_eight_bits(h in proptest::collection::vec(-1e30f32..1e30, 1..64)) {
        let f = Forward { step: 1, layer: 0, branches: vec![0], batch: 1, seq: 1, segments: None,
            rope: false, dropout: None, train: true, h: h.clone() };
        let (Request::Forward(g), _) =
            decode_request(&encode_request(&Request::Forward(f), WirePrecision::Bf16)).unwrap()
        else { panic!() };
        for (a, b) in g.h.iter().zip(&h) {
            prop_assert!((a - b).abs() <= b.abs() * (1.0 / 256.0), "{} vs {}", a, b);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_request(&bytes);
        let _ = decode_reply(&bytes);
    }

    #[test]
    fn every_prefix_and_every_single_bit_flip_is_an_error(which in 0usize..9, at in any::<usize>(), bit in 0u8..8) {
        let bytes = encode_request(&requests()[which], WirePrecision::F32);
        let cut = at % bytes.len();
        prop_assert!(decode_request(&bytes[..cut]).is_err());
        let mut flipped = bytes.clone();
        flipped[cut] ^= 1 << bit;
        prop_assert!(decode_request(&flipped).is_err());
    }
}
