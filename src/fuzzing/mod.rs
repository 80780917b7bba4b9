//! Property checks shared by the fuzz targets (`fuzz/`, cargo-fuzz on nightly) and the stable
//! test that replays the committed seed corpus (`tests/fuzz_corpus.rs`). Each entry point
//! takes the raw fuzzer input and panics, naming the broken property, when the code under
//! test misbehaves; any input is allowed.
//!
//! - [`csv_rows`]: the inbox CSV reader ([`crate::text::csv_rows`]).
//! - [`admin_lines`]: the admin socket's line framing and request decoding
//!   ([`crate::admin::server::read_line_bounded`], [`crate::admin::protocol::decode_line`]).

mod admin;
mod csv;

pub use admin::{admin_lines, check_admin_stream};
pub use csv::{check_csv, csv_rows};
