//! Every metric name and log event name of the daemon, defined once so names never drift.
//! Metric names are part of the operator interface (ARCHITECTURE.md, "Metrics").

/// Restarts of a supervised actor (label `actor`).
pub const ACTOR_RESTARTS_TOTAL: &str = "actor_restarts_total";
/// Seconds since the daemon started.
pub const UPTIME_SECONDS: &str = "uptime_seconds";
/// Requests served on the admin socket (label `outcome` = ok | error).
pub const ADMIN_REQUESTS_TOTAL: &str = "admin_requests_total";

/// Log event names (the `event` field of structured log lines).
pub mod events {
    pub const DAEMON_STARTED: &str = "daemon_started";
    pub const DAEMON_READY: &str = "daemon_ready";
    pub const DAEMON_STOPPING: &str = "daemon_stopping";
    pub const DAEMON_STOPPED: &str = "daemon_stopped";
    pub const ACTOR_STARTED: &str = "actor_started";
    pub const ACTOR_RESTARTING: &str = "actor_restarting";
    pub const ACTOR_STOPPED: &str = "actor_stopped";
    pub const ACTOR_CRASH_LOOP: &str = "actor_crash_loop";
    pub const ADMIN_LISTENING: &str = "admin_listening";
    pub const ADMIN_REQUEST_REFUSED: &str = "admin_request_refused";
    pub const ADMIN_PEER_REFUSED: &str = "admin_peer_refused";
    pub const METRICS_SNAPSHOT: &str = "metrics_snapshot";
    pub const PROMETHEUS_LISTENING: &str = "prometheus_listening";
}
