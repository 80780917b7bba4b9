//! Helpers shared by the checkpoint module's unit tests.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{CheckpointInfo, Manifest, write_checkpoint};

pub(crate) fn t(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_795_428_902_000 + ms)
}

pub(crate) fn manifest(ms: u64, step: u64) -> Manifest {
    let mut m = Manifest::new(t(ms), step, step * 100);
    m.widths = vec![4, 4];
    m.control_loss = Some(2.5);
    m.config = serde_json::json!({"model": {"d": 64}});
    m.state = serde_json::json!({"rng": "abc", "cursor": step});
    m
}

pub(crate) fn safetensors_of(name: &str, values: &[f32]) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let data: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![values.len()], &data).unwrap();
    safetensors::serialize(vec![(name, view)], None).unwrap()
}

pub(crate) fn payload(step: u64) -> Vec<(String, Vec<u8>)> {
    let w: Vec<f32> = (0..1000).map(|i| (i + step) as f32).collect();
    vec![
        ("model.safetensors".into(), safetensors_of("wte", &w)),
        (
            "optimizer.safetensors".into(),
            safetensors_of("adam.m.wte", &w[..80]),
        ),
        ("tokenizer.json".into(), b"{\"version\":\"1.0\"}".to_vec()),
    ]
}

pub(crate) fn write(root: &Path, ms: u64, step: u64) -> CheckpointInfo {
    let p = payload(step);
    let files: Vec<(&str, &[u8])> = p.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    write_checkpoint(root, &manifest(ms, step), &files).unwrap()
}

/// Names in `root`, sorted.
pub(crate) fn dir_names(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}
