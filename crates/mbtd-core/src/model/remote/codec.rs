//! The field codec of [`super::wire`]: a writer and a bounds-checked reader of
//! little-endian fields, lists, options and tensors, and the frame checksum.

use super::protocol::BranchState;
use super::wire::{HEADER_LEN, MAGIC, VERSION, WireError, WirePrecision};
use crate::model::params::{BRANCH_TENSORS, BranchParams, branch_shape};

/// CRC-32 of the first 16 header bytes followed by the body.
pub(super) fn checksum(head: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(body);
    h.finalize()
}

pub(super) struct Writer {
    buf: Vec<u8>,
    wire: WirePrecision,
}

impl Writer {
    pub(super) fn new(wire: WirePrecision) -> Self {
        Self {
            buf: vec![0; HEADER_LEN],
            wire,
        }
    }

    pub(super) fn finish(mut self, kind: u8) -> Vec<u8> {
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

    pub(super) fn u32(&mut self, x: u32) {
        self.buf.extend_from_slice(&x.to_le_bytes());
    }

    /// An index, shape or count (u32 on the wire; every such value of a valid model fits).
    pub(super) fn idx(&mut self, x: usize) {
        self.u32(x as u32);
    }

    pub(super) fn u64(&mut self, x: u64) {
        self.buf.extend_from_slice(&x.to_le_bytes());
    }

    pub(super) fn f32(&mut self, x: f32) {
        self.u32(x.to_bits());
    }

    /// A u64 count, then the values.
    pub(super) fn u16s(&mut self, xs: &[u16]) {
        self.u64(xs.len() as u64);
        for &x in xs {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// A u32 byte length, then the UTF-8 bytes.
    pub(super) fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub(super) fn f64(&mut self, x: f64) {
        self.u64(x.to_bits());
    }

    pub(super) fn bool(&mut self, x: bool) {
        self.buf.push(x as u8);
    }

    pub(super) fn opt<T>(&mut self, x: Option<&T>, f: impl FnOnce(&mut Self, &T)) {
        self.bool(x.is_some());
        if let Some(x) = x {
            f(self, x);
        }
    }

    pub(super) fn list<T>(&mut self, xs: &[T], mut f: impl FnMut(&mut Self, &T)) {
        self.idx(xs.len());
        for x in xs {
            f(self, x);
        }
    }

    pub(super) fn activation(&mut self, t: &[f32]) {
        self.tensor(t, self.wire);
    }

    pub(super) fn tensor(&mut self, t: &[f32], prec: WirePrecision) {
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

    pub(super) fn params(&mut self, p: &BranchParams) {
        for t in p.tensors() {
            self.tensor(t, WirePrecision::F32);
        }
    }

    pub(super) fn state(&mut self, s: &BranchState) {
        self.idx(s.layer);
        self.idx(s.branch);
        self.params(&s.params);
        self.params(&s.m);
        self.params(&s.v);
    }
}

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader over a frame's body.
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
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

    pub(super) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], WireError> {
        let s = self.take(N, field)?;
        let mut a = [0; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_le_bytes)
    }

    pub(super) fn idx(&mut self, field: &'static str) -> Result<usize, WireError> {
        self.u32(field).map(|x| x as usize)
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_le_bytes)
    }

    pub(super) fn f32(&mut self, field: &'static str) -> Result<f32, WireError> {
        self.u32(field).map(f32::from_bits)
    }

    pub(super) fn f64(&mut self, field: &'static str) -> Result<f64, WireError> {
        self.u64(field).map(f64::from_bits)
    }

    pub(super) fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.array::<1>(field)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(WireError::Invalid {
                field,
                msg: format!("byte {b} is not a boolean (0 or 1)"),
            }),
        }
    }

    pub(super) fn opt<T>(
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
    pub(super) fn count64(&mut self, field: &'static str, size: usize) -> Result<usize, WireError> {
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

    /// A u64 count, then that many u16 values.
    pub(super) fn u16s(&mut self, field: &'static str) -> Result<Vec<u16>, WireError> {
        let n = self.count64(field, 2)?;
        let raw = self.take(n * 2, field)?;
        Ok(raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect())
    }

    /// A u32 byte length, then UTF-8 text.
    pub(super) fn str(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.u32(field)? as usize;
        let raw = self.take(n, field)?;
        let s = std::str::from_utf8(raw).map_err(|e| WireError::Invalid {
            field,
            msg: format!("not UTF-8: {e}"),
        })?;
        Ok(s.to_owned())
    }

    /// A list whose items take at least `min` bytes each.
    pub(super) fn list<T>(
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

    pub(super) fn keys(&mut self, field: &'static str) -> Result<Vec<(usize, usize)>, WireError> {
        self.list(field, 8, |r| Ok((r.idx("layer")?, r.idx("branch")?)))
    }

    pub(super) fn tensor(&mut self, field: &'static str) -> Result<Vec<f32>, WireError> {
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
    pub(super) fn params(&mut self, field: &'static str) -> Result<BranchParams, WireError> {
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

    pub(super) fn state(&mut self) -> Result<BranchState, WireError> {
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

    pub(super) fn end(&self, message: &'static str) -> Result<(), WireError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            extra => Err(WireError::Trailing { extra, message }),
        }
    }
}
