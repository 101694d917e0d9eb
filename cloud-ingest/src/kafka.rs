//! The Kafka sink (rdkafka, librdkafka underneath), standard Kafka APIs only.
//!
//! Each reading is one JSON record on `readings_topic`, keyed by device id so that a device's
//! readings stay in order within one partition; its headers carry the reading identity
//! (`plantlink-tenant`, `plantlink-device`, `plantlink-metric`, `plantlink-ts-us`) so a
//! consumer can drop a replay without mixing up two tenants' devices of the same name.
//! The record format is documented in `deploy/KAFKA.md`.
//!
//! The producer is idempotent with `acks=all`, lz4 and a linger; its local message timeout is
//! infinite, so while the brokers are unreachable records wait in librdkafka (bounded by the
//! sink's reading budget) and the gateways' acks wait with them. Records are enqueued by the
//! stream that received them, in the order received, before the database write; a batch is
//! acknowledged only when both the database and every one of its records' deliveries are done.
//! Whatever the cloud refuses goes to `dlq_topic` with the reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use plantlink_model::Reading;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;
use time::OffsetDateTime;

use crate::config;

/// A connected producer and the topic names.
#[derive(Clone)]
pub struct Kafka {
    producer: Arc<ThreadedProducer<Tracking>>,
    cfg: config::Kafka,
    /// The backbone topic's partitions, as the cluster reports them once the topics are
    /// checked (the configured count until then).
    backbone_partitions: Arc<std::sync::atomic::AtomicI32>,
}

/// The producer's context: each record carries its batch's [`Tracker`], and its delivery
/// report (from librdkafka's polling thread) counts it off there. One shared counter per batch
/// instead of a channel and a future per record.
struct Tracking;

impl ClientContext for Tracking {}

impl ProducerContext for Tracking {
    type DeliveryOpaque = Arc<Tracker>;

    fn delivery(&self, result: &DeliveryResult<'_>, tracker: Arc<Tracker>) {
        if let Err((e, _)) = result {
            tracker.fail(e.to_string());
        }
        tracker.one_done();
    }
}

/// The outstanding deliveries of one batch's records.
#[derive(Debug)]
struct Tracker {
    /// Records enqueued and not yet reported, plus one while records are still being enqueued.
    outstanding: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
    done: tokio::sync::Notify,
}

impl Tracker {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            outstanding: AtomicUsize::new(1),
            first_error: std::sync::Mutex::new(None),
            done: tokio::sync::Notify::new(),
        })
    }

    fn fail(&self, e: String) {
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(e);
    }

    fn one_done(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit for the one waiter, whether it waits already or not yet.
            self.done.notify_one();
        }
    }
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("brokers", &self.cfg.brokers)
            .finish_non_exhaustive()
    }
}

/// The consumer settings Plantlink starts from; `[kafka.consumer]` overrides any of them.
/// Round-robin assignment and the shorter session are what Tansu's group coordinator needs
/// for a second member to get partitions; Apache Kafka and Redpanda take them as well.
pub const CONSUMER_DEFAULTS: [(&str, &str); 6] = [
    ("partition.assignment.strategy", "roundrobin"),
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
    ("auto.offset.reset", "earliest"),
    // The bound on what a writer holds prefetched while its database is slow.
    ("queued.max.messages.kbytes", "65536"),
    ("enable.partition.eof", "false"),
];

/// The producer settings Plantlink starts from; `[kafka.producer]` overrides any of them.
pub const PRODUCER_DEFAULTS: [(&str, &str); 6] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("compression.type", "lz4"),
    ("linger.ms", "20"),
    // 0 is infinite: records wait for the brokers instead of being dropped locally.
    ("message.timeout.ms", "0"),
    ("queue.buffering.max.kbytes", "1048576"),
];

impl Kafka {
    /// A producer for `cfg`; `max_pending` (the sink's reading budget) sizes its local queue.
    pub fn new(cfg: &config::Kafka, max_pending: usize) -> anyhow::Result<Self> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers);
        for (k, v) in PRODUCER_DEFAULTS {
            c.set(k, v);
        }
        c.set(
            "queue.buffering.max.messages",
            (max_pending * 2).clamp(100_000, 10_000_000).to_string(),
        );
        for (k, v) in &cfg.producer {
            c.set(k, v);
        }
        let producer: ThreadedProducer<Tracking> = c
            .create_with_context(Tracking)
            .map_err(|e| anyhow::anyhow!("kafka: cannot create the producer: {e}"))?;
        Ok(Self {
            producer: Arc::new(producer),
            cfg: cfg.clone(),
            backbone_partitions: Arc::new(std::sync::atomic::AtomicI32::new(
                cfg.backbone_partitions.max(1),
            )),
        })
    }

    /// The configuration it runs with.
    /// The backbone topic's partition count (the broker's, once the topics are checked).
    pub fn backbone_partitions(&self) -> i32 {
        self.backbone_partitions.load(Ordering::Relaxed).max(1)
    }

    pub fn config(&self) -> &config::Kafka {
        &self.cfg
    }

    /// A consumer configuration for `group`: Plantlink's defaults, then `[kafka.consumer]`.
    /// Offsets are never committed automatically: writers store theirs in PostgreSQL with the
    /// rows and commit to Kafka only after that, so Kafka's offset is never ahead.
    pub fn consumer_config(cfg: &config::Kafka, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers);
        c.set("group.id", group);
        for (k, v) in CONSUMER_DEFAULTS {
            c.set(k, v);
        }
        for (k, v) in &cfg.consumer {
            c.set(k, v);
        }
        c.set("enable.auto.commit", "false");
        c
    }

    /// The (low, high) watermarks of each partition of `topic`.
    pub async fn watermarks(&self, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
        let producer = self.producer.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let client = producer.client();
            let timeout = Duration::from_secs(5);
            let md = client.fetch_metadata(Some(&topic), timeout)?;
            let mut out = Vec::new();
            for t in md.topics() {
                for p in t.partitions() {
                    let (lo, hi) = client.fetch_watermarks(&topic, p.id(), timeout)?;
                    out.push((p.id(), lo, hi));
                }
            }
            out.sort_unstable();
            Ok::<_, KafkaError>(out)
        })
        .await?
        .map_err(|e| anyhow::anyhow!("kafka.brokers = {}: {e}", self.cfg.brokers))
    }

    /// Creates the three topics where missing, with `partitions` and `replication_factor`.
    pub async fn ensure_topics(&self) -> anyhow::Result<()> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.cfg.brokers);
        let admin: AdminClient<DefaultClientContext> = c
            .create()
            .map_err(|e| anyhow::anyhow!("kafka: cannot create the admin client: {e}"))?;
        let names = [
            (&self.cfg.readings_topic, self.cfg.partitions),
            (&self.cfg.alerts_topic, self.cfg.partitions),
            (&self.cfg.dlq_topic, self.cfg.partitions),
            (&self.cfg.backbone_topic, self.cfg.backbone_partitions),
            (
                &self.cfg.backbone_backfill_topic,
                self.cfg.backbone_partitions,
            ),
        ];
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|(n, partitions)| {
                NewTopic::new(
                    n,
                    *partitions,
                    TopicReplication::Fixed(self.cfg.replication_factor),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics(&topics, &opts)
            .await
            .map_err(|e| anyhow::anyhow!("kafka.brokers = {}: {e}", self.cfg.brokers))?;
        for r in results {
            match r {
                Ok(name) => {
                    tracing::info!(topic = %name, partitions = self.cfg.partitions, "Kafka topic created")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, e)) => anyhow::bail!("kafka: cannot create topic {name}: {e}"),
            }
        }
        let n = self.watermarks(&self.cfg.backbone_topic).await?.len() as i32;
        if n > 0 {
            if n != self.cfg.backbone_partitions {
                tracing::info!(topic = %self.cfg.backbone_topic, partitions = n, "the backbone topic has its own partition count; using it");
            }
            self.backbone_partitions.store(n, Ordering::Relaxed);
        }
        let b = self
            .watermarks(&self.cfg.backbone_backfill_topic)
            .await?
            .len() as i32;
        anyhow::ensure!(
            b == 0 || n == 0 || b == n,
            "kafka: {} has {b} partitions and {} has {n}: the backlog lane's topic must have \
             as many as the live one's (a device keeps its partition number on both); \
             recreate it with {n}",
            self.cfg.backbone_backfill_topic,
            self.cfg.backbone_topic
        );
        Ok(())
    }

    /// Produces one accepted batch to the backbone topic: its readings regrouped by the
    /// partition of their (tenant, device) ([`crate::backbone::partition`]), one record per
    /// partition in the batch codec, with the batch's identity in the headers; `refused`
    /// readings (left out by the event-time window) go the same way with their reason, for
    /// the writer to keep in `refused_readings`. Returns the deliveries.
    pub async fn send_backbone(
        &self,
        batch: &crate::backbone::Origin<'_>,
        readings: &[Reading],
        refused: &[(Reading, &'static str)],
    ) -> Deliveries {
        let tracker = Tracker::new();
        let n = self.backbone_partitions.load(Ordering::Relaxed).max(1);
        let topic = if batch.backfill {
            &self.cfg.backbone_backfill_topic
        } else {
            &self.cfg.backbone_topic
        };
        for (partition, reason, payload) in
            crate::backbone::records(batch.tenant, readings, refused, n)
        {
            let headers = batch.headers(reason);
            self.enqueue_to(
                topic,
                Some(partition),
                batch.tenant,
                &payload,
                headers,
                &tracker,
            )
            .await;
        }
        Deliveries::sealed(tracker)
    }

    /// Enqueues one record per reading, in order, and returns their deliveries. Waits
    /// (without blocking the thread) while librdkafka's local queue is full.
    pub async fn send_readings(
        &self,
        tenant: &str,
        gateway: &str,
        readings: &[Reading],
    ) -> Deliveries {
        let tracker = Tracker::new();
        let mut ts_us = String::new();
        let mut records = RecordEncoder::default();
        for r in readings {
            let payload = records.encode(tenant, gateway, r);
            ts_us.clear();
            {
                use std::fmt::Write;
                let _ = write!(ts_us, "{}", r.ts.0);
            }
            let headers = OwnedHeaders::new_with_capacity(4)
                .insert(Header {
                    key: "plantlink-tenant",
                    value: Some(tenant),
                })
                .insert(Header {
                    key: "plantlink-device",
                    value: Some(r.device.as_str()),
                })
                .insert(Header {
                    key: "plantlink-metric",
                    value: Some(r.metric.as_str()),
                })
                .insert(Header {
                    key: "plantlink-ts-us",
                    value: Some(ts_us.as_str()),
                });
            self.enqueue(
                &self.cfg.readings_topic,
                &r.device,
                payload,
                headers,
                &tracker,
            )
            .await;
        }
        Deliveries::sealed(tracker)
    }

    /// Sends a dead letter; its delivery is logged, not awaited.
    pub async fn send_dlq(&self, key: &str, letter: &DeadLetter<'_>) {
        let payload = serde_json::to_vec(letter).unwrap_or_default();
        let tracker = Tracker::new();
        self.enqueue(
            &self.cfg.dlq_topic,
            key,
            &payload,
            OwnedHeaders::new(),
            &tracker,
        )
        .await;
        tokio::spawn(async move {
            if let Err(e) = Deliveries::sealed(tracker).wait().await {
                tracing::error!(error = %e, "dead letter not delivered to Kafka");
            }
        });
    }

    /// Sends a JSON event to the alerts topic, keyed by device; returns its delivery.
    pub async fn send_alert(&self, device: &str, json: &[u8]) -> Deliveries {
        let tracker = Tracker::new();
        self.enqueue(
            &self.cfg.alerts_topic,
            device,
            json,
            OwnedHeaders::new(),
            &tracker,
        )
        .await;
        Deliveries::sealed(tracker)
    }

    /// Enqueues one record counted by `tracker`; a record librdkafka refuses outright is
    /// recorded there as a failure.
    async fn enqueue(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
        tracker: &Arc<Tracker>,
    ) {
        self.enqueue_to(topic, None, key, payload, headers, tracker)
            .await
    }

    /// [`Self::enqueue`] to a chosen partition (`None`: by the key, as librdkafka hashes it).
    async fn enqueue_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
        tracker: &Arc<Tracker>,
    ) {
        tracker.outstanding.fetch_add(1, Ordering::AcqRel);
        let mut record = BaseRecord::with_opaque_to(topic, tracker.clone())
            .key(key)
            .payload(payload)
            .headers(headers);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    tracker.fail(e.to_string());
                    tracker.one_done();
                    return;
                }
            }
        }
    }

    /// Records waiting in librdkafka's local queue (for `/v1/pipeline/lag` and metrics).
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Waits up to `timeout` for every queued record to be delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "Kafka records still queued at shutdown");
        }
    }
}

/// The deliveries of a batch's records.
#[derive(Debug, Default)]
pub struct Deliveries(Option<Arc<Tracker>>);

impl Deliveries {
    /// All records are enqueued: release the tracker's own count.
    fn sealed(tracker: Arc<Tracker>) -> Self {
        tracker.one_done();
        Self(Some(tracker))
    }

    /// Waits for all; `Err` names the first failure.
    pub async fn wait(self) -> Result<(), String> {
        let Some(t) = self.0 else { return Ok(()) };
        while t.outstanding.load(Ordering::Acquire) != 0 {
            t.done.notified().await;
        }
        let first = t
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        first.map_or(Ok(()), Err)
    }
}

/// A value as JSON: a number, or for the values JSON has no number for, `"NaN"`,
/// `"Infinity"` or `"-Infinity"`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Value {
    Number(f64),
    Text(&'static str),
}

fn json_value(v: f64) -> Value {
    if v.is_finite() {
        Value::Number(v)
    } else if v.is_nan() {
        Value::Text("NaN")
    } else if v > 0.0 {
        Value::Text("Infinity")
    } else {
        Value::Text("-Infinity")
    }
}

/// A number as JSON, or `"NaN"`, `"Infinity"`, `"-Infinity"` for those JSON has none for.
pub fn json_number(v: f64) -> serde_json::Value {
    match json_value(v) {
        Value::Number(n) => serde_json::json!(n),
        Value::Text(t) => serde_json::json!(t),
    }
}

/// RFC 3339 in UTC, with milliseconds, or microseconds when the time has them.
pub fn rfc3339(ts_us: i64) -> String {
    let mut s = String::with_capacity(27);
    write_rfc3339(&mut s, ts_us);
    s
}

/// [`rfc3339`], appended to `out` (a time no calendar holds is written as its µs).
pub fn write_rfc3339(out: &mut String, ts_us: i64) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let Ok(t) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_us) * 1000) else {
        let _ = write!(out, "{ts_us}");
        return;
    };
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let us = ts_us.rem_euclid(1_000_000);
    let _ = if us % 1000 == 0 {
        write!(out, "{:03}Z", us / 1000)
    } else {
        write!(out, "{us:06}Z")
    };
}

#[derive(Debug, Serialize)]
struct Record<'a> {
    tenant: &'a str,
    device_id: &'a str,
    metric: &'a str,
    ts: &'a str,
    ts_ms: i64,
    value: Value,
    tags: &'a BTreeMap<String, String>,
    gateway: &'a str,
    seq: Option<u64>,
}

/// The JSON record of one reading on the readings topic.
pub fn record_json(tenant: &str, gateway: &str, r: &Reading) -> Vec<u8> {
    RecordEncoder::default().encode(tenant, gateway, r).to_vec()
}

/// Builds readings-topic records ([`record_json`]) in buffers kept from one reading to the
/// next, so a batch's records cost no allocation each once the buffers have grown.
#[derive(Debug, Default)]
pub struct RecordEncoder {
    json: Vec<u8>,
    ts: String,
}

impl RecordEncoder {
    /// One reading's record; valid until the next call.
    pub fn encode(&mut self, tenant: &str, gateway: &str, r: &Reading) -> &[u8] {
        self.ts.clear();
        write_rfc3339(&mut self.ts, r.ts.0);
        let rec = Record {
            tenant,
            device_id: &r.device,
            metric: &r.metric,
            ts: &self.ts,
            ts_ms: r.ts.0.div_euclid(1000),
            value: json_value(r.value),
            tags: &r.tags,
            gateway,
            seq: r.seq,
        };
        self.json.clear();
        // Every field serialises, and writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.json, &rec);
        &self.json
    }
}

/// A record on the dead-letter topic.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// Why the cloud refused it, e.g. `malformed` or `timestamp_out_of_range`.
    pub reason: &'a str,
    /// The details, for a human.
    pub detail: String,
    /// Tenant, from the gateway's certificate.
    pub tenant: &'a str,
    /// Gateway, from its certificate.
    pub gateway: &'a str,
    /// The batch's sequence number, when a batch was refused.
    pub seq: Option<u64>,
    /// The refused reading, as on the readings topic (when one reading was refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reading: Option<serde_json::Value>,
    /// The refused batch's bytes in hex, cut at 16 KiB (when a batch was refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
    /// The refused batch's full size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_bytes: Option<usize>,
}

/// Hex of at most the first 16 KiB of `bytes`.
pub fn hex_prefix(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len().min(16 << 10) * 2);
    for b in bytes.iter().take(16 << 10) {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use plantlink_model::Timestamp;

    #[test]
    fn records_carry_the_documented_fields() {
        let mut r = Reading::new(
            "x",
            "press01",
            "temperature",
            Timestamp(1_795_000_000_123_000),
            21.5,
        );
        r.seq = Some(7);
        r.tags.insert("line".into(), "2".into());
        let v: serde_json::Value =
            serde_json::from_slice(&record_json("acme", "gw-1", &r)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tenant": "acme", "device_id": "press01", "metric": "temperature",
                "ts": "2026-11-18T11:06:40.123Z", "ts_ms": 1_795_000_000_123i64, "value": 21.5,
                "tags": {"line": "2"}, "gateway": "gw-1", "seq": 7})
        );
        assert_eq!(
            rfc3339(1_795_000_000_123_456),
            "2026-11-18T11:06:40.123456Z"
        );
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999Z");
        r.value = f64::NAN;
        let v: serde_json::Value =
            serde_json::from_slice(&record_json("acme", "gw-1", &r)).unwrap();
        assert_eq!(v["value"], "NaN");
        r.value = f64::NEG_INFINITY;
        let v: serde_json::Value =
            serde_json::from_slice(&record_json("acme", "gw-1", &r)).unwrap();
        assert_eq!(v["value"], "-Infinity");
        assert_eq!(hex_prefix(&[0, 255, 16]), "00ff10");
    }

    #[test]
    fn one_encoder_makes_each_record_as_alone() {
        // Long then short fields: a reused buffer must not keep the tail of the one before.
        let mut long = Reading::new(
            "x",
            "a-device-with-a-long-name",
            "m",
            Timestamp(1_795_000_000_123_456),
            1.0 / 3.0,
        );
        long.tags.insert("k".into(), "v".repeat(40));
        let short = Reading::new("x", "d", "m", Timestamp(0), 2.0);
        let far = Reading::new("x", "d", "m", Timestamp(i64::MAX), 2.0);
        let mut enc = RecordEncoder::default();
        for r in [&long, &short, &far, &long] {
            assert_eq!(
                enc.encode("acme", "gw-1", r),
                record_json("acme", "gw-1", r)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(enc.encode("acme", "gw-1", &short)).unwrap();
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
    }
}
