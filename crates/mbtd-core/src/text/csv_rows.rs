//! Streaming CSV reader that turns inbox files into training rows.
//! Why over 600 lines: the ingest contract below (header, line numbers, every field rule
//! and the `time` cell) is one reader, kept in one file.
//!
//! Rules (the ingest contract):
//! - The input is UTF-8; a leading byte-order mark (`EF BB BF`) is skipped.
//! - A header line is required. Column names are matched after trimming blanks,
//!   ASCII case-insensitively. Either a `text` column (pre-training rows) or both
//!   `prompt` and `response` (instruction rows) must be present, not both kinds;
//!   an optional `source` column tags rows (an empty cell, or no column, means the
//!   file stem); an optional `time` column gives each row's arrival time as an RFC 3339
//!   timestamp with a `Z` or numeric offset ([`parse_time`]; an empty cell, or no column,
//!   leaves [`CsvRow::time_ms`] `None`: the ingester then uses the file's mtime). Other
//!   columns are ignored and reported once ([`CsvSchema::extra_columns`]).
//!   A header that does not satisfy this refuses the whole file ([`CsvError`]).
//! - Every later record is one row. A row — not the file — is rejected when it has a
//!   different number of fields than the header, a field that is not UTF-8, an empty
//!   (or blank) required field, a NUL byte (U+0000) in a field it uses, a `time` cell
//!   that is not an RFC 3339 timestamp, or more than
//!   `max_row_bytes` bytes of field data. A rejection carries the 1-based physical line
//!   where the record starts and names the field.
//! - Error messages list at most [`MAX_LISTED_COLUMNS`] header names, each cut to
//!   [`MAX_COLUMN_NAME_CHARS`] characters, so that a pathological header (a million
//!   columns) gives a short message.
//! - RFC 4180 quoting: quoted fields may hold commas, doubled quotes, CR, LF and CRLF;
//!   line ends may be LF, CRLF or a lone CR (each one line end, also for line numbers).
//!   Blank lines are skipped. Texts are kept whole.
//!
//! The reader holds one record in memory at a time, never the whole file.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};

use serde::{Deserialize, Serialize};

/// UTF-8 byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// Header names listed in a [`CsvError::Header`] message.
pub const MAX_LISTED_COLUMNS: usize = 20;
/// Characters of one column name echoed in a message.
pub const MAX_COLUMN_NAME_CHARS: usize = 64;

/// `s` cut to at most `max` characters, with `…` marking a cut.
pub fn clip_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

/// The first [`MAX_LISTED_COLUMNS`] names, each clipped, then how many more there are.
fn list_columns(names: &[String]) -> String {
    let mut out: Vec<String> = names
        .iter()
        .take(MAX_LISTED_COLUMNS)
        .map(|n| clip_chars(n, MAX_COLUMN_NAME_CHARS))
        .collect();
    if names.len() > MAX_LISTED_COLUMNS {
        out.push(format!("… and {} more", names.len() - MAX_LISTED_COLUMNS));
    }
    out.join(", ")
}

/// Errors that refuse a whole file.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// Reading the underlying file failed.
    #[error("reading CSV file {file}: {source}; check that the file is readable and not truncated")]
    Io {
        /// File being read.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file has no header line at all.
    #[error(
        "CSV file {file} is empty: a header line with a `text` column or `prompt` and `response` columns is required"
    )]
    Empty {
        /// File being read.
        file: String,
    },
    /// A header cell is not valid UTF-8.
    #[error("CSV file {file}: header column {column} is not valid UTF-8; save the file as UTF-8")]
    HeaderNotUtf8 {
        /// File being read.
        file: String,
        /// 1-based column index.
        column: usize,
    },
    /// The header lacks the required columns or is ambiguous.
    #[error(
        "CSV file {file}: {problem}; columns found: [{}]; the header needs a `text` column, or `prompt` and `response` columns (optional `source`)",
        list_columns(found)
    )]
    Header {
        /// File being read.
        file: String,
        /// What is wrong.
        problem: String,
        /// Column names as found in the header.
        found: Vec<String>,
    },
}

/// The content of one row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RowBody {
    /// A pre-training row: the loss covers the whole text.
    Text {
        /// The text.
        text: String,
    },
    /// An instruction row: the loss covers the response only.
    PromptResponse {
        /// The prompt.
        prompt: String,
        /// The response.
        response: String,
    },
}

/// The two kinds of rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    /// `text` rows.
    Text,
    /// `prompt` + `response` rows.
    PromptResponse,
}

impl RowKind {
    /// Stable lowercase name (`text`, `prompt_response`).
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Text => "text",
            RowKind::PromptResponse => "prompt_response",
        }
    }
}

impl std::fmt::Display for RowKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RowBody {
    /// The kind of this row.
    pub fn kind(&self) -> RowKind {
        match self {
            RowBody::Text { .. } => RowKind::Text,
            RowBody::PromptResponse { .. } => RowKind::PromptResponse,
        }
    }

    /// Total bytes of the text fields.
    pub fn text_bytes(&self) -> usize {
        match self {
            RowBody::Text { text } => text.len(),
            RowBody::PromptResponse { prompt, response } => prompt.len() + response.len(),
        }
    }
}

/// One accepted row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvRow {
    /// 1-based physical line where the record starts.
    pub line: u64,
    /// The `source` cell, or the file stem.
    pub source: String,
    /// The `time` cell in milliseconds since the Unix epoch; `None` without a `time`
    /// column or with an empty cell.
    pub time_ms: Option<i64>,
    /// The text fields.
    pub body: RowBody,
}

/// Parses a `time` cell (blanks around it trimmed): an RFC 3339 timestamp with a `Z` or
/// numeric offset, e.g. `2024-03-01T12:00:00Z` or `2024-03-01T13:00:00.250+01:00`, read by
/// `jiff` (years 0001 to 9999 after the offset is applied); returns milliseconds since the
/// Unix epoch (sub-millisecond digits truncated toward the past), or why it is not one.
pub fn parse_time(cell: &str) -> Result<i64, String> {
    let t: jiff::Timestamp = cell
        .trim()
        .parse()
        .map_err(|e: jiff::Error| e.to_string())?;
    let ms = t.as_millisecond();
    // year 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999Z
    if !(-62_135_596_800_000..=253_402_300_799_999).contains(&ms) {
        return Err("outside the years 0001 to 9999".to_string());
    }
    Ok(ms)
}

/// Why a row was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The record has a different number of fields than the header.
    FieldCount {
        /// Fields in the header.
        expected: usize,
        /// Fields in this record.
        found: usize,
    },
    /// A field is not valid UTF-8.
    NotUtf8 {
        /// Column name.
        column: String,
    },
    /// A required field is empty or blank.
    EmptyField {
        /// Column name.
        column: String,
    },
    /// A field the row uses holds a NUL byte (U+0000).
    NulByte {
        /// Column name.
        column: String,
        /// 0-based byte offset of the first NUL in the field.
        offset: usize,
    },
    /// The `time` cell is not an RFC 3339 timestamp.
    BadTime {
        /// Column name.
        column: String,
        /// The cell, clipped.
        value: String,
        /// What the parser said.
        detail: String,
    },
    /// The record's field data exceeds `max_row_bytes`.
    TooLong {
        /// Bytes of field data.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

impl RejectReason {
    /// True for malformed records (wrong field count, bad encoding) as opposed to
    /// well-formed records that break a content rule. Counted as parse errors.
    pub fn is_parse_error(&self) -> bool {
        matches!(
            self,
            RejectReason::FieldCount { .. } | RejectReason::NotUtf8 { .. }
        )
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::FieldCount { expected, found } => {
                write!(
                    f,
                    "expected {expected} fields as in the header, found {found}"
                )
            }
            RejectReason::NotUtf8 { column } => write!(
                f,
                "field `{}` is not valid UTF-8",
                clip_chars(column, MAX_COLUMN_NAME_CHARS)
            ),
            RejectReason::EmptyField { column } => write!(
                f,
                "required field `{}` is empty",
                clip_chars(column, MAX_COLUMN_NAME_CHARS)
            ),
            RejectReason::NulByte { column, offset } => write!(
                f,
                "field `{}` holds a NUL byte (U+0000) at byte {offset}; remove it from the text",
                clip_chars(column, MAX_COLUMN_NAME_CHARS)
            ),
            RejectReason::BadTime {
                column,
                value,
                detail,
            } => write!(
                f,
                "field `{}` = {value:?} is not an RFC 3339 time ({detail}); write e.g. 2024-03-01T12:00:00Z, or leave the cell empty for the file's time",
                clip_chars(column, MAX_COLUMN_NAME_CHARS)
            ),
            RejectReason::TooLong { bytes, max } => {
                write!(f, "row has {bytes} bytes, more than max_row_bytes = {max}")
            }
        }
    }
}

/// A rejected row: where and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// 1-based physical line where the record starts.
    pub line: u64,
    /// Why it was rejected.
    pub reason: RejectReason,
}

/// Column layout decided from the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvSchema {
    /// Kind of every row of this file.
    pub kind: RowKind,
    /// Header names as found (trimmed).
    pub columns: Vec<String>,
    /// Columns that are ignored.
    pub extra_columns: Vec<String>,
    text_col: usize,
    response_col: Option<usize>,
    source_col: Option<usize>,
    time_col: Option<usize>,
}

impl CsvSchema {
    /// Decide the layout from header names; `file` names the file in errors.
    pub fn from_header(file: &str, names: Vec<String>) -> Result<Self, CsvError> {
        let find = |wanted: &str| -> Result<Option<usize>, CsvError> {
            let hits: Vec<usize> = names
                .iter()
                .enumerate()
                .filter(|(_, n)| n.eq_ignore_ascii_case(wanted))
                .map(|(i, _)| i)
                .collect();
            if hits.len() > 1 {
                return Err(CsvError::Header {
                    file: file.to_string(),
                    problem: format!("column `{wanted}` appears {} times", hits.len()),
                    found: names.clone(),
                });
            }
            Ok(hits.first().copied())
        };
        let text = find("text")?;
        let prompt = find("prompt")?;
        let response = find("response")?;
        let source_col = find("source")?;
        let time_col = find("time")?;
        let (kind, text_col, response_col) = match (text, prompt, response) {
            (Some(t), None, None) => (RowKind::Text, t, None),
            (None, Some(p), Some(r)) => (RowKind::PromptResponse, p, Some(r)),
            (Some(_), _, _) => {
                return Err(CsvError::Header {
                    file: file.to_string(),
                    problem: "both a `text` column and `prompt`/`response` columns; use one kind per file"
                        .to_string(),
                    found: names,
                });
            }
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(CsvError::Header {
                    file: file.to_string(),
                    problem: "`prompt` and `response` must come together".to_string(),
                    found: names,
                });
            }
            (None, None, None) => {
                return Err(CsvError::Header {
                    file: file.to_string(),
                    problem: "no `text` column and no `prompt`/`response` columns".to_string(),
                    found: names,
                });
            }
        };
        let used = [Some(text_col), response_col, source_col, time_col];
        let extra_columns = names
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(&Some(*i)))
            .map(|(_, n)| n.clone())
            .collect();
        Ok(CsvSchema {
            kind,
            columns: names,
            extra_columns,
            text_col,
            response_col,
            source_col,
            time_col,
        })
    }
}

/// Tracks where line terminators are in the bytes handed to the CSV parser, so that
/// the physical line of a record's first byte is exact (the parser's own line count
/// lags behind for CRLF line ends and skipped blank lines).
struct LineTracker<R> {
    inner: R,
    delivered: u64,
    /// Offsets of `\r` / `\n` bytes not yet passed, with the byte.
    marks: VecDeque<(u64, u8)>,
    /// Line ends already passed (LF, CRLF counted once, lone CR).
    breaks_passed: u64,
}

impl<R: Read> Read for LineTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // A 64-bit mask of the terminator bytes of each 64-byte block (built through a
        // byte array so that the compiler vectorises it), then one step per terminator.
        for (c, block) in buf[..n].chunks(64).enumerate() {
            let mut hit = [0u8; 64];
            for (h, &b) in hit.iter_mut().zip(block) {
                *h = ((b == b'\n') | (b == b'\r')) as u8;
            }
            let mut mask = 0u64;
            for (i, &h) in hit.iter().enumerate() {
                mask |= (h as u64) << i;
            }
            while mask != 0 {
                let i = mask.trailing_zeros() as usize;
                mask &= mask - 1;
                self.marks
                    .push_back((self.delivered + (c * 64 + i) as u64, block[i]));
            }
        }
        self.delivered += n as u64;
        Ok(n)
    }
}

impl<R> LineTracker<R> {
    /// 1-based line of the first byte of a record whose read started at `start`
    /// (skipping the terminators of the previous line and blank lines).
    fn line_at(&mut self, start: u64) -> u64 {
        while let Some(&(o, _)) = self.marks.front() {
            if o >= start {
                break;
            }
            self.breaks_passed += self.ends_line(0) as u64;
            self.marks.pop_front();
        }
        let (mut pos, mut breaks) = (start, self.breaks_passed);
        for (i, &(o, _)) in self.marks.iter().enumerate() {
            if o != pos {
                break;
            }
            breaks += self.ends_line(i) as u64;
            pos += 1;
        }
        breaks + 1
    }

    /// Whether mark `i` ends a line: every LF, and a CR not directly followed by an LF (the
    /// CR of a CRLF does not count; its LF does). The byte after a mark below a record's
    /// start has been read, so a missing LF mark means no LF.
    fn ends_line(&self, i: usize) -> bool {
        let (o, b) = self.marks[i];
        b == b'\n' || self.marks.get(i + 1) != Some(&(o + 1, b'\n'))
    }
}

/// Streaming reader of rows from one CSV file.
pub struct CsvRowReader<R: Read> {
    reader: csv::Reader<LineTracker<BufReader<R>>>,
    file: String,
    schema: CsvSchema,
    default_source: String,
    max_row_bytes: usize,
    record: csv::ByteRecord,
}

/// One step of the reader: an accepted row or a rejection.
pub type RowResult = Result<CsvRow, Rejection>;

impl<R: Read> CsvRowReader<R> {
    /// Read the header of `input` and decide the schema. `file` names the file in
    /// errors; `default_source` tags rows without a `source` cell.
    pub fn new(
        input: R,
        file: &str,
        default_source: &str,
        max_row_bytes: usize,
    ) -> Result<Self, CsvError> {
        let io_err = |source| CsvError::Io {
            file: file.to_string(),
            source,
        };
        let mut buffered = BufReader::with_capacity(256 * 1024, input);
        let head = buffered.fill_buf().map_err(io_err)?;
        if head.starts_with(BOM) {
            buffered.consume(BOM.len());
        }
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .buffer_capacity(256 * 1024)
            .from_reader(LineTracker {
                inner: buffered,
                delivered: 0,
                marks: VecDeque::new(),
                breaks_passed: 0,
            });
        let mut header = csv::ByteRecord::new();
        let got = reader
            .read_byte_record(&mut header)
            .map_err(|e| csv_to_error(file, e))?;
        if !got {
            return Err(CsvError::Empty {
                file: file.to_string(),
            });
        }
        let mut names = Vec::with_capacity(header.len());
        for (i, cell) in header.iter().enumerate() {
            let name = std::str::from_utf8(cell).map_err(|_| CsvError::HeaderNotUtf8 {
                file: file.to_string(),
                column: i + 1,
            })?;
            names.push(name.trim().to_string());
        }
        let schema = CsvSchema::from_header(file, names)?;
        Ok(CsvRowReader {
            reader,
            file: file.to_string(),
            schema,
            default_source: default_source.to_string(),
            max_row_bytes,
            record: csv::ByteRecord::new(),
        })
    }

    /// The schema decided from the header.
    pub fn schema(&self) -> &CsvSchema {
        &self.schema
    }

    /// The next row, `Ok(None)` at the end of the file. Errors are I/O errors only.
    pub fn next_row(&mut self) -> Result<Option<RowResult>, CsvError> {
        let got = self
            .reader
            .read_byte_record(&mut self.record)
            .map_err(|e| csv_to_error(&self.file, e))?;
        if !got {
            return Ok(None);
        }
        let start = self.record.position().map_or(0, |p| p.byte());
        let line = self.reader.get_mut().line_at(start);
        Ok(Some(self.decode(line)))
    }

    fn decode(&self, line: u64) -> RowResult {
        let reject = |reason| Err(Rejection { line, reason });
        let rec = &self.record;
        let expected = self.schema.columns.len();
        if rec.len() != expected {
            return reject(RejectReason::FieldCount {
                expected,
                found: rec.len(),
            });
        }
        let bytes = rec.as_slice().len();
        if bytes > self.max_row_bytes {
            return reject(RejectReason::TooLong {
                bytes,
                max: self.max_row_bytes,
            });
        }
        let field = |col: usize| -> Result<&str, Rejection> {
            let s = std::str::from_utf8(&rec[col]).map_err(|_| Rejection {
                line,
                reason: RejectReason::NotUtf8 {
                    column: self.schema.columns[col].clone(),
                },
            })?;
            match s.bytes().position(|b| b == 0) {
                None => Ok(s),
                Some(offset) => Err(Rejection {
                    line,
                    reason: RejectReason::NulByte {
                        column: self.schema.columns[col].clone(),
                        offset,
                    },
                }),
            }
        };
        let required = |col: usize| -> Result<String, Rejection> {
            let s = field(col)?;
            if s.trim().is_empty() {
                return Err(Rejection {
                    line,
                    reason: RejectReason::EmptyField {
                        column: self.schema.columns[col].clone(),
                    },
                });
            }
            Ok(s.to_string())
        };
        let first = required(self.schema.text_col)?;
        let body = match self.schema.response_col {
            None => RowBody::Text { text: first },
            Some(r) => RowBody::PromptResponse {
                prompt: first,
                response: required(r)?,
            },
        };
        let source = match self.schema.source_col {
            Some(c) => {
                let s = field(c)?;
                if s.trim().is_empty() {
                    self.default_source.clone()
                } else {
                    s.to_string()
                }
            }
            None => self.default_source.clone(),
        };
        let time_ms = match self.schema.time_col {
            Some(c) => {
                let s = field(c)?;
                if s.trim().is_empty() {
                    None
                } else {
                    Some(parse_time(s).map_err(|detail| Rejection {
                        line,
                        reason: RejectReason::BadTime {
                            column: self.schema.columns[c].clone(),
                            value: clip_chars(s, 64),
                            detail,
                        },
                    })?)
                }
            }
            None => None,
        };
        Ok(CsvRow {
            line,
            source,
            time_ms,
            body,
        })
    }
}

fn csv_to_error(file: &str, e: csv::Error) -> CsvError {
    let source = match e.into_kind() {
        csv::ErrorKind::Io(io) => io,
        other => std::io::Error::other(format!("{other:?}")),
    };
    CsvError::Io {
        file: file.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(data: &[u8], max: usize) -> Result<(CsvSchema, Vec<RowResult>), CsvError> {
        let mut r = CsvRowReader::new(data, "t.csv", "t", max)?;
        let mut out = Vec::new();
        while let Some(x) = r.next_row()? {
            out.push(x);
        }
        Ok((r.schema().clone(), out))
    }

    fn text(s: &str) -> RowBody {
        RowBody::Text {
            text: s.to_string(),
        }
    }

    #[test]
    fn text_rows_with_bom_crlf_quotes_and_extra_columns() {
        let data = b"\xEF\xBB\xBFid, Text ,source\r\n1,hello,web\r\n2,\"multi\r\nline, \"\"quoted\"\"\",\r\n3,x\r\n";
        let (schema, rows) = read_all(data, 1000).unwrap();
        assert_eq!(schema.kind, RowKind::Text);
        assert_eq!(schema.extra_columns, vec!["id".to_string()]);
        assert_eq!(rows.len(), 3);
        let r0 = rows[0].as_ref().unwrap();
        assert_eq!((r0.line, r0.source.as_str()), (2, "web"));
        assert_eq!(r0.body, text("hello"));
        let r1 = rows[1].as_ref().unwrap();
        assert_eq!((r1.line, r1.source.as_str()), (3, "t"));
        assert_eq!(r1.body, text("multi\r\nline, \"quoted\""));
        let r2 = rows[2].as_ref().unwrap_err();
        assert_eq!(r2.line, 5);
        assert_eq!(
            r2.reason,
            RejectReason::FieldCount {
                expected: 3,
                found: 2
            }
        );
    }

    #[test]
    fn prompt_response_rows_and_rejections() {
        let data = b"prompt,response\nq1,a1\n,a2\nq3,\xFF\xFE\nq4,a4\nq5,  \n";
        let (schema, rows) = read_all(data, 1000).unwrap();
        assert_eq!(schema.kind, RowKind::PromptResponse);
        assert!(schema.extra_columns.is_empty());
        assert_eq!(
            rows[0],
            Ok(CsvRow {
                line: 2,
                source: "t".into(),
                time_ms: None,
                body: RowBody::PromptResponse {
                    prompt: "q1".into(),
                    response: "a1".into()
                }
            })
        );
        assert_eq!(
            rows[1].as_ref().unwrap_err().reason,
            RejectReason::EmptyField {
                column: "prompt".into()
            }
        );
        let bad = rows[2].as_ref().unwrap_err();
        assert_eq!(bad.line, 4);
        assert!(bad.reason.is_parse_error());
        assert!(rows[3].is_ok());
        assert_eq!(
            rows[4].as_ref().unwrap_err().reason,
            RejectReason::EmptyField {
                column: "response".into()
            }
        );
    }

    #[test]
    fn too_long_rows_are_rejected_long_ones_kept_whole() {
        let long = "a".repeat(5000);
        let data = format!("text\n{long}\n{}\n", "b".repeat(5001));
        let (_, rows) = read_all(data.as_bytes(), 5000).unwrap();
        assert_eq!(rows[0].as_ref().unwrap().body, text(&long));
        assert_eq!(
            rows[1].as_ref().unwrap_err().reason,
            RejectReason::TooLong {
                bytes: 5001,
                max: 5000
            }
        );
    }

    #[test]
    fn bad_headers_refuse_the_file() {
        let err = read_all(b"id,body\n1,x\n", 100).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("t.csv") && msg.contains("id, body"), "{msg}");
        assert!(matches!(read_all(b"", 100), Err(CsvError::Empty { .. })));
        assert!(matches!(
            read_all(b"\xFFtext\nx\n", 100),
            Err(CsvError::HeaderNotUtf8 { column: 1, .. })
        ));
        assert!(matches!(
            read_all(b"text,prompt,response\n", 100),
            Err(CsvError::Header { .. })
        ));
        assert!(matches!(
            read_all(b"prompt\nx\n", 100),
            Err(CsvError::Header { .. })
        ));
        assert!(matches!(
            read_all(b"text,TEXT\nx,y\n", 100),
            Err(CsvError::Header { .. })
        ));
    }

    #[test]
    fn header_only_file_has_no_rows_and_blank_lines_are_skipped() {
        let (_, rows) = read_all(b"text\r\n", 100).unwrap();
        assert!(rows.is_empty());
        let (_, rows) = read_all(b"text\n\n\r\nfoo\n\n\"a\nb\"\n", 100).unwrap();
        let lines: Vec<u64> = rows.iter().map(|r| r.as_ref().unwrap().line).collect();
        assert_eq!(lines, vec![4, 6]);
    }

    /// Found by the `csv_rows` fuzz target: with lone-CR line ends every record was
    /// reported on line 1 (only LF bytes were counted).
    #[test]
    fn lone_cr_line_ends_count_as_lines() {
        let (_, rows) = read_all(b"text\rfoo\r\rbar\r\n\r\n baz\ra,b\r", 100).unwrap();
        let lines: Vec<u64> = rows
            .iter()
            .map(|r| match r {
                Ok(r) => r.line,
                Err(r) => r.line,
            })
            .collect();
        assert_eq!(lines, vec![2, 4, 6, 7]);
        assert!(rows[3].is_err());
    }

    /// Found by a hostile-operator probe: a NUL byte went into the store as text.
    #[test]
    fn nul_bytes_are_rejected_naming_line_and_field() {
        let (_, rows) = read_all(b"text,source\nok,a\nbad\0x,a\ny,s\0rc\n", 100).unwrap();
        assert!(rows[0].is_ok());
        let r = rows[1].as_ref().unwrap_err();
        assert_eq!(r.line, 3);
        assert_eq!(
            r.reason,
            RejectReason::NulByte {
                column: "text".into(),
                offset: 3
            }
        );
        assert!(
            r.reason.to_string().contains("field `text`"),
            "{}",
            r.reason
        );
        let r = rows[2].as_ref().unwrap_err();
        assert_eq!(r.line, 4);
        assert!(matches!(&r.reason, RejectReason::NulByte { column, .. } if column == "source"));
    }

    /// Found by a hostile-operator probe: a header of 10⁶ columns was echoed whole.
    #[test]
    fn header_errors_list_a_bounded_number_of_columns() {
        let mut header: Vec<String> = (0..100_000).map(|i| format!("c{i}")).collect();
        header.push("x".repeat(1000));
        let data = format!("{}\n", header.join(","));
        let msg = read_all(data.as_bytes(), 100).err().unwrap().to_string();
        assert!(msg.len() < 2000, "{} bytes", msg.len());
        assert!(msg.contains("c19, … and 99981 more"), "{msg}");
        assert_eq!(clip_chars("abcdef", 3), "abc…");
        assert_eq!(clip_chars("abc", 3), "abc");
    }

    #[test]
    fn time_column_gives_each_row_its_time_and_bad_times_reject_the_row() {
        let data = b"text,Time\na,2024-03-01T12:00:00Z\nb,\nc,2024-03-01T13:00:00.250+01:00\nd,yesterday\ne,2024-02-30T00:00:00Z\nf, 2020-01-01T00:00:00-00:00 \n";
        let (schema, rows) = read_all(data, 1000).unwrap();
        assert!(schema.extra_columns.is_empty(), "time is a known column");
        let noon = 1_709_294_400_000;
        assert_eq!(rows[0].as_ref().unwrap().time_ms, Some(noon));
        assert_eq!(
            rows[1].as_ref().unwrap().time_ms,
            None,
            "empty: the file's time"
        );
        assert_eq!(rows[2].as_ref().unwrap().time_ms, Some(noon + 250));
        for (i, line, value) in [(3, 5, "yesterday"), (4, 6, "2024-02-30T00:00:00Z")] {
            let r = rows[i].as_ref().unwrap_err();
            assert_eq!(r.line, line);
            assert!(
                matches!(&r.reason, RejectReason::BadTime { column, value: v, .. } if column == "Time" && v == value),
                "{:?}",
                r.reason
            );
            let msg = r.reason.to_string();
            assert!(
                msg.contains("field `Time`") && msg.contains("RFC 3339"),
                "{msg}"
            );
            assert!(!r.reason.is_parse_error());
        }
        assert_eq!(rows[5].as_ref().unwrap().time_ms, Some(1_577_836_800_000));
        assert!(
            parse_time("2024-03-01").is_err(),
            "a date alone has no offset"
        );
        assert!(parse_time("2024-03-01T12:00:00").is_err(), "no offset");
        assert!(parse_time("0000-06-01T00:00:00Z").is_err(), "year 0");
    }

    fn no_nul() -> impl Strategy<Value = String> {
        any::<String>().prop_map(|s| s.replace('\0', ""))
    }

    fn nonblank() -> impl Strategy<Value = String> {
        no_nul().prop_filter("required fields are non-blank", |s| !s.trim().is_empty())
    }

    proptest! {
        #[test]
        fn written_rows_parse_back_identically(
            rows in proptest::collection::vec((nonblank(), nonblank(), no_nul()), 0..20),
            crlf in any::<bool>(),
        ) {
            let mut w = csv::WriterBuilder::new()
                .terminator(if crlf { csv::Terminator::CRLF } else { csv::Terminator::Any(b'\n') })
                .from_writer(Vec::new());
            w.write_record(["prompt", "response", "source"]).unwrap();
            for (p, r, s) in &rows {
                w.write_record([p, r, s]).unwrap();
            }
            let data = w.into_inner().unwrap();
            let (_, got) = read_all(&data, usize::MAX).unwrap();
            prop_assert_eq!(got.len(), rows.len());
            let mut last_line = 1;
            for ((p, r, s), g) in rows.iter().zip(got) {
                let g = g.unwrap();
                prop_assert!(g.line > last_line);
                last_line = g.line;
                let want_source = if s.trim().is_empty() { "t" } else { s.as_str() };
                prop_assert_eq!(g.source.as_str(), want_source);
                prop_assert_eq!(g.body, RowBody::PromptResponse { prompt: p.clone(), response: r.clone() });
            }
        }

        /// Any millisecond of the years 0001–9999, written in RFC 3339 at any whole-minute
        /// offset, parses back to itself; arbitrary cells parse or are refused, never panic.
        #[test]
        fn time_cells_round_trip(
            ms in -62_135_596_800_000i64..=253_402_300_799_999,
            offset_min in -(23 * 60 + 59)..=(23 * 60 + 59i32),
            junk in any::<String>(),
        ) {
            let t = jiff::Timestamp::from_millisecond(ms).unwrap();
            let local = t.to_zoned(jiff::tz::TimeZone::fixed(jiff::tz::Offset::from_seconds(offset_min * 60).unwrap()));
            let cell = local.strftime("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string();
            if local.year() >= 1 && local.year() <= 9999 {
                prop_assert_eq!(parse_time(&cell), Ok(ms), "{}", cell);
            }
            prop_assert_eq!(parse_time(&t.to_string()), Ok(ms));
            let _ = parse_time(&junk);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400), max in 0usize..64) {
            let mut with_header = b"text,source\n".to_vec();
            with_header.extend_from_slice(&data);
            let _ = read_all(&with_header, max);
            let _ = read_all(&data, max);
        }
    }
}
