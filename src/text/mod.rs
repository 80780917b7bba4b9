//! Text handling: CSV rows and the tokenizer.

pub mod csv_rows;
pub mod tokenizer;
