//! Which windows one training step trains on: the mix of new rows (in arrival order, each
//! trained once) and replay rows (sampled from history).
//!
//! New rows become windows in sequence order in a [`NewWindows`] queue; the queue is the same
//! whatever the fetch history (rows fetched in one request or ten), so a resumed run trains
//! exactly the windows a straight run would. A step of batch size `B` takes
//!
//! - `R = round(B · replay_share)` replay windows when there is history and new windows,
//!   `R = B` when there is only history (an idle step), `R = 0` without history;
//! - `N = min(B − R, queued)` new windows from the front of the queue;
//! - then one window of each replay row (drawn with a ChaCha8 RNG seeded by
//!   `seed ^ 0x5eed`, uniformly among the row's windows), in sample order, until the batch
//!   holds `B` windows.
//!
//! The loop state's `(cursor, partial)` after a step says where the queue stands: every row
//! up to `cursor` is trained, and `partial = (seq, k)` when row `seq` has its first `k`
//! windows trained.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::store::format::Record;
use crate::text::tokenizer::Tokenizer;

use super::batch::{Window, tokenize, windows};
use super::config::TrainingConfig;

/// Windows of new rows not trained yet, in (row sequence number, window index) order.
#[derive(Debug, Clone, Default)]
pub struct NewWindows {
    queue: VecDeque<(u64, usize, Window)>,
    /// Highest row sequence number already turned into queued windows.
    fetched_through: u64,
}

/// The windows of one step, and the loop state's `(cursor, partial)` after it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMix {
    pub new: Vec<Window>,
    pub replay: Vec<Window>,
    pub cursor: u64,
    pub partial: Option<(u64, usize)>,
}

impl StepMix {
    /// New windows first, then replay windows.
    pub fn all(&self) -> Vec<&Window> {
        self.new.iter().chain(self.replay.iter()).collect()
    }

    /// Input tokens that are text, not padding: `Σ len(inputs)` over the windows.
    pub fn real_tokens(&self) -> usize {
        self.new
            .iter()
            .chain(self.replay.iter())
            .map(|w| w.inputs.len())
            .sum()
    }
}

impl NewWindows {
    /// An empty queue whose rows up to `cursor` are trained.
    pub fn new(cursor: u64) -> Self {
        Self {
            queue: VecDeque::new(),
            fetched_through: cursor,
        }
    }

    /// The cursor to fetch new rows after.
    pub fn fetched_through(&self) -> u64 {
        self.fetched_through
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// New rows to ask for to fill a batch of `b`: `b` while fewer than `b` windows are
    /// queued, else 0.
    pub fn wanted(&self, b: usize) -> usize {
        if self.queue.len() >= b { 0 } else { b }
    }

    /// Queues the windows of `rows` (rows after [`Self::fetched_through`], in order). Row
    /// `partial.0` skips its first `partial.1` windows (already trained). A row that does not
    /// tokenize is skipped.
    pub fn push_rows(
        &mut self,
        tok: &Tokenizer,
        rows: &[Record],
        partial: Option<(u64, usize)>,
        seq_len: usize,
    ) {
        for r in rows {
            if let Ok(tk) = tokenize(tok, &r.body) {
                let skip = match partial {
                    Some((seq, k)) if seq == r.seq => k,
                    _ => 0,
                };
                for (i, w) in windows(&tk, seq_len).into_iter().enumerate().skip(skip) {
                    self.queue.push_back((r.seq, i, w));
                }
            }
            self.fetched_through = self.fetched_through.max(r.seq);
        }
    }

    /// Takes the windows of one step of `tc.batch_size` (see the module doc). `history`: the
    /// store holds training rows and `replay_rows` were sampled from them.
    pub fn take_step(
        &mut self,
        tok: &Tokenizer,
        replay_rows: &[Record],
        history: bool,
        tc: &TrainingConfig,
        seed: u64,
    ) -> StepMix {
        let (b, seq_len) = (tc.batch_size, tc.seq_len);
        let has_new = !self.queue.is_empty();
        let n_replay_target = if history && has_new {
            ((b as f64) * tc.replay_share).round() as usize
        } else if history {
            b
        } else {
            0
        };
        let n_new = (b - n_replay_target.min(b)).min(self.queue.len());
        let new: Vec<Window> = self.queue.drain(..n_new).map(|(_, _, w)| w).collect();
        let (cursor, partial) = match self.queue.front() {
            None => (self.fetched_through, None),
            Some(&(seq, i, _)) => (seq - 1, (i > 0).then_some((seq, i))),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let mut replay = Vec::new();
        for r in replay_rows {
            if new.len() + replay.len() >= b {
                break;
            }
            if let Ok(tk) = tokenize(tok, &r.body) {
                let ws = windows(&tk, seq_len);
                if !ws.is_empty() {
                    let i = rng.random_range(0..ws.len());
                    replay.push(ws[i].clone());
                }
            }
        }
        StepMix {
            new,
            replay,
            cursor,
            partial,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::text::csv_rows::RowBody;

    fn tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let texts = (0..50).map(|i| format!("row number {i} says hello to the mixer"));
            Tokenizer::train(texts, 300, 2).expect("train")
        })
    }

    fn row(seq: u64, words: usize) -> Record {
        let text = (0..words)
            .map(|i| format!("w{}", (seq as usize + i) % 7))
            .collect::<Vec<_>>()
            .join(" ");
        Record {
            seq,
            ingest_ms: 0,
            row: seq,
            file_hash: [0; 32],
            source: "s".into(),
            body: RowBody::Text { text },
        }
    }

    fn tc(b: usize, share: f64) -> TrainingConfig {
        TrainingConfig {
            batch_size: b,
            seq_len: 8,
            replay_share: share,
            ..Default::default()
        }
    }

    #[test]
    fn new_windows_queue_the_same_whatever_the_fetch_history() {
        let rows: Vec<Record> = (1..=6).map(|s| row(s, 3 + s as usize * 2)).collect();
        let mut once = NewWindows::new(0);
        once.push_rows(tok(), &rows, None, 8);
        let mut split = NewWindows::new(0);
        for r in rows.chunks(2) {
            split.push_rows(tok(), r, None, 8);
        }
        assert_eq!(once.fetched_through(), 6);
        assert_eq!(once.queue, split.queue);
        assert!(once.len() > rows.len(), "long rows give several windows");
    }

    #[test]
    fn a_step_takes_new_windows_first_then_replay_up_to_the_batch() {
        let rows: Vec<Record> = (1..=4).map(|s| row(s, 4)).collect();
        let replay: Vec<Record> = (10..20).map(|s| row(s, 4)).collect();
        let mut q = NewWindows::new(0);
        q.push_rows(tok(), &rows, None, 8);
        let n_queued = q.len();
        let m = q.take_step(tok(), &replay, true, &tc(4, 0.5), 9);
        assert_eq!((m.new.len(), m.replay.len()), (2, 2));
        assert_eq!(q.len(), n_queued - 2);
        // Only history: an idle step is all replay.
        let mut empty = NewWindows::new(4);
        let m = empty.take_step(tok(), &replay, true, &tc(4, 0.5), 9);
        assert_eq!(
            (m.new.len(), m.replay.len(), m.cursor, m.partial),
            (0, 4, 4, None)
        );
        // No history: new windows only, as many as the batch holds.
        let mut q = NewWindows::new(0);
        q.push_rows(tok(), &rows, None, 8);
        let m = q.take_step(tok(), &[], false, &tc(3, 0.5), 9);
        assert_eq!((m.new.len(), m.replay.len()), (3, 0));
        assert_eq!(
            m.real_tokens(),
            m.new.iter().map(|w| w.inputs.len()).sum::<usize>()
        );
    }

    #[test]
    fn the_cursor_stops_before_a_row_with_windows_left_and_partial_resumes_it() {
        // Row 1 has several windows of 8; a batch of 1 takes its first.
        let long = row(1, 30);
        let mut q = NewWindows::new(0);
        q.push_rows(tok(), std::slice::from_ref(&long), None, 8);
        let total = q.len();
        assert!(total >= 3, "{total}");
        let first = q.take_step(tok(), &[], false, &tc(1, 0.0), 1);
        assert_eq!((first.cursor, first.partial), (0, Some((1, 1))));
        // A resumed queue skips the trained window and yields the same next window.
        let mut resumed = NewWindows::new(first.cursor);
        resumed.push_rows(tok(), std::slice::from_ref(&long), first.partial, 8);
        assert_eq!(resumed.len(), total - 1);
        let a = q.take_step(tok(), &[], false, &tc(1, 0.0), 2);
        let b = resumed.take_step(tok(), &[], false, &tc(1, 0.0), 2);
        assert_eq!(a, b);
    }

    #[test]
    fn replay_windows_are_seeded() {
        let replay: Vec<Record> = (10..30).map(|s| row(s, 25)).collect();
        let take = |seed| NewWindows::new(0).take_step(tok(), &replay, true, &tc(4, 0.5), seed);
        assert_eq!(take(3), take(3));
        assert_ne!(take(3).replay, take(4).replay);
    }
}
