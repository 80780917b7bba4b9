//! Routes admin requests to the actors that own the answer.

use std::path::PathBuf;
use std::time::Instant;

use kameo::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::checkpointer::{CheckpointerActor, Delete, List};
use super::health::HealthBoard;
use super::ingestor::{IngestStatus, IngestorActor, SetPaused};
use super::metrics::{GetSnapshot, MetricsActor};
use super::replay::{ReplayActor, Stats};
use super::trainer::{Forward, TrainerActor, TrainerStatus};
use super::trainer_worker::Cmd;
use crate::admin::protocol::{
    BranchArgs, CheckpointArgs, CheckpointDeleteArgs, Envelope, GenerateArgs, Request, Response,
    RollbackArgs, StatusReply,
};
use crate::admin::server_events::GenerateCancelled;
use crate::model::generate::GenerateConfig;
use crate::telemetry::event::InternalEvent;

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
    /// The coordinator's nodes (`[cluster]`).
    pub cluster: Option<std::sync::Arc<crate::cluster::ClusterView>>,
    #[cfg(feature = "fault-injection")]
    pub crash_targets: Vec<(&'static str, Recipient<super::Crash>)>,
}

type Reply = oneshot::Sender<Result<serde_json::Value, String>>;

impl Dispatcher {
    /// Answers one request, sending one or more responses on `tx` (the last has `done: true`).
    /// When `tx` closes (the client went away) a stream stops early.
    pub async fn handle(&self, env: Envelope, tx: mpsc::Sender<Response>) {
        let id = env.id;
        let resp = match env.request {
            Request::Ping(_) => Response::ok(id, serde_json::json!({"pong": true})),
            Request::Status(_) => Response::ok(
                id,
                serde_json::to_value(self.status().await).unwrap_or_default(),
            ),
            Request::PauseIngest(_) => self.set_ingest_paused(id, true).await,
            Request::ResumeIngest(_) => self.set_ingest_paused(id, false).await,
            Request::Metrics(_) => match self.metrics.ask(GetSnapshot).await {
                Ok(s) => Response::ok(id, serde_json::to_value(s).unwrap_or_default()),
                Err(e) => Response::error(id, format!("metrics actor unavailable: {e}")),
            },
            Request::Shutdown(_) => {
                // Stop only after this reply is on the wire.
                let stop = self.stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let _ = stop.send(StopRequest::Admin).await;
                });
                Response::ok(id, serde_json::json!({"stopping": true}))
            }
            Request::Pause(_) => self.set_training_paused(id, true).await,
            Request::Resume(_) => self.set_training_paused(id, false).await,
            Request::Mask(BranchArgs { layer, branch }) => {
                self.trainer_cmd(id, |reply| Cmd::Mask {
                    layer,
                    branch,
                    off: true,
                    reply,
                })
                .await
            }
            Request::Unmask(BranchArgs { layer, branch }) => {
                self.trainer_cmd(id, |reply| Cmd::Mask {
                    layer,
                    branch,
                    off: false,
                    reply,
                })
                .await
            }
            Request::Eval(_) => self.trainer_cmd(id, Cmd::Eval).await,
            Request::Diagnostics(_) => self.trainer_cmd(id, Cmd::Diagnostics).await,
            Request::Governor(_) => self.trainer_cmd(id, Cmd::Governor).await,
            Request::Checkpoint(CheckpointArgs { tag }) => {
                let tag = tag.map(String::from);
                match tag.as_deref().map(crate::checkpoint::validate_tag) {
                    Some(Err(e)) => Response::error(id, e),
                    _ => self.trainer_cmd(id, |r| Cmd::Checkpoint(tag, r)).await,
                }
            }
            Request::CheckpointDelete(CheckpointDeleteArgs { target }) => {
                match self.checkpointer.ask(Delete(String::from(target))).await {
                    Ok(v) => Response::ok(id, v),
                    Err(e) => Response::error(id, format!("cannot delete checkpoint: {e}")),
                }
            }
            Request::Rollback(RollbackArgs { target }) => {
                let t = String::from(target);
                self.trainer_cmd(id, |r| Cmd::Rollback(t, r)).await
            }
            Request::Expand(a) => {
                self.trainer_cmd(id, |reply| Cmd::Expand {
                    layer: a.layer,
                    branches: a.branches,
                    beta: a.beta,
                    ramp_steps: a.ramp_steps,
                    noise: a.noise,
                    reply,
                })
                .await
            }
            Request::Checkpoints(_) => match self.checkpointer.ask(List).await {
                Ok(l) => Response::ok(id, serde_json::to_value(l).unwrap_or_default()),
                Err(e) => Response::error(id, format!("cannot list checkpoints: {e}")),
            },
            Request::Nodes(_) => match &self.cluster {
                Some(c) => Response::ok(id, c.nodes_report()),
                None => Response::error(
                    id,
                    "this daemon has no [cluster] section: every branch trains in this process",
                ),
            },
            Request::Generate(a) => return self.generate(id, a, tx).await,
            Request::DebugCrash(a) => self.crash(id, &a.actor).await,
        };
        let _ = tx.send(resp).await;
    }

    async fn set_ingest_paused(&self, id: u64, pause: bool) -> Response {
        match self.ingestor.ask(SetPaused(pause)).await {
            Ok(p) => Response::ok(id, serde_json::json!({ "ingest_paused": p })),
            Err(e) => Response::error(id, format!("ingestor unavailable: {e}")),
        }
    }

    async fn set_training_paused(&self, id: u64, pause: bool) -> Response {
        let (tx, rx) = oneshot::channel();
        match self.trainer.ask(Forward(Cmd::Pause(pause, tx))).await {
            Ok(()) => match rx.await {
                Ok(p) => Response::ok(id, serde_json::json!({ "training_paused": p })),
                Err(_) => Response::error(id, "the trainer stopped before answering"),
            },
            Err(e) => Response::error(id, format!("trainer unavailable: {e}")),
        }
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

    /// Streams generated text: `{"text": piece}` chunks, then the summary. When the client
    /// goes away mid-stream, the chunk receiver is dropped, which stops the trainer's
    /// generation at its next token; the tokens it produced are logged with the cancel.
    async fn generate(&self, id: u64, a: GenerateArgs, tx: mpsc::Sender<Response>) {
        let cfg = GenerateConfig {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            // without `as_of` the model is asked as of now
            as_of_ms: Some(
                a.as_of
                    .as_ref()
                    .map_or_else(|| mbtd_core::store::fsutil::now_ms() as i64, |t| t.millis()),
            ),
            ..GenerateConfig::default()
        };
        if let Err(e) = cfg.validate() {
            let _ = tx.send(Response::error(id, e)).await;
            return;
        }
        let (chunk_tx, mut chunk_rx) = mpsc::channel::<String>(256);
        let (rtx, rrx) = oneshot::channel();
        let cmd = Cmd::Generate {
            prompt: a.prompt,
            respond: a.respond,
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
        loop {
            let piece = tokio::select! {
                biased;
                () = tx.closed() => {
                    drop(chunk_rx);
                    let tokens = match rrx.await {
                        Ok(Ok(v)) => v["tokens"].as_u64(),
                        _ => None,
                    };
                    GenerateCancelled { id, tokens, max_tokens: a.max_tokens }.emit();
                    return;
                }
                p = chunk_rx.recv() => p,
            };
            let Some(piece) = piece else { break };
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
        if let Some(c) = &self.cluster {
            sections.push(("cluster".to_string(), c.status_line()));
        }
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
    async fn crash(&self, id: u64, name: &str) -> Response {
        match self.crash_targets.iter().find(|(n, _)| *n == name) {
            Some((_, r)) => match r.tell(super::Crash).await {
                Ok(()) => Response::ok(id, serde_json::json!({"crashed": name})),
                Err(e) => Response::error(id, format!("cannot reach actor {name}: {e}")),
            },
            None => Response::error(id, format!("no crashable actor named `{name}`")),
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    async fn crash(&self, id: u64, _name: &str) -> Response {
        Response::error(
            id,
            "debug-crash is answered only by builds with the fault-injection feature",
        )
    }
}
