//! mbtd: a daemon that continuously trains a Multi-Branch Transformer language model.
//!
//! Layers of the code: the pure core (`model`, `text`, `store`, `ingest`, `checkpoint`,
//! `govern`, `config`), thin kameo actors (`actors`), and the edges (`admin`, `main.rs`).

pub mod checkpoint;
pub mod config;
pub mod govern;
pub mod text;
