//! [`SwarmTransport`]: the trainer's [`Transport`] over the cluster swarm.
//!
//! The trainer thread is synchronous; each round blocks it on the endpoint's tokio
//! runtime until every host has answered or the round's deadline has passed. A host that
//! is down, unreachable or late gives `None` for that round (its branches are masked by
//! the coordinator); its round-trip time and the last problem are kept for `ctl nodes`.
//!
//! A host that missed a round is *suspect*: later rounds do not wait for it (it gives
//! `None` at once), so a stopped node costs one deadline, not one per layer and step.
//! An empty request (a ping, answered by the node's network task even while it computes)
//! goes to each suspect host at most once per [`PING_INTERVAL`]; its answer clears the
//! suspicion and the host is asked again from the next round on.

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
    /// The host missed a round and has not answered a ping since.
    pub suspect: bool,
    /// Seconds the trainer spent blocked on this host's rounds (each round counts once,
    /// on the host that answered last or missed).
    pub wait_s: f64,
}

impl HostRecord {
    /// Which hosts of `records` are suspect, in host order.
    pub fn suspects(records: &std::sync::Mutex<Vec<HostRecord>>) -> Vec<bool> {
        let records = records.lock().unwrap_or_else(|p| p.into_inner());
        records.iter().map(|r| r.suspect).collect()
    }
}

const RTT_WINDOW: usize = 1024;

/// How often a suspect host is pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(200);

/// Branch hosts reached through an [`Endpoint`]: host `h` is `hosts[h]`.
pub struct SwarmTransport {
    endpoint: Endpoint,
    runtime: Handle,
    hosts: Vec<PeerId>,
    deadline: Duration,
    records: Arc<Mutex<Vec<HostRecord>>>,
    last_ping: Vec<Option<Instant>>,
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
            last_ping: vec![None; hosts.len()],
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

impl SwarmTransport {
    /// Pings host `h` in the background; an answer clears its suspicion.
    fn ping(&self, h: usize) {
        let (endpoint, peer, records) =
            (self.endpoint.clone(), self.hosts[h], self.records.clone());
        let deadline = self.deadline;
        self.runtime.spawn(async move {
            if let Ok(Ok(_)) =
                tokio::time::timeout(deadline, endpoint.request(peer, Vec::new())).await
            {
                records.lock().unwrap()[h].suspect = false;
            }
        });
    }
}

impl Transport for SwarmTransport {
    fn exchange(&mut self, requests: Vec<(usize, Vec<u8>)>) -> Vec<Option<Vec<u8>>> {
        let deadline = self.deadline;
        let suspect = HostRecord::suspects(&self.records);
        for (h, &s) in suspect.iter().enumerate() {
            if s && self.last_ping[h].is_none_or(|t| t.elapsed() >= PING_INTERVAL) {
                self.last_ping[h] = Some(Instant::now());
                self.ping(h);
            }
        }
        let order: Vec<usize> = requests.iter().map(|(h, _)| *h).collect();
        let calls = requests
            .into_iter()
            .filter(|(h, _)| !suspect[*h])
            .map(|(h, bytes)| {
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
        let mut replies: Vec<(usize, Option<Vec<u8>>)> = answers
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
                        (h, Some(bytes))
                    }
                    Err(e) => {
                        rec.missed += 1;
                        rec.suspect = true;
                        rec.last_problem = Some(e.to_string());
                        (h, None)
                    }
                }
            })
            .collect();
        for &h in order.iter().filter(|&&h| suspect[h]) {
            records[h].missed += 1;
        }
        order
            .into_iter()
            .map(|h| {
                let i = replies.iter().position(|(g, _)| *g == h);
                i.and_then(|i| replies[i].1.take())
            })
            .collect()
    }
}
