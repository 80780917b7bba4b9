//! `replay/state.bin`: the store's identity and eviction state, rewritten atomically.
//!
//! ```text
//! magic "MBTDSTAT" (8) | version u32 LE (= 2) | seed u64 | control_fraction f64
//! | tau u64 | evict_through u64 | next_seq u64 | evicted_total u64
//! | control_tau u64 | control_through u64 | crc32 of all before
//! ```
//! Version 1 (without the two control fields) is still read: nothing of its control rows
//! was evicted (`control_tau = u64::MAX`, `control_through = 0`).
//!
//! Eviction rule (bottom-k sampling): every row has the key
//! `k(seq) = splitmix64(seed ^ seq)`. A training row is evicted iff
//! `seq <= evict_through` and `k(seq) >= tau`; a control row iff
//! `seq <= control_through` and `k(seq) >= control_tau`. The thresholds only decrease and
//! the `through` marks only increase, so the kept rows of each kind among those reached
//! are exactly the ones with the smallest keys: a uniform random sample of that history,
//! deterministic given the seed, whatever the arrival pattern. Writing this file is what
//! makes an eviction durable; compaction only reclaims the bytes of rows the rule already
//! evicts.

use std::path::Path;

use super::StoreError;
use super::fsutil::write_atomic;

const MAGIC: &[u8; 8] = b"MBTDSTAT";
const VERSION: u32 = 2;
/// Encoded length of a version-1 file (six u64 fields).
const LEN_V1: usize = 8 + 4 + 8 * 6 + 4;
const LEN: usize = 8 + 4 + 8 * 8 + 4;

/// Persistent state of a store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreState {
    /// Seed of the eviction keys.
    pub seed: u64,
    /// Control fraction the store was created with.
    pub control_fraction: f64,
    /// Eviction threshold on keys.
    pub tau: u64,
    /// Rows with larger seq are not subject to eviction yet.
    pub evict_through: u64,
    /// Smallest seq never used.
    pub next_seq: u64,
    /// Rows evicted so far.
    pub evicted_total: u64,
    /// Eviction threshold on the keys of control rows.
    pub control_tau: u64,
    /// Control rows with larger seq are not subject to eviction yet.
    pub control_through: u64,
}

impl StoreState {
    /// A fresh store's state.
    pub fn new(seed: u64, control_fraction: f64) -> Self {
        StoreState {
            seed,
            control_fraction,
            tau: u64::MAX,
            evict_through: 0,
            next_seq: 1,
            evicted_total: 0,
            control_tau: u64::MAX,
            control_through: 0,
        }
    }

    /// Whether a row is evicted by the rule.
    pub fn is_evicted(&self, seq: u64, control: bool) -> bool {
        let (tau, through) = if control {
            (self.control_tau, self.control_through)
        } else {
            (self.tau, self.evict_through)
        };
        seq <= through && eviction_key(self.seed, seq) >= tau
    }

    /// Serialize.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.seed.to_le_bytes());
        b.extend_from_slice(&self.control_fraction.to_le_bytes());
        for n in [
            self.tau,
            self.evict_through,
            self.next_seq,
            self.evicted_total,
            self.control_tau,
            self.control_through,
        ] {
            b.extend_from_slice(&n.to_le_bytes());
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse; errors name the file and say what to do.
    pub fn decode(path: &Path, b: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |detail: &str| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!(
                "{detail}; restore it from a backup, or move the replay directory away to start a new store"
            ),
        };
        if b.len() < 12 || &b[..8] != MAGIC {
            return Err(corrupt("wrong length or magic"));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        let len = match version {
            1 => LEN_V1,
            VERSION => LEN,
            v => {
                return Err(corrupt(&format!(
                    "format version {v}, this build reads 1 and {VERSION}"
                )));
            }
        };
        if b.len() != len {
            return Err(corrupt("wrong length for its version"));
        }
        let crc = u32::from_le_bytes(b[len - 4..].try_into().expect("4"));
        if crc != crc32fast::hash(&b[..len - 4]) {
            return Err(corrupt("checksum mismatch"));
        }
        let n = |i: usize| u64::from_le_bytes(b[12 + 8 * i..20 + 8 * i].try_into().expect("8"));
        let v2 = version == VERSION;
        Ok(StoreState {
            seed: n(0),
            control_fraction: f64::from_bits(n(1)),
            tau: n(2),
            evict_through: n(3),
            next_seq: n(4),
            evicted_total: n(5),
            control_tau: if v2 { n(6) } else { u64::MAX },
            control_through: if v2 { n(7) } else { 0 },
        })
    }

    /// Write atomically and durably to `path`.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        write_atomic(path, &self.encode()).map_err(|source| StoreError::Io {
            what: "write store state".into(),
            path: path.to_path_buf(),
            source,
        })
    }
}

/// splitmix64 finaliser: a bijective mix of 64 bits.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Eviction key of a sequence number.
pub fn eviction_key(seed: u64, seq: u64) -> u64 {
    splitmix64(seed ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checksum() {
        let s = StoreState {
            seed: 1,
            control_fraction: 0.05,
            tau: 99,
            evict_through: 7,
            next_seq: 12,
            evicted_total: 3,
            control_tau: 55,
            control_through: 9,
        };
        let p = Path::new("state.bin");
        let mut b = s.encode();
        assert_eq!(b.len(), LEN);
        assert_eq!(StoreState::decode(p, &b).unwrap(), s);
        b[20] ^= 1;
        assert!(StoreState::decode(p, &b).is_err());
    }

    #[test]
    fn version_1_files_are_read_with_no_control_eviction() {
        let s = StoreState {
            seed: 4,
            control_fraction: 0.1,
            tau: 77,
            evict_through: 5,
            next_seq: 9,
            evicted_total: 2,
            ..StoreState::new(0, 0.0)
        };
        let mut b = s.encode();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b.truncate(LEN_V1 - 4);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let got = StoreState::decode(Path::new("state.bin"), &b).unwrap();
        assert_eq!(got, s);
        assert_eq!((got.control_tau, got.control_through), (u64::MAX, 0));
        b[8] = 3;
        let err = StoreState::decode(Path::new("state.bin"), &b).unwrap_err();
        assert!(err.to_string().contains("version 3"), "{err}");
    }

    #[test]
    fn eviction_rule_per_kind_and_unreached_rows() {
        let mut s = StoreState::new(3, 0.1);
        s.tau = 0;
        s.evict_through = 10;
        assert!(s.is_evicted(5, false));
        assert!(
            !s.is_evicted(5, true),
            "control rows have their own threshold"
        );
        assert!(!s.is_evicted(11, false));
        s.control_tau = 0;
        s.control_through = 4;
        assert!(s.is_evicted(4, true));
        assert!(
            !s.is_evicted(5, true),
            "not reached by the control rule yet"
        );
    }
}
