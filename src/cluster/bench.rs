//! `mbtd bench cluster`: the same training run in one process and with its branches on
//! `mbtd node` processes on loopback (a coordinator and `--nodes` nodes), step by step in
//! the same minutes, and one JSON line: tokens per second of each, bytes on the wire per
//! step against the tensors' raw size, the time per step the coordinator is blocked
//! waiting for the nodes (their compute and the transfers: on one machine the two
//! cannot be told apart), the largest loss difference and, after pulling the nodes' branches back, whether the
//! model and optimizer bytes of the two runs are bitwise equal.
//!
//! With `--fault kill|stop`, node 0 is killed (SIGKILL) or paused (SIGSTOP) after
//! `--fault-at` timed steps and brought back (restarted with the same identity and
//! address, or SIGCONT) after `--fault-steps` more; the report then gives the step times
//! before, during (p50, p99 by nearest rank, and the slowest: with 50 steps or fewer
//! during the fault p99 is the slowest) and after the fault, the steps in which node 0's
//! branches were masked, and the seconds from its return to the first step that computed
//! its branches again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use anyhow::{Context, bail};
use clap::Args;
use mbtd_cluster::Keypair;
use mbtd_cluster::{Endpoint, EndpointConfig, SwarmTransport};
use mbtd_core::model::bench::{BenchPreset, random_batch};
use mbtd_core::model::remote::{RemoteBranches, WirePrecision};
use mbtd_core::model::{Model, ModelConfig, OptimConfig, Trainer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// Activations on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// f32: the cluster run is bitwise the one-process run.
    F32,
    /// bfloat16: half the bytes; losses agree within a tolerance.
    Bf16,
}

/// What happens to node 0 during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Nothing: every node up (the bitwise comparison runs).
    None,
    /// `kill -9`, then a restart with the same identity and address.
    Kill,
    /// SIGSTOP (a straggler), then SIGCONT.
    Stop,
}

/// Options of `mbtd bench cluster`.
#[derive(Debug, Clone, Args)]
pub struct ClusterBenchArgs {
    /// Model to train.
    #[arg(long, value_enum, default_value_t = BenchPreset::Default)]
    pub preset: BenchPreset,
    /// Node processes; branch `i` of every layer is placed on node `i mod nodes`.
    #[arg(long, default_value_t = 2)]
    pub nodes: usize,
    /// Timed training steps (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Activations on the wire.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    pub wire: Wire,
    /// Seed of the model and the tokens.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Longest wait for the nodes' answers in one round, milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub deadline_ms: u64,
    /// Fault injected into node 0.
    #[arg(long, value_enum, default_value_t = Fault::None)]
    pub fault: Fault,
    /// Timed steps before the fault.
    #[arg(long, default_value_t = 5)]
    pub fault_at: usize,
    /// Steps trained while node 0 is down or paused.
    #[arg(long, default_value_t = 10)]
    pub fault_steps: usize,
}

/// A running `mbtd node` (started by the benchmark and the cluster tests), killed when
/// dropped.
pub struct NodeProcess {
    child: Child,
    /// Its identity.
    pub peer: mbtd_cluster::PeerId,
    /// The first address it listens on.
    pub addr: mbtd_cluster::Multiaddr,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl NodeProcess {
    /// SIGKILL, then reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `exe node` serving `coordinator` on `listen` with the identity in `dir` (and
/// `extra` arguments), and waits for its `node_listening` line.
pub fn start_node(
    exe: &Path,
    dir: &Path,
    config: &Path,
    coordinator: &str,
    listen: &str,
    extra: &[&str],
) -> anyhow::Result<NodeProcess> {
    let mut child = Command::new(exe)
        .arg("node")
        .arg(format!("--listen={listen}"))
        .arg("--data-dir")
        .arg(dir)
        .arg("--config")
        .arg(config)
        .arg("--coordinator")
        .arg(coordinator)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start `mbtd node`")?;
    // the node's JSON log shares its standard output: find the listening line, then
    // keep draining the pipe so the node never blocks on a full one
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    let v: Value = loop {
        line.clear();
        if out
            .read_line(&mut line)
            .context("reading the node's output")?
            == 0
        {
            bail!("`mbtd node` exited before listening");
        }
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["event"] == "node_listening"
        {
            break v;
        }
    };
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let field = |k: &str| -> anyhow::Result<String> {
        let s = match k {
            "addr" => v["addrs"][0].as_str(),
            _ => v[k].as_str(),
        };
        s.map(str::to_owned)
            .with_context(|| format!("the node's listening line lacks {k}: {line}"))
    };
    Ok(NodeProcess {
        peer: field("peer_id")?.parse()?,
        addr: field("addr")?.parse()?,
        child,
    })
}

fn trainer(cfg: &ModelConfig, seed: u64) -> anyhow::Result<Trainer> {
    let optim = OptimConfig {
        warmup_steps: 0,
        ..OptimConfig::default()
    };
    Ok(Trainer::new(Model::new(cfg.clone(), seed)?, optim)?)
}

/// Raw bytes of the activations one training step moves when every branch is remote:
/// per layer, `h` to each node and each branch's `z` back, then `∂L/∂h'` to each node
/// and each branch's `∂L/∂h` back.
fn raw_step_bytes(cfg: &ModelConfig, nodes: usize, n: usize, elem: usize) -> u64 {
    let per_layer = 2 * (nodes.min(cfg.branches) + cfg.branches) * n * cfg.d_model * elem;
    (cfg.n_layers * per_layer) as u64
}

/// Runs the benchmark; one JSON object.
pub fn bench_cluster(a: &ClusterBenchArgs) -> anyhow::Result<Value> {
    if a.nodes == 0 || a.steps == 0 {
        bail!("--nodes and --steps must be at least 1");
    }
    let cfg = a.preset.config(a.seq);
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let config_path = dir.path().join("node.toml");
    let exe = std::env::current_exe().context("cannot find the mbtd executable")?;
    let node_cfg = Config {
        model: cfg.clone(),
        ..Config::default()
    };
    std::fs::write(&config_path, toml::to_string(&node_cfg)?)
        .context("cannot write the nodes' config")?;
    let coord_key = Keypair::generate_ed25519();
    let coord_id = coord_key.public().to_peer_id().to_string();
    let mut nodes = (0..a.nodes)
        .map(|k| {
            let d = dir.path().join(format!("node{k}"));
            std::fs::create_dir_all(&d)?;
            start_node(
                &exe,
                &d,
                &config_path,
                &coord_id,
                "/ip4/127.0.0.1/tcp/0",
                &[],
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (endpoint, mut peer_events) = rt.block_on(async {
        let (endpoint, _, events) = Endpoint::start(
            coord_key,
            EndpointConfig {
                listen: None,
                allowed: nodes.iter().map(|n| n.peer).collect(),
                request_timeout: Duration::from_millis(a.deadline_ms),
                max_message_bytes: mbtd_cluster::endpoint::DEFAULT_MAX_MESSAGE_BYTES,
                kameo_global: true,
            },
        )
        .await?;
        for n in &nodes {
            endpoint.dial(n.addr.clone()).await?;
            endpoint.keep_connected(n.peer, n.addr.clone());
        }
        anyhow::Ok((endpoint, events))
    })?;
    let transport = SwarmTransport::new(
        endpoint.clone(),
        rt.handle().clone(),
        nodes.iter().map(|n| n.peer).collect(),
        Duration::from_millis(a.deadline_ms),
    );
    let records = transport.records();
    let wire = match a.wire {
        Wire::F32 => WirePrecision::F32,
        Wire::Bf16 => WirePrecision::Bf16,
    };
    let placement = (0..cfg.n_layers)
        .map(|_| (0..cfg.branches).map(|i| Some(i % a.nodes)).collect())
        .collect();
    let mut local = trainer(&cfg, a.seed)?;
    let mut cluster = trainer(&cfg, a.seed)?;
    cluster.attach_remote(RemoteBranches::new(placement, Box::new(transport), wire))?;

    let masks = local.model().all_active();
    let scales: Vec<Vec<f32>> = masks.iter().map(|m| vec![1.0; m.len()]).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    if a.fault != Fault::None {
        let mut run = FaultRun {
            a,
            cfg: &cfg,
            cluster: &mut cluster,
            masks: &masks,
            scales: &scales,
            rng: &mut rng,
            node_dir: dir.path().join("node0"),
            records: records.clone(),
            exe: &exe,
            config_path: &config_path,
            coord_id: &coord_id,
        };
        return run.run(&mut nodes, &mut peer_events);
    }
    let (mut t_local, mut t_cluster, mut max_dloss) = (0.0f64, 0.0f64, 0.0f32);
    let (mut wait0, mut bytes0) = (0.0f64, 0u64);
    let wire_bytes =
        |e: &Endpoint| -> u64 { e.traffic().values().map(|t| t.bytes_in + t.bytes_out).sum() };
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            wait0 = records.lock().unwrap().iter().map(|r| r.wait_s).sum();
            bytes0 = wire_bytes(&endpoint);
        }
        let batch = random_batch(&cfg, a.batch, a.seq, 0, &mut rng);
        let t0 = Instant::now();
        let l = local.train_step(&batch, &masks, &scales)?;
        let t1 = Instant::now();
        let c = cluster.train_step(&batch, &masks, &scales)?;
        let t2 = Instant::now();
        if step >= a.warmup {
            t_local += (t1 - t0).as_secs_f64();
            t_cluster += (t2 - t1).as_secs_f64();
        }
        max_dloss = max_dloss.max((l.loss - c.loss).abs() / l.loss.abs().max(1e-6));
    }
    let wait: f64 = records
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.wait_s)
        .sum::<f64>()
        - wait0;
    let bytes = wire_bytes(&endpoint) - bytes0;
    cluster.pull_branches()?;
    let bitwise = local.model_bytes()? == cluster.model_bytes()?
        && local.optimizer_bytes()? == cluster.optimizer_bytes()?;
    let stats = cluster
        .remote()
        .map(|r| r.stats().clone())
        .unwrap_or_default();
    let tokens = (a.steps * a.batch * a.seq) as f64;
    let elem = if a.wire == Wire::F32 { 4 } else { 2 };
    let raw = raw_step_bytes(&cfg, a.nodes, a.batch * a.seq, elem);
    let per_step = bytes as f64 / a.steps as f64;
    drop(nodes);
    Ok(json!({
        "bench": "cluster",
        "preset": format!("{:?}", a.preset).to_lowercase(),
        "nodes": a.nodes,
        "wire": format!("{:?}", a.wire).to_lowercase(),
        "steps": a.steps,
        "tokens_per_step": a.batch * a.seq,
        "tokens_per_sec_one_process": tokens / t_local,
        "tokens_per_sec_cluster": tokens / t_cluster,
        "wire_bytes_per_step": per_step,
        "raw_tensor_bytes_per_step": raw,
        "wire_over_raw": per_step / raw as f64,
        "waiting_on_nodes_s_per_step": wait / a.steps as f64,
        "step_s_one_process": t_local / a.steps as f64,
        "step_s_cluster": t_cluster / a.steps as f64,
        "max_rel_loss_diff": max_dloss,
        "bitwise_equal": bitwise,
        "branches_masked": stats.missed.iter().flatten().sum::<u64>(),
        "steps_abandoned": stats.steps_abandoned,
    }))
}

/// The state of a run with a fault injected into node 0.
struct FaultRun<'a> {
    a: &'a ClusterBenchArgs,
    cfg: &'a ModelConfig,
    cluster: &'a mut Trainer,
    masks: &'a mbtd_core::model::Masks,
    scales: &'a [Vec<f32>],
    rng: &'a mut ChaCha8Rng,
    node_dir: std::path::PathBuf,
    records: std::sync::Arc<std::sync::Mutex<Vec<mbtd_cluster::HostRecord>>>,
    exe: &'a Path,
    config_path: &'a Path,
    coord_id: &'a str,
}

/// Seconds at quantile `q` of `v` (sorted in place).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

impl FaultRun<'_> {
    /// One training step: its seconds and whether node 0's branches were all computed.
    fn step(&mut self) -> anyhow::Result<(f64, bool, f32)> {
        let batch = random_batch(self.cfg, self.a.batch, self.a.seq, 0, self.rng);
        let t0 = Instant::now();
        let r = self
            .cluster
            .train_step(&batch, self.masks, &self.scales.to_vec())?;
        let dt = t0.elapsed().as_secs_f64();
        let on_node0 = r.computed.iter().all(|layer| {
            layer
                .iter()
                .enumerate()
                .all(|(i, &on)| i % self.a.nodes != 0 || on)
        });
        Ok((dt, on_node0, r.loss))
    }

    fn run(
        &mut self,
        nodes: &mut [NodeProcess],
        events: &mut tokio::sync::mpsc::UnboundedReceiver<mbtd_cluster::PeerEvent>,
    ) -> anyhow::Result<Value> {
        let a = self.a;
        let (mut before, mut during, mut after) = (Vec::new(), Vec::new(), Vec::new());
        let mut masked_steps = 0usize;
        for _ in 0..a.warmup {
            self.step()?;
        }
        for _ in 0..a.fault_at {
            before.push(self.step()?.0);
        }
        while events.try_recv().is_ok() {} // the connections made at the start
        let pid = nodes[0].child.id() as i32;
        match a.fault {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            Fault::Stop => unsafe {
                libc::kill(pid, libc::SIGSTOP);
            },
            _ => {
                let _ = nodes[0].child.kill();
                let _ = nodes[0].child.wait();
            }
        }
        for _ in 0..a.fault_steps {
            let (dt, on, _) = self.step()?;
            during.push(dt);
            masked_steps += usize::from(!on);
        }
        let back = Instant::now();
        match a.fault {
            // SAFETY: as above.
            Fault::Stop => unsafe {
                libc::kill(pid, libc::SIGCONT);
            },
            _ => {
                let listen = nodes[0].addr.to_string();
                nodes[0] = start_node(
                    self.exe,
                    &self.node_dir,
                    self.config_path,
                    self.coord_id,
                    &listen,
                    &[],
                )?;
            }
        }
        let mut rejoin_s = None;
        let mut last_loss = f32::NAN;
        while back.elapsed() < Duration::from_secs(30) {
            while let Ok(ev) = events.try_recv() {
                if let mbtd_cluster::PeerEvent::Up { peer, .. } = ev
                    && peer == nodes[0].peer
                    && a.fault == Fault::Kill
                {
                    // connected again: worth asking; a restarted node holds nothing, so it
                    // gets the coordinator's copy of its branches
                    self.records.lock().unwrap()[0].suspect = false;
                    if let Err(e) = self.cluster.push_branches(Some(0)) {
                        let why = self.records.lock().unwrap()[0].last_problem.clone();
                        bail!("{e} (last problem with node 0: {why:?})");
                    }
                }
            }
            let (dt, on, loss) = self.step()?;
            last_loss = loss;
            if rejoin_s.is_none() {
                masked_steps += usize::from(!on);
                if on {
                    rejoin_s = Some(back.elapsed().as_secs_f64());
                }
            } else {
                after.push(dt);
                if after.len() >= a.fault_at.max(3) {
                    break;
                }
            }
        }
        let stats = self
            .cluster
            .remote()
            .map(|r| r.stats().clone())
            .unwrap_or_default();
        Ok(json!({
            "bench": "cluster",
            "fault": format!("{:?}", a.fault).to_lowercase(),
            "preset": format!("{:?}", a.preset).to_lowercase(),
            "nodes": a.nodes,
            "deadline_s": a.deadline_ms as f64 / 1e3,
            "step_s_p50_before": quantile(&mut before, 0.5),
            "step_s_p50_during": quantile(&mut during.clone(), 0.5),
            "steps_during": during.len(),
            "step_s_p99_during": quantile(&mut during.clone(), 0.99),
            "step_s_max_during": quantile(&mut during, 1.0),
            "step_s_p50_after": quantile(&mut after, 0.5),
            "steps_with_node0_masked": masked_steps,
            "rejoin_s": rejoin_s,
            "steps_abandoned": stats.steps_abandoned,
            "branches_masked": stats.missed.iter().flatten().sum::<u64>(),
            "final_loss_finite": last_loss.is_finite(),
        }))
    }
}
