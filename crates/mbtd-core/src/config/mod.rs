//! The daemon's configuration: a TOML file of `[sections]`. `config/mbtd.toml` is the
//! documented default, embedded in the binary so `mbtd run` works with no file, and parses
//! to [`Config::default`].
//!
//! Every section follows one pattern (see [`Section`]): a serde struct with
//! `#[serde(deny_unknown_fields, default)]`, its `Default` beside it, and
//! `Section::validate` reporting the first bad field as a [`FieldError`]. The daemon's own
//! sections are in `daemon.rs`; the others live beside the code they configure.
//!
//! Loading rules: unknown keys are an error naming the key and the file; a bad value names
//! the file, `section.field`, the value and what is allowed; relative paths resolve against
//! the data dir.

mod cluster;
mod daemon;
pub mod preset;
mod section;

use std::path::{Path, PathBuf};

pub use cluster::{ClusterConfig, NodeEntry, looks_like_peer_id, looks_like_tcp_multiaddr};
pub use daemon::{AdminConfig, DaemonConfig, LogFormat, LoggingConfig, MetricsConfig, PathsConfig};
pub use section::{FieldError, Section};

use serde::{Deserialize, Serialize};

use crate::learn::TrainingConfig;

/// The embedded default configuration (every key commented).
pub const DEFAULT_TOML: &str = include_str!("../../../../config/mbtd.toml");

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: invalid value for {error}")]
    Invalid { origin: String, error: FieldError },
    #[error("{origin}: invalid key `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub paths: PathsConfig,
    pub daemon: DaemonConfig,
    pub admin: AdminConfig,
    pub logging: LoggingConfig,
    pub metrics: MetricsConfig,
    pub ingest: crate::ingest::IngestConfig,
    pub replay: crate::store::ReplayConfig,
    pub model: crate::model::ModelConfig,
    pub optim: crate::model::OptimConfig,
    pub availability: crate::model::availability::AvailabilityConfig,
    pub tokenizer: crate::learn::TokenizerSection,
    pub training: TrainingConfig,
    pub eval: crate::learn::EvalConfig,
    pub checkpoints: crate::checkpoint::CheckpointConfig,
    pub governor: crate::govern::policy::GovernorConfig,
    /// Branches on other machines; absent: every branch in this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// Parses and validates TOML text; `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate().map_err(|error| ConfigError::Invalid {
            origin: origin.to_string(),
            error,
        })?;
        Ok(cfg)
    }

    /// Loads `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml(DEFAULT_TOML, "embedded default config"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::from_toml(&text, &p.display().to_string())
            }
        }
    }

    /// Checks every section in file order, then the rules between sections; the first bad
    /// field is reported.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.paths.validate()?;
        self.daemon.validate()?;
        self.admin.validate()?;
        self.logging.validate()?;
        self.metrics.validate()?;
        self.ingest.validate()?;
        self.replay.validate()?;
        self.model.validate()?;
        self.optim.validate()?;
        self.availability.validate()?;
        self.tokenizer.validate()?;
        self.training.validate()?;
        self.eval.validate()?;
        self.checkpoints.validate()?;
        self.governor.validate()?;
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        let max = self.model.max_seq_len;
        TrainingConfig::require(
            "seq_len",
            self.training.seq_len,
            self.training.seq_len <= max,
            format!("2 ..= model.max_seq_len ({max})"),
        )
    }

    /// Resolves every relative path against `data_dir`.
    pub fn resolve_paths(&mut self, data_dir: &Path) {
        for p in [
            &mut self.paths.inbox,
            &mut self.paths.replay,
            &mut self.paths.checkpoints,
            &mut self.admin.socket,
            &mut self.metrics.history_file,
        ] {
            if p.is_relative() {
                *p = data_dir.join(&*p);
            }
        }
        if let Some(c) = &mut self.cluster {
            c.resolve_paths(data_dir);
        }
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_equals_the_struct_defaults() {
        let cfg = Config::from_toml(DEFAULT_TOML, "default").unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[daemon]\nshutdown_timeout_sec = 3\n", "x.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("shutdown_timeout_sec"), "{msg}");
    }

    #[test]
    fn out_of_range_value_names_field_and_range() {
        let err = Config::from_toml("[daemon]\nshutdown_timeout_s = 0\n", "y.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("daemon.shutdown_timeout_s"), "{msg}");
        assert!(msg.contains("1 ..= 3600"), "{msg}");
    }

    #[test]
    fn section_errors_name_the_field() {
        let err = Config::from_toml("[ingest]\nrescan_ms = 1\n", "i.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`ingest.rescan_ms`"), "{err}");
        assert!(err.contains("100 ..= 3600000"), "{err}");
    }

    /// One bad value per section, each reported by the same pattern: the file, the field as
    /// `section.field`, the value found and what is allowed.
    #[test]
    fn every_section_names_field_value_and_allowed_range() {
        let cases = [
            (
                "[paths]\ninbox = \"\"",
                "paths.inbox",
                "\"\"",
                "a directory path",
            ),
            (
                "[daemon]\nrestart_limit = 0",
                "daemon.restart_limit",
                "0",
                "1 ..= 1000",
            ),
            (
                "[admin]\ngroup = \"\"",
                "admin.group",
                "\"\"",
                "a group name",
            ),
            (
                "[logging]\nlevel = \"[\"",
                "logging.level",
                "\"[\"",
                "a tracing filter",
            ),
            (
                "[metrics]\nlog_every_s = 0",
                "metrics.log_every_s",
                "0",
                "1 ..= 86400",
            ),
            ("[ingest]\nnice = 20", "ingest.nice", "20", "0 ..= 19"),
            (
                "[replay]\nmax_bytes = 10",
                "replay.max_bytes",
                "10",
                ">= 4096",
            ),
            (
                "[model]\nagg_floor = 1.5",
                "model.agg_floor",
                "1.5",
                "0 ..= 1",
            ),
            ("[optim]\nbeta2 = 1.0", "optim.beta2", "1", "[0, 1)"),
            (
                "[availability]\nema_decay = 1.0",
                "availability.ema_decay",
                "1",
                "[0, 1)",
            ),
            (
                "[tokenizer]\nmin_frequency = 0",
                "tokenizer.min_frequency",
                "0",
                ">= 1",
            ),
            (
                "[training]\nbatch_size = 0",
                "training.batch_size",
                "0",
                "1 ..= 1024",
            ),
            ("[eval]\nevery_steps = 0", "eval.every_steps", "0", ">= 1"),
            (
                "[checkpoints]\nkeep_last = 0",
                "checkpoints.keep_last",
                "0",
                "1 ..= 10000",
            ),
            (
                "[governor]\nbeta = 1.0",
                "governor.beta",
                "1",
                "0 < beta < 1",
            ),
        ];
        for (text, field, value, allowed) in cases {
            let err = Config::from_toml(text, "s.toml").unwrap_err();
            let msg = err.to_string();
            let ConfigError::Invalid { origin, error } = err else {
                panic!("{text}: {msg}");
            };
            assert_eq!((origin.as_str(), error.field.as_str()), ("s.toml", field));
            assert_eq!(error.value, value, "{msg}");
            assert!(error.allowed.starts_with(allowed), "{msg}");
            assert!(
                msg.contains(&format!("`{field}` = {value}; allowed: ")),
                "{msg}"
            );
        }
    }

    #[test]
    fn seq_len_is_checked_against_the_model_section() {
        let text = "[model]\nmax_seq_len = 32\n[training]\nseq_len = 64\n";
        let msg = Config::from_toml(text, "t.toml").unwrap_err().to_string();
        assert!(msg.contains("`training.seq_len` = 64"), "{msg}");
        assert!(msg.contains("2 ..= model.max_seq_len (32)"), "{msg}");
        let text = "[model]\nmax_seq_len = 64\n[training]\nseq_len = 64\n";
        assert!(Config::from_toml(text, "t.toml").is_ok());
    }

    #[test]
    fn relative_paths_resolve_against_data_dir() {
        let mut cfg = Config::default();
        cfg.admin.socket = "/run/mbtd.sock".into();
        cfg.resolve_paths(Path::new("/var/lib/mbtd"));
        assert_eq!(cfg.paths.inbox, Path::new("/var/lib/mbtd/inbox"));
        assert_eq!(cfg.admin.socket, Path::new("/run/mbtd.sock"));
    }

    #[test]
    fn non_loopback_prometheus_is_refused() {
        let err = Config::from_toml("[metrics]\nprometheus_listen = \"0.0.0.0:9\"\n", "z")
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn effective_config_round_trips() {
        let cfg = Config::default();
        assert_eq!(Config::from_toml(&cfg.to_toml(), "rt").unwrap(), cfg);
    }
}
