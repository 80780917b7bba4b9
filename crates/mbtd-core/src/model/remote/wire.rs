//! Binary encoding of the step protocol ([`super::protocol`]): one frame per message.
//!
//! A frame is a 20-byte header and a body:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `MBTB` |
//! | 4..6 | version, u16 LE ([`VERSION`]) |
//! | 6 | message kind (requests 1..=8, replies 65..=72) |
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
//! Version 2 added the generation messages (open 6, decode 7, close 8; decoded 71,
//! closed 72); the encoding of every version-1 message is unchanged, but a version-1
//! peer is refused as a whole (it could not serve generation).
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

use super::codec::{Reader, Writer, checksum};
use super::protocol::{
    AdamWStep, Backward, BackwardReply, BranchGrad, Decode, DecodeReply, Forward, ForwardReply,
    Open, Reply, Request, Update, UpdateReply,
};
use serde::{Deserialize, Serialize};

/// Magic bytes opening every frame.
pub const MAGIC: [u8; 4] = *b"MBTB";
/// Version of the encoding written and the only one read.
pub const VERSION: u16 = 2;
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
    pub(super) fn tag(self) -> u8 {
        match self {
            WirePrecision::F32 => 0,
            WirePrecision::Bf16 => 1,
        }
    }

    pub(super) fn from_tag(tag: u8) -> Option<Self> {
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
const K_OPEN: u8 = 6;
const K_DECODE: u8 = 7;
const K_CLOSE: u8 = 8;
const K_R_FORWARD: u8 = 65;
const K_R_BACKWARD: u8 = 66;
const K_R_UPDATE: u8 = 67;
const K_R_PULLED: u8 = 68;
const K_R_PUSHED: u8 = 69;
const K_R_REFUSED: u8 = 70;
const K_R_DECODED: u8 = 71;
const K_R_CLOSED: u8 = 72;

fn write_forward(w: &mut Writer, f: &Forward) {
    w.u64(f.step);
    w.idx(f.layer);
    w.list(&f.branches, |w, &i| w.idx(i));
    w.idx(f.batch);
    w.idx(f.seq);
    w.opt(f.segments.as_ref(), |w, s| w.u16s(s));
    w.bool(f.rope);
    w.opt(f.dropout.as_ref(), |w, &(p, seed)| {
        w.f32(p);
        w.u64(seed);
    });
    w.bool(f.train);
    w.activation(&f.h);
}

fn read_forward(r: &mut Reader<'_>) -> Result<Forward, WireError> {
    Ok(Forward {
        step: r.u64("step")?,
        layer: r.idx("layer")?,
        branches: r.list("branches", 4, |r| r.idx("branches"))?,
        batch: r.idx("batch")?,
        seq: r.idx("seq")?,
        segments: r.opt("segments", |r| r.u16s("segments"))?,
        rope: r.bool("rope")?,
        dropout: r.opt("dropout", |r| {
            Ok((r.f32("dropout.p")?, r.u64("dropout.seed")?))
        })?,
        train: r.bool("train")?,
        h: r.tensor("h")?,
    })
}

/// `(branch, output)` pairs: the index, then the output as an activation.
fn write_outputs(w: &mut Writer, outputs: &[(usize, Vec<f32>)]) {
    w.list(outputs, |w, (i, z)| {
        w.idx(*i);
        w.activation(z);
    });
}

fn read_outputs(r: &mut Reader<'_>) -> Result<Vec<(usize, Vec<f32>)>, WireError> {
    r.list("outputs", 13, |r| Ok((r.idx("branch")?, r.tensor("z")?)))
}

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
            write_forward(&mut w, f);
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
        Request::Open(o) => {
            w.u64(o.session);
            write_forward(&mut w, &o.forward);
            K_OPEN
        }
        Request::Decode(d) => {
            w.u64(d.session);
            w.idx(d.layer);
            w.u64(d.pos);
            w.list(&d.branches, |w, &i| w.idx(i));
            w.activation(&d.x);
            K_DECODE
        }
        Request::Close(session) => {
            w.u64(*session);
            K_CLOSE
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
            write_outputs(&mut w, &f.outputs);
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
            w.str(msg);
            K_R_REFUSED
        }
        Reply::Decoded(d) => {
            w.u64(d.session);
            w.idx(d.layer);
            w.u64(d.pos);
            write_outputs(&mut w, &d.outputs);
            K_R_DECODED
        }
        Reply::Closed(n) => {
            w.idx(*n);
            K_R_CLOSED
        }
    };
    w.finish(kind)
}

/// Decodes a request frame and its activation precision.
pub fn decode_request(bytes: &[u8]) -> Result<(Request, WirePrecision), WireError> {
    let (kind, wire, mut r) = open(bytes)?;
    let req = match kind {
        K_FORWARD => Request::Forward(read_forward(&mut r)?),
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
        K_OPEN => Request::Open(Open {
            session: r.u64("session")?,
            forward: read_forward(&mut r)?,
        }),
        K_DECODE => Request::Decode(Decode {
            session: r.u64("session")?,
            layer: r.idx("layer")?,
            pos: r.u64("pos")?,
            branches: r.list("branches", 4, |r| r.idx("branches"))?,
            x: r.tensor("x")?,
        }),
        K_CLOSE => Request::Close(r.u64("session")?),
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
            outputs: read_outputs(&mut r)?,
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
        K_R_REFUSED => Reply::Refused(r.str("message")?),
        K_R_DECODED => Reply::Decoded(DecodeReply {
            session: r.u64("session")?,
            layer: r.idx("layer")?,
            pos: r.u64("pos")?,
            outputs: read_outputs(&mut r)?,
        }),
        K_R_CLOSED => Reply::Closed(r.idx("count")?),
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
    Ok((header[6], wire, Reader::new(body)))
}
