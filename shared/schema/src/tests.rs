use base64::Engine as _;
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet};
use serde_json::json;

use super::*;
use crate::protobuf::DecodeError;

fn field(
    name: &str,
    number: i32,
    t: Type,
    type_name: Option<&str>,
    optional: bool,
) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(t as i32),
        type_name: type_name.map(Into::into),
        proto3_optional: optional.then_some(true),
        oneof_index: None,
        ..Default::default()
    }
}

/// `plant.v1.Reading { string serial = 1; uint64 ts_ms = 2; double temp_c = 3;
/// optional float rh = 4; Env env = 5; uint32 seq = 6 }`, `Env { double pressure = 1 }`.
fn descriptor() -> String {
    let mut rh = field("rh", 4, Type::Float, None, true);
    rh.oneof_index = Some(0);
    let reading = DescriptorProto {
        name: Some("Reading".into()),
        field: vec![
            field("serial", 1, Type::String, None, false),
            field("ts_ms", 2, Type::Uint64, None, false),
            field("temp_c", 3, Type::Double, None, false),
            rh,
            field("env", 5, Type::Message, Some(".plant.v1.Env"), false),
            field("seq", 6, Type::Uint32, None, false),
        ],
        oneof_decl: vec![prost_types::OneofDescriptorProto {
            name: Some("_rh".into()),
            options: None,
        }],
        ..Default::default()
    };
    let env = DescriptorProto {
        name: Some("Env".into()),
        field: vec![field("pressure", 1, Type::Double, None, false)],
        ..Default::default()
    };
    let file = FileDescriptorProto {
        name: Some("plant.proto".into()),
        package: Some("plant.v1".into()),
        message_type: vec![reading, env],
        syntax: Some("proto3".into()),
        ..Default::default()
    };
    let set = FileDescriptorSet { file: vec![file] };
    base64::engine::general_purpose::STANDARD.encode(set.encode_to_vec())
}

fn definition(extra: serde_json::Value) -> serde_json::Value {
    let mut d = json!({
        "descriptor_set": descriptor(),
        "message": "plant.v1.Reading",
        "metrics": {"temp_c": "temperature", "rh": "humidity", "env.pressure": "pressure"},
        "timestamp": "ts_ms",
        "sequence": "seq",
        "device": "serial",
    });
    if let (Some(d), Some(e)) = (d.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
    d
}

/// Hand-encoded wire bytes of a Reading.
fn message(rh: Option<f32>) -> Vec<u8> {
    let mut b = vec![0x0a, 4];
    b.extend_from_slice(b"th-7");
    b.push(0x10); // ts_ms, varint
    let mut ts = 1_767_225_600_123u64;
    while ts >= 0x80 {
        b.push((ts as u8) | 0x80);
        ts >>= 7;
    }
    b.push(ts as u8);
    b.push(0x19); // temp_c, fixed64
    b.extend_from_slice(&21.5f64.to_le_bytes());
    if let Some(rh) = rh {
        b.push(0x25); // rh, fixed32
        b.extend_from_slice(&rh.to_le_bytes());
    }
    b.extend_from_slice(&[0x2a, 9, 0x09]); // env { pressure }
    b.extend_from_slice(&1013.25f64.to_le_bytes());
    b.extend_from_slice(&[0x30, 42]); // seq
    b.extend_from_slice(&[0xf8, 0x07, 1]); // field 127: unknown, ignored
    b
}

fn compiled(d: serde_json::Value) -> Protobuf {
    match compile(Format::Protobuf, &d) {
        Ok(Compiled::Protobuf(p)) => *p,
        other => panic!("{other:?}"),
    }
}

#[test]
fn protobuf_messages_become_metrics_with_time_sequence_and_device() {
    let p = compiled(definition(json!({})));
    let r = p.decode(&message(Some(40.5))).unwrap();
    assert_eq!(
        r.metrics,
        vec![
            ("pressure".to_owned(), 1013.25),
            ("humidity".to_owned(), 40.5),
            ("temperature".to_owned(), 21.5)
        ]
    );
    assert!(r.bad_metrics.is_empty());
    assert_eq!(r.timestamp, Some(Scalar::Int(1_767_225_600_123)));
    assert_eq!(r.sequence, Some(42));
    assert_eq!(r.device.as_deref(), Some("th-7"));
}

#[test]
fn a_missing_optional_metric_is_named_and_the_rest_kept() {
    let p = compiled(definition(json!({})));
    let r = p.decode(&message(None)).unwrap();
    assert_eq!(r.metrics.len(), 2);
    assert_eq!(
        r.bad_metrics,
        vec![("rh".to_owned(), "is missing".to_owned())]
    );
}

#[test]
fn without_a_metric_map_every_top_level_number_is_a_metric() {
    let p = compiled(definition(json!({"metrics": {}})));
    let r = p.decode(&message(Some(1.0))).unwrap();
    let names: Vec<&str> = r.metrics.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["temp_c", "rh"]);
}

#[test]
fn a_mistyped_field_is_named() {
    let p = compiled(definition(json!({})));
    // temp_c (a double) sent as a varint.
    let bytes = [0x18, 0x05];
    match p.decode(&bytes) {
        Err(DecodeError::WrongType { field, detail }) => {
            assert_eq!(field, "temp_c");
            assert!(detail.contains("varint"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        p.decode(&[0xff, 0xff]),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn bad_definitions_name_the_field() {
    let cases = [
        (
            json!({"descriptor_set": "%%%"}),
            "definition.descriptor_set",
            "not base64",
        ),
        (
            json!({"descriptor_set": "AAAA"}),
            "definition.descriptor_set",
            "FileDescriptorSet",
        ),
        (
            json!({"message": "plant.v1.Nope"}),
            "definition.message",
            "plant.v1.Env, plant.v1.Reading",
        ),
        (
            json!({"metrics": {"temp_f": "t"}}),
            "definition.metrics.temp_f",
            "its fields are: serial, ts_ms",
        ),
        (
            json!({"metrics": {"serial": "t"}}),
            "definition.metrics.serial",
            "not a number",
        ),
        (
            json!({"metrics": {"env.nope": "t"}}),
            "definition.metrics.env.nope",
            "plant.v1.Env has no field",
        ),
        (
            json!({"metrics": {"temp_c.x": "t"}}),
            "definition.metrics.temp_c.x",
            "only a single message field",
        ),
        (
            json!({"timestamp": "env"}),
            "definition.timestamp",
            "google.protobuf.Timestamp",
        ),
        (
            json!({"sequence": "temp_c"}),
            "definition.sequence",
            "not an integer",
        ),
        (json!({"device": "env"}), "definition.device", "not text"),
        (json!({"metric": {}}), "definition.metric", "unknown field"),
    ];
    for (extra, field, text) in cases {
        let Err(e) = compile(Format::Protobuf, &definition(extra.clone())) else {
            panic!("{extra} compiled");
        };
        assert_eq!(e.field, field, "{extra}: {e}");
        assert!(e.message.contains(text), "{extra}: {e}");
    }
    let e = compile(Format::Protobuf, &json!({"message": "x"})).unwrap_err();
    assert_eq!(e.field, "definition.descriptor_set", "{e}");
    let e = compile(Format::Json, &json!({"fields": {"t": ""}})).unwrap_err();
    assert_eq!(e.field, "definition.fields.t", "{e}");
    let e = compile(
        Format::Cbor,
        &json!({"fields": {"t": "temperature"}, "drop": []}),
    )
    .unwrap_err();
    assert_eq!(e.field, "definition.drop", "{e}");
}

#[test]
fn sparkplug_numbers_follow_their_data_type() {
    use sparkplug::{Value as V, datatype::*, number};
    assert_eq!(number(INT8, &V::Int(0xff)), Ok(-1.0));
    assert_eq!(number(INT16, &V::Int(0xfffe)), Ok(-2.0));
    assert_eq!(number(INT32, &V::Int(u32::MAX)), Ok(-1.0));
    assert_eq!(number(INT64, &V::Long(u64::MAX)), Ok(-1.0));
    assert_eq!(number(UINT32, &V::Int(u32::MAX)), Ok(f64::from(u32::MAX)));
    assert_eq!(number(FLOAT, &V::Float(1.5)), Ok(1.5));
    assert_eq!(number(BOOLEAN, &V::Boolean(true)), Ok(1.0));
    assert_eq!(number(STRING, &V::String("x".into())), Err("String"));
    assert_eq!(number(TEMPLATE, &V::Template(vec![])), Err("Template"));
    assert!(number(DOUBLE, &V::Int(1)).is_err());
}

#[test]
fn sparkplug_topics_parse_and_render() {
    use sparkplug::{Kind, Topic};
    let t = Topic::parse("spBv1.0/plant/DDATA/line1/press")
        .unwrap()
        .unwrap();
    assert_eq!(
        (t.group, t.kind, t.node, t.device),
        ("plant", Kind::DData, "line1", Some("press"))
    );
    let t = Topic::parse("spBv1.0/plant/NBIRTH/line1").unwrap().unwrap();
    assert_eq!(t.device, None);
    assert_eq!(Topic::parse("spBv1.0/STATE/scada").unwrap(), None);
    assert!(
        Topic::parse("spBv1.0/plant/NDATA/line1/x")
            .unwrap_err()
            .contains("spBv1.0/group/NDATA/node")
    );
    assert!(Topic::parse("spBv1.0/plant/XDATA/n").is_err());
    assert_eq!(
        Topic::render("g", Kind::NCmd, "n", None),
        "spBv1.0/g/NCMD/n"
    );
    let req = sparkplug::decode(&sparkplug::rebirth_request(5)).unwrap();
    assert_eq!(req.metrics[0].name.as_deref(), Some(sparkplug::REBIRTH));
    assert_eq!(req.metrics[0].value, Some(sparkplug::Value::Boolean(true)));
}
