//! Sparkplug B host state: the agent reads the `spBv1.0` namespace as a host application
//! that stores numbers.
//!
//! Per edge node it keeps what the last NBIRTH said (its `bdSeq`, the alias table, the
//! message sequence) and per device what its DBIRTH said. DATA carrying only aliases is read
//! with the names from BIRTH. What cannot be read without guessing is dead-lettered with a
//! reason, and the node is asked for a rebirth (an NCMD with `Node Control/Rebirth` = true,
//! at most once per [`REBIRTH_EVERY_US`] while it is awaited):
//! - a DATA or DDEATH metric whose alias no BIRTH assigned (`unknown_alias`): after an agent
//!   restart every node is unknown until it is born again;
//! - a message whose `seq` is not the one after the last (`seq_gap`); until the node's next
//!   NBIRTH its messages are dead-lettered alike. With `rebirth = false` a gap is let
//!   through (nothing would end the wait), and only what cannot be read is refused.
//!
//! BIRTH and DEATH certificates become readings of the metric `online` (1 and 0) of the
//! node (and device), tagged `event = birth | death`. An NDEATH whose `bdSeq` is not the
//! current birth's is an old session's will and is ignored. Metrics that are not numbers
//! (strings, text, UUIDs, bytes, files, datasets, templates, arrays, DateTime) are skipped and
//! counted by type; transient and null values are skipped.

use std::collections::HashMap;

use plantlink_schema::sparkplug::{self, BD_SEQ, Kind, Payload, Topic};

use crate::config::Sparkplug as Config;
use crate::payload::{Reason, Reject};

/// How long a requested rebirth is awaited before it is asked for again.
pub const REBIRTH_EVERY_US: i64 = 5_000_000;

/// Most nodes tracked; past it the longest unheard node is forgotten (it will be asked for
/// a rebirth when next heard).
const MAX_NODES: usize = 10_000;

/// One reading from a Sparkplug message, before the decoder checks and stamps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The device id (the node's or a device's), from the configured templates.
    pub device: String,
    /// The metric name from BIRTH.
    pub metric: String,
    /// Milliseconds since the epoch: the metric's, else the payload's; `None`: receive time.
    pub ts_ms: Option<u64>,
    /// The value.
    pub value: f64,
    /// `event = birth | death` on `online` readings.
    pub event: Option<&'static str>,
}

/// What one message gave.
#[derive(Debug, Default)]
pub struct Output {
    /// Readings.
    pub items: Vec<Item>,
    /// Why (part of) the message was refused.
    pub rejects: Vec<Reject>,
    /// An NCMD to publish: topic and payload.
    pub publish: Option<(String, Vec<u8>)>,
    /// Metrics skipped as not numbers, by data type name.
    pub skipped: Vec<&'static str>,
    /// The message carries nothing to store and nothing wrong (STATE, commands).
    pub nothing: bool,
    /// Topics whose `unknown_alias` and `seq_gap` dead letters to read again, now that a
    /// BIRTH names their aliases.
    pub replay: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// Born since the agent started (or since the last NDEATH).
    born: bool,
    /// A seq gap or unknown alias was seen; waiting for the next NBIRTH.
    awaiting: bool,
    /// When the last rebirth was asked for.
    asked_us: Option<i64>,
    /// Messages of this node were dead-lettered for want of a birth: its next NBIRTH marks
    /// them for replay.
    refused: bool,
    /// Set by an NBIRTH after refusals: the DBIRTHs that follow mark their devices'.
    replay_devices: bool,
    bd_seq: Option<u64>,
    seq: Option<u8>,
    aliases: HashMap<u64, (String, u32)>,
    devices: HashMap<String, Aliases>,
    last_heard_us: i64,
}

#[derive(Debug, Clone, Default)]
struct Aliases {
    born: bool,
    aliases: HashMap<u64, (String, u32)>,
}

/// The host state of every node heard from.
#[derive(Debug, Clone)]
pub struct Host {
    cfg: Config,
    nodes: HashMap<(String, String), Node>,
    /// Reading dead letters again: no sequence checks, no rebirth requests, no state change.
    replay: bool,
}

impl Host {
    /// A host with nothing heard yet.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            nodes: HashMap::new(),
            replay: false,
        }
    }

    /// Replays dead letters (see [`Host::replay`]).
    pub fn set_replay(&mut self, on: bool) {
        self.replay = on;
    }

    /// Nodes currently known as born.
    pub fn nodes_born(&self) -> usize {
        self.nodes.values().filter(|n| n.born).count()
    }

    /// Reads one message of the namespace.
    pub fn handle(&mut self, topic: &str, payload: &[u8], now_us: i64) -> Output {
        let mut out = Output::default();
        let t = match Topic::parse(topic) {
            Ok(Some(t)) => t,
            Ok(None) => {
                out.nothing = true;
                return out;
            }
            Err(e) => {
                reject(&mut out, Reason::NoTemplate, e);
                return out;
            }
        };
        if matches!(t.kind, Kind::NCmd | Kind::DCmd) {
            out.nothing = true;
            return out;
        }
        let p = match sparkplug::decode(payload) {
            Ok(p) => p,
            Err(e) => {
                reject(&mut out, Reason::Malformed, e);
                return out;
            }
        };
        if self.nodes.len() >= MAX_NODES
            && !self.nodes.contains_key(&key(&t))
            && let Some(oldest) = self
                .nodes
                .iter()
                .min_by_key(|(_, n)| n.last_heard_us)
                .map(|(k, _)| k.clone())
        {
            self.nodes.remove(&oldest);
        }
        let node_id = render(&self.cfg.node, t.group, t.node, None);
        let device_id = t
            .device
            .map(|d| render(&self.cfg.device, t.group, t.node, Some(d)));
        // Replaying a dead letter reads data with the names known now. Births and deaths
        // are of the past and change nothing, but a device's refused DBIRTH or DDEATH still
        // gives its readings: a BIRTH names every metric it carries.
        if self.replay && !matches!(t.kind, Kind::NData | Kind::DData) {
            match (t.kind, device_id.as_deref()) {
                (Kind::DBirth, Some(id)) => {
                    let mut named = HashMap::new();
                    births(&p, &mut named);
                    out.items.push(online(id, p.timestamp, 1.0, "birth"));
                    values(&p, &named, id, &mut out);
                }
                (Kind::DDeath, Some(id)) => out.items.push(online(id, p.timestamp, 0.0, "death")),
                _ => out.nothing = true,
            }
            return out;
        }
        let node = self.nodes.entry(key(&t)).or_default();
        node.last_heard_us = now_us;
        let where_ = || match t.device {
            Some(d) => format!("{}/{}/{d}", t.group, t.node),
            None => format!("{}/{}", t.group, t.node),
        };
        match t.kind {
            Kind::NBirth => {
                if node.refused && !self.replay {
                    out.replay
                        .push(Topic::render(t.group, Kind::NData, t.node, None));
                }
                let replay_devices = node.refused && !self.replay;
                *node = Node {
                    replay_devices,
                    born: true,
                    last_heard_us: now_us,
                    bd_seq: p
                        .metrics
                        .iter()
                        .find(|m| m.name.as_deref() == Some(BD_SEQ))
                        .and_then(int_value),
                    seq: p.seq.map(|s| s as u8),
                    aliases: HashMap::new(),
                    ..Node::default()
                };
                births(&p, &mut node.aliases);
                out.items.push(online(&node_id, p.timestamp, 1.0, "birth"));
                values(&p, &node.aliases, &node_id, &mut out);
                return out;
            }
            Kind::NDeath => {
                let bd = p
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some(BD_SEQ))
                    .and_then(int_value);
                if node.born && bd.is_some() && node.bd_seq.is_some() && bd != node.bd_seq {
                    // The will of an earlier session: the node is already born again.
                    out.nothing = true;
                    return out;
                }
                // The will was made when the node connected, before its birth: its time is
                // not when the node died. The death is when the broker sent it.
                out.items.push(online(&node_id, None, 0.0, "death"));
                let mut devices: Vec<&String> = node
                    .devices
                    .iter()
                    .filter(|(_, d)| d.born)
                    .map(|(k, _)| k)
                    .collect();
                devices.sort();
                for d in devices {
                    let id = render(&self.cfg.device, t.group, t.node, Some(d));
                    out.items.push(online(&id, None, 0.0, "death"));
                }
                node.born = false;
                node.seq = None;
                node.devices.clear();
                return out;
            }
            _ => {}
        }
        // Everything else continues the node's sequence.
        let rebirth = self.cfg.rebirth;
        let replay = self.replay;
        let refuse = |node: &mut Node, out: &mut Output, reason: Reason, detail: String| {
            reject(out, reason, detail);
            if replay {
                return;
            }
            // Without rebirth requests nothing would end the wait: only what cannot be read
            // is refused, and a gap is let through.
            node.awaiting = rebirth;
            node.refused = true;
            if rebirth && node.asked_us.is_none_or(|t| now_us - t >= REBIRTH_EVERY_US) {
                node.asked_us = Some(now_us);
                out.publish = Some((
                    Topic::render(t.group, Kind::NCmd, t.node, None),
                    sparkplug::rebirth_request((now_us / 1000) as u64),
                ));
            }
        };
        if !node.born {
            let detail = format!(
                "{} from node {} before its NBIRTH (the agent has not seen one since it started, or the node died); asked it for a rebirth",
                t.kind.as_str(),
                where_()
            );
            refuse(node, &mut out, Reason::UnknownAlias, detail);
            return out;
        }
        if node.awaiting && !replay {
            let detail = format!(
                "{} from node {} while its rebirth is awaited (after a seq gap or an unknown alias)",
                t.kind.as_str(),
                where_()
            );
            refuse(node, &mut out, Reason::SeqGap, detail);
            return out;
        }
        if let (false, Some(last), Some(seq)) = (replay, node.seq, p.seq) {
            let want = last.wrapping_add(1);
            // The same seq again is a redelivery (or a retried commit): read again, and
            // the queue's dedupe drops what it already holds.
            if seq != u64::from(want) && seq != u64::from(last) && rebirth {
                let detail = format!(
                    "{} from node {} has seq {seq}, expected {want}: messages were lost or reordered; asked for a rebirth",
                    t.kind.as_str(),
                    where_()
                );
                refuse(node, &mut out, Reason::SeqGap, detail);
                return out;
            }
        }
        if !replay {
            node.seq = p.seq.map(|s| s as u8).or(node.seq);
        }
        let (Some(device), Some(device_id)) = (t.device, device_id.as_deref()) else {
            // NDATA.
            if let Some(alias) = unknown_alias(&p, &node.aliases) {
                let detail = format!(
                    "NDATA from node {} uses alias {alias}, which its NBIRTH did not assign; asked for a rebirth",
                    where_()
                );
                refuse(node, &mut out, Reason::UnknownAlias, detail);
                return out;
            }
            values(&p, &node.aliases, &node_id, &mut out);
            return out;
        };
        match t.kind {
            Kind::DBirth => {
                let d = node.devices.entry(device.to_owned()).or_default();
                d.born = true;
                d.aliases.clear();
                births(&p, &mut d.aliases);
                if node.replay_devices && !self.replay {
                    for kind in [Kind::DData, Kind::DBirth, Kind::DDeath] {
                        out.replay
                            .push(Topic::render(t.group, kind, t.node, Some(device)));
                    }
                }
                out.items.push(online(device_id, p.timestamp, 1.0, "birth"));
                values(&p, &d.aliases, device_id, &mut out);
            }
            Kind::DDeath => {
                if let Some(d) = node.devices.get_mut(device) {
                    d.born = false;
                }
                out.items.push(online(device_id, p.timestamp, 0.0, "death"));
            }
            _ => {
                let known = node.devices.get(device).filter(|d| d.born);
                let Some(d) = known else {
                    let detail = format!(
                        "DDATA from device {} before its DBIRTH; asked the node for a rebirth",
                        where_()
                    );
                    refuse(node, &mut out, Reason::UnknownAlias, detail);
                    return out;
                };
                if let Some(alias) = unknown_alias(&p, &d.aliases) {
                    let detail = format!(
                        "DDATA from device {} uses alias {alias}, which its DBIRTH did not assign; asked for a rebirth",
                        where_()
                    );
                    refuse(node, &mut out, Reason::UnknownAlias, detail);
                    return out;
                }
                let d = &node.devices[device];
                values(&p, &d.aliases, device_id, &mut out);
            }
        }
        out
    }
}

fn key(t: &Topic<'_>) -> (String, String) {
    (t.group.to_owned(), t.node.to_owned())
}

fn reject(out: &mut Output, reason: Reason, detail: String) {
    out.rejects.push(Reject { reason, detail });
}

/// Renders a `{group}`, `{node}`, `{device}` template.
pub fn render(template: &str, group: &str, node: &str, device: Option<&str>) -> String {
    let s = template.replace("{group}", group).replace("{node}", node);
    match device {
        Some(d) => s.replace("{device}", d),
        None => s,
    }
}

fn online(device: &str, ts_ms: Option<u64>, value: f64, event: &'static str) -> Item {
    Item {
        device: device.to_owned(),
        metric: "online".to_owned(),
        ts_ms,
        value,
        event: Some(event),
    }
}

fn int_value(m: &sparkplug::Metric) -> Option<u64> {
    match m.value {
        Some(sparkplug::Value::Long(v)) => Some(v),
        Some(sparkplug::Value::Int(v)) => Some(u64::from(v)),
        _ => None,
    }
}

fn births(p: &Payload, aliases: &mut HashMap<u64, (String, u32)>) {
    for m in &p.metrics {
        if let (Some(name), Some(alias)) = (&m.name, m.alias) {
            aliases.insert(alias, (name.clone(), m.datatype.unwrap_or(0)));
        }
    }
}

fn unknown_alias(p: &Payload, aliases: &HashMap<u64, (String, u32)>) -> Option<u64> {
    p.metrics
        .iter()
        .filter(|m| m.name.is_none())
        .find_map(|m| m.alias.filter(|a| !aliases.contains_key(a)))
        .or_else(|| {
            p.metrics
                .iter()
                .find(|m| m.name.is_none() && m.alias.is_none())
                .map(|_| u64::MAX)
        })
}

/// The numeric metrics of a message, named from BIRTH where only an alias came.
fn values(p: &Payload, aliases: &HashMap<u64, (String, u32)>, device: &str, out: &mut Output) {
    for m in &p.metrics {
        let born = m.alias.and_then(|a| aliases.get(&a));
        let Some(name) = m.name.as_deref().or(born.map(|(n, _)| n.as_str())) else {
            continue;
        };
        if name == BD_SEQ
            || name.starts_with("Node Control/")
            || m.is_null == Some(true)
            || m.is_transient == Some(true)
        {
            continue;
        }
        let Some(value) = &m.value else { continue };
        let datatype = m.datatype.or(born.map(|(_, t)| *t)).unwrap_or(0);
        match sparkplug::number(datatype, value) {
            Ok(x) => out.items.push(Item {
                device: device.to_owned(),
                metric: name.to_owned(),
                ts_ms: m.timestamp.or(p.timestamp),
                value: x,
                event: None,
            }),
            Err(kind) => out.skipped.push(kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use plantlink_schema::sparkplug::{Metric, Value, datatype, encode};

    use super::*;

    fn host() -> Host {
        Host::new(Config {
            groups: vec!["plant".into()],
            node: "{group}/{node}".into(),
            device: "{group}/{node}/{device}".into(),
            rebirth: true,
        })
    }

    fn metric(name: Option<&str>, alias: u64, t: u32, v: Value) -> Metric {
        Metric {
            name: name.map(Into::into),
            alias: Some(alias),
            datatype: name.map(|_| t),
            value: Some(v),
            ..Metric::default()
        }
    }

    fn payload(seq: u64, metrics: Vec<Metric>) -> Vec<u8> {
        encode(&Payload {
            timestamp: Some(1_767_225_600_000 + seq),
            metrics,
            seq: Some(seq),
            uuid: None,
            body: None,
        })
    }

    fn births(h: &mut Host) {
        let bd = Metric {
            name: Some(BD_SEQ.into()),
            datatype: Some(datatype::INT64),
            value: Some(Value::Long(3)),
            ..Metric::default()
        };
        let rebirth = Metric {
            name: Some(REBIRTH_NAME.into()),
            datatype: Some(datatype::BOOLEAN),
            value: Some(Value::Boolean(false)),
            ..Metric::default()
        };
        let uptime = metric(Some("uptime"), 1, datatype::UINT64, Value::Long(7));
        let out = h.handle(
            "spBv1.0/plant/NBIRTH/line1",
            &payload(0, vec![bd, rebirth, uptime]),
            0,
        );
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        let names: Vec<(&str, &str, f64)> = out
            .items
            .iter()
            .map(|i| (i.device.as_str(), i.metric.as_str(), i.value))
            .collect();
        assert_eq!(
            names,
            [
                ("plant/line1", "online", 1.0),
                ("plant/line1", "uptime", 7.0)
            ]
        );
        let out = h.handle(
            "spBv1.0/plant/DBIRTH/line1/press",
            &payload(
                1,
                vec![
                    metric(
                        Some("temperature"),
                        10,
                        datatype::DOUBLE,
                        Value::Double(20.5),
                    ),
                    metric(Some("offset"), 11, datatype::INT16, Value::Int(0xfffb)),
                    metric(
                        Some("state"),
                        12,
                        datatype::STRING,
                        Value::String("run".into()),
                    ),
                ],
            ),
            0,
        );
        assert_eq!(out.items.len(), 3, "{:?}", out.items);
        assert_eq!(out.skipped, ["String"]);
        assert_eq!(out.items[2].value, -5.0);
    }

    const REBIRTH_NAME: &str = plantlink_schema::sparkplug::REBIRTH;

    fn data(seq: u64, temp: f64) -> Vec<u8> {
        payload(
            seq,
            vec![
                metric(None, 10, 0, Value::Double(temp)),
                metric(None, 11, 0, Value::Int(3)),
            ],
        )
    }

    #[test]
    fn alias_only_data_is_named_from_birth() {
        let mut h = host();
        births(&mut h);
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(2, 21.5), 10);
        assert!(
            out.rejects.is_empty() && out.publish.is_none(),
            "{:?}",
            out.rejects
        );
        let got: Vec<(&str, &str, f64, Option<u64>)> = out
            .items
            .iter()
            .map(|i| (i.device.as_str(), i.metric.as_str(), i.value, i.ts_ms))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "plant/line1/press",
                    "temperature",
                    21.5,
                    Some(1_767_225_600_002)
                ),
                ("plant/line1/press", "offset", 3.0, Some(1_767_225_600_002))
            ]
        );
        // The same seq again (a redelivery) is read again; the next one is fine too.
        assert!(
            h.handle("spBv1.0/plant/DDATA/line1/press", &data(2, 21.5), 11)
                .rejects
                .is_empty()
        );
        assert!(
            h.handle("spBv1.0/plant/DDATA/line1/press", &data(3, 21.6), 12)
                .rejects
                .is_empty()
        );
    }

    #[test]
    fn an_unknown_node_is_asked_for_a_rebirth_once_per_interval() {
        let mut h = host();
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(9, 21.5), 0);
        assert_eq!(out.rejects[0].reason, Reason::UnknownAlias);
        assert!(
            out.rejects[0].detail.contains("plant/line1/press"),
            "{}",
            out.rejects[0].detail
        );
        let (topic, body) = out.publish.unwrap();
        assert_eq!(topic, "spBv1.0/plant/NCMD/line1");
        let req = sparkplug::decode(&body).unwrap();
        assert_eq!(req.metrics[0].name.as_deref(), Some(REBIRTH_NAME));
        let again = h.handle(
            "spBv1.0/plant/DDATA/line1/press",
            &data(10, 21.5),
            1_000_000,
        );
        assert!(
            again.publish.is_none(),
            "asked again within {REBIRTH_EVERY_US} µs"
        );
        let later = h.handle(
            "spBv1.0/plant/DDATA/line1/press",
            &data(11, 21.5),
            REBIRTH_EVERY_US,
        );
        assert!(later.publish.is_some());
        // The rebirth arrives: data is read again.
        births(&mut h);
        assert!(
            h.handle(
                "spBv1.0/plant/DDATA/line1/press",
                &data(2, 21.5),
                REBIRTH_EVERY_US + 1
            )
            .rejects
            .is_empty()
        );
    }

    #[test]
    fn a_seq_gap_is_not_guessed_at_until_the_rebirth() {
        let mut h = host();
        births(&mut h);
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(4, 21.5), 0);
        assert_eq!(out.rejects[0].reason, Reason::SeqGap);
        assert!(
            out.rejects[0].detail.contains("seq 4, expected 2"),
            "{}",
            out.rejects[0].detail
        );
        assert!(out.publish.is_some());
        // In order again, but the rebirth is awaited: still dead-lettered.
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(5, 21.5), 10);
        assert_eq!(out.rejects[0].reason, Reason::SeqGap);
        births(&mut h);
        assert!(
            h.handle("spBv1.0/plant/DDATA/line1/press", &data(2, 21.5), 20)
                .rejects
                .is_empty()
        );
    }

    #[test]
    fn an_alias_no_birth_assigned_is_refused() {
        let mut h = host();
        births(&mut h);
        let bad = payload(2, vec![metric(None, 99, 0, Value::Double(1.0))]);
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &bad, 0);
        assert_eq!(out.rejects[0].reason, Reason::UnknownAlias);
        assert!(
            out.rejects[0].detail.contains("alias 99"),
            "{}",
            out.rejects[0].detail
        );
        let out = h.handle("spBv1.0/plant/DDATA/line1/oven", &data(3, 1.0), 0);
        assert_eq!(
            out.rejects[0].reason,
            Reason::SeqGap,
            "awaiting the rebirth"
        );
    }

    #[test]
    fn death_marks_node_and_devices_offline_and_an_old_will_is_ignored() {
        let mut h = host();
        births(&mut h);
        let will = |bd: u64| {
            encode(&Payload {
                timestamp: Some(1_767_225_601_000),
                metrics: vec![Metric {
                    name: Some(BD_SEQ.into()),
                    datatype: Some(datatype::INT64),
                    value: Some(Value::Long(bd)),
                    ..Metric::default()
                }],
                ..Payload::default()
            })
        };
        let old = h.handle("spBv1.0/plant/NDEATH/line1", &will(2), 0);
        assert!(old.nothing && old.items.is_empty());
        let out = h.handle("spBv1.0/plant/NDEATH/line1", &will(3), 0);
        let got: Vec<(&str, f64, Option<&str>)> = out
            .items
            .iter()
            .map(|i| (i.device.as_str(), i.value, i.event))
            .collect();
        assert_eq!(
            got,
            [
                ("plant/line1", 0.0, Some("death")),
                ("plant/line1/press", 0.0, Some("death"))
            ]
        );
        // Dead: its data waits for a birth.
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(2, 1.0), 0);
        assert_eq!(out.rejects[0].reason, Reason::UnknownAlias);
        // DDEATH of one device.
        births(&mut h);
        let out = h.handle("spBv1.0/plant/DDEATH/line1/press", &payload(2, vec![]), 0);
        assert_eq!(
            (out.items[0].metric.as_str(), out.items[0].value),
            ("online", 0.0)
        );
    }

    #[test]
    fn without_rebirth_requests_a_gap_is_let_through() {
        let mut h = host();
        h.cfg.rebirth = false;
        births(&mut h);
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(9, 21.5), 0);
        assert!(
            out.rejects.is_empty() && out.publish.is_none(),
            "{:?}",
            out.rejects
        );
        assert_eq!(out.items.len(), 2);
        // An alias no birth gave is still not guessed at, and does not stall the node.
        let bad = payload(10, vec![metric(None, 99, 0, Value::Double(1.0))]);
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &bad, 0);
        assert_eq!(out.rejects[0].reason, Reason::UnknownAlias);
        assert!(out.publish.is_none());
        assert!(
            h.handle("spBv1.0/plant/DDATA/line1/press", &data(11, 1.0), 0)
                .rejects
                .is_empty()
        );
    }

    #[test]
    fn replaying_reads_data_with_the_names_known_now_and_changes_nothing() {
        let mut h = host();
        births(&mut h);
        h.set_replay(true);
        // An old seq, a death: read without checks; the death gives its reading but is of
        // the past (the device stays born), and an NBIRTH changes nothing.
        assert!(
            h.handle("spBv1.0/plant/DDATA/line1/press", &data(200, 5.0), 0)
                .rejects
                .is_empty()
        );
        let death = h.handle("spBv1.0/plant/DDEATH/line1/press", &payload(201, vec![]), 0);
        let got: Vec<(&str, f64, Option<u64>)> = death
            .items
            .iter()
            .map(|i| (i.metric.as_str(), i.value, i.ts_ms))
            .collect();
        assert_eq!(got, [("online", 0.0, Some(1_767_225_600_201))]);
        assert!(
            h.handle("spBv1.0/plant/NBIRTH/line1", &payload(0, vec![]), 0)
                .nothing
        );
        // A refused DBIRTH gives its readings, named by itself.
        let birth = h.handle(
            "spBv1.0/plant/DBIRTH/line1/pump",
            &payload(
                9,
                vec![metric(Some("flow"), 30, datatype::FLOAT, Value::Float(1.5))],
            ),
            0,
        );
        let got: Vec<(&str, &str, f64)> = birth
            .items
            .iter()
            .map(|i| (i.device.as_str(), i.metric.as_str(), i.value))
            .collect();
        assert_eq!(
            got,
            [
                ("plant/line1/pump", "online", 1.0),
                ("plant/line1/pump", "flow", 1.5)
            ]
        );
        h.set_replay(false);
        // The live sequence goes on from where it was, the device still born.
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(2, 6.0), 0);
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
    }

    #[test]
    fn births_after_refusals_mark_the_nodes_and_devices_messages_for_replay() {
        let mut h = host();
        let out = h.handle("spBv1.0/plant/DDATA/line1/press", &data(5, 1.0), 0);
        assert_eq!(out.rejects[0].reason, Reason::UnknownAlias);
        let mut born = host();
        births(&mut born);
        // The same births through the host that refused: the replay list grows.
        let nbirth = h.handle("spBv1.0/plant/NBIRTH/line1", &payload(0, vec![]), 1);
        assert_eq!(nbirth.replay, ["spBv1.0/plant/NDATA/line1"]);
        let dbirth = h.handle("spBv1.0/plant/DBIRTH/line1/press", &payload(1, vec![]), 2);
        assert_eq!(
            dbirth.replay,
            [
                "spBv1.0/plant/DDATA/line1/press",
                "spBv1.0/plant/DBIRTH/line1/press",
                "spBv1.0/plant/DDEATH/line1/press"
            ]
        );
        // A host that refused nothing replays nothing.
        let again = born.handle("spBv1.0/plant/NBIRTH/line1", &payload(0, vec![]), 3);
        assert!(again.replay.is_empty());
    }

    #[test]
    fn state_commands_and_bad_topics() {
        let mut h = host();
        assert!(
            h.handle("spBv1.0/STATE/scada", b"{\"online\": true}", 0)
                .nothing
        );
        assert!(
            h.handle(
                "spBv1.0/plant/NCMD/line1",
                &sparkplug::rebirth_request(0),
                0
            )
            .nothing
        );
        let out = h.handle("spBv1.0/plant/DDATA/line1", &data(1, 1.0), 0);
        assert_eq!(out.rejects[0].reason, Reason::NoTemplate);
        let out = h.handle("spBv1.0/plant/NDATA/line1", &[0xff, 0xff, 0xff], 0);
        assert_eq!(out.rejects[0].reason, Reason::Malformed);
    }
}
