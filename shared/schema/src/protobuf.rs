//! Protobuf payloads, decoded dynamically from a descriptor set.
//!
//! Fields the message does not declare are ignored. A mapped field that a message lacks (one
//! with presence: proto2, proto3 `optional`, or a message field) or that arrives with
//! another wire type than declared is an error naming the field. A proto3 number without
//! `optional` has no presence: when absent it reads as 0, as protobuf defines.

use base64::Engine as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};

use crate::{MAX_DESCRIPTOR_BYTES, ProtobufDefinition, SchemaError};

/// The `google.protobuf.Timestamp` message, read as a point in time.
const TIMESTAMP: &str = "google.protobuf.Timestamp";

/// A compiled protobuf schema.
#[derive(Debug, Clone)]
pub struct Protobuf {
    message: MessageDescriptor,
    /// Explicit metrics; empty means every top-level number field.
    metrics: Vec<(Path, String)>,
    timestamp: Option<Path>,
    sequence: Option<Path>,
    device: Option<Path>,
}

/// A dotted field path, resolved.
#[derive(Debug, Clone)]
struct Path {
    text: String,
    fields: Vec<FieldDescriptor>,
}

/// A value read for the timestamp.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// An integer (epoch seconds, ms, µs or ns; a `google.protobuf.Timestamp` gives µs).
    Int(i128),
    /// A floating-point number (epoch seconds).
    Float(f64),
    /// Text (RFC 3339).
    Text(String),
}

/// What one message held.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Metric name and value, in field order.
    pub metrics: Vec<(String, f64)>,
    /// Fields mapped as metrics that this message lacks or holds as something else: the
    /// field path and what is wrong. The other metrics are still read.
    pub bad_metrics: Vec<(String, String)>,
    /// The timestamp field's value, if the schema names one.
    pub timestamp: Option<Scalar>,
    /// The sequence number, if the schema names one and the message has it.
    pub sequence: Option<u64>,
    /// The device id, if the schema names a field for it.
    pub device: Option<String>,
}

/// Why a message could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a protobuf message of this type.
    #[error("not a valid {message} protobuf message: {detail}")]
    Malformed {
        /// The message type.
        message: String,
        /// What the decoder said.
        detail: String,
    },
    /// A field the schema needs (timestamp, device) is not in the message.
    #[error("field {field:?} is missing")]
    Missing {
        /// The field path.
        field: String,
    },
    /// A field arrived with another type than the descriptor declares.
    #[error("field {field:?} {detail}")]
    WrongType {
        /// The field path.
        field: String,
        /// What was found.
        detail: String,
    },
}

impl Protobuf {
    /// Checks a definition against its own descriptor set.
    pub fn compile(d: &ProtobufDefinition) -> Result<Self, SchemaError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d.descriptor_set.trim())
            .map_err(|e| {
                SchemaError::new(
                    "definition.descriptor_set",
                    format!("not base64: {e}; encode the file `protoc --descriptor_set_out` wrote, e.g. `base64 -w0 schema.pb`"),
                )
            })?;
        if bytes.is_empty() {
            return Err(SchemaError::new(
                "definition.descriptor_set",
                "is empty; give the base64 of the file `protoc --include_imports --descriptor_set_out=schema.pb schema.proto` writes",
            ));
        }
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(SchemaError::new(
                "definition.descriptor_set",
                format!(
                    "{} bytes is over the limit of {MAX_DESCRIPTOR_BYTES}; include only the files the message needs",
                    bytes.len()
                ),
            ));
        }
        let pool = DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
            SchemaError::new(
                "definition.descriptor_set",
                format!(
                    "not a FileDescriptorSet ({e}); make it with `protoc --include_imports --descriptor_set_out=schema.pb schema.proto`"
                ),
            )
        })?;
        let Some(message) = pool.get_message_by_name(d.message.trim_start_matches('.')) else {
            let mut known: Vec<String> = pool
                .all_messages()
                .map(|m| m.full_name().to_owned())
                .filter(|n| !n.starts_with("google.protobuf."))
                .collect();
            known.sort();
            known.truncate(20);
            return Err(SchemaError::new(
                "definition.message",
                format!(
                    "message {:?} is not in the descriptor set; it has: {}",
                    d.message,
                    if known.is_empty() {
                        "no messages".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let mut metrics = Vec::new();
        for (path, metric) in &d.metrics {
            let at = format!("definition.metrics.{path}");
            let p = resolve(&message, path, &at)?;
            let last = p.last();
            if !is_number(&last.kind()) || last.is_list() || last.is_map() {
                return Err(SchemaError::new(
                    at,
                    format!("field {path:?} is {}, not a number", describe(last)),
                ));
            }
            if metric.is_empty() || metric.len() > 128 || metric.chars().any(char::is_control) {
                return Err(SchemaError::new(
                    at,
                    format!("metric name {metric:?} must be 1 to 128 printable characters"),
                ));
            }
            metrics.push((p, metric.clone()));
        }
        let timestamp = match &d.timestamp {
            None => None,
            Some(path) => {
                let p = resolve(&message, path, "definition.timestamp")?;
                let last = p.last();
                let ok = !last.is_list()
                    && match last.kind() {
                        Kind::Message(m) => m.full_name() == TIMESTAMP,
                        Kind::String => true,
                        k => is_integer(&k) || matches!(k, Kind::Double | Kind::Float),
                    };
                if !ok {
                    return Err(SchemaError::new(
                        "definition.timestamp",
                        format!(
                            "field {path:?} is {}; a timestamp is an integer, a double, text or google.protobuf.Timestamp",
                            describe(last)
                        ),
                    ));
                }
                Some(p)
            }
        };
        let sequence = match &d.sequence {
            None => None,
            Some(path) => {
                let p = resolve(&message, path, "definition.sequence")?;
                if !is_integer(&p.last().kind()) || p.last().is_list() {
                    return Err(SchemaError::new(
                        "definition.sequence",
                        format!("field {path:?} is {}, not an integer", describe(p.last())),
                    ));
                }
                Some(p)
            }
        };
        let device = match &d.device {
            None => None,
            Some(path) => {
                let p = resolve(&message, path, "definition.device")?;
                let k = p.last().kind();
                if p.last().is_list() || !(k == Kind::String || is_integer(&k)) {
                    return Err(SchemaError::new(
                        "definition.device",
                        format!(
                            "field {path:?} is {}, not text or an integer",
                            describe(p.last())
                        ),
                    ));
                }
                Some(p)
            }
        };
        if metrics.is_empty()
            && !message
                .fields()
                .any(|f| is_number(&f.kind()) && !f.is_list() && !f.is_map())
        {
            return Err(SchemaError::new(
                "definition.metrics",
                format!(
                    "message {} has no number fields at the top level; map nested fields, e.g. {{\"env.temperature\": \"temperature\"}}",
                    message.full_name()
                ),
            ));
        }
        Ok(Self {
            message,
            metrics,
            timestamp,
            sequence,
            device,
        })
    }

    /// The message's full name.
    pub fn message_name(&self) -> &str {
        self.message.full_name()
    }

    /// Reads one message.
    pub fn decode(&self, bytes: &[u8]) -> Result<Record, DecodeError> {
        let msg = match DynamicMessage::decode(self.message.clone(), bytes) {
            Ok(m) => m,
            Err(e) => {
                return Err(match mistyped(&self.message, bytes) {
                    Some((field, detail)) => DecodeError::WrongType { field, detail },
                    None => DecodeError::Malformed {
                        message: self.message.full_name().to_owned(),
                        detail: e.to_string(),
                    },
                });
            }
        };
        let mut out = Record::default();
        if self.metrics.is_empty() {
            let skip = |f: &FieldDescriptor| {
                [&self.timestamp, &self.sequence, &self.device]
                    .into_iter()
                    .flatten()
                    .any(|p| p.fields.len() == 1 && p.fields[0].number() == f.number())
            };
            for f in self.message.fields() {
                if !is_number(&f.kind()) || f.is_list() || f.is_map() || skip(&f) {
                    continue;
                }
                if f.supports_presence() && !msg.has_field(&f) {
                    continue;
                }
                if let Some(x) = number(&msg.get_field(&f)) {
                    out.metrics.push((f.name().to_owned(), x));
                }
            }
        } else {
            for (path, metric) in &self.metrics {
                match get(&msg, path) {
                    Ok(Some(v)) => match number(&v) {
                        Some(x) => out.metrics.push((metric.clone(), x)),
                        None => out
                            .bad_metrics
                            .push((path.text.clone(), "is not a number".to_owned())),
                    },
                    Ok(None) | Err(_) => out
                        .bad_metrics
                        .push((path.text.clone(), "is missing".to_owned())),
                }
            }
        }
        if let Some(path) = &self.timestamp {
            let v = get(&msg, path)?.ok_or_else(|| DecodeError::Missing {
                field: path.text.clone(),
            })?;
            out.timestamp = Some(match v {
                Value::String(s) => Scalar::Text(s),
                Value::F64(f) => Scalar::Float(f),
                Value::F32(f) => Scalar::Float(f64::from(f)),
                Value::Message(m) => {
                    let secs = m
                        .get_field_by_name("seconds")
                        .and_then(|v| v.as_i64())
                        .unwrap_or(0);
                    let nanos = m
                        .get_field_by_name("nanos")
                        .and_then(|v| v.as_i32())
                        .unwrap_or(0);
                    Scalar::Int(i128::from(secs) * 1_000_000 + i128::from(nanos) / 1_000)
                }
                other => Scalar::Int(integer(&other).unwrap_or(0)),
            });
        }
        if let Some(path) = &self.sequence
            && let Some(v) = get(&msg, path)?
        {
            let i = integer(&v).unwrap_or(-1);
            out.sequence = Some(u64::try_from(i).map_err(|_| DecodeError::WrongType {
                field: path.text.clone(),
                detail: format!("is {i}, not a whole number >= 0"),
            })?);
        }
        if let Some(path) = &self.device {
            let v = get(&msg, path)?.ok_or_else(|| DecodeError::Missing {
                field: path.text.clone(),
            })?;
            out.device = match v {
                Value::String(s) => Some(s),
                other => integer(&other).map(|i| i.to_string()),
            };
        }
        Ok(out)
    }
}

impl Path {
    fn last(&self) -> &FieldDescriptor {
        // A resolved path has at least one field.
        &self.fields[self.fields.len() - 1]
    }
}

fn resolve(message: &MessageDescriptor, path: &str, at: &str) -> Result<Path, SchemaError> {
    let mut fields = Vec::new();
    let mut current = message.clone();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, name) in parts.iter().enumerate() {
        let Some(f) = current.get_field_by_name(name) else {
            let names: Vec<String> = current.fields().map(|f| f.name().to_owned()).collect();
            return Err(SchemaError::new(
                at,
                format!(
                    "message {} has no field {name:?}; its fields are: {}",
                    current.full_name(),
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        };
        if i + 1 < parts.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() && !f.is_map() => current = m,
                _ => {
                    return Err(SchemaError::new(
                        at,
                        format!(
                            "field {:?} is {}; only a single message field can hold {:?}",
                            parts[..=i].join("."),
                            describe(&f),
                            parts[i + 1]
                        ),
                    ));
                }
            }
        }
        fields.push(f);
    }
    Ok(Path {
        text: path.to_owned(),
        fields,
    })
}

/// The value at `path`; `None` when a field with presence is absent. Walks by reference:
/// only the value found is copied.
fn get(msg: &DynamicMessage, path: &Path) -> Result<Option<Value>, DecodeError> {
    walk(msg, &path.fields).map_err(|()| DecodeError::WrongType {
        field: path.text.clone(),
        detail: "is not a message".to_owned(),
    })
}

fn walk(msg: &DynamicMessage, fields: &[FieldDescriptor]) -> Result<Option<Value>, ()> {
    let Some((f, rest)) = fields.split_first() else {
        return Ok(None);
    };
    if f.supports_presence() && !msg.has_field(f) {
        return Ok(None);
    }
    let v = msg.get_field(f);
    if rest.is_empty() {
        return Ok(Some(v.into_owned()));
    }
    match v.as_ref() {
        Value::Message(m) => walk(m, rest),
        _ => Err(()),
    }
}

fn is_integer(k: &Kind) -> bool {
    matches!(
        k,
        Kind::Int32
            | Kind::Int64
            | Kind::Uint32
            | Kind::Uint64
            | Kind::Sint32
            | Kind::Sint64
            | Kind::Fixed32
            | Kind::Fixed64
            | Kind::Sfixed32
            | Kind::Sfixed64
    )
}

fn is_number(k: &Kind) -> bool {
    is_integer(k) || matches!(k, Kind::Double | Kind::Float | Kind::Bool | Kind::Enum(_))
}

fn describe(f: &FieldDescriptor) -> String {
    let base = match f.kind() {
        Kind::Message(m) => format!("a {} message", m.full_name()),
        Kind::Enum(e) => format!("the enum {}", e.full_name()),
        Kind::String => "text (string)".to_owned(),
        Kind::Bytes => "bytes".to_owned(),
        k => format!("{k:?}").to_lowercase(),
    };
    if f.is_map() {
        "a map".to_owned()
    } else if f.is_list() {
        format!("a repeated field of {base}")
    } else {
        base
    }
}

fn integer(v: &Value) -> Option<i128> {
    match v {
        Value::I32(i) => Some((*i).into()),
        Value::I64(i) => Some((*i).into()),
        Value::U32(i) => Some((*i).into()),
        Value::U64(i) => Some((*i).into()),
        Value::EnumNumber(i) => Some((*i).into()),
        Value::Bool(b) => Some(i128::from(*b)),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::F64(f) => Some(*f),
        Value::F32(f) => Some(f64::from(*f)),
        other => integer(other).map(|i| i as f64),
    }
}

/// The first top-level field whose wire type is not the one its kind is written with.
fn mistyped(message: &MessageDescriptor, mut buf: &[u8]) -> Option<(String, String)> {
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (number, wire) = ((key >> 3) as u32, (key & 7) as u8);
        if let Some(f) = message.get_field(number) {
            let expected = wire_type(&f.kind());
            let packed = f.is_list() && wire == 2 && expected != 2;
            if wire != expected && !packed {
                return Some((
                    f.name().to_owned(),
                    format!(
                        "arrived as {}, but {} is declared {}",
                        wire_name(wire),
                        f.name(),
                        describe(&f)
                    ),
                ));
            }
        }
        match wire {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = buf.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                buf = buf.get(len..)?;
            }
            5 => buf = buf.get(4..)?,
            _ => return None,
        }
    }
    None
}

fn wire_type(k: &Kind) -> u8 {
    match k {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => 1,
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => 5,
        Kind::String | Kind::Bytes | Kind::Message(_) => 2,
        _ => 0,
    }
}

fn wire_name(w: u8) -> &'static str {
    match w {
        0 => "a varint",
        1 => "a 64-bit value",
        2 => "length-delimited bytes",
        5 => "a 32-bit value",
        _ => "a group",
    }
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut out = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        out |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}
