//! Routes admin requests to the actors that own the answer.

use std::path::PathBuf;
use std::time::Instant;

use kameo::prelude::*;
use tokio::sync::mpsc;

use super::health::HealthBoard;
use super::metrics::{GetSnapshot, MetricsActor};
use crate::admin::protocol::{Request, Response, StatusReply};

/// Why the daemon is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    Admin,
}

/// Everything a connection needs to answer requests; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    pub board: HealthBoard,
    pub started: Instant,
    pub data_dir: PathBuf,
    pub metrics: ActorRef<MetricsActor>,
    pub stop: mpsc::Sender<StopRequest>,
    #[cfg(feature = "fault-injection")]
    pub crash_targets: Vec<(&'static str, Recipient<super::Crash>)>,
}

/// The commands this daemon answers, for the "unknown command" message.
pub const COMMANDS: &[&str] = &["ping", "status", "metrics", "shutdown"];

impl Dispatcher {
    /// Answers one request, sending one or more responses on `tx` (the last has `done: true`).
    pub async fn handle(&self, req: Request, tx: mpsc::Sender<Response>) {
        let id = req.id;
        let resp = match req.cmd.as_str() {
            "ping" => Response::ok(id, serde_json::json!({"pong": true})),
            "status" => Response::ok(id, serde_json::to_value(self.status()).unwrap_or_default()),
            "metrics" => match self.metrics.ask(GetSnapshot).await {
                Ok(s) => Response::ok(id, serde_json::to_value(s).unwrap_or_default()),
                Err(e) => Response::error(id, format!("metrics actor unavailable: {e}")),
            },
            "shutdown" => match self.stop.send(StopRequest::Admin).await {
                Ok(()) => Response::ok(id, serde_json::json!({"stopping": true})),
                Err(_) => Response::error(id, "the daemon is already stopping"),
            },
            #[cfg(feature = "fault-injection")]
            "debug-crash" => self.crash(id, &req.args).await,
            other => Response::error(
                id,
                format!(
                    "unknown command `{other}`; known commands: {}",
                    COMMANDS.join(", ")
                ),
            ),
        };
        let _ = tx.send(resp).await;
    }

    fn status(&self) -> StatusReply {
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            data_dir: self.data_dir.display().to_string(),
            actors: self.board.statuses(),
            sections: Vec::new(),
        }
    }

    #[cfg(feature = "fault-injection")]
    async fn crash(&self, id: u64, args: &serde_json::Value) -> Response {
        let name = args.get("actor").and_then(|v| v.as_str()).unwrap_or("");
        match self.crash_targets.iter().find(|(n, _)| *n == name) {
            Some((_, r)) => match r.tell(super::Crash).await {
                Ok(()) => Response::ok(id, serde_json::json!({"crashed": name})),
                Err(e) => Response::error(id, format!("cannot reach actor {name}: {e}")),
            },
            None => Response::error(id, format!("no crashable actor named `{name}`")),
        }
    }
}
