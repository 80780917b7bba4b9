//! Rows → token windows → batches.
//!
//! A text row becomes `enc(text) ‖ eot`, every token a target. A prompt/response row becomes
//! `enc(prompt) ‖ resp ‖ enc(response) ‖ eot`, and only the response tokens and the final
//! `eot` are targets (no loss on the prompt). A sequence of `n` tokens is cut into windows of
//! at most `seq + 1` tokens with stride `seq` (inputs `w[..-1]`, targets `w[1..]`), so long
//! texts are trained whole, window by window.
//!
//! Packing ([`pack`], [`assemble_packed`]): instead of one row per window padded to `seq`,
//! the pieces [`windows`] cuts from many rows share windows, each piece a *segment* that
//! attends only to itself and whose positions restart at 0 (see [`crate::model::Batch`]),
//! so a short row costs its own length rather than a whole window and gets the same
//! logits as alone.
//!
//! Time: every token of a row carries the row's arrival time `τ`
//! ([`crate::model::ops::time2vec::tau_of_ms`] of [`Record::time_ms`], NaN when the row has
//! none) into its windows and, per position, into the batch ([`Batch::times`]; padding
//! NaN), so each segment of a packed window has its own row's time.

use crate::model::Batch;
use crate::model::ops::time2vec::tau_of_ms;
use crate::store::format::Record;
use crate::text::csv_rows::RowBody;
use crate::text::tokenizer::{Tokenizer, TokenizerError};

/// A token sequence with, per token, whether it is a loss target, and the arrival time
/// `τ` of its row (NaN: unknown).
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
    pub time: f32,
}

/// One training window: `inputs[j]` predicts `targets[j]` with weight `mask[j]`; `times[j]`
/// is the arrival time `τ` of the row position `j` belongs to (NaN: unknown). Two windows
/// are equal when every field is bit for bit (so unknown times compare equal).
#[derive(Debug, Clone)]
pub struct Window {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
    pub times: Vec<f32>,
}

impl PartialEq for Window {
    fn eq(&self, o: &Self) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        self.inputs == o.inputs
            && self.targets == o.targets
            && bits(&self.mask) == bits(&o.mask)
            && bits(&self.times) == bits(&o.times)
    }
}

/// Tokenizes a stored row with its arrival time ([`tokenize`] of its body).
pub fn tokenize_record(tok: &Tokenizer, r: &Record) -> Result<Tokens, TokenizerError> {
    let mut t = tokenize(tok, &r.body)?;
    t.time = r.time_ms.map_or(f32::NAN, tau_of_ms);
    Ok(t)
}

/// Tokenizes a row as described in the module doc (time unknown: NaN).
pub fn tokenize(tok: &Tokenizer, body: &RowBody) -> Result<Tokens, TokenizerError> {
    let eot = tok.eot_id();
    let time = f32::NAN;
    Ok(match body {
        RowBody::Text { text } => {
            let mut ids = tok.encode(text)?;
            ids.push(eot);
            let target = vec![true; ids.len()];
            Tokens { ids, target, time }
        }
        RowBody::PromptResponse { prompt, response } => {
            let mut ids = tok.encode(prompt)?;
            ids.push(tok.response_id());
            let n_prompt = ids.len();
            ids.extend(tok.encode(response)?);
            ids.push(eot);
            let target = (0..ids.len()).map(|i| i >= n_prompt).collect();
            Tokens { ids, target, time }
        }
    })
}

/// Cuts a sequence into windows of at most `seq + 1` tokens, stride `seq`. A sequence of
/// one token has no window; a window with no target is dropped.
pub fn windows(t: &Tokens, seq: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let n = t.ids.len();
    let mut start = 0;
    while start + 1 < n {
        let end = (start + seq + 1).min(n);
        let w = Window {
            inputs: t.ids[start..end - 1].to_vec(),
            targets: t.ids[start + 1..end].to_vec(),
            mask: t.target[start + 1..end]
                .iter()
                .map(|&b| if b { 1.0 } else { 0.0 })
                .collect(),
            times: vec![t.time; end - 1 - start],
        };
        if w.mask.iter().any(|&m| m > 0.0) {
            out.push(w);
        }
        start += seq;
    }
    out
}

/// Windows of `seq` positions filled with the pieces of several rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The pieces side by side (at most `seq` positions; [`assemble_packed`] pads).
    pub window: Window,
    /// Per position, the index of its piece within this window (`0, 0, …, 1, 1, …`).
    pub segments: Vec<u16>,
}

impl Packed {
    /// Positions filled with text (the rest of the window is padding).
    pub fn len(&self) -> usize {
        self.window.inputs.len()
    }

    /// Whether no piece has been placed.
    pub fn is_empty(&self) -> bool {
        self.window.inputs.is_empty()
    }
}

/// Packs rows into windows of `seq` positions. Each row is first cut by [`windows`] (a row
/// longer than a window still gives windows of `seq` and a shorter tail; loss masking is
/// [`windows`]'); the pieces are then packed by [`pack_windows`]. A piece is never split,
/// so every target token of every row appears exactly once, with the context and positions
/// it would have in its own window. Pure and deterministic: the same rows give the same
/// windows.
///
/// Feed [`assemble_packed`] with the result; the position utilisation of a batch is
/// `Σ len / (windows · seq)`. Panics if `seq` is 0 (a programming error).
pub fn pack(rows: &[Tokens], seq: usize) -> Vec<Packed> {
    pack_windows(rows.iter().flat_map(|t| windows(t, seq)).collect(), seq)
}

/// Packs pieces (windows of at most `seq` tokens) longest first (ties in the given order),
/// each into the first window with room for the whole piece, or a new window (first-fit
/// decreasing). Panics if `seq` is 0 or a piece is longer than `seq`.
pub fn pack_windows(mut pieces: Vec<Window>, seq: usize) -> Vec<Packed> {
    // stable: equal lengths keep their order
    pieces.sort_by_key(|w| std::cmp::Reverse(w.inputs.len()));
    let mut bins = Bins::new(seq);
    for piece in &pieces {
        let placed = bins.place(piece, usize::MAX);
        assert!(
            placed,
            "piece of {} tokens exceeds seq {seq}",
            piece.inputs.len()
        );
    }
    bins.windows
}

/// Windows of `seq` positions being filled piece by piece, first fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Bins {
    seq: usize,
    windows: Vec<Packed>,
}

impl Bins {
    /// No window open yet. Panics if `seq` is 0.
    pub fn new(seq: usize) -> Self {
        assert!(seq > 0, "packing needs seq >= 1");
        Self {
            seq,
            windows: Vec::new(),
        }
    }

    /// Places `piece` as a new segment in the first open window with room for all of it,
    /// else in a new window while fewer than `max_windows` are open; whether it was placed.
    pub fn place(&mut self, piece: &Window, max_windows: usize) -> bool {
        let n = piece.inputs.len();
        if n > self.seq {
            return false;
        }
        let slot = match self.windows.iter().position(|p| p.len() + n <= self.seq) {
            Some(i) => i,
            None if self.windows.len() < max_windows => {
                self.windows.push(Packed {
                    window: Window {
                        inputs: Vec::with_capacity(self.seq),
                        targets: Vec::with_capacity(self.seq),
                        mask: Vec::with_capacity(self.seq),
                        times: Vec::with_capacity(self.seq),
                    },
                    segments: Vec::with_capacity(self.seq),
                });
                self.windows.len() - 1
            }
            None => return false,
        };
        let p = &mut self.windows[slot];
        let id = p.segments.last().map_or(0, |&s| s + 1);
        p.segments.extend(std::iter::repeat_n(id, n));
        p.window.inputs.extend_from_slice(&piece.inputs);
        p.window.targets.extend_from_slice(&piece.targets);
        p.window.mask.extend_from_slice(&piece.mask);
        p.window.times.extend_from_slice(&piece.times);
        true
    }

    /// Positions left in `n_windows` windows (the open ones first, then empty ones).
    pub fn free(&self, n_windows: usize) -> usize {
        let used: usize = self.windows.iter().map(Packed::len).sum();
        (n_windows.max(self.windows.len()) * self.seq).saturating_sub(used)
    }

    /// The windows filled so far, in the order they were opened.
    pub fn into_windows(self) -> Vec<Packed> {
        self.windows
    }
}

/// [`assemble`] for packed windows: one batch of `seq` positions with its segment ids;
/// the padding after the last piece of a window (token `pad`, weight 0) is a segment of
/// its own. Panics if `ws` is empty or a window is longer than `seq`.
pub fn assemble_packed(ws: &[&Packed], seq: usize, pad: u32) -> Batch {
    let windows: Vec<&Window> = ws.iter().map(|p| &p.window).collect();
    let mut batch = assemble(&windows, seq, pad);
    let mut segments = Vec::with_capacity(ws.len() * seq);
    for p in ws {
        segments.extend_from_slice(&p.segments);
        let pad_id = p.segments.last().map_or(0, |&s| s + 1);
        segments.resize(segments.len() + seq - p.len(), pad_id);
    }
    batch.segments = Some(segments);
    batch
}

/// Packs windows into one batch of `seq` positions, padding with `pad` at weight 0 and
/// unknown time. Panics if `ws` is empty or a window is longer than `seq` (a programming
/// error).
pub fn assemble(ws: &[&Window], seq: usize, pad: u32) -> Batch {
    assert!(!ws.is_empty(), "assemble needs at least one window");
    let b = ws.len();
    let mut inputs = vec![pad; b * seq];
    let mut targets = vec![pad; b * seq];
    let mut loss_mask = vec![0.0; b * seq];
    let mut times = vec![f32::NAN; b * seq];
    for (r, w) in ws.iter().enumerate() {
        let n = w.inputs.len();
        assert!(n <= seq, "window of {n} tokens exceeds seq {seq}");
        inputs[r * seq..r * seq + n].copy_from_slice(&w.inputs);
        targets[r * seq..r * seq + n].copy_from_slice(&w.targets);
        loss_mask[r * seq..r * seq + n].copy_from_slice(&w.mask);
        times[r * seq..r * seq + n].copy_from_slice(&w.times);
    }
    Batch {
        batch: b,
        seq,
        inputs,
        targets,
        loss_mask,
        segments: None,
        times: Some(times),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, first_target: usize) -> Tokens {
        Tokens {
            ids: (0..n as u32).collect(),
            target: (0..n).map(|i| i >= first_target).collect(),
            time: f32::NAN,
        }
    }

    #[test]
    fn windows_cover_every_target_once_with_stride_seq() {
        let t = toks(10, 0);
        let ws = windows(&t, 4);
        assert_eq!(ws.len(), 3);
        assert_eq!(ws[0].inputs, vec![0, 1, 2, 3]);
        assert_eq!(ws[0].targets, vec![1, 2, 3, 4]);
        assert_eq!(ws[2].inputs, vec![8]);
        assert_eq!(ws[2].targets, vec![9]);
        let all: Vec<u32> = ws.iter().flat_map(|w| w.targets.clone()).collect();
        assert_eq!(all, (1..10).collect::<Vec<_>>());
    }

    #[test]
    fn prompt_positions_carry_no_loss_and_empty_windows_are_dropped() {
        let t = toks(10, 6);
        let ws = windows(&t, 4);
        assert_eq!(ws.len(), 2, "first window has targets 1..=4, all prompt");
        assert_eq!(ws[0].mask, vec![0.0, 1.0, 1.0, 1.0]);
        assert!(windows(&toks(1, 0), 4).is_empty());
    }

    #[test]
    fn assemble_pads_with_zero_weight() {
        let a = windows(&toks(3, 0), 4);
        let b = assemble(&[&a[0]], 4, 99);
        assert_eq!(b.inputs, vec![0, 1, 99, 99]);
        assert_eq!(b.targets, vec![1, 2, 99, 99]);
        assert_eq!(b.loss_mask, vec![1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn tokenize_masks_the_prompt() {
        let tok = Tokenizer::train(
            ["hello world", "abc def", "hello abc"].iter().copied(),
            300,
            1,
        )
        .unwrap();
        let t = tokenize(
            &tok,
            &RowBody::PromptResponse {
                prompt: "hello".into(),
                response: "world".into(),
            },
        )
        .unwrap();
        let resp_at = t.ids.iter().position(|&i| i == tok.response_id()).unwrap();
        assert!(t.target[..=resp_at].iter().all(|&b| !b));
        assert!(t.target[resp_at + 1..].iter().all(|&b| b));
        assert_eq!(*t.ids.last().unwrap(), tok.eot_id());
    }

    /// Rows of ids `base..base + len`, each with a distinct base, all targets but the first
    /// `prompt` tokens.
    fn rows(lens: &[(usize, usize)]) -> Vec<Tokens> {
        lens.iter()
            .enumerate()
            .map(|(r, &(len, prompt))| Tokens {
                ids: (0..len as u32).map(|i| ((r as u32) << 16) | i).collect(),
                target: (0..len).map(|i| i >= prompt).collect(),
                time: r as f32,
            })
            .collect()
    }

    /// Every (input, target, weight) triple of the rows' own windows, sorted.
    fn triples<'a>(ws: impl Iterator<Item = &'a Window>) -> Vec<(u32, u32, u32)> {
        let mut v: Vec<(u32, u32, u32)> = ws
            .flat_map(|w| {
                (0..w.inputs.len()).map(|j| (w.inputs[j], w.targets[j], w.mask[j].to_bits()))
            })
            .collect();
        v.sort_unstable();
        v
    }

    proptest::proptest! {
        /// Packing moves the rows' windows around but keeps every position: each target
        /// token of each row appears exactly once, with its input and weight; no window
        /// exceeds `seq`; segments are runs `0, 1, …` each lying within one row, with
        /// positions that restart at 0, and the assembled batch validates.
        #[test]
        fn packing_keeps_every_target_once(
            lens in proptest::collection::vec((0usize..40, 0usize..6), 1..30),
            seq in 1usize..24,
        ) {
            let rows = rows(&lens);
            let packed = pack(&rows, seq);
            let alone: Vec<Window> = rows.iter().flat_map(|t| windows(t, seq)).collect();
            proptest::prop_assert_eq!(
                triples(packed.iter().map(|p| &p.window)),
                triples(alone.iter())
            );
            for p in &packed {
                proptest::prop_assert!(!p.is_empty() && p.len() <= seq);
                proptest::prop_assert_eq!(p.segments.len(), p.len());
                let mut expect = 0u16;
                for j in 0..p.len() {
                    if j > 0 && p.segments[j] != p.segments[j - 1] {
                        expect += 1;
                        // a new segment starts a new piece: a different row or a new window
                        // of the same row (ids consecutive within a piece)
                    } else if j > 0 {
                        proptest::prop_assert_eq!(p.window.inputs[j], p.window.inputs[j - 1] + 1);
                    }
                    proptest::prop_assert_eq!(p.segments[j], expect);
                    // every position carries its own row's time (row r has time r)
                    proptest::prop_assert_eq!(p.window.times[j], (p.window.inputs[j] >> 16) as f32);
                }
            }
            if !packed.is_empty() {
                let refs: Vec<&Packed> = packed.iter().collect();
                let b = assemble_packed(&refs, seq, 0);
                let cfg = crate::model::ModelConfig {
                    vocab_size: 1 << 24,
                    max_seq_len: seq,
                    ..crate::model::ModelConfig::default()
                };
                proptest::prop_assert!(b.validate(&cfg).is_ok());
                let times = b.times.as_ref().unwrap();
                for (j, (&t, &m)) in times.iter().zip(&b.loss_mask).enumerate() {
                    let text = j % seq < packed[j / seq].len();
                    proptest::prop_assert_eq!(t.is_nan(), !text, "padding and only padding has no time");
                    proptest::prop_assert!(text || m == 0.0);
                }
                let weight: f32 = b.loss_mask.iter().sum();
                let want: f32 = alone.iter().flat_map(|w| w.mask.iter()).sum();
                proptest::prop_assert_eq!(weight, want);
            }
        }
    }

    #[test]
    fn packing_short_rows_fills_at_least_95_percent_of_positions() {
        // 400 rows of 4..=70 tokens (a spread like one-line quotes), windows of 128
        let lens: Vec<(usize, usize)> = (0..400).map(|r| (4 + (r * 37 + r * r) % 67, 0)).collect();
        let rows = rows(&lens);
        let seq = 128;
        let packed = pack(&rows, seq);
        let real: usize = packed.iter().map(Packed::len).sum();
        let util = real as f64 / (packed.len() * seq) as f64;
        let one_per_window: usize = rows.iter().map(|t| windows(t, seq).len()).sum();
        eprintln!(
            "{} rows: {} packed windows ({util:.3} of positions used), {one_per_window} unpacked",
            rows.len(),
            packed.len()
        );
        assert!(util >= 0.95, "utilisation {util:.3}");
    }

    #[test]
    fn assemble_packed_pads_in_a_segment_of_its_own_and_splits_long_rows() {
        // a row of 10 tokens (9 targets) and one of 3 (2 targets), windows of 4
        let rows = rows(&[(10, 0), (3, 0)]);
        let packed = pack(&rows, 4);
        let lens: Vec<usize> = packed.iter().map(Packed::len).collect();
        assert_eq!(
            lens,
            vec![4, 4, 3],
            "two whole windows, the 1-token tail beside the short row"
        );
        assert_eq!(packed[2].segments, vec![0, 0, 1]);
        assert_eq!(packed[2].window.inputs, vec![1 << 16, (1 << 16) + 1, 8]);
        let refs: Vec<&Packed> = packed.iter().collect();
        let b = assemble_packed(&refs, 4, 99);
        assert_eq!(b.segments.as_deref().unwrap()[8..], [0, 0, 1, 2]);
        assert_eq!(b.inputs[11], 99);
        assert_eq!(b.loss_mask[11], 0.0);
    }
}
