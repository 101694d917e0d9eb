//! A simulated fleet: device types with their firmware's payload shapes, and plant-like
//! signals. Pure: given a seed, the same messages every time.
//!
//! Each message knows the readings the agent will make of it ([`Message::expect`]), so the
//! ledger can record identities, and the shapes are exactly those the agent decodes out of
//! the box or with the `[[firmware]]` mappings of `deploy/edge-agent.example.toml`.

use std::fmt;

use crate::rng::Rng;

/// A device type: its payload shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `21.5` on `<prefix>/<device>/temperature`; no time, so the agent stamps it.
    Bare,
    /// The plant shape `{"sensor_id", "measurement", "value", "unit", "ts"}`.
    PlantJson,
    /// `{"ts", "seq", "temperature", "humidity", "vibration", "counter", "run_state"}`.
    MultiJson,
    /// The same object in CBOR.
    Cbor,
    /// th-100 firmware 1.x: `{"type": "th-100", "fw": "1.4.2", "ts", "t", "h", "rssi"}`.
    Th100V1,
    /// th-100 firmware 2.x: `{"type": "th-100", "fw": "2.0.1", "ts", "temp_c", "rh"}`.
    Th100V2,
    /// th-300 firmware 3.0.0: protobuf ([`crate::protobuf`]) on
    /// `<prefix>/th-300/3.0.0/<device>`, read once its schema is registered. MQTT only.
    Th300Pb,
    /// A Sparkplug B edge node with two devices ([`crate::sparkplug`]): births, alias-only
    /// data, deaths, rebirth on request. MQTT only; the agent needs `[mqtt.sparkplug]`.
    Sparkplug,
}

impl Kind {
    /// Every kind, in `--device-types` order.
    pub const ALL: [Kind; 8] = [
        Kind::Bare,
        Kind::PlantJson,
        Kind::MultiJson,
        Kind::Cbor,
        Kind::Th100V1,
        Kind::Th100V2,
        Kind::Th300Pb,
        Kind::Sparkplug,
    ];

    /// The name used on the command line and in device ids.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Bare => "bare",
            Kind::PlantJson => "plant-json",
            Kind::MultiJson => "multi-json",
            Kind::Cbor => "cbor",
            Kind::Th100V1 => "th100-v1",
            Kind::Th100V2 => "th100-v2",
            Kind::Th300Pb => "th300-pb",
            Kind::Sparkplug => "spb-node",
        }
    }

    /// The kind of a name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--device-types`: `kind=weight,...`, e.g. `multi-json=3,th100-v1=1`.
pub fn parse_mix(s: &str) -> Result<Vec<(Kind, u32)>, String> {
    let mut mix = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
        let kind = Kind::parse(name).ok_or_else(|| {
            format!(
                "--device-types: {name:?} is not one of {}",
                Kind::ALL.map(Kind::name).join(", ")
            )
        })?;
        let w: u32 = weight.parse().map_err(|_| {
            format!("--device-types: weight {weight:?} of {name} is not a whole number")
        })?;
        mix.push((kind, w));
    }
    if mix.iter().map(|m| m.1).sum::<u32>() == 0 {
        return Err("--device-types: give at least one kind with a weight above 0".into());
    }
    Ok(mix)
}

/// One simulated device.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its id, `<run>-<kind>-<n>`.
    pub id: String,
    /// Its payload shape.
    pub kind: Kind,
    temperature: f64,
    counter: u64,
    seq: u64,
    phase: f64,
    status: u8,
    /// Running 60 degrees hot (a threshold crossing the run planted).
    pub hot: bool,
    /// A Sparkplug node's session.
    pub spb: Option<crate::sparkplug::Node>,
    /// With the reference profile: the reference dataset's values of this device, one
    /// second after another (cycled), sent instead of the plant signals.
    pub reference: std::collections::VecDeque<[f64; 4]>,
}

/// Gives each device the values of a reference-dataset device (`refdata`, `seconds` of
/// them, cycled), so the fleet sends the reference dataset's signals.
pub fn use_reference(devices: &mut [Device], seconds: usize, seed: u64) {
    use crate::refdata::{METRICS, RefSpec, device_id, generate};
    let spec = RefSpec {
        devices: devices.len(),
        seconds: seconds.clamp(1, 600),
        seed,
    };
    let mut by_device: std::collections::HashMap<String, Vec<(i64, usize, f64)>> =
        std::collections::HashMap::new();
    for r in generate(&spec) {
        let m = METRICS
            .iter()
            .position(|(name, _)| *name == r.metric)
            .unwrap_or(0);
        by_device
            .entry(r.device.clone())
            .or_default()
            .push((r.ts.0, m, r.value));
    }
    for (i, d) in devices.iter_mut().enumerate() {
        let mut rows = by_device.remove(&device_id(i)).unwrap_or_default();
        rows.sort_by_key(|r| (r.0, r.1));
        d.kind = Kind::MultiJson;
        d.spb = None;
        d.reference = rows
            .chunks(METRICS.len())
            .map(|c| {
                let mut v = [0.0; 4];
                for (_, m, val) in c {
                    v[*m] = *val;
                }
                v
            })
            .collect();
    }
}

/// A reading the agent will store for a message: (metric, event time in µs or `None` when
/// the agent stamps it, value).
pub type Expect = (&'static str, Option<i64>, f64);

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    /// MQTT topic.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// What the agent makes of it.
    pub expect: Vec<Expect>,
    /// CoAP Content-Format: 0 text, 50 JSON, 60 CBOR.
    pub content_format: u16,
    /// The device the readings are stored under, when it is not the sender's id (the
    /// Sparkplug node's and devices' ids).
    pub device: Option<String>,
    /// Readings of other devices the agent makes of this message (a Sparkplug NDEATH marks
    /// the node's devices offline too).
    pub also: Vec<(String, Vec<Expect>)>,
}

impl Message {
    /// The CoAP path of this message: `/t/<device>[/<metric>]`, from its topic.
    pub fn coap_path(&self) -> Vec<String> {
        let mut parts: Vec<String> = self.topic.split('/').skip(1).map(str::to_owned).collect();
        parts.insert(0, "t".into());
        parts
    }
}

/// The devices of a run: `n` of them, kinds drawn by weight.
pub fn devices(run: &str, n: u32, mix: &[(Kind, u32)], rng: &mut Rng) -> Vec<Device> {
    let total: u32 = mix.iter().map(|m| m.1).sum();
    (0..n)
        .map(|i| {
            let mut pick = (i as u64 * 7919 % total as u64) as u32;
            let kind = mix
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map_or(Kind::MultiJson, |m| m.0);
            Device {
                id: format!("{run}-{}-{i:05}", kind.name()),
                kind,
                temperature: 20.0 + rng.unit() * 40.0,
                counter: rng.range(0, 1_000_000) as u64,
                seq: 0,
                phase: rng.unit() * std::f64::consts::TAU,
                status: 1,
                hot: false,
                spb: (kind == Kind::Sparkplug)
                    .then(|| crate::sparkplug::Node::new(run, &format!("n{i:05}"), u64::from(i))),
                reference: std::collections::VecDeque::new(),
            }
        })
        .collect()
}

/// Rounds to 2 decimals, as sensors report.
fn r2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl Device {
    /// What the device publishes in its turn at event time `ts_us`, `progress` (0 to 1) into
    /// the run: one message ([`Device::next`]); a Sparkplug node's births or deaths, or one
    /// data message.
    pub fn turn(&mut self, prefix: &str, ts_us: i64, progress: f64, rng: &mut Rng) -> Vec<Message> {
        let Some(mut node) = self.spb.take() else {
            return vec![self.next(prefix, ts_us, rng)];
        };
        let ms = ts_us.div_euclid(1000);
        let out = node.turn(ms, progress, |_| self.sparkplug_values(rng));
        self.spb = Some(node);
        out
    }

    /// A Sparkplug device's next values (the same signals as the other kinds).
    fn sparkplug_values(&mut self, rng: &mut Rng) -> crate::sparkplug::Values {
        self.temperature = (self.temperature + rng.normal(0.05)).clamp(-40.0, 150.0);
        self.counter += rng.range(0, 5) as u64;
        crate::sparkplug::Values {
            temperature: r2(self.temperature + if self.hot { 60.0 } else { 0.0 }),
            humidity: r2(45.0 + rng.unit() * 10.0),
            cycles: (self.counter % u64::from(u32::MAX)) as u32,
        }
    }

    /// The next message at event time `ts_us` (a Sparkplug node's: see [`Device::turn`]): temperature a random walk, humidity a daily
    /// cycle, vibration with rare bursts, a monotonic counter and a run state that rarely
    /// changes (not called `status`, which the agent takes as a tag).
    fn next(&mut self, prefix: &str, ts_us: i64, rng: &mut Rng) -> Message {
        if let Some(v) = self.reference.pop_front() {
            self.reference.push_back(v);
            let ms = ts_us.div_euclid(1000);
            let ts = Some(ms * 1000);
            let names = crate::refdata::METRICS.map(|m| m.0);
            let mut obj = serde_json::Map::new();
            obj.insert("ts".into(), ms.into());
            for (n, x) in names.iter().zip(v) {
                obj.insert((*n).to_owned(), x.into());
            }
            return Message {
                topic: format!("{prefix}/{}", self.id),
                payload: serde_json::Value::Object(obj).to_string().into_bytes(),
                expect: names.iter().zip(v).map(|(n, x)| (*n, ts, x)).collect(),
                content_format: 50,
                device: None,
                also: Vec::new(),
            };
        }
        self.temperature = (self.temperature + rng.normal(0.05)).clamp(-40.0, 150.0);
        let day = (ts_us as f64 / 86_400e6) * std::f64::consts::TAU;
        let humidity = r2(50.0 + 20.0 * (day + self.phase).sin());
        let vibration = r2(if rng.chance(0.01) {
            5.0 + rng.unit() * 20.0
        } else {
            0.2 + rng.unit() * 0.3
        });
        self.counter += rng.range(0, 5) as u64;
        if rng.chance(0.001) {
            self.status = if self.status == 1 { 2 } else { 1 };
        }
        self.seq += 1;
        let t = r2(self.temperature + if self.hot { 60.0 } else { 0.0 });
        let ms = ts_us.div_euclid(1000);
        let ts = Some(ms * 1000);
        let topic = format!("{prefix}/{}", self.id);
        match self.kind {
            // A Sparkplug node's turns go to its session ([`Device::turn`]), never here.
            Kind::Bare | Kind::Sparkplug => Message {
                topic: format!("{topic}/temperature"),
                payload: format!("{t}").into_bytes(),
                expect: vec![("temperature", None, t)],
                content_format: 0,
                device: None,
                also: Vec::new(),
            },
            Kind::PlantJson => Message {
                topic,
                payload: serde_json::json!({"sensor_id": self.id, "measurement": "temperature",
                    "value": t, "unit": "C", "ts": ms})
                .to_string()
                .into_bytes(),
                expect: vec![("temperature", ts, t)],
                content_format: 50,
                device: None,
                also: Vec::new(),
            },
            Kind::MultiJson | Kind::Cbor => {
                let v = serde_json::json!({"ts": ms, "seq": self.seq, "temperature": t,
                    "humidity": humidity, "vibration": vibration, "counter": self.counter,
                    "run_state": self.status});
                let payload = if self.kind == Kind::Cbor {
                    let mut out = Vec::new();
                    let _ = ciborium::into_writer(&v, &mut out);
                    out
                } else {
                    v.to_string().into_bytes()
                };
                Message {
                    topic,
                    payload,
                    expect: vec![
                        ("temperature", ts, t),
                        ("humidity", ts, humidity),
                        ("vibration", ts, vibration),
                        ("counter", ts, self.counter as f64),
                        ("run_state", ts, f64::from(self.status)),
                    ],
                    content_format: if self.kind == Kind::Cbor { 60 } else { 50 },
                    device: None,
                    also: Vec::new(),
                }
            }
            Kind::Th100V1 => Message {
                topic,
                payload: serde_json::json!({"type": "th-100", "fw": "1.4.2", "ts": ms, "t": t,
                    "h": humidity, "rssi": -60})
                .to_string()
                .into_bytes(),
                expect: vec![("temperature", ts, t), ("humidity", ts, humidity)],
                content_format: 50,
                device: None,
                also: Vec::new(),
            },
            Kind::Th300Pb => Message {
                topic: format!(
                    "{prefix}/{}/{}/{}",
                    crate::protobuf::DEVICE_TYPE,
                    crate::protobuf::FIRMWARE,
                    self.id
                ),
                payload: crate::protobuf::encode(&self.id, ms as u64, t, humidity, self.seq as u32),
                expect: vec![("temperature", ts, t), ("humidity", ts, humidity)],
                content_format: 0,
                device: None,
                also: Vec::new(),
            },
            Kind::Th100V2 => Message {
                topic,
                payload: serde_json::json!({"type": "th-100", "fw": "2.0.1", "ts": ms,
                    "temp_c": t, "rh": humidity})
                .to_string()
                .into_bytes(),
                expect: vec![("temperature", ts, t), ("humidity", ts, humidity)],
                content_format: 50,
                device: None,
                also: Vec::new(),
            },
        }
    }
}

/// A payload no firmware sends: the agent dead-letters it (`malformed`).
pub fn malformed(prefix: &str, device: &str) -> Message {
    Message {
        topic: format!("{prefix}/{device}"),
        payload: b"{\"ts\": 17, \"temperature\": ".to_vec(),
        expect: Vec::new(),
        content_format: 50,
        device: None,
        also: Vec::new(),
    }
}

/// A payload over the agent's default 64 KiB limit: dead-lettered (`oversize`).
pub fn oversize(prefix: &str, device: &str) -> Message {
    let pad = "x".repeat(70_000);
    Message {
        topic: format!("{prefix}/{device}"),
        payload: format!("{{\"ts\": 17, \"temperature\": 1, \"note\": \"{pad}\"}}").into_bytes(),
        expect: Vec::new(),
        content_format: 50,
        device: None,
        also: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_name_what_is_wrong() {
        assert_eq!(
            parse_mix("multi-json=3,cbor").unwrap(),
            vec![(Kind::MultiJson, 3), (Kind::Cbor, 1)]
        );
        assert!(parse_mix("toaster=1").unwrap_err().contains("toaster"));
        assert!(parse_mix("cbor=x").unwrap_err().contains("\"x\""));
        assert!(parse_mix("cbor=0").is_err());
    }

    #[test]
    fn every_kind_is_drawn_and_messages_carry_their_readings() {
        let mut rng = Rng::new(1);
        let mix: Vec<(Kind, u32)> = Kind::ALL.iter().map(|k| (*k, 1)).collect();
        let mut devs = devices("r1", 60, &mix, &mut rng);
        for k in Kind::ALL {
            assert!(devs.iter().any(|d| d.kind == k), "{k}");
        }
        for d in &mut devs {
            let m = d
                .turn("plant", 1_795_000_000_123_456, 0.0, &mut rng)
                .remove(0);
            assert!(!m.expect.is_empty());
            if d.kind == Kind::Sparkplug {
                assert!(m.topic.starts_with("spBv1.0/r1-spb/NBIRTH/"), "{}", m.topic);
            } else if d.kind == Kind::Th300Pb {
                assert_eq!(m.topic, format!("plant/th-300/3.0.0/{}", d.id));
            } else {
                assert!(m.topic.starts_with(&format!("plant/{}", d.id)));
            }
            if d.kind != Kind::Bare {
                assert!(m.expect.iter().all(|e| e.1 == Some(1_795_000_000_123_000)));
            }
        }
    }
}
