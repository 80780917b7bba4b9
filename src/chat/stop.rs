//! Stop sequences on a text stream: pieces go in as they arrive, text safe to show comes out.
//!
//! Contract: the stream stops at the first point where the text received so far ends with
//! one of the stop sequences (checked after every character, so the result does not depend
//! on how the text was split into pieces); the reply is the text before that sequence. Text
//! that could still become the start of a stop sequence is held back until it cannot, so a
//! stop sequence is never shown, even in part; [`StopCut::finish`] releases what is held
//! back when the stream ends without a stop.

/// The cutter of one reply.
#[derive(Debug, Clone)]
pub struct StopCut {
    stops: Vec<String>,
    /// The reply so far (cut at the stop sequence once one was seen).
    text: String,
    /// Bytes of `text` already handed out.
    shown: usize,
    stopped: bool,
}

impl StopCut {
    /// A cutter for `stops` (empty strings are ignored).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            shown: 0,
            stopped: false,
        }
    }

    /// Takes the next piece of the stream; returns the text that may be shown now.
    pub fn push(&mut self, piece: &str) -> &str {
        let from = self.shown;
        if self.stopped {
            return &self.text[from..from];
        }
        for c in piece.chars() {
            self.text.push(c);
            if let Some(len) = self
                .stops
                .iter()
                .filter(|s| self.text.ends_with(s.as_str()))
                .map(String::len)
                .max()
            {
                self.text.truncate(self.text.len() - len);
                self.stopped = true;
                break;
            }
        }
        let end = if self.stopped {
            self.text.len()
        } else {
            self.text.len() - self.held_back()
        };
        self.shown = end.max(from);
        &self.text[from..self.shown]
    }

    /// The stream ended: everything not shown yet.
    pub fn finish(&mut self) -> &str {
        let from = self.shown;
        self.shown = self.text.len();
        &self.text[from..]
    }

    /// Whether a stop sequence was seen (the caller stops the stream).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The reply: all text received, cut before the stop sequence.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Length of the longest end of `text` that is a proper beginning of a stop sequence.
    fn held_back(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .map(|(i, _)| i)
                    .filter(|&i| i > 0 && self.text.ends_with(&s[..i]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: the text cut where, reading character by character, it first ends
    /// with a stop sequence (the longest one ending there).
    fn reference(text: &str, stops: &[String]) -> (String, bool) {
        let mut acc = String::new();
        for c in text.chars() {
            acc.push(c);
            if let Some(len) = stops
                .iter()
                .filter(|s| !s.is_empty() && acc.ends_with(s.as_str()))
                .map(String::len)
                .max()
            {
                acc.truncate(acc.len() - len);
                return (acc, true);
            }
        }
        (acc, false)
    }

    #[test]
    fn cuts_across_pieces_and_never_shows_a_partial_stop() {
        let mut c = StopCut::new(["<|im_end|>".to_string()]);
        assert_eq!(c.push("Hello <|im"), "Hello ");
        assert_eq!(c.push("_e"), "");
        assert_eq!(c.push("nd|> more"), "");
        assert!(c.stopped());
        assert_eq!(c.text(), "Hello ");
        assert_eq!(c.push("ignored"), "");
    }

    #[test]
    fn held_back_text_is_released_when_it_stops_matching_or_the_stream_ends() {
        let mut c = StopCut::new(["\nUser:".to_string()]);
        assert_eq!(c.push("a\nUs"), "a");
        assert_eq!(c.push("ually"), "\nUsually");
        assert_eq!(c.push(" x\n"), " x");
        assert_eq!(c.finish(), "\n");
        assert!(!c.stopped());
        assert_eq!(c.text(), "a\nUsually x\n");
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let mut c = StopCut::new(["é!".to_string(), "🙂".to_string()]);
        assert_eq!(c.push("café"), "caf");
        assert_eq!(c.push("s 🙂 rest"), "és ");
        assert_eq!(c.text(), "cafés ");
    }

    proptest! {
        /// Whatever the split into pieces, what is shown (then finished) is exactly the
        /// reference cut, and no shown prefix ever contains a stop sequence.
        #[test]
        fn shown_text_is_the_reference_cut_for_any_split(
            text in "[ab<|>\n é]{0,40}",
            stops in proptest::collection::vec("[ab<|>\n é]{0,4}", 0..3),
            cuts in proptest::collection::vec(0usize..40, 0..8),
        ) {
            let chars: Vec<char> = text.chars().collect();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(chars.len())).collect();
            bounds.push(0);
            bounds.push(chars.len());
            bounds.sort_unstable();
            let mut c = StopCut::new(stops.clone());
            let mut shown = String::new();
            for w in bounds.windows(2) {
                let piece: String = chars[w[0]..w[1]].iter().collect();
                shown.push_str(c.push(&piece));
                for s in stops.iter().filter(|s| !s.is_empty()) {
                    prop_assert!(!shown.contains(s.as_str()), "{shown:?} shows {s:?}");
                }
            }
            shown.push_str(c.finish());
            let (want, stopped) = reference(&text, &stops);
            prop_assert_eq!(&shown, &want);
            prop_assert_eq!(c.text(), want.as_str());
            prop_assert_eq!(c.stopped(), stopped);
        }
    }
}
