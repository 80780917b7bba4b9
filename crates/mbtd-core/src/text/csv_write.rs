//! Writing rows as an inbox CSV file: the inverse of [`super::csv_rows`].
//!
//! A file holds one kind of row. The header is `text,source` or `prompt,response,source`;
//! fields are quoted by the `csv` crate when needed (commas, quotes, CR, LF, a single empty
//! field), records end with `\n`. Reading the output back with
//! [`super::csv_rows::CsvRowReader`] gives the same bodies and sources, provided the required
//! fields are not blank and the source is not blank (a blank source reads back as the
//! reader's default source).

use std::io::Write;

use super::csv_rows::{RowBody, RowKind};

/// Why a row could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CsvWriteError {
    /// The underlying writer failed.
    #[error("writing CSV rows: {0}; check free space and permissions of the destination")]
    Io(#[from] std::io::Error),
    /// A row of the other kind was given to a writer of one kind.
    #[error("a {found} row cannot go into a {expected} CSV file; write each kind to its own file")]
    KindMismatch {
        /// The writer's kind.
        expected: RowKind,
        /// The row's kind.
        found: RowKind,
    },
}

impl From<csv::Error> for CsvWriteError {
    fn from(e: csv::Error) -> Self {
        match e.into_kind() {
            csv::ErrorKind::Io(io) => CsvWriteError::Io(io),
            other => CsvWriteError::Io(std::io::Error::other(format!("{other:?}"))),
        }
    }
}

/// Writes rows of one kind, with a `source` column, to `W`.
pub struct CsvRowWriter<W: Write> {
    out: csv::Writer<W>,
    kind: RowKind,
    rows: u64,
}

impl<W: Write> CsvRowWriter<W> {
    /// Writes the header of a `kind` file.
    pub fn new(out: W, kind: RowKind) -> Result<Self, CsvWriteError> {
        let mut out = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(out);
        match kind {
            RowKind::Text => out.write_record(["text", "source"])?,
            RowKind::PromptResponse => out.write_record(["prompt", "response", "source"])?,
        }
        Ok(CsvRowWriter { out, kind, rows: 0 })
    }

    /// Appends one row.
    pub fn write(&mut self, source: &str, body: &RowBody) -> Result<(), CsvWriteError> {
        match body {
            RowBody::Text { text } if self.kind == RowKind::Text => {
                self.out.write_record([text.as_str(), source])?
            }
            RowBody::PromptResponse { prompt, response }
                if self.kind == RowKind::PromptResponse =>
            {
                self.out
                    .write_record([prompt.as_str(), response.as_str(), source])?
            }
            _ => {
                return Err(CsvWriteError::KindMismatch {
                    expected: self.kind,
                    found: body.kind(),
                });
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(self) -> Result<W, CsvWriteError> {
        self.out
            .into_inner()
            .map_err(|e| CsvWriteError::Io(std::io::Error::other(e.to_string())))
    }
}

/// Rows of one kind as a whole inbox CSV file in memory.
pub fn csv_bytes<'a>(
    kind: RowKind,
    rows: impl IntoIterator<Item = (&'a str, &'a RowBody)>,
) -> Result<Vec<u8>, CsvWriteError> {
    let mut w = CsvRowWriter::new(Vec::new(), kind)?;
    for (source, body) in rows {
        w.write(source, body)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::csv_rows::CsvRowReader;

    #[test]
    fn rows_read_back_identically_and_kinds_do_not_mix() {
        let rows = [
            ("web", "plain"),
            ("a,b", "comma, \"quote\"\nand newline\r\n"),
            ("s", " leading and trailing blanks "),
        ];
        let mut w = CsvRowWriter::new(Vec::new(), RowKind::Text).unwrap();
        for (s, t) in rows {
            w.write(s, &RowBody::Text { text: t.into() }).unwrap();
        }
        let err = w
            .write(
                "s",
                &RowBody::PromptResponse {
                    prompt: "p".into(),
                    response: "r".into(),
                },
            )
            .unwrap_err();
        assert!(matches!(err, CsvWriteError::KindMismatch { .. }), "{err}");
        assert_eq!(w.rows(), 3);
        let bytes = w.finish().unwrap();
        let mut r = CsvRowReader::new(&bytes[..], "x.csv", "x", usize::MAX).unwrap();
        for (s, t) in rows {
            let got = r.next_row().unwrap().unwrap().unwrap();
            assert_eq!(got.source, s);
            assert_eq!(got.body, RowBody::Text { text: t.into() });
        }
        assert!(r.next_row().unwrap().is_none());
    }

    #[test]
    fn prompt_response_header() {
        let mut w = CsvRowWriter::new(Vec::new(), RowKind::PromptResponse).unwrap();
        let body = RowBody::PromptResponse {
            prompt: "2+3".into(),
            response: "5".into(),
        };
        w.write("arith", &body).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes, b"prompt,response,source\n2+3,5,arith\n");
    }
}
