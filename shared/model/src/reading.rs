//! One reading and its identity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Extra labels of a reading (site, line, unit, ...). Sorted by key, so equal sets compare
/// and hash equal whatever order they were parsed in. An empty map does not allocate.
pub type Tags = BTreeMap<String, String>;

/// One value of one metric of one device at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The tenant that owns the device. On the cloud side it comes from the gateway's
    /// certificate, never from the payload.
    pub tenant: String,
    /// The device id, unique within its tenant.
    pub device: String,
    /// The metric name, e.g. `temperature`.
    pub metric: String,
    /// When the value was measured (or received, when the device sends no time).
    pub ts: Timestamp,
    /// The value. Any `f64` is carried bit-exactly, NaN and infinities included.
    pub value: f64,
    /// Labels taken from the topic or payload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: Tags,
    /// The device's own message sequence number, when it sends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl Reading {
    /// A reading without tags or sequence number.
    pub fn new(
        tenant: impl Into<String>,
        device: impl Into<String>,
        metric: impl Into<String>,
        ts: Timestamp,
        value: f64,
    ) -> Self {
        Self {
            tenant: tenant.into(),
            device: device.into(),
            metric: metric.into(),
            ts,
            value,
            tags: Tags::new(),
            seq: None,
        }
    }

    /// The identity under which this reading is stored exactly once.
    pub fn id(&self) -> ReadingId<'_> {
        ReadingId {
            tenant: &self.tenant,
            device: &self.device,
            metric: &self.metric,
            ts: self.ts,
        }
    }

    /// Whether `other` has the same identity and carries the same content (the same value,
    /// as [`value_key`] compares them, and the same tags): a replay, which is dropped
    /// wherever it is seen again. `seq` takes no part.
    pub fn is_replay_of(&self, other: &Reading) -> bool {
        self.id() == other.id()
            && value_key(self.value) == value_key(other.value)
            && self.tags == other.tags
    }

    /// Whether `other` has the same identity but different content: a conflict, which is
    /// never dropped silently. The first value stored stays; the other is reported.
    pub fn conflicts_with(&self, other: &Reading) -> bool {
        self.id() == other.id() && !self.is_replay_of(other)
    }
}

/// The bits under which a value is compared for replays: every NaN is one NaN and `-0.0`
/// is `0.0`, as PostgreSQL's `float8` equality has it, so the agent's dedupe and the cloud's
/// conflict check agree on what "the same value" is.
pub fn value_key(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

/// The stable identity of a reading: `(tenant, device, metric, ts)`.
///
/// Two tenants may name their devices alike, so the tenant leads. `seq`, the value and the
/// tags are not part of it: the same identity with the same value and tags is a *replay*
/// ([`Reading::is_replay_of`]), and with another value or other tags a *conflict*
/// ([`Reading::conflicts_with`]). The agent's dedupe, the cloud's table key and the Kafka
/// identity headers all use this definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadingId<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The device id.
    pub device: &'a str,
    /// The metric name.
    pub metric: &'a str,
    /// The reading's timestamp.
    pub ts: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_ignores_value_tags_and_seq() {
        let mut a = Reading::new("acme", "press01", "temperature", Timestamp(5), 1.0);
        let mut b = a.clone();
        b.value = 2.0;
        b.seq = Some(9);
        b.tags.insert("line".into(), "3".into());
        assert_eq!(a.id(), b.id());
        a.ts = Timestamp(6);
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn two_tenants_never_share_an_identity() {
        let a = Reading::new("acme", "pump-1", "temperature", Timestamp(5), 1.0);
        let mut b = a.clone();
        b.tenant = "globex".into();
        assert_ne!(a.id(), b.id());
        assert!(!a.is_replay_of(&b) && !a.conflicts_with(&b));
    }

    #[test]
    fn replays_and_conflicts() {
        let a = Reading::new("acme", "pump-1", "temperature", Timestamp(5), 1.5);
        let mut replay = a.clone();
        replay.seq = Some(42);
        assert!(a.is_replay_of(&replay) && !a.conflicts_with(&replay));

        let mut other_value = a.clone();
        other_value.value = 1.25;
        assert!(a.conflicts_with(&other_value));

        let mut other_tags = a.clone();
        other_tags.tags.insert("line".into(), "4".into());
        assert!(a.conflicts_with(&other_tags));

        let nan = Reading::new("acme", "pump-1", "t", Timestamp(5), f64::NAN);
        let mut nan2 = nan.clone();
        nan2.value = f64::from_bits(f64::NAN.to_bits() | 1);
        assert!(nan.is_replay_of(&nan2));
        let zero = Reading::new("acme", "pump-1", "t", Timestamp(5), 0.0);
        let mut neg = zero.clone();
        neg.value = -0.0;
        assert!(zero.is_replay_of(&neg));
    }
}
