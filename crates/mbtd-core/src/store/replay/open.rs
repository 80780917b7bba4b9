//! Opening the store: crash recovery (torn tails, corrupt records, stale temporary
//! files) and the in-memory index.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::path::Path;

use super::report::{CorruptRegion, RecoveryReport, TornTail};
use super::{Active, ReplayStore, RowMeta, Segment, is_control, parse_segment_name, segment_name};
use crate::config::Section;
use crate::store::format::{HEADER_LEN, HeaderCheck, check_header, scan_segment, segment_header};
use crate::store::fsutil::fsync_dir;
use crate::store::journal::Journal;
use crate::store::state::StoreState;
use crate::store::{ReplayConfig, StoreError};

impl ReplayStore {
    /// Open (or create) the store in `dir`, recovering from any crash: torn tails are
    /// truncated, corrupt records skipped, leftover temporary files removed. The report
    /// says what was found.
    pub fn open(
        dir: &Path,
        cfg: &ReplayConfig,
    ) -> Result<(ReplayStore, RecoveryReport), StoreError> {
        cfg.validate().map_err(StoreError::Config)?;
        let io = |what: &str, path: &Path| {
            let what = what.to_string();
            let path = path.to_path_buf();
            move |source| StoreError::Io { what, path, source }
        };
        fs::create_dir_all(dir).map_err(io("create replay directory", dir))?;
        let mut report = RecoveryReport::default();

        let mut segment_ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(io("list replay directory", dir))? {
            let entry = entry.map_err(io("list replay directory", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                fs::remove_file(entry.path())
                    .map_err(io("remove stale temp file", &entry.path()))?;
                report.stale_temp_files += 1;
            } else if let Some(id) = parse_segment_name(&name) {
                segment_ids.push(id);
            }
        }
        segment_ids.sort_unstable();
        if report.stale_temp_files > 0 {
            fsync_dir(dir).map_err(io("fsync replay directory", dir))?;
        }

        let state_path = dir.join("state.bin");
        let state = if state_path.exists() {
            let bytes = fs::read(&state_path).map_err(io("read store state", &state_path))?;
            let s = StoreState::decode(&state_path, &bytes)?;
            if s.seed != cfg.seed || s.control_fraction != cfg.control_fraction {
                report.notes.push(format!(
                    "the store was created with seed {} and control_fraction {}; those stay in force (config has {} and {})",
                    s.seed, s.control_fraction, cfg.seed, cfg.control_fraction
                ));
            }
            s
        } else {
            let s = StoreState::new(cfg.seed, cfg.control_fraction);
            s.save(&state_path)?;
            s
        };
        let (journal, jscan) = Journal::open(dir)?;
        report.journal = jscan;

        let mut store = ReplayStore {
            dir: dir.to_path_buf(),
            cfg: cfg.clone(),
            state,
            journal,
            segments: BTreeMap::new(),
            next_segment: segment_ids.last().map_or(1, |l| l + 1),
            active: None,
            rows: Vec::new(),
            train: Vec::new(),
            pending: Vec::new(),
            sources: Vec::new(),
            source_ids: HashMap::new(),
            source_rows: Vec::new(),
            kind_rows: [0; 2],
            files: Vec::new(),
            file_ids: HashMap::new(),
            partial: HashMap::new(),
            cur_file: None,
            marks: Vec::new(),
            rollback_due: false,
            unjournaled: HashMap::new(),
            epoch: super::NEXT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            live_bytes: 0,
            control_rows: 0,
            buf: Vec::new(),
        };

        let mut min_seq = 1u64;
        let last_id = segment_ids.last().copied();
        for id in segment_ids {
            let name = segment_name(id);
            let path = dir.join(&name);
            let is_last = Some(id) == last_id;
            let mut bytes = fs::read(&path).map_err(io("read segment", &path))?;
            // a version-1 segment is read, never appended to: new rows go to a new segment
            let appendable = match check_header(&bytes) {
                HeaderCheck::Ok => true,
                HeaderCheck::V1 => false,
                HeaderCheck::Short if is_last => {
                    report.truncated.push(TornTail {
                        segment: name.clone(),
                        offset: 0,
                        bytes: bytes.len() as u64,
                    });
                    bytes = segment_header().to_vec();
                    fs::write(&path, &bytes).map_err(io("rewrite torn segment header", &path))?;
                    File::open(&path)
                        .and_then(|f| f.sync_all())
                        .map_err(io("fsync segment", &path))?;
                    true
                }
                HeaderCheck::Short | HeaderCheck::Corrupt => {
                    report.skipped_segments.push((
                        name,
                        "bad segment header (magic or checksum); move the file away after inspecting it".into(),
                    ));
                    continue;
                }
                HeaderCheck::Version(v) => {
                    report.skipped_segments.push((
                        name,
                        format!(
                            "segment format version {v}, this build reads versions 1 and 2; open the store with the build that wrote it"
                        ),
                    ));
                    continue;
                }
            };
            let scan = scan_segment(&bytes, min_seq);
            for (offset, n) in &scan.corrupt {
                report.corrupt.push(CorruptRegion {
                    segment: name.clone(),
                    offset: *offset,
                    bytes: *n,
                });
            }
            if scan.tail_bytes > 0 {
                if is_last {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io("open segment", &path))?;
                    f.set_len(scan.valid_end)
                        .map_err(io("truncate torn tail", &path))?;
                    f.sync_all().map_err(io("fsync segment", &path))?;
                    report.truncated.push(TornTail {
                        segment: name.clone(),
                        offset: scan.valid_end,
                        bytes: scan.tail_bytes,
                    });
                } else {
                    report.corrupt.push(CorruptRegion {
                        segment: name.clone(),
                        offset: scan.valid_end,
                        bytes: scan.tail_bytes,
                    });
                }
            }
            let reader = File::open(&path).map_err(io("open segment", &path))?;
            let mut seg = Segment {
                path: path.clone(),
                reader,
                live_bytes: 0,
                dead_bytes: 0,
                live_rows: 0,
            };
            for s in scan.records {
                min_seq = s.record.seq + 1;
                let control = is_control(store.state.control_fraction, &s.record.body);
                if store.state.is_evicted(s.record.seq, control) {
                    seg.dead_bytes += s.frame_len as u64;
                    report.evicted_on_disk += 1;
                    continue;
                }
                let meta = RowMeta {
                    seq: s.record.seq,
                    offset: s.offset,
                    row: s.record.row,
                    len: s.frame_len,
                    segment: id,
                    source: store.intern_source(&s.record.source),
                    file: store.intern_file(&s.record.file_hash),
                    kind: s.record.body.kind(),
                    control,
                };
                seg.live_bytes += meta.len as u64;
                seg.live_rows += 1;
                if store.journal.get(&s.record.file_hash).is_none() {
                    store.partial.entry(meta.file).or_default().insert(meta.row);
                }
                store.index_row(meta);
            }
            store.segments.insert(id, seg);
            if is_last && appendable {
                let len = scan.valid_end.max(HEADER_LEN);
                if len < store.cfg.segment_bytes {
                    let f = OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .map_err(io("open segment for append", &path))?;
                    store.active = Some(Active {
                        id,
                        writer: BufWriter::with_capacity(1 << 20, f),
                        len,
                    });
                }
            }
        }
        store.state.next_seq = store.state.next_seq.max(min_seq);
        report.segments = store.segments.len();
        report.rows = store.rows.len() as u64;
        Ok((store, report))
    }
}
