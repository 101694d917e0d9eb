//! The agent's TOML configuration. Every key is documented here; `deploy/edge-agent.example.toml`
//! is the commented example, and a test loads it.
//!
//! Unknown keys are errors: a typo must fail at start, not silently fall back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::topic::Template;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this gateway is.
    pub gateway: Gateway,
    /// The durable queue.
    #[serde(default)]
    pub store: Store,
    /// MQTT ingest from the plant's broker; absent means no MQTT.
    pub mqtt: Option<Mqtt>,
    /// CoAP ingest; absent means no CoAP.
    pub coap: Option<Coap>,
    /// Rate limits and payload caps.
    #[serde(default)]
    pub limits: Limits,
    /// Duplicate detection.
    #[serde(default)]
    pub dedupe: Dedupe,
    /// The Prometheus endpoint; absent means no endpoint.
    pub metrics: Option<Metrics>,
    /// Which devices may send, how many the queue tracks, and what is known of them.
    #[serde(default)]
    pub devices: Devices,
    /// Field mappings per device type and firmware version.
    #[serde(default)]
    pub firmware: Vec<Firmware>,
    /// The uplink to cloud-ingest; absent means collect and store only.
    pub uplink: Option<Uplink>,
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// cloud-ingest's address, `host:port`.
    pub server: String,
    /// The name in the server's certificate (`cloud-ingest pki server --dns`).
    pub server_name: String,
    /// The fleet CA certificate.
    pub ca: PathBuf,
    /// This gateway's certificate (`cloud-ingest pki gateway`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// Most readings in one batch.
    #[serde(default = "default_batch_max")]
    pub batch_max_readings: usize,
    /// Longest a live reading waits for a fuller batch, in milliseconds.
    #[serde(default = "default_linger")]
    pub batch_linger_ms: u64,
    /// Most unacknowledged batches.
    #[serde(default = "default_uplink_in_flight")]
    pub max_in_flight: usize,
    /// Most backlog readings per second while draining after an outage.
    #[serde(default = "default_backlog_rate")]
    pub backlog_rate: f64,
}

fn default_batch_max() -> usize {
    10_000
}
fn default_linger() -> u64 {
    500
}
fn default_uplink_in_flight() -> usize {
    8
}
fn default_backlog_rate() -> f64 {
    50_000.0
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// The gateway id; it must match the id in the gateway's certificate.
    pub id: String,
    /// The tenant recorded on readings at the edge. The cloud replaces it with the tenant
    /// from the certificate, so this only matters for local inspection.
    #[serde(default = "default_tenant")]
    pub tenant: String,
}

fn default_tenant() -> String {
    "default".into()
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// The SQLite queue file. Its folder must exist and be writable.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// The most the queue may hold, as bytes ("1GiB", "500MB", or a number). When full, the
    /// oldest readings of the device furthest over its fair share are evicted, and counted.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// `full` (default): each commit reaches the disk before devices are acknowledged,
    /// surviving power loss. `normal`: faster; survives a crash of the agent, but the last
    /// commits may be lost on power loss.
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Longest wait, in milliseconds, before a commit while readings are arriving. A commit
    /// happens as soon as the queue of received messages is empty, so this only bounds
    /// latency under sustained load.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How many dead-letter records to keep; older ones are dropped first.
    #[serde(default = "default_dead_letters_keep")]
    pub dead_letters_keep: u64,
}

fn default_store_path() -> PathBuf {
    "/var/lib/plantlink/queue.db".into()
}
fn default_max_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_commit_interval_ms() -> u64 {
    5
}
fn default_dead_letters_keep() -> u64 {
    10_000
}

impl Default for Store {
    fn default() -> Self {
        Self {
            path: default_store_path(),
            max_bytes: default_max_bytes(),
            synchronous: Synchronous::default(),
            commit_interval_ms: default_commit_interval_ms(),
            dead_letters_keep: default_dead_letters_keep(),
        }
    }
}

/// SQLite's `synchronous` setting for the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit.
    #[default]
    Full,
    /// fsync at WAL checkpoints only.
    Normal,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// The plant broker, `mqtt://host:port` (port 1883 when omitted).
    pub url: String,
    /// The client id. With a persistent session the broker keeps what arrives while the
    /// agent is down under this id, so keep it stable per gateway.
    pub client_id: String,
    /// Topic filters to subscribe to, at QoS 1.
    pub subscriptions: Vec<String>,
    /// Topic templates, tried in order; the first that matches names device, metric and tags.
    #[serde(default)]
    pub topics: Vec<TopicTemplate>,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password.
    pub password: Option<String>,
    /// MQTT keep-alive in seconds (5 to 65535).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Sparkplug B: read the `spBv1.0` namespace as a host application.
    pub sparkplug: Option<Sparkplug>,
}

/// `[mqtt.sparkplug]`: Sparkplug B edge nodes on the plant broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sparkplug {
    /// The Sparkplug groups to read (`spBv1.0/<group>/#` is subscribed for each); `["+"]`
    /// reads every group.
    pub groups: Vec<String>,
    /// The device id of a node's own metrics: `{group}` and `{node}` placeholders.
    #[serde(default = "default_spb_node")]
    pub node: String,
    /// The device id of a device's metrics: `{group}`, `{node}` and `{device}`.
    #[serde(default = "default_spb_device")]
    pub device: String,
    /// Ask a node for a rebirth (NCMD `Node Control/Rebirth`) when its data cannot be read
    /// without one.
    #[serde(default = "yes")]
    pub rebirth: bool,
}

fn default_spb_node() -> String {
    "{group}/{node}".into()
}

fn default_spb_device() -> String {
    "{group}/{node}/{device}".into()
}

fn yes() -> bool {
    true
}

impl Sparkplug {
    /// The topic filters to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        self.groups
            .iter()
            .map(|g| format!("{}/{g}/#", plantlink_schema::sparkplug::NAMESPACE))
            .collect()
    }
}

impl Mqtt {
    /// Every filter subscribed: `subscriptions` and the Sparkplug groups'.
    pub fn filters(&self) -> Vec<String> {
        let mut f = self.subscriptions.clone();
        for s in self.sparkplug.iter().flat_map(Sparkplug::filters) {
            if !f.contains(&s) {
                f.push(s);
            }
        }
        f
    }
}

fn default_keep_alive() -> u64 {
    30
}

/// `[[mqtt.topics]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicTemplate {
    /// Like `plant/{site}/{line}/{device}/{metric}`. `{device}` and `{metric}` name the
    /// reading, `{device_type}` and `{firmware}` pick a firmware mapping, and any other
    /// `{name}` becomes a tag. Without `{metric}`, metric names come from the payload;
    /// without `{device}` (and without `device`), so does the device.
    pub template: String,
    /// The device id composed from the template's captures, e.g. `"{line}-{device}"`:
    /// `{name}` placeholders with text between them. Without it the `{device}` capture
    /// alone is the id. Use it where device names are unique per line but not across the
    /// plant: a reading's identity is (tenant, device, metric, ts), so two devices sharing
    /// a name collide whenever they stamp the same instant. If the template captures
    /// `{device}`, the format must use it; if not, any captures may compose the id (e.g.
    /// `"{site}-{line}-{unit}"`). Either way the topic names the device, so a device named
    /// in the payload is ignored, and the captures still become tags. `[devices.<id>]` and
    /// the per-device rate limit see the composed id.
    pub device: Option<String>,
}

impl TopicTemplate {
    /// Compiles the entry; an error names the failing key (`template` or `device`).
    pub fn compile(&self) -> Result<Template, (&'static str, String)> {
        let t = Template::parse(&self.template).map_err(|e| ("template", e))?;
        match &self.device {
            Some(d) => t.with_device(d).map_err(|e| ("device", e)),
            None => Ok(t),
        }
    }
}

/// `[coap]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coap {
    /// UDP address to listen on, e.g. `0.0.0.0:5683`.
    pub bind: SocketAddr,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Sustained readings per second allowed per device; the excess is dropped and counted.
    #[serde(default = "default_rate")]
    pub per_device_per_sec: f64,
    /// Readings a device may send in a burst above its rate.
    #[serde(default = "default_burst")]
    pub burst: f64,
    /// Largest payload accepted; larger ones become dead letters.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
}

fn default_rate() -> f64 {
    100.0
}
fn default_burst() -> f64 {
    200.0
}
fn default_max_payload() -> usize {
    65_536
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_device_per_sec: default_rate(),
            burst: default_burst(),
            max_payload_bytes: default_max_payload(),
        }
    }
}

/// `[dedupe]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dedupe {
    /// A replay of a reading stored less than this many seconds ago is dropped: the same
    /// identity (tenant, device, metric, ts) with the same value and tags, whatever its
    /// `seq`. The same identity with another value or other tags is a conflict, which is
    /// stored and shipped for the cloud to report. Remembered on disk, so this holds across
    /// restarts.
    #[serde(default = "default_window")]
    pub window_secs: u64,
}

fn default_window() -> u64 {
    600
}

impl Default for Dedupe {
    fn default() -> Self {
        Self {
            window_secs: default_window(),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address of the Prometheus `/metrics` endpoint and of the gateway's status page (`/`,
    /// and `/status.json`), e.g. `127.0.0.1:9310`; bind it to the plant LAN's address for
    /// the technicians. Both are read-only.
    pub bind: SocketAddr,
}

/// `[devices]`: `allow` and `max`, then one `[devices.<id>]` table per known device.
#[derive(Debug, Clone, Deserialize)]
pub struct Devices {
    /// Device id patterns that may send (`*` matches any run of characters, e.g.
    /// `"press*"`, `"l3-*"`). Empty (the default) allows every device. Readings of other
    /// devices become dead letters with reason `not_allowed`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Most devices the queue tracks at once (default 10000). A device not yet known when
    /// that many are is refused (dead letter `device_cap`) until idle ones are pruned;
    /// devices already known never are.
    #[serde(default = "default_max_devices")]
    pub max: usize,
    /// Most series (metric and tag values) one device may have: those with readings queued
    /// or stored in the last 10 minutes (idle ones are pruned after that; default 1000). A reading that would start another is refused (dead letter `series_cap`):
    /// invented metric names or tag values cannot grow the queue's rows without bound.
    #[serde(default = "default_max_series")]
    pub max_series_per_device: usize,
    /// `[devices.<id>]`: the device's type and firmware version, used to pick a
    /// `[[firmware]]` mapping when neither the topic nor the payload says. The id is as
    /// composed by `[[mqtt.topics]] device`, where set.
    #[serde(flatten)]
    pub known: BTreeMap<String, Device>,
}

fn default_max_devices() -> usize {
    10_000
}

fn default_max_series() -> usize {
    1_000
}

impl Default for Devices {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            max: default_max_devices(),
            max_series_per_device: default_max_series(),
            known: BTreeMap::new(),
        }
    }
}

impl Devices {
    /// Whether `device` matches the allow list (always, when the list is empty).
    pub fn allowed(&self, device: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|p| glob(p, device))
    }
}

/// `*`-only glob matching: `*` matches any run of characters, everything else itself.
fn glob(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: exact
    };
    for m in middle {
        match rest.find(m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// `[devices.<id>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The device type, e.g. `th-100`.
    #[serde(rename = "type")]
    pub device_type: String,
    /// The firmware version, e.g. `2.1.0`.
    pub firmware: String,
}

/// `[[firmware]]`: how one device type and firmware range names its fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    /// The device type this applies to.
    pub device_type: String,
    /// Firmware versions: exact (`2.1.0`), or a prefix ending in `x` or `*` (`1.x`, `2.*`).
    pub version: String,
    /// Payload field name to metric name, e.g. `{ t = "temperature" }`.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Payload fields to ignore (neither metrics nor errors).
    #[serde(default)]
    pub ignore: Vec<String>,
}

/// A size in bytes, written as a number or with a unit: B, KB, MB, GB (powers of 1000),
/// KiB, MiB, GiB (powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("{s:?} is not a size; write e.g. \"1GiB\", \"500MB\" or 1048576")
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?}; use B, KB, MB, GB, KiB, MiB or GiB"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A configuration error that names the file and, where it can, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped key.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml says, with the key and line.
        message: String,
    },
    /// A key has a value that parses but cannot work.
    #[error("config {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: String,
        /// What is wrong and what to write instead.
        message: String,
    },
}

impl Config {
    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// The compiled MQTT topic templates, in order.
    pub fn templates(&self) -> Vec<Template> {
        self.mqtt
            .iter()
            .flat_map(|m| &m.topics)
            .filter_map(|t| t.compile().ok())
            .collect()
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: String| Err((key.to_owned(), msg));
        if self.gateway.id.trim().is_empty() {
            return bad("gateway.id", "must not be empty".into());
        }
        if self.devices.max > 1_000_000 {
            return bad(
                "devices.max",
                format!(
                    "{} is more than 1000000; a gateway's queue tracks at most a million devices",
                    self.devices.max
                ),
            );
        }
        if self.devices.max_series_per_device == 0 {
            return bad(
                "devices.max_series_per_device",
                "0 would refuse every reading; give the most metrics x tag combinations a device sends, with headroom (default 1000)".into(),
            );
        }
        if self.devices.max == 0 {
            return bad(
                "devices.max",
                "0 would refuse every device; give the most devices the gateway serves, with headroom (default 10000)".into(),
            );
        }
        for p in &self.devices.allow {
            if p.is_empty() {
                return bad(
                    "devices.allow",
                    "holds an empty pattern; write e.g. \"press*\" (`*` matches anything)".into(),
                );
            }
        }
        if self.store.max_bytes.0 < 1 << 20 {
            return bad(
                "store.max_bytes",
                format!(
                    "{} bytes is too small; give at least \"1MiB\"",
                    self.store.max_bytes.0
                ),
            );
        }
        if let Some(m) = &self.mqtt {
            parse_mqtt_url(&m.url).map_err(|e| ("mqtt.url".to_owned(), e))?;
            if m.client_id.trim().is_empty() {
                return bad("mqtt.client_id", "must not be empty".into());
            }
            if let Some(sp) = &m.sparkplug {
                if sp.groups.is_empty()
                    || sp.groups.iter().any(|g| {
                        g.is_empty() || g.contains(['/', '#']) || (g.contains('+') && g != "+")
                    })
                {
                    return bad(
                        "mqtt.sparkplug.groups",
                        format!(
                            "{:?}: list Sparkplug group ids (one topic level each), or [\"+\"] for every group",
                            sp.groups
                        ),
                    );
                }
                if !sp.node.contains("{node}") {
                    return bad(
                        "mqtt.sparkplug.node",
                        format!(
                            "{:?} must contain {{node}} (and usually {{group}}), e.g. \"{{group}}/{{node}}\"",
                            sp.node
                        ),
                    );
                }
                if !sp.device.contains("{device}") || !sp.device.contains("{node}") {
                    return bad(
                        "mqtt.sparkplug.device",
                        format!(
                            "{:?} must contain {{node}} and {{device}}, e.g. \"{{group}}/{{node}}/{{device}}\"",
                            sp.device
                        ),
                    );
                }
            }
            if m.subscriptions.is_empty() && m.sparkplug.is_none() {
                return bad(
                    "mqtt.subscriptions",
                    "is empty; list at least one topic filter, e.g. [\"plant/#\"]".into(),
                );
            }
            for (i, t) in m.topics.iter().enumerate() {
                t.compile()
                    .map_err(|(field, e)| (format!("mqtt.topics[{i}].{field}"), e))?;
            }
            if m.topics.is_empty() && !m.subscriptions.is_empty() {
                return bad(
                    "mqtt.topics",
                    "is empty: every message would be refused as matching no template; add \
                     [[mqtt.topics]] template = \"plant/{site}/{line}/{device}/{metric}\""
                        .into(),
                );
            }
        }
        let l = &self.limits;
        if !(l.per_device_per_sec.is_finite() && l.per_device_per_sec > 0.0) {
            return bad(
                "limits.per_device_per_sec",
                format!("{} must be a positive number", l.per_device_per_sec),
            );
        }
        if !(l.burst.is_finite() && l.burst >= 1.0) {
            return bad("limits.burst", format!("{} must be at least 1", l.burst));
        }
        if l.max_payload_bytes == 0 || l.max_payload_bytes > 16 << 20 {
            return bad(
                "limits.max_payload_bytes",
                format!(
                    "{} must be from 1 to 16777216 (16 MiB)",
                    l.max_payload_bytes
                ),
            );
        }
        if self.dedupe.window_secs == 0 || self.dedupe.window_secs > 30 * 86_400 {
            return bad(
                "dedupe.window_secs",
                format!(
                    "{} must be from 1 to 2592000 (30 days)",
                    self.dedupe.window_secs
                ),
            );
        }
        if let Some(u) = &self.uplink {
            if !(1..=100_000).contains(&u.batch_max_readings) {
                return bad(
                    "uplink.batch_max_readings",
                    format!("{} must be from 1 to 100000", u.batch_max_readings),
                );
            }
            if !(1..=1024).contains(&u.max_in_flight) {
                return bad(
                    "uplink.max_in_flight",
                    format!("{} must be from 1 to 1024", u.max_in_flight),
                );
            }
            if !(u.backlog_rate.is_finite() && u.backlog_rate > 0.0) {
                return bad(
                    "uplink.backlog_rate",
                    format!("{} must be a positive number", u.backlog_rate),
                );
            }
            if u.server
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return bad("uplink.server", format!("{:?} must be host:port", u.server));
            }
        }
        for (i, f) in self.firmware.iter().enumerate() {
            if f.fields.is_empty() && f.ignore.is_empty() {
                return bad(
                    &format!("firmware[{i}]"),
                    "maps no fields; add fields = { source = \"metric\" } or remove it".into(),
                );
            }
        }
        Ok(())
    }
}

/// Splits `mqtt://host[:port]` into host and port.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    let rest = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{url:?}: scheme {scheme:?} is not supported; use mqtt://host:port"
            ));
        }
        None => return Err(format!("{url:?} has no scheme; write mqtt://host:port")),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?}: port {p:?} is not a number from 1 to 65535"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/edge-agent.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.gateway.id, "gw-plant1-01");
        assert_eq!(c.store.max_bytes, ByteSize(1 << 30));
        assert_eq!(c.limits.per_device_per_sec, 100.0);
        assert!(!c.templates().is_empty());
        assert!(!c.firmware.is_empty());

        // The device format it suggests works as it says, on every template it is given for.
        let text = std::fs::read_to_string(&path).unwrap();
        let suggested = "# device = \"{line}-{device}\"";
        assert!(text.contains(suggested));
        let c = Config::parse(&text.replace(suggested, &suggested[2..]), &path).unwrap();
        for (t, topic) in c
            .templates()
            .iter()
            .zip(["plant/p1/l3/press01/t", "plant/p1/l3/press01"])
        {
            let caps = t.captures(topic).unwrap();
            assert_eq!(t.device_id(&caps).as_deref(), Some("l3-press01"), "{topic}");
        }
    }

    #[test]
    fn devices_section_holds_allow_max_and_known_devices() {
        let c = parse(
            "[gateway]\nid = \"g\"\n[devices]\nallow = [\"press*\", \"l3-*-b\"]\nmax = 50\n\
             [devices.th7]\ntype = \"th-100\"\nfirmware = \"2.0.1\"\n",
        )
        .unwrap();
        assert_eq!(c.devices.max, 50);
        assert_eq!(c.devices.known["th7"].device_type, "th-100");
        for (id, ok) in [
            ("press01", true),
            ("press", true),
            ("l3-x-b", true),
            ("l3--b", true),
            ("l3-x-c", false),
            ("xpress01", false),
            ("th7", false),
        ] {
            assert_eq!(c.devices.allowed(id), ok, "{id}");
        }
        let open = parse("[gateway]\nid = \"g\"\n").unwrap();
        assert!(open.devices.allowed("anything") && open.devices.known.is_empty());
        assert_eq!(open.devices.max, 10_000);
        let err = parse("[gateway]\nid = \"g\"\n[devices]\nmax = 0\n").unwrap_err();
        assert!(err.to_string().contains("devices.max"), "{err}");
        assert!(glob("a*b*c", "a-b-c") && glob("*", "") && !glob("a*b", "ab-"));
        assert!(glob("exact", "exact") && !glob("exact", "exact1"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[gateway]\nid = \"g\"\n[store]\nmax_byte = \"1GiB\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("max_byte"), "{msg}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = parse("[gateway]\nid = \"g\"\n[limits]\nburst = 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.burst"), "{err}");
        let err = parse("[gateway]\nid = \"g\"\n[store]\nmax_bytes = \"1 TB\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown size unit"), "{err}");
        let err = parse(
            "[gateway]\nid = \"g\"\n[mqtt]\nurl = \"mqtts://x\"\nclient_id = \"c\"\nsubscriptions = [\"#\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("mqtt.url"), "{err}");
    }

    fn with_topic(entry: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            "[gateway]\nid = \"g\"\n[mqtt]\nurl = \"mqtt://h\"\nclient_id = \"c\"\n\
             subscriptions = [\"plant/#\"]\n[[mqtt.topics]]\ntemplate = \"plant/{{d}}\"\n\
             [[mqtt.topics]]\n{entry}\n"
        ))
    }

    #[test]
    fn device_formats_are_checked_at_load() {
        let ok = with_topic(
            "template = \"plant/{site}/{line}/{device}/{metric}\"\ndevice = \"{line}-{device}\"",
        )
        .unwrap();
        let t = &ok.templates()[1];
        let caps = t.captures("plant/p1/l4/press01/t").unwrap();
        assert_eq!(t.device_id(&caps).as_deref(), Some("l4-press01"));

        for (device, says) in [
            ("{line}-{dev}", "{dev} is not a capture"),
            ("{line-{device}", "not closed"),
            ("", "is empty"),
            ("{line}", "leaves out {device}"),
        ] {
            let err = with_topic(&format!(
                "template = \"plant/{{site}}/{{line}}/{{device}}/{{metric}}\"\ndevice = {device:?}"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("mqtt.topics[1].device: "), "{device}: {err}");
            assert!(err.contains(&format!("{device:?}")), "{device}: {err}");
            assert!(err.contains(says), "{device}: {err}");
        }
        // The template is checked first and named as such.
        let err = with_topic("template = \"plant/x{d}\"\ndevice = \"{d}\"").unwrap_err();
        assert!(err.to_string().contains("mqtt.topics[1].template"), "{err}");
    }

    #[test]
    fn sizes_and_urls() {
        assert_eq!("1GiB".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("500 MB".parse::<ByteSize>().unwrap().0, 500_000_000);
        assert_eq!(parse_mqtt_url("mqtt://127.0.0.1").unwrap().1, 1883);
        assert_eq!(parse_mqtt_url("mqtt://h:1884").unwrap(), ("h".into(), 1884));
        assert!(parse_mqtt_url("h:1883").is_err());
    }
}
