//! safetensors save/load with the exact ARCHITECTURE.md tensor names and `[in, out]`
//! layout (fp32, little-endian).
//!
//! `model.safetensors`: every tensor of [`Params`] under its name, plus per layer the
//! aggregation groups `layers.{l}.agg.group_start` (I64 `[G]`) and
//! `layers.{l}.agg.group_eta` (F32 `[G]`) (see [`super::agg`]; a file without them
//! loads as one group per layer). Metadata `format = mbtd-model-v1`.
//!
//! `optimizer.safetensors`: `adam.m.<name>` and `adam.v.<name>` for every trainable
//! tensor, the step counter as `adam.step` (I64 `[1]`); metadata `format = mbtd-adam-v1`.
//! Only one metadata key is written so that the bytes are deterministic.
//!
//! A model with rotary positions (`model.positions = "rope"`) has no `wpe` tensor (nor its
//! moments). Widths are inferred from the file: layer `l` has the branches `0..K` for which
//! `layers.{l}.branches.{i}.ln1.gain` exists. Every tensor must have the dtype and shape
//! implied by the `ModelConfig`; a mismatch names the tensor, expected and found shape.

use super::agg::AggGroups;
use super::net::Model;
use super::params::{Params, TensorId};
use super::{ModelConfig, ModelError, Positions, TimeEmbedding};
use crate::config::Section;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;

const MODEL_FORMAT: &str = "mbtd-model-v1";
const ADAM_FORMAT: &str = "mbtd-adam-v1";

/// Every tensor of `params` with its shape under `cfg` (layer `l` of width `widths[l]`).
fn shapes(params: &Params, cfg: &ModelConfig, widths: &[usize]) -> Vec<(TensorId, Vec<usize>)> {
    let width = |id| match id {
        TensorId::Alpha(l) => widths[l],
        _ => 0,
    };
    params
        .ids()
        .into_iter()
        .map(|id| (id, id.shape(cfg, width(id))))
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn serialize(
    what: &'static str,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    let views = tensors
        .iter()
        .map(|(name, dt, shape, data)| {
            TensorView::new(*dt, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|source| ModelError::SafeTensors { what, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(meta))
        .map_err(|source| ModelError::SafeTensors { what, source })
}

/// Serialises the model to `model.safetensors` bytes.
pub fn model_to_bytes(model: &Model) -> Result<Vec<u8>, ModelError> {
    let mut tensors = Vec::new();
    for (id, shape) in shapes(&model.params, &model.config, &model.widths()) {
        tensors.push((
            id.name(),
            Dtype::F32,
            shape,
            f32_bytes(model.params.get(id)),
        ));
    }
    for (l, g) in model.groups.iter().enumerate() {
        let starts: Vec<u8> = g
            .start
            .iter()
            .flat_map(|&s| (s as i64).to_le_bytes())
            .collect();
        tensors.push((
            format!("layers.{l}.agg.group_start"),
            Dtype::I64,
            vec![g.start.len()],
            starts,
        ));
        tensors.push((
            format!("layers.{l}.agg.group_eta"),
            Dtype::F32,
            vec![g.eta.len()],
            f32_bytes(&g.eta),
        ));
    }
    let meta = HashMap::from([("format".to_string(), MODEL_FORMAT.to_string())]);
    serialize("model", tensors, meta)
}

fn read_tensor(
    st: &SafeTensors<'_>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<Vec<u8>, ModelError> {
    let t = st.tensor(name).map_err(|_| ModelError::Tensor {
        name: name.to_string(),
        msg: format!("missing; expected {dtype:?} {shape:?} (is this a checkpoint of the same model configuration?)"),
    })?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(ModelError::Tensor {
            name: name.to_string(),
            msg: format!(
                "expected {dtype:?} shape {shape:?}, found {:?} shape {:?}; the checkpoint does not match the ModelConfig",
                t.dtype(),
                t.shape()
            ),
        });
    }
    Ok(t.data().to_vec())
}

fn read_f32(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let bytes = read_tensor(st, name, Dtype::F32, shape)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn check_format(
    st_meta: Option<&HashMap<String, String>>,
    want: &str,
    what: &str,
) -> Result<(), ModelError> {
    match st_meta.and_then(|m| m.get("format")) {
        Some(f) if f == want => Ok(()),
        None => Ok(()),
        Some(f) => Err(ModelError::Tensor {
            name: "__metadata__.format".to_string(),
            msg: format!("{what} file has format `{f}`, expected `{want}`"),
        }),
    }
}

/// Rebuilds a model from `model.safetensors` bytes and its configuration (widths are
/// inferred from the tensors present; `config.branches` is ignored for that).
pub fn model_from_bytes(config: ModelConfig, bytes: &[u8]) -> Result<Model, ModelError> {
    config.validate()?;
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|source| ModelError::SafeTensors {
            what: "model",
            source,
        })?;
    check_format(meta.metadata().as_ref(), MODEL_FORMAT, "model")?;
    let st = SafeTensors::deserialize(bytes).map_err(|source| ModelError::SafeTensors {
        what: "model",
        source,
    })?;
    let names: std::collections::HashSet<&str> = st.names().into_iter().collect();
    if config.positions == Positions::Rope && names.contains("wpe") {
        return Err(ModelError::Tensor {
            name: "wpe".to_string(),
            msg: "present, so the checkpoint has learned positions, but model.positions = \"rope\"; set model.positions = \"learned\" to resume it".to_string(),
        });
    }
    if config.time_embedding == TimeEmbedding::None && names.contains("time2vec.w") {
        return Err(ModelError::Tensor {
            name: "time2vec.w".to_string(),
            msg: "present, so the checkpoint has a time embedding, but model.time_embedding = \"none\"; set model.time_embedding = \"time2vec\" to resume it".to_string(),
        });
    }
    let widths: Vec<usize> = (0..config.n_layers)
        .map(|l| {
            (0..)
                .take_while(|i| {
                    names.contains(format!("layers.{l}.branches.{i}.ln1.gain").as_str())
                })
                .count()
        })
        .collect();
    if let Some(l) = widths.iter().position(|&k| k == 0) {
        return Err(ModelError::Tensor {
            name: format!("layers.{l}.branches.0.ln1.gain"),
            msg: format!(
                "missing: layer {l} has no branch (model.n_layers = {})",
                config.n_layers
            ),
        });
    }
    let mut params = Params::zeros(&config, &widths);
    for (id, shape) in shapes(&params, &config, &widths) {
        *params.get_mut(id) = read_f32(&st, &id.name(), &shape)?;
    }
    let mut groups = Vec::with_capacity(config.n_layers);
    for (l, &k) in widths.iter().enumerate() {
        let sname = format!("layers.{l}.agg.group_start");
        let g = match st.tensor(&sname) {
            Err(_) => AggGroups::single(),
            Ok(t) => {
                let n = t.shape().first().copied().unwrap_or(0);
                let start: Vec<usize> = read_tensor(&st, &sname, Dtype::I64, &[n])?
                    .chunks_exact(8)
                    .map(|b| {
                        // a negative start becomes usize::MAX and fails validation below
                        usize::try_from(i64::from_le_bytes(b.try_into().expect("8 bytes")))
                            .unwrap_or(usize::MAX)
                    })
                    .collect();
                let eta = read_f32(&st, &format!("layers.{l}.agg.group_eta"), &[n])?;
                AggGroups { start, eta }
            }
        };
        g.validate(k)
            .map_err(|msg| ModelError::Tensor { name: sname, msg })?;
        groups.push(g);
    }
    Ok(Model {
        config,
        params,
        groups,
    })
}

/// Serialises AdamW moments and the step counter to `optimizer.safetensors` bytes.
pub fn optimizer_to_bytes(
    model: &Model,
    m: &Params,
    v: &Params,
    step: u64,
) -> Result<Vec<u8>, ModelError> {
    let mut tensors = Vec::new();
    for (id, shape) in shapes(&model.params, &model.config, &model.widths()) {
        tensors.push((
            format!("adam.m.{}", id.name()),
            Dtype::F32,
            shape.clone(),
            f32_bytes(m.get(id)),
        ));
        tensors.push((
            format!("adam.v.{}", id.name()),
            Dtype::F32,
            shape,
            f32_bytes(v.get(id)),
        ));
    }
    tensors.push((
        "adam.step".to_string(),
        Dtype::I64,
        vec![1],
        (step as i64).to_le_bytes().to_vec(),
    ));
    let meta = HashMap::from([("format".to_string(), ADAM_FORMAT.to_string())]);
    serialize("optimizer", tensors, meta)
}

/// Reads AdamW moments and the step counter for `model` from `optimizer.safetensors`.
pub fn optimizer_from_bytes(
    model: &Model,
    bytes: &[u8],
) -> Result<(Params, Params, u64), ModelError> {
    let what = "optimizer";
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|source| ModelError::SafeTensors { what, source })?;
    check_format(meta.metadata().as_ref(), ADAM_FORMAT, what)?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|source| ModelError::SafeTensors { what, source })?;
    let step_bytes = read_tensor(&st, "adam.step", Dtype::I64, &[1])?;
    let step = i64::from_le_bytes(step_bytes[..8].try_into().expect("8 bytes"));
    let step = u64::try_from(step).map_err(|_| ModelError::Tensor {
        name: "adam.step".to_string(),
        msg: format!("{step} is negative; the optimizer file is corrupt"),
    })?;
    let widths = model.widths();
    let mut m = Params::zeros(&model.config, &widths);
    let mut v = m.clone();
    for (id, shape) in shapes(&model.params, &model.config, &widths) {
        *m.get_mut(id) = read_f32(&st, &format!("adam.m.{}", id.name()), &shape)?;
        *v.get_mut(id) = read_f32(&st, &format!("adam.v.{}", id.name()), &shape)?;
    }
    Ok((m, v, step))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::net::tests::{random_batch, tiny_config};
    use crate::model::{Batch, OptimConfig, Trainer};

    /// A trainer for `cfg` after one step, and the batch it trained on.
    fn trained_one_step(cfg: &ModelConfig) -> (Trainer, Batch) {
        let mut t =
            Trainer::new(Model::new(cfg.clone(), 1).unwrap(), OptimConfig::default()).unwrap();
        let batch = random_batch(cfg, 2, 4, 2);
        let masks = t.model().all_active();
        let scales: Vec<Vec<f32>> = t.model().widths().iter().map(|&k| vec![1.0; k]).collect();
        t.train_step(&batch, &masks, &scales).unwrap();
        (t, batch)
    }

    #[test]
    fn model_and_optimizer_round_trip_bitwise_with_expansion() {
        let cfg = tiny_config();
        let (mut t, batch) = trained_one_step(&cfg);
        t.expand(0, 2, 0.01, 3).unwrap();
        t.set_eta(0, 0.125).unwrap();
        let mb = t.model_bytes().unwrap();
        let ob = t.optimizer_bytes().unwrap();
        let mut r =
            Trainer::from_bytes(cfg.clone(), OptimConfig::default(), &mb, Some(&ob)).unwrap();
        assert_eq!(r.model(), t.model());
        assert_eq!(r.moments(), t.moments());
        assert_eq!(r.step(), 1);
        assert_eq!(r.model_bytes().unwrap(), mb);
        assert_eq!(r.optimizer_bytes().unwrap(), ob);
        let masks = t.model().all_active();
        assert_eq!(
            r.logits(&batch, &masks).unwrap(),
            t.logits(&batch, &masks).unwrap()
        );
        // the names of ARCHITECTURE.md are present, matrices stored [in, out]
        let st = SafeTensors::deserialize(&mb).unwrap();
        assert_eq!(
            st.tensor("layers.0.branches.4.attn.qkv.w").unwrap().shape(),
            &[8, 24]
        );
        assert_eq!(
            st.tensor("layers.1.branches.2.mlp.proj.w").unwrap().shape(),
            &[32, 8]
        );
        assert_eq!(st.tensor("head.w").unwrap().shape(), &[8, 11]);
        assert_eq!(st.tensor("layers.0.alpha_logits").unwrap().shape(), &[5]);
        assert!(st.tensor("layers.0.branches.5.ln1.gain").is_err());
        let ost = SafeTensors::deserialize(&ob).unwrap();
        assert!(
            ost.tensor("adam.m.wte").is_ok()
                && ost.tensor("adam.v.layers.0.branches.4.mlp.fc.b").is_ok()
        );
    }

    /// Whether a safetensors file holds a tensor of that name.
    fn holds(bytes: &[u8], name: &str) -> bool {
        SafeTensors::deserialize(bytes)
            .unwrap()
            .tensor(name)
            .is_ok()
    }

    /// The checkpoint bytes of `t` load back into an equal trainer whose optimizer bytes
    /// are the same; returns the model bytes.
    fn reloads_bitwise(cfg: &ModelConfig, t: &Trainer) -> Vec<u8> {
        let (mb, ob) = (t.model_bytes().unwrap(), t.optimizer_bytes().unwrap());
        let r = Trainer::from_bytes(cfg.clone(), OptimConfig::default(), &mb, Some(&ob)).unwrap();
        assert_eq!(r.model(), t.model());
        assert_eq!(r.optimizer_bytes().unwrap(), ob);
        mb
    }

    /// Loading `bytes` under `cfg` fails with an error that names every one of `words`.
    fn refused_naming(cfg: ModelConfig, bytes: &[u8], words: &[&str]) {
        let err = model_from_bytes(cfg, bytes).unwrap_err().to_string();
        assert!(words.iter().all(|w| err.contains(w)), "{err}");
    }

    #[test]
    fn rope_checkpoints_have_no_wpe_and_positions_must_match() {
        let cfg = ModelConfig {
            positions: Positions::Rope,
            ..tiny_config()
        };
        let (t, _) = trained_one_step(&cfg);
        let mb = reloads_bitwise(&cfg, &t);
        assert!(!holds(&mb, "wpe"));
        assert!(!holds(&t.optimizer_bytes().unwrap(), "adam.m.wpe"));
        // either way round, a positions mismatch is refused by name
        refused_naming(tiny_config(), &mb, &["wpe", "missing"]);
        let learned = model_to_bytes(&Model::new(tiny_config(), 1).unwrap()).unwrap();
        refused_naming(cfg, &learned, &["model.positions"]);
    }

    /// The time embedding's tensors and their moments round-trip bitwise after a step that
    /// trained them; a time-embedding mismatch is refused by name either way round.
    #[test]
    fn time2vec_checkpoints_round_trip_and_the_embedding_must_match() {
        let cfg = ModelConfig {
            time_embedding: TimeEmbedding::Time2vec,
            time_features: 3,
            ..tiny_config()
        };
        let mut t =
            Trainer::new(Model::new(cfg.clone(), 1).unwrap(), OptimConfig::default()).unwrap();
        let mut batch = random_batch(&cfg, 2, 4, 2);
        batch.times = Some(vec![2.0, 2.0, 2.0, 2.0, 2.4, 2.4, f32::NAN, f32::NAN]);
        let masks = t.model().all_active();
        let scales: Vec<Vec<f32>> = t.model().widths().iter().map(|&k| vec![1.0; k]).collect();
        t.train_step(&batch, &masks, &scales).unwrap();
        t.train_step(&batch, &masks, &scales).unwrap();
        assert!(t.model().params.t2v_proj.iter().any(|&x| x != 0.0));
        let mb = reloads_bitwise(&cfg, &t);
        let st = SafeTensors::deserialize(&mb).unwrap();
        assert_eq!(st.tensor("time2vec.proj.w").unwrap().shape(), [4, 8]);
        assert!(holds(&t.optimizer_bytes().unwrap(), "adam.v.time2vec.w"));
        refused_naming(tiny_config(), &mb, &["model.time_embedding"]);
        let plain = model_to_bytes(&Model::new(tiny_config(), 1).unwrap()).unwrap();
        refused_naming(cfg, &plain, &["time2vec.w", "missing"]);
        assert!(
            SafeTensors::deserialize(&plain)
                .unwrap()
                .names()
                .iter()
                .all(|n| !n.starts_with("time2vec")),
            "no time tensors without a time embedding"
        );
    }

    #[test]
    fn mismatched_shape_is_rejected_with_names() {
        let cfg = tiny_config();
        let model = Model::new(cfg.clone(), 1).unwrap();
        let bytes = model_to_bytes(&model).unwrap();
        let other = ModelConfig {
            d_model: 12,
            n_heads: 2,
            ..cfg.clone()
        };
        let err = model_from_bytes(other, &bytes).unwrap_err().to_string();
        assert!(
            err.contains("wte") && err.contains("[11, 12]") && err.contains("[11, 8]"),
            "{err}"
        );
        let more = ModelConfig {
            n_layers: 3,
            ..cfg.clone()
        };
        let err = model_from_bytes(more, &bytes).unwrap_err().to_string();
        assert!(err.contains("layers.2.branches.0.ln1.gain"), "{err}");
        assert!(model_from_bytes(cfg, &bytes[..bytes.len() - 3]).is_err());
    }
}
