//! Text handling: CSV rows.

pub mod csv_rows;
