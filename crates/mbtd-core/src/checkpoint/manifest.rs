//! `manifest.json`: what a checkpoint holds, and the checksum of the manifest itself.
//!
//! File layout: the pretty-printed JSON of [`Manifest`] whose last member is
//! `"manifest_blake3": "<hex>"`, the blake3 of the same JSON text without that member
//! (i.e. of the bytes `<text before ",\n  \"manifest_blake3\"">` + `"\n}"`). Any JSON reader can
//! read the file; [`decode_manifest`] recomputes the checksum on the raw bytes, so no float
//! re-formatting can cause a false mismatch.
//!
//! Ids: `YYYYMMDDTHHMMSS.mmmZ-<step, 12 digits>-<4 hex>`, e.g.
//! `20261123T101502.123Z-000000000042-9f3a`. They sort by creation time (then step); the
//! suffix is a per-process counter seeded from the process id and the clock, so two ids made
//! in the same millisecond differ.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Version of the checkpoint format written by this build (and the only one it reads).
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest file inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const HASH_MEMBER: &str = ",\n  \"manifest_blake3\": \"";

/// Size and blake3 of one file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Length in bytes.
    pub bytes: u64,
    /// blake3 of the content, lowercase hex (64 chars).
    pub blake3: String,
}

/// The manifest of one checkpoint. The caller fills everything except `files`, which
/// [`crate::checkpoint::write_checkpoint`] sets from the bytes it writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Id, equal to the directory name.
    pub id: String,
    /// Id of the checkpoint this state descends from (the one restored or last written).
    pub parent: Option<String>,
    /// Operator or governor tag, e.g. `pre-expansion`; tagged checkpoints are kept forever.
    pub tag: Option<String>,
    /// Creation time, RFC 3339 UTC with milliseconds (`2026-11-23T10:15:02.123Z`).
    pub created_at: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Branches per layer (`K_l`).
    pub widths: Vec<usize>,
    /// The full daemon config in effect.
    pub config: serde_json::Value,
    /// Opaque resumable state (RNG states, participation EMAs, governor state, cursors).
    pub state: serde_json::Value,
    /// Latest control-set loss, if known (a non-finite value is stored as `null`).
    pub control_loss: Option<f32>,
    /// Every file of the checkpoint except the manifest: name → size and hash.
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// A manifest for a checkpoint created at `now` after `step` steps, with a fresh id,
    /// no parent or tag, null config/state and no files.
    pub fn new(now: SystemTime, step: u64, tokens: u64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            id: new_id(now, step),
            parent: None,
            tag: None,
            created_at: format_rfc3339(now),
            step,
            tokens,
            widths: Vec::new(),
            config: serde_json::Value::Null,
            state: serde_json::Value::Null,
            control_loss: None,
            files: BTreeMap::new(),
        }
    }
}

/// Serialises `m` to the `manifest.json` bytes (pretty JSON with the trailing checksum).
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_string_pretty(m)?;
    let open = body.strip_suffix("\n}").unwrap_or(&body);
    let hash = blake3::hash(body.as_bytes()).to_hex();
    Ok(format!("{open}{HASH_MEMBER}{hash}\"\n}}\n").into_bytes())
}

/// Parses `manifest.json` bytes and checks the embedded checksum. The error says what is
/// wrong (not UTF-8, no checksum member, checksum mismatch, JSON error).
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let at = text
        .rfind(HASH_MEMBER)
        .ok_or("no \"manifest_blake3\" member at the end (truncated or not written by mbtd)")?;
    let rest = &text[at + HASH_MEMBER.len()..];
    let stored = rest
        .split('"')
        .next()
        .filter(|h| rest.len() > h.len())
        .ok_or("unterminated \"manifest_blake3\" value")?;
    let body = format!("{}\n}}", &text[..at]);
    let actual = blake3::hash(body.as_bytes()).to_hex();
    if actual.as_str() != stored {
        return Err(format!(
            "manifest checksum mismatch: stored {stored}, computed {actual} (the manifest was modified or corrupted)"
        ));
    }
    serde_json::from_str(&body).map_err(|e| format!("invalid manifest JSON: {e}"))
}

/// A fresh checkpoint id for a checkpoint made at `now` after `step` steps (see module doc).
pub fn new_id(now: SystemTime, step: u64) -> String {
    static SEQ: OnceLock<AtomicU64> = OnceLock::new();
    let seq = SEQ.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        AtomicU64::new(u64::from(std::process::id()).wrapping_mul(0x9E37) ^ u64::from(nanos))
    });
    let suffix = seq.fetch_add(1, Ordering::Relaxed) & 0xffff;
    let (y, mo, d, h, mi, s, ms) = civil(now);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{ms:03}Z-{step:012}-{suffix:04x}")
}

/// Whether `id` is a plausible checkpoint directory name (non-empty, no path separators,
/// no leading dot, at most 200 bytes).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && !id.contains(['/', '\\', '\0'])
        && id != "LATEST"
}

/// RFC 3339 UTC with milliseconds: `2026-11-23T10:15:02.123Z`. Times before 1970 clamp to
/// the epoch.
pub fn format_rfc3339(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, ms) = civil(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

/// Parses an RFC 3339 UTC time (`Z` or `+00:00`, optional fraction) to a [`SystemTime`].
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut dp = date.splitn(3, '-');
    let y: i64 = dp.next()?.parse().ok()?;
    let mo: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut tp = hms.splitn(3, ':');
    let h: u64 = tp.next()?.parse().ok()?;
    let mi: u64 = tp.next()?.parse().ok()?;
    let sec: u64 = tp.next()?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        digits.parse().ok()?
    };
    let days = days_from_civil(y, mo, d);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + mi * 60 + sec;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of the UTC day that contains `t`.
pub fn unix_day(t: SystemTime) -> i64 {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (secs / 86_400) as i64
}

fn civil(t: SystemTime) -> (i64, u32, u32, u64, u64, u64, u32) {
    let dur = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = dur.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, mo, d) = civil_from_days(days);
    (
        y,
        mo,
        d,
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        dur.subsec_millis(),
    )
}

// Howard Hinnant's days <-> civil date algorithms (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(
            UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            42,
            1000,
        );
        m.widths = vec![4, 5];
        m.control_loss = Some(3.25);
        m.config = serde_json::json!({"model": {"d": 256}, "lr": 0.1 + 0.2});
        // 1.2 / 3.0 = 0.39999999999999997 needs serde_json's float_roundtrip to come back exact.
        m.state = serde_json::json!({"rng": [1, 2, 3], "ema": [1.2 / 3.0, 1e-300, u64::MAX]});
        m.files.insert(
            "model.safetensors".into(),
            FileEntry {
                bytes: 10,
                blake3: "ab".repeat(32),
            },
        );
        m
    }

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2026-11-23T10:15:02.123Z = 1795428902.123 s after the epoch.
        let t = UNIX_EPOCH + Duration::from_millis(1_795_428_902_123);
        assert_eq!(format_rfc3339(t), "2026-11-23T10:15:02.123Z");
        assert_eq!(parse_rfc3339("2026-11-23T10:15:02.123Z"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-23T10:15:02.123+00:00"), Some(t));
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00Z"),
            Some(UNIX_EPOCH + Duration::from_secs(951_782_400))
        );
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2026-11-23T10:15:02"), None);
        assert_eq!(unix_day(t), 20_780);
    }

    #[test]
    fn id_format_sorts_by_time_and_is_unique() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_428_902_123);
        let a = new_id(t, 42);
        assert!(a.starts_with("20261123T101502.123Z-000000000042-"), "{a}");
        assert!(is_valid_id(&a));
        let b = new_id(t, 42);
        assert_ne!(a, b, "same millisecond, same step");
        let later = new_id(t + Duration::from_millis(1), 0);
        assert!(later > a && later > b);
        assert!(!is_valid_id(".tmp-x") && !is_valid_id("a/b") && !is_valid_id(""));
    }

    #[test]
    fn manifest_round_trip_and_checksum() {
        let m = sample();
        let bytes = encode_manifest(&m).unwrap();
        assert_eq!(decode_manifest(&bytes).unwrap(), m);
        // Plain JSON readers see the checksum as a normal member.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["manifest_blake3"].as_str().unwrap().len(), 64);
        assert_eq!(v["step"], 42);
        // A changed digit is detected.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let tampered = text.replacen("\"step\": 42", "\"step\": 43", 1);
        assert!(
            decode_manifest(tampered.as_bytes())
                .unwrap_err()
                .contains("checksum mismatch")
        );
        // A truncated file is detected.
        let err = decode_manifest(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(err.contains("manifest_blake3"), "{err}");
    }

    proptest! {
        #[test]
        fn rfc3339_round_trips(ms in 0u64..8_000_000_000_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }

        #[test]
        fn ids_sort_like_times(a in 0u64..4_000_000_000_000, b in 0u64..4_000_000_000_000) {
            let ia = new_id(UNIX_EPOCH + Duration::from_millis(a), 7);
            let ib = new_id(UNIX_EPOCH + Duration::from_millis(b), 7);
            if a < b { prop_assert!(ia < ib); }
            if a > b { prop_assert!(ia > ib); }
        }

        #[test]
        fn any_corrupted_byte_is_detected(pos in 0usize..10_000, bit in 0u8..8) {
            let original = sample();
            let bytes = encode_manifest(&original).unwrap();
            let mut bad = bytes.clone();
            let i = pos % bad.len();
            bad[i] ^= 1 << bit;
            // Either rejected, or the change was in insignificant trailing whitespace.
            if let Ok(m) = decode_manifest(&bad) {
                prop_assert_eq!(m, original);
                prop_assert!(i >= bytes.len() - 3);
            }
        }
    }
}
