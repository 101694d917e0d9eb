//! Timestamps: microseconds since the Unix epoch.

use serde::{Deserialize, Serialize};

/// Microseconds since 1970-01-01T00:00:00Z. Negative values are before the epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Microseconds in one second.
    pub const MICROS_PER_SEC: i64 = 1_000_000;

    /// From whole seconds since the epoch; `None` when out of range.
    pub fn from_secs(secs: i64) -> Option<Self> {
        secs.checked_mul(Self::MICROS_PER_SEC).map(Self)
    }

    /// From milliseconds since the epoch; `None` when out of range.
    pub fn from_millis(ms: i64) -> Option<Self> {
        ms.checked_mul(1_000).map(Self)
    }

    /// Microseconds since the epoch.
    pub fn as_micros(self) -> i64 {
        self.0
    }

    /// Milliseconds since the epoch, rounded towards negative infinity.
    pub fn as_millis(self) -> i64 {
        self.0.div_euclid(1_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(Timestamp::from_secs(2).map(|t| t.0), Some(2_000_000));
        assert_eq!(Timestamp::from_millis(-1).map(|t| t.as_millis()), Some(-1));
        assert_eq!(Timestamp(-1).as_millis(), -1);
        assert_eq!(Timestamp::from_secs(i64::MAX), None);
    }
}
