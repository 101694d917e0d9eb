//! Payload decoding: the bytes of one MQTT message or CoAP request to readings.
//!
//! Out of the box, with no configuration, it reads:
//! - a bare number (`21.5`, as JSON, text or CBOR), metric from the topic or path;
//! - the plant JSON shape `{"sensor_id", "measurement", "value", "unit", "ts"}`;
//! - a multi-metric object `{"ts", "seq", "temperature": 21.5, "humidity": 40.2}`;
//! - arrays of any of these, and the same shapes in CBOR.
//!
//! Timestamps may be epoch seconds (fractions allowed), milliseconds, microseconds or
//! nanoseconds (told apart by magnitude), or RFC 3339 text. A message without one is stamped
//! with its receive time, strictly increasing per device, so that two quick messages never
//! share an identity.
//!
//! Firmware differences are `[[firmware]]` field mappings chosen by device type and firmware
//! version, taken from the topic (`{device_type}`, `{firmware}`), the payload (`type`, `fw`)
//! or `[devices.<id>]`, in that order.
//!
//! Whatever cannot become a reading becomes a [`Reject`] with a [`Reason`] and a detail that
//! names the field or value; the good readings of the same message are kept.

use std::collections::{BTreeMap, HashMap};

use plantlink_model::{Reading, Tags, Timestamp};

use plantlink_schema::{Compiled, version_matches};

use crate::config::{Config, Device, Firmware};
use crate::devicebook::DeviceBook;
use crate::schemas::Registry;
use crate::sparkplug::Host;
use crate::topic::{MAX_NAME, Template};

/// Why (part of) a payload was refused. The names are the `reason` label of
/// `plantlink_edge_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Larger than `limits.max_payload_bytes`.
    Oversize,
    /// Not JSON, CBOR or a number.
    Malformed,
    /// A field of the wrong type, e.g. a text temperature.
    WrongType,
    /// The MQTT topic matched no template.
    NoTemplate,
    /// Neither the topic nor the payload names the device.
    NoDevice,
    /// Neither the topic nor the payload names the metric.
    NoMetric,
    /// The timestamp is unreadable or implausible.
    BadTimestamp,
    /// A content format other than JSON, CBOR or text.
    UnsupportedFormat,
    /// More tags (text fields, labels) on one reading than the uplink carries.
    TooManyTags,
    /// A tag key or value longer than the uplink carries.
    TooLong,
    /// A device that `[devices] allow` does not list.
    NotAllowed,
    /// A new device while the queue tracks `[devices] max` devices.
    DeviceCap,
    /// A new series of a device that has `[devices] max_series_per_device`.
    SeriesCap,
    /// Not JSON, CBOR or a number, from a device type and firmware that no schema (pushed
    /// from the registry or `[[firmware]]`) reads; `queue replay-dead-letters --reason
    /// no_schema` reads them again once one does.
    NoSchema,
    /// A Sparkplug B message the agent cannot read without its BIRTH: an alias no BIRTH
    /// assigned, or data from a node not born since the agent started.
    UnknownAlias,
    /// A Sparkplug B message whose `seq` does not follow the last, or one that came while
    /// the rebirth asked for after such a gap is awaited.
    SeqGap,
}

impl Reason {
    /// Every reason, for zeroing the counters at start.
    pub const ALL: [Reason; 16] = [
        Reason::Oversize,
        Reason::Malformed,
        Reason::WrongType,
        Reason::NoTemplate,
        Reason::NoDevice,
        Reason::NoMetric,
        Reason::BadTimestamp,
        Reason::UnsupportedFormat,
        Reason::TooManyTags,
        Reason::TooLong,
        Reason::NotAllowed,
        Reason::DeviceCap,
        Reason::SeriesCap,
        Reason::NoSchema,
        Reason::UnknownAlias,
        Reason::SeqGap,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Oversize => "oversize",
            Reason::Malformed => "malformed",
            Reason::WrongType => "wrong_type",
            Reason::NoTemplate => "no_template",
            Reason::NoDevice => "no_device",
            Reason::NoMetric => "no_metric",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::UnsupportedFormat => "unsupported_format",
            Reason::TooManyTags => "too_many_tags",
            Reason::TooLong => "too_long",
            Reason::NotAllowed => "not_allowed",
            Reason::DeviceCap => "device_cap",
            Reason::SeriesCap => "series_cap",
            Reason::NoSchema => "no_schema",
            Reason::UnknownAlias => "unknown_alias",
            Reason::SeqGap => "seq_gap",
        }
    }
}

/// One refused payload or field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// The kind of problem.
    pub reason: Reason,
    /// What exactly, naming the field or value.
    pub detail: String,
}

/// What one payload became.
#[derive(Debug, Default)]
pub struct Decoded {
    /// The readings.
    pub readings: Vec<Reading>,
    /// What was refused.
    pub rejects: Vec<Reject>,
    /// A message to publish on the plant broker: a Sparkplug B rebirth request.
    pub publish: Option<(String, Vec<u8>)>,
    /// Sparkplug B metrics skipped as not numbers, by data type.
    pub skipped: Vec<&'static str>,
    /// Topics whose Sparkplug B dead letters (`unknown_alias`, `seq_gap`) to replay, now
    /// that a BIRTH names their aliases.
    pub replay: Vec<String>,
}

impl Decoded {
    fn reject(&mut self, reason: Reason, detail: impl Into<String>) {
        self.rejects.push(Reject {
            reason,
            detail: detail.into(),
        });
    }
}

/// The encoding of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Detect: JSON or a text number if UTF-8, else CBOR.
    Auto,
    /// JSON (CoAP Content-Format 50).
    Json,
    /// CBOR (CoAP Content-Format 60).
    Cbor,
    /// A text number (CoAP Content-Format 0).
    Text,
    /// A CoAP Content-Format this agent does not read; refused with its number.
    Unsupported(u32),
    /// An MQTT message too large to hold, of this many bytes; only its first bytes are kept.
    TooLarge(usize),
}

/// Earliest plausible timestamp: 2000-01-01T00:00:00Z.
const MIN_TS_US: i64 = 946_684_800_000_000;
/// How far ahead of the gateway clock a device clock may be.
const MAX_AHEAD_US: i64 = 86_400_000_000;
/// Most readings one payload may carry.
const MAX_READINGS_PER_PAYLOAD: usize = 10_000;

/// Keys with a fixed meaning in objects.
const TS_KEYS: [&str; 3] = ["ts", "timestamp", "time"];
const DEVICE_KEYS: [&str; 3] = ["sensor_id", "device_id", "device"];
const FIRMWARE_KEYS: [&str; 3] = ["fw", "firmware", "fw_version"];
const TYPE_KEYS: [&str; 2] = ["device_type", "type"];
/// Text fields that become tags rather than errors.
const TAG_KEYS: [&str; 6] = ["unit", "site", "line", "location", "quality", "status"];

/// A parsed payload, whether it came as JSON or CBOR.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Other(&'static str),
    Arr(Vec<V>),
    Map(Vec<(String, V)>),
}

impl V {
    fn from_json(j: serde_json::Value) -> V {
        use serde_json::Value as J;
        match j {
            J::Null => V::Null,
            J::Bool(b) => V::Bool(b),
            J::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => V::Int(i.into()),
                (_, Some(u)) => V::Int(u.into()),
                _ => V::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => V::Str(s),
            J::Array(a) => V::Arr(a.into_iter().map(V::from_json).collect()),
            J::Object(o) => V::Map(o.into_iter().map(|(k, v)| (k, V::from_json(v))).collect()),
        }
    }

    fn from_cbor(c: ciborium::Value) -> V {
        use ciborium::Value as C;
        match c {
            C::Null => V::Null,
            C::Bool(b) => V::Bool(b),
            C::Integer(i) => V::Int(i.into()),
            C::Float(f) => V::Float(f),
            C::Text(s) => V::Str(s),
            C::Bytes(_) => V::Other("a byte string"),
            C::Array(a) => V::Arr(a.into_iter().map(V::from_cbor).collect()),
            C::Map(m) => V::Map(
                m.into_iter()
                    .map(|(k, v)| {
                        let key = match k {
                            C::Text(s) => s,
                            C::Integer(i) => i128::from(i).to_string(),
                            _ => String::from("?"),
                        };
                        (key, V::from_cbor(v))
                    })
                    .collect(),
            ),
            // Tag 1 (epoch time) and friends: the value inside is what counts.
            C::Tag(_, inner) => V::from_cbor(*inner),
            _ => V::Other("an unsupported CBOR item"),
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            V::Int(i) => Some(*i as f64),
            V::Float(f) => Some(*f),
            V::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            V::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            V::Null => "null",
            V::Bool(_) => "a boolean",
            V::Int(_) | V::Float(_) => "a number",
            V::Str(_) => "text",
            V::Other(k) => k,
            V::Arr(_) => "an array",
            V::Map(_) => "an object",
        }
    }

    fn text(&self) -> Option<String> {
        match self {
            V::Str(s) => Some(s.clone()),
            V::Int(i) => Some(i.to_string()),
            V::Float(f) => Some(f.to_string()),
            V::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// What the topic or path says about a message.
#[derive(Debug, Default, Clone)]
pub struct Context {
    /// The device, if the topic or path names it (as `[[mqtt.topics]] device` composes
    /// it, where set). It wins over a device named in the payload.
    pub device: Option<String>,
    /// The metric, if the topic or path names it.
    pub metric: Option<String>,
    /// The device type, if the topic names it.
    pub device_type: Option<String>,
    /// The firmware version, if the topic names it.
    pub firmware: Option<String>,
    /// Other captured topic segments.
    pub tags: Tags,
}

/// Decodes payloads for one agent. Holds the per-device receive stamps.
#[derive(Debug)]
pub struct Decoder {
    tenant: String,
    templates: Vec<Template>,
    devices: BTreeMap<String, Device>,
    firmware: Vec<Firmware>,
    max_payload: usize,
    last_stamp: HashMap<String, i64>,
    registry: Registry,
    sparkplug: Option<Host>,
    book: DeviceBook,
}

impl Decoder {
    /// A decoder for `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            tenant: config.gateway.tenant.clone(),
            templates: config.templates(),
            devices: config.devices.known.clone(),
            firmware: config.firmware.clone(),
            max_payload: config.limits.max_payload_bytes,
            last_stamp: HashMap::new(),
            registry: Registry::default(),
            sparkplug: config
                .mqtt
                .as_ref()
                .and_then(|m| m.sparkplug.clone())
                .map(Host::new),
            book: DeviceBook::default(),
        }
    }

    /// What to tell the cloud of the devices seen: at most `limit` of those `admitted`
    /// ([`DeviceBook::report`]); everything again after a `reset`.
    pub fn device_report(
        &mut self,
        reset: bool,
        limit: usize,
        admitted: impl Fn(&str) -> bool,
    ) -> Vec<plantlink_wire::frame::DeviceInfo> {
        if reset {
            self.book.reset();
        }
        let firmware = &self.firmware;
        self.book.report(
            limit,
            &self.registry,
            |t| firmware.iter().any(|f| f.device_type == t),
            admitted,
        )
    }

    /// Decodes with `registry` from now on (the schema set pushed from the cloud).
    pub fn set_registry(&mut self, registry: Registry) {
        self.registry = registry;
    }

    /// Replaying dead letters: Sparkplug B messages are read with the names known now, not
    /// checked against the sequence, and never ask for a rebirth.
    pub fn set_replay(&mut self, on: bool) {
        if let Some(h) = &mut self.sparkplug {
            h.set_replay(on);
        }
    }

    /// The Sparkplug B host state, to put back with [`Decoder::restore_sparkplug`] if the
    /// messages it read are not committed (a commit that is retried reads them again).
    pub fn sparkplug_state(&self) -> Option<Host> {
        self.sparkplug.clone()
    }

    /// Puts back a state from [`Decoder::sparkplug_state`].
    pub fn restore_sparkplug(&mut self, state: Option<Host>) {
        if state.is_some() {
            self.sparkplug = state;
        }
    }

    /// The schema set in force.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether `[[firmware]]` names this device type (and so shadows the registry for it).
    pub fn local_type(&self, device_type: &str) -> bool {
        self.firmware.iter().any(|f| f.device_type == device_type)
    }

    /// The context an MQTT topic gives, from the first template that matches.
    pub fn topic_context(&self, topic: &str) -> Option<Context> {
        self.topic_match(topic).map(|(_, ctx)| ctx)
    }

    /// The first template that matches `topic` (its index in `[[mqtt.topics]]`) and the
    /// context it gives.
    pub fn topic_match(&self, topic: &str) -> Option<(usize, Context)> {
        self.templates.iter().enumerate().find_map(|(i, t)| {
            let caps = t.captures(topic)?;
            let mut ctx = Context {
                device: t.device_id(&caps),
                ..Context::default()
            };
            for (name, value) in caps {
                let value = value.to_owned();
                match name {
                    // With `device = "..."` the capture is only part of the composed id.
                    "device" => ctx.device = ctx.device.or(Some(value)),
                    "metric" => ctx.metric = Some(value),
                    "device_type" => ctx.device_type = Some(value),
                    "firmware" => ctx.firmware = Some(value),
                    _ => {
                        ctx.tags.insert(name.to_owned(), value);
                    }
                }
            }
            Some((i, ctx))
        })
    }

    /// Decodes one MQTT message (its format detected from the bytes).
    pub fn decode_mqtt(&mut self, topic: &str, payload: &[u8], received_us: i64) -> Decoded {
        self.decode_topic(topic, Format::Auto, payload, received_us)
    }

    /// Decodes one MQTT message whose format the source already knows.
    pub fn decode_topic(
        &mut self,
        topic: &str,
        format: Format,
        payload: &[u8],
        received_us: i64,
    ) -> Decoded {
        if self.sparkplug.is_some() && topic.starts_with("spBv1.0/") {
            return self.sparkplug_message(topic, payload, received_us);
        }
        match self.topic_context(topic) {
            Some(ctx) => self.decode(&ctx, format, payload, received_us),
            None => {
                let mut d = Decoded::default();
                d.reject(
                    Reason::NoTemplate,
                    format!("topic {topic:?} matches no [[mqtt.topics]] template"),
                );
                d
            }
        }
    }

    /// Decodes one payload in a known context.
    pub fn decode(
        &mut self,
        ctx: &Context,
        format: Format,
        payload: &[u8],
        received_us: i64,
    ) -> Decoded {
        let mut out = Decoded::default();
        if payload.len() > self.max_payload {
            out.reject(
                Reason::Oversize,
                format!(
                    "payload of {} bytes is over limits.max_payload_bytes = {}",
                    payload.len(),
                    self.max_payload
                ),
            );
            return out;
        }
        if let Format::TooLarge(n) = format {
            out.reject(
                Reason::Oversize,
                format!(
                    "message of {n} bytes is over limits.max_payload_bytes = {}",
                    self.max_payload
                ),
            );
            return out;
        }
        if let Format::Unsupported(cf) = format {
            out.reject(
                Reason::UnsupportedFormat,
                format!(
                    "Content-Format {cf} is not supported; send 50 (JSON), 60 (CBOR) or 0 (text)"
                ),
            );
            return out;
        }
        let known = ctx.device.as_deref().and_then(|d| self.devices.get(d));
        let dtype = ctx
            .device_type
            .clone()
            .or(known.map(|d| d.device_type.clone()));
        let fw = ctx.firmware.clone().or(known.map(|d| d.firmware.clone()));
        if let (Some(t), Some(v)) = (&dtype, &fw)
            && !self.local_type(t)
            && let Some((label, schema)) = self.registry.protobuf(t, v)
            && let Some(pb) = crate::schemas::as_protobuf(&schema)
        {
            self.protobuf(pb, &label, ctx, payload, received_us, &mut out);
            if let Some(r) = out.readings.first() {
                self.book.note(&r.device, t, v, true);
            }
            return self.finish(out);
        }
        let value = match parse(format, payload) {
            Ok(v) => v,
            Err(detail) => {
                let text = std::str::from_utf8(payload).is_ok();
                if let (Some(d), Some(t), Some(v)) = (&ctx.device, &dtype, &fw)
                    && !text
                {
                    // Reported without a schema: the registry shows which devices wait for one.
                    self.book.note(d, t, v, false);
                }
                match &dtype {
                    Some(t) if !text && format != Format::Text => out.reject(
                        Reason::NoSchema,
                        format!(
                            "{detail}; no schema reads device type {t:?} firmware {:?} (registry set {}): \
                             register a protobuf schema (POST /v1/payload-schemas), then \
                             `edge-agent queue replay-dead-letters --reason no_schema`",
                            fw.as_deref().unwrap_or("?"),
                            self.registry.version
                        ),
                    ),
                    _ => out.reject(Reason::Malformed, detail),
                }
                return out;
            }
        };
        self.interpret(value, ctx, received_us, &mut out, 0);
        self.finish(out)
    }

    /// The checks every decoded payload passes.
    fn finish(&self, mut out: Decoded) -> Decoded {
        within_wire_limits(&mut out);
        if out.readings.len() > MAX_READINGS_PER_PAYLOAD {
            out.readings.clear();
            out.reject(
                Reason::Oversize,
                format!("payload holds over {MAX_READINGS_PER_PAYLOAD} readings"),
            );
        }
        if out.readings.is_empty() && out.rejects.is_empty() {
            out.reject(Reason::NoMetric, "payload holds no values");
        }
        out
    }

    /// Receive time for a message of `device`: never earlier than, nor equal to, the last.
    fn stamp(&mut self, device: &str, received_us: i64) -> Timestamp {
        if self.last_stamp.len() > 100_000 {
            // Entries older than now can no longer collide; keep the map small.
            self.last_stamp.retain(|_, &mut t| t >= received_us);
        }
        let last = self.last_stamp.entry(device.to_owned()).or_insert(i64::MIN);
        let t = received_us.max(last.saturating_add(1));
        *last = t;
        Timestamp(t)
    }

    fn interpret(&mut self, v: V, ctx: &Context, received_us: i64, out: &mut Decoded, depth: u8) {
        match v {
            V::Arr(items) if depth == 0 => {
                for item in items {
                    self.interpret(item, ctx, received_us, out, depth + 1);
                }
            }
            V::Map(fields) => self.object(fields, ctx, received_us, out),
            V::Arr(_) => out.reject(Reason::WrongType, "arrays nested in arrays are not read"),
            scalar => {
                let Some(device) = check_name(ctx.device.as_deref(), Reason::NoDevice, out) else {
                    return;
                };
                let Some(metric) = check_name(ctx.metric.as_deref(), Reason::NoMetric, out) else {
                    return;
                };
                let Some(value) = scalar.number() else {
                    out.reject(
                        Reason::WrongType,
                        format!("value for {metric:?} is {}, not a number", scalar.kind()),
                    );
                    return;
                };
                self.note(&device, ctx.device_type.as_deref(), ctx.firmware.as_deref());
                let ts = self.stamp(&device, received_us);
                out.readings.push(self.reading(
                    &device,
                    &metric,
                    ts,
                    value,
                    ctx.tags.clone(),
                    None,
                ));
            }
        }
    }

    fn reading(
        &self,
        device: &str,
        metric: &str,
        ts: Timestamp,
        value: f64,
        tags: Tags,
        seq: Option<u64>,
    ) -> Reading {
        Reading {
            tenant: self.tenant.clone(),
            device: device.to_owned(),
            metric: metric.to_owned(),
            ts,
            value,
            tags,
            seq,
        }
    }

    /// Notes the device's type and firmware (`[devices.<id>]` fills what the message left
    /// out) in the book reported to the cloud.
    fn note(&mut self, device: &str, dtype: Option<&str>, fw: Option<&str>) {
        if let (Some(t), Some(f)) = (dtype, fw) {
            self.book.note(device, t, f, true);
            return;
        }
        let known = self.devices.get(device);
        if let (Some(t), Some(f)) = (
            dtype.or(known.map(|d| d.device_type.as_str())),
            fw.or(known.map(|d| d.firmware.as_str())),
        ) {
            self.book.note(device, t, f, true);
        }
    }

    /// The field renames and ignores for a device: `[[firmware]]` where it names the device
    /// type, else the registry's mapping.
    fn mapping(
        &self,
        device: &str,
        dtype: Option<&str>,
        fw: Option<&str>,
    ) -> Option<(&BTreeMap<String, String>, &[String])> {
        let known = self.devices.get(device);
        let dtype = dtype.or(known.map(|d| d.device_type.as_str()))?;
        let fw = fw.or(known.map(|d| d.firmware.as_str()))?;
        if self.local_type(dtype) {
            return self
                .firmware
                .iter()
                .find(|f| f.device_type == dtype && version_matches(&f.version, fw))
                .map(|f: &Firmware| (&f.fields, f.ignore.as_slice()));
        }
        match self.registry.find(dtype, fw).map(|(_, c)| &**c) {
            Some(Compiled::Mapping(m)) => Some((&m.fields, m.ignore.as_slice())),
            _ => None,
        }
    }

    /// A protobuf payload read with a registry schema.
    fn protobuf(
        &mut self,
        pb: &plantlink_schema::Protobuf,
        label: &str,
        ctx: &Context,
        payload: &[u8],
        received_us: i64,
        out: &mut Decoded,
    ) {
        use plantlink_schema::protobuf::DecodeError;
        let rec = match pb.decode(payload) {
            Ok(r) => r,
            Err(e) => {
                let reason = match e {
                    DecodeError::WrongType { .. } => Reason::WrongType,
                    DecodeError::Missing { .. } | DecodeError::Malformed { .. } => {
                        Reason::Malformed
                    }
                };
                out.reject(reason, format!("{e} (schema {label})"));
                return;
            }
        };
        let device = ctx.device.clone().or(rec.device);
        let Some(device) = check_name(device.as_deref(), Reason::NoDevice, out) else {
            return;
        };
        let ts = match &rec.timestamp {
            None => self.stamp(&device, received_us),
            Some(t) => {
                let v = match t {
                    plantlink_schema::Scalar::Int(i) => V::Int(*i),
                    plantlink_schema::Scalar::Float(f) => V::Float(*f),
                    plantlink_schema::Scalar::Text(s) => V::Str(s.clone()),
                };
                match parse_ts(&v, received_us) {
                    Ok(t) => t,
                    Err(detail) => {
                        out.reject(Reason::BadTimestamp, format!("{detail} (schema {label})"));
                        return;
                    }
                }
            }
        };
        for (field, what) in rec.bad_metrics {
            out.reject(
                Reason::WrongType,
                format!("field {field:?} {what} (schema {label})"),
            );
        }
        for (metric, value) in rec.metrics {
            if let Some(metric) = check_name(Some(&metric), Reason::NoMetric, out) {
                let r = self.reading(&device, &metric, ts, value, ctx.tags.clone(), rec.sequence);
                out.readings.push(r);
            }
        }
    }

    /// A message of the Sparkplug B namespace.
    fn sparkplug_message(&mut self, topic: &str, payload: &[u8], received_us: i64) -> Decoded {
        let mut out = Decoded::default();
        if payload.len() > self.max_payload {
            out.reject(
                Reason::Oversize,
                format!(
                    "payload of {} bytes is over limits.max_payload_bytes = {}",
                    payload.len(),
                    self.max_payload
                ),
            );
            return out;
        }
        let Some(host) = self.sparkplug.as_mut() else {
            return out;
        };
        let got = host.handle(topic, payload, received_us);
        out.rejects = got.rejects;
        out.publish = got.publish;
        out.skipped = got.skipped;
        out.replay = got.replay;
        for item in got.items {
            let Some(device) = check_name(Some(&item.device), Reason::NoDevice, &mut out) else {
                continue;
            };
            let Some(metric) = check_name(Some(&item.metric), Reason::NoMetric, &mut out) else {
                continue;
            };
            let ts = match item.ts_ms {
                Some(ms) => match parse_ts(&V::Int(i128::from(ms) * 1_000), received_us) {
                    Ok(t) => t,
                    Err(detail) => {
                        out.reject(Reason::BadTimestamp, format!("{device} {metric}: {detail}"));
                        continue;
                    }
                },
                None => self.stamp(&device, received_us),
            };
            let mut tags = Tags::new();
            if let Some(e) = item.event {
                tags.insert("event".to_owned(), e.to_owned());
            }
            let r = self.reading(&device, &metric, ts, item.value, tags, None);
            out.readings.push(r);
        }
        within_wire_limits(&mut out);
        out
    }

    fn object(
        &mut self,
        fields: Vec<(String, V)>,
        ctx: &Context,
        received_us: i64,
        out: &mut Decoded,
    ) {
        let mut ts = None;
        let mut seq = None;
        let mut device = ctx.device.clone();
        let mut dtype = ctx.device_type.clone();
        let mut fw = ctx.firmware.clone();
        let mut measurement = None;
        let mut value = None;
        let mut tags = ctx.tags.clone();
        let mut rest = Vec::new();
        for (k, v) in fields {
            let key = k.as_str();
            if TS_KEYS.contains(&key) {
                ts = Some(v);
            } else if key == "seq" {
                seq = Some(v);
            } else if DEVICE_KEYS.contains(&key) {
                if device.is_none() {
                    device = v.text();
                }
            } else if FIRMWARE_KEYS.contains(&key) {
                fw = fw.or(v.text());
            } else if TYPE_KEYS.contains(&key) {
                dtype = dtype.or(v.text());
            } else if key == "measurement" || key == "metric" {
                measurement = Some(v);
            } else if key == "value" {
                value = Some(v);
            } else if TAG_KEYS.contains(&key) {
                if let Some(t) = v.text() {
                    tags.insert(k, t);
                }
            } else {
                rest.push((k, v));
            }
        }
        let Some(device) = check_name(device.as_deref(), Reason::NoDevice, out) else {
            return;
        };
        let seq = match seq {
            None | Some(V::Null) => None,
            Some(V::Int(i)) if (0..=u64::MAX as i128).contains(&i) => Some(i as u64),
            Some(other) => {
                out.reject(
                    Reason::WrongType,
                    format!("seq is {}, not a whole number >= 0", other.kind()),
                );
                return;
            }
        };
        let ts = match ts {
            None | Some(V::Null) => self.stamp(&device, received_us),
            Some(v) => match parse_ts(&v, received_us) {
                Ok(t) => t,
                Err(detail) => {
                    out.reject(Reason::BadTimestamp, detail);
                    return;
                }
            },
        };
        self.note(&device, dtype.as_deref(), fw.as_deref());
        let mapping = self.mapping(&device, dtype.as_deref(), fw.as_deref());
        let rename = |name: &str| -> String {
            mapping
                .and_then(|m| m.0.get(name))
                .cloned()
                .unwrap_or_else(|| name.to_owned())
        };

        if let Some(v) = value {
            // The plant shape: one value, its metric named by `measurement` or the topic.
            let metric = match measurement {
                Some(m) => m.text(),
                None => ctx.metric.clone(),
            }
            .map(|m| rename(&m));
            let Some(metric) = check_name(metric.as_deref(), Reason::NoMetric, out) else {
                return;
            };
            let Some(x) = v.number() else {
                out.reject(
                    Reason::WrongType,
                    format!("value of {metric:?} is {}, not a number", v.kind()),
                );
                return;
            };
            // Extra text fields are labels; extra numbers are readings of their own (as tags
            // they would make a new series for every value).
            let mut extra = Vec::new();
            for (k, v) in rest {
                match v {
                    V::Str(t) => {
                        tags.insert(k, t);
                    }
                    V::Int(_) | V::Float(_) | V::Bool(_) => {
                        if let Some(x) = v.number() {
                            extra.push((rename(&k), x));
                        }
                    }
                    _ => {}
                }
            }
            for (name, x) in extra {
                if let Some(name) = check_name(Some(&name), Reason::NoMetric, out) {
                    let r = self.reading(&device, &name, ts, x, tags.clone(), seq);
                    out.readings.push(r);
                }
            }
            let r = self.reading(&device, &metric, ts, x, tags, seq);
            out.readings.push(r);
            return;
        }

        // Multi-metric: every other field is a metric.
        let ignored = |k: &str| mapping.is_some_and(|m| m.1.iter().any(|i| i == k));
        let mut readings = Vec::new();
        for (k, v) in rest {
            if ignored(&k) || v == V::Null {
                continue;
            }
            let metric = rename(&k);
            match (&v, v.number()) {
                (V::Map(_) | V::Arr(_) | V::Other(_), _) | (_, None) => out.reject(
                    Reason::WrongType,
                    format!("field {k:?} is {}, not a number", v.kind()),
                ),
                (_, Some(x)) => {
                    if let Some(metric) = check_name(Some(&metric), Reason::NoMetric, out) {
                        readings.push(self.reading(&device, &metric, ts, x, tags.clone(), seq));
                    }
                }
            }
        }
        if readings.is_empty() && out.rejects.is_empty() {
            out.reject(
                Reason::NoMetric,
                format!("object from {device:?} has no metric fields"),
            );
        }
        out.readings.extend(readings);
    }
}

/// Refuses the readings that the uplink could not carry: the cloud decodes a batch with
/// [`plantlink_wire::batch::Limits`], and a reading over them would get its whole batch
/// refused. One reject per reason, naming the first such reading and how many there were.
fn within_wire_limits(out: &mut Decoded) {
    let limits = plantlink_wire::batch::Limits::default();
    let mut first: Vec<(Reason, String, usize)> = Vec::new();
    out.readings.retain(|r| {
        let problem = if r.tags.len() > limits.max_tags {
            Some((
                Reason::TooManyTags,
                format!(
                    "{} {} has {} tags (text fields and labels); the uplink carries at most {}: \
                     send fewer text fields, or publish them on a topic of their own",
                    r.device,
                    r.metric,
                    r.tags.len(),
                    limits.max_tags
                ),
            ))
        } else {
            r.tags
                .iter()
                .find(|(k, v)| k.len() > limits.max_string_len || v.len() > limits.max_string_len)
                .map(|(k, v)| {
                    (
                        Reason::TooLong,
                        format!(
                            "field {:?} of {} {} is {} bytes long; the uplink carries text of at most {} bytes",
                            preview(k.as_bytes()),
                            r.device,
                            r.metric,
                            k.len().max(v.len()),
                            limits.max_string_len
                        ),
                    )
                })
        };
        let Some((reason, detail)) = problem else {
            return true;
        };
        match first.iter_mut().find(|(r, _, _)| *r == reason) {
            Some(entry) => entry.2 += 1,
            None => first.push((reason, detail, 1)),
        }
        false
    });
    for (reason, detail, n) in first {
        let detail = if n > 1 {
            format!("{detail} (and {} more readings of this message)", n - 1)
        } else {
            detail
        };
        out.reject(reason, detail);
    }
}

/// A device id or metric name that is present and sane.
fn check_name(name: Option<&str>, missing: Reason, out: &mut Decoded) -> Option<String> {
    let what = if missing == Reason::NoDevice {
        "device"
    } else {
        "metric"
    };
    match name {
        None => {
            out.reject(
                missing,
                format!("no {what}: name it in the topic template or the payload"),
            );
            None
        }
        Some(n) => match name_problem(what, n) {
            Some(detail) => {
                out.reject(Reason::WrongType, detail);
                None
            }
            None => Some(n.to_owned()),
        },
    }
}

/// What is wrong with `name` as a device id or metric name (`what`), if anything.
pub fn name_problem(what: &str, name: &str) -> Option<String> {
    (name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control))
        .then(|| format!("{what} name {name:?} must be 1 to {MAX_NAME} printable characters"))
}

fn parse(format: Format, payload: &[u8]) -> Result<V, String> {
    let json = |p: &[u8]| -> Result<V, String> {
        serde_json::from_slice::<serde_json::Value>(p)
            .map(V::from_json)
            .map_err(|e| format!("not valid JSON: {e}"))
    };
    let cbor = |p: &[u8]| -> Result<V, String> {
        let mut rest = p;
        let v = ciborium::de::from_reader::<ciborium::Value, _>(&mut rest)
            .map(V::from_cbor)
            .map_err(|e| format!("not valid CBOR: {e}"))?;
        // One item and nothing after it: binary payloads of other encodings (protobuf) often
        // start with bytes that are a CBOR item of their own.
        if rest.is_empty() {
            Ok(v)
        } else {
            Err(format!(
                "not valid CBOR: {} bytes after the first item",
                rest.len()
            ))
        }
    };
    let text = |p: &[u8]| -> Result<V, String> {
        std::str::from_utf8(p)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(V::Float)
            .ok_or_else(|| "not a number".to_owned())
    };
    match format {
        Format::Json => json(payload),
        Format::Cbor => cbor(payload),
        Format::Text => text(payload),
        Format::Unsupported(cf) => Err(format!("Content-Format {cf} is not supported")),
        Format::TooLarge(n) => Err(format!("message of {n} bytes is too large")),
        Format::Auto => {
            if payload.is_empty() {
                return Err("payload is empty".into());
            }
            match std::str::from_utf8(payload) {
                Ok(s) => {
                    let t = s.trim_start();
                    if t.starts_with(['{', '[', '"']) {
                        json(payload)
                    } else {
                        json(payload)
                            .or_else(|_| text(payload))
                            .or_else(|_| cbor(payload))
                            .map_err(|_| {
                                format!("not JSON, CBOR or a number: {:?}", preview(payload))
                            })
                    }
                }
                Err(_) => cbor(payload),
            }
        }
    }
}

/// A short, printable preview of raw bytes for error messages.
pub fn preview(payload: &[u8]) -> String {
    let s = String::from_utf8_lossy(&payload[..payload.len().min(48)]).into_owned();
    if payload.len() > 48 { s + "…" } else { s }
}

/// Epoch seconds, ms, µs or ns (by magnitude), or RFC 3339 text, to a checked timestamp.
fn parse_ts(v: &V, received_us: i64) -> Result<Timestamp, String> {
    let us: i128 = match v {
        V::Int(i) => scale_epoch_int(*i),
        V::Float(f) if f.is_finite() => scale_epoch_float(*f),
        V::Float(f) => return Err(format!("timestamp {f} is not a finite number")),
        V::Str(s) => {
            match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
                Ok(t) => t.unix_timestamp_nanos() / 1_000,
                Err(_) => match s.trim().parse::<i64>() {
                    Ok(i) => scale_epoch_int(i.into()),
                    Err(_) => {
                        return Err(format!(
                            "timestamp {s:?} is neither RFC 3339 (2026-01-01T00:00:00Z) nor an epoch number"
                        ));
                    }
                },
            }
        }
        other => {
            return Err(format!(
                "timestamp is {}, not a number or RFC 3339 text",
                other.kind()
            ));
        }
    };
    if us < MIN_TS_US as i128 {
        return Err(format!(
            "timestamp {us} µs is before 2000-01-01; is the device clock set?"
        ));
    }
    if us > (received_us as i128).saturating_add(MAX_AHEAD_US as i128) {
        return Err(format!(
            "timestamp {us} µs is more than a day ahead of the gateway clock"
        ));
    }
    Ok(Timestamp(us as i64))
}

fn scale_epoch_int(i: i128) -> i128 {
    match i.unsigned_abs() {
        n if n < 100_000_000_000 => i * 1_000_000,
        n if n < 100_000_000_000_000 => i * 1_000,
        n if n < 100_000_000_000_000_000 => i,
        _ => i / 1_000,
    }
}

fn scale_epoch_float(f: f64) -> i128 {
    let a = f.abs();
    let us = if a < 1e11 {
        f * 1e6
    } else if a < 1e14 {
        f * 1e3
    } else if a < 1e17 {
        f
    } else {
        f / 1e3
    };
    us.round() as i128
}

#[cfg(test)]
mod tests;
