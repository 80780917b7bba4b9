//! Serde helpers that keep non-finite floats loadable: JSON has no NaN or infinity, and
//! `serde_json` writes them as `null`, which a plain `f64` field refuses to read back. With
//! these, `null` reads back as NaN, so a state holding a diverged loss still round-trips.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `f64`: finite values as numbers, non-finite ones as `null`; `null` reads as NaN.
pub mod nan_as_null {
    use super::*;

    /// Serialises `v` (non-finite as `null`).
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        v.is_finite().then_some(*v).serialize(s)
    }

    /// Reads a number, or `null` as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// `Vec<f64>` with the same rule per element.
pub mod vec_nan_as_null {
    use super::*;

    /// Serialises `v` (non-finite elements as `null`).
    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.is_finite().then_some(*x)))
    }

    /// Reads numbers, `null` elements as NaN.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?
            .into_iter()
            .map(|x| x.unwrap_or(f64::NAN))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct T {
        #[serde(with = "super::nan_as_null")]
        x: f64,
        #[serde(with = "super::vec_nan_as_null")]
        v: Vec<f64>,
    }

    #[test]
    fn non_finite_round_trips_as_nan() {
        let t = T {
            x: f64::NAN,
            v: vec![1.5, f64::INFINITY, -0.25],
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"x":null,"v":[1.5,null,-0.25]}"#);
        let back: T = serde_json::from_str(&json).unwrap();
        assert!(back.x.is_nan());
        assert_eq!(back.v[0], 1.5);
        assert!(back.v[1].is_nan());
        let finite: T = serde_json::from_str(r#"{"x":0.1,"v":[]}"#).unwrap();
        assert_eq!(finite.x, 0.1);
    }
}
