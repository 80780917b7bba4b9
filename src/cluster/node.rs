//! `mbtd node`: a branch host. It loads (or creates) its identity in the data dir,
//! listens on the given address, admits only its coordinator's peer id, and serves the
//! branch step protocol from one [`BranchHost`] until it is stopped. The coordinator
//! pushes the branches it places here (at its start and whenever this node rejoins).
//!
//! Standard output gets one JSON line once the node listens:
//! `{"event":"node_listening","peer_id":…,"addrs":[…]}`; the JSON log goes to stderr.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use anyhow::Context;
use clap::Args;
use mbtd_cluster::{Endpoint, EndpointConfig, PeerEvent, identity};
use mbtd_core::model::remote::{BranchHost, SessionLimits};

/// Options of `mbtd node`.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Address to listen on, as a libp2p multiaddr: `/ip4/0.0.0.0/tcp/7070`
    /// (`/tcp/0`: any free port, printed at start).
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
    pub listen: String,
    /// Directory of this node's identity (`identity.key`, created on first start).
    #[arg(long, default_value = ".")]
    pub data_dir: PathBuf,
    /// Configuration file: its `[model]` section must be the coordinator's.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Peer id of the coordinator, the only peer this node serves.
    #[arg(long, required_unless_present = "print_id")]
    pub coordinator: Option<String>,
    /// Print this node's peer id (creating its identity if needed) and exit.
    #[arg(long)]
    pub print_id: bool,
    /// Most generation sessions (KV caches of `ctl generate` replies) kept at once; opening
    /// one more drops the least recently used.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub generation_sessions: u64,
    /// Seconds after which an unused generation session is dropped.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub generation_idle_secs: u64,
}

impl NodeArgs {
    /// The generation sessions this node keeps (`--generation-sessions`,
    /// `--generation-idle-secs`).
    pub fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_sessions: self.generation_sessions as usize,
            idle: Duration::from_secs(self.generation_idle_secs),
        }
    }
}

/// Runs `mbtd node` until the process is stopped.
pub fn run(args: &NodeArgs) -> anyhow::Result<()> {
    let key_path = args.data_dir.join("identity.key");
    let keypair = identity::load_or_create(&key_path)?;
    if args.print_id {
        println!("{}", identity::peer_id(&keypair));
        return Ok(());
    }
    let coordinator = args
        .coordinator
        .as_deref()
        .expect("clap requires --coordinator without --print-id");
    let coordinator: mbtd_cluster::PeerId = coordinator.parse().with_context(|| {
        format!("--coordinator {coordinator:?} is not a peer id; run `mbtd node --print-id` on the coordinator's machine")
    })?;
    let listen: mbtd_cluster::Multiaddr = args.listen.parse().with_context(|| {
        format!(
            "--listen {:?} is not a multiaddr such as /ip4/0.0.0.0/tcp/7070",
            args.listen
        )
    })?;
    let cfg = Config::load(args.config.as_deref())?;
    crate::telemetry::logging::init(&cfg.logging);
    let host = BranchHost::with_session_limits(cfg.model.clone(), args.session_limits())
        .map_err(|e| anyhow::anyhow!("the config's [model] section cannot host branches: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("mbtd-node-io")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let config = EndpointConfig {
            listen: Some(listen),
            allowed: vec![coordinator],
            request_timeout: Duration::from_secs(3600),
            max_message_bytes: mbtd_cluster::endpoint::DEFAULT_MAX_MESSAGE_BYTES,
            kameo_global: true,
        };
        let (endpoint, incoming, mut events) = Endpoint::start(keypair, config).await?;
        let line = serde_json::json!({
            "event": "node_listening",
            "peer_id": endpoint.peer_id().to_string(),
            "addrs": endpoint.listen_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        });
        println!("{line}");
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    PeerEvent::Up { peer, addr } => {
                        tracing::info!(event = "coordinator_up", peer = %peer, addr = %addr, "coordinator connected")
                    }
                    PeerEvent::Down { peer } => {
                        tracing::warn!(event = "coordinator_down", peer = %peer, "coordinator disconnected")
                    }
                    PeerEvent::Refused { peer, addr } => tracing::warn!(
                        event = "peer_refused",
                        peer = ?peer.map(|p| p.to_string()),
                        addr = %addr,
                        "refused a peer that is not this node's coordinator"
                    ),
                }
            }
        });
        mbtd_cluster::node::serve(endpoint, incoming, host).await;
        anyhow::Ok(())
    })
}
