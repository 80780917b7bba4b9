//! The command line (clap derive): `run`, `config`, `ctl`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mbtd",
    version,
    about = "A daemon that continuously trains a Multi-Branch Transformer language model on text dropped into an inbox"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd runs it this way).
    Run(RunArgs),
    /// Validate or print configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Control a running daemon over its admin socket.
    Ctl(CtlArgs),
    /// Look at on-disk state offline (works with the daemon stopped).
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Benchmarks; each prints one JSON line.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The daemon on ./mbtd-demo with a producer, a live view and every feature exercised.
    Demo(crate::demo::DemoArgs),
    /// PNG plots of a data dir's metrics history and checkpoints (to <data-dir>/report/).
    Report(crate::report::ReportArgs),
}

#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// Counts by source and kind, segments, control rows; verifies every record's CRC.
    Replay {
        #[arg(long, default_value = ".")]
        data_dir: PathBuf,
        /// Configuration file (to find the replay directory).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Verifies a checkpoint directory's hashes and prints its manifest summary.
    Checkpoint {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Training throughput of the MBT-LM benchmark preset.
    Train(crate::model::bench::TrainBenchArgs),
    /// KV-cache generation throughput at batch 1.
    Generate(crate::model::bench::GenerateBenchArgs),
    /// Ingestion throughput: file arrival to durable append.
    Ingest(crate::ingest::BenchIngestArgs),
    /// Control loss with branches removed, after training with availability p = 1 … 0.5.
    Outage(crate::learn::outage_bench::OutageBenchArgs),
    /// Forgetting of task A after task B, with replay shares 0 / 0.25 / 0.5.
    Continual(crate::learn::cl_bench::ContinualBenchArgs),
    /// The daemon for N minutes under a steady inbox stream: RSS, descriptors, step times.
    Soak(crate::soak::SoakArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (default: the embedded default, see `mbtd config default`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory that holds inbox/, replay/, checkpoints/ and the socket (relative paths in
    /// the config resolve against it).
    #[arg(long, default_value = ".")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE and print the effective configuration.
    Check {
        file: PathBuf,
        /// Data dir used to resolve relative paths in the printed configuration.
        #[arg(long, default_value = ".")]
        data_dir: PathBuf,
    },
    /// Print the embedded default configuration (every key commented).
    Default,
    /// Print the small configuration the tests and scripted benchmarks use (a d 32,
    /// 2 × 2-branch model), with `--set section.key=value` overrides applied.
    Small {
        /// An override such as `training.batch_size=4` (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin socket (default: admin.socket of --config, resolved against --data-dir).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Configuration file the daemon was started with (to find its socket).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[arg(long, global = true, default_value = ".")]
    pub data_dir: PathBuf,
    /// Print the raw JSON response instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Version, uptime, pid and the state of every actor.
    Status,
    /// Check that the daemon answers.
    Ping,
    /// Every metric's current value.
    Metrics,
    /// Stop the daemon in order (as SIGTERM does).
    Shutdown,
    /// Stop taking files from the inbox (files wait there).
    PauseIngest,
    /// Take files from the inbox again.
    ResumeIngest,
    /// Pause training (the daemon keeps ingesting).
    Pause,
    /// Resume training.
    Resume,
    /// Force an outage of one branch (it is not computed or trained until unmasked).
    Mask {
        #[arg(long)]
        layer: usize,
        #[arg(long)]
        branch: usize,
    },
    /// Lift a forced outage.
    Unmask {
        #[arg(long)]
        layer: usize,
        #[arg(long)]
        branch: usize,
    },
    /// Evaluate on the held-out control slice now (old/new era, per source, single-branch outages).
    Eval,
    /// Per-layer table: alpha, energies, starvation, effective paths, participation.
    Diagnostics,
    /// The expansion governor: expansion in progress, cool-downs, back-offs, recent decisions.
    Governor,
    /// Generate text from a prompt, streamed as it is produced.
    Generate {
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Answer the prompt as an instruction row is trained (prompt, then the response
        /// token), instead of continuing it as text.
        #[arg(long)]
        respond: bool,
    },
    /// Add branches to a layer (pre-expand checkpoint, eta ramps from 0 to beta, then the
    /// governor's probation keeps it or rolls it back).
    Expand {
        #[arg(long)]
        layer: usize,
        #[arg(long)]
        branches: usize,
        /// Injection rate the new branches reach (default: governor.beta).
        #[arg(long)]
        beta: Option<f64>,
        /// Steps of the linear eta ramp (default: governor.ramp_steps).
        #[arg(long)]
        ramp_steps: Option<u64>,
        /// Standard deviation of the noise added to the copied weights.
        #[arg(long, default_value_t = 1e-3)]
        noise: f64,
    },
    /// Write a checkpoint now.
    Checkpoint {
        #[arg(long)]
        tag: Option<String>,
    },
    /// List checkpoints.
    Checkpoints,
    /// Restore a checkpoint exactly (weights, optimizer, widths, RNG, step); replay data stays.
    Rollback {
        /// A checkpoint id, a tag, or `previous`.
        target: String,
    },
    /// Make an actor panic (test builds with the fault-injection feature only).
    #[cfg(feature = "fault-injection")]
    #[command(hide = true)]
    DebugCrash {
        #[arg(long)]
        actor: String,
    },
}
