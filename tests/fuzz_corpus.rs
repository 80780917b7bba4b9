//! Replays the committed fuzz seeds (`fuzz/seeds/<target>/`, including every input a fuzzer
//! once failed on) through the same property checks the fuzz targets run, on stable Rust.

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "too few seeds in {}", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "property broken by seed {}", f.display());
    }
}

#[test]
fn csv_rows_seeds_keep_their_properties() {
    replay("csv_rows", mbtd::fuzzing::csv_rows);
}

#[test]
fn admin_lines_seeds_keep_their_properties() {
    replay("admin_lines", mbtd::fuzzing::admin_lines);
}
