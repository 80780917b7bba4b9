//! mbtd's pure core: the Multi-Branch Transformer (forward, backward, optimizer, growth,
//! generation), text (tokenizer, CSV rows), the replay store, ingest decisions, the
//! checkpoint format, the governor and learning policies, and the configuration.
//!
//! Plain functions and structs, no async runtime and no actors: the daemon
//! (`mbtd-daemon`) drives this crate, never the other way round.

pub mod checkpoint;
pub mod config;
pub mod govern;
pub mod ingest;
pub mod learn;
pub mod model;
pub mod store;
pub mod text;
