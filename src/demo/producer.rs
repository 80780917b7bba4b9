//! The demo's producer: drops CSV files into the inbox as a real producer would (written to a
//! dot-file, fsynced, renamed in), from the synthetic generator or from a user's CSV file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::text::csv_rows::{CsvError, CsvRow, CsvRowReader, RowKind};
use crate::text::csv_write::{CsvRowWriter, CsvWriteError};
use crate::text::synth::{PHASES, Synth, phase_index, to_csv};

/// Why the producer cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error("--real-text: {0}")]
    RealTextCsv(#[from] CsvError),
    #[error(
        "--real-text {file}:{line}: {reason}; fix or remove that row (the demo takes only files without rejected rows)"
    )]
    RealTextRow {
        file: String,
        line: u64,
        reason: String,
    },
    #[error("--real-text {file}: {why}")]
    RealText { file: String, why: String },
    #[error("--real-text: {0}")]
    RealTextWrite(#[from] CsvWriteError),
    #[error("cannot write {path} into the inbox: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The rows of a user's CSV file, validated up front.
#[derive(Debug, Clone)]
pub struct RealText {
    pub file: String,
    pub kind: RowKind,
    pub rows: Vec<CsvRow>,
}

impl RealText {
    /// Reads and validates `path` with the inbox's own rules; the first rejected row is an
    /// error naming the file, line and field. At least `min_rows` rows are required (the
    /// tokenizer is trained on the first rows).
    pub fn load(path: &Path, max_row_bytes: usize, min_rows: usize) -> Result<Self, ProducerError> {
        let file = path.display().to_string();
        let f = File::open(path).map_err(|source| CsvError::Io {
            file: file.clone(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "real".into());
        let mut rd = CsvRowReader::new(f, &file, &stem, max_row_bytes)?;
        let kind = rd.schema().kind;
        let mut rows = Vec::new();
        while let Some(r) = rd.next_row()? {
            match r {
                Ok(row) => rows.push(row),
                Err(rej) => {
                    return Err(ProducerError::RealTextRow {
                        file,
                        line: rej.line,
                        reason: rej.reason.to_string(),
                    });
                }
            }
        }
        if rows.len() < min_rows {
            return Err(ProducerError::RealText {
                file,
                why: format!(
                    "{} rows; the demo needs at least {min_rows} (the tokenizer is trained on the first {min_rows})",
                    rows.len()
                ),
            });
        }
        Ok(Self { file, kind, rows })
    }
}

/// Renders rows of one kind as an inbox CSV file (with their `source`).
fn rows_to_csv(kind: RowKind, rows: &[CsvRow]) -> Result<Vec<u8>, CsvWriteError> {
    let mut w = CsvRowWriter::new(Vec::new(), kind)?;
    for r in rows {
        w.write(&r.source, &r.body)?;
    }
    w.finish()
}

enum Source {
    Synth(Box<Synth>),
    Real { text: RealText, next: usize },
}

/// One file dropped into the inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub name: String,
    pub rows: usize,
    /// The synthetic phase's name, or "real text".
    pub phase: &'static str,
}

/// Drops files into the inbox: `first_rows` rows in the first (enough for the tokenizer),
/// `chunk_rows` in each later one.
pub struct Producer {
    inbox: PathBuf,
    source: Source,
    first_rows: usize,
    chunk_rows: usize,
    pub files: usize,
    pub rows: usize,
}

impl Producer {
    pub fn synthetic(inbox: PathBuf, seed: u64, first_rows: usize, chunk_rows: usize) -> Self {
        Self::new(
            inbox,
            Source::Synth(Box::new(Synth::new(seed))),
            first_rows,
            chunk_rows,
        )
    }

    pub fn real(inbox: PathBuf, text: RealText, first_rows: usize, chunk_rows: usize) -> Self {
        Self::new(
            inbox,
            Source::Real { text, next: 0 },
            first_rows,
            chunk_rows,
        )
    }

    fn new(inbox: PathBuf, source: Source, first_rows: usize, chunk_rows: usize) -> Self {
        Self {
            inbox,
            source,
            first_rows,
            chunk_rows: chunk_rows.max(1),
            files: 0,
            rows: 0,
        }
    }

    /// Writes the next file; `fraction` of the demo has passed (it picks the synthetic
    /// phase). `None` once a real-text file is used up.
    pub fn drop_next(&mut self, fraction: f64) -> Result<Option<Dropped>, ProducerError> {
        let n = if self.files == 0 {
            self.first_rows
        } else {
            self.chunk_rows
        };
        let (csv, rows, phase) = match &mut self.source {
            Source::Synth(g) => {
                let p = &PHASES[phase_index(fraction, PHASES.len())];
                (to_csv(&g.rows(p, n)).into_bytes(), n, p.name)
            }
            Source::Real { text, next } => {
                if *next >= text.rows.len() {
                    return Ok(None);
                }
                let end = (*next + n).min(text.rows.len());
                let csv = rows_to_csv(text.kind, &text.rows[*next..end])?;
                let rows = end - *next;
                *next = end;
                (csv, rows, "real text")
            }
        };
        let name = format!("demo-{:05}.csv", self.files + 1);
        self.write(&name, &csv)?;
        self.files += 1;
        self.rows += rows;
        Ok(Some(Dropped { name, rows, phase }))
    }

    /// Writes `.name.part` in the inbox (ignored by the daemon), fsyncs, renames it in.
    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), ProducerError> {
        let tmp = self.inbox.join(format!(".{name}.part"));
        let dest = self.inbox.join(name);
        let err = |source| ProducerError::Write {
            path: dest.clone(),
            source,
        };
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &dest).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::csv_rows::RowBody;

    fn read_back(path: &Path) -> Vec<CsvRow> {
        let f = File::open(path).unwrap();
        let mut rd = CsvRowReader::new(f, "x", "stem", 1 << 20).unwrap();
        let mut out = Vec::new();
        while let Some(r) = rd.next_row().unwrap() {
            out.push(r.unwrap());
        }
        out
    }

    #[test]
    fn synthetic_files_follow_the_phases_and_are_renamed_in_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Producer::synthetic(dir.path().to_path_buf(), 1, 50, 10);
        let a = p.drop_next(0.0).unwrap().unwrap();
        let b = p.drop_next(0.5).unwrap().unwrap();
        assert_eq!((a.rows, b.rows), (50, 10));
        assert_eq!(a.phase, PHASES[0].name);
        assert_eq!(b.phase, PHASES[1].name);
        assert_eq!((p.files, p.rows), (2, 60));
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
        let rows = read_back(&dir.path().join(&a.name));
        assert_eq!(rows.len(), 50);
        assert!(rows.iter().all(|r| r.source != "stem"), "source column set");
    }

    #[test]
    fn real_text_is_validated_and_dropped_in_chunks_until_used_up() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("corpus.csv");
        let body: String = (0..25).map(|i| format!("\"line {i}, quoted\"\n")).collect();
        std::fs::write(&src, format!("text\n{body}")).unwrap();
        let real = RealText::load(&src, 1 << 20, 10).unwrap();
        assert_eq!((real.kind, real.rows.len()), (RowKind::Text, 25));
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let mut p = Producer::real(inbox.clone(), real, 10, 10);
        let sizes: Vec<usize> = std::iter::from_fn(|| p.drop_next(0.0).unwrap())
            .map(|d| d.rows)
            .collect();
        assert_eq!(sizes, vec![10, 10, 5]);
        let rows = read_back(&inbox.join("demo-00003.csv"));
        assert_eq!(rows[0].source, "corpus");
        assert_eq!(
            rows[0].body,
            RowBody::Text {
                text: "line 20, quoted".into()
            }
        );
    }

    #[test]
    fn real_text_errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("bad.csv");
        std::fs::write(&src, "prompt,response\na,b\nc,\n").unwrap();
        let e = RealText::load(&src, 1 << 20, 1).unwrap_err().to_string();
        assert!(e.contains("bad.csv:3"), "{e}");
        assert!(e.contains("response"), "{e}");
        std::fs::write(&src, "body\nx\n").unwrap();
        let e = RealText::load(&src, 1 << 20, 1).unwrap_err().to_string();
        assert!(e.contains("bad.csv") && e.contains("`text` column"), "{e}");
        std::fs::write(&src, "text\nx\n").unwrap();
        let e = RealText::load(&src, 1 << 20, 5).unwrap_err().to_string();
        assert!(e.contains("at least 5"), "{e}");
        let e = RealText::load(&dir.path().join("missing.csv"), 1 << 20, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.csv"), "{e}");
    }
}
