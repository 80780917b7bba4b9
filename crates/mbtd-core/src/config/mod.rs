//! The daemon's configuration: a TOML file whose every section is a serde struct with
//! defaults and validation. `config/mbtd.toml` is the documented default, embedded in the
//! binary so `mbtd run` works with no file.
//!
//! Loading rules: unknown keys are an error naming the key and the file; out-of-range values
//! name the field and the allowed range; relative paths resolve against the data dir.

pub mod preset;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    #[error("{origin}: invalid value for `{field}`: {message}")]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
}

/// A field that failed validation and why (the allowed range or the rule).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Checks `lo <= v <= hi`, naming the field and the range otherwise.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), FieldError> {
    if v < lo || v > hi {
        return Err(FieldError::new(
            field,
            format!("{v} is out of range; allowed: {lo} ..= {hi}"),
        ));
    }
    Ok(())
}

/// Locations of the runtime directories and files; relative paths are resolved against the
/// data dir given by `--data-dir` (default: the current directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    pub inbox: PathBuf,
    pub replay: PathBuf,
    pub checkpoints: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            inbox: "inbox".into(),
            replay: "replay".into(),
            checkpoints: "checkpoints".into(),
        }
    }
}

/// Process-level settings: shutdown budget and how crashed actors are restarted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Seconds the ordered stop may take before the daemon gives up and exits non-zero.
    pub shutdown_timeout_s: u64,
    /// First restart delay of a crashed actor; doubled for each further restart in the window.
    pub restart_backoff_initial_ms: u64,
    /// Upper bound of the restart delay.
    pub restart_backoff_max_ms: u64,
    /// More than this many restarts of one actor within `restart_window_s` is a crash loop:
    /// the daemon exits non-zero so systemd restarts the whole service.
    pub restart_limit: u32,
    pub restart_window_s: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout_s: 30,
            restart_backoff_initial_ms: 100,
            restart_backoff_max_ms: 10_000,
            restart_limit: 5,
            restart_window_s: 60,
        }
    }
}

impl DaemonConfig {
    fn validate(&self) -> Result<(), FieldError> {
        check_range(
            "daemon.shutdown_timeout_s",
            self.shutdown_timeout_s,
            1,
            3600,
        )?;
        check_range(
            "daemon.restart_backoff_initial_ms",
            self.restart_backoff_initial_ms,
            0,
            60_000,
        )?;
        check_range(
            "daemon.restart_backoff_max_ms",
            self.restart_backoff_max_ms,
            self.restart_backoff_initial_ms,
            600_000,
        )?;
        check_range("daemon.restart_limit", self.restart_limit, 1, 1000)?;
        check_range("daemon.restart_window_s", self.restart_window_s, 1, 86_400)
    }
}

/// The admin socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Unix socket path (relative to the data dir).
    pub socket: PathBuf,
    /// Optional group allowed to use the socket (mode becomes 0660 instead of 0600).
    pub group: Option<String>,
    /// Largest request line accepted, in bytes; a larger one gets an error and is closed.
    pub max_request_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: "mbtd.sock".into(),
            group: None,
            max_request_bytes: 1 << 20,
        }
    }
}

impl AdminConfig {
    fn validate(&self) -> Result<(), FieldError> {
        check_range(
            "admin.max_request_bytes",
            self.max_request_bytes,
            1024,
            64 << 20,
        )?;
        if let Some(g) = &self.group
            && g.is_empty()
        {
            return Err(FieldError::new(
                "admin.group",
                "must be a group name, or left out",
            ));
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A tracing filter (e.g. "info" or "mbtd=debug"); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

impl LoggingConfig {
    fn validate(&self) -> Result<(), FieldError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| FieldError::new("logging.level", format!("not a tracing filter: {e}")))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Seconds between JSON snapshot log lines (`event = "metrics_snapshot"`).
    pub log_every_s: u64,
    /// Optional Prometheus endpoint, e.g. "127.0.0.1:9464"; off when left out.
    pub prometheus_listen: Option<String>,
    /// Metrics history for `mbtd report`: one JSON line per snapshot (relative to the data dir).
    pub history_file: PathBuf,
    /// Seconds between history lines; 0 turns the history off.
    pub history_every_s: u64,
    /// Size bound of the history file; beyond it the file is rotated (one rotated file kept).
    pub history_max_bytes: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            log_every_s: 60,
            prometheus_listen: None,
            history_file: "metrics.jsonl".into(),
            history_every_s: 30,
            history_max_bytes: 64 << 20,
        }
    }
}

impl MetricsConfig {
    fn validate(&self) -> Result<(), FieldError> {
        check_range("metrics.log_every_s", self.log_every_s, 1, 86_400)?;
        check_range("metrics.history_every_s", self.history_every_s, 0, 86_400)?;
        check_range(
            "metrics.history_max_bytes",
            self.history_max_bytes,
            64 << 10,
            16 << 30,
        )?;
        if let Some(addr) = &self.prometheus_listen {
            let parsed: std::net::SocketAddr = addr.parse().map_err(|_| {
                FieldError::new(
                    "metrics.prometheus_listen",
                    format!("`{addr}` is not an address like 127.0.0.1:9464"),
                )
            })?;
            if !parsed.ip().is_loopback() {
                return Err(FieldError::new(
                    "metrics.prometheus_listen",
                    format!("`{addr}` is not a loopback address; expose it through a proxy"),
                ));
            }
        }
        Ok(())
    }
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
    pub training: crate::learn::TrainingConfig,
    pub eval: crate::learn::EvalConfig,
    pub checkpoints: crate::checkpoint::CheckpointConfig,
    pub governor: crate::govern::policy::GovernorConfig,
}

/// Maps a module's `validate() -> Result<(), String>` (whose message names the field) to a
/// [`FieldError`] for section `section`.
fn section(section: &str, r: Result<(), String>) -> Result<(), FieldError> {
    r.map_err(|m| {
        let prefix = format!("{section}.");
        match m.strip_prefix(&prefix) {
            Some(rest) => {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .unwrap_or(rest.len());
                let msg = rest[end..].trim_start_matches([' ', ':', '=']).trim();
                FieldError::new(format!("{prefix}{}", &rest[..end]), msg.to_string())
            }
            None => FieldError::new(section, m),
        }
    })
}

impl Config {
    /// Parses and validates TOML text; `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate().map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            field: e.field,
            message: e.message,
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

    /// Checks every section; the first bad field is reported.
    pub fn validate(&self) -> Result<(), FieldError> {
        self.daemon.validate()?;
        self.admin.validate()?;
        self.logging.validate()?;
        self.metrics.validate()?;
        section("ingest", self.ingest.validate())?;
        section("replay", self.replay.validate())?;
        section("model", self.model.validate())?;
        section("optim", self.optim.validate())?;
        section("availability", self.availability.validate())?;
        section("tokenizer", self.tokenizer.validate())?;
        section("training", self.training.validate(self.model.max_seq_len))?;
        section("eval", self.eval.validate())?;
        section("checkpoints", self.checkpoints.validate())?;
        section("governor", self.governor.validate())
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
