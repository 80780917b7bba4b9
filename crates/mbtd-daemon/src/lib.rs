//! The mbtd daemon: supervised kameo actors that each own one thing (ingestion, the replay
//! store, the trainer, checkpoints, metrics, the admin socket), the admin server, start-up
//! and shutdown (`daemon`), and telemetry (metric and event names, recorder, logging).
//!
//! The maths and formats come from `mbtd-core`, re-exported here under their module names
//! so the actors read `crate::model`, `crate::store`, … like the rest of the code.

pub use mbtd_core::{checkpoint, config, govern, ingest, learn, model, store, text};

pub mod actors;
pub mod cluster;
pub mod daemon;
pub mod telemetry;

/// The admin socket: the protocol and client (crate `mbtd-admin`) and the daemon's server.
pub mod admin {
    pub use mbtd_admin::{client, protocol};
    pub mod server;
    pub mod server_events;
}
