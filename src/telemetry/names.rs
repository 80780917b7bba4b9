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
    pub const REPLAY_OPENED: &str = "replay_opened";
    pub const REPLAY_RECOVERED: &str = "replay_recovered";
    pub const REPLAY_EVICTED: &str = "replay_evicted";
    pub const INGEST_FILE_DONE: &str = "ingest_file_done";
    pub const INGEST_FILE_FAILED: &str = "ingest_file_failed";
    pub const INGEST_REFUSED_ENTRY: &str = "ingest_refused_entry";
    pub const INGEST_ERROR: &str = "ingest_error";
    pub const INGEST_PAUSED: &str = "ingest_paused";
    pub const INGEST_RESUMED: &str = "ingest_resumed";
}

/// Ingestion (ARCHITECTURE.md "Metrics").
pub const INGEST_ROWS_TOTAL: &str = "ingest_rows_total";
pub const INGEST_ROWS_REJECTED_TOTAL: &str = "ingest_rows_rejected_total";
pub const INGEST_PARSE_ERRORS_TOTAL: &str = "ingest_parse_errors_total";
pub const INGEST_FILES_TOTAL: &str = "ingest_files_total";
pub const INGEST_BYTES_TOTAL: &str = "ingest_bytes_total";
pub const INGEST_ROWS_PER_SEC_WINDOW: &str = "ingest_rows_per_sec_window";
pub const INGEST_EVENTS_PER_SEC_WINDOW: &str = "ingest_events_per_sec_window";
pub const INGEST_PENDING_EVENTS_OBSERVED_PEAK: &str = "ingest_pending_events_observed_peak";
/// Replay store.
pub const REPLAY_ROWS: &str = "replay_rows";
pub const REPLAY_BYTES: &str = "replay_bytes";
pub const REPLAY_EVICTED_TOTAL: &str = "replay_evicted_total";
