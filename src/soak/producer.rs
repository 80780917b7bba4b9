//! The soak's producer: rows from any iterator, written as CSV files in a staging directory
//! on the inbox's file system and renamed into the inbox (so the daemon takes each file
//! whole, at once), and a small seeded row generator to feed it.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::SoakError;
use crate::text::csv_rows::{RowBody, RowKind};
use crate::text::csv_write::CsvRowWriter;

/// A row as the producer takes it: (source, body).
pub type SourcedRow = (String, RowBody);

/// What one [`Producer::drop_batch`] put into the inbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Files renamed into the inbox (one per row kind present in the batch).
    pub files: u64,
    /// Rows in them.
    pub rows: u64,
    /// Bytes of them.
    pub bytes: u64,
}

/// Writes batches of rows from `rows` into `inbox` through `staging`.
pub struct Producer<I> {
    rows: I,
    staging: PathBuf,
    inbox: PathBuf,
    next_file: u64,
}

impl<I: Iterator<Item = SourcedRow>> Producer<I> {
    /// `staging` must be on the inbox's file system (the move is a `rename`) and outside it.
    pub fn new(rows: I, staging: &Path, inbox: &Path) -> Result<Self, SoakError> {
        for d in [staging, inbox] {
            std::fs::create_dir_all(d).map_err(SoakError::io("create directory", d))?;
        }
        Ok(Producer {
            rows,
            staging: staging.to_path_buf(),
            inbox: inbox.to_path_buf(),
            next_file: 0,
        })
    }

    /// Takes up to `n` rows and drops them as one file per row kind (`soak-<k>-<kind>.csv`).
    /// A batch with no rows (the iterator has ended) drops nothing.
    pub fn drop_batch(&mut self, n: usize) -> Result<Dropped, SoakError> {
        let (mut text, mut pr) = (Vec::new(), Vec::new());
        for (source, body) in self.rows.by_ref().take(n) {
            match body.kind() {
                RowKind::Text => text.push((source, body)),
                RowKind::PromptResponse => pr.push((source, body)),
            }
        }
        let mut out = Dropped::default();
        for (kind, rows) in [(RowKind::Text, text), (RowKind::PromptResponse, pr)] {
            if rows.is_empty() {
                continue;
            }
            let name = format!("soak-{:06}-{kind}.csv", self.next_file);
            self.next_file += 1;
            let staged = self.staging.join(&name);
            let file = std::fs::File::create(&staged).map_err(SoakError::io("create", &staged))?;
            let mut w = CsvRowWriter::new(std::io::BufWriter::new(file), kind)?;
            for (source, body) in &rows {
                w.write(source, body)?;
            }
            w.finish()?
                .flush()
                .map_err(SoakError::io("write", &staged))?;
            let bytes = std::fs::metadata(&staged)
                .map_err(SoakError::io("stat", &staged))?
                .len();
            let dest = self.inbox.join(&name);
            std::fs::rename(&staged, &dest).map_err(SoakError::io("rename into", &dest))?;
            out.files += 1;
            out.rows += rows.len() as u64;
            out.bytes += bytes;
        }
        Ok(out)
    }
}

/// A minimal seeded stream of small tasks, endless: text rows `"<a> plus <b> is <a+b>"`
/// (source `add`) and prompt/response rows `"reverse <w>"` → reversed `w` (source `rev`),
/// one in four a prompt/response row. Rows repeat rarely (numbers up to 9,999, words of
/// 3–8 letters).
pub fn local_rows(seed: u64) -> impl Iterator<Item = SourcedRow> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    std::iter::repeat_with(move || {
        if rng.random_range(0..4) == 0 {
            let len = rng.random_range(3..=8);
            let w: String = (0..len)
                .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                .collect();
            let r: String = w.chars().rev().collect();
            (
                "rev".to_string(),
                RowBody::PromptResponse {
                    prompt: format!("reverse {w}"),
                    response: r,
                },
            )
        } else {
            let (a, b) = (
                rng.random_range(0..10_000u32),
                rng.random_range(0..10_000u32),
            );
            (
                "add".to_string(),
                RowBody::Text {
                    text: format!("{a} plus {b} is {}", a + b),
                },
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::csv_rows::CsvRowReader;

    #[test]
    fn batches_land_in_the_inbox_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (staging, inbox) = (dir.path().join("staging"), dir.path().join("inbox"));
        let want: Vec<SourcedRow> = local_rows(3).take(50).collect();
        let mut p = Producer::new(want.clone().into_iter(), &staging, &inbox).unwrap();
        let a = p.drop_batch(30).unwrap();
        let b = p.drop_batch(30).unwrap();
        assert_eq!((a.rows, b.rows), (30, 20));
        assert_eq!(p.drop_batch(30).unwrap(), Dropped::default());
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&inbox)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        assert_eq!(names.len() as u64, a.files + b.files);
        let mut got = Vec::new();
        for n in &names {
            let f = std::fs::File::open(n).unwrap();
            let mut r = CsvRowReader::new(f, "x", "x", usize::MAX).unwrap();
            while let Some(row) = r.next_row().unwrap() {
                let row = row.unwrap();
                got.push((row.source, row.body));
            }
        }
        let mut want_sorted = want.clone();
        want_sorted.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
        got.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
        assert_eq!(got, want_sorted);
    }

    #[test]
    fn local_rows_are_seeded_and_mix_both_kinds() {
        let a: Vec<SourcedRow> = local_rows(9).take(200).collect();
        assert_eq!(a, local_rows(9).take(200).collect::<Vec<_>>());
        assert_ne!(a, local_rows(10).take(200).collect::<Vec<_>>());
        let pr = a
            .iter()
            .filter(|r| r.1.kind() == RowKind::PromptResponse)
            .count();
        assert!((20..=80).contains(&pr), "{pr} prompt/response rows of 200");
    }
}
