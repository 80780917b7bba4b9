//! On-disk format of replay segments.
//!
//! A segment file `seg-NNNNNNNNNN.log` is a 16-byte header followed by records:
//!
//! ```text
//! header : magic "MBTDSEG\0" (8) | version u32 LE (= 2) | crc32 of the 12 bytes before (u32 LE)
//! record : len u32 LE | crc32(payload) u32 LE | payload (len bytes)
//! payload: seq u64 | ingest_ms u64 | row u64 | file_hash [32] | kind u8
//!          | (kind 2, 3 only: time_ms i64) | source_len u32 | source | a_len u32 | a
//!          | (prompt_response only: b_len u32 | b)
//! ```
//!
//! `kind` also says the record version: 0 (text) and 1 (prompt_response) are version-1
//! records, without an arrival time; 2 (text) and 3 (prompt_response) are version-2
//! records, whose `time_ms` is the row's arrival time in milliseconds since the Unix epoch
//! (its `time` column, or its file's mtime). This build writes version-2 records into
//! version-2 segments. It reads version-1 segments (written before rows carried a time:
//! their rows have no time, [`Record::time_ms`] `None`) and never appends to one; a
//! version-2 segment may hold version-1 records that compaction copied from a version-1
//! segment. A build that reads only version 1 skips version-2 segments, naming their
//! version, instead of misreading them.
//!
//! All integers little-endian, strings UTF-8. `seq` is the global sequence number,
//! strictly increasing along a segment and across segments. A scan accepts a record
//! only if its length fits, its CRC matches, its payload decodes and its `seq` is
//! greater than the previous record's. After a bad record the scanner looks for the
//! next offset where a valid record starts (resynchronisation); bytes in between are a
//! corrupt region, reported and skipped. Bad bytes with no valid record after them are
//! the tail: torn by a crash (the store truncates it when it is the last segment).

use crate::text::csv_rows::RowBody;

/// Segment file magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"MBTDSEG\0";
/// Segment format version written by this build.
pub const SEGMENT_VERSION: u32 = 2;
/// The older segment version this build still reads (rows without a time).
pub const SEGMENT_VERSION_V1: u32 = 1;
/// Bytes of the segment header.
pub const HEADER_LEN: u64 = 16;
/// Bytes of a record frame before its payload (len + crc).
pub const FRAME_OVERHEAD: usize = 8;
/// Smallest possible payload (a text row with empty source and text).
const MIN_PAYLOAD: usize = 8 + 8 + 8 + 32 + 1 + 4 + 4;

/// A replay record: one row with its provenance.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// Global sequence number (strictly increasing, never reused once durable).
    pub seq: u64,
    /// Wall-clock time of the append, milliseconds since the Unix epoch.
    pub ingest_ms: u64,
    /// Arrival time of the row (its `time` column, else its file's mtime), milliseconds
    /// since the Unix epoch; `None` for rows of a version-1 segment.
    pub time_ms: Option<i64>,
    /// Row number within the source file (its 1-based physical line).
    pub row: u64,
    /// blake3 hash of the whole source file.
    pub file_hash: [u8; 32],
    /// Source tag.
    pub source: String,
    /// The text fields.
    pub body: RowBody,
}

/// The segment header bytes.
pub fn segment_header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Header check result.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderCheck {
    /// Valid header of this build's version.
    Ok,
    /// Valid header of version 1: readable, never appended to.
    V1,
    /// Fewer bytes than a header (a torn creation).
    Short,
    /// Wrong magic or checksum.
    Corrupt,
    /// Valid header of another version.
    Version(u32),
}

/// Check a segment's first bytes.
pub fn check_header(bytes: &[u8]) -> HeaderCheck {
    if bytes.len() < HEADER_LEN as usize {
        return HeaderCheck::Short;
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if &bytes[..8] != SEGMENT_MAGIC || crc != crc32fast::hash(&bytes[..12]) {
        return HeaderCheck::Corrupt;
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    match version {
        SEGMENT_VERSION => HeaderCheck::Ok,
        SEGMENT_VERSION_V1 => HeaderCheck::V1,
        v => HeaderCheck::Version(v),
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Append one framed version-2 record (with its arrival time `time_ms`) to `buf`;
/// returns the frame length.
#[allow(clippy::too_many_arguments)]
pub fn encode_record(
    buf: &mut Vec<u8>,
    seq: u64,
    ingest_ms: u64,
    row: u64,
    file_hash: &[u8; 32],
    time_ms: i64,
    source: &str,
    body: &RowBody,
) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_OVERHEAD]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&ingest_ms.to_le_bytes());
    buf.extend_from_slice(&row.to_le_bytes());
    buf.extend_from_slice(file_hash);
    match body {
        RowBody::Text { text } => {
            buf.push(2);
            buf.extend_from_slice(&time_ms.to_le_bytes());
            put_str(buf, source);
            put_str(buf, text);
        }
        RowBody::PromptResponse { prompt, response } => {
            buf.push(3);
            buf.extend_from_slice(&time_ms.to_le_bytes());
            put_str(buf, source);
            put_str(buf, prompt);
            put_str(buf, response);
        }
    }
    let payload = &buf[start + FRAME_OVERHEAD..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    buf.len() - start
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        Some(std::str::from_utf8(self.take(n)?).ok()?.to_string())
    }
}

/// Decode a payload (CRC already checked). `None` if it is malformed.
pub fn decode_payload(payload: &[u8]) -> Option<Record> {
    let mut c = Cursor { b: payload, at: 0 };
    let seq = c.u64()?;
    let ingest_ms = c.u64()?;
    let row = c.u64()?;
    let file_hash: [u8; 32] = c.take(32)?.try_into().ok()?;
    let kind = c.take(1)?[0];
    let time_ms = match kind {
        0 | 1 => None,
        2 | 3 => Some(i64::from_le_bytes(c.take(8)?.try_into().ok()?)),
        _ => return None,
    };
    let source = c.string()?;
    let body = match kind {
        0 | 2 => RowBody::Text { text: c.string()? },
        1 | 3 => RowBody::PromptResponse {
            prompt: c.string()?,
            response: c.string()?,
        },
        _ => return None,
    };
    if c.at != payload.len() {
        return None;
    }
    Some(Record {
        seq,
        ingest_ms,
        time_ms,
        row,
        file_hash,
        source,
        body,
    })
}

/// Decode a whole frame at the start of `frame`.
pub fn decode_frame(frame: &[u8]) -> Option<Record> {
    let len = u32::from_le_bytes(frame.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(frame.get(4..8)?.try_into().ok()?);
    let payload = frame.get(FRAME_OVERHEAD..FRAME_OVERHEAD + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    decode_payload(payload)
}

/// A record found by a scan, with its place in the segment.
#[derive(Debug)]
pub struct Scanned {
    /// Offset of the frame in the segment file.
    pub offset: u64,
    /// Frame length (overhead + payload).
    pub frame_len: u32,
    /// The record.
    pub record: Record,
}

/// Result of scanning one segment's bytes (after the header).
#[derive(Debug, Default)]
pub struct SegmentScan {
    /// Valid records in order.
    pub records: Vec<Scanned>,
    /// Corrupt regions skipped in the middle: (offset, bytes).
    pub corrupt: Vec<(u64, u64)>,
    /// Offset where the valid data ends; bytes after it are a bad tail.
    pub valid_end: u64,
    /// Bytes after `valid_end`.
    pub tail_bytes: u64,
}

fn try_frame(bytes: &[u8], at: usize, min_seq: u64) -> Option<(Record, usize)> {
    let head = bytes.get(at..at + FRAME_OVERHEAD + MIN_PAYLOAD)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    if len < MIN_PAYLOAD || bytes.len() - at - FRAME_OVERHEAD < len {
        return None;
    }
    let seq = u64::from_le_bytes(head[8..16].try_into().ok()?);
    if seq < min_seq {
        return None;
    }
    let rec = decode_frame(&bytes[at..at + FRAME_OVERHEAD + len])?;
    Some((rec, FRAME_OVERHEAD + len))
}

/// Scan the records of a segment whose full contents are `bytes` (header included).
/// `min_seq` is the smallest acceptable sequence number (previous segment's last + 1).
pub fn scan_segment(bytes: &[u8], min_seq: u64) -> SegmentScan {
    let mut out = SegmentScan::default();
    let mut at = HEADER_LEN as usize;
    let mut min_seq = min_seq;
    while at < bytes.len() {
        if let Some((record, n)) = try_frame(bytes, at, min_seq) {
            min_seq = record.seq + 1;
            out.records.push(Scanned {
                offset: at as u64,
                frame_len: n as u32,
                record,
            });
            at += n;
            continue;
        }
        let next = (at + 1..bytes.len()).find(|&q| try_frame(bytes, q, min_seq).is_some());
        match next {
            Some(q) => {
                out.corrupt.push((at as u64, (q - at) as u64));
                at = q;
            }
            None => break,
        }
    }
    out.valid_end = at.min(bytes.len()) as u64;
    out.tail_bytes = bytes.len() as u64 - out.valid_end;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, text: &str) -> Vec<u8> {
        let mut b = Vec::new();
        encode_record(
            &mut b,
            seq,
            7,
            seq + 1,
            &[seq as u8; 32],
            1_700_000_000_000 + seq as i64,
            "src",
            &RowBody::Text { text: text.into() },
        );
        b
    }

    #[test]
    fn round_trip_both_kinds() {
        let body = RowBody::PromptResponse {
            prompt: "p".into(),
            response: "résponse".into(),
        };
        let mut b = Vec::new();
        let n = encode_record(&mut b, 5, 9, 3, &[1; 32], -86_400_000, "s", &body);
        assert_eq!(n, b.len());
        let r = decode_frame(&b).unwrap();
        assert_eq!((r.seq, r.ingest_ms, r.row, r.file_hash), (5, 9, 3, [1; 32]));
        assert_eq!(r.time_ms, Some(-86_400_000));
        assert_eq!((r.source.as_str(), r.body), ("s", body));
        b[20] ^= 1;
        assert!(decode_frame(&b).is_none());
    }

    /// A version-1 record (kind 0, no time field) still decodes, with no time.
    #[test]
    fn version_1_records_decode_without_a_time() {
        let body = RowBody::Text { text: "t".into() };
        let mut v2 = Vec::new();
        encode_record(&mut v2, 5, 9, 3, &[1; 32], 77, "s", &body);
        let kind_at = FRAME_OVERHEAD + 8 + 8 + 8 + 32;
        let mut v1 = v2[..kind_at].to_vec();
        v1.push(0);
        v1.extend_from_slice(&v2[kind_at + 1 + 8..]);
        let len = (v1.len() - FRAME_OVERHEAD) as u32;
        let crc = crc32fast::hash(&v1[FRAME_OVERHEAD..]);
        v1[..4].copy_from_slice(&len.to_le_bytes());
        v1[4..8].copy_from_slice(&crc.to_le_bytes());
        let r = decode_frame(&v1).unwrap();
        assert_eq!((r.seq, r.time_ms, r.body), (5, None, body));
        assert_eq!(decode_frame(&v2).unwrap().time_ms, Some(77));
    }

    #[test]
    fn scan_skips_middle_corruption_and_reports_torn_tail() {
        let mut seg = segment_header().to_vec();
        assert_eq!(check_header(&seg), HeaderCheck::Ok);
        for i in 1..=4 {
            seg.extend(rec(i, &format!("row {i}")));
        }
        let second = HEADER_LEN as usize + rec(1, "row 1").len();
        seg[second + 30] ^= 0xFF;
        let torn = rec(5, "torn");
        seg.extend_from_slice(&torn[..torn.len() - 3]);
        let scan = scan_segment(&seg, 1);
        let seqs: Vec<u64> = scan.records.iter().map(|r| r.record.seq).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.corrupt[0].0, second as u64);
        assert_eq!(scan.tail_bytes, torn.len() as u64 - 3);
        assert_eq!(scan.valid_end + scan.tail_bytes, seg.len() as u64);
    }

    #[test]
    fn header_checks() {
        let h = segment_header();
        assert_eq!(check_header(&h[..10]), HeaderCheck::Short);
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(check_header(&bad), HeaderCheck::Corrupt);
        let mut v = h;
        for (version, want) in [(1, HeaderCheck::V1), (3, HeaderCheck::Version(3))] {
            v[8..12].copy_from_slice(&u32::to_le_bytes(version));
            let crc = crc32fast::hash(&v[..12]);
            v[12..16].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(check_header(&v), want);
        }
    }
}
