//! cloud-ingest's TOML configuration; `deploy/cloud-ingest.example.toml` is the commented
//! example, loaded by a test. Unknown keys are errors. Relative paths are taken from the
//! folder of the config file, so a unit file can point at it from anywhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The QUIC listener.
    pub quic: Quic,
    /// The PostgreSQL sink.
    pub postgres: Postgres,
    /// The Prometheus endpoint; absent means none.
    pub metrics: Option<Metrics>,
    /// The Kafka sink; absent (or no brokers) means off.
    pub kafka: Option<Kafka>,
    /// The query API; absent means none.
    pub api: Option<Api>,
    /// Stream alerting; on with defaults when absent.
    #[serde(default)]
    pub alerting: Alerting,
    /// What readings the cloud takes; defaults when absent.
    #[serde(default)]
    pub ingest: Ingest,
}

/// `[ingest]`: the event-time window of accepted readings, measured against the cloud's
/// clock when a batch arrives. A reading outside it is left out of its batch (which is still
/// acknowledged), put on the DLQ as `too_old` or `in_future`, and counted per tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ingest {
    /// How far ahead of the cloud's clock a reading may be stamped, in seconds.
    #[serde(default = "default_max_future")]
    pub max_future_secs: u64,
    /// How old a reading may be, in days; `None` means `postgres.retention.raw_days`.
    #[serde(default)]
    pub max_past_days: Option<u32>,
    /// Most memory, in MiB, that batches being read, decoded and written may hold at once
    /// (reserved before a batch's body is read, at its worst case while it is decoded, and
    /// at its decoded size until it is acknowledged). One gateway may hold a quarter of it;
    /// a batch whose worst case is more than that is refused as too large.
    #[serde(default = "default_max_buffered_mib")]
    pub max_buffered_mib: u64,
}

fn default_max_buffered_mib() -> u64 {
    1024
}

/// The largest `ingest.max_future_secs` accepted (7 days).
pub const MAX_FUTURE_SECS: u64 = 7 * 86_400;

fn default_max_future() -> u64 {
    3_600
}

/// The event-time window of accepted readings, relative to the cloud's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// A reading older than `now - past_us` is `too_old`.
    pub past_us: i64,
    /// A reading newer than `now + future_us` is `in_future`.
    pub future_us: i64,
}

/// `[alerting]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerting {
    /// Evaluate alert rules at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The watermark trails each device's newest event time by this much.
    #[serde(default = "default_ooo")]
    pub out_of_orderness_ms: u64,
    /// A window still takes readings this long after the watermark passed its end.
    #[serde(default = "default_lateness")]
    pub allowed_lateness_ms: u64,
    /// A quiet device's windows are closed after `out_of_orderness_ms` plus this much.
    #[serde(default = "default_grace")]
    pub idle_grace_ms: u64,
    /// How often processing time is checked (quiet devices, absence rules).
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    /// How often rules are re-read from `alert_rules` (changes made through this
    /// replica's API apply at once).
    #[serde(default = "default_reload")]
    pub rules_reload_ms: u64,
    /// No longer used (it was a cap over all tenants, which one tenant could fill): accepted
    /// so that older configs load, with a warning. See the per-tenant caps below.
    #[serde(default)]
    pub max_series: Option<usize>,
    /// Rules evaluated per tenant: the first this many by id; the others are counted
    /// (`plantlink_cloud_alert_rules_over_cap{tenant}`) and not evaluated.
    #[serde(default = "default_rules_per_tenant")]
    pub max_rules_per_tenant: usize,
    /// (rule, device) series tracked per tenant; readings for new series beyond it are
    /// counted (`plantlink_cloud_alert_series_dropped_total{tenant}`), not evaluated.
    #[serde(default = "default_series_per_tenant")]
    pub max_series_per_tenant: usize,
    /// Devices tracked per tenant; readings of new devices beyond it are counted
    /// (`plantlink_cloud_alert_devices_dropped_total{tenant}`), not evaluated.
    #[serde(default = "default_devices_per_tenant")]
    pub max_devices_per_tenant: usize,
    /// Readings waiting for the engine, all tenants. Ingest never waits on alerting: a batch
    /// that does not fit is not evaluated (it is stored), and is counted in
    /// `plantlink_cloud_alert_readings_shed_total{tenant}`.
    #[serde(default = "default_feed_readings")]
    pub feed_max_readings: usize,
    /// Readings waiting for the engine, per tenant (tenants are served in turn).
    #[serde(default = "default_feed_readings_per_tenant")]
    pub feed_max_readings_per_tenant: usize,
    /// Alert events waiting for delivery.
    #[serde(default = "default_alert_queue")]
    pub queue: usize,
    /// Events waiting per webhook; more are counted as failures.
    #[serde(default = "default_webhook_queue")]
    pub webhook_queue: usize,
    /// Live alert events are POSTed to each.
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

/// `[[alerting.webhooks]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://host:port/path`; the event JSON is POSTed there.
    pub url: String,
}

impl Default for Alerting {
    fn default() -> Self {
        Self {
            enabled: true,
            out_of_orderness_ms: default_ooo(),
            allowed_lateness_ms: default_lateness(),
            idle_grace_ms: default_grace(),
            tick_ms: default_tick(),
            rules_reload_ms: default_reload(),
            max_series: None,
            max_rules_per_tenant: default_rules_per_tenant(),
            max_series_per_tenant: default_series_per_tenant(),
            max_devices_per_tenant: default_devices_per_tenant(),
            feed_max_readings: default_feed_readings(),
            feed_max_readings_per_tenant: default_feed_readings_per_tenant(),
            queue: default_alert_queue(),
            webhook_queue: default_webhook_queue(),
            webhooks: Vec::new(),
        }
    }
}

impl Ingest {
    /// The window, with the raw retention of `retention` for an unset `max_past_days`.
    pub fn window(&self, retention: &Retention) -> Window {
        let days = self.max_past_days.unwrap_or(retention.raw_days);
        Window {
            past_us: i64::from(days) * 86_400_000_000,
            future_us: self.max_future_secs.min(MAX_FUTURE_SECS) as i64 * 1_000_000,
        }
    }
}

impl Default for Ingest {
    fn default() -> Self {
        Self {
            max_future_secs: default_max_future(),
            max_past_days: None,
            max_buffered_mib: default_max_buffered_mib(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_ooo() -> u64 {
    1_000
}
fn default_lateness() -> u64 {
    30_000
}
fn default_grace() -> u64 {
    5_000
}
fn default_tick() -> u64 {
    500
}
fn default_reload() -> u64 {
    10_000
}
fn default_rules_per_tenant() -> usize {
    1_000
}
fn default_series_per_tenant() -> usize {
    100_000
}
fn default_devices_per_tenant() -> usize {
    100_000
}
fn default_feed_readings() -> usize {
    1_000_000
}
fn default_feed_readings_per_tenant() -> usize {
    100_000
}
fn default_alert_queue() -> usize {
    1_024
}
fn default_webhook_queue() -> usize {
    1_000
}

/// `[api]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Address of the HTTP API, e.g. `0.0.0.0:8080`.
    pub bind: SocketAddr,
    /// Bearer token of each tenant: `acme = "..."`.
    #[serde(default)]
    pub tokens: std::collections::BTreeMap<String, String>,
    /// PostgreSQL connections for the tenants' queries (`/readyz` has one of its own).
    #[serde(default = "default_api_pool_size")]
    pub pool_size: usize,
    /// How long a request waits for a pooled connection (or to open one) before a 503.
    #[serde(default = "default_api_pool_timeout_ms")]
    pub pool_timeout_ms: u64,
    /// The `statement_timeout` of each query connection; a query cut off by it gets a 503.
    #[serde(default = "default_api_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Requests of one tenant served at once; more wait up to `tenant_queue_ms`, then 429.
    #[serde(default = "default_api_max_concurrent_per_tenant")]
    pub max_concurrent_per_tenant: usize,
    /// How long a tenant's request over `max_concurrent_per_tenant` waits for its turn.
    #[serde(default = "default_api_tenant_queue_ms")]
    pub tenant_queue_ms: u64,
    /// The longest range that `resolution=raw` reads, in days; longer ones get a 400.
    #[serde(default = "default_api_max_raw_range_days")]
    pub max_raw_range_days: u32,
}

impl Api {
    /// `[api]` on `bind` with `tokens`, every limit at its default.
    pub fn new(bind: SocketAddr, tokens: std::collections::BTreeMap<String, String>) -> Self {
        let l = crate::api::Limits::default();
        Self {
            bind,
            tokens,
            pool_size: l.pool_size,
            pool_timeout_ms: l.pool_timeout_ms,
            statement_timeout_ms: l.statement_timeout_ms,
            max_concurrent_per_tenant: l.max_concurrent_per_tenant,
            tenant_queue_ms: l.tenant_queue_ms,
            max_raw_range_days: l.max_raw_range_days,
        }
    }

    /// Its limits, for [`crate::api::App::with_limits`].
    pub fn limits(&self) -> crate::api::Limits {
        crate::api::Limits {
            pool_size: self.pool_size,
            pool_timeout_ms: self.pool_timeout_ms,
            statement_timeout_ms: self.statement_timeout_ms,
            max_concurrent_per_tenant: self.max_concurrent_per_tenant,
            tenant_queue_ms: self.tenant_queue_ms,
            max_raw_range_days: self.max_raw_range_days,
        }
    }
}

fn default_api_pool_size() -> usize {
    crate::api::Limits::default().pool_size
}
fn default_api_pool_timeout_ms() -> u64 {
    crate::api::Limits::default().pool_timeout_ms
}
fn default_api_statement_timeout_ms() -> u64 {
    crate::api::Limits::default().statement_timeout_ms
}
fn default_api_max_concurrent_per_tenant() -> usize {
    crate::api::Limits::default().max_concurrent_per_tenant
}
fn default_api_tenant_queue_ms() -> u64 {
    crate::api::Limits::default().tenant_queue_ms
}
fn default_api_max_raw_range_days() -> u32 {
    crate::api::Limits::default().max_raw_range_days
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kafka {
    /// Bootstrap brokers, `host:port[,host:port...]`; empty turns the sink off.
    #[serde(default)]
    pub brokers: String,
    /// One JSON record per reading, keyed by device id.
    #[serde(default = "default_readings_topic")]
    pub readings_topic: String,
    /// Alert events.
    #[serde(default = "default_alerts_topic")]
    pub alerts_topic: String,
    /// What the cloud refused, with the reason.
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// Partitions of the topics cloud-ingest creates when they are missing.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of the topics it creates (3 on a production cluster).
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// librdkafka producer properties, overriding Plantlink's defaults (idempotent,
    /// `acks=all`, lz4, `linger.ms=20`, no local timeout), e.g. `"linger.ms" = "50"`.
    #[serde(default)]
    pub producer: std::collections::BTreeMap<String, String>,
    /// Scale-out mode (`run --role ...` with the roles apart): the internal topic that
    /// receivers produce every accepted batch to, regrouped per partition in the batch codec,
    /// and that writers consume.
    #[serde(default = "default_backbone_topic")]
    pub backbone_topic: String,
    /// Scale-out mode: the backbone topic of the gateways' backlog lane. Backfill travels
    /// apart from live data, consumed by consumers of its own (groups `{writer_group}.backfill`
    /// and `{alerting_group}.backfill`), so one tenant's backlog after an outage never waits
    /// in front of anyone's live readings. Same partition count as `backbone_topic`.
    #[serde(default = "default_backbone_backfill_topic")]
    pub backbone_backfill_topic: String,
    /// Partitions of the backbone topic when cloud-ingest creates it: they bound how many
    /// writers share the work (3-5x the peak number of writers; deploy/SCALING.md).
    #[serde(default = "default_backbone_partitions")]
    pub backbone_partitions: i32,
    /// Whether receivers also put every reading on `readings_topic` as JSON, for consumers
    /// of the public format (about 150 bytes a reading, where the backbone takes a few).
    #[serde(default = "default_true")]
    pub public_readings: bool,
    /// The writers' consumer group.
    #[serde(default = "default_writer_group")]
    pub writer_group: String,
    /// The alerting members' consumer group (scale-out mode).
    #[serde(default = "default_alerting_group")]
    pub alerting_group: String,
    /// librdkafka consumer properties, overriding Plantlink's defaults
    /// (`partition.assignment.strategy=roundrobin`, `session.timeout.ms=6000`,
    /// `heartbeat.interval.ms=1000`, `queued.max.messages.kbytes=65536`).
    #[serde(default)]
    pub consumer: std::collections::BTreeMap<String, String>,
}

impl Kafka {
    /// Defaults with `brokers`.
    pub fn with_brokers(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            readings_topic: default_readings_topic(),
            alerts_topic: default_alerts_topic(),
            dlq_topic: default_dlq_topic(),
            partitions: default_partitions(),
            replication_factor: default_replication(),
            producer: Default::default(),
            backbone_topic: default_backbone_topic(),
            backbone_partitions: default_backbone_partitions(),
            public_readings: true,
            writer_group: default_writer_group(),
            backbone_backfill_topic: default_backbone_backfill_topic(),
            alerting_group: default_alerting_group(),
            consumer: Default::default(),
        }
    }

    /// The backbone's lanes: (topic, writers' group, alerting group) of the live lane, then
    /// of the backlog lane.
    pub fn lanes(&self) -> [(String, String, String); 2] {
        [
            (
                self.backbone_topic.clone(),
                self.writer_group.clone(),
                self.alerting_group.clone(),
            ),
            (
                self.backbone_backfill_topic.clone(),
                format!("{}.backfill", self.writer_group),
                format!("{}.backfill", self.alerting_group),
            ),
        ]
    }
}

fn default_backbone_topic() -> String {
    "plantlink.backbone".into()
}
fn default_backbone_partitions() -> i32 {
    12
}
fn default_backbone_backfill_topic() -> String {
    "plantlink.backbone.backfill".into()
}
fn default_writer_group() -> String {
    "plantlink-writer".into()
}
fn default_alerting_group() -> String {
    "plantlink-alerting".into()
}
fn default_true() -> bool {
    true
}

/// What a `cloud-ingest run` process does (`--role receiver,writer,alerting`).
///
/// All three in one process is the single-node mode: batches go from the gateways' streams to
/// PostgreSQL, Kafka and the alert engine in process. Any other set is the scale-out mode,
/// with Kafka's backbone topic in the middle: receivers admit gateways and produce to it,
/// writers consume it into PostgreSQL, alerting members evaluate the rules on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Admits gateways over QUIC.
    pub receiver: bool,
    /// Writes PostgreSQL (in scale-out mode, from the backbone topic).
    pub writer: bool,
    /// Evaluates alert rules.
    pub alerting: bool,
}

impl Default for Roles {
    fn default() -> Self {
        Self::ALL
    }
}

impl Roles {
    /// The single-node mode.
    pub const ALL: Roles = Roles {
        receiver: true,
        writer: true,
        alerting: true,
    };

    /// Whether batches travel through Kafka's backbone topic.
    pub fn scale_out(&self) -> bool {
        *self != Self::ALL
    }

    /// What `config` lacks to run these roles, as one message naming the keys; `Ok` if none.
    pub fn check(&self, config: &Config) -> anyhow::Result<()> {
        let missing = self.missing(config);
        if !missing.is_empty() {
            anyhow::bail!("--role {self}: {}", missing.join("; "));
        }
        Ok(())
    }

    /// What `config` lacks to run these roles, each naming the key and the fix.
    pub fn missing(&self, config: &Config) -> Vec<String> {
        let mut m = Vec::new();
        if self.scale_out() && config.kafka.as_ref().is_none_or(|k| k.brokers.is_empty()) {
            m.push(
                "the roles apart talk through Kafka; set [kafka] brokers (or run all three \
                 roles in one process, the default)"
                    .to_owned(),
            );
        }
        if self.receiver {
            let q = &config.quic;
            for (key, path) in [
                ("quic.cert", &q.cert),
                ("quic.key", &q.key),
                ("quic.client_ca", &q.client_ca),
            ] {
                if !path.is_file() {
                    m.push(format!(
                        "{key} = {}: no such file (cloud-ingest pki writes it)",
                        path.display()
                    ));
                }
            }
        }
        if self.alerting && self.scale_out() && !config.alerting.enabled {
            m.push("alerting.enabled = false: an alerting member would evaluate nothing".into());
        }
        m
    }

    /// What a process of these roles uses of `config`, one line each (for `check-config`).
    pub fn uses(&self, config: &Config) -> Vec<String> {
        let mut u = Vec::new();
        let k = config.kafka.as_ref().filter(|k| !k.brokers.is_empty());
        if self.receiver {
            u.push(format!("admits gateways on QUIC {}", config.quic.bind));
            if let (true, Some(k)) = (self.scale_out(), k) {
                u.push(format!(
                    "produces accepted batches to {} ({} partitions when it creates the topic){}",
                    k.backbone_topic,
                    k.backbone_partitions,
                    if k.public_readings {
                        format!(" and every reading as JSON to {}", k.readings_topic)
                    } else {
                        String::new()
                    }
                ));
            }
        }
        if self.writer {
            match (self.scale_out(), k) {
                (true, Some(k)) => u.push(format!(
                    "writes PostgreSQL from {} as consumer group {} (offsets in pipeline_offsets)",
                    k.backbone_topic, k.writer_group
                )),
                _ => u.push("writes PostgreSQL (postgres.url)".into()),
            }
        }
        if self.alerting && config.alerting.enabled {
            match (self.scale_out(), k) {
                (true, Some(k)) => u.push(format!(
                    "evaluates alert rules from {} as consumer group {}; alerts to the table and {}",
                    k.backbone_topic, k.alerting_group, k.alerts_topic
                )),
                _ => u.push("evaluates alert rules in process".into()),
            }
        }
        if !self.scale_out()
            && let Some(k) = k
        {
            u.push(format!("produces readings to {}", k.readings_topic));
        }
        u
    }

    /// The sets worth reporting: the single-node mode and each role alone.
    pub const REPORTED: [Roles; 4] = [
        Self::ALL,
        Roles {
            receiver: true,
            writer: false,
            alerting: false,
        },
        Roles {
            receiver: false,
            writer: true,
            alerting: false,
        },
        Roles {
            receiver: false,
            writer: false,
            alerting: true,
        },
    ];
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.receiver, "receiver"),
            (self.writer, "writer"),
            (self.alerting, "alerting"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for Roles {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut r = Roles {
            receiver: false,
            writer: false,
            alerting: false,
        };
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "receiver" => r.receiver = true,
                "writer" => r.writer = true,
                "alerting" => r.alerting = true,
                other => {
                    return Err(format!(
                        "unknown role {other:?}; the roles are receiver, writer and alerting, \
                         comma-separated (e.g. --role receiver or --role writer)"
                    ));
                }
            }
        }
        if !(r.receiver || r.writer || r.alerting) {
            return Err("no role given; name at least one of receiver, writer, alerting".into());
        }
        Ok(r)
    }
}

fn default_readings_topic() -> String {
    "telemetry.readings".into()
}
fn default_alerts_topic() -> String {
    "telemetry.alerts".into()
}
fn default_dlq_topic() -> String {
    "telemetry.dlq".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_replication() -> i32 {
    1
}

/// `[quic]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quic {
    /// UDP address to listen on, e.g. `0.0.0.0:4433`.
    pub bind: SocketAddr,
    /// The server certificate (`cloud-ingest pki server`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The fleet CA that gateway certificates must chain to.
    pub client_ca: PathBuf,
    /// Gateway ids refused at the handshake although their certificates are valid. Read
    /// only at start; `revocation_file` is the list that can be reloaded.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// The revocation list (`serial:<hex>`, `sha256:<hex>`, `gateway:<id>` lines; see
    /// deploy/PKI.md), read at start and again on SIGHUP; relative to the config's folder.
    #[serde(default)]
    pub revocation_file: Option<PathBuf>,
    /// How often to look whether `revocation_file` changed, in seconds (it is reloaded
    /// when it did); 0 leaves reloading to SIGHUP.
    #[serde(default = "default_revocation_poll")]
    pub revocation_poll_secs: u64,
    /// Batches a gateway may have unacknowledged.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u32,
    /// Largest batch frame accepted, in bytes.
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: u32,
}

fn default_in_flight() -> u32 {
    16
}
fn default_revocation_poll() -> u64 {
    5
}
fn default_batch_bytes() -> u32 {
    8 << 20
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    /// Connection string, `postgres://user@host/db` or `host=... user=... dbname=...`.
    pub url: String,
    /// Whether to use the TimescaleDB extension: `auto` (when the server offers it), `on`
    /// (fail without it) or `off` (plain PostgreSQL with range partitions).
    #[serde(default)]
    pub timescaledb: Timescale,
    /// Connections writing batches in parallel.
    #[serde(default = "default_writers")]
    pub writers: usize,
    /// Readings received but not yet committed, across all gateways; beyond it the service
    /// stops reading from gateways (QUIC flow control pushes back on them).
    #[serde(default = "default_pending")]
    pub max_pending_readings: usize,
    /// Most readings written in one transaction; waiting batches are merged up to it.
    #[serde(default = "default_flush")]
    pub flush_max_readings: usize,
    /// How often the rollups are brought up to date on plain PostgreSQL, in milliseconds.
    #[serde(default = "default_rollup_ms")]
    pub rollup_interval_ms: u64,
    /// Daily partitions of `raw_metrics` created ahead of time on plain PostgreSQL.
    #[serde(default = "default_ahead")]
    pub partitions_ahead_days: u32,
    /// On TimescaleDB: raw chunks older than this are compressed.
    #[serde(default = "default_compress")]
    pub compress_after_days: u32,
    /// How long each table keeps its data.
    #[serde(default)]
    pub retention: Retention,
}

impl Postgres {
    /// The defaults, with `url`.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timescaledb: Timescale::default(),
            writers: default_writers(),
            max_pending_readings: default_pending(),
            flush_max_readings: default_flush(),
            rollup_interval_ms: default_rollup_ms(),
            partitions_ahead_days: default_ahead(),
            compress_after_days: default_compress(),
            retention: Retention::default(),
        }
    }
}

/// `[postgres] timescaledb`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Timescale {
    /// Use TimescaleDB when `pg_available_extensions` lists it.
    #[default]
    Auto,
    /// Require it.
    On,
    /// Plain PostgreSQL.
    Off,
}

/// `[postgres.retention]`, in days.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// `raw_metrics`.
    #[serde(default = "default_raw_days")]
    pub raw_days: u32,
    /// `downsampled_metrics_1h`.
    #[serde(default = "default_hourly_days")]
    pub hourly_days: u32,
    /// `downsampled_metrics_1d`.
    #[serde(default = "default_daily_days")]
    pub daily_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            raw_days: default_raw_days(),
            hourly_days: default_hourly_days(),
            daily_days: default_daily_days(),
        }
    }
}

fn default_writers() -> usize {
    2
}
fn default_pending() -> usize {
    200_000
}
fn default_flush() -> usize {
    50_000
}
fn default_rollup_ms() -> u64 {
    5_000
}
fn default_ahead() -> u32 {
    3
}
fn default_compress() -> u32 {
    2
}
fn default_raw_days() -> u32 {
    7
}
fn default_hourly_days() -> u32 {
    730
}
fn default_daily_days() -> u32 {
    3650
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address of `/metrics`, e.g. `127.0.0.1:9320`.
    pub bind: SocketAddr,
}

impl Ingest {
    /// Checks the window against the raw retention; the error names the key and the fix.
    pub fn check(&self, retention: &Retention) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_buffered_mib >= 512,
            "ingest.max_buffered_mib = {} is too small: a batch of 10,000 readings may need \
             over 100 MiB while it is decoded, one gateway may hold a quarter of the budget, and \
             a batch that needs more than that is refused; give at least 512 (default 1024)",
            self.max_buffered_mib
        );
        anyhow::ensure!(
            self.max_future_secs <= MAX_FUTURE_SECS,
            "ingest.max_future_secs = {} is more than {MAX_FUTURE_SECS} (7 days); a gateway \
             clock that far ahead is wrong: fix its time (NTP) instead, and keep the bound small \
             (default 3600)",
            self.max_future_secs
        );
        if let Some(days) = self.max_past_days {
            anyhow::ensure!(
                days >= 1,
                "ingest.max_past_days = 0 would refuse every reading older than now; give at \
                 least 1, or leave it out to follow postgres.retention.raw_days"
            );
            anyhow::ensure!(
                days <= retention.raw_days,
                "ingest.max_past_days = {days} is more than postgres.retention.raw_days = {}: \
                 readings older than the raw retention are dropped with their partitions and \
                 never reach the rollups; raise postgres.retention.raw_days to at least {days} \
                 as well (or leave max_past_days out to follow it)",
                retention.raw_days
            );
        }
        Ok(())
    }
}

impl Config {
    /// The event-time window of accepted readings (`[ingest]`, with the raw retention).
    pub fn window(&self) -> Window {
        self.ingest.window(&self.postgres.retention)
    }

    /// Reads and checks a config file; errors name the file and the key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let mut c: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("config {}: {}", path.display(), e.to_string().trim_end())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let q = &mut c.quic;
        for p in [&mut q.cert, &mut q.key, &mut q.client_ca]
            .into_iter()
            .chain(q.revocation_file.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        c.postgres
            .url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| anyhow::anyhow!("config {}: postgres.url: {e}", path.display()))?;
        if c.kafka
            .as_ref()
            .is_some_and(|k| k.brokers.trim().is_empty())
        {
            c.kafka = None;
        }
        if let Some(k) = &c.kafka {
            anyhow::ensure!(
                k.partitions >= 1 && k.replication_factor >= 1,
                "config {}: kafka.partitions = {} and kafka.replication_factor = {} must be at least 1",
                path.display(),
                k.partitions,
                k.replication_factor
            );
            for key in ["bootstrap.servers", "enable.idempotence", "acks"] {
                anyhow::ensure!(
                    !k.producer.contains_key(key),
                    "config {}: kafka.producer.\"{key}\" cannot be set there: Plantlink's delivery \
                     promise depends on it (set kafka.brokers for the servers)",
                    path.display()
                );
            }
        }
        if let Some(api) = &c.api {
            anyhow::ensure!(
                api.max_concurrent_per_tenant >= 1
                    && api.pool_size > api.max_concurrent_per_tenant
                    && api.statement_timeout_ms >= 1
                    && api.pool_timeout_ms >= 1
                    && api.max_raw_range_days >= 1,
                "config {}: api.max_concurrent_per_tenant must be at least 1 and less than \
                 api.pool_size (so one tenant alone cannot take every connection), and \
                 statement_timeout_ms, pool_timeout_ms and max_raw_range_days at least 1",
                path.display()
            );
            for (tenant, token) in &api.tokens {
                anyhow::ensure!(
                    token.len() >= 16 && token.is_ascii() && !token.contains(char::is_whitespace),
                    "config {}: api.tokens.{tenant} must be at least 16 printable ASCII characters \
                     without spaces (e.g. from `openssl rand -hex 24`)",
                    path.display()
                );
            }
            let mut seen = std::collections::BTreeSet::new();
            for (tenant, token) in &api.tokens {
                anyhow::ensure!(
                    seen.insert(token),
                    "config {}: api.tokens.{tenant} is the same token as another tenant's",
                    path.display()
                );
            }
        }
        for w in &c.alerting.webhooks {
            anyhow::ensure!(
                crate::alerting::service::split_http_url(&w.url).is_some(),
                "config {}: alerting.webhooks url = {:?}: give http://host[:port]/path (https is \
                 not supported yet; put a TLS-terminating proxy in front of the receiver)",
                path.display(),
                w.url
            );
        }
        let a = &c.alerting;
        anyhow::ensure!(
            a.tick_ms >= 10 && a.rules_reload_ms >= 100 && a.queue >= 1 && a.webhook_queue >= 1,
            "config {}: alerting.tick_ms must be >= 10, rules_reload_ms >= 100, queue and webhook_queue >= 1",
            path.display()
        );
        anyhow::ensure!(
            a.max_rules_per_tenant >= 1
                && a.max_series_per_tenant >= 1
                && a.max_devices_per_tenant >= 1
                && a.feed_max_readings_per_tenant >= 1
                && a.feed_max_readings >= a.feed_max_readings_per_tenant,
            "config {}: alerting.max_rules_per_tenant, max_series_per_tenant, max_devices_per_tenant \
             and feed_max_readings_per_tenant must be >= 1, and feed_max_readings = {} at least \
             feed_max_readings_per_tenant = {}",
            path.display(),
            a.feed_max_readings,
            a.feed_max_readings_per_tenant
        );
        let pg = &c.postgres;
        anyhow::ensure!(
            (1..=64).contains(&pg.writers),
            "config {}: postgres.writers = {} must be from 1 to 64",
            path.display(),
            pg.writers
        );
        anyhow::ensure!(
            pg.flush_max_readings >= 1 && pg.max_pending_readings >= pg.flush_max_readings,
            "config {}: postgres.max_pending_readings = {} must be at least postgres.flush_max_readings = {} (and both above 0)",
            path.display(),
            pg.max_pending_readings,
            pg.flush_max_readings
        );
        let r = &pg.retention;
        anyhow::ensure!(
            r.raw_days >= 4 && r.hourly_days >= r.raw_days && r.daily_days >= r.hourly_days,
            "config {}: postgres.retention raw_days = {}, hourly_days = {}, daily_days = {}: \
             keep raw at least 4 days, and each rollup at least as long as what it summarises",
            path.display(),
            r.raw_days,
            r.hourly_days,
            r.daily_days
        );
        c.ingest
            .check(r)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        anyhow::ensure!(
            c.postgres.rollup_interval_ms >= 100,
            "config {}: postgres.rollup_interval_ms = {} is below 100",
            path.display(),
            c.postgres.rollup_interval_ms
        );
        anyhow::ensure!(
            (1..=1024).contains(&c.quic.max_in_flight),
            "config {}: quic.max_in_flight = {} must be from 1 to 1024",
            path.display(),
            c.quic.max_in_flight
        );
        anyhow::ensure!(
            (1024..=(64 << 20)).contains(&c.quic.max_batch_bytes),
            "config {}: quic.max_batch_bytes = {} must be from 1024 to 67108864",
            path.display(),
            c.quic.max_batch_bytes
        );
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_loads_and_resolves_paths() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud-ingest.example.toml");
        let c = Config::load(&p).unwrap();
        assert_eq!(c.quic.bind.port(), 4433);
        assert_eq!(c.quic.cert, p.parent().unwrap().join("pki/server.pem"));
        assert_eq!(c.quic.revoked, Vec::<String>::new());
        assert_eq!(c.window(), Ingest::default().window(&c.postgres.retention));
    }

    #[test]
    fn the_api_limits_in_the_example_are_the_defaults_and_a_bad_one_is_refused() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud-ingest.example.toml");
        let example = std::fs::read_to_string(&p).unwrap();
        let keys = [
            "pool_size",
            "pool_timeout_ms",
            "statement_timeout_ms",
            "max_concurrent_per_tenant",
            "tenant_queue_ms",
            "max_raw_range_days",
        ];
        let mut text = example.clone();
        for k in keys {
            let commented = format!("\n# {k} = ");
            assert!(text.contains(&commented), "{k} is not documented in [api]");
            text = text.replace(&commented, &format!("\n{k} = "));
        }
        let tmp =
            std::env::temp_dir().join(format!("plantlink-api-limits-{}.toml", std::process::id()));
        let load = |text: &str| {
            std::fs::write(&tmp, text).unwrap();
            let c = Config::load(&tmp);
            let _ = std::fs::remove_file(&tmp);
            c
        };
        let api = load(&text).unwrap().api.unwrap();
        assert_eq!(api.limits(), crate::api::Limits::default());
        let err = load(&text.replace(
            "\nmax_concurrent_per_tenant = 4",
            "\nmax_concurrent_per_tenant = 8",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("api.max_concurrent_per_tenant"), "{err}");
    }

    #[test]
    fn the_compose_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/cloud-ingest.toml");
        let c = Config::load(&p).unwrap();
        assert_eq!(c.postgres.timescaledb, Timescale::On);
        assert!(c.kafka.is_some() && c.api.is_some());
    }

    #[test]
    fn the_ingest_window_follows_the_raw_retention_and_names_bad_values() {
        let r = Retention::default();
        let w = Ingest::default().window(&r);
        assert_eq!(w.past_us, 7 * 86_400_000_000);
        assert_eq!(w.future_us, 3_600_000_000);
        let own = Ingest {
            max_future_secs: 60,
            max_past_days: Some(2),
            ..Ingest::default()
        };
        own.check(&r).unwrap();
        assert_eq!(own.window(&r).past_us, 2 * 86_400_000_000);
        assert_eq!(own.window(&r).future_us, 60_000_000);
        let far = Ingest {
            max_future_secs: MAX_FUTURE_SECS + 1,
            max_past_days: None,
            ..Ingest::default()
        };
        let err = far.check(&r).unwrap_err().to_string();
        assert!(err.contains("ingest.max_future_secs = 604801"), "{err}");
        let old = Ingest {
            max_future_secs: 3600,
            max_past_days: Some(30),
            ..Ingest::default()
        };
        let err = old.check(&r).unwrap_err().to_string();
        assert!(
            err.contains("ingest.max_past_days = 30")
                && err.contains("raise postgres.retention.raw_days"),
            "{err}"
        );
        let zero = Ingest {
            max_future_secs: 3600,
            max_past_days: Some(0),
            ..Ingest::default()
        };
        assert!(
            zero.check(&r)
                .unwrap_err()
                .to_string()
                .contains("max_past_days = 0")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("plantlink-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[quic]\nbind = \"0.0.0.0:4433\"\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\nrevokd = []\n[postgres]\nurl = \"host=x\"\n").unwrap();
        let err = Config::load(&f).unwrap_err().to_string();
        assert!(err.contains("revokd"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
