//! Reading the store: the trainer's samplers and cursor, control groups, counters.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use rand::Rng;

use super::report::{ControlGroup, Era, ReplayStats};
use super::{ReplayStore, RowMeta, kind_index};
use crate::store::format::{Record, decode_frame};
use crate::store::{SamplingMode, StoreError};
use crate::text::csv_rows::RowKind;

impl ReplayStore {
    pub(super) fn read_meta(&self, m: &RowMeta) -> Result<Record, StoreError> {
        let seg = &self.segments[&m.segment];
        let mut buf = vec![0u8; m.len as usize];
        seg.reader
            .read_exact_at(&mut buf, m.offset)
            .map_err(|e| self.io_err("read record", &seg.path, e))?;
        decode_frame(&buf).ok_or_else(|| StoreError::Corrupt {
            path: seg.path.clone(),
            detail: format!(
                "record seq {} at offset {} fails its CRC check on read; the disk may be failing; restart the daemon to rescan",
                m.seq, m.offset
            ),
        })
    }

    /// `n` training rows drawn uniformly with replacement (empty if there are none).
    pub fn sample_uniform<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        n: usize,
    ) -> Result<Vec<Record>, StoreError> {
        if self.train.is_empty() {
            return Ok(Vec::new());
        }
        (0..n)
            .map(|_| {
                let i = self.train[rng.random_range(0..self.train.len())];
                self.read_meta(&self.rows[i as usize])
            })
            .collect()
    }

    /// `n` training rows drawn with replacement, favouring recent ones: with `N`
    /// training rows in arrival order and `b = bias`, position `i` is drawn with density
    /// proportional to `e^(b·i/N)` by inverse CDF: `x = ln(1 + u(e^b − 1))/b`,
    /// `i = ⌊xN⌋` (`b = 0` is uniform). O(1) per row.
    pub fn sample_recent<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        n: usize,
        bias: f64,
    ) -> Result<Vec<Record>, StoreError> {
        let count = self.train.len();
        if count == 0 {
            return Ok(Vec::new());
        }
        (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                let x = if bias < 1e-9 {
                    u
                } else {
                    (u * bias.exp_m1()).ln_1p() / bias
                };
                let pos = ((x * count as f64) as usize).min(count - 1);
                self.read_meta(&self.rows[self.train[pos] as usize])
            })
            .collect()
    }

    /// `n` training rows with the configured sampler (`sampling`, `recent_bias`).
    pub fn sample<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        n: usize,
    ) -> Result<Vec<Record>, StoreError> {
        match self.cfg.sampling {
            SamplingMode::Uniform => self.sample_uniform(rng, n),
            SamplingMode::Recent => self.sample_recent(rng, n, self.cfg.recent_bias),
        }
    }

    /// Up to `limit` durable training rows with `seq > cursor`, in sequence order. The
    /// trainer keeps the last returned seq as its cursor, so it sees every new row.
    pub fn rows_after(&self, cursor: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let start = self.rows.partition_point(|m| m.seq <= cursor);
        self.rows[start..]
            .iter()
            .filter(|m| !m.control)
            .take(limit)
            .map(|m| self.read_meta(m))
            .collect()
    }

    /// Training rows after `cursor` (not handed to the trainer yet).
    pub fn backlog(&self, cursor: u64) -> u64 {
        let start = self.rows.partition_point(|m| m.seq <= cursor);
        (self.train.len() - self.train.partition_point(|&p| (p as usize) < start)) as u64
    }

    /// True when the live rows (control rows included) reach `max_rows` or their bytes
    /// reach `max_bytes`.
    pub fn at_capacity(&self) -> bool {
        self.rows.len() as u64 >= self.cfg.max_rows || self.live_bytes >= self.cfg.max_bytes
    }

    /// Control rows grouped by source and era (`Old`: seq < `boundary`, `New`: seq >=
    /// `boundary`), each group with its first `max_per_group` rows by sequence number.
    pub fn control_groups(
        &self,
        boundary: u64,
        max_per_group: usize,
    ) -> Result<Vec<ControlGroup>, StoreError> {
        let mut groups: BTreeMap<(&str, Era), (u64, Vec<&RowMeta>)> = BTreeMap::new();
        for m in self.rows.iter().filter(|m| m.control) {
            let era = if m.seq < boundary { Era::Old } else { Era::New };
            let g = groups
                .entry((self.sources[m.source as usize].as_str(), era))
                .or_default();
            g.0 += 1;
            if g.1.len() < max_per_group {
                g.1.push(m);
            }
        }
        groups
            .into_iter()
            .map(|((source, era), (total_rows, metas))| {
                Ok(ControlGroup {
                    source: source.to_string(),
                    era,
                    total_rows,
                    records: metas
                        .into_iter()
                        .map(|m| self.read_meta(m))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> ReplayStats {
        let mut by_kind = BTreeMap::new();
        for k in [RowKind::Text, RowKind::PromptResponse] {
            if self.kind_rows[kind_index(k)] > 0 {
                by_kind.insert(k, self.kind_rows[kind_index(k)]);
            }
        }
        ReplayStats {
            rows: self.rows.len() as u64,
            training_rows: self.train.len() as u64,
            control_rows: self.control_rows,
            bytes: self.live_bytes,
            evicted_total: self.state.evicted_total,
            segments: self.segments.len(),
            last_seq: self.state.next_seq - 1,
            journal_files: self.journal.len(),
            by_source: self
                .sources
                .iter()
                .zip(&self.source_rows)
                .filter(|(_, n)| **n > 0)
                .map(|(s, n)| (s.clone(), *n))
                .collect(),
            by_kind,
        }
    }

    /// Largest durable sequence number (0 if none).
    pub fn last_durable_seq(&self) -> u64 {
        self.rows.last().map_or(0, |m| m.seq)
    }
}
