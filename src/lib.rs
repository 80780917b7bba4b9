//! mbtd: a daemon that continuously trains a Multi-Branch Transformer language model.
//!
//! Layers of the code: the pure core (`model`, `text`, `store`, `ingest`, `checkpoint`,
//! `govern`, `config`), thin kameo actors (`actors`), and the edges (`admin`, `daemon`,
//! `ctl`, `chat`, `cli`, `telemetry`, `demo`, `report`).

pub mod actors;
pub mod admin;
pub mod chat;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod govern;
pub mod ingest;
pub mod learn;
pub mod model;
pub mod report;
pub mod soak;
pub mod store;
pub mod telemetry;
pub mod text;
