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
            device: &self.device,
            metric: &self.metric,
            ts: self.ts,
        }
    }
}

/// The stable identity of a reading: `(device, metric, ts)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReadingId<'a> {
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
}
