//! Comparing control losses measured on the same held-out rows at different evaluations.
//!
//! The control loss of an era is a mean over whichever rows that era holds at the time, and
//! those sets change as data arrives: a row that was "new" at one eval is "old" at the next,
//! and a new source joins the old era with a different difficulty. Comparing such means
//! across evals mixes the model's progress with the change of data. What does not change is
//! one source's old-era group once it is measured on the same rows: the store hands out the
//! first `eval.max_rows_per_group` control rows of a source by sequence number (control rows
//! are only ever removed by eviction, and new ones come with larger sequence numbers), so two
//! evals measured the same rows of source `s` exactly when the group's row count `n_s` and
//! last sequence number agree.
//!
//! Over a set `S` of such sources, the loss at an eval is the token-weighted mean
//! `L = Σ_{s∈S} τ_s ℓ_s / Σ_{s∈S} τ_s` (`ℓ_s`: the group's mean loss per target token,
//! `τ_s`: its target tokens, equal at every eval that measured the same rows).

use serde::{Deserialize, Serialize};

/// Control loss of one source's old-era group at an eval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceLoss {
    /// Source tag.
    pub source: String,
    /// Rows measured (the first ones of the source by sequence number).
    pub rows: u64,
    /// Sequence number of the last row measured.
    pub last_seq: u64,
    /// Target tokens the loss is averaged over.
    pub tokens: u64,
    /// Mean loss per target token (nats).
    #[serde(with = "super::float_json::nan_as_null")]
    pub loss: f64,
}

impl SourceLoss {
    /// Whether `other` measured the same rows of the same source.
    pub fn same_rows(&self, other: &SourceLoss) -> bool {
        self.source == other.source
            && self.rows == other.rows
            && self.last_seq == other.last_seq
            && self.tokens == other.tokens
    }
}

/// One source's loss on the same rows before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceChange {
    /// Source tag.
    pub source: String,
    /// Target tokens.
    pub tokens: u64,
    /// Loss at the earlier eval.
    #[serde(with = "super::float_json::nan_as_null")]
    pub before: f64,
    /// Loss at the later eval.
    #[serde(with = "super::float_json::nan_as_null")]
    pub after: f64,
}

/// Token-weighted mean loss `Σ τ ℓ / Σ τ` of `groups` (NaN when they hold no tokens).
fn weighted(groups: &[&SourceLoss]) -> f64 {
    let tokens: u64 = groups.iter().map(|g| g.tokens).sum();
    if tokens == 0 {
        return f64::NAN;
    }
    groups.iter().map(|g| g.tokens as f64 * g.loss).sum::<f64>() / tokens as f64
}

/// Per-source changes between `before` and `after` over the sources whose groups hold the
/// same rows at both (sources measured at one eval only, or on other rows, are left out);
/// empty when there is none.
pub fn changes(before: &[SourceLoss], after: &[SourceLoss]) -> Vec<SourceChange> {
    after
        .iter()
        .filter(|a| a.tokens > 0)
        .filter_map(|a| {
            let b = before.iter().find(|b| b.same_rows(a))?;
            Some(SourceChange {
                source: a.source.clone(),
                tokens: a.tokens,
                before: b.loss,
                after: a.loss,
            })
        })
        .collect()
}

/// Token-weighted means `(L_before, L_after)` of a set of changes (NaN when empty).
pub fn means(changes: &[SourceChange]) -> (f64, f64) {
    let tokens: u64 = changes.iter().map(|c| c.tokens).sum();
    if tokens == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = |f: fn(&SourceChange) -> f64| {
        changes.iter().map(|c| c.tokens as f64 * f(c)).sum::<f64>() / tokens as f64
    };
    (mean(|c| c.before), mean(|c| c.after))
}

/// The loss at each of `evals` (oldest first) on the same rows, when every source of the
/// latest one's old era was measured on the same rows at every one of them (so the series
/// covers all the held-out data the latest eval holds and nothing else); `None` otherwise,
/// or when the latest eval has no old-era group.
pub fn same_rows_series(evals: &[&[SourceLoss]]) -> Option<Vec<f64>> {
    let latest = evals.last()?;
    if latest.iter().all(|g| g.tokens == 0) {
        return None;
    }
    let mut series = Vec::with_capacity(evals.len());
    for groups in evals {
        let matched: Vec<&SourceLoss> = latest
            .iter()
            .filter(|l| l.tokens > 0)
            .map(|l| groups.iter().find(|g| g.same_rows(l)))
            .collect::<Option<_>>()?;
        series.push(weighted(&matched));
    }
    Some(series)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(source: &str, rows: u64, tokens: u64, loss: f64) -> SourceLoss {
        SourceLoss {
            source: source.into(),
            rows,
            last_seq: rows * 10,
            tokens,
            loss,
        }
    }

    #[test]
    fn changes_keep_only_sources_measured_on_the_same_rows() {
        let before = vec![g("a", 64, 300, 2.0), g("b", 10, 50, 3.0)];
        // b grew to 20 rows (other rows), c is new: only a compares.
        let after = vec![
            g("a", 64, 300, 1.5),
            g("b", 20, 100, 1.0),
            g("c", 5, 20, 4.0),
        ];
        let c = changes(&before, &after);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].source.as_str(), c[0].before, c[0].after),
            ("a", 2.0, 1.5)
        );
        assert_eq!(means(&c), (2.0, 1.5));
        // Same count but another last row: not the same rows.
        let mut moved = before.clone();
        moved[0].last_seq += 1;
        assert!(changes(&moved, &after).is_empty());
        assert!(means(&[]).0.is_nan());
    }

    #[test]
    fn means_weigh_sources_by_tokens() {
        let before = vec![g("a", 8, 100, 1.0), g("b", 8, 300, 2.0)];
        let after = vec![g("a", 8, 100, 0.0), g("b", 8, 300, 1.0)];
        let (b, a) = means(&changes(&before, &after));
        assert!((b - 1.75).abs() < 1e-12 && (a - 0.75).abs() < 1e-12);
    }

    #[test]
    fn series_needs_every_latest_source_on_the_same_rows_throughout() {
        let e1 = vec![g("a", 64, 100, 2.0)];
        let e2 = vec![g("a", 64, 100, 1.8), g("b", 30, 100, 3.0)];
        let e3 = vec![g("a", 64, 100, 1.7), g("b", 30, 100, 2.5)];
        // b is missing at e1: the window does not cover it.
        assert_eq!(same_rows_series(&[&e1, &e2, &e3]), None);
        // Over e2..e3 both sources are the same rows.
        let s = same_rows_series(&[&e2, &e3]).unwrap();
        assert!((s[0] - 2.4).abs() < 1e-12 && (s[1] - 2.1).abs() < 1e-12);
        // A source that gained rows in between breaks the series.
        let e4 = vec![g("a", 64, 100, 1.7), g("b", 40, 130, 2.5)];
        assert_eq!(same_rows_series(&[&e3, &e4]), None);
        // No old-era data at all: nothing to compare.
        assert_eq!(same_rows_series(&[&[], &[]]), None);
        assert_eq!(same_rows_series(&[]), None);
    }
}
