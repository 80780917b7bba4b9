//! Routes admin requests to the actors that own the answer.

use std::path::PathBuf;
use std::time::Instant;

use kameo::prelude::*;
use tokio::sync::mpsc;

use super::health::HealthBoard;
use super::ingestor::{IngestStatus, IngestorActor, SetPaused};
use super::metrics::{GetSnapshot, MetricsActor};
use super::replay::{ReplayActor, Stats};
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
    pub replay: ActorRef<ReplayActor>,
    pub ingestor: ActorRef<IngestorActor>,
    pub stop: mpsc::Sender<StopRequest>,
    #[cfg(feature = "fault-injection")]
    pub crash_targets: Vec<(&'static str, Recipient<super::Crash>)>,
}

/// The commands this daemon answers, for the "unknown command" message.
pub const COMMANDS: &[&str] = &[
    "ping",
    "status",
    "metrics",
    "shutdown",
    "pause-ingest",
    "resume-ingest",
];

impl Dispatcher {
    /// Answers one request, sending one or more responses on `tx` (the last has `done: true`).
    pub async fn handle(&self, req: Request, tx: mpsc::Sender<Response>) {
        let id = req.id;
        let resp = match req.cmd.as_str() {
            "ping" => Response::ok(id, serde_json::json!({"pong": true})),
            "status" => Response::ok(
                id,
                serde_json::to_value(self.status().await).unwrap_or_default(),
            ),
            "pause-ingest" | "resume-ingest" => {
                let pause = req.cmd == "pause-ingest";
                match self.ingestor.ask(SetPaused(pause)).await {
                    Ok(p) => Response::ok(id, serde_json::json!({ "ingest_paused": p })),
                    Err(e) => Response::error(id, format!("ingestor unavailable: {e}")),
                }
            }
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

    async fn status(&self) -> StatusReply {
        let mut sections = Vec::new();
        let timeout = std::time::Duration::from_millis(500);
        let unavailable = |e: String| serde_json::json!({ "state": format!("unavailable: {e}") });
        let ingest = match self.ingestor.ask(IngestStatus).reply_timeout(timeout).await {
            Ok(v) => v,
            Err(e) => unavailable(e.to_string()),
        };
        sections.push(("ingest".to_string(), ingest));
        let replay = match self.replay.ask(Stats).reply_timeout(timeout).await {
            Ok(s) => serde_json::json!({
                "rows": s.rows,
                "training_rows": s.training_rows,
                "control_rows": s.control_rows,
                "bytes": s.bytes,
                "segments": s.segments,
                "evicted_total": s.evicted_total,
                "files": s.journal_files,
            }),
            Err(e) => unavailable(e.to_string()),
        };
        sections.push(("replay".to_string(), replay));
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            data_dir: self.data_dir.display().to_string(),
            actors: self.board.statuses(),
            sections,
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
