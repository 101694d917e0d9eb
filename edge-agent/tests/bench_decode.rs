//! Decode throughput (not run by default): readings per second on one core for the same
//! readings as JSON, as protobuf with a registry schema, and as Sparkplug B alias-only
//! DDATA, in the same run, alternating, medians of 3 rounds.
//!
//! Each message carries three metrics (temperature, humidity, pressure), a timestamp and a
//! sequence number, from one of 1,000 devices. The protobuf descriptor set is compiled by
//! `protoc` from the .proto below; messages are encoded with prost-reflect before the clock
//! starts. Only the decoder runs (topic match, parse, readings), not the queue.
//!
//! `cargo test --release -p edge-agent --test bench_decode -- --ignored --nocapture`
#![allow(clippy::unwrap_used)] // benchmarks may panic

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use base64::Engine as _;
use edge_agent::config::Config;
use edge_agent::payload::{Decoder, Format};
use edge_agent::schemas::Registry;
use plantlink_schema::sparkplug::{self, Metric, Payload, Value, datatype};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};

const PROTO: &str = r#"syntax = "proto3";
package bench.v1;
message Reading {
  string serial = 1;
  uint64 ts_ms = 2;
  double temperature = 3;
  double humidity = 4;
  double pressure = 5;
  uint32 seq = 6;
}
"#;

const MESSAGES: usize = 200_000;
const DEVICES: usize = 1_000;
const T0_MS: u64 = 1_767_225_600_000;

fn descriptor(dir: &Path) -> Vec<u8> {
    std::fs::write(dir.join("bench.proto"), PROTO).unwrap();
    let out = Command::new("protoc")
        .current_dir(dir)
        .args(["--descriptor_set_out=bench.pb", "bench.proto"])
        .output()
        .expect("protoc");
    assert!(out.status.success());
    std::fs::read(dir.join("bench.pb")).unwrap()
}

fn values(i: usize) -> (f64, f64, f64) {
    (
        20.0 + (i % 97) as f64 * 0.1,
        40.0 + (i % 13) as f64,
        1013.0 + (i % 7) as f64,
    )
}

fn main_config(dir: &Path) -> Config {
    Config::parse(
        &format!(
            "[gateway]\nid = \"gw\"\n[store]\npath = \"{}/q.db\"\n[mqtt]\nurl = \"mqtt://127.0.0.1\"\n\
             client_id = \"c\"\nsubscriptions = [\"plant/#\"]\n[[mqtt.topics]]\n\
             template = \"plant/{{device_type}}/{{firmware}}/{{device}}\"\n\
             [mqtt.sparkplug]\ngroups = [\"plant\"]\n",
            dir.display()
        ),
        Path::new("bench.toml"),
    )
    .unwrap()
}

type Messages = Vec<(String, Vec<u8>)>;

fn json_messages() -> Messages {
    (0..MESSAGES)
        .map(|i| {
            let (t, h, p) = values(i);
            (
                format!("plant/th-100/1.0/dev-{}", i % DEVICES),
                format!(
                    r#"{{"ts": {}, "seq": {i}, "temperature": {t}, "humidity": {h}, "pressure": {p}}}"#,
                    T0_MS + i as u64
                )
                .into_bytes(),
            )
        })
        .collect()
}

fn protobuf_messages(pool: &DescriptorPool) -> Messages {
    let desc = pool.get_message_by_name("bench.v1.Reading").unwrap();
    (0..MESSAGES)
        .map(|i| {
            let (t, h, p) = values(i);
            let mut m = DynamicMessage::new(desc.clone());
            m.set_field_by_name(
                "serial",
                prost_reflect::Value::String(format!("dev-{}", i % DEVICES)),
            );
            m.set_field_by_name("ts_ms", prost_reflect::Value::U64(T0_MS + i as u64));
            m.set_field_by_name("temperature", prost_reflect::Value::F64(t));
            m.set_field_by_name("humidity", prost_reflect::Value::F64(h));
            m.set_field_by_name("pressure", prost_reflect::Value::F64(p));
            m.set_field_by_name("seq", prost_reflect::Value::U32(i as u32));
            (
                format!("plant/th-300/3.0/dev-{}", i % DEVICES),
                m.encode_to_vec(),
            )
        })
        .collect()
}

/// Births for every device, then alias-only DDATA, each device's seq in order.
fn sparkplug_messages() -> (Messages, Messages) {
    let metric = |name: Option<&str>, alias: u64, v: f64| Metric {
        name: name.map(Into::into),
        alias: Some(alias),
        datatype: name.map(|_| datatype::DOUBLE),
        value: Some(Value::Double(v)),
        ..Metric::default()
    };
    let mut seq = vec![0u64; DEVICES / 10];
    let mut births = Vec::new();
    for (n, node_seq) in seq.iter_mut().enumerate() {
        let nbirth = Payload {
            timestamp: Some(T0_MS),
            seq: Some(0),
            metrics: vec![Metric {
                name: Some(sparkplug::BD_SEQ.into()),
                datatype: Some(datatype::INT64),
                value: Some(Value::Long(0)),
                ..Metric::default()
            }],
            ..Payload::default()
        };
        births.push((
            format!("spBv1.0/plant/NBIRTH/node-{n}"),
            sparkplug::encode(&nbirth),
        ));
        for d in 0..10 {
            *node_seq += 1;
            let p = Payload {
                timestamp: Some(T0_MS),
                seq: Some(*node_seq % 256),
                metrics: vec![
                    metric(Some("temperature"), 1, 20.0),
                    metric(Some("humidity"), 2, 40.0),
                    metric(Some("pressure"), 3, 1013.0),
                ],
                ..Payload::default()
            };
            births.push((
                format!("spBv1.0/plant/DBIRTH/node-{n}/dev-{d}"),
                sparkplug::encode(&p),
            ));
        }
    }
    let data = (0..MESSAGES)
        .map(|i| {
            let (t, h, p) = values(i);
            let device = i % DEVICES;
            let n = device / 10;
            seq[n] += 1;
            let payload = Payload {
                timestamp: Some(T0_MS + 1 + i as u64),
                seq: Some(seq[n] % 256),
                metrics: vec![metric(None, 1, t), metric(None, 2, h), metric(None, 3, p)],
                ..Payload::default()
            };
            (
                format!("spBv1.0/plant/DDATA/node-{n}/dev-{}", device % 10),
                sparkplug::encode(&payload),
            )
        })
        .collect();
    (births, data)
}

/// Readings per second decoding `messages` (after `setup`, untimed).
fn run(decoder: &mut Decoder, setup: &Messages, messages: &Messages) -> f64 {
    let now = (T0_MS as i64 + 10_000) * 1000;
    for (t, p) in setup {
        decoder.decode_topic(t, Format::Auto, p, now);
    }
    let start = Instant::now();
    let mut readings = 0usize;
    for (t, p) in messages {
        let d = decoder.decode_topic(t, Format::Auto, p, now);
        assert!(d.rejects.is_empty(), "{t}: {:?}", d.rejects);
        readings += d.readings.len();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(readings, 3 * MESSAGES);
    readings as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark; run with --release --ignored"]
fn decode_throughput_json_protobuf_sparkplug() {
    let dir = std::env::temp_dir().join(format!("plantlink-bench-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = descriptor(&dir);
    let pool = DescriptorPool::decode(bytes.as_slice()).unwrap();
    let config = main_config(&dir);
    let schema = plantlink_schema::Entry {
        id: 1,
        revision: 1,
        device_type: "th-300".into(),
        firmware_version: "3.x".into(),
        format: plantlink_schema::Format::Protobuf,
        definition: serde_json::json!({
            "descriptor_set": base64::engine::general_purpose::STANDARD.encode(&bytes),
            "message": "bench.v1.Reading",
            "timestamp": "ts_ms",
            "sequence": "seq",
            "device": "serial"
        }),
    };
    let json = json_messages();
    let proto = protobuf_messages(&pool);
    let (births, spb) = sparkplug_messages();
    let bytes_of =
        |m: &Messages| m.iter().map(|(_, p)| p.len()).sum::<usize>() as f64 / m.len() as f64;
    let (mut j, mut p, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let mut d = Decoder::new(&config);
        j.push(run(&mut d, &Vec::new(), &json));
        let mut d = Decoder::new(&config);
        d.set_registry(Registry::compile(1, vec![schema.clone()]));
        p.push(run(&mut d, &Vec::new(), &proto));
        let mut d = Decoder::new(&config);
        s.push(run(&mut d, &births, &spb));
        eprintln!(
            "round {round}: json {:.0}, protobuf {:.0}, sparkplug {:.0} readings/s",
            j[round], p[round], s[round]
        );
    }
    let (j, p, s) = (median(j), median(p), median(s));
    println!("| format | bytes/message | readings/s (one core) | vs JSON |");
    println!("|---|---:|---:|---:|");
    println!("| JSON | {:.0} | {j:.0} | 1.00x |", bytes_of(&json));
    println!(
        "| protobuf (registry schema) | {:.0} | {p:.0} | {:.2}x |",
        bytes_of(&proto),
        p / j
    );
    println!(
        "| Sparkplug B DDATA (aliases) | {:.0} | {s:.0} | {:.2}x |",
        bytes_of(&spb),
        s / j
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
