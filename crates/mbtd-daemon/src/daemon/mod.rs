//! `mbtd run`: the daemon's lifecycle — lock the data dir, start the actor tree, tell systemd,
//! wait for a signal or `ctl shutdown`, stop in order within `daemon.shutdown_timeout_s`.

pub mod child;
pub mod lock;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kameo::prelude::*;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::actors::health::HealthBoard;
use crate::actors::supervisor::{Root, RootArgs, StopOrder};
use crate::config::Config;
use crate::telemetry::SnapshotRecorder;
use crate::telemetry::names::events;

/// How the daemon ended, mapped to the process exit code by `main`.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Ordered stop completed.
    Clean,
    /// An actor crash-looped, or the ordered stop overran its budget.
    Failed(String),
}

/// Creates the data dir and the runtime directories of `cfg` (already resolved).
fn prepare_dirs(data_dir: &Path, cfg: &Config) -> anyhow::Result<()> {
    for d in [
        data_dir,
        cfg.paths.inbox.as_path(),
        cfg.paths.replay.as_path(),
        cfg.paths.checkpoints.as_path(),
    ] {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create directory {}", d.display()))?;
    }
    if let Some(parent) = cfg.admin.socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
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

/// Runs the daemon until it is stopped. `cfg` must already have its paths resolved.
pub async fn run(cfg: Config, data_dir: PathBuf) -> anyhow::Result<Exit> {
    let started = Instant::now();
    prepare_dirs(&data_dir, &cfg)?;
    let _lock = lock::DataDirLock::acquire(&data_dir)?;
    let admin_gid =
        match &cfg.admin.group {
            None => None,
            Some(g) => Some(crate::admin::server::group_id(g).ok_or_else(|| {
                crate::admin::server::AdminError::UnknownGroup { group: g.clone() }
            })?),
        };
    let recorder = install_metrics(&cfg)?;
    tracing::info!(
        event = events::DAEMON_STARTED,
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        data_dir = %data_dir.display(),
        "mbtd starting"
    );

    let (stop_tx, mut stop_rx) = mpsc::channel(4);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let board = HealthBoard::default();
    let root = Root::spawn(RootArgs {
        cfg: cfg.clone(),
        data_dir: data_dir.clone(),
        admin_gid,
        recorder,
        board: board.clone(),
        started,
        stop_tx,
        fatal_tx,
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
