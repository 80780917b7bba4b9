//! The one pattern every `[section]` of the configuration follows: a serde struct with
//! `#[serde(deny_unknown_fields, default)]`, its `Default` beside it, and a [`Section`]
//! implementation whose `validate` reports the first bad field as a [`FieldError`] naming
//! `section.field`, the value found and what is allowed. [`super::Config::validate`] calls
//! it for every section in file order.

use std::fmt::Display;

/// A field that failed validation: where, the value found, and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` = {value}; allowed: {allowed}")]
pub struct FieldError {
    /// `section.field` (`section.list[i].field` inside a list).
    pub field: String,
    /// The value found, as TOML would write it.
    pub value: String,
    /// The allowed range (`lo ..= hi`) or rule.
    pub allowed: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, value: impl Display, allowed: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

/// One `[NAME]` table of the configuration file.
pub trait Section {
    /// The table's name in the file.
    const NAME: &'static str;

    /// Checks every field of the section on its own (rules between sections are in
    /// [`super::Config::validate`]); the first bad field is the error.
    fn validate(&self) -> Result<(), FieldError>;

    /// `Ok` when `ok`, else the error for `NAME.field` holding `value`, allowed `allowed`.
    fn require(
        field: &str,
        value: impl Display,
        ok: bool,
        allowed: impl Into<String>,
    ) -> Result<(), FieldError> {
        if ok {
            Ok(())
        } else {
            Err(FieldError::new(
                format!("{}.{field}", Self::NAME),
                value,
                allowed,
            ))
        }
    }

    /// `Ok` when `lo <= value <= hi` (a NaN is outside), else the error naming the range.
    fn in_range<T: PartialOrd + Display>(
        field: &str,
        value: T,
        lo: T,
        hi: T,
    ) -> Result<(), FieldError> {
        let ok = value >= lo && value <= hi;
        Self::require(field, value, ok, format!("{lo} ..= {hi}"))
    }
}
