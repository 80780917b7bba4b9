//! Synthetic instruction data for the demo and benchmarks: four tasks whose every response is
//! a function of its prompt (a model can learn it, [`solve`] can check it), mixed in phases.
//!
//! | task | source | prompt | response |
//! | --- | --- | --- | --- |
//! | [`Task::Arithmetic`] | `arith` | `37+45=` or `61-18=` (operands 0–99, never negative) | `82` |
//! | [`Task::Strings`] | `strings` | `copy kpqe` or `reverse kpqe` (3–7 letters) | `kpqe` / `eqpk` |
//! | [`Task::Lookup`] | `lookup` | `ka=3 zo=7 mi=1 ? zo` (3–5 distinct keys) | `7` |
//! | [`Task::Sentence`] | `sentences` | `describe big cat garden` | `the big cat sleeps in the garden.` |
//!
//! Rows are drawn from a seeded ChaCha8 stream, so a seed gives the same rows on every machine.
//! Every task has thousands of distinct rows or more, which matters to the daemon: its control
//! slice is chosen by a row's content hash, so a row repeated verbatim is always held out or
//! always trained on.

use crate::text::csv_rows::{RowBody, RowKind};
use crate::text::csv_write::csv_bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One of the four synthetic tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// Two-operand addition or subtraction.
    Arithmetic,
    /// Copy or reverse a random lowercase word.
    Strings,
    /// Find a key's value in a list of `key=value` pairs given in the prompt.
    Lookup,
    /// A templated sentence whose verb is fixed by the animal.
    Sentence,
}

impl Task {
    /// Every task, in the order of [`Phase::weights`].
    pub const ALL: [Task; 4] = [
        Task::Arithmetic,
        Task::Strings,
        Task::Lookup,
        Task::Sentence,
    ];

    /// The `source` column of the task's rows.
    pub fn name(self) -> &'static str {
        match self {
            Task::Arithmetic => "arith",
            Task::Strings => "strings",
            Task::Lookup => "lookup",
            Task::Sentence => "sentences",
        }
    }

    /// The task whose [`Task::name`] is `name`.
    pub fn from_name(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }

    fn index(self) -> usize {
        Task::ALL.iter().position(|&t| t == self).expect("in ALL")
    }
}

/// One generated row, in the inbox's prompt/response form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthRow {
    pub task: Task,
    pub prompt: String,
    pub response: String,
}

impl SynthRow {
    /// The row as the inbox reads it.
    pub fn body(&self) -> RowBody {
        RowBody::PromptResponse {
            prompt: self.prompt.clone(),
            response: self.response.clone(),
        }
    }
}

/// A stage of the stream: the probability of each task (same order as [`Task::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub weights: [f64; 4],
}

/// The demo's stream: two disjoint mixes, then everything (so old tasks come back).
pub const PHASES: [Phase; 3] = [
    Phase {
        name: "arithmetic and sentences",
        weights: [0.45, 0.05, 0.05, 0.45],
    },
    Phase {
        name: "strings and lookup",
        weights: [0.05, 0.45, 0.45, 0.05],
    },
    Phase {
        name: "all four tasks",
        weights: [0.25, 0.25, 0.25, 0.25],
    },
];

/// The phase in force after `fraction` (0 ..= 1) of a run split evenly into `n` phases:
/// `min(floor(fraction · n), n - 1)`.
pub fn phase_index(fraction: f64, n: usize) -> usize {
    let f = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    ((f * n as f64) as usize).min(n.saturating_sub(1))
}

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
/// Animals and the one verb each always takes.
const ANIMALS: [(&str, &str); 12] = [
    ("cat", "sleeps"),
    ("dog", "barks"),
    ("fox", "hunts"),
    ("owl", "hoots"),
    ("bee", "buzzes"),
    ("cow", "grazes"),
    ("hen", "pecks"),
    ("pig", "eats"),
    ("rat", "hides"),
    ("elk", "runs"),
    ("ant", "digs"),
    ("yak", "rests"),
];
const PLACES: [&str; 10] = [
    "garden", "forest", "barn", "river", "field", "house", "cave", "hill", "lake", "road",
];
const ADJECTIVES: [&str; 8] = [
    "small", "big", "old", "young", "red", "brown", "quiet", "lazy",
];

/// A seeded generator of rows.
pub struct Synth {
    rng: ChaCha8Rng,
}

impl Synth {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Draws a task with probability `weights[i] / Σ weights` (uniform if they sum to 0).
    pub fn task(&mut self, weights: &[f64; 4]) -> Task {
        let total: f64 = weights.iter().map(|w| w.max(0.0)).sum();
        if total <= 0.0 {
            return Task::ALL[self.rng.random_range(0..Task::ALL.len())];
        }
        let mut x = self.rng.random_range(0.0..total);
        for (t, w) in Task::ALL.iter().zip(weights) {
            let w = w.max(0.0);
            if x < w {
                return *t;
            }
            x -= w;
        }
        Task::ALL[Task::ALL.len() - 1]
    }

    /// `n` rows of `phase`'s mix.
    pub fn rows(&mut self, phase: &Phase, n: usize) -> Vec<SynthRow> {
        (0..n)
            .map(|_| {
                let t = self.task(&phase.weights);
                self.row(t)
            })
            .collect()
    }

    /// One row of `task`.
    pub fn row(&mut self, task: Task) -> SynthRow {
        let (prompt, response) = match task {
            Task::Arithmetic => {
                let a: u32 = self.rng.random_range(0..100);
                let b: u32 = self.rng.random_range(0..100);
                if self.rng.random_bool(0.5) {
                    (format!("{a}+{b}="), (a + b).to_string())
                } else {
                    let (hi, lo) = (a.max(b), a.min(b));
                    (format!("{hi}-{lo}="), (hi - lo).to_string())
                }
            }
            Task::Strings => {
                let len = self.rng.random_range(3..=7);
                let w = self.word(len);
                if self.rng.random_bool(0.5) {
                    (format!("copy {w}"), w)
                } else {
                    (format!("reverse {w}"), w.chars().rev().collect())
                }
            }
            Task::Lookup => {
                let n = self.rng.random_range(3..=5);
                let mut keys: Vec<String> = Vec::with_capacity(n);
                while keys.len() < n {
                    let k = self.word(2);
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
                let values: Vec<u32> = (0..n).map(|_| self.rng.random_range(0..10)).collect();
                let q = self.rng.random_range(0..n);
                let pairs: Vec<String> = keys
                    .iter()
                    .zip(&values)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                (
                    format!("{} ? {}", pairs.join(" "), keys[q]),
                    values[q].to_string(),
                )
            }
            Task::Sentence => {
                let (animal, verb) = ANIMALS[self.rng.random_range(0..ANIMALS.len())];
                let place = PLACES[self.rng.random_range(0..PLACES.len())];
                let adj = ADJECTIVES[self.rng.random_range(0..ADJECTIVES.len())];
                (
                    format!("describe {adj} {animal} {place}"),
                    format!("the {adj} {animal} {verb} in the {place}."),
                )
            }
        };
        SynthRow {
            task,
            prompt,
            response,
        }
    }

    fn word(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| LETTERS[self.rng.random_range(0..LETTERS.len())] as char)
            .collect()
    }
}

/// The correct response to `prompt` for `task`, derived from the prompt's text alone;
/// `None` when the prompt is not of the task's form.
pub fn solve(task: Task, prompt: &str) -> Option<String> {
    match task {
        Task::Arithmetic => {
            let expr = prompt.strip_suffix('=')?;
            if let Some((a, b)) = expr.split_once('+') {
                Some((a.parse::<u32>().ok()? + b.parse::<u32>().ok()?).to_string())
            } else {
                let (a, b) = expr.split_once('-')?;
                a.parse::<u32>()
                    .ok()?
                    .checked_sub(b.parse::<u32>().ok()?)
                    .map(|d| d.to_string())
            }
        }
        Task::Strings => {
            if let Some(w) = prompt.strip_prefix("copy ") {
                Some(w.to_string())
            } else {
                prompt
                    .strip_prefix("reverse ")
                    .map(|w| w.chars().rev().collect())
            }
        }
        Task::Lookup => {
            let (pairs, key) = prompt.split_once(" ? ")?;
            pairs
                .split_whitespace()
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_string())
        }
        Task::Sentence => {
            let rest = prompt.strip_prefix("describe ")?;
            let mut it = rest.split(' ');
            let (adj, animal, place) = (it.next()?, it.next()?, it.next()?);
            if it.next().is_some() {
                return None;
            }
            let verb = ANIMALS.iter().find(|(a, _)| *a == animal)?.1;
            Some(format!("the {adj} {animal} {verb} in the {place}."))
        }
    }
}

/// The rows as an inbox CSV file: header `prompt,response,source` (the task's name).
pub fn to_csv(rows: &[SynthRow]) -> Vec<u8> {
    let bodies: Vec<RowBody> = rows.iter().map(SynthRow::body).collect();
    csv_bytes(
        RowKind::PromptResponse,
        rows.iter().map(|r| r.task.name()).zip(&bodies),
    )
    .expect("prompt/response rows into a prompt/response file in memory")
}

/// Share of each task (order of [`Task::ALL`]) among `rows`.
pub fn task_shares(rows: &[SynthRow]) -> [f64; 4] {
    let mut c = [0.0; 4];
    for r in rows {
        c[r.task.index()] += 1.0;
    }
    let n = rows.len().max(1) as f64;
    c.map(|x| x / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::csv_rows::CsvRowReader;
    use std::collections::HashSet;

    #[test]
    fn same_seed_same_rows_other_seed_other_rows() {
        let a = Synth::new(7).rows(&PHASES[2], 200);
        let b = Synth::new(7).rows(&PHASES[2], 200);
        let c = Synth::new(8).rows(&PHASES[2], 200);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_generated_response_is_the_solution_of_its_prompt() {
        let mut s = Synth::new(1);
        for task in Task::ALL {
            for _ in 0..500 {
                let r = s.row(task);
                assert_eq!(r.task, task);
                assert_eq!(solve(task, &r.prompt), Some(r.response.clone()), "{r:?}");
            }
        }
    }

    #[test]
    fn solve_checks_hand_written_examples() {
        assert_eq!(solve(Task::Arithmetic, "37+45="), Some("82".into()));
        assert_eq!(solve(Task::Arithmetic, "61-18="), Some("43".into()));
        assert_eq!(solve(Task::Arithmetic, "3-18="), None);
        assert_eq!(solve(Task::Arithmetic, "37+45"), None);
        assert_eq!(solve(Task::Strings, "reverse abc"), Some("cba".into()));
        assert_eq!(solve(Task::Strings, "copy abc"), Some("abc".into()));
        assert_eq!(solve(Task::Strings, "flip abc"), None);
        assert_eq!(solve(Task::Lookup, "ka=3 zo=7 mi=1 ? zo"), Some("7".into()));
        assert_eq!(solve(Task::Lookup, "ka=3 zo=7 ? mi"), None);
        assert_eq!(
            solve(Task::Sentence, "describe big dog barn"),
            Some("the big dog barks in the barn.".into())
        );
        assert_eq!(solve(Task::Sentence, "describe big unicorn barn"), None);
    }

    #[test]
    fn arithmetic_answers_are_right() {
        let mut s = Synth::new(3);
        for _ in 0..300 {
            let r = s.row(Task::Arithmetic);
            let expr = r.prompt.trim_end_matches('=');
            let (a, b, sum) = match expr.split_once('+') {
                Some((a, b)) => (a, b, true),
                None => {
                    let (a, b) = expr.split_once('-').unwrap();
                    (a, b, false)
                }
            };
            let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
            let want = if sum { a + b } else { a - b };
            assert!(want >= 0, "{r:?}");
            assert_eq!(r.response, want.to_string());
        }
    }

    #[test]
    fn lookup_keys_are_distinct_and_the_query_is_one_of_them() {
        let mut s = Synth::new(4);
        for _ in 0..300 {
            let r = s.row(Task::Lookup);
            let (pairs, q) = r.prompt.split_once(" ? ").unwrap();
            let keys: Vec<&str> = pairs
                .split(' ')
                .map(|p| p.split_once('=').unwrap().0)
                .collect();
            assert!((3..=5).contains(&keys.len()), "{r:?}");
            assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len());
            assert!(keys.contains(&q));
        }
    }

    #[test]
    fn phases_shift_the_mix() {
        let mut s = Synth::new(5);
        let shares: Vec<[f64; 4]> = PHASES
            .iter()
            .map(|p| task_shares(&s.rows(p, 4000)))
            .collect();
        for (p, sh) in PHASES.iter().zip(&shares) {
            let total: f64 = p.weights.iter().sum();
            for (w, x) in p.weights.iter().zip(sh) {
                assert!((w / total - x).abs() < 0.03, "{}: {sh:?}", p.name);
            }
        }
        // Phase 0 is mostly arithmetic and sentences, phase 1 mostly strings and lookup.
        assert!(shares[0][0] + shares[0][3] > 0.8, "{shares:?}");
        assert!(shares[1][1] + shares[1][2] > 0.8, "{shares:?}");
    }

    #[test]
    fn phase_index_splits_a_run_evenly() {
        assert_eq!(phase_index(0.0, 3), 0);
        assert_eq!(phase_index(0.34, 3), 1);
        assert_eq!(phase_index(0.99, 3), 2);
        assert_eq!(phase_index(1.0, 3), 2);
        assert_eq!(phase_index(7.0, 3), 2);
        assert_eq!(phase_index(f64::NAN, 3), 0);
    }

    #[test]
    fn rows_are_varied() {
        let mut s = Synth::new(6);
        for (task, min_distinct) in [
            (Task::Arithmetic, 800),
            (Task::Strings, 990),
            (Task::Lookup, 990),
            (Task::Sentence, 500),
        ] {
            let distinct: HashSet<String> = (0..1000).map(|_| s.row(task).prompt).collect();
            assert!(
                distinct.len() >= min_distinct,
                "{task:?}: {} distinct",
                distinct.len()
            );
        }
    }

    #[test]
    fn csv_is_read_back_by_the_inbox_reader() {
        let rows = Synth::new(9).rows(&PHASES[2], 100);
        let text = to_csv(&rows);
        let mut rd = CsvRowReader::new(text.as_slice(), "synth.csv", "synth", 1 << 20).unwrap();
        let mut back = Vec::new();
        while let Some(r) = rd.next_row().unwrap() {
            back.push(r.expect("row accepted"));
        }
        assert_eq!(back.len(), rows.len());
        for (b, r) in back.iter().zip(&rows) {
            assert_eq!(b.source, r.task.name());
            assert_eq!(
                b.body,
                RowBody::PromptResponse {
                    prompt: r.prompt.clone(),
                    response: r.response.clone()
                }
            );
        }
    }
}
