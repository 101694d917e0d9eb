//! Every payload shape the simulator sends is one the agent decodes, into exactly the
//! readings the simulator records in its ledger: walked through the agent's own decoder with
//! the topic templates and `[[firmware]]` mappings of the demo's agent config, and the
//! protobuf schema the demo registers.
#![allow(clippy::unwrap_used)] // tests may panic

use std::path::Path;

use edge_agent::config::Config;
use edge_agent::payload::Decoder;
use firmware_sim::fleet::{self, Kind};
use firmware_sim::rng::Rng;

#[test]
fn the_agent_decodes_every_shape_into_what_the_ledger_expects() {
    let cfg = Config::parse(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/demo/edge-agent.toml"
        ))
        .unwrap()
        .replace("@DIR@", "/tmp/plantlink-shapes")
        .replace("@MQTT_PORT@", "1883")
        .replace("@CLOUD@", "127.0.0.1:4433"),
        Path::new("edge-agent.toml"),
    )
    .unwrap();
    let mut decoder = Decoder::new(&cfg);
    // The th300-pb schema, as the demo registers it and the cloud pushes it.
    let body = firmware_sim::protobuf::schema_body();
    decoder.set_registry(edge_agent::schemas::Registry::compile(
        1,
        vec![plantlink_schema::Entry {
            id: 1,
            revision: 1,
            device_type: body["device_type"].as_str().unwrap().to_owned(),
            firmware_version: body["firmware_version"].as_str().unwrap().to_owned(),
            format: plantlink_schema::Format::Protobuf,
            definition: body["definition"].clone(),
        }],
    ));
    let mut rng = Rng::new(3);
    let mix: Vec<(Kind, u32)> = Kind::ALL.iter().map(|k| (*k, 1)).collect();
    let mut devices = fleet::devices("shapes", 60, &mix, &mut rng);
    let received = 1_795_000_000_000_000;
    let mut seen = std::collections::HashSet::new();
    for d in &mut devices {
        let m = d.next("plant", 1_795_000_000_123_000, &mut rng);
        let out = decoder.decode_mqtt(&m.topic, &m.payload, received);
        assert!(out.rejects.is_empty(), "{}: {:?}", d.kind, out.rejects);
        let mut got: Vec<(String, Option<i64>, f64)> = out
            .readings
            .iter()
            .map(|r| {
                (
                    r.metric.clone(),
                    (d.kind != Kind::Bare).then_some(r.ts.0),
                    r.value,
                )
            })
            .collect();
        let mut want: Vec<(String, Option<i64>, f64)> = m
            .expect
            .iter()
            .map(|(mt, ts, v)| ((*mt).to_owned(), *ts, *v))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "{}", d.kind);
        assert!(out.readings.iter().all(|r| r.device == d.id));
        seen.insert(d.kind);
    }
    assert_eq!(seen.len(), Kind::ALL.len());
    // The reference profile's messages too.
    let mut refdevs = fleet::devices("shapes", 3, &mix, &mut rng);
    fleet::use_reference(&mut refdevs, 5, 1);
    for d in &mut refdevs {
        let m = d.next("plant", 1_795_000_000_123_000, &mut rng);
        let out = decoder.decode_mqtt(&m.topic, &m.payload, received);
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        let mut got: Vec<(String, f64)> = out
            .readings
            .iter()
            .map(|r| (r.metric.clone(), r.value))
            .collect();
        let mut want: Vec<(String, f64)> = m
            .expect
            .iter()
            .map(|(mt, _, v)| ((*mt).to_owned(), *v))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
        assert_eq!(got.len(), 4);
    }
    // And a malformed payload is refused, not stored.
    let bad = fleet::malformed("plant", "shapes-multi-json-00001");
    let out = decoder.decode_mqtt(&bad.topic, &bad.payload, received);
    assert!(out.readings.is_empty() && !out.rejects.is_empty());
    // And so is an oversize one.
    let big = fleet::oversize("plant", "shapes-multi-json-00001");
    let out = decoder.decode_mqtt(&big.topic, &big.payload, received);
    assert!(out.readings.is_empty(), "{} readings", out.readings.len());
    assert_eq!(out.rejects[0].reason.as_str(), "oversize");
}
