//! Sparkplug B edge nodes (`spb-node`): each node has two devices (`d1`, `d2`) and speaks
//! the `spBv1.0` namespace as an edge node should:
//! - NBIRTH (with `bdSeq`, `Node Control/Rebirth` and its own metric `uptime_s`), then a
//!   DBIRTH per device, before any data; `seq` runs from 0 at NBIRTH and wraps after 255;
//! - data carries only aliases (DDATA for `temperature` Double, `humidity` Float, `cycles`
//!   UInt32; NDATA for `uptime_s` Int64); BIRTHs also carry `state`, a String the agent skips;
//! - device `d2` dies (DDEATH) at 70% of the run and is born again (DBIRTH) at 80%;
//! - a node that falls silent (`--silent-devices`) publishes its NDEATH first;
//! - an NCMD `Node Control/Rebirth` = true makes it publish its births again.
//!
//! Nodes publish in the group `<run>-spb`, so the ids the agent gives them by default
//! (`[mqtt.sparkplug] node = "{group}/{node}"`, `device = "{group}/{node}/{device}"`) start
//! with the run name, as `verify` needs. Pure: the caller supplies times and values.

use plantlink_schema::sparkplug::{
    self, BD_SEQ, Kind as Msg, Metric, Payload, REBIRTH, Topic, Value, datatype,
};

use crate::fleet::{Expect, Message};

/// The devices of every node.
pub const DEVICES: [&str; 2] = ["d1", "d2"];

/// The Sparkplug group of a run's nodes.
pub fn group(run: &str) -> String {
    format!("{run}-spb")
}

/// The NCMD topic filter for a run's nodes.
pub fn commands(run: &str) -> String {
    format!("spBv1.0/{}/NCMD/+", group(run))
}

/// Whether an NCMD payload asks for a rebirth.
pub fn is_rebirth(payload: &[u8]) -> bool {
    sparkplug::decode(payload).is_ok_and(|p| {
        p.metrics.iter().any(|m| {
            m.name.as_deref() == Some(REBIRTH) && matches!(m.value, Some(Value::Boolean(true)))
        })
    })
}

/// The node an NCMD topic is for.
pub fn command_node(topic: &str) -> Option<String> {
    match Topic::parse(topic) {
        Ok(Some(t)) if t.kind == Msg::NCmd => Some(t.node.to_owned()),
        _ => None,
    }
}

/// The values a device reports in one message.
#[derive(Debug, Clone, Copy)]
pub struct Values {
    /// `temperature`, a Double.
    pub temperature: f64,
    /// `humidity`, sent as a Float.
    pub humidity: f64,
    /// `cycles`, a UInt32.
    pub cycles: u32,
}

/// One edge node's session.
#[derive(Debug, Clone)]
pub struct Node {
    group: String,
    /// The node's name in topics.
    pub name: String,
    bd_seq: u64,
    next_seq: u8,
    born: bool,
    device_born: [bool; 2],
    d2_died: bool,
    d2_reborn: bool,
    dead: bool,
    turns: u64,
    started_ms: i64,
}

const ALIAS_UPTIME: u64 = 2;
const ALIAS_TEMPERATURE: u64 = 11;
const ALIAS_HUMIDITY: u64 = 12;
const ALIAS_CYCLES: u64 = 13;
const ALIAS_STATE: u64 = 14;

fn metric(name: &str, alias: u64, ts: u64, t: u32, v: Value) -> Metric {
    Metric {
        name: Some(name.to_owned()),
        alias: Some(alias),
        timestamp: Some(ts),
        datatype: Some(t),
        value: Some(v),
        ..Metric::default()
    }
}

fn alias_only(alias: u64, ts: u64, v: Value) -> Metric {
    Metric {
        alias: Some(alias),
        timestamp: Some(ts),
        value: Some(v),
        ..Metric::default()
    }
}

impl Node {
    /// Node `name` of `run`, not yet born.
    pub fn new(run: &str, name: &str, bd_seq: u64) -> Self {
        Self {
            group: group(run),
            name: name.to_owned(),
            bd_seq,
            next_seq: 0,
            born: false,
            device_born: [false; 2],
            d2_died: false,
            d2_reborn: false,
            dead: false,
            turns: 0,
            started_ms: 0,
        }
    }

    /// The node's device id, as the agent names it by default.
    pub fn node_id(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }

    /// A device's id, as the agent names it by default.
    pub fn device_id(&self, i: usize) -> String {
        format!("{}/{}/{}", self.group, self.name, DEVICES[i])
    }

    /// A rebirth was asked for: the next turn publishes the births again.
    pub fn rebirth(&mut self) {
        if !self.dead {
            self.born = false;
        }
    }

    /// Whether the node has published its NDEATH.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq = s.wrapping_add(1);
        u64::from(s)
    }

    fn message(
        &mut self,
        kind: Msg,
        device: Option<usize>,
        p: Payload,
        expect: Vec<Expect>,
    ) -> Message {
        let id = match device {
            Some(i) => self.device_id(i),
            None => self.node_id(),
        };
        Message {
            topic: Topic::render(&self.group, kind, &self.name, device.map(|i| DEVICES[i])),
            payload: sparkplug::encode(&p),
            expect,
            content_format: 0,
            device: Some(id),
            also: Vec::new(),
        }
    }

    fn uptime(&self, ms: i64) -> i64 {
        (ms - self.started_ms) / 1000
    }

    fn nbirth(&mut self, ms: i64) -> Message {
        self.next_seq = 0;
        let seq = self.seq();
        let ts = ms as u64;
        let up = self.uptime(ms);
        let p = Payload {
            timestamp: Some(ts),
            seq: Some(seq),
            metrics: vec![
                metric(BD_SEQ, 1, ts, datatype::INT64, Value::Long(self.bd_seq)),
                metric(REBIRTH, 3, ts, datatype::BOOLEAN, Value::Boolean(false)),
                metric(
                    "uptime_s",
                    ALIAS_UPTIME,
                    ts,
                    datatype::INT64,
                    Value::Long(up as u64),
                ),
            ],
            ..Payload::default()
        };
        let t = Some(ms * 1000);
        self.message(
            Msg::NBirth,
            None,
            p,
            vec![("online", t, 1.0), ("uptime_s", t, up as f64)],
        )
    }

    fn dbirth(&mut self, i: usize, ms: i64, v: Values) -> Message {
        let seq = self.seq();
        let ts = ms as u64;
        let p = Payload {
            timestamp: Some(ts),
            seq: Some(seq),
            metrics: vec![
                metric(
                    "temperature",
                    ALIAS_TEMPERATURE,
                    ts,
                    datatype::DOUBLE,
                    Value::Double(v.temperature),
                ),
                metric(
                    "humidity",
                    ALIAS_HUMIDITY,
                    ts,
                    datatype::FLOAT,
                    Value::Float(v.humidity as f32),
                ),
                metric(
                    "cycles",
                    ALIAS_CYCLES,
                    ts,
                    datatype::UINT32,
                    Value::Int(v.cycles),
                ),
                metric(
                    "state",
                    ALIAS_STATE,
                    ts,
                    datatype::STRING,
                    Value::String("running".into()),
                ),
            ],
            ..Payload::default()
        };
        self.device_born[i] = true;
        let mut expect = vec![("online", Some(ms * 1000), 1.0)];
        expect.extend(readings(ms, v));
        self.message(Msg::DBirth, Some(i), p, expect)
    }

    fn ddata(&mut self, i: usize, ms: i64, v: Values) -> Message {
        let seq = self.seq();
        let ts = ms as u64;
        let p = Payload {
            timestamp: Some(ts),
            seq: Some(seq),
            metrics: vec![
                alias_only(ALIAS_TEMPERATURE, ts, Value::Double(v.temperature)),
                alias_only(ALIAS_HUMIDITY, ts, Value::Float(v.humidity as f32)),
                alias_only(ALIAS_CYCLES, ts, Value::Int(v.cycles)),
            ],
            ..Payload::default()
        };
        self.message(Msg::DData, Some(i), p, readings(ms, v))
    }

    fn ndata(&mut self, ms: i64) -> Message {
        let seq = self.seq();
        let ts = ms as u64;
        let up = self.uptime(ms);
        let p = Payload {
            timestamp: Some(ts),
            seq: Some(seq),
            metrics: vec![alias_only(ALIAS_UPTIME, ts, Value::Long(up as u64))],
            ..Payload::default()
        };
        self.message(
            Msg::NData,
            None,
            p,
            vec![("uptime_s", Some(ms * 1000), up as f64)],
        )
    }

    fn ddeath(&mut self, i: usize, ms: i64) -> Message {
        let seq = self.seq();
        let p = Payload {
            timestamp: Some(ms as u64),
            seq: Some(seq),
            ..Payload::default()
        };
        self.device_born[i] = false;
        self.message(
            Msg::DDeath,
            Some(i),
            p,
            vec![("online", Some(ms * 1000), 0.0)],
        )
    }

    /// The NDEATH a node sends before it goes quiet: the agent marks the node and its born
    /// devices offline at the time it receives it.
    pub fn ndeath(&mut self, ms: i64) -> Vec<Message> {
        if self.dead {
            return Vec::new();
        }
        self.dead = true;
        let p = Payload {
            timestamp: Some(ms as u64),
            metrics: vec![metric(
                BD_SEQ,
                1,
                ms as u64,
                datatype::INT64,
                Value::Long(self.bd_seq),
            )],
            ..Payload::default()
        };
        // The agent knows the devices only once the node was born.
        let devices: Vec<(String, Vec<Expect>)> = if self.born {
            (0..DEVICES.len())
                .filter(|i| self.device_born[*i])
                .map(|i| (self.device_id(i), vec![("online", None, 0.0)]))
                .collect()
        } else {
            Vec::new()
        };
        let mut m = self.message(Msg::NDeath, None, p, vec![("online", None, 0.0)]);
        m.also = devices;
        vec![m]
    }

    /// What the node publishes in one turn at `ms`: its births when it is not born (or was
    /// asked for a rebirth), `d2`'s death and rebirth at their points of the run, or else one
    /// data message (DDATA of `d1`, of `d2`, or NDATA, in turn). `values` gives a device's
    /// next values.
    pub fn turn(
        &mut self,
        ms: i64,
        progress: f64,
        mut values: impl FnMut(usize) -> Values,
    ) -> Vec<Message> {
        if self.dead {
            return Vec::new();
        }
        if self.turns == 0 {
            self.started_ms = ms;
        }
        self.turns += 1;
        let mut out = Vec::new();
        if !self.born {
            self.born = true;
            out.push(self.nbirth(ms));
            for i in 0..DEVICES.len() {
                // A rebirth leaves out a device that is dead.
                if i == 1 && self.d2_died && !self.d2_reborn {
                    continue;
                }
                let v = values(i);
                out.push(self.dbirth(i, ms, v));
            }
            return out;
        }
        if progress >= 0.7 && !self.d2_died {
            self.d2_died = true;
            return vec![self.ddeath(1, ms)];
        }
        if progress >= 0.8 && !self.d2_reborn {
            self.d2_reborn = true;
            let v = values(1);
            return vec![self.dbirth(1, ms, v)];
        }
        match self.turns % 3 {
            0 => vec![self.ndata(ms)],
            k => {
                let i = if self.device_born[1] {
                    (k - 1) as usize
                } else {
                    0
                };
                let v = values(i);
                vec![self.ddata(i, ms, v)]
            }
        }
    }
}

/// The readings the agent makes of a device's values at `ms` (a Float arrives as such).
fn readings(ms: i64, v: Values) -> Vec<Expect> {
    let t = Some(ms * 1000);
    vec![
        ("temperature", t, v.temperature),
        ("humidity", t, f64::from(v.humidity as f32)),
        ("cycles", t, f64::from(v.cycles)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v() -> Values {
        Values {
            temperature: 21.5,
            humidity: 40.1,
            cycles: 7,
        }
    }

    fn kinds(ms: &[Message]) -> Vec<String> {
        ms.iter()
            .map(|m| m.topic.split('/').skip(2).collect::<Vec<_>>().join("/"))
            .collect()
    }

    #[test]
    fn a_node_is_born_then_sends_alias_only_data_in_sequence() {
        let mut n = Node::new("r1", "n00001", 0);
        let first = n.turn(1_000, 0.0, |_| v());
        assert_eq!(
            kinds(&first),
            ["NBIRTH/n00001", "DBIRTH/n00001/d1", "DBIRTH/n00001/d2"]
        );
        assert_eq!(first[0].topic, "spBv1.0/r1-spb/NBIRTH/n00001");
        assert_eq!(first[1].device.as_deref(), Some("r1-spb/n00001/d1"));
        let seqs: Vec<u64> = first
            .iter()
            .map(|m| sparkplug::decode(&m.payload).unwrap().seq.unwrap())
            .collect();
        assert_eq!(seqs, [0, 1, 2]);
        let data = n.turn(2_000, 0.1, |_| v());
        let p = sparkplug::decode(&data[0].payload).unwrap();
        assert_eq!(p.seq, Some(3));
        assert!(p.metrics.iter().all(|m| m.name.is_none()));
        // The Float's value as the agent will read it.
        assert_eq!(data[0].expect[1].2, f64::from(40.1f32));
        // 300 more turns: seq wraps after 255.
        let mut last = 3;
        for k in 0..300 {
            for m in n.turn(3_000 + k, 0.1, |_| v()) {
                let s = sparkplug::decode(&m.payload).unwrap().seq.unwrap();
                assert_eq!(s, (last + 1) % 256);
                last = s;
            }
        }
    }

    #[test]
    fn rebirth_d2s_death_and_the_nodes_death() {
        let mut n = Node::new("r1", "n00002", 4);
        n.turn(1_000, 0.0, |_| v());
        n.rebirth();
        let again = n.turn(2_000, 0.1, |_| v());
        assert_eq!(again.len(), 3);
        assert_eq!(sparkplug::decode(&again[0].payload).unwrap().seq, Some(0));
        assert_eq!(kinds(&n.turn(3_000, 0.7, |_| v())), ["DDEATH/n00002/d2"]);
        // A rebirth while d2 is dead leaves it out; data goes to d1 only.
        n.rebirth();
        assert_eq!(n.turn(4_000, 0.75, |_| v()).len(), 2);
        for k in 0..6 {
            for m in n.turn(5_000 + k, 0.75, |_| v()) {
                assert!(!m.topic.ends_with("/d2"), "{}", m.topic);
            }
        }
        assert_eq!(kinds(&n.turn(6_000, 0.8, |_| v())), ["DBIRTH/n00002/d2"]);
        let death = n.ndeath(7_000);
        assert_eq!(death.len(), 1);
        let p = sparkplug::decode(&death[0].payload).unwrap();
        assert_eq!(
            (p.seq, p.metrics[0].value.clone()),
            (None, Some(Value::Long(4)))
        );
        assert_eq!(death[0].expect, [("online", None, 0.0)]);
        let others: Vec<&str> = death[0].also.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(others, ["r1-spb/n00002/d1", "r1-spb/n00002/d2"]);
        assert!(n.turn(8_000, 0.9, |_| v()).is_empty());
        assert!(n.ndeath(9_000).is_empty());
    }

    #[test]
    fn commands_are_recognised() {
        let req = sparkplug::rebirth_request(5);
        assert!(is_rebirth(&req));
        assert!(!is_rebirth(b"junk"));
        assert_eq!(
            command_node("spBv1.0/r1-spb/NCMD/n00003").as_deref(),
            Some("n00003")
        );
        assert_eq!(command_node("spBv1.0/r1-spb/NDATA/n00003"), None);
        assert_eq!(commands("r1"), "spBv1.0/r1-spb/NCMD/+");
    }
}
