//! Availability masks for training (pure, seeded, serialisable).
//!
//! Each step, each branch `i` of layer `l` is on with probability `p_{l,i}` (the global
//! `p` unless overridden), drawn from a ChaCha8 stream. A branch in forced outage (an
//! operator's mask) is always off. If fewer than `min(min_active, available)` are on,
//! branches chosen uniformly among the available off ones are switched on until the
//! quorum is met (`available` = not forced off; at least one branch of every layer is
//! always available). The participation EMA is `π ← decay·π + (1-decay)·m` (starting at
//! 1), and the gradient scale of a branch is `min(1/π_i, max_scale)`.

use super::{BranchScales, Masks};
use crate::config::{FieldError, Section};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Errors of the availability model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AvailabilityError {
    /// A configuration field is out of range.
    #[error("invalid availability configuration: {0}")]
    Config(#[from] FieldError),
    /// A layer/branch index is out of range or an outage would leave a layer empty.
    #[error("availability: {0}")]
    Branch(String),
}

/// Override of the availability probability of one branch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchP {
    /// Layer index.
    pub layer: usize,
    /// Branch index.
    pub branch: usize,
    /// Probability in `[0, 1]`.
    pub p: f64,
}

/// Configuration of the availability model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AvailabilityConfig {
    /// Probability that a branch is available at a step.
    pub p: f64,
    /// Per-branch overrides of `p`.
    pub per_branch_p: Vec<BranchP>,
    /// Quorum: at least this many branches per layer are on (capped by availability).
    pub min_active: usize,
    /// Decay of the participation EMA, in `[0, 1)`.
    pub ema_decay: f64,
}

impl Default for AvailabilityConfig {
    fn default() -> Self {
        Self {
            p: 1.0,
            per_branch_p: Vec::new(),
            min_active: 1,
            ema_decay: 0.99,
        }
    }
}

impl Section for AvailabilityConfig {
    const NAME: &'static str = "availability";

    fn validate(&self) -> Result<(), FieldError> {
        Self::in_range("p", self.p, 0.0, 1.0)?;
        for (j, b) in self.per_branch_p.iter().enumerate() {
            Self::in_range(&format!("per_branch_p[{j}].p"), b.p, 0.0, 1.0)?;
        }
        Self::require("min_active", self.min_active, self.min_active >= 1, ">= 1")?;
        let decay = self.ema_decay;
        Self::require("ema_decay", decay, (0.0..1.0).contains(&decay), "[0, 1)")
    }
}

/// Serialisable position of the ChaCha8 stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// Seed.
    pub seed: [u8; 32],
    /// Stream id.
    pub stream: u64,
    /// Word position, high 64 bits.
    pub word_pos_hi: u64,
    /// Word position, low 64 bits.
    pub word_pos_lo: u64,
}

impl RngState {
    fn of(rng: &ChaCha8Rng) -> Self {
        let pos = rng.get_word_pos();
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos_hi: (pos >> 64) as u64,
            word_pos_lo: pos as u64,
        }
    }

    fn rng(&self) -> ChaCha8Rng {
        let mut r = ChaCha8Rng::from_seed(self.seed);
        r.set_stream(self.stream);
        r.set_word_pos(((self.word_pos_hi as u128) << 64) | self.word_pos_lo as u128);
        r
    }
}

/// The availability model's state (the whole of it is in the serialised form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "AvailabilityState", try_from = "AvailabilityState")]
pub struct Availability {
    config: AvailabilityConfig,
    pi: Vec<Vec<f64>>,
    forced_off: Vec<Vec<bool>>,
    rng: ChaCha8Rng,
}

/// Serialised form of [`Availability`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityState {
    /// Configuration.
    pub config: AvailabilityConfig,
    /// Participation EMA per layer and branch as `f64::to_bits` (exact through JSON).
    pub pi_bits: Vec<Vec<u64>>,
    /// Forced outages per layer and branch.
    pub forced_off: Vec<Vec<bool>>,
    /// RNG position.
    pub rng: RngState,
}

impl From<Availability> for AvailabilityState {
    fn from(a: Availability) -> Self {
        Self {
            rng: RngState::of(&a.rng),
            config: a.config,
            pi_bits: a
                .pi
                .iter()
                .map(|r| r.iter().map(|p| p.to_bits()).collect())
                .collect(),
            forced_off: a.forced_off,
        }
    }
}

impl TryFrom<AvailabilityState> for Availability {
    type Error = String;
    fn try_from(s: AvailabilityState) -> Result<Self, String> {
        s.config.validate().map_err(|e| e.to_string())?;
        let pi: Vec<Vec<f64>> = s
            .pi_bits
            .iter()
            .map(|r| r.iter().map(|&b| f64::from_bits(b)).collect())
            .collect();
        if pi.iter().flatten().any(|p| !(0.0..=1.0).contains(p)) {
            return Err("availability state: a participation rate is outside [0, 1]".to_string());
        }
        if pi.len() != s.forced_off.len()
            || pi
                .iter()
                .zip(&s.forced_off)
                .any(|(a, b)| a.len() != b.len())
        {
            return Err("availability state: pi and forced_off have different widths".to_string());
        }
        Ok(Self {
            rng: s.rng.rng(),
            config: s.config,
            pi,
            forced_off: s.forced_off,
        })
    }
}

impl Availability {
    /// A fresh model for the given widths, seeded.
    pub fn new(
        config: AvailabilityConfig,
        widths: &[usize],
        seed: u64,
    ) -> Result<Self, AvailabilityError> {
        config.validate()?;
        Ok(Self {
            config,
            pi: widths.iter().map(|&k| vec![1.0; k]).collect(),
            forced_off: widths.iter().map(|&k| vec![false; k]).collect(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AvailabilityConfig {
        &self.config
    }

    /// Adopts new widths (after an expansion): new branches start with `π = 1`.
    pub fn sync_widths(&mut self, widths: &[usize]) {
        self.pi.resize_with(widths.len(), Vec::new);
        self.forced_off.resize_with(widths.len(), Vec::new);
        for (l, &k) in widths.iter().enumerate() {
            self.pi[l].resize(k, 1.0);
            self.forced_off[l].resize(k, false);
        }
    }

    fn check(&self, layer: usize, branch: usize) -> Result<(), AvailabilityError> {
        match self.pi.get(layer) {
            None => Err(AvailabilityError::Branch(format!(
                "layer {layer} does not exist ({} layers)",
                self.pi.len()
            ))),
            Some(r) if branch >= r.len() => Err(AvailabilityError::Branch(format!(
                "layer {layer} branch {branch} does not exist (the layer has {})",
                r.len()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Forces a branch off (operator mask) or lifts the outage. Refuses to force off
    /// the last available branch of a layer.
    pub fn set_forced_off(
        &mut self,
        layer: usize,
        branch: usize,
        off: bool,
    ) -> Result<(), AvailabilityError> {
        self.check(layer, branch)?;
        let row = &mut self.forced_off[layer];
        if off && !row[branch] && row.iter().filter(|&&f| !f).count() == 1 {
            return Err(AvailabilityError::Branch(format!(
                "layer {layer} branch {branch} is the last available branch; unmask another first"
            )));
        }
        row[branch] = off;
        Ok(())
    }

    /// Forced outages per layer.
    pub fn forced_off(&self) -> &[Vec<bool>] {
        &self.forced_off
    }

    /// Participation EMA per layer and branch.
    pub fn participation(&self) -> &[Vec<f64>] {
        &self.pi
    }

    fn p_of(&self, layer: usize, branch: usize) -> f64 {
        self.config
            .per_branch_p
            .iter()
            .rev()
            .find(|b| b.layer == layer && b.branch == branch)
            .map_or(self.config.p, |b| b.p)
    }

    /// Draws this step's masks and updates the participation EMA.
    pub fn draw(&mut self) -> Masks {
        let mut masks = Vec::with_capacity(self.pi.len());
        for l in 0..self.pi.len() {
            let k = self.pi[l].len();
            let mut m: Vec<bool> = (0..k)
                .map(|i| {
                    let u: f64 = self.rng.random();
                    !self.forced_off[l][i] && u < self.p_of(l, i)
                })
                .collect();
            let available = self.forced_off[l].iter().filter(|&&f| !f).count();
            let quorum = self.config.min_active.min(available);
            while m.iter().filter(|&&b| b).count() < quorum {
                let off: Vec<usize> = (0..k)
                    .filter(|&i| !m[i] && !self.forced_off[l][i])
                    .collect();
                m[off[self.rng.random_range(0..off.len())]] = true;
            }
            let d = self.config.ema_decay;
            for (p, &on) in self.pi[l].iter_mut().zip(&m) {
                *p = d * *p + (1.0 - d) * if on { 1.0 } else { 0.0 };
            }
            masks.push(m);
        }
        masks
    }

    /// Gradient scales `min(1/π_i, max_scale)`.
    pub fn scales(&self, max_scale: f32) -> BranchScales {
        self.pi
            .iter()
            .map(|r| {
                r.iter()
                    .map(|&p| {
                        if p > 0.0 {
                            (1.0 / p).min(max_scale as f64) as f32
                        } else {
                            max_scale
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(p: f64) -> AvailabilityConfig {
        AvailabilityConfig {
            p,
            min_active: 2,
            ..AvailabilityConfig::default()
        }
    }

    #[test]
    fn quorum_outages_and_rates() {
        let mut a = Availability::new(cfg(0.3), &[4, 3], 1).unwrap();
        a.set_forced_off(0, 2, true).unwrap();
        let mut on = [0usize; 4];
        for _ in 0..2000 {
            let m = a.draw();
            assert!(m.iter().all(|r| r.iter().filter(|&&b| b).count() >= 2));
            assert!(!m[0][2]);
            for (i, &b) in m[0].iter().enumerate() {
                on[i] += b as usize;
            }
        }
        assert_eq!(on[2], 0);
        assert!(on[0] > 900 && on[0] < 1500, "{on:?}");
        let s = a.scales(4.0);
        assert_eq!(s[0][2], 4.0);
        assert!(s[1][0] > 1.0 && s[1][0] < 2.5, "{s:?}");
        a.set_forced_off(1, 0, true).unwrap();
        a.set_forced_off(1, 1, true).unwrap();
        assert!(a.set_forced_off(1, 2, true).is_err());
        assert!(a.draw()[1] == vec![false, false, true]);
        assert!(a.set_forced_off(2, 0, true).is_err());
    }

    #[test]
    fn serde_round_trip_resumes_the_exact_stream() {
        let config = AvailabilityConfig {
            p: 0.75,
            per_branch_p: vec![BranchP {
                layer: 1,
                branch: 0,
                p: 0.1,
            }],
            min_active: 1,
            ema_decay: 0.9,
        };
        let mut a = Availability::new(config, &[4, 4], 9).unwrap();
        for _ in 0..7 {
            a.draw();
        }
        let json = serde_json::to_string(&a).unwrap();
        let mut b: Availability = serde_json::from_str(&json).unwrap();
        assert_eq!(a, b);
        for _ in 0..20 {
            assert_eq!(a.draw(), b.draw());
        }
        assert_eq!(a.participation(), b.participation());
        a.sync_widths(&[4, 6]);
        assert_eq!(a.scales(4.0)[1].len(), 6);
    }

    #[test]
    fn config_validation_names_fields() {
        let bad = AvailabilityConfig {
            p: 1.5,
            ..AvailabilityConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("availability.p")
        );
        let bad = AvailabilityConfig {
            min_active: 0,
            ..AvailabilityConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("min_active")
        );
        let parsed: AvailabilityConfig = toml::from_str("p = 0.75\nmin_active = 2").unwrap();
        assert_eq!(parsed.p, 0.75);
        assert!(toml::from_str::<AvailabilityConfig>("q = 1").is_err());
    }
}
