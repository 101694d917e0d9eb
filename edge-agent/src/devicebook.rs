//! What each device says it is: its device type and firmware version, as topics, payloads
//! or `[devices.<id>]` tell them, and which registry schema reads it. The cloud is sent the
//! whole book on connect and the changes after, and fills `devices.device_type`,
//! `firmware_version` and `payload_schema_id` from it.
//!
//! Noting a device costs one hash lookup on the decode path; working out schema ids (which
//! change with the schema set) waits for the report.

use std::collections::{HashMap, HashSet};

use plantlink_wire::frame::DeviceInfo;

use crate::schemas::Registry;
use crate::topic::MAX_NAME;

/// The most devices a gateway's book holds; later ones are decoded as ever but not reported.
pub const MAX_DEVICES: usize = 100_000;

/// The devices seen, and what the cloud was last told.
#[derive(Debug, Default)]
pub struct DeviceBook {
    /// Device -> (device type, firmware version), as last seen.
    seen: HashMap<String, (String, String)>,
    /// What the last report said of each device.
    reported: HashMap<String, DeviceInfo>,
    /// Devices whose type or firmware changed since the last report.
    dirty: HashSet<String>,
    /// The schema set version the last report was worked out with.
    reported_version: Option<u64>,
    /// Whether [`MAX_DEVICES`] was reached (logged once).
    full: bool,
}

impl DeviceBook {
    /// Notes that `device` sent a payload as `device_type` with `firmware`. Names longer
    /// than [`MAX_NAME`] are not reported.
    pub fn note(&mut self, device: &str, device_type: &str, firmware: &str) {
        if [device, device_type, firmware]
            .iter()
            .any(|s| s.len() > MAX_NAME)
        {
            return;
        }
        if let Some((t, f)) = self.seen.get(device)
            && t == device_type
            && f == firmware
        {
            return;
        }
        if !self.seen.contains_key(device) && self.seen.len() >= MAX_DEVICES {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    limit = MAX_DEVICES,
                    device,
                    "the device report is full: later devices decode as ever but are not reported"
                );
            }
            return;
        }
        self.seen.insert(
            device.to_owned(),
            (device_type.to_owned(), firmware.to_owned()),
        );
        self.dirty.insert(device.to_owned());
    }

    /// How many devices the book holds.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// What to tell the cloud: every device when `all` (a new connection), else those whose
    /// type, firmware or schema changed since the last report. `local` says which device
    /// types `[[firmware]]` maps (no registry schema reads those). In device order.
    pub fn report(
        &mut self,
        all: bool,
        registry: &Registry,
        local: impl Fn(&str) -> bool,
    ) -> Vec<DeviceInfo> {
        let recheck = all || self.reported_version != Some(registry.version);
        self.reported_version = Some(registry.version);
        let candidates: Vec<&String> = if recheck {
            self.seen.keys().collect()
        } else {
            self.dirty.iter().collect()
        };
        let mut out = Vec::new();
        for device in candidates {
            let Some((t, f)) = self.seen.get(device) else {
                continue;
            };
            let schema_id = if local(t) {
                None
            } else {
                registry.find(t, f).map(|(e, _)| e.id)
            };
            let info = DeviceInfo {
                device: device.clone(),
                device_type: t.clone(),
                firmware_version: f.clone(),
                schema_id,
            };
            if all || self.reported.get(device) != Some(&info) {
                out.push(info);
            }
        }
        for i in &out {
            self.reported.insert(i.device.clone(), i.clone());
        }
        self.dirty.clear();
        out.sort_by(|a, b| a.device.cmp(&b.device));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plantlink_schema::{Entry, Format};

    fn registry(version: u64, firmware: &str) -> Registry {
        let definition = serde_json::json!({ "fields": { "t": "temperature" } });
        Registry::compile(
            version,
            vec![Entry {
                id: 7,
                revision: 1,
                device_type: "th-300".into(),
                firmware_version: firmware.into(),
                format: Format::Json,
                definition,
            }],
        )
    }

    fn names(r: &[DeviceInfo]) -> Vec<(&str, Option<i64>)> {
        r.iter().map(|i| (i.device.as_str(), i.schema_id)).collect()
    }

    #[test]
    fn reports_changes_once_and_everything_on_connect() {
        let mut b = DeviceBook::default();
        let reg = registry(1, "3.x");
        b.note("d1", "th-300", "3.1.0");
        b.note("d2", "th-100", "1.0");
        b.note("d1", "th-300", "3.1.0");
        let r = b.report(true, &reg, |_| false);
        assert_eq!(names(&r), [("d1", Some(7)), ("d2", None)]);
        assert!(b.report(false, &reg, |_| false).is_empty());
        // A firmware upgrade out of the schema's range.
        b.note("d1", "th-300", "4.0.0");
        let r = b.report(false, &reg, |_| false);
        assert_eq!(names(&r), [("d1", None)]);
        assert_eq!(r[0].firmware_version, "4.0.0");
        // A reconnect sends the whole book again.
        assert_eq!(b.report(true, &reg, |_| false).len(), 2);
    }

    #[test]
    fn a_new_schema_set_changes_the_reported_schema() {
        let mut b = DeviceBook::default();
        b.note("d1", "th-300", "4.0.0");
        assert_eq!(
            names(&b.report(true, &registry(1, "3.x"), |_| false)),
            [("d1", None)]
        );
        // Nothing noted since, but the set now covers firmware 4.
        assert_eq!(
            names(&b.report(false, &registry(2, "4.x"), |_| false)),
            [("d1", Some(7))]
        );
        // `[[firmware]]` naming the type shadows the registry.
        assert_eq!(
            names(&b.report(false, &registry(3, "4.x"), |t| t == "th-300")),
            [("d1", None)]
        );
    }

    #[test]
    fn the_book_is_bounded() {
        let mut b = DeviceBook::default();
        for i in 0..MAX_DEVICES + 10 {
            b.note(&format!("d{i}"), "t", "1");
        }
        assert_eq!(b.len(), MAX_DEVICES);
        // Known devices still update.
        b.note("d0", "t", "2");
        let r = b.report(false, &Registry::default(), |_| false);
        assert_eq!(r.len(), MAX_DEVICES);
    }
}
