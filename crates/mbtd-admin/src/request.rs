//! The typed admin commands: one enum variant per command, one struct per command's
//! arguments, shared by the daemon's server and `mbtd ctl` / `mbtd chat`. Depends on serde
//! only (no actor, runtime or model types), so a client links none of the daemon.
//!
//! Decoding rules (the contract the regression tests in `tests/admin_protocol.rs` hold):
//! - the command name must be one of [`COMMANDS`] (else [`RequestError::UnknownCommand`]);
//! - `args` is a JSON object, or absent / `null` for "no arguments";
//! - an argument the command does not take is refused (`unknown field`), as is a missing
//!   required one;
//! - every number is checked for its JSON type *and* range: `"5"`, `-5`, `5.5` or `1e9`
//!   for a count is refused with the argument's name and the allowed range, never coerced
//!   or silently replaced by a default;
//! - checkpoint tags and rollback targets are restricted to `[A-Za-z0-9._-]` (see
//!   [`CheckpointTag`], [`CheckpointRef`]).

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use serde_json::Value;

/// Every command the daemon answers, by wire name (the "unknown command" message lists them).
pub const COMMANDS: &[&str] = &[
    "ping",
    "status",
    "metrics",
    "shutdown",
    "pause-ingest",
    "resume-ingest",
    "pause",
    "resume",
    "mask",
    "unmask",
    "eval",
    "diagnostics",
    "generate",
    "expand",
    "checkpoint",
    "checkpoint-delete",
    "checkpoints",
    "rollback",
    "governor",
    "nodes",
];

/// Commands that exist on the wire but are not offered to operators (test builds only).
pub const HIDDEN_COMMANDS: &[&str] = &["debug-crash"];

/// Tags the daemon gives its own checkpoints, and the rollback keyword: an operator's tag
/// must differ from these so that retention and `rollback previous` stay unambiguous.
pub const RESERVED_TAGS: &[&str] = &["shutdown", "pre-expand", "previous"];

/// Longest operator tag, in bytes.
pub const MAX_TAG_LEN: usize = 64;
/// Longest rollback target (checkpoint ids are at most 200 bytes).
pub const MAX_TARGET_LEN: usize = 200;

/// Why a request was refused before reaching any actor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown command `{cmd}`; known commands: {}", COMMANDS.join(", "))]
    UnknownCommand { cmd: String },
    #[error("invalid arguments for `{cmd}`: {message}")]
    InvalidArgs { cmd: String, message: String },
}

/// One admin command with its arguments. On the wire: `{"cmd": "<name>", "args": {…}}`
/// (the [`super::protocol`] framing adds the request `id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", content = "args", rename_all = "kebab-case")]
pub enum Request {
    Ping(NoArgs),
    Status(NoArgs),
    Metrics(NoArgs),
    Shutdown(NoArgs),
    PauseIngest(NoArgs),
    ResumeIngest(NoArgs),
    Pause(NoArgs),
    Resume(NoArgs),
    Mask(BranchArgs),
    Unmask(BranchArgs),
    Eval(NoArgs),
    Diagnostics(NoArgs),
    Governor(NoArgs),
    Generate(GenerateArgs),
    Expand(ExpandArgs),
    Checkpoint(CheckpointArgs),
    CheckpointDelete(CheckpointDeleteArgs),
    Checkpoints(NoArgs),
    Rollback(RollbackArgs),
    /// The branch hosts of a coordinator (`[cluster]`): identity, address, branches, state,
    /// round-trip times, last step answered, bytes.
    Nodes(NoArgs),
    /// Makes the named actor panic; answered only by builds with the `fault-injection` feature.
    DebugCrash(DebugCrashArgs),
}

impl Request {
    /// Decodes a command name and its `args` (`null` = none) by the rules of the module doc.
    pub fn from_parts(cmd: &str, args: Value) -> Result<Request, RequestError> {
        if !COMMANDS.contains(&cmd) && !HIDDEN_COMMANDS.contains(&cmd) {
            return Err(RequestError::UnknownCommand {
                cmd: cmd.to_string(),
            });
        }
        let invalid = |message: String| RequestError::InvalidArgs {
            cmd: cmd.to_string(),
            message,
        };
        let args = match args {
            Value::Null => Value::Object(Default::default()),
            Value::Object(o) => Value::Object(o),
            other => {
                return Err(invalid(format!(
                    "`args` must be a JSON object, got {other}"
                )));
            }
        };
        serde_json::from_value(serde_json::json!({ "cmd": cmd, "args": args }))
            .map_err(|e| invalid(e.to_string()))
    }

    /// The command's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping(_) => "ping",
            Request::Status(_) => "status",
            Request::Metrics(_) => "metrics",
            Request::Shutdown(_) => "shutdown",
            Request::PauseIngest(_) => "pause-ingest",
            Request::ResumeIngest(_) => "resume-ingest",
            Request::Pause(_) => "pause",
            Request::Resume(_) => "resume",
            Request::Mask(_) => "mask",
            Request::Unmask(_) => "unmask",
            Request::Eval(_) => "eval",
            Request::Diagnostics(_) => "diagnostics",
            Request::Governor(_) => "governor",
            Request::Generate(_) => "generate",
            Request::Expand(_) => "expand",
            Request::Checkpoint(_) => "checkpoint",
            Request::CheckpointDelete(_) => "checkpoint-delete",
            Request::Checkpoints(_) => "checkpoints",
            Request::Rollback(_) => "rollback",
            Request::Nodes(_) => "nodes",
            Request::DebugCrash(_) => "debug-crash",
        }
    }
}

/// Arguments of a command that takes none: `{}` (or no `args` at all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// `mask` / `unmask`: one branch of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchArgs {
    /// Layer index, `0 ..= 255` (the model's `n_layers` bounds it further).
    #[serde(deserialize_with = "layer")]
    pub layer: usize,
    /// Branch index, `0 ..= 1023` (the layer's width bounds it further).
    #[serde(deserialize_with = "branch")]
    pub branch: usize,
}

/// `generate`: sampling settings (see `model::generate::GenerateConfig` for their meaning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateArgs {
    pub prompt: String,
    /// `1 ..= 65536`; the daemon also stops at the end token and at the context length.
    #[serde(deserialize_with = "max_tokens")]
    pub max_tokens: usize,
    /// `0 ..= 100`; 0 = greedy.
    #[serde(deserialize_with = "temperature")]
    pub temperature: f32,
    /// `0 ..= 1000000`; 0 = no limit.
    #[serde(deserialize_with = "top_k")]
    pub top_k: usize,
    /// `(0, 1]`; 1 = no limit.
    #[serde(deserialize_with = "top_p")]
    pub top_p: f32,
    /// Any `u64`.
    #[serde(deserialize_with = "seed")]
    pub seed: u64,
    /// Answer the prompt as an instruction row is trained (prompt, then `<|response|>`).
    pub respond: bool,
    /// Ask the model as of this time (its time embedding, if it has one); absent = now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<AsOf>,
}

/// A time to ask the model as of: an RFC 3339 timestamp with a `Z` or numeric offset in
/// the years 0001 to 9999 (the rule of an inbox file's `time` column,
/// [`mbtd_core::text::csv_rows::parse_time`]), kept as written on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AsOf {
    text: String,
    ms: i64,
}

impl AsOf {
    /// Milliseconds since the Unix epoch.
    pub fn millis(&self) -> i64 {
        self.ms
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for AsOf {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let shown: String = s.chars().take(40).collect();
        match mbtd_core::text::csv_rows::parse_time(&s) {
            Ok(ms) => Ok(Self { text: s, ms }),
            Err(why) => Err(format!(
                "`as_of` {shown:?} is not an RFC 3339 time ({why}); write e.g. 2024-03-01T12:00:00Z"
            )),
        }
    }
}

impl From<AsOf> for String {
    fn from(t: AsOf) -> String {
        t.text
    }
}

impl Default for GenerateArgs {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            max_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            respond: false,
            as_of: None,
        }
    }
}

/// `expand`: add `branches` to `layer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpandArgs {
    #[serde(deserialize_with = "layer")]
    pub layer: usize,
    /// `1 ..= 64`.
    #[serde(deserialize_with = "new_branches")]
    pub branches: usize,
    /// Injection rate in `(0, 1]`; absent = `governor.beta`.
    #[serde(
        default,
        deserialize_with = "beta",
        skip_serializing_if = "Option::is_none"
    )]
    pub beta: Option<f32>,
    /// Steps of the η ramp, `0 ..= 10000000`; absent = `governor.ramp_steps`.
    #[serde(
        default,
        deserialize_with = "ramp_steps",
        skip_serializing_if = "Option::is_none"
    )]
    pub ramp_steps: Option<u64>,
    /// Standard deviation of the noise on the copied weights, `0 ..= 1000`.
    #[serde(default = "default_noise", deserialize_with = "noise")]
    pub noise: f32,
}

fn default_noise() -> f32 {
    1e-3
}

/// `checkpoint`: write one now, optionally tagged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointArgs {
    #[serde(default)]
    pub tag: Option<CheckpointTag>,
}

/// `checkpoint-delete`: delete the checkpoint with this id, or every one with this tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointDeleteArgs {
    pub target: CheckpointRef,
}

/// `rollback`: restore a checkpoint by id, tag, or `previous`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackArgs {
    pub target: CheckpointRef,
}

/// `debug-crash`: the actor to make panic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugCrashArgs {
    pub actor: String,
}

/// An operator's checkpoint tag: 1 to [`MAX_TAG_LEN`] bytes of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-`, and none of [`RESERVED_TAGS`]. Safe as a file name, a table
/// cell and a command-line argument.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CheckpointTag(String);

impl CheckpointTag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CheckpointTag {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        check_name("tag", &s, MAX_TAG_LEN)?;
        if RESERVED_TAGS.contains(&s.as_str()) {
            return Err(format!(
                "`tag` {s:?} is reserved for the daemon's own checkpoints (reserved: {}); choose another name",
                RESERVED_TAGS.join(", ")
            ));
        }
        Ok(Self(s))
    }
}

impl From<CheckpointTag> for String {
    fn from(t: CheckpointTag) -> String {
        t.0
    }
}

/// A checkpoint id, a tag (automatic ones included) or `previous`: 1 to
/// [`MAX_TARGET_LEN`] bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CheckpointRef(String);

impl CheckpointRef {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CheckpointRef {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        check_name("target", &s, MAX_TARGET_LEN)?;
        Ok(Self(s))
    }
}

impl From<CheckpointRef> for String {
    fn from(t: CheckpointRef) -> String {
        t.0
    }
}

/// The shared rule of tags and targets; the message names `field` and the rule.
fn check_name(field: &str, s: &str, max: usize) -> Result<(), String> {
    let shown: String = s.chars().take(40).collect();
    let shown = if shown.len() < s.len() {
        format!("{shown:?}… ({} bytes)", s.len())
    } else {
        format!("{shown:?}")
    };
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if s.is_empty() || s.len() > max || !ok_chars || s.starts_with(['.', '-']) {
        return Err(format!(
            "`{field}` {shown} is not allowed: use 1 ..= {max} characters of A-Z a-z 0-9 . _ - \
             (not starting with . or -)"
        ));
    }
    Ok(())
}

/// An integer argument in `lo ..= hi`, refused with its name and range otherwise (a string,
/// a negative or fractional number, `null`, …).
fn int_value(v: &Value, name: &str, lo: u64, hi: u64) -> Result<u64, String> {
    match v.as_u64() {
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        _ => Err(format!(
            "`{name}` must be an integer in {lo} ..= {hi}; got {v}"
        )),
    }
}

/// A number argument in `lo ..= hi` (`lo` excluded when `lo_open`).
fn float_value(v: &Value, name: &str, lo: f64, hi: f64, lo_open: bool) -> Result<f32, String> {
    let above_lo = |x: f64| if lo_open { x > lo } else { x >= lo };
    match v.as_f64() {
        Some(x) if above_lo(x) && x <= hi => Ok(x as f32),
        _ => Err(format!(
            "`{name}` must be a number in {}{lo}, {hi}]; got {v}",
            if lo_open { "(" } else { "[" }
        )),
    }
}

/// Field deserializers: the name and range of each argument, in one place. An optional
/// argument takes `null` as absent.
macro_rules! field {
    ($fn:ident, $name:literal, $ty:ty, int $lo:expr, $hi:expr) => {
        fn $fn<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            int_value(&Value::deserialize(d)?, $name, $lo, $hi)
                .map(|v| v as $ty)
                .map_err(D::Error::custom)
        }
    };
    ($fn:ident, $name:literal, float $lo:expr, $hi:expr, $open:expr) => {
        fn $fn<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
            float_value(&Value::deserialize(d)?, $name, $lo, $hi, $open).map_err(D::Error::custom)
        }
    };
    ($fn:ident, $name:literal, optional int $lo:expr, $hi:expr) => {
        fn $fn<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            match Value::deserialize(d)? {
                Value::Null => Ok(None),
                v => int_value(&v, $name, $lo, $hi)
                    .map(Some)
                    .map_err(D::Error::custom),
            }
        }
    };
    ($fn:ident, $name:literal, optional float $lo:expr, $hi:expr, $open:expr) => {
        fn $fn<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
            match Value::deserialize(d)? {
                Value::Null => Ok(None),
                v => float_value(&v, $name, $lo, $hi, $open)
                    .map(Some)
                    .map_err(D::Error::custom),
            }
        }
    };
}

field!(layer, "layer", usize, int 0, 255);
field!(branch, "branch", usize, int 0, 1023);
field!(new_branches, "branches", usize, int 1, 64);
field!(max_tokens, "max_tokens", usize, int 1, 65_536);
field!(top_k, "top_k", usize, int 0, 1_000_000);
field!(seed, "seed", u64, int 0, u64::MAX);
field!(ramp_steps, "ramp_steps", optional int 0, 10_000_000);
field!(temperature, "temperature", float 0.0, 100.0, false);
field!(top_p, "top_p", float 0.0, 1.0, true);
field!(noise, "noise", float 0.0, 1000.0, false);
field!(beta, "beta", optional float 0.0, 1.0, true);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal_args(cmd: &str) -> Value {
        match cmd {
            "mask" | "unmask" => json!({"layer": 0, "branch": 1}),
            "expand" => json!({"layer": 0, "branches": 1}),
            "rollback" => json!({"target": "previous"}),
            "checkpoint-delete" => json!({"target": "t"}),
            "debug-crash" => json!({"actor": "trainer"}),
            _ => Value::Null,
        }
    }

    #[test]
    fn every_command_decodes_and_names_itself() {
        for &cmd in COMMANDS.iter().chain(HIDDEN_COMMANDS) {
            let r = Request::from_parts(cmd, minimal_args(cmd))
                .unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert_eq!(r.name(), cmd);
            let wire = serde_json::to_value(&r).unwrap();
            assert_eq!(wire["cmd"], cmd);
            let back = Request::from_parts(cmd, wire["args"].clone()).unwrap();
            assert_eq!(back, r, "round trip");
        }
    }

    #[test]
    fn no_args_accepts_null_absent_and_empty_but_not_fields() {
        assert_eq!(
            Request::from_parts("ping", Value::Null).unwrap(),
            Request::Ping(NoArgs {})
        );
        assert!(Request::from_parts("ping", json!({})).is_ok());
        let e = Request::from_parts("status", json!({"verbose": true})).unwrap_err();
        assert!(e.to_string().contains("unknown field `verbose`"), "{e}");
        let e = Request::from_parts("status", json!([1])).unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
    }

    #[test]
    fn unknown_command_lists_the_known_ones() {
        let e = Request::from_parts("frobnicate", Value::Null).unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("unknown command `frobnicate`"), "{m}");
        assert!(m.contains("generate") && !m.contains("debug-crash"), "{m}");
    }

    /// The loosely parsed values of issue 19, each refused with the field and its range.
    #[test]
    fn wrong_types_and_ranges_name_the_field_and_the_range() {
        let cases = [
            (
                "generate",
                json!({"max_tokens": "5"}),
                "`max_tokens` must be an integer in 1 ..= 65536; got \"5\"",
            ),
            (
                "generate",
                json!({"max_tokens": -5}),
                "`max_tokens` must be an integer in 1 ..= 65536; got -5",
            ),
            ("generate", json!({"max_tokens": 5.5}), "`max_tokens`"),
            ("generate", json!({"max_tokens": 0}), "got 0"),
            (
                "generate",
                json!({"top_k": -1}),
                "`top_k` must be an integer in 0 ..= 1000000; got -1",
            ),
            (
                "generate",
                json!({"seed": -1}),
                "`seed` must be an integer in 0 ..= 18446744073709551615; got -1",
            ),
            (
                "generate",
                json!({"temperature": "hot"}),
                "`temperature` must be a number in [0, 100]",
            ),
            (
                "generate",
                json!({"top_p": 0}),
                "`top_p` must be a number in (0, 1]; got 0",
            ),
            (
                "generate",
                json!({"respond": "yes"}),
                "invalid type: string \"yes\", expected a boolean",
            ),
            (
                "generate",
                json!({"as_of": "last tuesday"}),
                "`as_of` \"last tuesday\" is not an RFC 3339 time",
            ),
            (
                "generate",
                json!({"as_of": "2024-13-01T00:00:00Z"}),
                "`as_of` \"2024-13-01T00:00:00Z\" is not an RFC 3339 time",
            ),
            (
                "generate",
                json!({"as_of": 2024}),
                "invalid type: integer `2024`",
            ),
            (
                "generate",
                json!({"prompt": "x", "stream": true}),
                "unknown field `stream`",
            ),
            (
                "expand",
                json!({"layer": 0, "branches": 1, "ramp_steps": -1}),
                "`ramp_steps` must be an integer in 0 ..= 10000000; got -1",
            ),
            (
                "expand",
                json!({"layer": 0, "branches": 1, "noise": -1}),
                "`noise` must be a number in [0, 1000]; got -1",
            ),
            (
                "expand",
                json!({"layer": 0, "branches": 0}),
                "`branches` must be an integer in 1 ..= 64; got 0",
            ),
            ("expand", json!({"layer": 0}), "missing field `branches`"),
            (
                "mask",
                json!({"layer": -1, "branch": 0}),
                "`layer` must be an integer in 0 ..= 255; got -1",
            ),
            (
                "mask",
                json!({"layer": 0, "branch": "1"}),
                "`branch` must be an integer in 0 ..= 1023",
            ),
        ];
        for (cmd, args, want) in cases {
            let e = Request::from_parts(cmd, args.clone())
                .err()
                .unwrap_or_else(|| panic!("{cmd} {args} accepted"));
            let m = e.to_string();
            assert!(
                m.starts_with(&format!("invalid arguments for `{cmd}`: ")),
                "{m}"
            );
            assert!(m.contains(want), "{cmd} {args}: {m}");
        }
    }

    #[test]
    fn defaults_and_explicit_values_decode_exactly() {
        let Request::Generate(g) =
            Request::from_parts("generate", json!({"prompt": "hi"})).unwrap()
        else {
            panic!("generate")
        };
        assert_eq!(
            g,
            GenerateArgs {
                prompt: "hi".into(),
                ..GenerateArgs::default()
            }
        );
        let r = Request::from_parts(
            "generate",
            json!({"prompt": "p", "max_tokens": 5, "temperature": 0, "top_k": 3, "top_p": 0.5,
                   "seed": u64::MAX, "respond": true, "as_of": "2020-06-01T00:00:00+02:00"}),
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Generate(GenerateArgs {
                prompt: "p".into(),
                max_tokens: 5,
                temperature: 0.0,
                top_k: 3,
                top_p: 0.5,
                seed: u64::MAX,
                respond: true,
                as_of: Some(AsOf::try_from("2020-06-01T00:00:00+02:00".to_string()).unwrap()),
            })
        );
        let Request::Generate(g) = r else { panic!() };
        assert_eq!(g.as_of.unwrap().millis(), 1_590_962_400_000);
        for args in [
            json!({"layer": 1, "branches": 2}),
            json!({"layer": 1, "branches": 2, "beta": null, "ramp_steps": null}),
        ] {
            let Request::Expand(e) = Request::from_parts("expand", args).unwrap() else {
                panic!("expand")
            };
            assert_eq!((e.beta, e.ramp_steps, e.noise), (None, None, 1e-3));
        }
        let r = Request::from_parts("generate", json!({"max_tokens": null}));
        assert!(r.is_err(), "null is not a count: {r:?}");
    }

    #[test]
    fn tags_are_names_not_paths_lines_or_reserved_words() {
        for ok in ["nightly", "v1.2_rc-3", "a", &"x".repeat(64)] {
            let r = Request::from_parts("checkpoint", json!({ "tag": ok }));
            assert!(r.is_ok(), "{ok}: {r:?}");
        }
        let huge = "a".repeat(100_000);
        for bad in [
            "../../evil",
            "a\nb",
            "",
            &huge,
            "shutdown",
            "pre-expand",
            "previous",
            ".x",
            "-x",
            "ü",
            "a b",
        ] {
            let e = Request::from_parts("checkpoint", json!({ "tag": bad })).unwrap_err();
            let m = e.to_string();
            assert!(m.contains("`tag`"), "{m}");
            assert!(
                m.len() < 400,
                "the message quotes a huge tag whole: {} bytes",
                m.len()
            );
            assert!(!m.contains('\n'), "{m}");
        }
        assert!(Request::from_parts("checkpoint", json!({"tag": null})).is_ok());
        for ok in [
            "previous",
            "shutdown",
            "20261206T075620.123Z-000000000123-ab12",
        ] {
            assert!(
                Request::from_parts("rollback", json!({ "target": ok })).is_ok(),
                "{ok}"
            );
        }
        for bad in ["../x", "a/b", "", ".."] {
            assert!(
                Request::from_parts("rollback", json!({ "target": bad })).is_err(),
                "{bad}"
            );
        }
    }

    proptest::proptest! {
        /// Any string is either a valid tag that round-trips, or refused; never accepted
        /// with a character outside the set.
        #[test]
        fn tag_rule_is_exactly_the_character_set(s in "\\PC{0,70}") {
            match CheckpointTag::try_from(s.clone()) {
                Ok(t) => {
                    proptest::prop_assert_eq!(t.as_str(), s.as_str());
                    proptest::prop_assert!(s.len() <= MAX_TAG_LEN && !s.is_empty());
                    proptest::prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
                }
                Err(m) => proptest::prop_assert!(m.contains("`tag`")),
            }
        }

        /// Every in-range count is taken as is; every integer outside is refused.
        #[test]
        fn max_tokens_accepts_exactly_its_range(v in -100_000i64..200_000) {
            let r = Request::from_parts("generate", json!({ "max_tokens": v }));
            let inside = (1..=65_536).contains(&v);
            proptest::prop_assert_eq!(r.is_ok(), inside);
            if let Ok(Request::Generate(g)) = r {
                proptest::prop_assert_eq!(g.max_tokens as i64, v);
            }
        }
    }
}
