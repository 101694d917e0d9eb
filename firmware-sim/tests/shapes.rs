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
        // A Sparkplug node's session: births, data, d2's death and birth, the node's death.
        let turns: Vec<Vec<fleet::Message>> = if d.kind == Kind::Sparkplug {
            let mut t: Vec<Vec<fleet::Message>> = [0.0, 0.1, 0.1, 0.1, 0.7, 0.8]
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    d.turn(
                        "plant",
                        1_795_000_000_123_000 + k as i64 * 1000,
                        *p,
                        &mut rng,
                    )
                })
                .collect();
            t.push(d.spb.as_mut().unwrap().ndeath(1_795_000_010_000));
            t
        } else {
            vec![d.turn("plant", 1_795_000_000_123_000, 0.0, &mut rng)]
        };
        for m in turns.into_iter().flatten() {
            check(&mut decoder, &m, d, received);
        }
        seen.insert(d.kind);
    }
    assert_eq!(seen.len(), Kind::ALL.len());
    // The reference profile's messages too.
    let mut refdevs = fleet::devices("shapes", 3, &mix, &mut rng);
    fleet::use_reference(&mut refdevs, 5, 1);
    for d in &mut refdevs {
        let m = d
            .turn("plant", 1_795_000_000_123_000, 0.0, &mut rng)
            .remove(0);
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

/// The agent's readings of one message are exactly what the ledger records of it, under
/// the devices it names; receive-stamped ones (no device time) by metric and value.
fn check(decoder: &mut Decoder, m: &fleet::Message, d: &fleet::Device, received: i64) {
    type Row = (String, String, Option<i64>, f64);
    let sender = m.device.clone().unwrap_or_else(|| d.id.clone());
    let mut want: Vec<Row> = std::iter::once((sender, m.expect.clone()))
        .chain(m.also.iter().cloned())
        .flat_map(|(dev, e)| {
            e.into_iter()
                .map(move |(mt, ts, v)| (dev.clone(), mt.to_owned(), ts, v))
        })
        .collect();
    let stamped: std::collections::HashSet<(String, String)> = want
        .iter()
        .filter(|w| w.2.is_none())
        .map(|w| (w.0.clone(), w.1.clone()))
        .collect();
    let out = decoder.decode_mqtt(&m.topic, &m.payload, received);
    assert!(
        out.rejects.is_empty(),
        "{} {}: {:?}",
        d.kind,
        m.topic,
        out.rejects
    );
    let mut got: Vec<Row> = out
        .readings
        .iter()
        .map(|r| {
            let key = (r.device.clone(), r.metric.clone());
            let ts = (!stamped.contains(&key)).then_some(r.ts.0);
            (key.0, key.1, ts, r.value)
        })
        .collect();
    let order = |a: &Row, b: &Row| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2));
    got.sort_by(order);
    want.sort_by(order);
    assert_eq!(got, want, "{} {}", d.kind, m.topic);
}
