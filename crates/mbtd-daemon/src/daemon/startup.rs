//! Checks made before any actor starts, each a refusal with exit code 2 and a message that
//! says what to do: the process umask and the data dir's permissions, and the model section
//! of the config against the checkpoint the daemon would resume from.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::checkpoint::Manifest;
use crate::model::ModelConfig;

/// A start refused before READY; `mbtd run` exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum StartRefused {
    /// The data dir can be written by users other than the daemon's.
    #[error(
        "the data dir {path} has mode {mode:04o}: writable by {who}, who could plant checkpoints or inbox files; run `chmod go-w {path}` (the daemon creates it 0700, or 0750 with paths.group_readable = true)"
    )]
    DataDirWritable {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    /// The data dir's permissions could not be read or it could not be created.
    #[error("cannot prepare the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config's model differs from the checkpoint's.
    #[error("{0}")]
    ModelMismatch(String),
    /// `[cluster]` cannot start: a node that does not parse, the identity, the endpoint.
    #[error("[cluster]: {0}")]
    Cluster(String),
    /// `--accept-checkpoint-model` gave a config that does not validate.
    #[error(
        "the checkpoint's model section ({model}) cannot be used with this config: {reason}; fix the config or start a new data dir"
    )]
    CheckpointModelInvalid { model: String, reason: String },
}

/// Process umask for the daemon: files 0600 and directories 0700, or 0640 / 0750 when the
/// group may read (`paths.group_readable`).
pub fn umask_for(group_readable: bool) -> libc::mode_t {
    if group_readable { 0o027 } else { 0o077 }
}

/// Sets the process umask (see [`umask_for`]) before anything is created.
pub fn set_umask(group_readable: bool) {
    // SAFETY: umask(2) only changes this process's file-creation mask.
    unsafe {
        libc::umask(umask_for(group_readable));
    }
}

/// Creates `dir` (and missing parents) with mode 0700, or 0750 when `group_readable`; an
/// existing directory keeps its mode.
pub fn create_private_dir(dir: &Path, group_readable: bool) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(if group_readable { 0o750 } else { 0o700 })
        .create(dir)
}

/// Refuses a data dir that users other than the owner can write (mode bits `g+w`, `o+w`).
pub fn check_data_dir(path: &Path) -> Result<(), StartRefused> {
    let meta = std::fs::metadata(path).map_err(|source| StartRefused::DataDir {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (_, true) => "every user",
        (true, false) => "its group",
        (false, false) => return Ok(()),
    };
    Err(StartRefused::DataDirWritable {
        path: path.to_path_buf(),
        mode,
        who,
    })
}

/// Fields of `model.*` a resumed model may change: `init_std` only matters when a model is
/// created, `precision` only sets the products' arithmetic (checkpoints are fp32 in both).
const INIT_ONLY_FIELDS: [&str; 2] = ["init_std", "precision"];

/// One field that differs: name, the checkpoint's value, the config's value.
pub type FieldDiff = (String, serde_json::Value, serde_json::Value);

/// Every shape- or behaviour-relevant `model.*` field (`positions` and `dropout`
/// included) where `config` differs from the model recorded in `manifest.config.model`. A
/// field the manifest lacks (written before the field existed) counts as its default.
/// Empty when they agree or the manifest records no model (a checkpoint written without
/// its config).
pub fn model_differences(manifest: &Manifest, config: &ModelConfig) -> Vec<FieldDiff> {
    let Some(written) = manifest.config.get("model").and_then(|m| m.as_object()) else {
        return Vec::new();
    };
    let mut recorded = match serde_json::to_value(ModelConfig::default()) {
        Ok(serde_json::Value::Object(defaults)) => defaults,
        _ => serde_json::Map::new(),
    };
    recorded.extend(written.iter().map(|(k, v)| (k.clone(), v.clone())));
    let ours = serde_json::to_value(config).unwrap_or_default();
    let Some(ours) = ours.as_object() else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = recorded.keys().chain(ours.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !INIT_ONLY_FIELDS.contains(&k.as_str()))
        .filter_map(|k| {
            let a = recorded.get(k).cloned().unwrap_or(serde_json::Value::Null);
            let b = ours.get(k).cloned().unwrap_or(serde_json::Value::Null);
            (!same_value(&a, &b)).then(|| (format!("model.{k}"), a, b))
        })
        .collect()
}

/// JSON equality that treats `2` and `2.0` as equal (a float written as an integer).
fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The refusal for `diffs` (non-empty) against checkpoint `id` in `checkpoints`.
pub fn mismatch_message(id: &str, checkpoints: &Path, diffs: &[FieldDiff]) -> String {
    let mut out = format!(
        "the config's model differs from the checkpoint this data dir resumes from ({}/{id}):\n",
        checkpoints.display()
    );
    for (field, ck, cfg) in diffs {
        out.push_str(&format!("  {field}: checkpoint {ck}, config {cfg}\n"));
    }
    out.push_str(
        "to proceed, either set these fields in the config back to the checkpoint's values, \
         or start with a new --data-dir (training starts from scratch), \
         or run `mbtd run --accept-checkpoint-model` to run with the checkpoint's architecture",
    );
    out
}

/// The config's model section replaced by the one `manifest` records
/// (`--accept-checkpoint-model`); `None` when the manifest records none.
pub fn checkpoint_model(manifest: &Manifest) -> Option<Result<ModelConfig, StartRefused>> {
    let m = manifest.config.get("model")?;
    Some(
        serde_json::from_value::<ModelConfig>(m.clone()).map_err(|e| {
            StartRefused::CheckpointModelInvalid {
                model: m.to_string(),
                reason: e.to_string(),
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn manifest_with(model: &ModelConfig) -> Manifest {
        let mut m = Manifest::new(UNIX_EPOCH, 1, 1);
        m.config = serde_json::json!({ "model": model, "optim": {"lr": 0.001} });
        m
    }

    #[test]
    fn differences_name_each_field_with_both_values() {
        let ck = ModelConfig {
            d_model: 64,
            n_heads: 2,
            ..ModelConfig::default()
        };
        let m = manifest_with(&ck);
        assert!(model_differences(&m, &ck).is_empty());
        let cfg = ModelConfig {
            d_model: 96,
            n_heads: 4,
            init_std: 0.5,
            precision: crate::model::Precision::Bf16,
            ..ck.clone()
        };
        let d = model_differences(&m, &cfg);
        let fields: Vec<&str> = d.iter().map(|(f, _, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            vec!["model.d_model", "model.n_heads"],
            "init_std and precision are ignored"
        );
        assert_eq!((d[0].1.clone(), d[0].2.clone()), (64.into(), 96.into()));
        let msg = mismatch_message("ID", Path::new("/data/checkpoints"), &d);
        for needle in [
            "model.d_model: checkpoint 64, config 96",
            "model.n_heads: checkpoint 2, config 4",
            "--accept-checkpoint-model",
            "--data-dir",
            "/data/checkpoints/ID",
        ] {
            assert!(msg.contains(needle), "{needle} missing in:\n{msg}");
        }
        // --accept-checkpoint-model takes the checkpoint's values.
        assert_eq!(checkpoint_model(&m).unwrap().unwrap(), ck);
    }

    #[test]
    fn positions_differ_by_name_and_older_manifests_mean_the_defaults() {
        let ck = ModelConfig::default();
        let rope = ModelConfig {
            positions: crate::model::Positions::Rope,
            ..ck.clone()
        };
        let d = model_differences(&manifest_with(&ck), &rope);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0, "model.positions");
        assert_eq!(
            (d[0].1.clone(), d[0].2.clone()),
            ("learned".into(), "rope".into())
        );
        // a manifest written before `positions` and `dropout` existed
        let mut m = manifest_with(&ck);
        let model = m.config["model"].as_object_mut().unwrap();
        model.remove("positions");
        model.remove("dropout");
        assert!(model_differences(&m, &ck).is_empty());
        let d = model_differences(&m, &rope);
        assert_eq!(d[0].0, "model.positions");
    }

    #[test]
    fn a_manifest_without_a_model_is_not_compared() {
        let mut m = Manifest::new(UNIX_EPOCH, 1, 1);
        assert!(model_differences(&m, &ModelConfig::default()).is_empty());
        assert!(checkpoint_model(&m).is_none());
        m.config = serde_json::json!({"model": {"d_model": "wide"}});
        assert!(matches!(
            checkpoint_model(&m),
            Some(Err(StartRefused::CheckpointModelInvalid { .. }))
        ));
    }

    #[test]
    fn writable_data_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        create_private_dir(&p, false).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o077,
            0,
            "no bits for group or others"
        );
        assert!(check_data_dir(&p).is_ok());
        for (mode, who) in [
            (0o770, "its group"),
            (0o757, "every user"),
            (0o1777, "every user"),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = check_data_dir(&p).unwrap_err().to_string();
            assert!(err.contains(who) && err.contains("chmod go-w"), "{err}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_data_dir(&p).is_ok(), "readable by others is allowed");
    }

    #[test]
    fn umask_matches_the_group_setting() {
        assert_eq!(umask_for(false), 0o077);
        assert_eq!(umask_for(true), 0o027);
    }
}
