//! Model-core benchmarks: `cargo run --release --example bench_model -- train|generate [opts]`.
//! Prints one JSON object per run.

use clap::{Parser, Subcommand};
use mbtd::model::bench::{GenerateBenchArgs, TrainBenchArgs, bench_generate, bench_train};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Training-step throughput.
    Train(TrainBenchArgs),
    /// Batch-1 KV-cache generation throughput.
    Generate(GenerateBenchArgs),
}

fn main() -> anyhow::Result<()> {
    let out = match Cli::parse().cmd {
        Cmd::Train(a) => bench_train(&a)?,
        Cmd::Generate(a) => bench_generate(&a)?,
    };
    println!("{out}");
    Ok(())
}
