//! A conversation saved as an inbox CSV file (`prompt,response,source`, one row per turn),
//! so a saved chat dropped into the inbox is learned as instruction rows; and loaded back
//! with the inbox's own reader, by the same rules as ingestion.

use std::path::{Path, PathBuf};

use super::template::Turn;
use crate::text::csv_rows::{CsvRowReader, RowBody, RowKind};

/// The `source` column of saved turns.
pub const SOURCE: &str = "chat";

/// Why a conversation could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    #[error("cannot write {path}: {source}; check that the directory exists and is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Csv(#[from] crate::text::csv_rows::CsvError),
    #[error(
        "{path} has a `text` column; a conversation file has `prompt` and `response` columns (as `/save` writes)"
    )]
    NotAConversation { path: PathBuf },
    #[error("nothing to save: no turn has a non-blank prompt and response")]
    Empty,
}

/// What a save wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    pub rows: usize,
    /// Turns left out because their prompt or reply is blank (the inbox would reject them).
    pub skipped: usize,
}

/// The CSV text of `turns` (header `prompt,response,source`; RFC 4180 quoting).
pub fn to_csv(turns: &[Turn]) -> (String, Saved) {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let row = |w: &mut csv::Writer<Vec<u8>>, cells: [&str; 3]| {
        w.write_record(cells).expect("writing to memory");
    };
    row(&mut w, ["prompt", "response", "source"]);
    let mut saved = Saved {
        rows: 0,
        skipped: 0,
    };
    for t in turns {
        if t.prompt.trim().is_empty() || t.response.trim().is_empty() {
            saved.skipped += 1;
            continue;
        }
        row(&mut w, [&t.prompt, &t.response, SOURCE]);
        saved.rows += 1;
    }
    let bytes = w.into_inner().expect("writing to memory");
    (
        String::from_utf8(bytes).expect("UTF-8 in, UTF-8 out"),
        saved,
    )
}

/// Writes `turns` to `path` durably (temp file, fsync, rename, directory fsync), so a file
/// saved straight into the inbox is never taken half-written.
pub fn save(path: &Path, turns: &[Turn]) -> Result<Saved, TranscriptError> {
    let (csv, saved) = to_csv(turns);
    if saved.rows == 0 {
        return Err(TranscriptError::Empty);
    }
    crate::store::fsutil::write_atomic(path, csv.as_bytes()).map_err(|source| {
        TranscriptError::Write {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(saved)
}

/// The turns of a conversation file and how many rows were rejected (by the inbox's rules).
pub fn load(path: &Path) -> Result<(Vec<Turn>, usize), TranscriptError> {
    let f = std::fs::File::open(path).map_err(|source| TranscriptError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    parse(f, &path.display().to_string()).map_err(|e| match e {
        TranscriptError::NotAConversation { .. } => TranscriptError::NotAConversation {
            path: path.to_path_buf(),
        },
        other => other,
    })
}

fn parse(input: impl std::io::Read, name: &str) -> Result<(Vec<Turn>, usize), TranscriptError> {
    let mut reader = CsvRowReader::new(input, name, SOURCE, usize::MAX)?;
    if reader.schema().kind != RowKind::PromptResponse {
        return Err(TranscriptError::NotAConversation {
            path: PathBuf::from(name),
        });
    }
    let (mut turns, mut rejected) = (Vec::new(), 0);
    while let Some(row) = reader.next_row()? {
        match row {
            Ok(r) => {
                if let RowBody::PromptResponse { prompt, response } = r.body {
                    turns.push(Turn { prompt, response });
                }
            }
            Err(_) => rejected += 1,
        }
    }
    Ok((turns, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(p: &str, r: &str) -> Turn {
        Turn {
            prompt: p.into(),
            response: r.into(),
        }
    }

    #[test]
    fn saved_turns_read_back_through_the_inbox_reader_exactly() {
        let turns = vec![
            turn("What is 2+3?", "5"),
            turn("quote \"this\", please", "line one\nline two, with comma"),
            turn("  spaced  ", "ünïcødé 🙂\r\nand CRLF"),
        ];
        let (csv, saved) = to_csv(&turns);
        assert_eq!(
            saved,
            Saved {
                rows: 3,
                skipped: 0
            }
        );
        assert!(csv.starts_with("prompt,response,source\n"));
        let (back, rejected) = parse(csv.as_bytes(), "t.csv").unwrap();
        assert_eq!(rejected, 0);
        assert_eq!(back, turns);
    }

    #[test]
    fn blank_turns_are_left_out_as_the_inbox_would_reject_them() {
        let (csv, saved) = to_csv(&[turn("q", " "), turn("q2", "a2"), turn("", "a")]);
        assert_eq!(
            saved,
            Saved {
                rows: 1,
                skipped: 2
            }
        );
        assert_eq!(
            parse(csv.as_bytes(), "t.csv").unwrap().0,
            vec![turn("q2", "a2")]
        );
    }

    #[test]
    fn save_is_durable_and_load_refuses_text_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.csv");
        assert!(matches!(save(&p, &[]), Err(TranscriptError::Empty)));
        save(&p, &[turn("a", "b")]).unwrap();
        assert_eq!(load(&p).unwrap(), (vec![turn("a", "b")], 0));
        assert!(!dir.path().join("c.csv.tmp").exists());
        let t = dir.path().join("t.csv");
        std::fs::write(&t, "text\nhello\n").unwrap();
        let e = load(&t).unwrap_err();
        assert!(matches!(e, TranscriptError::NotAConversation { .. }), "{e}");
        assert!(e.to_string().contains("t.csv"));
        assert!(matches!(
            load(&dir.path().join("missing.csv")),
            Err(TranscriptError::Open { .. })
        ));
    }

    proptest::proptest! {
        /// Any turns with non-blank cells survive save → inbox reader unchanged.
        #[test]
        fn round_trip_any_text(
            cells in proptest::collection::vec(
                ("\\PC*[a-z]\\PC*", "(\\PC|\n|\r)*[a-z](\\PC|\n|\r)*"),
                1..6,
            )
        ) {
            let turns: Vec<Turn> = cells.iter().map(|(p, r)| turn(p, r)).collect();
            let (csv, saved) = to_csv(&turns);
            proptest::prop_assert_eq!(saved.rows, turns.len());
            let (back, rejected) = parse(csv.as_bytes(), "t.csv").unwrap();
            proptest::prop_assert_eq!(rejected, 0);
            proptest::prop_assert_eq!(back, turns);
        }
    }
}
