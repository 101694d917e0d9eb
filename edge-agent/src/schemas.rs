//! The schema set pushed from the cloud's registry: compiled once, looked up per message.
//!
//! Each entry compiles on its own; one that does not is refused with its reason (reported
//! to the cloud) and the others still decode. The local `[[firmware]]` table wins for every
//! device type it names.

use std::sync::Arc;

use plantlink_schema::{Compiled, Entry, Format, Protobuf, version_matches};

/// A compiled entry.
#[derive(Debug, Clone)]
pub struct Applied {
    /// What the registry sent.
    pub entry: Entry,
    /// The compiled schema, or why it could not be used.
    pub compiled: Result<Arc<Compiled>, String>,
}

/// The set of schemas in force.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// The set's version in the registry (0: none received yet).
    pub version: u64,
    /// Its entries, most specific firmware pattern first.
    pub entries: Vec<Applied>,
}

impl Registry {
    /// Compiles a set; entries that do not compile are kept with their reason.
    pub fn compile(version: u64, entries: Vec<Entry>) -> Self {
        let mut entries: Vec<Applied> = entries
            .into_iter()
            .map(|entry| {
                let compiled = plantlink_schema::compile(entry.format, &entry.definition)
                    .map(Arc::new)
                    .map_err(|e| e.to_string());
                Applied { entry, compiled }
            })
            .collect();
        // Exact versions before patterns, longer patterns before shorter.
        entries.sort_by_key(|a| {
            let v = &a.entry.firmware_version;
            let pattern = v.ends_with(['x', '*']);
            (pattern, std::cmp::Reverse(v.len()), a.entry.id)
        });
        Self { version, entries }
    }

    /// The entries that could not be applied: label and reason.
    pub fn refused(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .filter_map(|a| {
                a.compiled
                    .as_ref()
                    .err()
                    .map(|e| (a.entry.label(), e.clone()))
            })
            .collect()
    }

    /// The usable entry for a device type and firmware version.
    pub fn find(&self, device_type: &str, firmware: &str) -> Option<(&Entry, &Arc<Compiled>)> {
        self.entries.iter().find_map(|a| {
            let ok = a.entry.device_type == device_type
                && version_matches(&a.entry.firmware_version, firmware);
            match (&a.compiled, ok) {
                (Ok(c), true) => Some((&a.entry, c)),
                _ => None,
            }
        })
    }

    /// The protobuf schema for a device type and firmware, if one is in force.
    pub fn protobuf(&self, device_type: &str, firmware: &str) -> Option<(String, Arc<Compiled>)> {
        let (e, c) = self.find(device_type, firmware)?;
        (e.format == Format::Protobuf).then(|| (e.label(), c.clone()))
    }

    /// Whether any entry (usable or not) is for this device type.
    pub fn names(&self, device_type: &str) -> bool {
        self.entries
            .iter()
            .any(|a| a.entry.device_type == device_type)
    }
}

/// Wire entries as registry entries; those whose format or definition does not even parse
/// are refused at once.
pub fn from_wire(
    schemas: Vec<plantlink_wire::frame::SchemaEntry>,
) -> (Vec<Entry>, Vec<plantlink_wire::frame::SchemaRefusal>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for s in schemas {
        let refuse = |reason: String| plantlink_wire::frame::SchemaRefusal {
            id: s.id,
            revision: s.revision,
            reason,
        };
        let Some(format) = Format::parse(&s.format) else {
            refused.push(refuse(format!(
                "format: {:?} is not json, cbor or protobuf (a newer cloud?)",
                s.format
            )));
            continue;
        };
        let definition = match serde_json::from_str(&s.definition) {
            Ok(d) => d,
            Err(e) => {
                refused.push(refuse(format!("definition: not JSON: {e}")));
                continue;
            }
        };
        ok.push(Entry {
            id: s.id,
            revision: s.revision,
            device_type: s.device_type,
            firmware_version: s.firmware_version,
            format,
            definition,
        });
    }
    (ok, refused)
}

/// The protobuf inside a compiled schema.
pub fn as_protobuf(c: &Compiled) -> Option<&Protobuf> {
    match c {
        Compiled::Protobuf(p) => Some(p),
        Compiled::Mapping(_) => None,
    }
}
