//! mbtd: a daemon that continuously trains a Multi-Branch Transformer language model.
//!
//! The code is a workspace of crates whose layering the compiler enforces:
//! - `mbtd-core` (crates/mbtd-core): the pure core — model, text, store, ingest decisions,
//!   checkpoint format, governor, learning policy, configuration. No tokio, no kameo.
//! - `mbtd-admin` (crates/mbtd-admin): the admin wire protocol, its client and `mbtd ctl`
//!   (which therefore cannot reach the actor layer).
//! - `mbtd-daemon` (crates/mbtd-daemon): the actors, the admin server, start-up and
//!   shutdown, telemetry.
//! - this crate: the command line, `mbtd ctl`, `mbtd chat`, and the tools (benchmarks, demo, soak,
//!   report, fuzzing).
//!
//! The modules of the crates below are re-exported here under their own names
//! (`mbtd::model`, `mbtd::actors`, …).

pub use mbtd_admin::ctl;
pub use mbtd_core::{checkpoint, config, govern, ingest, learn, model, store, text};
pub use mbtd_daemon::{actors, admin, daemon, telemetry};

pub mod chat;
pub mod cli;
pub mod cluster;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod report;
pub mod soak;
