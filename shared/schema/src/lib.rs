//! Payload schemas of the Plantlink fleet registry.
//!
//! A schema tells a gateway how to read the payloads of one device type and firmware range.
//! The cloud keeps them per tenant in `payload_schemas`, checks them with [`compile`] before
//! storing one, and pushes the tenant's set to its gateways, which compile them again and
//! decode with them. Two kinds exist:
//!
//! - **mapping** (`json` and `cbor`): the same field renames and ignores as a gateway's local
//!   `[[firmware]]` table;
//! - **protobuf**: a compiled descriptor set (`FileDescriptorSet`, as `protoc
//!   --descriptor_set_out` writes it), the message name, and which fields are metrics, the
//!   timestamp, the sequence number and the device id. Decoding is dynamic ([`prost_reflect`]):
//!   no code is generated per schema.
//!
//! [`sparkplug`] holds the Sparkplug B payload (the Eclipse Tahu protobuf encoding), which
//! needs no schema of its own.

#![forbid(unsafe_code)]

pub mod protobuf;
pub mod sparkplug;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use protobuf::{Protobuf, Record, Scalar};

/// How a schema's payloads are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON, read with a field mapping.
    Json,
    /// CBOR, read with a field mapping.
    Cbor,
    /// Protocol Buffers, read with a descriptor set.
    Protobuf,
}

impl Format {
    /// The name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
            Format::Protobuf => "protobuf",
        }
    }

    /// The format named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Format::Json),
            "cbor" => Some(Format::Cbor),
            "protobuf" => Some(Format::Protobuf),
            _ => None,
        }
    }
}

/// The definition of a `json` or `cbor` schema: `[[firmware]]` in the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Payload field name to metric name, e.g. `{"t": "temperature"}`.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Payload fields that are neither metrics nor errors.
    #[serde(default)]
    pub ignore: Vec<String>,
}

/// The definition of a `protobuf` schema.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtobufDefinition {
    /// The `FileDescriptorSet`, base64 (standard alphabet, padded).
    pub descriptor_set: String,
    /// The message's full name, e.g. `plant.v1.Reading`.
    pub message: String,
    /// Field path (dots into nested messages, e.g. `env.humidity`) to metric name. Empty:
    /// every number field at the top level is a metric of its own name.
    #[serde(default)]
    pub metrics: BTreeMap<String, String>,
    /// The field holding the event time: an integer (epoch seconds, ms, µs or ns, told apart
    /// by magnitude), a double (seconds), RFC 3339 text or a `google.protobuf.Timestamp`.
    /// None: the gateway's receive time.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// The field holding the device's message sequence number (an integer).
    #[serde(default)]
    pub sequence: Option<String>,
    /// The field holding the device id (text), where the topic does not name it.
    #[serde(default)]
    pub device: Option<String>,
}

/// One schema as the registry stores and pushes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The registry's id of the schema.
    pub id: i64,
    /// Its revision: 1 when created, one more on each change.
    pub revision: i32,
    /// The device type it is for.
    pub device_type: String,
    /// Firmware versions: exact (`2.1.0`), or a prefix ending in `x` or `*` (`2.x`).
    pub firmware_version: String,
    /// The encoding.
    pub format: Format,
    /// The definition, as JSON ([`Mapping`] or [`ProtobufDefinition`]).
    pub definition: serde_json::Value,
}

impl Entry {
    /// `th-300 3.x (schema 12 revision 2)`: how messages name it.
    pub fn label(&self) -> String {
        format!(
            "{} {} (schema {} revision {})",
            self.device_type, self.firmware_version, self.id, self.revision
        )
    }
}

/// A definition that cannot be used, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SchemaError {
    /// The field of the definition, e.g. `definition.metrics.temp_c`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl SchemaError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A schema ready to decode with.
#[derive(Debug, Clone)]
pub enum Compiled {
    /// Field renames for JSON or CBOR.
    Mapping(Mapping),
    /// A protobuf message.
    Protobuf(Box<Protobuf>),
}

/// Most bytes of a descriptor set a schema may carry.
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;

/// Checks a definition of `format` and makes it ready to decode with. The error names the
/// field at fault, as `definition.<field>`.
pub fn compile(format: Format, definition: &serde_json::Value) -> Result<Compiled, SchemaError> {
    match format {
        Format::Json | Format::Cbor => {
            let m: Mapping = from_json(definition)?;
            for (from, to) in &m.fields {
                if to.is_empty() || to.len() > 128 || to.chars().any(char::is_control) {
                    return Err(SchemaError::new(
                        format!("definition.fields.{from}"),
                        format!("metric name {to:?} must be 1 to 128 printable characters"),
                    ));
                }
            }
            Ok(Compiled::Mapping(m))
        }
        Format::Protobuf => {
            let d: ProtobufDefinition = from_json(definition)?;
            Protobuf::compile(&d).map(|p| Compiled::Protobuf(Box::new(p)))
        }
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, SchemaError> {
    T::deserialize(v).map_err(|e| {
        let text = e.to_string();
        // serde names the key in its message: "unknown field `x`" or "missing field `x`".
        let field = text
            .split('`')
            .nth(1)
            .map_or_else(|| "definition".to_owned(), |f| format!("definition.{f}"));
        SchemaError::new(field, text)
    })
}

/// Whether firmware `version` matches the pattern of an entry (`2.1.0`, `2.x`, `2.*`).
pub fn version_matches(pattern: &str, version: &str) -> bool {
    match pattern.strip_suffix(['x', '*']) {
        Some(prefix) => version.starts_with(prefix),
        None => pattern == version,
    }
}

#[cfg(test)]
mod tests;
