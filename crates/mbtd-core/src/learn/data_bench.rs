//! `mbtd bench train --data FILE.csv`: training throughput on the rows of a real CSV,
//! batched as the daemon's trainer batches new rows ([`super::mix`]: packed, or one row per
//! padded window with `--packing false`), beside the synthetic full windows of
//! [`crate::model::bench::bench_train`].
//!
//! The tokenizer is trained as the daemon bootstraps it (the first
//! `tokenizer.bootstrap_rows` rows, the preset's vocabulary); the batches are made before
//! the clock starts, so the figures are the training steps'. Reported: `real_tokens_per_sec`
//! (input tokens that are text, per second of training step), `tokens_per_sec` (positions
//! computed per second, padding included: the synthetic benchmark's measure) and
//! `position_utilization` = real tokens / positions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};

use super::TokenizerSection;
use super::config::TrainingConfig;
use super::mix::{NewWindows, StepInputs};
use crate::model::bench::{
    TrainBenchArgs, bench_trainer, cpu_seconds, machine_idle_share, peak_rss_kib,
};
use crate::model::{Batch, ModelError};
use crate::store::format::Record;
use crate::text::csv_rows::{CsvError, CsvRowReader, RowBody};
use crate::text::tokenizer::{Tokenizer, TokenizerError};

/// Why `bench train --data` could not run.
#[derive(Debug, thiserror::Error)]
pub enum DataBenchError {
    #[error("bench train --data {}: cannot open it: {source}; give a readable CSV file", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bench train --data: {0}")]
    Csv(#[from] CsvError),
    #[error(
        "bench train --data {}: no row gives a training window (of {rejected} rows, all rejected or one token long); give a CSV with a `text` column or `prompt`,`response` columns",
        path.display()
    )]
    NoRows { path: PathBuf, rejected: usize },
    #[error("bench train --data: tokenizer training on the first rows failed: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("bench train --data: {0}")]
    Model(#[from] ModelError),
}

/// The accepted rows of `path` as the store would hold them (sequence numbers from 1), and
/// the number of rejected rows.
fn read_rows(path: &Path) -> Result<(Vec<Record>, usize), DataBenchError> {
    let file = std::fs::File::open(path).map_err(|source| DataBenchError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.display().to_string();
    let stem = path
        .file_stem()
        .map_or("data".into(), |s| s.to_string_lossy().into_owned());
    let mut reader = CsvRowReader::new(file, &name, &stem, 1 << 20)?;
    let (mut rows, mut rejected) = (Vec::new(), 0);
    while let Some(r) = reader.next_row()? {
        match r {
            Ok(row) => rows.push(Record {
                seq: rows.len() as u64 + 1,
                ingest_ms: 0,
                time_ms: row.time_ms,
                row: row.line,
                file_hash: [0; 32],
                source: row.source,
                body: row.body,
            }),
            Err(_) => rejected += 1,
        }
    }
    Ok((rows, rejected))
}

/// The batches of `n` steps with their real (text) tokens: the daemon's steps over the
/// rows' new pieces (no replay), the rows queued again whenever all were trained.
fn batches(tok: &Tokenizer, rows: &[Record], tc: &TrainingConfig, n: usize) -> Vec<(Batch, usize)> {
    let mut q = NewWindows::new(0, None, &[]);
    let mut out = Vec::with_capacity(n);
    for t in 0..n as u64 {
        if q.is_empty() {
            q = NewWindows::new(0, None, &[]);
            q.push_rows(tok, rows, tc.seq_len);
        }
        let inputs = StepInputs {
            tok,
            replay_rows: &[],
            history: false,
            tc,
            seed: t,
        };
        let mix = if tc.packing {
            q.take_packed_step(inputs, |_| Ok::<_, ()>(Vec::new()))
                .unwrap_or_else(|()| unreachable!("no replay rounds without history"))
        } else {
            q.take_step(inputs)
        };
        out.push((mix.batch(tc.seq_len, tok.eot_id()), mix.real_tokens()));
    }
    out
}

/// Training throughput on the rows of `data` (see the module doc).
pub fn bench_train_data(opts: &TrainBenchArgs, data: &Path) -> Result<Value, DataBenchError> {
    if opts.steps == 0 || !(0.0..=1.0).contains(&opts.p_active) {
        return Err(ModelError::Config(format!(
            "bench: steps = {} must be >= 1 and p_active = {} in [0, 1]",
            opts.steps, opts.p_active
        ))
        .into());
    }
    let cfg = opts.model_config();
    let (rows, rejected) = read_rows(data)?;
    let ts = TokenizerSection::default();
    let texts = rows.iter().take(ts.bootstrap_rows).map(|r| match &r.body {
        RowBody::Text { text } => text.clone(),
        RowBody::PromptResponse { prompt, response } => format!("{prompt} {response}"),
    });
    let tok = Tokenizer::train(texts, cfg.vocab_size, ts.min_frequency)?;
    let tc = TrainingConfig {
        batch_size: opts.batch,
        seq_len: opts.seq,
        packing: opts.packing,
        ..TrainingConfig::default()
    };
    let mut probe = NewWindows::new(0, None, &[]);
    probe.push_rows(&tok, &rows, tc.seq_len);
    if probe.is_empty() {
        return Err(DataBenchError::NoRows {
            path: data.to_path_buf(),
            rejected: rejected + rows.len(),
        });
    }
    let batches = batches(&tok, &rows, &tc, opts.warmup + opts.steps);
    crate::model::bench::pool(opts.threads)?.install(|| {
        let (mut trainer, mut avail, params) = bench_trainer(&cfg, opts)?;
        let (mut secs, mut real, mut positions, mut cpu0) = (0.0, 0usize, 0usize, 0.0);
        let mut loss = 0.0;
        for (s, (batch, n_real)) in batches.iter().enumerate() {
            if s == opts.warmup {
                cpu0 = cpu_seconds();
            }
            let masks = avail.draw();
            let scales = avail.scales(trainer.optim().max_scale);
            let t0 = Instant::now();
            let r = trainer.train_step(batch, &masks, &scales)?;
            if s >= opts.warmup {
                secs += t0.elapsed().as_secs_f64();
                real += n_real;
                positions += batch.batch * batch.seq;
                loss = r.loss;
            }
        }
        Ok(opts.report(json!({
            "data": data.display().to_string(),
            "rows": rows.len(),
            "rows_rejected": rejected,
            "packing": opts.packing,
            "params": params,
            "real_tokens_per_sec": real as f64 / secs,
            "tokens_per_sec": positions as f64 / secs,
            "position_utilization": real as f64 / positions as f64,
            "real_tokens_per_step": real as f64 / opts.steps as f64,
            "step_ms_mean": secs * 1e3 / opts.steps as f64,
            "cpu_ms_per_step": (cpu_seconds() - cpu0) * 1e3 / opts.steps as f64,
            "machine_idle_share_after": machine_idle_share(500),
            "final_loss": loss,
            "peak_rss_kib": peak_rss_kib(),
        })))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Precision;
    use crate::model::bench::BenchPreset;

    fn args(packing: bool) -> TrainBenchArgs {
        TrainBenchArgs {
            preset: BenchPreset::Small,
            steps: 2,
            warmup: 0,
            threads: 1,
            batch: 4,
            seq: 64,
            packing,
            ..TrainBenchArgs::default()
        }
    }

    #[test]
    fn short_rows_fill_packed_windows_and_not_unpacked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("short.csv");
        let mut s = String::from("text\n");
        for i in 0..300 {
            s.push_str(&format!("quote {i}: a short line of text\n"));
        }
        std::fs::write(&csv, s).unwrap();
        let packed = bench_train_data(&args(true), &csv).unwrap();
        let unpacked = bench_train_data(&args(false), &csv).unwrap();
        let util = |v: &Value| v["position_utilization"].as_f64().unwrap();
        assert_eq!(packed["rows"], 300);
        assert!(util(&packed) >= 0.95, "{packed}");
        assert!(util(&unpacked) < 0.5, "{unpacked}");
        let real = |v: &Value| v["real_tokens_per_step"].as_f64().unwrap();
        assert!(real(&packed) > 2.0 * real(&unpacked), "{packed} {unpacked}");
    }

    /// `--precision` reaches the model (it was reported but not applied).
    #[test]
    fn the_precision_option_trains_in_that_precision() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("short.csv");
        let mut s = String::from("text\n");
        for i in 0..200 {
            s.push_str(&format!("line {i}: some words to learn from\n"));
        }
        std::fs::write(&csv, s).unwrap();
        let run = |precision| {
            let opts = TrainBenchArgs {
                precision,
                ..args(true)
            };
            bench_train_data(&opts, &csv).unwrap()
        };
        let (f32_run, bf16_run) = (run(Precision::F32), run(Precision::Bf16));
        assert_eq!(bf16_run["precision"], "bf16");
        let loss = |v: &Value| v["final_loss"].as_f64().unwrap();
        assert!(loss(&f32_run) != loss(&bf16_run), "{f32_run} {bf16_run}");
        let close = (loss(&f32_run) - loss(&bf16_run)).abs() < 0.05 * loss(&f32_run);
        assert!(close, "{f32_run} {bf16_run}");
    }

    #[test]
    fn a_csv_without_text_columns_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("bad.csv");
        std::fs::write(&csv, "a,b\n1,2\n").unwrap();
        let e = bench_train_data(&args(true), &csv).unwrap_err().to_string();
        assert!(e.contains("text") && e.contains("bad.csv"), "{e}");
        let missing = dir.path().join("missing.csv");
        let e = bench_train_data(&args(true), &missing)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.csv") && e.contains("cannot open"),
            "{e}"
        );
    }
}
