//! `mbtd bench ingest`: throughput of [`process_file`] from file arrival to durable
//! append (hash, parse, append, fsync, journal, sidecar, move).

use std::path::PathBuf;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{IngestConfig, IngestError, process_file};
use crate::store::{ReplayConfig, ReplayStore};

/// Options of `mbtd bench ingest`.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct BenchIngestArgs {
    /// Number of CSV files to generate and ingest.
    #[arg(long, default_value_t = 4)]
    pub files: usize,
    /// Size of each file in MiB.
    #[arg(long, default_value_t = 32)]
    pub mib_per_file: u64,
    /// Average bytes of text per row.
    #[arg(long, default_value_t = 200)]
    pub row_bytes: usize,
    /// Generate prompt/response rows instead of text rows.
    #[arg(long)]
    pub prompt_response: bool,
    /// Work directory (default: a fresh directory under the system temp dir, removed
    /// afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the generated text.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl Default for BenchIngestArgs {
    fn default() -> Self {
        BenchIngestArgs {
            files: 4,
            mib_per_file: 32,
            row_bytes: 200,
            prompt_response: false,
            dir: None,
            seed: 7,
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "branch",
    "learns",
    "from",
    "text",
    "dropped",
    "into",
    "an",
    "inbox",
    "while",
    "replay",
    "keeps",
    "a",
    "sample",
    "of",
    "history",
    "and",
    "every",
    "row",
    "counts",
    "once",
    "quote\"d",
    "comma,",
    "naïve",
    "données",
    "über",
    "line\nbreak",
];

fn sentence(rng: &mut ChaCha8Rng, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

/// Generate one CSV file of about `target` bytes; returns its row count.
fn generate(
    path: &std::path::Path,
    target: u64,
    opts: &BenchIngestArgs,
    rng: &mut ChaCha8Rng,
) -> csv::Result<u64> {
    let mut w = csv::Writer::from_path(path)?;
    let header: &[&str] = if opts.prompt_response {
        &["prompt", "response", "source"]
    } else {
        &["text", "source"]
    };
    w.write_record(header)?;
    let mut rows = 0u64;
    let mut bytes = 0u64;
    while bytes < target {
        let len = rng.random_range(opts.row_bytes / 2..=opts.row_bytes * 3 / 2);
        let src = format!("bench{}", rows % 4);
        if opts.prompt_response {
            let p = sentence(rng, len / 3);
            let r = sentence(rng, len - len / 3);
            bytes += (p.len() + r.len() + src.len() + 4) as u64;
            w.write_record([&p, &r, &src])?;
        } else {
            let t = sentence(rng, len);
            bytes += (t.len() + src.len() + 3) as u64;
            w.write_record([&t, &src])?;
        }
        rows += 1;
    }
    w.flush()?;
    Ok(rows)
}

/// CPU time (user + system) of the calling thread, seconds. On a shared machine the
/// wall-clock rate depends on the other load; the rate per CPU second much less.
fn thread_cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer it is given; the buffer is
    // zero-initialised and properly sized, and RUSAGE_THREAD is valid on Linux.
    let ru = unsafe {
        if libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) != 0 {
            return 0.0;
        }
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Run the benchmark; returns one JSON object with MB/s (wall clock, from arrival in
/// the inbox to the file's sidecar and move), rows/s, MB per CPU second, and a
/// per-phase breakdown.
pub fn bench_ingest(opts: &BenchIngestArgs) -> Result<serde_json::Value, IngestError> {
    if opts.files == 0 || opts.mib_per_file == 0 || opts.row_bytes < 8 {
        return Err(IngestError::Config(
            "bench ingest: --files and --mib-per-file must be >= 1 and --row-bytes >= 8".into(),
        ));
    }
    let (root, remove) = match &opts.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "mbtd-bench-ingest-{}-{}",
                std::process::id(),
                crate::store::fsutil::now_ms()
            )),
            true,
        ),
    };
    let io = |what: &str, p: &std::path::Path| {
        let what = what.to_string();
        let path = p.to_path_buf();
        move |source| IngestError::Io { what, path, source }
    };
    let staging = root.join("staging");
    let inbox = root.join("inbox");
    let replay = root.join("replay");
    for d in [&staging, &inbox] {
        std::fs::create_dir_all(d).map_err(io("create directory", d))?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut gen_rows = 0;
    let mut names = Vec::new();
    for i in 0..opts.files {
        let name = format!("bench-{i:04}.csv");
        let p = staging.join(&name);
        gen_rows += generate(&p, opts.mib_per_file << 20, opts, &mut rng)
            .map_err(|e| io("generate", &p)(std::io::Error::other(e)))?;
        names.push(name);
    }
    let cfg = IngestConfig {
        max_file_bytes: (opts.mib_per_file << 20) * 2 + (1 << 20),
        ..Default::default()
    };
    let (mut store, _) = ReplayStore::open(&replay, &ReplayConfig::default())
        .map_err(|source| IngestError::Store { source })?;
    let mut per_file_ms = Vec::new();
    let (mut bytes, mut rows) = (0u64, 0u64);
    let mut phases = super::Timings::default();
    let started = Instant::now();
    let cpu_started = thread_cpu_seconds();
    for name in &names {
        let arrived = inbox.join(name);
        std::fs::rename(staging.join(name), &arrived).map_err(io("move into inbox", &arrived))?;
        let t = Instant::now();
        let out = process_file(&inbox, &arrived, &mut store, &cfg)?;
        per_file_ms.push(t.elapsed().as_secs_f64() * 1e3);
        bytes += out.bytes;
        rows += out.rows_appended;
        phases.hash_us += out.timings.hash_us;
        phases.ingest_us += out.timings.ingest_us;
        phases.commit_us += out.timings.commit_us;
        phases.finish_us += out.timings.finish_us;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_secs = thread_cpu_seconds() - cpu_started;
    let stats = store.stats();
    drop(store);
    if remove {
        std::fs::remove_dir_all(&root).map_err(io("remove bench directory", &root))?;
    }
    per_file_ms.sort_by(f64::total_cmp);
    Ok(json!({
        "bench": "ingest",
        "files": opts.files,
        "bytes": bytes,
        "rows": rows,
        "rows_generated": gen_rows,
        "seconds": secs,
        "mb_per_s": bytes as f64 / 1e6 / secs,
        "mib_per_s": bytes as f64 / (1u64 << 20) as f64 / secs,
        "rows_per_s": rows as f64 / secs,
        "cpu_seconds": cpu_secs,
        "mb_per_cpu_s": bytes as f64 / 1e6 / cpu_secs,
        "file_ms_min": per_file_ms.first(),
        "file_ms_median": per_file_ms[per_file_ms.len() / 2],
        "file_ms_max": per_file_ms.last(),
        "hash_ms_total": phases.hash_us as f64 / 1e3,
        "parse_append_ms_total": (phases.ingest_us - phases.commit_us) as f64 / 1e3,
        "commit_fsync_ms_total": phases.commit_us as f64 / 1e3,
        "sidecar_move_ms_total": phases.finish_us as f64 / 1e3,
        "replay_bytes": stats.bytes,
        "replay_segments": stats.segments,
        "prompt_response": opts.prompt_response,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_ingests_every_generated_row() {
        let dir = tempfile::tempdir().unwrap();
        let opts = BenchIngestArgs {
            files: 2,
            mib_per_file: 1,
            row_bytes: 100,
            dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let v = bench_ingest(&opts).unwrap();
        assert_eq!(v["rows"], v["rows_generated"]);
        assert!(v["rows"].as_u64().unwrap() > 5000);
        assert!(v["mb_per_s"].as_f64().unwrap() > 0.0);
        let failed = dir.path().join("inbox/.failed");
        assert!(!failed.exists());
    }
}
