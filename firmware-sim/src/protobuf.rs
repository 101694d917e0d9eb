//! The `th300-pb` device type: firmware 3.0.0 of a th-300 sends protobuf, read by a gateway
//! only once its schema is in the cloud's registry ([`schema_body`], `firmware-sim
//! protobuf-schema`).
//!
//! ```proto
//! syntax = "proto3";
//! package plantlink.sim.v1;
//! message Reading {
//!   string serial = 1; uint64 ts_ms = 2; double temperature = 3; double humidity = 4;
//!   uint32 seq = 5;
//! }
//! ```
//!
//! Messages are written by hand in the protobuf wire format (no code generation).

use base64::Engine as _;
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};

/// The device type in topics and the registry.
pub const DEVICE_TYPE: &str = "th-300";
/// The firmware version in topics.
pub const FIRMWARE: &str = "3.0.0";
/// The message's full name.
pub const MESSAGE: &str = "plantlink.sim.v1.Reading";

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One Reading.
pub fn encode(serial: &str, ts_ms: u64, temperature: f64, humidity: f64, seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(48 + serial.len());
    b.push(0x0a);
    varint(serial.len() as u64, &mut b);
    b.extend_from_slice(serial.as_bytes());
    b.push(0x10);
    varint(ts_ms, &mut b);
    b.push(0x19);
    b.extend_from_slice(&temperature.to_le_bytes());
    b.push(0x21);
    b.extend_from_slice(&humidity.to_le_bytes());
    b.push(0x28);
    varint(u64::from(seq), &mut b);
    b
}

/// The compiled `FileDescriptorSet` of the message, as `protoc --descriptor_set_out` writes it.
pub fn descriptor_set() -> Vec<u8> {
    let field = |name: &str, number: i32, t: Type| FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(t as i32),
        json_name: Some(name.into()),
        ..Default::default()
    };
    FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("plantlink/sim/v1/reading.proto".into()),
            package: Some("plantlink.sim.v1".into()),
            message_type: vec![DescriptorProto {
                name: Some("Reading".into()),
                field: vec![
                    field("serial", 1, Type::String),
                    field("ts_ms", 2, Type::Uint64),
                    field("temperature", 3, Type::Double),
                    field("humidity", 4, Type::Double),
                    field("seq", 5, Type::Uint32),
                ],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// The `POST /v1/payload-schemas` body that registers the type for firmware `3.x`.
pub fn schema_body() -> serde_json::Value {
    serde_json::json!({
        "device_type": DEVICE_TYPE,
        "firmware_version": "3.x",
        "format": "protobuf",
        "definition": {
            "descriptor_set": base64::engine::general_purpose::STANDARD.encode(descriptor_set()),
            "message": MESSAGE,
            "metrics": {"temperature": "temperature", "humidity": "humidity"},
            "timestamp": "ts_ms",
            "sequence": "seq"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_accepts_the_schema_and_it_reads_the_messages() {
        let body = schema_body();
        let format = plantlink_schema::Format::parse(body["format"].as_str().unwrap()).unwrap();
        let compiled = plantlink_schema::compile(format, &body["definition"]).unwrap();
        let plantlink_schema::Compiled::Protobuf(p) = compiled else {
            panic!("not protobuf");
        };
        let r = p
            .decode(&encode("d-1", 1_795_000_000_123, 21.25, 40.5, 7))
            .unwrap();
        assert_eq!(
            r.metrics,
            vec![
                ("humidity".to_owned(), 40.5),
                ("temperature".to_owned(), 21.25)
            ]
        );
        assert_eq!(
            r.timestamp,
            Some(plantlink_schema::Scalar::Int(1_795_000_000_123))
        );
        assert_eq!(r.sequence, Some(7));
    }
}
