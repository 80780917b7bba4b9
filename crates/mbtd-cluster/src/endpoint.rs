//! One process's place on the cluster swarm: a libp2p swarm over TCP with noise
//! (authenticated, encrypted) and yamux, carrying kameo's remote-actor behaviour and the
//! raw-bytes branch protocol ([`crate::codec`]), and admitting only the peers it was
//! configured with.
//!
//! The swarm runs on its own tokio task; [`Endpoint`] is a cheap handle that sends it
//! commands. Requests from peers arrive on the [`Incoming`] channel returned by
//! [`Endpoint::start`]; the handler answers with [`Endpoint::respond`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::request_response::{
    self, InboundRequestId, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, allow_block_list, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{PROTOCOL, RawCodec};

/// How an endpoint listens, whom it admits, and its limits.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Address to listen on (`None`: dial only).
    pub listen: Option<Multiaddr>,
    /// The only peers admitted, in either direction.
    pub allowed: Vec<PeerId>,
    /// A request not answered within this time fails with [`RequestError::Timeout`].
    pub request_timeout: Duration,
    /// Largest message accepted or sent.
    pub max_message_bytes: usize,
    /// Make the swarm the process's kameo remote-actor swarm (one per process).
    pub kameo_global: bool,
}

/// Why a request got no answer.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("peer {0} did not answer within the request timeout")]
    Timeout(PeerId),
    #[error("peer {0} is not connected ({1})")]
    Unreachable(PeerId, String),
    #[error("request to peer {0} failed: {1}")]
    Failed(PeerId, String),
    #[error("cannot connect to {0}: {1}; check that the node runs and listens there")]
    Dial(Multiaddr, String),
    #[error("the cluster endpoint has stopped")]
    Stopped,
}

/// Why an endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot build the cluster transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {reason}; check `cluster.listen` / `--listen`")]
    Listen { addr: Multiaddr, reason: String },
    #[error("a kameo remote swarm already runs in this process")]
    KameoTaken,
}

/// A request from a peer, to be answered with [`Endpoint::respond`].
#[derive(Debug)]
pub struct Incoming {
    pub peer: PeerId,
    pub id: InboundRequestId,
    pub bytes: Vec<u8>,
}

/// Something that happened to a peer connection.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    /// A connection to an admitted peer is up.
    Up { peer: PeerId, addr: Multiaddr },
    /// The last connection to a peer closed.
    Down { peer: PeerId },
    /// A peer not in the allowed list tried to connect (or was dialled) and was refused,
    /// or a kept peer's address answered with another identity (`peer`: the identity met
    /// there; reported once per identity and address).
    Refused {
        peer: Option<PeerId>,
        addr: Multiaddr,
    },
}

/// Payload bytes that crossed the swarm, per peer (message bytes plus their 4-byte
/// length prefix; noise and yamux framing add under 0.1 % on large messages). A request
/// that found no connection to its peer is not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The largest message by default: a forward of 16 × 2,048 positions at d 2,048 in f32.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;

/// How often a kept peer that is down is dialled again.
pub const REDIAL_INTERVAL: Duration = Duration::from_millis(250);

type Reply = oneshot::Sender<Result<Vec<u8>, RequestError>>;

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Request(PeerId, Vec<u8>, Reply),
    Respond(InboundRequestId, Vec<u8>),
    Keep(PeerId, Multiaddr),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    kameo: kameo::remote::Behaviour,
    branch: request_response::Behaviour<RawCodec>,
}

/// Handle to a running swarm task.
#[derive(Clone)]
pub struct Endpoint {
    peer_id: PeerId,
    commands: mpsc::UnboundedSender<Command>,
    traffic: Arc<Mutex<HashMap<PeerId, Traffic>>>,
    listening: Arc<Mutex<Vec<Multiaddr>>>,
}

impl Endpoint {
    /// Builds the swarm, starts listening, and spawns its task on the current tokio
    /// runtime. Returns the handle, the requests from peers and the peer events.
    pub async fn start(
        keypair: Keypair,
        config: EndpointConfig,
    ) -> Result<
        (
            Self,
            mpsc::UnboundedReceiver<Incoming>,
            mpsc::UnboundedReceiver<PeerEvent>,
        ),
        StartError,
    > {
        let peer_id = keypair.public().to_peer_id();
        let codec = RawCodec {
            max_bytes: config.max_message_bytes,
        };
        let timeout = config.request_timeout;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| StartError::Transport(e.to_string()))?
            .with_behaviour(|key| {
                let mut allow = allow_block_list::Behaviour::default();
                for p in &config.allowed {
                    allow.allow_peer(*p);
                }
                let local = key.public().to_peer_id();
                Behaviour {
                    allow,
                    kameo: kameo::remote::Behaviour::new(
                        local,
                        kameo::remote::messaging::Config::default(),
                    ),
                    branch: request_response::Behaviour::with_codec(
                        codec,
                        [(PROTOCOL, ProtocolSupport::Full)],
                        request_response::Config::default().with_request_timeout(timeout),
                    ),
                }
            })
            .map_err(|e| StartError::Transport(e.to_string()))?
            // peers stay connected between steps even when a step takes long
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        if config.kameo_global {
            swarm
                .behaviour()
                .kameo
                .try_init_global()
                .map_err(|_| StartError::KameoTaken)?;
        }
        let listening = Arc::new(Mutex::new(Vec::new()));
        if let Some(addr) = &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| StartError::Listen {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            // wait for the listener's address (port 0 becomes a real port)
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        listening.lock().unwrap().push(address);
                        break;
                    }
                    SwarmEvent::ListenerError { error, .. }
                    | SwarmEvent::ListenerClosed {
                        reason: Err(error), ..
                    } => {
                        return Err(StartError::Listen {
                            addr: addr.clone(),
                            reason: error.to_string(),
                        });
                    }
                    _ => {}
                }
            }
        }
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let traffic = Arc::new(Mutex::new(HashMap::new()));
        let task = SwarmTask {
            swarm,
            allowed: config.allowed.iter().copied().collect(),
            pending: HashMap::new(),
            dials: Vec::new(),
            responders: HashMap::new(),
            keep: HashMap::new(),
            connected: HashSet::new(),
            wrong_ids: HashSet::new(),
            incoming: incoming_tx,
            events: events_tx,
            traffic: traffic.clone(),
            listening: listening.clone(),
        };
        tokio::spawn(task.run(command_rx));
        Ok((
            Self {
                peer_id,
                commands,
                traffic,
                listening,
            },
            incoming,
            events,
        ))
    }

    /// This endpoint's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses the swarm listens on.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listening.lock().unwrap().clone()
    }

    /// Dials `addr` and waits until the connection is up (or failed).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial(addr.clone(), tx))
            .map_err(|_| RequestError::Stopped)?;
        rx.await
            .map_err(|_| RequestError::Stopped)?
            .map_err(|e| RequestError::Dial(addr, e))
    }

    /// Sends `bytes` to `peer` and waits for its answer.
    pub async fn request(&self, peer: PeerId, bytes: Vec<u8>) -> Result<Vec<u8>, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Request(peer, bytes, tx))
            .map_err(|_| RequestError::Stopped)?;
        rx.await.map_err(|_| RequestError::Stopped)?
    }

    /// Keeps a connection to `peer` at `addr`: dials it now and again every
    /// [`REDIAL_INTERVAL`] while it is down, so a node that restarts is reconnected
    /// without anyone asking.
    pub fn keep_connected(&self, peer: PeerId, addr: Multiaddr) {
        let _ = self.commands.send(Command::Keep(peer, addr));
    }

    /// Answers a request received on the [`Incoming`] channel.
    pub fn respond(&self, id: InboundRequestId, bytes: Vec<u8>) {
        let _ = self.commands.send(Command::Respond(id, bytes));
    }

    /// Payload bytes exchanged with each peer so far.
    pub fn traffic(&self) -> HashMap<PeerId, Traffic> {
        self.traffic.lock().unwrap().clone()
    }
}

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    allowed: HashSet<PeerId>,
    /// Requests in flight: their peer, their size as counted, and who waits.
    pending: HashMap<OutboundRequestId, (PeerId, usize, Reply)>,
    dials: Vec<oneshot::Sender<Result<(), String>>>,
    responders: HashMap<InboundRequestId, (PeerId, ResponseChannel<Vec<u8>>)>,
    keep: HashMap<PeerId, Multiaddr>,
    connected: HashSet<PeerId>,
    /// Identities met at a kept peer's address instead of the peer's, already reported.
    wrong_ids: HashSet<(PeerId, Multiaddr)>,
    incoming: mpsc::UnboundedSender<Incoming>,
    events: mpsc::UnboundedSender<PeerEvent>,
    traffic: Arc<Mutex<HashMap<PeerId, Traffic>>>,
    listening: Arc<Mutex<Vec<Multiaddr>>>,
}

impl SwarmTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
                _ = redial.tick() => self.redial(),
            }
        }
    }

    fn redial(&mut self) {
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        for (peer, addr) in &self.keep {
            if !self.connected.contains(peer) {
                let opts = DialOpts::peer_id(*peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                // a failed dial is reported as an event and retried at the next tick
                let _ = self.swarm.dial(opts);
            }
        }
    }

    fn count(&self, peer: PeerId, bytes_in: usize, bytes_out: usize) {
        let mut t = self.traffic.lock().unwrap();
        let e = t.entry(peer).or_default();
        e.bytes_in += bytes_in as u64;
        e.bytes_out += bytes_out as u64;
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial(addr, tx) => match self.swarm.dial(addr) {
                Ok(()) => self.dials.push(tx),
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            },
            Command::Request(peer, bytes, reply) => {
                if !self.allowed.contains(&peer) {
                    let _ = reply.send(Err(RequestError::Unreachable(
                        peer,
                        "not in the configured peers".into(),
                    )));
                    return;
                }
                let size = bytes.len() + 4;
                self.count(peer, 0, size);
                let id = self.swarm.behaviour_mut().branch.send_request(&peer, bytes);
                self.pending.insert(id, (peer, size, reply));
            }
            Command::Keep(peer, addr) => {
                self.keep.insert(peer, addr);
                self.redial();
            }
            Command::Respond(id, bytes) => {
                if let Some((peer, channel)) = self.responders.remove(&id) {
                    self.count(peer, 0, bytes.len() + 4);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .branch
                        .send_response(channel, bytes);
                }
            }
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listening.lock().unwrap().push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if num_established.get() == 1 {
                    self.connected.insert(peer_id);
                    let _ = self.events.send(PeerEvent::Up {
                        peer: peer_id,
                        addr: endpoint.get_remote_address().clone(),
                    });
                }
                for tx in self.dials.drain(..) {
                    let _ = tx.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                let _ = self.events.send(PeerEvent::Down { peer: peer_id });
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    let _ = self.events.send(PeerEvent::Refused {
                        peer: peer_id,
                        addr: send_back_addr,
                    });
                }
            }
            SwarmEvent::OutgoingConnectionError { error, peer_id, .. } => {
                match &error {
                    libp2p::swarm::DialError::Denied { .. } => {
                        let _ = self.events.send(PeerEvent::Refused {
                            peer: peer_id,
                            addr: Multiaddr::empty(),
                        });
                    }
                    // a kept peer's address answered with another identity: reported
                    // once per identity and address, not at every redial
                    libp2p::swarm::DialError::WrongPeerId { obtained, address }
                        if self.wrong_ids.insert((*obtained, address.clone())) =>
                    {
                        let _ = self.events.send(PeerEvent::Refused {
                            peer: Some(*obtained),
                            addr: address.clone(),
                        });
                    }
                    _ => {}
                }
                for tx in self.dials.drain(..) {
                    let _ = tx.send(Err(error.to_string()));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Branch(ev)) => self.branch_event(ev),
            _ => {}
        }
    }

    fn branch_event(&mut self, ev: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event, Message, OutboundFailure};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request_id,
                        request,
                        channel,
                    },
                ..
            } => {
                self.count(peer, request.len() + 4, 0);
                self.responders.insert(request_id, (peer, channel));
                let _ = self.incoming.send(Incoming {
                    peer,
                    id: request_id,
                    bytes: request,
                });
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                self.count(peer, response.len() + 4, 0);
                if let Some((_, _, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, size, reply)) = self.pending.remove(&request_id) {
                    let err = match error {
                        OutboundFailure::Timeout => RequestError::Timeout(peer),
                        OutboundFailure::DialFailure => {
                            // no connection: the request never left
                            let mut t = self.traffic.lock().unwrap();
                            if let Some(e) = t.get_mut(&peer) {
                                e.bytes_out -= size as u64;
                            }
                            RequestError::Unreachable(peer, error.to_string())
                        }
                        e => RequestError::Failed(peer, e.to_string()),
                    };
                    let _ = reply.send(Err(err));
                }
            }
            Event::InboundFailure { request_id, .. } => {
                self.responders.remove(&request_id);
            }
            Event::ResponseSent { .. } => {}
        }
    }
}
