//! The command line of `mbtd ctl` (clap), one subcommand per admin request.

use std::path::PathBuf;

use clap::{Args, Subcommand};

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
    /// Branch hosts of a coordinator: identity, address, branches, up/late/down, round-trip
    /// p50/p99, last step answered, bytes in/out.
    Nodes,
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
        /// Ask the model as of this time (RFC 3339, e.g. 2024-03-01T12:00:00Z; default: now):
        /// with `model.time_embedding = "time2vec"` the prompt and reply get this time.
        #[arg(long)]
        as_of: Option<String>,
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
    /// Write a checkpoint now (`checkpoint delete ID|TAG` deletes instead).
    #[command(args_conflicts_with_subcommands = true)]
    Checkpoint {
        /// Operator tag: 1 to 64 of A-Z a-z 0-9 . _ - (kept until deleted or
        /// checkpoints.keep_tagged).
        #[arg(long)]
        tag: Option<String>,
        #[command(subcommand)]
        action: Option<CheckpointAction>,
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

/// `mbtd ctl checkpoint <action>`.
#[derive(Debug, Subcommand)]
pub enum CheckpointAction {
    /// Delete the checkpoint with this id, or every checkpoint with this tag (never LATEST,
    /// its parent, or the pre-expansion checkpoint of an undecided expansion).
    Delete {
        /// A checkpoint id or tag.
        target: String,
    },
}
