//! Text handling: CSV rows, the tokenizer, and the synthetic data of the demo.

pub mod csv_rows;
pub mod synth;
pub mod tokenizer;
