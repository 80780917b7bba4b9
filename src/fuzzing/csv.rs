//! Properties of the inbox CSV reader, with a plain reference reader for files without quotes.

use crate::text::csv_rows::{
    CsvError, CsvRowReader, CsvSchema, RejectReason, RowBody, RowKind, RowResult,
};
use crate::text::csv_write::CsvRowWriter;

/// Source of rows without a `source` cell.
const DEFAULT_SOURCE: &str = "fz";
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One record's outcome: line, then (source, body) or the rejection reason.
type Outcome = (u64, Result<(String, RowBody), RejectReason>);

/// Fuzzer entry point: the first byte sets `max_row_bytes` (0, 8, …, 2040), the rest is the
/// file.
pub fn csv_rows(input: &[u8]) {
    if let Some((&m, data)) = input.split_first() {
        check_csv(data, m as usize * 8);
    }
}

/// Reads `data` as an inbox file with `max_row_bytes` and checks:
/// 1. only the header can refuse a file; reading a byte slice never fails otherwise;
/// 2. every record is accepted or rejected with a line number; the numbers increase
///    strictly, come after the header and lie within the file's physical lines (a line
///    ends with LF, CRLF or a lone CR);
/// 3. an accepted row has the header's kind, non-blank required fields, a non-blank source
///    and at most `max_row_bytes` of text; a rejection's reason is consistent with the
///    header and the limit;
/// 4. the accepted rows, written with [`CsvRowWriter`], read back as the same (source, body)
///    sequence without rejections;
/// 5. without any `"` in the input, the outcome (refusal, or every record's line and result)
///    equals that of [`reference_read`], which splits lines and commas.
pub fn check_csv(data: &[u8], max_row_bytes: usize) {
    let reference = (!data.contains(&b'"')).then(|| reference_read(data, max_row_bytes));
    let (schema, results) = match read_all(data, max_row_bytes) {
        Ok(x) => x,
        Err(e) => {
            assert!(
                !matches!(e, CsvError::Io { .. }),
                "reading a byte slice failed: {e}"
            );
            if let Some(r) = reference {
                assert!(
                    r.is_none(),
                    "the reader refused a file the reference reads ({e}): {r:?}"
                );
            }
            return;
        }
    };
    let lines = 1 + line_breaks(data);
    let mut last = 1;
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(results.len());
    for r in results {
        let (line, outcome) = match r {
            Ok(row) => {
                check_accepted(&schema, &row.source, &row.body, max_row_bytes);
                (row.line, Ok((row.source, row.body)))
            }
            Err(rej) => {
                check_rejected(&schema, &rej.reason, max_row_bytes);
                (rej.line, Err(rej.reason))
            }
        };
        assert!(
            line > last && line <= lines,
            "record line {line} after line {last} in a file of {lines} lines"
        );
        last = line;
        outcomes.push((line, outcome));
    }
    round_trip(&schema, &outcomes);
    if let Some(r) = reference {
        let (kind, want) = r.expect("the reference refuses a file the reader accepts");
        assert_eq!(kind, schema.kind, "kind differs from the reference");
        assert_eq!(outcomes, want, "rows differ from the reference reader");
    }
}

fn read_all(data: &[u8], max: usize) -> Result<(CsvSchema, Vec<RowResult>), CsvError> {
    let mut r = CsvRowReader::new(data, "fuzz.csv", DEFAULT_SOURCE, max)?;
    let mut out = Vec::new();
    while let Some(x) = r.next_row()? {
        out.push(x);
    }
    Ok((r.schema().clone(), out))
}

fn blank(s: &str) -> bool {
    s.trim().is_empty()
}

fn check_accepted(schema: &CsvSchema, source: &str, body: &RowBody, max: usize) {
    assert_eq!(
        body.kind(),
        schema.kind,
        "row kind differs from the header's"
    );
    match body {
        RowBody::Text { text } => assert!(!blank(text), "blank text accepted"),
        RowBody::PromptResponse { prompt, response } => {
            assert!(!blank(prompt) && !blank(response), "blank field accepted")
        }
    }
    assert!(!blank(source), "blank source accepted");
    assert!(
        body.text_bytes() <= max,
        "{} bytes of text accepted with max_row_bytes = {max}",
        body.text_bytes()
    );
}

fn check_rejected(schema: &CsvSchema, reason: &RejectReason, max: usize) {
    let cols = schema.columns.len();
    match reason {
        RejectReason::FieldCount { expected, found } => {
            assert!(*expected == cols && found != expected, "{reason}")
        }
        RejectReason::TooLong { bytes, max: m } => assert!(*m == max && *bytes > max, "{reason}"),
        RejectReason::NotUtf8 { column }
        | RejectReason::EmptyField { column }
        | RejectReason::NulByte { column, .. } => {
            assert!(schema.columns.contains(column), "{reason}")
        }
        RejectReason::BadTime { column, value, .. } => {
            assert!(schema.columns.contains(column), "{reason}");
            assert!(
                mbtd_core::text::csv_rows::parse_time(value).is_err(),
                "a valid time rejected: {reason}"
            )
        }
    }
}

fn round_trip(schema: &CsvSchema, outcomes: &[Outcome]) {
    let accepted: Vec<&(String, RowBody)> = outcomes
        .iter()
        .filter_map(|(_, o)| o.as_ref().ok())
        .collect();
    let mut w = CsvRowWriter::new(Vec::new(), schema.kind).expect("writing to memory");
    for (source, body) in &accepted {
        w.write(source, body).expect("an accepted row is writable");
    }
    let bytes = w.finish().expect("writing to memory");
    let (back_schema, back) = read_all(&bytes, usize::MAX).expect("written rows read back");
    assert_eq!(back_schema.kind, schema.kind);
    let back: Vec<(String, RowBody)> = back
        .into_iter()
        .map(|r| {
            let r = r.unwrap_or_else(|rej| panic!("a written row is rejected: {rej:?}"));
            (r.source, r.body)
        })
        .collect();
    let accepted: Vec<(String, RowBody)> = accepted.into_iter().cloned().collect();
    assert_eq!(back, accepted, "rows changed through the CSV writer");
}

/// Line breaks in `data`: LF, CRLF (one break) and a lone CR.
fn line_breaks(data: &[u8]) -> u64 {
    physical_lines(data).len() as u64 - 1
}

/// The physical lines of `data` (without their terminators), numbered from 1.
fn physical_lines(data: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let (mut start, mut i, mut line) = (0, 0, 1);
    while i < data.len() {
        let end = i;
        match data[i] {
            b'\n' => i += 1,
            b'\r' if data.get(i + 1) == Some(&b'\n') => i += 2,
            b'\r' => i += 1,
            _ => {
                i += 1;
                continue;
            }
        }
        out.push((line, &data[start..end]));
        line += 1;
        start = i;
    }
    out.push((line, &data[start..]));
    out
}

/// The ingest rules applied to a file without quotes: lines split at LF, CRLF or CR, empty
/// lines skipped, fields split at commas. `None` when the header refuses the file.
fn reference_read(data: &[u8], max: usize) -> Option<(RowKind, Vec<Outcome>)> {
    let data = data.strip_prefix(BOM).unwrap_or(data);
    let mut lines = physical_lines(data)
        .into_iter()
        .filter(|(_, l)| !l.is_empty());
    let (_, header) = lines.next()?;
    let names = header
        .split(|&b| b == b',')
        .map(|c| std::str::from_utf8(c).map(|s| s.trim().to_string()))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let schema = CsvSchema::from_header("reference", names).ok()?;
    let col = |name: &str| {
        schema
            .columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
    };
    let required: Vec<usize> = match schema.kind {
        RowKind::Text => vec![col("text")?],
        RowKind::PromptResponse => vec![col("prompt")?, col("response")?],
    };
    let source = col("source");
    let rows = lines
        .map(|(line, l)| {
            let fields: Vec<&[u8]> = l.split(|&b| b == b',').collect();
            (
                line,
                reference_row(&schema, &fields, &required, source, max),
            )
        })
        .collect();
    Some((schema.kind, rows))
}

fn reference_row(
    schema: &CsvSchema,
    fields: &[&[u8]],
    required: &[usize],
    source: Option<usize>,
    max: usize,
) -> Result<(String, RowBody), RejectReason> {
    let expected = schema.columns.len();
    if fields.len() != expected {
        return Err(RejectReason::FieldCount {
            expected,
            found: fields.len(),
        });
    }
    let bytes: usize = fields.iter().map(|f| f.len()).sum();
    if bytes > max {
        return Err(RejectReason::TooLong { bytes, max });
    }
    let text = |c: usize| {
        let s = std::str::from_utf8(fields[c]).map_err(|_| RejectReason::NotUtf8 {
            column: schema.columns[c].clone(),
        })?;
        match s.find('\0') {
            Some(offset) => Err(RejectReason::NulByte {
                column: schema.columns[c].clone(),
                offset,
            }),
            None => Ok(s),
        }
    };
    let mut values = Vec::new();
    for &c in required {
        let v = text(c)?;
        if blank(v) {
            return Err(RejectReason::EmptyField {
                column: schema.columns[c].clone(),
            });
        }
        values.push(v.to_string());
    }
    let source = match source {
        Some(c) if !blank(text(c)?) => text(c)?.to_string(),
        Some(_) | None => DEFAULT_SOURCE.to_string(),
    };
    let mut values = values.into_iter();
    let first = values.next().expect("one required field at least");
    let body = match values.next() {
        None => RowBody::Text { text: first },
        Some(response) => RowBody::PromptResponse {
            prompt: first,
            response,
        },
    };
    Ok((source, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_lines_split_at_lf_crlf_and_lone_cr() {
        let got: Vec<(u64, &[u8])> = physical_lines(b"a\r\nb\rc\n\nd");
        let want: Vec<(u64, &[u8])> = vec![(1, b"a"), (2, b"b"), (3, b"c"), (4, b""), (5, b"d")];
        assert_eq!(got, want);
        assert_eq!(line_breaks(b""), 0);
        assert_eq!(line_breaks(b"x\r\n"), 1);
    }

    #[test]
    fn reference_reads_rows_and_rejections() {
        let (kind, rows) = reference_read(b"id,text\n1,hello\n2,  \n3,x,y\n", 100).unwrap();
        assert_eq!(kind, RowKind::Text);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            (
                2,
                Ok((
                    DEFAULT_SOURCE.to_string(),
                    RowBody::Text {
                        text: "hello".into()
                    }
                ))
            )
        );
        assert!(matches!(rows[1], (3, Err(RejectReason::EmptyField { .. }))));
        assert!(matches!(rows[2], (4, Err(RejectReason::FieldCount { .. }))));
        assert!(reference_read(b"id,body\n1,x\n", 100).is_none());
    }

    #[test]
    fn the_property_holds_on_a_mixed_file() {
        check_csv(
            b"\xEF\xBB\xBFprompt,response,source\r\nq,\"a,\r\nb\",s\r\n,x,\r\nq2,a2,\n",
            1000,
        );
        check_csv(b"text\nabc\nabcdefghijk\n", 8);
    }
}
