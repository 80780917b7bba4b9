//! Text handling: CSV rows (reading and writing), the tokenizer, and the synthetic data of the
//! demo.

pub mod csv_rows;
pub mod csv_write;
pub mod synth;
pub mod tokenizer;
