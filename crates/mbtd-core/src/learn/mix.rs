//! Which windows one training step trains on: the mix of new rows (in arrival order, each
//! trained once) and replay rows (sampled from history).
//!
//! New rows are cut into pieces ([`windows`]: a short row is one piece ending in its
//! end-of-text token, a long row several of `seq_len`) queued in (row sequence number,
//! piece index) order in a [`NewWindows`] queue. What a step takes depends only on the
//! queue's content, never on how the rows were fetched (one request or ten), so a resumed
//! run trains exactly the windows a straight run would. A step of batch size `B` has
//!
//! - `R = round(B · replay_share)` replay windows when there is history and new pieces,
//!   `R = B` when there is only history (an idle step), `R = 0` without history;
//! - `B − R` windows for new pieces.
//!
//! **Unpacked** (`training.packing = false`, [`NewWindows::take_step`]): one piece per
//! window, padded to `seq_len`: `N = min(B − R, queued)` pieces from the front of the queue,
//! then one piece of each replay row (drawn with a ChaCha8 RNG seeded by `seed ^ 0x5eed`,
//! uniformly among the row's pieces), in sample order, until the batch holds `B` windows.
//!
//! **Packed** ([`NewWindows::take_packed_step`]): pieces share windows as segments
//! ([`crate::model::Batch::segments`]). The step looks at the shortest prefix of the queue
//! holding at least `2 · B · seq_len` positions (the whole queue when shorter) and places
//! its front piece, then the rest longest first (ties in queue order), each into the first
//! of at most `B − R` windows with room ([`Bins`]); pieces that do not fit stay queued, in
//! order. Then, with history, replay pieces (one per sampled row, drawn as unpacked) fill
//! the room left in all `B` windows, longest first within a round of sampled rows; a new
//! round of rows (sample seed [`replay_round_seed`]) is asked while more than 1/64 of the
//! positions are free and the last round placed something, at most [`MAX_REPLAY_ROUNDS`]
//! rounds. Windows left empty are dropped. The front piece always goes in, so no piece
//! waits for ever.
//!
//! Progress after a step: every row up to `cursor` is trained; unpacked, `partial =
//! (seq, k)` when row `seq` has its first `k` pieces trained; packed, `ahead` lists the
//! trained pieces `(row, piece)` of rows after `cursor` (packing trains out of order).

use std::collections::{BTreeSet, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::Batch;
use crate::store::format::Record;
use crate::store::state::splitmix64;
use crate::text::tokenizer::Tokenizer;

use super::batch::{
    Bins, Packed, Window, assemble, assemble_packed, pack_windows, tokenize_record, windows,
};
use super::config::TrainingConfig;

/// Most rounds of replay rows one packed step asks for.
pub const MAX_REPLAY_ROUNDS: u32 = 8;

/// Sample seed of replay round `round` (≥ 1) of the packed step with seed `seed`; round 0
/// is the rows fetched with the step's own seed.
pub fn replay_round_seed(seed: u64, round: u32) -> u64 {
    splitmix64(seed ^ splitmix64(0x7265_706c_6179 ^ round as u64))
}

/// Pieces of new rows not trained yet, in (row sequence number, piece index) order.
#[derive(Debug, Clone, Default)]
pub struct NewWindows {
    queue: VecDeque<(u64, usize, Window)>,
    /// Highest row sequence number already turned into queued pieces.
    fetched_through: u64,
    /// Trained pieces `(row, piece)` of rows after the cursor: skipped when their rows are
    /// queued (after a resume), reported as [`StepMix::ahead`].
    done: BTreeSet<(u64, usize)>,
    /// Input tokens queued.
    positions: usize,
}

/// The windows of one step, and the progress after it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMix {
    /// Pieces of new rows.
    pub new: Vec<Window>,
    /// Pieces of replay rows.
    pub replay: Vec<Window>,
    /// Packed: the windows of `seq_len` the pieces of `new` and `replay` share (the batch
    /// the step trains on). Unpacked: empty (each piece is its own window).
    pub packed: Vec<Packed>,
    pub cursor: u64,
    pub partial: Option<(u64, usize)>,
    pub ahead: Vec<(u64, usize)>,
}

impl StepMix {
    /// Whether the step has no piece at all.
    pub fn is_empty(&self) -> bool {
        self.new.is_empty() && self.replay.is_empty()
    }

    /// Input tokens that are text, not padding: `Σ len(inputs)` over the pieces.
    pub fn real_tokens(&self) -> usize {
        self.new
            .iter()
            .chain(self.replay.iter())
            .map(|w| w.inputs.len())
            .sum()
    }

    /// The batch the step trains on: the packed windows, or new pieces then replay pieces
    /// one per window. Panics if the step [`Self::is_empty`].
    pub fn batch(&self, seq: usize, pad: u32) -> Batch {
        if self.packed.is_empty() {
            let all: Vec<&Window> = self.new.iter().chain(self.replay.iter()).collect();
            assemble(&all, seq, pad)
        } else {
            assemble_packed(&self.packed.iter().collect::<Vec<_>>(), seq, pad)
        }
    }

    /// Separate batches of the new pieces and of the replay pieces (packed when the step
    /// is), for the replay-vs-new loss gap; `None` unless the step has both.
    pub fn part_batches(&self, seq: usize, pad: u32) -> Option<(Batch, Batch)> {
        if self.new.is_empty() || self.replay.is_empty() {
            return None;
        }
        let one = |ws: &[Window]| {
            if self.packed.is_empty() {
                assemble(&ws.iter().collect::<Vec<_>>(), seq, pad)
            } else {
                let p = pack_windows(ws.to_vec(), seq);
                assemble_packed(&p.iter().collect::<Vec<_>>(), seq, pad)
            }
        };
        Some((one(&self.new), one(&self.replay)))
    }
}

/// Replay windows `R` of a step (see the module doc).
fn replay_windows(b: usize, share: f64, history: bool, has_new: bool) -> usize {
    if history && has_new {
        (((b as f64) * share).round() as usize).min(b)
    } else if history {
        b
    } else {
        0
    }
}

/// What a step is mixed from besides the queue of new windows.
#[derive(Clone, Copy)]
pub struct StepInputs<'a> {
    /// The tokenizer of the replay rows.
    pub tok: &'a Tokenizer,
    /// Replay rows sampled for this step (round 0 of a packed step).
    pub replay_rows: &'a [Record],
    /// The store holds training rows and `replay_rows` were sampled from them.
    pub history: bool,
    /// Batch size, window length and replay share.
    pub tc: &'a TrainingConfig,
    /// The step's seed (where replay windows start).
    pub seed: u64,
}

impl NewWindows {
    /// An empty queue whose rows up to `cursor` are trained, plus the first `partial.1`
    /// pieces of row `partial.0` and the pieces in `ahead` (the progress a checkpoint
    /// saved).
    pub fn new(cursor: u64, partial: Option<(u64, usize)>, ahead: &[(u64, usize)]) -> Self {
        let mut done: BTreeSet<(u64, usize)> = ahead.iter().copied().collect();
        if let Some((seq, k)) = partial {
            done.extend((0..k).map(|i| (seq, i)));
        }
        Self {
            queue: VecDeque::new(),
            fetched_through: cursor,
            done,
            positions: 0,
        }
    }

    /// The cursor to fetch new rows after.
    pub fn fetched_through(&self) -> u64 {
        self.fetched_through
    }

    /// Pieces queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Input tokens queued.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Positions a packed step looks at: `2 · B · seq_len`.
    fn lookahead(tc: &TrainingConfig) -> usize {
        2 * tc.batch_size * tc.seq_len
    }

    /// New rows to ask for before a step: unpacked, `B` while fewer than `B` pieces are
    /// queued; packed, `4 · B` while fewer than the lookahead's positions are; else 0.
    pub fn wanted(&self, tc: &TrainingConfig) -> usize {
        let b = tc.batch_size;
        if tc.packing {
            if self.positions < Self::lookahead(tc) {
                4 * b
            } else {
                0
            }
        } else if self.queue.len() >= b {
            0
        } else {
            b
        }
    }

    /// Replay rows to sample per request: `B` unpacked, `2 · B` packed.
    pub fn replay_rows(tc: &TrainingConfig) -> usize {
        if tc.packing {
            2 * tc.batch_size
        } else {
            tc.batch_size
        }
    }

    /// Queues the pieces of `rows` (rows after [`Self::fetched_through`], in order), less
    /// those already trained. A row that does not tokenize is skipped.
    pub fn push_rows(&mut self, tok: &Tokenizer, rows: &[Record], seq_len: usize) {
        for r in rows {
            if let Ok(tk) = tokenize_record(tok, r) {
                for (i, w) in windows(&tk, seq_len).into_iter().enumerate() {
                    if !self.done.contains(&(r.seq, i)) {
                        self.positions += w.inputs.len();
                        self.queue.push_back((r.seq, i, w));
                    }
                }
            }
            self.fetched_through = self.fetched_through.max(r.seq);
        }
    }

    /// Every row up to the returned cursor is trained; forgets the trained pieces of those
    /// rows.
    fn advance(&mut self) -> u64 {
        let cursor = match self.queue.front() {
            None => self.fetched_through,
            Some(&(seq, _, _)) => seq - 1,
        };
        self.done = self.done.split_off(&(cursor + 1, 0));
        cursor
    }

    /// Unpacked step of `tc.batch_size` windows (see the module doc).
    pub fn take_step(&mut self, s: StepInputs<'_>) -> StepMix {
        let (b, seq_len) = (s.tc.batch_size, s.tc.seq_len);
        let n_replay_target =
            replay_windows(b, s.tc.replay_share, s.history, !self.queue.is_empty());
        let n_new = (b - n_replay_target).min(self.queue.len());
        let new: Vec<Window> = self.queue.drain(..n_new).map(|(_, _, w)| w).collect();
        self.positions -= new.iter().map(|w| w.inputs.len()).sum::<usize>();
        let partial = match self.queue.front() {
            Some(&(seq, i, _)) if i > 0 => Some((seq, i)),
            _ => None,
        };
        let cursor = self.advance();
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x5eed);
        let mut replay = Vec::new();
        for r in s.replay_rows {
            if new.len() + replay.len() >= b {
                break;
            }
            if let Some(w) = replay_piece(s.tok, r, seq_len, &mut rng) {
                replay.push(w);
            }
        }
        StepMix {
            new,
            replay,
            packed: Vec::new(),
            cursor,
            partial,
            ahead: Vec::new(),
        }
    }

    /// Packed step of at most `tc.batch_size` windows (see the module doc). The inputs'
    /// `replay_rows` are round 0's sampled rows; `more(round)` samples round `round` ≥ 1
    /// (with [`replay_round_seed`]). On `Err` from `more` the queue is left as it was.
    pub fn take_packed_step<E>(
        &mut self,
        inputs: StepInputs<'_>,
        mut more: impl FnMut(u32) -> Result<Vec<Record>, E>,
    ) -> Result<StepMix, E> {
        let StepInputs {
            tok,
            replay_rows,
            history,
            tc,
            seed,
        } = inputs;
        let (b, seq_len) = (tc.batch_size, tc.seq_len);
        let n_replay = replay_windows(b, tc.replay_share, history, !self.queue.is_empty());
        // The prefix looked at.
        let look = Self::lookahead(tc);
        let (mut k, mut seen) = (0, 0);
        while k < self.queue.len() && seen < look {
            seen += self.queue[k].2.inputs.len();
            k += 1;
        }
        let mut order: Vec<usize> = (1..k).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.queue[i].2.inputs.len()));
        let mut bins = Bins::new(seq_len);
        let mut placed = vec![false; k];
        for i in (0..k.min(1)).chain(order) {
            placed[i] = bins.place(&self.queue[i].2, b - n_replay);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let mut replay = Vec::new();
        if history {
            let mut rows = std::borrow::Cow::Borrowed(replay_rows);
            for round in 1..=MAX_REPLAY_ROUNDS {
                let mut pieces: Vec<Window> = rows
                    .iter()
                    .filter_map(|r| replay_piece(tok, r, seq_len, &mut rng))
                    .collect();
                pieces.sort_by_key(|w| std::cmp::Reverse(w.inputs.len()));
                let before = replay.len();
                for p in pieces {
                    if bins.place(&p, b) {
                        replay.push(p);
                    }
                }
                if replay.len() == before
                    || bins.free(b) * 64 <= b * seq_len
                    || round == MAX_REPLAY_ROUNDS
                {
                    break;
                }
                rows = std::borrow::Cow::Owned(more(round)?);
            }
        }
        // Commit: the placed pieces leave the queue.
        let mut new = Vec::new();
        let queue = std::mem::take(&mut self.queue);
        for (j, (seq, i, w)) in queue.into_iter().enumerate() {
            if j < k && placed[j] {
                self.positions -= w.inputs.len();
                self.done.insert((seq, i));
                new.push(w);
            } else {
                self.queue.push_back((seq, i, w));
            }
        }
        let cursor = self.advance();
        Ok(StepMix {
            new,
            replay,
            packed: bins.into_windows(),
            cursor,
            partial: None,
            ahead: self.done.iter().copied().collect(),
        })
    }
}

/// One piece of a replay row, uniformly among its pieces; `None` when it has none.
fn replay_piece(
    tok: &Tokenizer,
    r: &Record,
    seq_len: usize,
    rng: &mut ChaCha8Rng,
) -> Option<Window> {
    let tk = tokenize_record(tok, r).ok()?;
    let mut ws = windows(&tk, seq_len);
    if ws.is_empty() {
        return None;
    }
    let i = rng.random_range(0..ws.len());
    Some(ws.swap_remove(i))
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
            time_ms: None,
            row: seq,
            file_hash: [0; 32],
            source: "s".into(),
            body: RowBody::Text { text },
        }
    }

    /// The inputs of a step on `replay` rows (history whenever there are some).
    fn inputs<'a>(replay: &'a [Record], tc: &'a TrainingConfig, seed: u64) -> StepInputs<'a> {
        StepInputs {
            tok: tok(),
            replay_rows: replay,
            history: !replay.is_empty(),
            tc,
            seed,
        }
    }

    fn tc(b: usize, share: f64) -> TrainingConfig {
        TrainingConfig {
            batch_size: b,
            seq_len: 8,
            replay_share: share,
            packing: false,
            ..Default::default()
        }
    }

    #[test]
    fn new_windows_queue_the_same_whatever_the_fetch_history() {
        let rows: Vec<Record> = (1..=6).map(|s| row(s, 3 + s as usize * 2)).collect();
        let mut once = NewWindows::new(0, None, &[]);
        once.push_rows(tok(), &rows, 8);
        let mut split = NewWindows::new(0, None, &[]);
        for r in rows.chunks(2) {
            split.push_rows(tok(), r, 8);
        }
        assert_eq!(once.fetched_through(), 6);
        assert_eq!(once.queue, split.queue);
        assert!(once.len() > rows.len(), "long rows give several windows");
    }

    #[test]
    fn a_step_takes_new_windows_first_then_replay_up_to_the_batch() {
        let rows: Vec<Record> = (1..=4).map(|s| row(s, 4)).collect();
        let replay: Vec<Record> = (10..20).map(|s| row(s, 4)).collect();
        let mut q = NewWindows::new(0, None, &[]);
        q.push_rows(tok(), &rows, 8);
        let n_queued = q.len();
        let m = q.take_step(inputs(&replay, &tc(4, 0.5), 9));
        assert_eq!((m.new.len(), m.replay.len()), (2, 2));
        assert_eq!(q.len(), n_queued - 2);
        // Only history: an idle step is all replay.
        let mut empty = NewWindows::new(4, None, &[]);
        let m = empty.take_step(inputs(&replay, &tc(4, 0.5), 9));
        assert_eq!(
            (m.new.len(), m.replay.len(), m.cursor, m.partial),
            (0, 4, 4, None)
        );
        // No history: new windows only, as many as the batch holds.
        let mut q = NewWindows::new(0, None, &[]);
        q.push_rows(tok(), &rows, 8);
        let m = q.take_step(inputs(&[], &tc(3, 0.5), 9));
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
        let mut q = NewWindows::new(0, None, &[]);
        q.push_rows(tok(), std::slice::from_ref(&long), 8);
        let total = q.len();
        assert!(total >= 3, "{total}");
        let first = q.take_step(inputs(&[], &tc(1, 0.0), 1));
        assert_eq!((first.cursor, first.partial), (0, Some((1, 1))));
        // A resumed queue skips the trained window and yields the same next window.
        let mut resumed = NewWindows::new(first.cursor, first.partial, &first.ahead);
        resumed.push_rows(tok(), std::slice::from_ref(&long), 8);
        assert_eq!(resumed.len(), total - 1);
        let a = q.take_step(inputs(&[], &tc(1, 0.0), 2));
        let b = resumed.take_step(inputs(&[], &tc(1, 0.0), 2));
        assert_eq!(a, b);
    }

    #[test]
    fn replay_windows_are_seeded() {
        let replay: Vec<Record> = (10..30).map(|s| row(s, 25)).collect();
        let take =
            |seed| NewWindows::new(0, None, &[]).take_step(inputs(&replay, &tc(4, 0.5), seed));
        assert_eq!(take(3), take(3));
        assert_ne!(take(3).replay, take(4).replay);
    }

    fn ptc(b: usize, share: f64, seq: usize) -> TrainingConfig {
        TrainingConfig {
            batch_size: b,
            seq_len: seq,
            replay_share: share,
            packing: true,
            ..Default::default()
        }
    }

    /// Rows of 1 to 23 words: most one piece, some longer than a window of 32.
    fn varied(from: u64, n: u64) -> Vec<Record> {
        (from..from + n)
            .map(|s| row(s, 1 + (s as usize * 7) % 23))
            .collect()
    }

    fn sorted(ws: &[Window]) -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        let mut v: Vec<_> = ws
            .iter()
            .map(|w| {
                let m = w.mask.iter().map(|x| x.to_bits()).collect();
                (w.inputs.clone(), w.targets.clone(), m)
            })
            .collect();
        v.sort();
        v
    }

    /// Queues rows after the queue's cursor in chunks of `chunk` while it wants rows, as
    /// the trainer's fetch does.
    fn top_up(q: &mut NewWindows, rows: &[Record], chunk: usize, tc: &TrainingConfig) {
        let after: Vec<Record> = rows
            .iter()
            .filter(|r| r.seq > q.fetched_through())
            .cloned()
            .collect();
        for c in after.chunks(chunk) {
            if q.wanted(tc) == 0 {
                break;
            }
            q.push_rows(tok(), c, tc.seq_len);
        }
    }

    fn more_rows(round: u32) -> Result<Vec<Record>, ()> {
        Ok(varied(1000 + round as u64 * 20, 20))
    }

    #[test]
    fn packed_steps_train_every_piece_once_and_fill_their_windows() {
        let tc = ptc(4, 0.5, 32);
        let rows = varied(1, 300);
        let mut all = NewWindows::new(0, None, &[]);
        all.push_rows(tok(), &rows, 32);
        let want: Vec<Window> = all.queue.iter().map(|e| e.2.clone()).collect();
        assert!(
            want.iter().any(|w| w.inputs.len() == 32),
            "some rows are split"
        );
        let mut q = NewWindows::new(0, None, &[]);
        let (mut got, mut fills) = (Vec::new(), Vec::new());
        for t in 0.. {
            top_up(&mut q, &rows, 5, &tc);
            if q.is_empty() {
                break;
            }
            let front = q.queue[0].2.clone();
            let m = q.take_packed_step(inputs(&[], &tc, t), more_rows).unwrap();
            assert!(m.new.contains(&front), "the front piece always goes in");
            assert!(m.replay.is_empty() && m.packed.len() <= 4);
            let b = m.batch(32, 0);
            let cfg = crate::model::ModelConfig {
                vocab_size: 300,
                max_seq_len: 32,
                ..crate::model::ModelConfig::default()
            };
            b.validate(&cfg).unwrap();
            fills.push(m.real_tokens() as f64 / (b.batch * b.seq) as f64);
            got.extend(m.new);
        }
        assert_eq!(
            sorted(&got),
            sorted(&want),
            "each piece trained exactly once"
        );
        let n = fills.len();
        let mean = fills[..n - 2].iter().sum::<f64>() / (n - 2) as f64;
        eprintln!("{n} packed steps, {mean:.3} of positions used before the last two");
        assert!(mean >= 0.95, "utilisation {mean:.3}: {fills:?}");
    }

    #[test]
    fn a_packed_queue_rebuilt_from_its_progress_takes_the_same_steps() {
        let tc = ptc(4, 0.5, 32);
        let rows = varied(1, 200);
        let replay = varied(500, 8);
        // Straight: every row queued at once (more than the steps look at).
        let mut a = NewWindows::new(0, None, &[]);
        a.push_rows(tok(), &rows, 32);
        let mut m = None;
        for t in 0..6 {
            m = Some(
                a.take_packed_step(inputs(&replay, &tc, t), more_rows)
                    .unwrap(),
            );
        }
        let m = m.unwrap();
        assert!(!m.ahead.is_empty(), "pieces were trained out of order");
        assert!(m.ahead.iter().all(|&(s, _)| s > m.cursor));
        // Resumed from the progress alone, fetching in chunks of 3.
        let mut b = NewWindows::new(m.cursor, m.partial, &m.ahead);
        for t in 6..30 {
            top_up(&mut b, &rows, 3, &tc);
            let x = a.take_packed_step(inputs(&replay, &tc, t), more_rows);
            let y = b.take_packed_step(inputs(&replay, &tc, t), more_rows);
            assert_eq!(x, y, "step {t}");
        }
    }

    #[test]
    fn replay_rounds_fill_the_room_and_a_failed_round_leaves_the_queue() {
        let tc = ptc(4, 0.5, 32);
        let mut q = NewWindows::new(0, None, &[]);
        let few: Vec<Record> = (1..4).map(|s| row(s, 4)).collect();
        q.push_rows(tok(), &few, 32);
        // Two tiny replay rows: round 0 cannot fill the windows.
        let replay: Vec<Record> = (100..102).map(|s| row(s, 2)).collect();
        let (queue, positions) = (q.queue.clone(), q.positions());
        let failed = q.take_packed_step(inputs(&replay, &tc, 1), |_| Err("replay down"));
        assert_eq!(failed, Err("replay down"));
        assert_eq!((&q.queue, q.positions()), (&queue, positions));
        let mut asked = Vec::new();
        let m = q
            .take_packed_step(inputs(&replay, &tc, 1), |r| {
                asked.push(r);
                Ok::<_, ()>((0..6).map(|i| row(200 + r as u64 * 10 + i, 3)).collect())
            })
            .unwrap();
        assert!(!asked.is_empty() && asked.len() <= MAX_REPLAY_ROUNDS as usize);
        assert_eq!(asked, (1..=asked.len() as u32).collect::<Vec<_>>());
        let util = m.real_tokens() as f64 / (4 * 32) as f64;
        assert!(
            util >= 0.95,
            "utilisation {util:.3} after {} rounds",
            asked.len()
        );
        assert_eq!(m.packed.len(), 4);
        assert!(q.is_empty() && m.new.len() == queue.len());
        let (nb, rb) = m.part_batches(32, 0).unwrap();
        assert_eq!(
            nb.loss_mask.iter().sum::<f32>() + rb.loss_mask.iter().sum::<f32>(),
            m.batch(32, 0).loss_mask.iter().sum::<f32>()
        );
    }

    #[test]
    fn replay_round_seeds_differ_by_round() {
        assert_ne!(replay_round_seed(5, 1), replay_round_seed(5, 2));
        assert_ne!(replay_round_seed(5, 1), replay_round_seed(6, 1));
    }
}
