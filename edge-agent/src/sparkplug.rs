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
//!   NBIRTH its messages are dead-lettered alike.
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
}

#[derive(Debug, Default)]
struct Node {
    /// Born since the agent started (or since the last NDEATH).
    born: bool,
    /// A seq gap or unknown alias was seen; waiting for the next NBIRTH.
    awaiting: bool,
    /// When the last rebirth was asked for.
    asked_us: Option<i64>,
    bd_seq: Option<u64>,
    seq: Option<u8>,
    aliases: HashMap<u64, (String, u32)>,
    devices: HashMap<String, Aliases>,
    last_heard_us: i64,
}

#[derive(Debug, Default)]
struct Aliases {
    born: bool,
    aliases: HashMap<u64, (String, u32)>,
}

/// The host state of every node heard from.
#[derive(Debug)]
pub struct Host {
    cfg: Config,
    nodes: HashMap<(String, String), Node>,
}

impl Host {
    /// A host with nothing heard yet.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            nodes: HashMap::new(),
        }
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
        if self.nodes.len() >= MAX_NODES && !self.nodes.contains_key(&key(&t)) {
            if let Some(oldest) = self
                .nodes
                .iter()
                .min_by_key(|(_, n)| n.last_heard_us)
                .map(|(k, _)| k.clone())
            {
                self.nodes.remove(&oldest);
            }
        }
        let node_id = render(&self.cfg.node, t.group, t.node, None);
        let device_id = t
            .device
            .map(|d| render(&self.cfg.device, t.group, t.node, Some(d)));
        let node = self.nodes.entry(key(&t)).or_default();
        node.last_heard_us = now_us;
        let where_ = || match t.device {
            Some(d) => format!("{}/{}/{d}", t.group, t.node),
            None => format!("{}/{}", t.group, t.node),
        };
        match t.kind {
            Kind::NBirth => {
                *node = Node {
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
                out.items.push(online(&node_id, p.timestamp, 0.0, "death"));
                let mut devices: Vec<&String> = node
                    .devices
                    .iter()
                    .filter(|(_, d)| d.born)
                    .map(|(k, _)| k)
                    .collect();
                devices.sort();
                for d in devices {
                    let id = render(&self.cfg.device, t.group, t.node, Some(d));
                    out.items.push(online(&id, p.timestamp, 0.0, "death"));
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
        let refuse = |node: &mut Node, out: &mut Output, reason: Reason, detail: String| {
            node.awaiting = true;
            reject(out, reason, detail);
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
        if node.awaiting {
            let detail = format!(
                "{} from node {} while its rebirth is awaited (after a seq gap or an unknown alias)",
                t.kind.as_str(),
                where_()
            );
            refuse(node, &mut out, Reason::SeqGap, detail);
            return out;
        }
        if let (Some(last), Some(seq)) = (node.seq, p.seq) {
            let want = last.wrapping_add(1);
            // The same seq again is a redelivery (or a retried commit): read again, and
            // the queue's dedupe drops what it already holds.
            if seq != u64::from(want) && seq != u64::from(last) {
                let detail = format!(
                    "{} from node {} has seq {seq}, expected {want}: messages were lost or reordered; asked for a rebirth",
                    t.kind.as_str(),
                    where_()
                );
                refuse(node, &mut out, Reason::SeqGap, detail);
                return out;
            }
        }
        node.seq = p.seq.map(|s| s as u8).or(node.seq);
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
