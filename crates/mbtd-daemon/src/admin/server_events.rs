//! Internal events of the admin socket server and dispatcher: each `emit` writes the log
//! line and updates its metric. Those a client can make repeat are given a `suppressed`
//! count by the caller's [`crate::telemetry::event::RateLimit`].

use crate::telemetry::event::InternalEvent;
use crate::telemetry::names::{self, events};

/// A connection refused because `admin.max_connections` are open.
pub struct ConnectionRefused {
    pub max: usize,
    /// Refusals not logged since the last line (all are counted).
    pub suppressed: u64,
    /// Whether this one gets a log line (the rate limit admitted it).
    pub logged: bool,
}

impl InternalEvent for ConnectionRefused {
    fn emit(self) {
        metrics::counter!(names::ADMIN_CONNECTIONS_REFUSED_TOTAL, "reason" => "max_connections")
            .increment(1);
        if self.logged {
            tracing::warn!(
                event = events::ADMIN_CONNECTION_REFUSED,
                actor = "admin",
                max_connections = self.max,
                suppressed = self.suppressed,
                "admin connection refused: admin.max_connections are open"
            );
        }
    }
}

/// A peer that is not root, the daemon's user or in `admin.group`.
pub struct PeerRefused {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub suppressed: u64,
    pub logged: bool,
}

impl InternalEvent for PeerRefused {
    fn emit(self) {
        metrics::counter!(names::ADMIN_CONNECTIONS_REFUSED_TOTAL, "reason" => "peer").increment(1);
        if self.logged {
            tracing::warn!(
                event = events::ADMIN_PEER_REFUSED,
                actor = "admin",
                uid = self.uid,
                gid = self.gid,
                pid = self.pid,
                suppressed = self.suppressed,
                "refused an admin connection from an unauthorised user"
            );
        }
    }
}

/// `accept` failed (out of descriptors, out of memory, …); the loop waits and retries.
pub struct AcceptFailed<'a> {
    pub error: &'a std::io::Error,
    pub suppressed: u64,
    pub logged: bool,
}

impl InternalEvent for AcceptFailed<'_> {
    fn emit(self) {
        metrics::counter!(names::ADMIN_ACCEPT_ERRORS_TOTAL).increment(1);
        if self.logged {
            tracing::warn!(
                event = events::ADMIN_ACCEPT_FAILED,
                actor = "admin",
                error = %self.error,
                suppressed = self.suppressed,
                "accept failed on the admin socket; retrying"
            );
        }
    }
}

/// A connection closed after `admin.idle_timeout_s` without a request.
pub struct IdleClosed {
    pub idle_s: u64,
}

impl InternalEvent for IdleClosed {
    fn emit(self) {
        metrics::counter!(names::ADMIN_CONNECTIONS_IDLE_CLOSED_TOTAL).increment(1);
        tracing::debug!(
            event = events::ADMIN_CONNECTION_IDLE_CLOSED,
            actor = "admin",
            idle_s = self.idle_s,
            "admin connection closed after admin.idle_timeout_s without a request"
        );
    }
}

/// A request line over `admin.max_request_bytes`; its connection is closed.
pub struct RequestTooLarge {
    pub max_bytes: usize,
}

impl InternalEvent for RequestTooLarge {
    fn emit(self) {
        metrics::counter!(names::ADMIN_REQUESTS_TOTAL, "outcome" => "error").increment(1);
        tracing::warn!(
            event = events::ADMIN_REQUEST_REFUSED,
            actor = "admin",
            max_bytes = self.max_bytes,
            "admin request larger than the limit; connection closed"
        );
    }
}

/// A `generate` stream whose client went away: the trainer was told to stop.
pub struct GenerateCancelled {
    pub id: u64,
    /// Tokens the trainer produced before it stopped (`None`: it gave no summary).
    pub tokens: Option<u64>,
    pub max_tokens: usize,
}

impl InternalEvent for GenerateCancelled {
    fn emit(self) {
        metrics::counter!(names::ADMIN_STREAMS_CANCELLED_TOTAL).increment(1);
        tracing::info!(
            event = events::ADMIN_GENERATE_CANCELLED,
            actor = "admin",
            request_id = self.id,
            tokens = self.tokens,
            max_tokens = self.max_tokens,
            "generate stopped: the client closed its connection"
        );
    }
}
