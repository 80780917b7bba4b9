//! Admin request lines: properties in `mbtd::fuzzing::admin_lines`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mbtd::fuzzing::admin_lines(data));
