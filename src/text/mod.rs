//! Text handling: CSV rows (reading and writing) and the tokenizer.

pub mod csv_rows;
pub mod csv_write;
pub mod tokenizer;
