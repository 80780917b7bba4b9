//! The inbox CSV reader: properties in `mbtd::fuzzing::csv_rows`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mbtd::fuzzing::csv_rows(data));
