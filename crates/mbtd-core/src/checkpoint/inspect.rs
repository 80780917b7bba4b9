//! `mbtd inspect checkpoint`: an offline check of one checkpoint directory, hashing every
//! file, with the tensors of each `*.safetensors` file.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::{check_file, read_manifest};
use super::manifest::Manifest;

/// The check of one file by [`inspect`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheck {
    /// File name.
    pub name: String,
    /// Size the manifest records.
    pub expected_bytes: u64,
    /// Size on disk (`None`: missing).
    pub actual_bytes: Option<u64>,
    /// blake3 the manifest records.
    pub expected_blake3: String,
    /// blake3 of the content (`None`: missing).
    pub actual_blake3: Option<String>,
    /// Size and hash match.
    pub ok: bool,
}

/// One tensor of a `*.safetensors` file, from its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSummary {
    /// The file.
    pub file: String,
    /// Tensor name.
    pub name: String,
    /// Element type (`F32`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub elements: u64,
}

/// Offline report on one checkpoint directory (`mbtd inspect checkpoint <dir>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inspection {
    /// The directory.
    pub dir: PathBuf,
    /// Whether the manifest and every file verified.
    pub valid: bool,
    /// Problems found (empty when valid).
    pub problems: Vec<String>,
    /// The manifest, if readable.
    pub manifest: Option<Manifest>,
    /// Per-file checks.
    pub files: Vec<FileCheck>,
    /// Tensors of every readable `*.safetensors` file, in file order.
    pub tensors: Vec<TensorSummary>,
}

fn safetensors_index(file: &str, bytes: &[u8]) -> Result<Vec<TensorSummary>, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("{file}: not a valid safetensors file: {e}"))?;
    let infos = meta.tensors();
    Ok(meta
        .offset_keys()
        .into_iter()
        .filter_map(|name| {
            let info = infos.get(&name)?;
            Some(TensorSummary {
                file: file.to_string(),
                dtype: info.dtype.to_string(),
                elements: info.shape.iter().map(|&d| d as u64).product(),
                shape: info.shape.clone(),
                name,
            })
        })
        .collect())
}

/// Verifies one checkpoint directory offline and reports every file's status.
pub fn inspect(dir: &Path) -> Inspection {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    let manifest = match read_manifest(dir) {
        Ok(m) => Some(m),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let Some(m) = &manifest {
        for (name, entry) in &m.files {
            let content = fs::read(dir.join(name)).ok();
            let actual_bytes = content.as_ref().map(|c| c.len() as u64);
            let actual_blake3 = content
                .as_ref()
                .map(|c| blake3::hash(c).to_hex().to_string());
            if let Err(e) = check_file(dir, name, entry) {
                problems.push(e.to_string());
            }
            if let (true, Some(c)) = (name.ends_with(".safetensors"), &content) {
                match safetensors_index(name, c) {
                    Ok(t) => tensors.extend(t),
                    Err(e) => problems.push(e),
                }
            }
            files.push(FileCheck {
                ok: actual_bytes == Some(entry.bytes)
                    && actual_blake3.as_deref() == Some(entry.blake3.as_str()),
                name: name.clone(),
                expected_bytes: entry.bytes,
                actual_bytes,
                expected_blake3: entry.blake3.clone(),
                actual_blake3,
            });
        }
    }
    Inspection {
        dir: dir.to_path_buf(),
        valid: problems.is_empty(),
        problems,
        manifest,
        files,
        tensors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::testutil::manifest;
    use crate::checkpoint::write_checkpoint;

    #[test]
    fn inspect_lists_safetensors_tensors() {
        use safetensors::tensor::{Dtype, TensorView};
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [0.5f32, 0.25]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let tensors = vec![
            ("wte", TensorView::new(Dtype::F32, vec![3, 2], &a).unwrap()),
            (
                "lnf.gain",
                TensorView::new(Dtype::F32, vec![2], &b).unwrap(),
            ),
        ];
        let model = safetensors::serialize(tensors, None).unwrap();
        let root = tempfile::tempdir().unwrap();
        let m = manifest(0, 3);
        let info = write_checkpoint(
            root.path(),
            &m,
            &[("model.safetensors", &model), ("tokenizer.json", b"{}")],
        )
        .unwrap();
        let report = inspect(&info.dir);
        assert!(report.valid, "{report}");
        let names: Vec<(&str, &[usize], u64)> = report
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), t.elements))
            .collect();
        assert_eq!(
            names,
            vec![
                ("lnf.gain", [2].as_slice(), 2),
                ("wte", [3, 2].as_slice(), 6)
            ]
        );
        let text = report.to_string();
        assert!(
            text.contains("model.safetensors: 8 elements") && text.contains("wte"),
            "{text}"
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Inspection>(&json).unwrap(), report);
        // A file named .safetensors that is not one is reported.
        let bad = write_checkpoint(
            root.path(),
            &manifest(9, 4),
            &[("model.safetensors", b"garbage")],
        )
        .unwrap();
        let report = inspect(&bad.dir);
        assert!(
            !report.valid && report.problems[0].contains("not a valid safetensors"),
            "{report}"
        );
    }
}
