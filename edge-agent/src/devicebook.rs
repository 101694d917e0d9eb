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
    /// Device -> what it was last seen as.
    seen: HashMap<String, Seen>,
    /// What the cloud was last told of each device.
    reported: HashMap<String, DeviceInfo>,
    /// Devices to tell the cloud about (changed, or everything after [`DeviceBook::reset`]).
    dirty: HashSet<String>,
    /// The schema set version the reported schema ids were worked out with.
    reported_version: Option<u64>,
    /// Whether [`MAX_DEVICES`] was reached (logged once).
    full: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    device_type: String,
    firmware: String,
    /// Whether a payload of it was read (a device refused as `no_schema` is reported with no
    /// schema, whatever the registry holds for its type).
    decoded: bool,
}

/// Whether a name can go to the cloud: not over [`MAX_NAME`], not empty, no control
/// characters (PostgreSQL text takes no NUL).
fn reportable(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(char::is_control)
}

impl DeviceBook {
    /// Notes that `device` sent a payload as `device_type` with `firmware`, and whether it
    /// was read. Names that cannot be reported are left out.
    pub fn note(&mut self, device: &str, device_type: &str, firmware: &str, decoded: bool) {
        if let Some(s) = self.seen.get(device)
            && s.device_type == device_type
            && s.firmware == firmware
            && s.decoded == decoded
        {
            return;
        }
        if ![device, device_type, firmware].into_iter().all(reportable) {
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
            Seen {
                device_type: device_type.to_owned(),
                firmware: firmware.to_owned(),
                decoded,
            },
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

    /// Everything is to be told again (a new connection, or the periodic refresh that
    /// repairs a report the cloud could not keep).
    pub fn reset(&mut self) {
        self.reported.clear();
        self.dirty.extend(self.seen.keys().cloned());
    }

    /// At most `limit` devices to tell the cloud: those whose type, firmware or schema
    /// changed since they were last told (a new schema set rechecks every device), of the
    /// devices `admitted` lets through (the agent's allow list and device cap; the others
    /// wait). `local` says which device types `[[firmware]]` maps (no registry schema reads
    /// those). In device order.
    pub fn report(
        &mut self,
        limit: usize,
        registry: &Registry,
        local: impl Fn(&str) -> bool,
        admitted: impl Fn(&str) -> bool,
    ) -> Vec<DeviceInfo> {
        if self.reported_version != Some(registry.version) {
            self.reported_version = Some(registry.version);
            self.dirty.extend(self.seen.keys().cloned());
        }
        let mut todo: Vec<String> = self.dirty.iter().cloned().collect();
        todo.sort();
        let mut out = Vec::new();
        for device in todo {
            if out.len() >= limit {
                break;
            }
            if !admitted(&device) {
                continue;
            }
            self.dirty.remove(&device);
            let Some(s) = self.seen.get(&device) else {
                continue;
            };
            let schema_id = if local(&s.device_type) || !s.decoded {
                None
            } else {
                registry
                    .find(&s.device_type, &s.firmware)
                    .map(|(e, _)| e.id)
            };
            let info = DeviceInfo {
                device: device.clone(),
                device_type: s.device_type.clone(),
                firmware_version: s.firmware.clone(),
                schema_id,
            };
            if self.reported.get(&device) != Some(&info) {
                self.reported.insert(device, info.clone());
                out.push(info);
            }
        }
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

    fn all(b: &mut DeviceBook, reg: &Registry) -> Vec<DeviceInfo> {
        b.report(usize::MAX, reg, |_| false, |_| true)
    }

    #[test]
    fn reports_changes_once_and_everything_after_a_reset() {
        let mut b = DeviceBook::default();
        let reg = registry(1, "3.x");
        b.note("d1", "th-300", "3.1.0", true);
        b.note("d2", "th-100", "1.0", true);
        b.note("d1", "th-300", "3.1.0", true);
        assert_eq!(names(&all(&mut b, &reg)), [("d1", Some(7)), ("d2", None)]);
        assert!(all(&mut b, &reg).is_empty());
        // A firmware upgrade out of the schema's range.
        b.note("d1", "th-300", "4.0.0", true);
        let r = all(&mut b, &reg);
        assert_eq!(names(&r), [("d1", None)]);
        assert_eq!(r[0].firmware_version, "4.0.0");
        // A reconnect tells everything again.
        b.reset();
        assert_eq!(all(&mut b, &reg).len(), 2);
    }

    #[test]
    fn a_new_schema_set_changes_the_reported_schema() {
        let mut b = DeviceBook::default();
        b.note("d1", "th-300", "4.0.0", true);
        assert_eq!(names(&all(&mut b, &registry(1, "3.x"))), [("d1", None)]);
        // Nothing noted since, but the set now covers firmware 4.
        assert_eq!(names(&all(&mut b, &registry(2, "4.x"))), [("d1", Some(7))]);
        // `[[firmware]]` naming the type shadows the registry.
        let r = b.report(9, &registry(3, "4.x"), |t| t == "th-300", |_| true);
        assert_eq!(names(&r), [("d1", None)]);
    }

    #[test]
    fn unread_devices_have_no_schema_and_refused_ones_wait() {
        let mut b = DeviceBook::default();
        let reg = registry(1, "3.x");
        b.note("d1", "th-300", "3.1.0", false);
        b.note("d2", "th-300", "3.1.0", true);
        let r = b.report(9, &reg, |_| false, |d| d != "d2");
        assert_eq!(names(&r), [("d1", None)]);
        // d2 waits until it is admitted; d1, read at last, gets its schema.
        b.note("d1", "th-300", "3.1.0", true);
        assert_eq!(
            names(&all(&mut b, &reg)),
            [("d1", Some(7)), ("d2", Some(7))]
        );
        // Names PostgreSQL cannot hold are not reported.
        b.note("d3", "th-300\0", "1", true);
        b.note("", "th-300", "1", true);
        assert!(all(&mut b, &reg).is_empty());
    }

    #[test]
    fn reports_are_bounded_and_the_book_too() {
        let mut b = DeviceBook::default();
        for i in 0..MAX_DEVICES + 10 {
            b.note(&format!("d{i:06}"), "t", "1", true);
        }
        assert_eq!(b.len(), MAX_DEVICES);
        let reg = Registry::default();
        let first = b.report(1000, &reg, |_| false, |_| true);
        assert_eq!(first.len(), 1000);
        assert_eq!(first[0].device, "d000000");
        let mut total = first.len();
        loop {
            let r = b.report(4096, &reg, |_| false, |_| true);
            if r.is_empty() {
                break;
            }
            total += r.len();
        }
        assert_eq!(total, MAX_DEVICES);
    }
}
