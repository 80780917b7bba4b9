//! Routes admin requests to the actors that own the answer.

use std::path::PathBuf;
use std::time::Instant;

use kameo::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::checkpointer::{CheckpointerActor, List};
use super::health::HealthBoard;
use super::ingestor::{IngestStatus, IngestorActor, SetPaused};
use super::metrics::{GetSnapshot, MetricsActor};
use super::replay::{ReplayActor, Stats};
use super::trainer::{Forward, TrainerActor, TrainerStatus};
use super::trainer_worker::Cmd;
use crate::admin::protocol::{Request, Response, StatusReply};
use crate::model::generate::GenerateConfig;

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
    pub trainer: ActorRef<TrainerActor>,
    pub checkpointer: ActorRef<CheckpointerActor>,
    pub checkpoint_status: tokio::sync::watch::Receiver<serde_json::Value>,
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
    "pause",
    "resume",
    "mask",
    "unmask",
    "eval",
    "diagnostics",
    "generate",
    "expand",
    "checkpoint",
    "checkpoints",
    "rollback",
    "governor",
];

type Reply = oneshot::Sender<Result<serde_json::Value, String>>;

fn arg_usize(args: &serde_json::Value, key: &str) -> Result<usize, String> {
    args.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| format!("missing or invalid argument `{key}` (a non-negative integer)"))
}

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
            "shutdown" => {
                // Stop only after this reply is on the wire.
                let stop = self.stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let _ = stop.send(StopRequest::Admin).await;
                });
                Response::ok(id, serde_json::json!({"stopping": true}))
            }
            "pause" | "resume" => {
                let pause = req.cmd == "pause";
                let (tx, rx) = oneshot::channel();
                match self.trainer.ask(Forward(Cmd::Pause(pause, tx))).await {
                    Ok(()) => match rx.await {
                        Ok(p) => Response::ok(id, serde_json::json!({ "training_paused": p })),
                        Err(_) => Response::error(id, "the trainer stopped before answering"),
                    },
                    Err(e) => Response::error(id, format!("trainer unavailable: {e}")),
                }
            }
            "mask" | "unmask" => {
                let off = req.cmd == "mask";
                match (
                    arg_usize(&req.args, "layer"),
                    arg_usize(&req.args, "branch"),
                ) {
                    (Ok(layer), Ok(branch)) => {
                        self.trainer_cmd(id, |reply| Cmd::Mask {
                            layer,
                            branch,
                            off,
                            reply,
                        })
                        .await
                    }
                    (Err(e), _) | (_, Err(e)) => Response::error(id, e),
                }
            }
            "eval" => self.trainer_cmd(id, Cmd::Eval).await,
            "diagnostics" => self.trainer_cmd(id, Cmd::Diagnostics).await,
            "governor" => self.trainer_cmd(id, Cmd::Governor).await,
            "checkpoint" => {
                let tag = req
                    .args
                    .get("tag")
                    .and_then(|v| v.as_str())
                    .map(String::from);
                self.trainer_cmd(id, |r| Cmd::Checkpoint(tag, r)).await
            }
            "rollback" => match req.args.get("target").and_then(|v| v.as_str()) {
                Some(t) => {
                    let t = t.to_string();
                    self.trainer_cmd(id, |r| Cmd::Rollback(t, r)).await
                }
                None => {
                    Response::error(id, "missing argument `target` (an id, a tag or `previous`)")
                }
            },
            "expand" => {
                let a = &req.args;
                match (arg_usize(a, "layer"), arg_usize(a, "branches")) {
                    (Ok(layer), Ok(branches)) => {
                        // Absent: the governor's `beta` / `ramp_steps`.
                        let beta = a.get("beta").and_then(|v| v.as_f64()).map(|b| b as f32);
                        let ramp_steps = a.get("ramp_steps").and_then(|v| v.as_u64());
                        let noise = a.get("noise").and_then(|v| v.as_f64()).unwrap_or(1e-3) as f32;
                        self.trainer_cmd(id, |reply| Cmd::Expand {
                            layer,
                            branches,
                            beta,
                            ramp_steps,
                            noise,
                            reply,
                        })
                        .await
                    }
                    (Err(e), _) | (_, Err(e)) => Response::error(id, e),
                }
            }
            "checkpoints" => match self.checkpointer.ask(List).await {
                Ok(l) => Response::ok(id, serde_json::to_value(l).unwrap_or_default()),
                Err(e) => Response::error(id, format!("cannot list checkpoints: {e}")),
            },
            "generate" => return self.generate(id, &req.args, tx).await,
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

    /// Sends a command to the trainer thread and waits for its answer.
    async fn trainer_cmd(&self, id: u64, make: impl FnOnce(Reply) -> Cmd) -> Response {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.trainer.ask(Forward(make(tx))).await {
            return Response::error(id, format!("trainer unavailable: {e}"));
        }
        match rx.await {
            Ok(Ok(v)) => Response::ok(id, v),
            Ok(Err(e)) => Response::error(id, e),
            Err(_) => Response::error(id, "the trainer stopped before answering"),
        }
    }

    /// Streams generated text: `{"text": piece}` chunks, then the summary.
    async fn generate(&self, id: u64, args: &serde_json::Value, tx: mpsc::Sender<Response>) {
        let prompt = args
            .get("prompt")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let respond = args
            .get("respond")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut cfg = GenerateConfig::default();
        if let Some(v) = args.get("max_tokens").and_then(|v| v.as_u64()) {
            cfg.max_tokens = v as usize;
        }
        if let Some(v) = args.get("temperature").and_then(|v| v.as_f64()) {
            cfg.temperature = v as f32;
        }
        if let Some(v) = args.get("top_k").and_then(|v| v.as_u64()) {
            cfg.top_k = v as usize;
        }
        if let Some(v) = args.get("top_p").and_then(|v| v.as_f64()) {
            cfg.top_p = v as f32;
        }
        if let Some(v) = args.get("seed").and_then(|v| v.as_u64()) {
            cfg.seed = v;
        }
        if let Err(e) = cfg.validate() {
            let _ = tx.send(Response::error(id, e)).await;
            return;
        }
        let (chunk_tx, mut chunk_rx) = mpsc::channel::<String>(256);
        let (rtx, rrx) = oneshot::channel();
        let cmd = Cmd::Generate {
            prompt,
            respond,
            cfg,
            chunks: chunk_tx,
            reply: rtx,
        };
        if let Err(e) = self.trainer.ask(Forward(cmd)).await {
            let _ = tx
                .send(Response::error(id, format!("trainer unavailable: {e}")))
                .await;
            return;
        }
        while let Some(piece) = chunk_rx.recv().await {
            let _ = tx
                .send(Response::chunk(id, serde_json::json!({ "text": piece })))
                .await;
        }
        let last = match rrx.await {
            Ok(Ok(v)) => Response::ok(id, v),
            Ok(Err(e)) => Response::error(id, e),
            Err(_) => Response::error(id, "the trainer stopped before answering"),
        };
        let _ = tx.send(last).await;
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
        let trainer = match self.trainer.ask(TrainerStatus).reply_timeout(timeout).await {
            Ok(v) => v,
            Err(e) => unavailable(e.to_string()),
        };
        sections.push(("trainer".to_string(), trainer));
        let ck = self.checkpoint_status.borrow().clone();
        sections.push(("checkpoints".to_string(), ck));
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
