//! The daemon's own sections: `[paths]`, `[daemon]`, `[admin]`, `[logging]` and
//! `[metrics]` (the model, data and training sections live beside the code they configure).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::section::{FieldError, Section};

/// An empty path (which would resolve to the data dir itself).
fn is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// Locations of the runtime directories and files; relative paths are resolved against the
/// data dir given by `--data-dir` (default: the current directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    pub inbox: PathBuf,
    pub replay: PathBuf,
    pub checkpoints: PathBuf,
    /// Let the daemon's group read what it writes (umask 0027, directories 0750) instead of
    /// the owner only (umask 0077, directories 0700).
    pub group_readable: bool,
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            inbox: "inbox".into(),
            replay: "replay".into(),
            checkpoints: "checkpoints".into(),
            group_readable: false,
        }
    }
}

impl Section for PathsConfig {
    const NAME: &'static str = "paths";

    fn validate(&self) -> Result<(), FieldError> {
        for (field, p) in [
            ("inbox", &self.inbox),
            ("replay", &self.replay),
            ("checkpoints", &self.checkpoints),
        ] {
            Self::require(field, "\"\"", !is_empty(p), "a directory path")?;
        }
        Ok(())
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

impl Section for DaemonConfig {
    const NAME: &'static str = "daemon";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("shutdown_timeout_s", self.shutdown_timeout_s, 1, 3600)?;
        let initial = self.restart_backoff_initial_ms;
        Self::in_range("restart_backoff_initial_ms", initial, 0, 60_000)?;
        Self::in_range(
            "restart_backoff_max_ms",
            self.restart_backoff_max_ms,
            initial,
            600_000,
        )?;
        Self::in_range("restart_limit", self.restart_limit, 1, 1000)?;
        Self::in_range("restart_window_s", self.restart_window_s, 1, 86_400)
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
    /// Connections served at once; one more gets an error line and is closed.
    pub max_connections: usize,
    /// Seconds a connection may wait without sending a request (or taking a response)
    /// before it is closed.
    pub idle_timeout_s: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: "mbtd.sock".into(),
            group: None,
            max_request_bytes: 1 << 20,
            max_connections: 64,
            idle_timeout_s: 600,
        }
    }
}

impl Section for AdminConfig {
    const NAME: &'static str = "admin";

    fn validate(&self) -> Result<(), FieldError> {
        Self::require("socket", "\"\"", !is_empty(&self.socket), "a socket path")?;
        Self::in_range("max_request_bytes", self.max_request_bytes, 1024, 64 << 20)?;
        Self::in_range("max_connections", self.max_connections, 1, 65_536)?;
        Self::in_range("idle_timeout_s", self.idle_timeout_s, 1, 86_400)?;
        let empty_group = self.group.as_deref() == Some("");
        Self::require(
            "group",
            "\"\"",
            !empty_group,
            "a group name, or leave it out",
        )
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

impl Section for LoggingConfig {
    const NAME: &'static str = "logging";

    fn validate(&self) -> Result<(), FieldError> {
        let level = &self.level;
        tracing_subscriber::EnvFilter::try_new(level)
            .map(|_| ())
            .map_err(|e| {
                let allowed = format!("a tracing filter like \"info\" or \"mbtd=debug\" ({e})");
                FieldError::new("logging.level", format!("{level:?}"), allowed)
            })
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

impl Section for MetricsConfig {
    const NAME: &'static str = "metrics";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("log_every_s", self.log_every_s, 1, 86_400)?;
        let history = &self.history_file;
        Self::require("history_file", "\"\"", !is_empty(history), "a file path")?;
        Self::in_range("history_every_s", self.history_every_s, 0, 86_400)?;
        Self::in_range(
            "history_max_bytes",
            self.history_max_bytes,
            64 << 10,
            16 << 30,
        )?;
        if let Some(addr) = &self.prometheus_listen {
            let loopback = addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback());
            Self::require(
                "prometheus_listen",
                format!("{addr:?}"),
                loopback,
                "a loopback address like 127.0.0.1:9464 (expose it through a proxy), or leave it out",
            )?;
        }
        Ok(())
    }
}
