//! `mbtd demo`: the real daemon on a fresh `./mbtd-demo/` with a small embedded config, a
//! producer dropping CSV files (synthetic tasks in phases, or `--real-text FILE.csv`), a live
//! view, and the features exercised through real `ctl` requests: an outage, an expansion, a
//! checkpoint, a rollback, `generate` on a prompt of each task. Then an ordered stop, the
//! report's plots and a summary.

pub mod actions;
pub mod producer;
pub mod progress;
pub mod run;
pub mod summary;
pub mod timeline;

use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, ConfigError};

/// The demo's configuration (a small model that learns within minutes on 2 cores).
pub const DEMO_TOML: &str = include_str!("../../config/demo.toml");

/// The embedded demo configuration, validated like any config file.
pub fn demo_config() -> Result<Config, ConfigError> {
    Config::from_toml(DEMO_TOML, "embedded demo config (config/demo.toml)")
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the demo runs (fractions allowed, e.g. 0.5).
    #[arg(long, default_value_t = 3.0)]
    pub minutes: f64,
    /// The daemon's data dir; must be empty or absent (see --fresh). Left for inspection.
    #[arg(long, default_value = "mbtd-demo")]
    pub data_dir: PathBuf,
    /// Delete the data dir of an earlier demo first (only a directory `mbtd demo` made).
    #[arg(long)]
    pub fresh: bool,
    /// Feed this CSV file (a `text` column, or `prompt` and `response`) instead of the
    /// synthetic tasks, in chunks over the demo's duration.
    #[arg(long)]
    pub real_text: Option<PathBuf>,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid_small_and_keeps_a_fine_history() {
        let c = demo_config().unwrap();
        assert!(c.model.d_model <= 128 && c.model.n_layers <= 4);
        assert!(c.tokenizer.bootstrap_rows <= 1000);
        assert!(c.metrics.history_every_s >= 1 && c.metrics.history_every_s <= 2);
        assert!(c.eval.every_steps <= 500);
        assert!(
            !c.governor.enabled,
            "the demo's expansion is its own, not the governor's"
        );
    }
}
