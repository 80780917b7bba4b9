//! Branches on other machines: the transport between a coordinator (`mbtd run` with a
//! `[cluster]` section) and its branch hosts (`mbtd node`).
//!
//! - [`identity`]: each machine's Ed25519 key pair; its libp2p peer id is its name in
//!   configs and logs.
//! - [`endpoint`]: the libp2p swarm (TCP, noise, yamux) that carries kameo's remote
//!   actors and the raw-bytes branch protocol, admitting configured peers only.
//! - [`codec`]: the length-prefixed raw-bytes protocol for tensors.
//! - [`transport`]: the trainer's `Transport` (one round of requests under a deadline)
//!   over an endpoint.
//! - [`node`]: the serving loop of a branch host.

pub mod codec;
pub mod endpoint;
pub mod identity;
pub mod node;
pub mod transport;

pub use endpoint::{
    Endpoint, EndpointConfig, Incoming, PeerEvent, RequestError, StartError, Traffic,
};
pub use libp2p::identity::Keypair;
pub use libp2p::{Multiaddr, PeerId};
pub use transport::{HostRecord, SwarmTransport};
