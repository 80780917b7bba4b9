//! Binary encoding of the step protocol ([`super::protocol`]): one frame per message.
//!
//! A frame is a 20-byte header and a body:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `MBTB` |
//! | 4..6 | version, u16 LE ([`VERSION`]) |
//! | 6 | message kind (requests 1..=5, replies 65..=70) |
//! | 7 | activation precision of the frame (0 f32, 1 bf16; a host replies in the precision of the request) |
//! | 8..16 | body length in bytes, u64 LE |
//! | 16..20 | CRC-32 (IEEE) of header bytes 0..16 and the body, u32 LE |
//!
//! Body fields are little-endian and in declaration order: integers as u32 (indices,
//! shapes, counts) or u64 (steps, seeds), `f32`/`f64` as their IEEE bits, `bool` as one
//! byte 0/1, lists as a u32 count then the items, strings as a u32 length then UTF-8, an
//! `Option` as one byte 0/1 then the value. A tensor is a dtype byte (0 f32, 1 bf16), a
//! u64 element count and the raw elements: activations (`h`, `z_i`, `∂L/∂h'`, `∂L/∂h`
//! parts) travel in the frame's [`WirePrecision`], weights and moments always in f32, so
//! pulled and pushed branches are bit-exact. bf16 rounds to nearest, ties to even.
//!
//! Decoding checks the header, the length and the checksum before reading the body, and
//! every count against the bytes left, so a corrupt or hostile frame is an error, never a
//! panic or a huge allocation.
//!
//! ```
//! use mbtd_core::model::remote::{Request, WirePrecision, decode_request, encode_request};
//! let pull = Request::Pull(vec![(0, 2), (1, 0)]);
//! let bytes = encode_request(&pull, WirePrecision::F32);
//! assert_eq!(decode_request(&bytes).unwrap(), (pull, WirePrecision::F32));
//! ```

use super::protocol::{
    AdamWStep, Backward, BackwardReply, BranchGrad, BranchState, Forward, ForwardReply, Reply,
    Request, Update, UpdateReply,
};
use crate::model::params::{BRANCH_TENSORS, BranchParams, branch_shape};
use serde::{Deserialize, Serialize};

/// Magic bytes opening every frame.
pub const MAGIC: [u8; 4] = *b"MBTB";
/// Version of the encoding written and the only one read.
pub const VERSION: u16 = 1;
/// Bytes of the frame header.
pub const HEADER_LEN: usize = 20;

/// Number format of activations on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WirePrecision {
    /// IEEE f32: the remote computation is bitwise the local one.
    #[default]
    F32,
    /// bfloat16 (half the bytes; activations rounded to 8 significant bits).
    Bf16,
}

impl WirePrecision {
    fn tag(self) -> u8 {
        match self {
            WirePrecision::F32 => 0,
            WirePrecision::Bf16 => 1,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(WirePrecision::F32),
            1 => Some(WirePrecision::Bf16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            WirePrecision::F32 => 4,
            WirePrecision::Bf16 => 2,
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a header.
    #[error(
        "frame of {len} bytes is shorter than the {HEADER_LEN}-byte header; the sender cut it short"
    )]
    Short {
        /// Bytes received.
        len: usize,
    },
    /// The first four bytes are not `MBTB`.
    #[error(
        "frame starts with {found:?}, not the magic \"MBTB\"; the peer is not speaking the mbtd branch protocol"
    )]
    Magic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A version this build does not read.
    #[error(
        "frame version {found}, this build reads version {VERSION}; run the same mbtd version on the coordinator and every node"
    )]
    Version {
        /// Version in the header.
        found: u16,
    },
    /// The header's kind byte names no message (or a reply where a request was expected, or
    /// the other way round).
    #[error("message kind {kind} is not a {expected}")]
    Kind {
        /// Kind byte found.
        kind: u8,
        /// `"request"` or `"reply"`.
        expected: &'static str,
    },
    /// The header's precision byte is neither f32 nor bf16.
    #[error("header precision byte {tag}: expected 0 (f32) or 1 (bf16)")]
    Precision {
        /// Byte found.
        tag: u8,
    },
    /// The body is not as long as the header says.
    #[error(
        "header declares a {declared}-byte body, the frame carries {actual}; the frame was cut or padded in transit"
    )]
    Length {
        /// Body length in the header.
        declared: u64,
        /// Body bytes present.
        actual: u64,
    },
    /// The CRC-32 of the header and body does not match the header's.
    #[error(
        "frame checksum {computed:#010x} differs from the header's {declared:#010x}; the frame was corrupted in transit"
    )]
    Checksum {
        /// Checksum in the header.
        declared: u32,
        /// Checksum of the body received.
        computed: u32,
    },
    /// The body ended inside a field.
    #[error("body ends inside `{field}`: {need} bytes needed, {left} left")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: u64,
        /// Bytes left in the body.
        left: usize,
    },
    /// Bytes left over after the last field.
    #[error("{extra} bytes after the last field of a {message}")]
    Trailing {
        /// Bytes left over.
        extra: usize,
        /// Message decoded.
        message: &'static str,
    },
    /// A field holds a value outside its domain.
    #[error("field `{field}`: {msg}")]
    Invalid {
        /// Field being read.
        field: &'static str,
        /// What is wrong.
        msg: String,
    },
}

const K_FORWARD: u8 = 1;
const K_BACKWARD: u8 = 2;
const K_UPDATE: u8 = 3;
const K_PULL: u8 = 4;
const K_PUSH: u8 = 5;
const K_R_FORWARD: u8 = 65;
const K_R_BACKWARD: u8 = 66;
const K_R_UPDATE: u8 = 67;
const K_R_PULLED: u8 = 68;
const K_R_PUSHED: u8 = 69;
const K_R_REFUSED: u8 = 70;

/// Total length (header included) of the frame whose header is `header`, after checking
/// its magic and version: what a stream transport reads before the body.
pub fn frame_len(header: &[u8; HEADER_LEN]) -> Result<u64, WireError> {
    let found = [header[0], header[1], header[2], header[3]];
    if found != MAGIC {
        return Err(WireError::Magic { found });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(WireError::Version { found: version });
    }
    let body = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0xff; 8]));
    Ok(body.saturating_add(HEADER_LEN as u64))
}

/// Encodes a request; activations in `wire` precision.
pub fn encode_request(req: &Request, wire: WirePrecision) -> Vec<u8> {
    let mut w = Writer::new(wire);
    let kind = match req {
        Request::Forward(f) => {
            w.u64(f.step);
            w.idx(f.layer);
            w.list(&f.branches, |w, &i| w.idx(i));
            w.idx(f.batch);
            w.idx(f.seq);
            w.opt(f.segments.as_ref(), |w, s| {
                w.u64(s.len() as u64);
                for &x in s {
                    w.buf.extend_from_slice(&x.to_le_bytes());
                }
            });
            w.bool(f.rope);
            w.opt(f.dropout.as_ref(), |w, &(p, seed)| {
                w.f32(p);
                w.u64(seed);
            });
            w.bool(f.train);
            w.activation(&f.h);
            K_FORWARD
        }
        Request::Backward(b) => {
            w.u64(b.step);
            w.idx(b.layer);
            w.list(&b.branches, |w, &(i, a)| {
                w.idx(i);
                w.f32(a);
            });
            w.activation(&b.dh);
            K_BACKWARD
        }
        Request::Update(u) => {
            w.u64(u.step);
            let a = u.adamw;
            for x in [a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.bc1, a.bc2] {
                w.f32(x);
            }
            w.list(&u.branches, |w, &(l, i, k)| {
                w.idx(l);
                w.idx(i);
                w.f32(k);
            });
            K_UPDATE
        }
        Request::Pull(keys) => {
            w.list(keys, |w, &(l, i)| {
                w.idx(l);
                w.idx(i);
            });
            K_PULL
        }
        Request::Push(states) => {
            w.list(states, Writer::state);
            K_PUSH
        }
    };
    w.finish(kind)
}

/// Encodes a reply; activations in `wire` precision.
pub fn encode_reply(reply: &Reply, wire: WirePrecision) -> Vec<u8> {
    let mut w = Writer::new(wire);
    let kind = match reply {
        Reply::Forward(f) => {
            w.u64(f.step);
            w.idx(f.layer);
            w.list(&f.outputs, |w, (i, z)| {
                w.idx(*i);
                w.activation(z);
            });
            K_R_FORWARD
        }
        Reply::Backward(b) => {
            w.u64(b.step);
            w.idx(b.layer);
            w.list(&b.grads, |w, g| {
                w.idx(g.branch);
                w.activation(&g.dh);
                w.f64(g.sq_norm);
            });
            K_R_BACKWARD
        }
        Reply::Update(u) => {
            w.u64(u.step);
            for keys in [&u.applied, &u.refused] {
                w.list(keys, |w, &(l, i)| {
                    w.idx(l);
                    w.idx(i);
                });
            }
            K_R_UPDATE
        }
        Reply::Pulled(states) => {
            w.list(states, Writer::state);
            K_R_PULLED
        }
        Reply::Pushed(n) => {
            w.idx(*n);
            K_R_PUSHED
        }
        Reply::Refused(msg) => {
            w.u32(msg.len() as u32);
            w.buf.extend_from_slice(msg.as_bytes());
            K_R_REFUSED
        }
    };
    w.finish(kind)
}

/// Decodes a request frame and its activation precision.
pub fn decode_request(bytes: &[u8]) -> Result<(Request, WirePrecision), WireError> {
    let (kind, wire, mut r) = open(bytes)?;
    let req = match kind {
        K_FORWARD => Request::Forward(Forward {
            step: r.u64("step")?,
            layer: r.idx("layer")?,
            branches: r.list("branches", 4, |r| r.idx("branches"))?,
            batch: r.idx("batch")?,
            seq: r.idx("seq")?,
            segments: r.opt("segments", |r| {
                let n = r.count64("segments", 2)?;
                let raw = r.take(n * 2, "segments")?;
                Ok(raw
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect())
            })?,
            rope: r.bool("rope")?,
            dropout: r.opt("dropout", |r| {
                Ok((r.f32("dropout.p")?, r.u64("dropout.seed")?))
            })?,
            train: r.bool("train")?,
            h: r.tensor("h")?,
        }),
        K_BACKWARD => Request::Backward(Backward {
            step: r.u64("step")?,
            layer: r.idx("layer")?,
            branches: r.list("branches", 8, |r| {
                Ok((r.idx("branches")?, r.f32("alpha_tilde")?))
            })?,
            dh: r.tensor("dh")?,
        }),
        K_UPDATE => {
            let step = r.u64("step")?;
            let mut f = |field| r.f32(field);
            let adamw = AdamWStep {
                lr: f("lr")?,
                beta1: f("beta1")?,
                beta2: f("beta2")?,
                eps: f("eps")?,
                weight_decay: f("weight_decay")?,
                bc1: f("bc1")?,
                bc2: f("bc2")?,
            };
            let branches = r.list("branches", 12, |r| {
                Ok((r.idx("layer")?, r.idx("branch")?, r.f32("k")?))
            })?;
            Request::Update(Update {
                step,
                adamw,
                branches,
            })
        }
        K_PULL => Request::Pull(r.keys("branches")?),
        K_PUSH => Request::Push(r.list("branches", 1, Reader::state)?),
        kind => {
            return Err(WireError::Kind {
                kind,
                expected: "request",
            });
        }
    };
    r.end(req.name())?;
    Ok((req, wire))
}

/// Decodes a reply frame and its activation precision.
pub fn decode_reply(bytes: &[u8]) -> Result<(Reply, WirePrecision), WireError> {
    let (kind, wire, mut r) = open(bytes)?;
    let reply = match kind {
        K_R_FORWARD => Reply::Forward(ForwardReply {
            step: r.u64("step")?,
            layer: r.idx("layer")?,
            outputs: r.list("outputs", 13, |r| Ok((r.idx("branch")?, r.tensor("z")?)))?,
        }),
        K_R_BACKWARD => Reply::Backward(BackwardReply {
            step: r.u64("step")?,
            layer: r.idx("layer")?,
            grads: r.list("grads", 21, |r| {
                Ok(BranchGrad {
                    branch: r.idx("branch")?,
                    dh: r.tensor("dh")?,
                    sq_norm: r.f64("sq_norm")?,
                })
            })?,
        }),
        K_R_UPDATE => Reply::Update(UpdateReply {
            step: r.u64("step")?,
            applied: r.keys("applied")?,
            refused: r.keys("refused")?,
        }),
        K_R_PULLED => Reply::Pulled(r.list("branches", 1, Reader::state)?),
        K_R_PUSHED => Reply::Pushed(r.idx("count")?),
        K_R_REFUSED => {
            let n = r.u32("message")? as usize;
            let raw = r.take(n, "message")?;
            let msg = std::str::from_utf8(raw).map_err(|e| WireError::Invalid {
                field: "message",
                msg: format!("not UTF-8: {e}"),
            })?;
            Reply::Refused(msg.to_owned())
        }
        kind => {
            return Err(WireError::Kind {
                kind,
                expected: "reply",
            });
        }
    };
    r.end(reply.name())?;
    Ok((reply, wire))
}

/// Checks the header, length and checksum; returns the kind, the precision and a reader
/// over the body.
fn open(bytes: &[u8]) -> Result<(u8, WirePrecision, Reader<'_>), WireError> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::Short { len: bytes.len() })?;
    frame_len(header)?;
    let wire = WirePrecision::from_tag(header[7]).ok_or(WireError::Precision { tag: header[7] })?;
    let declared = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0xff; 8]));
    let body = &bytes[HEADER_LEN..];
    if declared != body.len() as u64 {
        return Err(WireError::Length {
            declared,
            actual: body.len() as u64,
        });
    }
    let declared = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
    let computed = checksum(&header[..16], body);
    if declared != computed {
        return Err(WireError::Checksum { declared, computed });
    }
    Ok((header[6], wire, Reader { buf: body, at: 0 }))
}

/// CRC-32 of the first 16 header bytes followed by the body.
pub(crate) fn checksum(head: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(body);
    h.finalize()
}

struct Writer {
    buf: Vec<u8>,
    wire: WirePrecision,
}

impl Writer {
    fn new(wire: WirePrecision) -> Self {
        Self {
            buf: vec![0; HEADER_LEN],
            wire,
        }
    }

    fn finish(mut self, kind: u8) -> Vec<u8> {
        let len = (self.buf.len() - HEADER_LEN) as u64;
        let h = &mut self.buf[..HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6] = kind;
        h[7] = self.wire.tag();
        h[8..16].copy_from_slice(&len.to_le_bytes());
        let (head, body) = self.buf.split_at(HEADER_LEN);
        let crc = checksum(&head[..16], body);
        self.buf[16..20].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }

    fn u32(&mut self, x: u32) {
        self.buf.extend_from_slice(&x.to_le_bytes());
    }

    /// An index, shape or count (u32 on the wire; every such value of a valid model fits).
    fn idx(&mut self, x: usize) {
        self.u32(x as u32);
    }

    fn u64(&mut self, x: u64) {
        self.buf.extend_from_slice(&x.to_le_bytes());
    }

    fn f32(&mut self, x: f32) {
        self.u32(x.to_bits());
    }

    fn f64(&mut self, x: f64) {
        self.u64(x.to_bits());
    }

    fn bool(&mut self, x: bool) {
        self.buf.push(x as u8);
    }

    fn opt<T>(&mut self, x: Option<&T>, f: impl FnOnce(&mut Self, &T)) {
        self.bool(x.is_some());
        if let Some(x) = x {
            f(self, x);
        }
    }

    fn list<T>(&mut self, xs: &[T], mut f: impl FnMut(&mut Self, &T)) {
        self.idx(xs.len());
        for x in xs {
            f(self, x);
        }
    }

    fn activation(&mut self, t: &[f32]) {
        self.tensor(t, self.wire);
    }

    fn tensor(&mut self, t: &[f32], prec: WirePrecision) {
        self.buf.push(prec.tag());
        self.u64(t.len() as u64);
        let at = self.buf.len();
        self.buf.resize(at + t.len() * prec.bytes(), 0);
        let out = &mut self.buf[at..];
        match prec {
            WirePrecision::F32 => {
                for (o, x) in out.chunks_exact_mut(4).zip(t) {
                    o.copy_from_slice(&x.to_le_bytes());
                }
            }
            WirePrecision::Bf16 => {
                for (o, &x) in out.chunks_exact_mut(2).zip(t) {
                    o.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
                }
            }
        }
    }

    fn params(&mut self, p: &BranchParams) {
        for t in p.tensors() {
            self.tensor(t, WirePrecision::F32);
        }
    }

    fn state(&mut self, s: &BranchState) {
        self.idx(s.layer);
        self.idx(s.branch);
        self.params(&s.params);
        self.params(&s.m);
        self.params(&s.v);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let left = self.buf.len() - self.at;
        if n > left {
            return Err(WireError::Truncated {
                field,
                need: n as u64,
                left,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let s = self.take(N, field)?;
        let mut a = [0; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn idx(&mut self, field: &'static str) -> Result<usize, WireError> {
        self.u32(field).map(|x| x as usize)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn f32(&mut self, field: &'static str) -> Result<f32, WireError> {
        self.u32(field).map(f32::from_bits)
    }

    fn f64(&mut self, field: &'static str) -> Result<f64, WireError> {
        self.u64(field).map(f64::from_bits)
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.array::<1>(field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(WireError::Invalid {
                field,
                msg: format!("byte {b} is not a boolean (0 or 1)"),
            }),
        }
    }

    fn opt<T>(
        &mut self,
        field: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        if self.bool(field)? {
            f(self).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A u64 element count whose elements (`size` bytes each) fit in the bytes left.
    fn count64(&mut self, field: &'static str, size: usize) -> Result<usize, WireError> {
        let n = self.u64(field)?;
        let left = self.buf.len() - self.at;
        if n.checked_mul(size as u64).is_none_or(|b| b > left as u64) {
            return Err(WireError::Truncated {
                field,
                need: n.saturating_mul(size as u64),
                left,
            });
        }
        Ok(n as usize)
    }

    /// A list whose items take at least `min` bytes each.
    fn list<T>(
        &mut self,
        field: &'static str,
        min: usize,
        mut f: impl FnMut(&mut Self) -> Result<T, WireError>,
    ) -> Result<Vec<T>, WireError> {
        let n = self.u32(field)? as usize;
        let left = self.buf.len() - self.at;
        if n.saturating_mul(min) > left {
            return Err(WireError::Truncated {
                field,
                need: (n as u64).saturating_mul(min as u64),
                left,
            });
        }
        (0..n).map(|_| f(self)).collect()
    }

    fn keys(&mut self, field: &'static str) -> Result<Vec<(usize, usize)>, WireError> {
        self.list(field, 8, |r| Ok((r.idx("layer")?, r.idx("branch")?)))
    }

    fn tensor(&mut self, field: &'static str) -> Result<Vec<f32>, WireError> {
        let tag = self.array::<1>(field)?[0];
        let prec = WirePrecision::from_tag(tag).ok_or_else(|| WireError::Invalid {
            field,
            msg: format!("dtype byte {tag}: expected 0 (f32) or 1 (bf16)"),
        })?;
        let n = self.count64(field, prec.bytes())?;
        let raw = self.take(n * prec.bytes(), field)?;
        Ok(match prec {
            WirePrecision::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WirePrecision::Bf16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        })
    }

    /// Twelve f32 tensors with the shapes of a branch of width `d = len(ln1.gain)`.
    fn params(&mut self, field: &'static str) -> Result<BranchParams, WireError> {
        let mut p = BranchParams::zeros(0);
        let mut d = 0;
        for (idx, t) in p.tensors_mut().into_iter().enumerate() {
            *t = self.tensor(field)?;
            if idx == 0 {
                d = t.len();
            }
            let want: usize = branch_shape(idx, d).iter().product();
            if t.len() != want || d == 0 {
                return Err(WireError::Invalid {
                    field,
                    msg: format!(
                        "tensor `{}` has {} elements, a branch of width {d} has {want} (and d >= 1)",
                        BRANCH_TENSORS[idx].0,
                        t.len()
                    ),
                });
            }
        }
        Ok(p)
    }

    fn state(&mut self) -> Result<BranchState, WireError> {
        let (layer, branch) = (self.idx("layer")?, self.idx("branch")?);
        let params = self.params("params")?;
        let m = self.params("m")?;
        let v = self.params("v")?;
        if m.ln1_gain.len() != params.ln1_gain.len() || v.ln1_gain.len() != params.ln1_gain.len() {
            return Err(WireError::Invalid {
                field: "m/v",
                msg: format!(
                    "branch ({layer}, {branch}): moments of width {}/{} for weights of width {}",
                    m.ln1_gain.len(),
                    v.ln1_gain.len(),
                    params.ln1_gain.len()
                ),
            });
        }
        Ok(BranchState {
            layer,
            branch,
            params,
            m,
            v,
        })
    }

    fn end(&self, message: &'static str) -> Result<(), WireError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            extra => Err(WireError::Trailing { extra, message }),
        }
    }
}
