//! [`SwarmTransport`]: the trainer's [`Transport`] over the cluster swarm.
//!
//! The trainer thread is synchronous; each round blocks it on the endpoint's tokio
//! runtime until every host has answered or the round's deadline has passed. A host that
//! is down, unreachable or late gives `None` for that round (its branches are masked by
//! the coordinator); its round-trip time and the last problem are kept for `ctl nodes`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mbtd_core::model::remote::Transport;
use tokio::runtime::Handle;

use crate::PeerId;
use crate::endpoint::{Endpoint, RequestError};

/// What the coordinator knows of one host, for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct HostRecord {
    /// Rounds answered in time.
    pub answered: u64,
    /// Rounds without an answer in time (late, down, unreachable).
    pub missed: u64,
    /// Round-trip times of the answered rounds, seconds, the newest last (bounded).
    pub rtts: Vec<f64>,
    /// Why the last missed round was missed.
    pub last_problem: Option<String>,
    /// Seconds the trainer spent blocked on this host's rounds (each round counts once,
    /// on the host that answered last or missed).
    pub wait_s: f64,
}

const RTT_WINDOW: usize = 1024;

impl HostRecord {
    /// The `q`-quantile (0..=1) of the kept round-trip times.
    pub fn rtt_quantile(&self, q: f64) -> Option<f64> {
        if self.rtts.is_empty() {
            return None;
        }
        let mut v = self.rtts.clone();
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        Some(v[i])
    }
}

/// Branch hosts reached through an [`Endpoint`]: host `h` is `hosts[h]`.
pub struct SwarmTransport {
    endpoint: Endpoint,
    runtime: Handle,
    hosts: Vec<PeerId>,
    deadline: Duration,
    records: Arc<Mutex<Vec<HostRecord>>>,
}

impl SwarmTransport {
    /// A transport to `hosts` whose rounds wait at most `deadline` for answers.
    pub fn new(
        endpoint: Endpoint,
        runtime: Handle,
        hosts: Vec<PeerId>,
        deadline: Duration,
    ) -> Self {
        let records = Arc::new(Mutex::new(vec![HostRecord::default(); hosts.len()]));
        Self {
            endpoint,
            runtime,
            hosts,
            deadline,
            records,
        }
    }

    /// Shared view of the hosts' records (updated after every round).
    pub fn records(&self) -> Arc<Mutex<Vec<HostRecord>>> {
        self.records.clone()
    }
}

impl Transport for SwarmTransport {
    fn exchange(&mut self, requests: Vec<(usize, Vec<u8>)>) -> Vec<Option<Vec<u8>>> {
        let deadline = self.deadline;
        let calls = requests.into_iter().map(|(h, bytes)| {
            let (endpoint, peer) = (self.endpoint.clone(), self.hosts[h]);
            async move {
                let t0 = Instant::now();
                let answer =
                    match tokio::time::timeout(deadline, endpoint.request(peer, bytes)).await {
                        Ok(r) => r,
                        Err(_) => Err(RequestError::Timeout(peer)),
                    };
                (h, answer, t0.elapsed().as_secs_f64())
            }
        });
        let t0 = Instant::now();
        let answers = self.runtime.block_on(futures::future::join_all(calls));
        let waited = t0.elapsed().as_secs_f64();
        let mut records = self.records.lock().unwrap();
        if let Some((h, _, _)) = answers.iter().max_by(|a, b| a.2.total_cmp(&b.2)) {
            records[*h].wait_s += waited;
        }
        answers
            .into_iter()
            .map(|(h, answer, rtt)| {
                let rec = &mut records[h];
                match answer {
                    Ok(bytes) => {
                        rec.answered += 1;
                        if rec.rtts.len() == RTT_WINDOW {
                            rec.rtts.remove(0);
                        }
                        rec.rtts.push(rtt);
                        Some(bytes)
                    }
                    Err(e) => {
                        rec.missed += 1;
                        rec.last_problem = Some(e.to_string());
                        None
                    }
                }
            })
            .collect()
    }
}
