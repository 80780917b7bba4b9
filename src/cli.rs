//! The command line (clap derive): `run`, `config`, `ctl`, `chat`, …

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::ctl::{CtlArgs, CtlCommand};

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
    /// Chat with the running daemon's model (streamed replies, templates, stop sequences,
    /// /save and /load of the conversation as an inbox CSV).
    Chat(crate::chat::ChatArgs),
    /// Host branches for a coordinator on another machine (see README, "Running on
    /// several machines").
    Node(crate::cluster::node::NodeArgs),
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
    /// The matrix products of one training step, each timed alone (GFLOP/s).
    Products(crate::model::products_bench::ProductsBenchArgs),
    /// Ingestion throughput: file arrival to durable append.
    Ingest(crate::ingest::BenchIngestArgs),
    /// Control loss with branches removed, after training with availability p = 1 … 0.5.
    Outage(crate::learn::outage_bench::OutageBenchArgs),
    /// Forgetting of task A after task B, with replay shares 0 / 0.25 / 0.5.
    Continual(crate::learn::cl_bench::ContinualBenchArgs),
    /// One process vs a coordinator with `mbtd node` processes on loopback: tokens/s,
    /// bytes per step, network wait, bitwise equality of the results.
    Cluster(crate::cluster::bench::ClusterBenchArgs),
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
    /// When the config's `model.*` differs from the checkpoint this data dir resumes from,
    /// run with the checkpoint's architecture instead of refusing to start.
    #[arg(long)]
    pub accept_checkpoint_model: bool,
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
