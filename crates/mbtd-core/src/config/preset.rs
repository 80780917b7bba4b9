//! The small configuration the integration tests and scripted benchmarks start from, with
//! dotted-key overrides: one definition instead of a TOML copy per test file.
//!
//! `mbtd config small --set training.batch_size=4 --set model.branches=3` prints it, so
//! scripts (bench/growth.py) use the same base as the Rust tests.
//!
//! ```
//! use mbtd_core::config::{Config, preset};
//! let toml = preset::small(&[("model.branches", "3"), ("training.seq_len", "16")]).unwrap();
//! let cfg = Config::from_toml(&toml, "preset").unwrap();
//! assert_eq!(cfg.model.branches, 3);
//! assert_eq!(cfg.training.seq_len, 16);
//! assert_eq!(cfg.model.d_model, 32);
//! ```

use super::ConfigError;

/// A tiny model (d 32, 2 layers × 2 branches, context 32) that trains in milliseconds per
/// step, fast ingest polling, and checkpoints and evaluations only when asked.
pub const SMALL_TOML: &str = r#"[ingest]
settle_ms = 50
rescan_ms = 200

[model]
vocab_size = 320
d_model = 32
n_heads = 2
n_layers = 2
branches = 2
max_seq_len = 32

[tokenizer]
bootstrap_rows = 100

[training]
batch_size = 8
seq_len = 32
idle_steps_per_min = 60000

[eval]
every_steps = 1000000

[checkpoints]
every_steps = 100000
every_seconds = 0

[metrics]
log_every_s = 1
"#;

/// [`SMALL_TOML`] with `overrides` applied (see [`with_overrides`]).
pub fn small(overrides: &[(&str, &str)]) -> Result<String, ConfigError> {
    with_overrides(SMALL_TOML, overrides)
}

/// Sets each dotted `section.key` of `base` to `value`, written as a TOML value (`4`,
/// `0.5`, `true`, `"text"`; anything that is not a TOML value is taken as a string). The
/// result is checked by [`super::Config::from_toml`], so a misspelt key or a value out of
/// range is an error naming it.
pub fn with_overrides(base: &str, overrides: &[(&str, &str)]) -> Result<String, ConfigError> {
    let origin = "preset";
    let mut doc: toml::Table = toml::from_str(base).map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })?;
    for (key, value) in overrides {
        let invalid = |message: &str| ConfigError::Key {
            origin: origin.to_string(),
            key: key.to_string(),
            message: message.to_string(),
        };
        let (section, field) = key
            .split_once('.')
            .ok_or_else(|| invalid("expected section.key, e.g. training.batch_size"))?;
        if field.is_empty() || field.contains('.') {
            return Err(invalid("expected section.key, e.g. training.batch_size"));
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let table = doc
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| invalid("is not a section"))?;
        table.insert(field.to_string(), parsed);
    }
    let text = toml::to_string(&doc).map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })?;
    super::Config::from_toml(&text, origin)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_add_and_type_values() {
        let t = small(&[
            ("training.batch_size", "4"),
            ("availability.p", "0.75"),
            ("governor.enabled", "true"),
            ("paths.inbox", "drop here"),
        ])
        .unwrap();
        let c = super::super::Config::from_toml(&t, "t").unwrap();
        assert_eq!(c.training.batch_size, 4);
        assert_eq!(c.availability.p, 0.75);
        assert!(c.governor.enabled);
        assert_eq!(c.paths.inbox, std::path::PathBuf::from("drop here"));
        assert_eq!(
            c.model.vocab_size, 320,
            "untouched keys keep the preset's value"
        );
    }

    #[test]
    fn misspelt_keys_and_bad_values_are_errors_naming_them() {
        let e = small(&[("training.batch_sise", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_sise"), "{e}");
        let e = small(&[("training.batch_size", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_size"), "{e}");
        let e = small(&[("batch_size", "4")]).unwrap_err().to_string();
        assert!(e.contains("section.key"), "{e}");
    }
}
