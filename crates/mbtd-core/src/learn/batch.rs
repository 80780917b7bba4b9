//! Rows → token windows → batches.
//!
//! A text row becomes `enc(text) ‖ eot`, every token a target. A prompt/response row becomes
//! `enc(prompt) ‖ resp ‖ enc(response) ‖ eot`, and only the response tokens and the final
//! `eot` are targets (no loss on the prompt). A sequence of `n` tokens is cut into windows of
//! at most `seq + 1` tokens with stride `seq` (inputs `w[..-1]`, targets `w[1..]`), so long
//! texts are trained whole, window by window.

use crate::model::Batch;
use crate::text::csv_rows::RowBody;
use crate::text::tokenizer::{Tokenizer, TokenizerError};

/// A token sequence with, per token, whether it is a loss target.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
}

/// One training window: `inputs[j]` predicts `targets[j]` with weight `mask[j]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
}

/// Tokenizes a row as described in the module doc.
pub fn tokenize(tok: &Tokenizer, body: &RowBody) -> Result<Tokens, TokenizerError> {
    let eot = tok.eot_id();
    Ok(match body {
        RowBody::Text { text } => {
            let mut ids = tok.encode(text)?;
            ids.push(eot);
            let target = vec![true; ids.len()];
            Tokens { ids, target }
        }
        RowBody::PromptResponse { prompt, response } => {
            let mut ids = tok.encode(prompt)?;
            ids.push(tok.response_id());
            let n_prompt = ids.len();
            ids.extend(tok.encode(response)?);
            ids.push(eot);
            let target = (0..ids.len()).map(|i| i >= n_prompt).collect();
            Tokens { ids, target }
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
        };
        if w.mask.iter().any(|&m| m > 0.0) {
            out.push(w);
        }
        start += seq;
    }
    out
}

/// Packs windows into one batch of `seq` positions, padding with `pad` at weight 0.
/// Panics if `ws` is empty or a window is longer than `seq` (a programming error).
pub fn assemble(ws: &[&Window], seq: usize, pad: u32) -> Batch {
    assert!(!ws.is_empty(), "assemble needs at least one window");
    let b = ws.len();
    let mut inputs = vec![pad; b * seq];
    let mut targets = vec![pad; b * seq];
    let mut loss_mask = vec![0.0; b * seq];
    for (r, w) in ws.iter().enumerate() {
        let n = w.inputs.len();
        assert!(n <= seq, "window of {n} tokens exceeds seq {seq}");
        inputs[r * seq..r * seq + n].copy_from_slice(&w.inputs);
        targets[r * seq..r * seq + n].copy_from_slice(&w.targets);
        loss_mask[r * seq..r * seq + n].copy_from_slice(&w.mask);
    }
    Batch {
        batch: b,
        seq,
        inputs,
        targets,
        loss_mask,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, first_target: usize) -> Tokens {
        Tokens {
            ids: (0..n as u32).collect(),
            target: (0..n).map(|i| i >= first_target).collect(),
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
}
