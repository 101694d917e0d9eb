use std::path::Path;

use super::*;

const NOW: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

const CONFIG: &str = r#"
[gateway]
id = "gw"
tenant = "acme"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "c"
subscriptions = ["plant/#"]
[[mqtt.topics]]
template = "plant/{site}/{line}/{device}/{metric}"
[[mqtt.topics]]
template = "plant/{site}/{line}/{device}"
[[mqtt.topics]]
template = "fw/{device_type}/{firmware}/{device}"
[limits]
max_payload_bytes = 1000
[devices.th7]
type = "th-100"
firmware = "2.0.1"
[[firmware]]
device_type = "th-100"
version = "1.x"
fields = { t = "temperature", h = "humidity" }
ignore = ["rssi"]
[[firmware]]
device_type = "th-100"
version = "2.*"
fields = { temp_c = "temperature", rh = "humidity" }
"#;

fn decoder() -> Decoder {
    decoder_with(CONFIG)
}

fn decoder_with(config: &str) -> Decoder {
    Decoder::new(&Config::parse(config, Path::new("t.toml")).unwrap())
}

fn one(d: &Decoded) -> &Reading {
    assert!(d.rejects.is_empty(), "{:?}", d.rejects);
    assert_eq!(d.readings.len(), 1, "{:?}", d.readings);
    &d.readings[0]
}

fn cbor(v: &ciborium::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

#[test]
fn bare_number_takes_metric_and_tags_from_topic() {
    let mut dec = decoder();
    let d = dec.decode_mqtt("plant/p1/l3/press01/temperature", b"87.3", NOW);
    let r = one(&d);
    assert_eq!(
        (r.device.as_str(), r.metric.as_str(), r.value),
        ("press01", "temperature", 87.3)
    );
    assert_eq!(r.tenant, "acme");
    assert_eq!(r.tags.get("site").map(String::as_str), Some("p1"));
    assert_eq!(r.tags.get("line").map(String::as_str), Some("l3"));
    assert_eq!(r.ts, Timestamp(NOW));
}

#[test]
fn receive_stamps_strictly_increase_per_device() {
    let mut dec = decoder();
    let t = "plant/p1/l3/press01/temperature";
    let a = dec.decode_mqtt(t, b"1", NOW).readings[0].ts;
    let b = dec.decode_mqtt(t, b"2", NOW).readings[0].ts;
    let c = dec.decode_mqtt(t, b"3", NOW - 5).readings[0].ts;
    assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
    // Another device is stamped independently.
    let other = dec
        .decode_mqtt("plant/p1/l3/press02/temperature", b"1", NOW)
        .readings[0]
        .ts;
    assert_eq!(other, Timestamp(NOW));
}

#[test]
fn plant_json_shape() {
    let mut dec = decoder();
    let p = br#"{"sensor_id": "press01", "measurement": "temperature", "value": 87.3, "unit": "C", "ts": 1625000000}"#;
    let d = dec.decode_mqtt("plant/p1/l3/press01", p, NOW);
    let r = one(&d);
    assert_eq!((r.metric.as_str(), r.value), ("temperature", 87.3));
    assert_eq!(r.ts, Timestamp(1_625_000_000_000_000));
    assert_eq!(r.tags.get("unit").map(String::as_str), Some("C"));
}

#[test]
fn multi_metric_object_with_seq() {
    let mut dec = decoder();
    let p = br#"{"ts": 1767225600123, "seq": 17, "temperature": 21.5, "humidity": 40.2}"#;
    let d = dec.decode_mqtt("plant/p1/l3/th1", p, NOW);
    assert!(d.rejects.is_empty());
    let mut got: Vec<_> = d
        .readings
        .iter()
        .map(|r| (r.metric.as_str(), r.value, r.seq, r.ts))
        .collect();
    got.sort_by(|a, b| a.0.cmp(b.0));
    let ts = Timestamp(1_767_225_600_123_000);
    assert_eq!(
        got,
        vec![
            ("humidity", 40.2, Some(17), ts),
            ("temperature", 21.5, Some(17), ts)
        ]
    );
}

#[test]
fn cbor_shapes_match_json() {
    use ciborium::Value as C;
    let mut dec = decoder();
    let multi = C::Map(vec![
        (
            C::Text("ts".into()),
            C::Integer(1_767_225_600_000i64.into()),
        ),
        (C::Text("temperature".into()), C::Float(21.5)),
        (C::Text("humidity".into()), C::Integer(40.into())),
    ]);
    let d = dec.decode_mqtt("plant/p1/l3/th1", &cbor(&multi), NOW);
    assert_eq!(d.readings.len(), 2, "{:?}", d.rejects);
    let plant = C::Map(vec![
        (C::Text("sensor_id".into()), C::Text("press01".into())),
        (C::Text("measurement".into()), C::Text("pressure".into())),
        (C::Text("value".into()), C::Float(1013.2)),
    ]);
    let r = one(&dec.decode_mqtt("plant/p1/l3/press01", &cbor(&plant), NOW)).clone();
    assert_eq!((r.metric.as_str(), r.value), ("pressure", 1013.2));
    let bare = cbor(&C::Float(f64::NAN));
    let r = one(&dec.decode_mqtt("plant/p1/l3/press01/t", &bare, NOW)).clone();
    assert!(r.value.is_nan());
}

#[test]
fn timestamps_in_every_unit_and_rfc3339() {
    let mut dec = decoder();
    let want = Timestamp(1_767_225_600_250_000);
    for ts in [
        "1767225600.25",
        "1767225600250",
        "1767225600250000",
        "1767225600250000000",
        "\"2026-01-01T00:00:00.25Z\"",
        "\"2026-01-01T01:00:00.25+01:00\"",
    ] {
        let p = format!(r#"{{"ts": {ts}, "temperature": 1}}"#);
        let d = dec.decode_mqtt("plant/p1/l3/d", p.as_bytes(), NOW);
        assert_eq!(one(&d).ts, want, "{ts}");
    }
}

#[test]
fn implausible_timestamps_are_rejected_with_reason() {
    let mut dec = decoder();
    for ts in ["0", "\"yesterday\"", "4102444800"] {
        let p = format!(r#"{{"ts": {ts}, "temperature": 1}}"#);
        let d = dec.decode_mqtt("plant/p1/l3/d", p.as_bytes(), NOW);
        assert!(d.readings.is_empty());
        assert_eq!(
            d.rejects[0].reason,
            Reason::BadTimestamp,
            "{ts}: {:?}",
            d.rejects
        );
    }
}

#[test]
fn firmware_mappings_by_topic_payload_and_device_table() {
    let mut dec = decoder();
    // 1.x from the topic.
    let d = dec.decode_mqtt(
        "fw/th-100/1.4/th3",
        br#"{"t": 21.5, "h": 40, "rssi": -70}"#,
        NOW,
    );
    let mut m: Vec<_> = d.readings.iter().map(|r| r.metric.as_str()).collect();
    m.sort();
    assert_eq!(m, vec!["humidity", "temperature"]);
    assert!(d.rejects.is_empty());
    // 2.x from fields in the payload.
    let d = dec.decode_mqtt(
        "plant/p/l/th4",
        br#"{"type": "th-100", "fw": "2.3", "temp_c": 21.5}"#,
        NOW,
    );
    assert_eq!(one(&d).metric, "temperature");
    // From [devices.th7] when neither says.
    let d = dec.decode_mqtt("plant/p/l/th7", br#"{"temp_c": 22}"#, NOW);
    assert_eq!(one(&d).metric, "temperature");
    // Unknown firmware: names pass through unchanged.
    let d = dec.decode_mqtt("fw/th-100/3.0/th5", br#"{"t": 1}"#, NOW);
    assert_eq!(one(&d).metric, "t");
}

#[test]
fn bad_input_is_rejected_and_good_fields_kept() {
    let mut dec = decoder();
    let d = dec.decode_mqtt(
        "plant/p/l/d",
        br#"{"temperature": "hot", "humidity": 40}"#,
        NOW,
    );
    assert_eq!(d.readings.len(), 1);
    assert_eq!(d.rejects[0].reason, Reason::WrongType);
    assert!(d.rejects[0].detail.contains("temperature"));

    let cases: [(&str, &[u8], Reason); 6] = [
        ("plant/p/l/d/t", b"{not json", Reason::Malformed),
        ("plant/p/l/d/t", b"\xff\xfe\xfd", Reason::Malformed),
        ("elsewhere/d", b"1", Reason::NoTemplate),
        ("plant/p/l/d", b"21.5", Reason::NoMetric),
        ("plant/p/l/d/t", b"[[1]]", Reason::WrongType),
        ("plant/p/l/d/t", &[b'1'; 1001], Reason::Oversize),
    ];
    for (topic, payload, reason) in cases {
        let d = dec.decode_mqtt(topic, payload, NOW);
        assert!(d.readings.is_empty(), "{topic}");
        assert_eq!(d.rejects[0].reason, reason, "{topic}: {:?}", d.rejects);
    }
}

#[test]
fn arrays_carry_several_messages() {
    let mut dec = decoder();
    let p =
        br#"[{"ts": 1767225600000, "temperature": 1}, {"ts": 1767225601000, "temperature": 2}]"#;
    let d = dec.decode_mqtt("plant/p/l/d", p, NOW);
    assert_eq!(d.readings.len(), 2);
    assert_ne!(d.readings[0].ts, d.readings[1].ts);
}

#[test]
fn arbitrary_bytes_never_panic() {
    use proptest::prelude::*;
    proptest!(|(bytes in prop::collection::vec(any::<u8>(), 0..200))| {
        let mut dec = decoder();
        let _ = dec.decode_mqtt("plant/p/l/d", &bytes, NOW);
        let _ = dec.decode_mqtt("plant/p/l/d/t", &bytes, NOW);
    });
}

fn line_decoder() -> Decoder {
    let cfg = Config::parse(
        r#"
[gateway]
id = "gw"
tenant = "acme"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "c"
subscriptions = ["plant/#", "unit/#"]
[[mqtt.topics]]
template = "plant/{site}/{line}/{device}/{metric}"
device = "{line}-{device}"
[[mqtt.topics]]
template = "plant/{site}/{line}/{device}"
device = "{line}-{device}"
[[mqtt.topics]]
template = "unit/{site}/{line}/{unit}"
device = "{site}-{line}-{unit}"
[[mqtt.topics]]
template = "long/{device}"
device = "{device}-0123456789012345678901234567890123456789012345678901234567890123456789"
[devices.l3-th7]
type = "th-100"
firmware = "2.0.1"
[[firmware]]
device_type = "th-100"
version = "2.*"
fields = { temp_c = "temperature" }
"#,
        Path::new("t.toml"),
    )
    .unwrap();
    Decoder::new(&cfg)
}

#[test]
fn a_device_format_tells_apart_devices_that_share_a_name() {
    let mut dec = line_decoder();
    let p = br#"{"ts": 1767225600, "temperature": 1.5}"#;
    let a = one(&dec.decode_mqtt("plant/p1/l3/press01", p, NOW)).clone();
    let p = br#"{"ts": 1767225600, "temperature": 2.5}"#;
    let b = one(&dec.decode_mqtt("plant/p1/l4/press01", p, NOW)).clone();
    assert_eq!(
        (a.device.as_str(), b.device.as_str()),
        ("l3-press01", "l4-press01")
    );
    assert_ne!(a.id(), b.id());
    // The captures are tags as before; the raw {device} segment only lives in the id.
    assert_eq!(a.tags.get("line").map(String::as_str), Some("l3"));
    assert_eq!(a.tags.get("site").map(String::as_str), Some("p1"));
    assert!(!a.tags.contains_key("device"));
    // Bare numbers, and receive stamps, follow the composed id too.
    let r = one(&dec.decode_mqtt("plant/p1/l4/press01/flow", b"3", NOW)).clone();
    assert_eq!(
        (r.device.as_str(), r.metric.as_str()),
        ("l4-press01", "flow")
    );
    let other = one(&dec.decode_mqtt("plant/p1/l3/press01/flow", b"3", NOW)).clone();
    assert_eq!(other.ts, r.ts, "stamped per composed device");
}

#[test]
fn the_topic_names_the_device_over_the_payload() {
    let mut dec = line_decoder();
    let p = br#"{"sensor_id": "press01", "measurement": "pressure", "value": 1.0}"#;
    let r = one(&dec.decode_mqtt("plant/p1/l3/press01", p, NOW)).clone();
    assert_eq!(r.device, "l3-press01");
    // Without a {device} capture the format composes the id from other captures.
    let p = br#"{"device": "ignored", "flow": 4}"#;
    let r = one(&dec.decode_mqtt("unit/p1/l3/u7", p, NOW)).clone();
    assert_eq!(r.device, "p1-l3-u7");
    assert_eq!(r.tags.get("unit").map(String::as_str), Some("u7"));
}

#[test]
fn composed_ids_pick_firmware_mappings_and_keep_the_length_limit() {
    let mut dec = line_decoder();
    let d = dec.decode_mqtt("plant/p1/l3/th7", br#"{"temp_c": 22}"#, NOW);
    assert_eq!(one(&d).metric, "temperature", "[devices.l3-th7] applies");
    let d = dec.decode_mqtt("plant/p1/l4/th7", br#"{"temp_c": 22}"#, NOW);
    assert_eq!(one(&d).metric, "temp_c", "l4-th7 is another device");

    let fits = "d".repeat(128 - 71);
    assert_eq!(
        one(&dec.decode_mqtt(&format!("long/{fits}"), b"{\"t\": 1}", NOW))
            .device
            .len(),
        128
    );
    let d = dec.decode_mqtt(&format!("long/{fits}x"), b"{\"t\": 1}", NOW);
    assert!(d.readings.is_empty());
    assert_eq!(d.rejects[0].reason, Reason::WrongType);
    assert!(
        d.rejects[0].detail.contains("device name"),
        "{:?}",
        d.rejects
    );
}

#[test]
fn topic_match_names_the_template() {
    let dec = line_decoder();
    let (i, ctx) = dec.topic_match("unit/p1/l3/u7").unwrap();
    assert_eq!((i, ctx.device.as_deref()), (2, Some("p1-l3-u7")));
    assert!(dec.topic_match("elsewhere/x").is_none());
}

#[test]
fn readings_over_the_wire_limits_are_refused_at_the_edge() {
    let mut dec =
        decoder_with(&CONFIG.replace("max_payload_bytes = 1000", "max_payload_bytes = 65536"));
    // The plant shape with 40 extra text fields: 42 tags with site and line, over 32.
    let mut fields: Vec<String> = (0..40).map(|i| format!("\"note{i}\": \"x\"")).collect();
    fields.push(
        "\"sensor_id\": \"press01\", \"measurement\": \"temperature\", \"value\": 80.5".into(),
    );
    let json = format!("{{{}}}", fields.join(", "));
    let d = dec.decode_mqtt("plant/p1/l3/press01", json.as_bytes(), NOW);
    assert!(d.readings.is_empty(), "{:?}", d.readings);
    assert_eq!(d.rejects.len(), 1, "{:?}", d.rejects);
    assert_eq!(d.rejects[0].reason, Reason::TooManyTags);
    assert!(
        d.rejects[0].detail.contains("42 tags") && d.rejects[0].detail.contains("at most 32"),
        "{}",
        d.rejects[0].detail
    );
    // Exactly at the limit passes: 30 text fields plus site and line.
    let mut fields: Vec<String> = (0..30).map(|i| format!("\"note{i}\": \"x\"")).collect();
    fields.push("\"value\": 1".into());
    let json = format!("{{{}}}", fields.join(", "));
    let d = dec.decode_mqtt("plant/p1/l3/press01/temperature", json.as_bytes(), NOW);
    assert_eq!(one(&d).tags.len(), 32);

    // A 2 KB text field, on a message that also carries a good value of another shape.
    let long = "y".repeat(2048);
    let json = format!("{{\"value\": 3.5, \"comment\": \"{long}\"}}");
    let d = dec.decode_mqtt("plant/p1/l3/press01/temperature", json.as_bytes(), NOW);
    assert!(d.readings.is_empty());
    assert_eq!(d.rejects[0].reason, Reason::TooLong);
    assert!(
        d.rejects[0].detail.contains("\"comment\"") && d.rejects[0].detail.contains("2048 bytes"),
        "{}",
        d.rejects[0].detail
    );
    assert_eq!(Reason::TooLong.as_str(), "too_long");
    assert_eq!(Reason::TooManyTags.as_str(), "too_many_tags");
}
