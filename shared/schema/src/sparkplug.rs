//! Sparkplug B: the topic namespace and the payload (Eclipse Tahu's `sparkplug_b.proto`,
//! `org.eclipse.tahu.protobuf.Payload`), as far as a host application that stores numbers
//! needs it.
//!
//! Metric metadata, property sets, datasets and templates are not read into structures:
//! datasets, templates and extensions are kept as their raw bytes (and skipped as not
//! numbers), metadata and properties are ignored as unknown fields.

use prost::Message as _;

/// The namespace of Sparkplug B topics.
pub const NAMESPACE: &str = "spBv1.0";

/// The metric a node's rebirth is requested with, in an NCMD.
pub const REBIRTH: &str = "Node Control/Rebirth";

/// The metric NBIRTH and NDEATH carry the birth/death sequence number in.
pub const BD_SEQ: &str = "bdSeq";

/// A Sparkplug B payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the epoch, when the message was made.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    /// The metrics.
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// The message sequence number, 0 to 255 (absent in NDEATH).
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    /// A UUID describing the body, if any.
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    /// An opaque body.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// One metric of a payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// The name (always in BIRTH; DATA may carry only the alias).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// The alias the BIRTH assigned.
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Milliseconds since the epoch, when the value was sampled.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// The [`DataType`] number.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    /// A historical value, not the current one.
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    /// A value not to be stored.
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    /// The value is null.
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    /// The value.
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19")]
    pub value: Option<Value>,
}

/// A metric's value, by the wire field it travels in.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    /// Int8, Int16, Int32 (two's complement), UInt8, UInt16, UInt32.
    #[prost(uint32, tag = "10")]
    Int(u32),
    /// Int64 (two's complement), UInt64, DateTime (ms).
    #[prost(uint64, tag = "11")]
    Long(u64),
    /// Float.
    #[prost(float, tag = "12")]
    Float(f32),
    /// Double.
    #[prost(double, tag = "13")]
    Double(f64),
    /// Boolean.
    #[prost(bool, tag = "14")]
    Boolean(bool),
    /// String, Text, UUID.
    #[prost(string, tag = "15")]
    String(String),
    /// Bytes, File, and the arrays of Sparkplug 3.0.
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
    /// A DataSet, kept raw.
    #[prost(bytes = "vec", tag = "17")]
    DataSet(Vec<u8>),
    /// A Template, kept raw.
    #[prost(bytes = "vec", tag = "18")]
    Template(Vec<u8>),
    /// An extension, kept raw.
    #[prost(bytes = "vec", tag = "19")]
    Extension(Vec<u8>),
}

/// Sparkplug B data type numbers.
#[allow(missing_docs)]
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT8: u32 = 5;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
    pub const DATETIME: u32 = 13;
    pub const TEXT: u32 = 14;
    pub const UUID: u32 = 15;
    pub const DATASET: u32 = 16;
    pub const BYTES: u32 = 17;
    pub const FILE: u32 = 18;
    pub const TEMPLATE: u32 = 19;

    /// The name of a data type, for messages and the docs.
    pub fn name(t: u32) -> &'static str {
        match t {
            INT8 => "Int8",
            INT16 => "Int16",
            INT32 => "Int32",
            INT64 => "Int64",
            UINT8 => "UInt8",
            UINT16 => "UInt16",
            UINT32 => "UInt32",
            UINT64 => "UInt64",
            FLOAT => "Float",
            DOUBLE => "Double",
            BOOLEAN => "Boolean",
            STRING => "String",
            DATETIME => "DateTime",
            TEXT => "Text",
            UUID => "UUID",
            DATASET => "DataSet",
            BYTES => "Bytes",
            FILE => "File",
            TEMPLATE => "Template",
            20 => "PropertySet",
            21 => "PropertySetList",
            22..=34 => "an array type",
            _ => "an unknown type",
        }
    }
}

/// A metric's value as a number, by its data type; `Err` names what it is instead.
/// Signed integers travel as two's complement in the unsigned wire fields.
pub fn number(datatype: u32, value: &Value) -> Result<f64, &'static str> {
    use datatype::*;
    match (datatype, value) {
        (INT8, Value::Int(v)) => Ok(f64::from(*v as u8 as i8)),
        (INT16, Value::Int(v)) => Ok(f64::from(*v as u16 as i16)),
        (INT32, Value::Int(v)) => Ok(f64::from(*v as i32)),
        (UINT8 | UINT16 | UINT32, Value::Int(v)) => Ok(f64::from(*v)),
        (INT64, Value::Long(v)) => Ok(*v as i64 as f64),
        (UINT64, Value::Long(v)) => Ok(*v as f64),
        (FLOAT, Value::Float(v)) => Ok(f64::from(*v)),
        (DOUBLE, Value::Double(v)) => Ok(*v),
        (BOOLEAN, Value::Boolean(b)) => Ok(if *b { 1.0 } else { 0.0 }),
        // Some encoders leave the type to the value field in DATA: read by the field.
        (0, Value::Int(v)) => Ok(f64::from(*v)),
        (0, Value::Long(v)) => Ok(*v as f64),
        (0, Value::Float(v)) => Ok(f64::from(*v)),
        (0, Value::Double(v)) => Ok(*v),
        (0, Value::Boolean(b)) => Ok(if *b { 1.0 } else { 0.0 }),
        (INT8..=BOOLEAN, _) => Err("a value in another field than its data type's"),
        (t, _) => Err(datatype::name(t)),
    }
}

/// The message types of the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Node birth certificate.
    NBirth,
    /// Node death certificate (the node's MQTT will).
    NDeath,
    /// Node data.
    NData,
    /// Node command.
    NCmd,
    /// Device birth certificate.
    DBirth,
    /// Device death certificate.
    DDeath,
    /// Device data.
    DData,
    /// Device command.
    DCmd,
}

impl Kind {
    /// The topic segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NBirth => "NBIRTH",
            Kind::NDeath => "NDEATH",
            Kind::NData => "NDATA",
            Kind::NCmd => "NCMD",
            Kind::DBirth => "DBIRTH",
            Kind::DDeath => "DDEATH",
            Kind::DData => "DDATA",
            Kind::DCmd => "DCMD",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "NBIRTH" => Kind::NBirth,
            "NDEATH" => Kind::NDeath,
            "NDATA" => Kind::NData,
            "NCMD" => Kind::NCmd,
            "DBIRTH" => Kind::DBirth,
            "DDEATH" => Kind::DDeath,
            "DDATA" => Kind::DData,
            "DCMD" => Kind::DCmd,
            _ => return None,
        })
    }

    /// A device message (the topic has a device segment).
    pub fn is_device(self) -> bool {
        matches!(self, Kind::DBirth | Kind::DDeath | Kind::DData | Kind::DCmd)
    }
}

/// A parsed `spBv1.0/{group}/{kind}/{node}[/{device}]` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    /// The group id.
    pub group: &'a str,
    /// The message type.
    pub kind: Kind,
    /// The edge node id.
    pub node: &'a str,
    /// The device id, for device messages.
    pub device: Option<&'a str>,
}

impl<'a> Topic<'a> {
    /// Parses a Sparkplug B topic; `Err` says what is wrong. `Ok(None)`: a topic of the
    /// namespace that carries no readings (`STATE`).
    pub fn parse(topic: &'a str) -> Result<Option<Self>, String> {
        let parts: Vec<&str> = topic.split('/').collect();
        if parts.first() != Some(&NAMESPACE) {
            return Err(format!(
                "topic {topic:?} is not in the {NAMESPACE} namespace"
            ));
        }
        if parts.get(1) == Some(&"STATE") {
            return Ok(None);
        }
        let kind = parts
            .get(2)
            .and_then(|k| Kind::parse(k))
            .ok_or_else(|| format!("topic {topic:?} has no Sparkplug message type (NBIRTH, NDATA, DDATA, ...) as its third part"))?;
        let want = if kind.is_device() { 5 } else { 4 };
        if parts.len() != want || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "topic {topic:?}: a {} topic is spBv1.0/group/{}/node{}",
                kind.as_str(),
                kind.as_str(),
                if kind.is_device() { "/device" } else { "" }
            ));
        }
        Ok(Some(Topic {
            group: parts[1],
            kind,
            node: parts[3],
            device: parts.get(4).copied(),
        }))
    }

    /// The topic text of `kind` for this node (and device).
    pub fn render(group: &str, kind: Kind, node: &str, device: Option<&str>) -> String {
        match device {
            Some(d) => format!("{NAMESPACE}/{group}/{}/{node}/{d}", kind.as_str()),
            None => format!("{NAMESPACE}/{group}/{}/{node}", kind.as_str()),
        }
    }
}

/// Decodes a payload.
pub fn decode(bytes: &[u8]) -> Result<Payload, String> {
    Payload::decode(bytes).map_err(|e| format!("not a Sparkplug B payload: {e}"))
}

/// Encodes a payload.
pub fn encode(p: &Payload) -> Vec<u8> {
    p.encode_to_vec()
}

/// The NCMD payload that asks a node to publish its births again.
pub fn rebirth_request(now_ms: u64) -> Vec<u8> {
    encode(&Payload {
        timestamp: Some(now_ms),
        metrics: vec![Metric {
            name: Some(REBIRTH.to_owned()),
            timestamp: Some(now_ms),
            datatype: Some(datatype::BOOLEAN),
            value: Some(Value::Boolean(true)),
            ..Metric::default()
        }],
        seq: None,
        uuid: None,
        body: None,
    })
}
