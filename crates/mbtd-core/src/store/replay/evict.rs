//! Capacity: bottom-k eviction and compaction of segments.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use super::report::EvictionReport;
use super::{Active, ReplayStore};
use crate::store::StoreError;
use crate::store::format::segment_header;
use crate::store::fsutil::fsync_dir;
use crate::store::state::{StoreState, eviction_key};

impl ReplayStore {
    /// Most control rows kept: `control_fraction` of `max_rows` (at least one).
    fn control_budget(&self) -> u64 {
        ((self.state.control_fraction * self.cfg.max_rows as f64).ceil() as u64).max(1)
    }

    /// Enforce `max_rows` / `max_bytes` by bottom-k eviction, then compact.
    ///
    /// Control rows are held to their own budget first (`control_fraction` of `max_rows`):
    /// the ones with the smallest keys stay, a uniform sample of every control row so far.
    /// Then the threshold `tau` is chosen over all training rows: the rows kept in the end
    /// are those with the smallest keys such that the bounds hold (the kept control rows
    /// count). Only training rows with `seq <= consumed_through` (rows the trainer has
    /// seen) are evicted now; unconsumed rows above the threshold stay until a later call
    /// with a larger cursor, so the bounds can be exceeded by them (the ingestor then holds
    /// files back, see `backlog`). A row of a file whose ingestion was interrupted can be
    /// evicted like any other; if that file is processed again, such a row is appended
    /// again (it is never live twice).
    pub fn enforce_capacity(
        &mut self,
        consumed_through: u64,
    ) -> Result<EvictionReport, StoreError> {
        if self.rollback_due {
            self.rollback()?;
        }
        let (max_rows, max_bytes) = (self.cfg.max_rows, self.cfg.max_bytes);
        let control_max = self.control_budget();
        if self.rows.len() as u64 <= max_rows
            && self.live_bytes <= max_bytes
            && self.control_rows <= control_max
            && self.state.tau == u64::MAX
        {
            return Ok(EvictionReport::default());
        }
        // Never beyond the newest existing row: rows appended later must not fall
        // under the rule before they were consumed.
        let last = self.last_durable_seq();
        let through = consumed_through.min(last).max(self.state.evict_through);
        let seed = self.state.seed;
        let mut control_tau = self.state.control_tau;
        let mut control_keys: Vec<u64> = self
            .rows
            .iter()
            .filter(|m| m.control)
            .map(|m| eviction_key(seed, m.seq))
            .filter(|&k| k < control_tau)
            .collect();
        if control_keys.len() as u64 > control_max {
            let (_, &mut nth, _) = control_keys.select_nth_unstable(control_max as usize);
            control_tau = nth;
        }
        let mut tau = self.state.tau;
        let mut rows_left = self.rows.len() as u64;
        let mut bytes_left = self.live_bytes;
        let mut below = Vec::new();
        for m in &self.rows {
            let key = eviction_key(seed, m.seq);
            if key >= if m.control { control_tau } else { tau } {
                rows_left -= 1;
                bytes_left -= m.len as u64;
            } else if !m.control {
                below.push((key, m.len));
            }
        }
        if rows_left > max_rows || bytes_left > max_bytes {
            below.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
            for (key, len) in below {
                if rows_left <= max_rows && bytes_left <= max_bytes {
                    break;
                }
                rows_left -= 1;
                bytes_left -= len as u64;
                tau = key;
            }
        }
        let rule = StoreState {
            tau,
            evict_through: through,
            control_tau,
            control_through: last.max(self.state.control_through),
            ..self.state.clone()
        };
        let evict: Vec<bool> = self
            .rows
            .iter()
            .map(|m| rule.is_evicted(m.seq, m.control))
            .collect();
        let count = evict.iter().filter(|&&e| e).count() as u64;
        if count == 0 {
            return Ok(EvictionReport::default());
        }
        self.state = StoreState {
            evicted_total: self.state.evicted_total + count,
            ..rule
        };
        self.state.save(&self.dir.join("state.bin"))?;

        let old = std::mem::take(&mut self.rows);
        self.train.clear();
        self.control_rows = 0;
        self.live_bytes = 0;
        self.source_rows.iter_mut().for_each(|n| *n = 0);
        self.kind_rows = [0; 2];
        for (m, gone) in old.into_iter().zip(evict) {
            if gone {
                if let Some(set) = self.partial.get_mut(&m.file) {
                    set.remove(&m.row);
                }
                let seg = self.segments.get_mut(&m.segment).expect("segment of a row");
                seg.live_bytes -= m.len as u64;
                seg.dead_bytes += m.len as u64;
                seg.live_rows -= 1;
            } else {
                self.index_row(m);
            }
        }
        let mut report = self.compact()?;
        report.evicted = count;
        Ok(report)
    }

    /// Reclaim the space of evicted rows: delete segments with no live row, rewrite
    /// those whose dead bytes are at least a quarter of their record bytes.
    fn compact(&mut self) -> Result<EvictionReport, StoreError> {
        let mut report = EvictionReport::default();
        let busy = !self.pending.is_empty() || !self.marks.is_empty();
        let ids: Vec<u32> = self
            .segments
            .iter()
            .filter(|(_, s)| {
                s.dead_bytes > 0
                    && (s.live_rows == 0 || s.dead_bytes * 4 >= s.dead_bytes + s.live_bytes)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let is_active = self.active.as_ref().is_some_and(|a| a.id == id);
            if (is_active && busy) || self.marks.iter().any(|m| m.id == id) {
                continue;
            }
            let dead = self.segments[&id].dead_bytes;
            if self.segments[&id].live_rows == 0 && !is_active {
                let seg = self.segments.remove(&id).expect("listed");
                fs::remove_file(&seg.path)
                    .map_err(|e| self.io_err("remove empty segment", &seg.path, e))?;
                report.segments_removed += 1;
                report.bytes_reclaimed += dead;
                continue;
            }
            self.rewrite_segment(id, is_active)?;
            report.segments_rewritten += 1;
            report.bytes_reclaimed += dead;
        }
        if report.segments_removed > 0 || report.segments_rewritten > 0 {
            fsync_dir(&self.dir)
                .map_err(|e| self.io_err("fsync replay directory", &self.dir, e))?;
        }
        Ok(report)
    }

    fn rewrite_segment(&mut self, id: u32, is_active: bool) -> Result<(), StoreError> {
        let path = self.segments[&id].path.clone();
        if is_active {
            let a = self.active.take().expect("active");
            let mut w = a.writer;
            w.flush()
                .map_err(|e| self.io_err("write segment", &path, e))?;
        }
        let old = fs::read(&path).map_err(|e| self.io_err("read segment", &path, e))?;
        let lo = self.rows.partition_point(|m| m.segment < id);
        let hi = self.rows.partition_point(|m| m.segment <= id);
        let mut out = segment_header().to_vec();
        for m in &mut self.rows[lo..hi] {
            let start = m.offset as usize;
            let frame = &old[start..start + m.len as usize];
            m.offset = out.len() as u64;
            out.extend_from_slice(frame);
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fsync_dir(&self.dir)
        };
        write().map_err(|e| self.io_err("rewrite segment", &path, e))?;
        let reader = File::open(&path).map_err(|e| self.io_err("open segment", &path, e))?;
        let seg = self.segments.get_mut(&id).expect("segment");
        seg.reader = reader;
        seg.dead_bytes = 0;
        if is_active {
            let f = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| self.io_err("open segment for append", &path, e))?;
            self.active = Some(Active {
                id,
                writer: BufWriter::with_capacity(1 << 20, f),
                len: out.len() as u64,
            });
        }
        Ok(())
    }
}
