//! `mbtd run`: the daemon's lifecycle — lock the data dir, start the actor tree, tell systemd,
//! wait for a signal or `ctl shutdown`, stop in order within `daemon.shutdown_timeout_s`.

pub mod child;
pub mod lock;
pub mod startup;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kameo::prelude::*;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::actors::checkpointer::CheckpointState;
use crate::actors::health::HealthBoard;
use crate::actors::supervisor::{Root, RootArgs, StopOrder};
use crate::config::Config;
use crate::telemetry::SnapshotRecorder;
use crate::telemetry::names::events;
pub use startup::StartRefused;

/// How the daemon ended, mapped to the process exit code by `main`.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Ordered stop completed.
    Clean,
    /// An actor crash-looped, or the ordered stop overran its budget.
    Failed(String),
}

/// Options of `mbtd run` beyond the config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Resume with the checkpoint's `model.*` where the config's differs
    /// (`--accept-checkpoint-model`), instead of refusing to start.
    pub accept_checkpoint_model: bool,
}

/// Creates the data dir (0700, or 0750 with `paths.group_readable`), refuses one that other
/// users can write, then creates the runtime directories of `cfg` (already resolved) the
/// same way.
fn prepare_dirs(data_dir: &Path, cfg: &Config) -> anyhow::Result<()> {
    let group = cfg.paths.group_readable;
    startup::create_private_dir(data_dir, group).map_err(|source| StartRefused::DataDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    startup::check_data_dir(data_dir)?;
    let mut dirs = vec![
        cfg.paths.inbox.as_path(),
        cfg.paths.replay.as_path(),
        cfg.paths.checkpoints.as_path(),
    ];
    dirs.extend(cfg.admin.socket.parent());
    for d in dirs {
        startup::create_private_dir(d, group)
            .with_context(|| format!("cannot create directory {}", d.display()))?;
    }
    Ok(())
}

/// Compares `cfg.model` with the model of the checkpoint a start resumes from; a difference
/// refuses the start unless `accept`, which replaces `cfg.model` by the checkpoint's.
fn check_model(cfg: &mut Config, accept: bool) -> Result<(), StartRefused> {
    let Some(m) = crate::checkpoint::resume_manifest(&cfg.paths.checkpoints) else {
        return Ok(());
    };
    let diffs = startup::model_differences(&m, &cfg.model);
    if diffs.is_empty() {
        return Ok(());
    }
    if !accept {
        return Err(StartRefused::ModelMismatch(startup::mismatch_message(
            &m.id,
            &cfg.paths.checkpoints,
            &diffs,
        )));
    }
    let Some(model) = startup::checkpoint_model(&m) else {
        return Ok(());
    };
    cfg.model = model?;
    cfg.validate()
        .map_err(|e| StartRefused::CheckpointModelInvalid {
            model: serde_json::to_string(&cfg.model).unwrap_or_default(),
            reason: e.to_string(),
        })?;
    for (field, ck, ours) in &diffs {
        tracing::warn!(
            event = events::MODEL_FROM_CHECKPOINT,
            field = %field,
            checkpoint = %ck,
            config = %ours,
            "--accept-checkpoint-model: running with the checkpoint's value"
        );
    }
    Ok(())
}

/// Installs the global metrics recorder (plus Prometheus when configured) and returns the
/// snapshot handle.
fn install_metrics(cfg: &Config) -> anyhow::Result<SnapshotRecorder> {
    let recorder = SnapshotRecorder::default();
    match &cfg.metrics.prometheus_listen {
        None => metrics::set_global_recorder(recorder.clone())
            .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?,
        Some(addr) => {
            let addr: std::net::SocketAddr = addr.parse().context("metrics.prometheus_listen")?;
            let (prom, exporter) = metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .build()
                .with_context(|| format!("cannot start the Prometheus endpoint on {addr}"))?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "Prometheus endpoint stopped");
                }
            });
            tracing::info!(event = events::PROMETHEUS_LISTENING, %addr);
            let fanout = metrics_util::layers::FanoutBuilder::default()
                .add_recorder(recorder.clone())
                .add_recorder(prom)
                .build();
            metrics::set_global_recorder(fanout)
                .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
        }
    }
    Ok(recorder)
}

/// Runs the daemon until it is stopped. `cfg` must already have its paths resolved. A
/// [`StartRefused`] error (exit code 2) comes before READY and before any actor starts.
pub async fn run(mut cfg: Config, data_dir: PathBuf, opts: RunOptions) -> anyhow::Result<Exit> {
    let started = Instant::now();
    startup::set_umask(cfg.paths.group_readable);
    prepare_dirs(&data_dir, &cfg)?;
    let _lock = lock::DataDirLock::acquire(&data_dir)?;
    check_model(&mut cfg, opts.accept_checkpoint_model)?;
    let admin_gid =
        match &cfg.admin.group {
            None => None,
            Some(g) => Some(crate::admin::server::group_id(g).ok_or_else(|| {
                crate::admin::server::AdminError::UnknownGroup { group: g.clone() }
            })?),
        };
    let recorder = install_metrics(&cfg)?;
    let cluster = match &cfg.cluster {
        None => None,
        Some(c) => Some(
            crate::cluster::start(c)
                .await
                .map_err(|e| StartRefused::Cluster(e.to_string()))?,
        ),
    };
    tracing::info!(
        event = events::DAEMON_STARTED,
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        data_dir = %data_dir.display(),
        "mbtd starting"
    );
    if cfg.model.precision == crate::model::Precision::Bf16 && !crate::model::ops::has_avx512_bf16()
    {
        tracing::warn!(
            event = events::PRECISION_WITHOUT_HARDWARE,
            precision = cfg.model.precision.kernel(),
            "model.precision = \"bf16\" but this CPU lacks AVX-512 BF16 (avx512f, avx512bw, \
             avx512_bf16): the products run in fp32 on bf16-rounded copies, slower than \"f32\"; \
             set model.precision = \"f32\" unless you want bf16 results"
        );
    }

    let (stop_tx, mut stop_rx) = mpsc::channel(4);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let board = HealthBoard::default();
    let checkpoint_state = std::sync::Arc::new(CheckpointState::default());
    let root = Root::spawn(RootArgs {
        cfg: cfg.clone(),
        data_dir: data_dir.clone(),
        admin_gid,
        recorder,
        board: board.clone(),
        started,
        stop_tx,
        fatal_tx,
        checkpoint_state: checkpoint_state.clone(),
        cluster,
    });
    root.wait_for_startup().await;

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    systemd::ready("running");
    tracing::info!(
        event = events::DAEMON_READY,
        socket = %cfg.admin.socket.display(),
        "mbtd ready"
    );
    let mut watchdog =
        tokio::time::interval(systemd::watchdog_period().unwrap_or(Duration::from_secs(3600)));

    let why = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM".to_string(),
            _ = sigint.recv() => break "SIGINT".to_string(),
            Some(_) = stop_rx.recv() => break "ctl shutdown".to_string(),
            Some(actor) = fatal_rx.recv() => {
                systemd::stopping();
                let _ = std::fs::remove_file(&cfg.admin.socket);
                return Ok(Exit::Failed(format!("actor {actor} crash-looped")));
            }
            _ = watchdog.tick() => {
                if board.all_running() {
                    systemd::watchdog();
                }
            }
        }
    };

    systemd::stopping();
    tracing::info!(event = events::DAEMON_STOPPING, reason = %why, "mbtd stopping");
    // A second signal during the ordered stop exits at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {},
            _ = sigint.recv() => {},
        }
        eprintln!("mbtd: second signal during shutdown, exiting now");
        std::process::exit(130);
    });
    let budget = Duration::from_secs(cfg.daemon.shutdown_timeout_s);
    let stopped = tokio::time::timeout(budget, async {
        for child in root.ask(StopOrder).await.unwrap_or_default() {
            child.stop().await;
        }
        let _ = root.stop_gracefully().await;
        root.wait_for_shutdown().await;
    })
    .await;
    let _ = std::fs::remove_file(&cfg.admin.socket);
    match stopped {
        Ok(()) if checkpoint_state.final_failure().is_some() => Ok(Exit::Failed(
            checkpoint_state.final_failure().unwrap_or_default(),
        )),
        Ok(()) => {
            tracing::info!(
                event = events::DAEMON_STOPPED,
                uptime_s = started.elapsed().as_secs_f64(),
                "mbtd stopped cleanly"
            );
            Ok(Exit::Clean)
        }
        Err(_) => Ok(Exit::Failed(format!(
            "ordered stop did not finish within daemon.shutdown_timeout_s = {}",
            cfg.daemon.shutdown_timeout_s
        ))),
    }
}
