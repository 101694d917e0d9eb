//! The scale-out mode's backbone: Kafka's internal topic between receivers and writers
//! (`cloud-ingest run --role receiver` and `--role writer`).
//!
//! **Records.** A receiver regroups each accepted batch by the partition of each reading's
//! (tenant, device) ([`partition`]) and produces one record per partition: the readings in
//! the batch codec (columnar, zstd; a few bytes a reading where the public JSON record takes
//! about 150), keyed by the tenant, with the batch's identity in the headers
//! (`plantlink-format`, `plantlink-tenant`, `plantlink-gateway`, `plantlink-seq`,
//! `plantlink-backfill`). Readings the event-time window left out travel the same way, in
//! records of their own with `plantlink-refused` naming the reason, so the writer keeps them
//! in `refused_readings`. A device's readings stay in order in one partition, and one writer
//! owns them. The receiver acknowledges the gateway once Kafka has every record.
//!
//! **Writers** are a consumer group ([`Writer`]). Each round takes what its partitions hold
//! (up to `postgres.flush_max_readings`), writes it in one transaction together with the
//! partitions' next offsets in `pipeline_offsets` ([`crate::postgres::write_advancing`]),
//! and only then commits the offsets to Kafka too (for lag tools; Kafka's offset is never
//! ahead of the table's). On assignment a writer reads the table and seeks there, whatever
//! Kafka's committed offset says; a record below the stored offset is skipped. The offset
//! update is fenced (it applies only from the offset the writer read), so a writer that lost
//! a partition while it wrote cannot commit that partition twice: its round rolls back and it
//! reads the table again. A writer killed mid-round leaves nothing committed; whoever takes
//! its partitions starts from the table. So every record reaches PostgreSQL exactly once.
//! While a round waits on a slow database for more than [`PAUSE_AFTER`], the writer pauses
//! its partitions: what it holds is one round plus librdkafka's bounded prefetch
//! (`queued.max.messages.kbytes`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use plantlink_model::Reading;
use plantlink_wire::{BatchDecoder, Limits};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::kafka::{DeadLetter, Kafka};

pub mod alerting;
use crate::postgres::{self, Advance, Part, RefusedPart};
use crate::sink::Sink;

/// The record format this release writes and reads.
pub const FORMAT: &str = "batch/1";

/// How long a round may wait on the database before the writer pauses its partitions.
pub const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// How long a round gathers records after its first one.
const LINGER: Duration = Duration::from_millis(50);

/// How often a writer reports its lag.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// The partition of (`tenant`, `device`) among `partitions`: FNV-1a (64 bits) over the
/// tenant, a zero byte and the device, modulo the count. Stable across releases and
/// processes, so every receiver sends a device to the same partition.
pub fn partition(tenant: &str, device: &str, partitions: i32) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(device.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1).unsigned_abs())) as i32
}

/// Where an accepted batch came from: what every record of it carries in its headers.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The tenant, from the gateway's certificate.
    pub tenant: &'a str,
    /// The gateway, from its certificate.
    pub gateway: &'a str,
    /// The gateway's batch sequence number.
    pub seq: u64,
    /// Whether it came on the backlog lane.
    pub backfill: bool,
}

impl Origin<'_> {
    /// The headers of one of its records; `refused` names the reason of a refused group.
    pub fn headers(&self, refused: Option<&str>) -> OwnedHeaders {
        let seq = self.seq.to_string();
        let mut h = OwnedHeaders::new_with_capacity(6)
            .insert(Header {
                key: "plantlink-format",
                value: Some(FORMAT),
            })
            .insert(Header {
                key: "plantlink-tenant",
                value: Some(self.tenant),
            })
            .insert(Header {
                key: "plantlink-gateway",
                value: Some(self.gateway),
            })
            .insert(Header {
                key: "plantlink-seq",
                value: Some(seq.as_str()),
            })
            .insert(Header {
                key: "plantlink-backfill",
                value: Some(if self.backfill { "1" } else { "0" }),
            });
        if let Some(why) = refused {
            h = h.insert(Header {
                key: "plantlink-refused",
                value: Some(why),
            });
        }
        h
    }
}

/// The records of one batch: (partition, refusal reason, payload in the batch codec), the
/// accepted readings grouped by partition, the refused ones by partition and reason.
pub fn records(
    tenant: &str,
    readings: &[Reading],
    refused: &[(Reading, &'static str)],
    partitions: i32,
) -> Vec<(i32, Option<&'static str>, Vec<u8>)> {
    let mut groups: BTreeMap<(i32, Option<&'static str>), Vec<Reading>> = BTreeMap::new();
    for r in readings {
        groups
            .entry((partition(tenant, &r.device, partitions), None))
            .or_default()
            .push(r.clone());
    }
    for (r, why) in refused {
        groups
            .entry((partition(tenant, &r.device, partitions), Some(*why)))
            .or_default()
            .push(r.clone());
    }
    groups
        .into_iter()
        .map(|((p, why), rs)| (p, why, plantlink_wire::batch::encode_batch(&rs)))
        .collect()
}

/// One backbone record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The tenant.
    pub tenant: Arc<str>,
    /// The gateway.
    pub gateway: Arc<str>,
    /// The gateway's batch sequence number.
    pub seq: u64,
    /// Whether it came on the backlog lane.
    pub backfill: bool,
    /// The reason the window refused these readings; `None` for accepted ones.
    pub refused: Option<String>,
    /// The readings, with the tenant set.
    pub readings: Vec<Reading>,
}

/// Decodes a record's headers and payload; the error says what is wrong.
pub fn decode(
    headers: Option<&rdkafka::message::BorrowedHeaders>,
    payload: Option<&[u8]>,
    decoder: &mut BatchDecoder,
) -> Result<Record, String> {
    let mut get: HashMap<&str, &str> = HashMap::new();
    if let Some(h) = headers {
        for i in 0..h.count() {
            let hd = h.get(i);
            if let Some(v) = hd.value.and_then(|v| std::str::from_utf8(v).ok()) {
                get.insert(hd.key, v);
            }
        }
    }
    let format = get.get("plantlink-format").copied().unwrap_or("");
    if format != FORMAT {
        return Err(format!(
            "plantlink-format {format:?}: this release reads {FORMAT:?} (a newer receiver wrote it?)"
        ));
    }
    let need = |k: &str| {
        get.get(k)
            .copied()
            .ok_or_else(|| format!("header {k} missing"))
    };
    let tenant = need("plantlink-tenant")?;
    let gateway = need("plantlink-gateway")?;
    let seq = need("plantlink-seq")?
        .parse()
        .map_err(|e| format!("header plantlink-seq: {e}"))?;
    let backfill = get.get("plantlink-backfill") == Some(&"1");
    let payload = payload.ok_or("no payload")?;
    let mut readings = decoder
        .decode(payload)
        .map_err(|e| format!("payload: {e}"))?;
    for r in &mut readings {
        r.tenant = tenant.to_owned();
    }
    Ok(Record {
        tenant: Arc::from(tenant),
        gateway: Arc::from(gateway),
        seq,
        backfill,
        refused: get.get("plantlink-refused").map(|s| (*s).to_owned()),
        readings,
    })
}

/// The consumer's context: counts rebalances, so the writer knows to read its positions
/// again from the table.
/// It also exports `plantlink_cloud_consumer_partitions{group}`: the partitions held.
#[derive(Debug, Default)]
pub struct Rebalances(Arc<AtomicU64>, String);

impl Rebalances {
    /// The context of a member of `group`.
    pub fn of(group: &str) -> Self {
        Self(Arc::default(), group.to_owned())
    }
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        let held = gauge!("plantlink_cloud_consumer_partitions", "group" => self.1.clone());
        match r {
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.1, partitions = tpl.count(), "backbone partitions assigned");
                held.set(tpl.count() as f64);
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(group = %self.1, partitions = tpl.count(), "backbone partitions revoked");
                held.set(0.0);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "backbone rebalance failed"),
        }
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Where a writer stands on one partition.
#[derive(Debug, Clone, Copy)]
struct Position {
    /// The offset stored in `pipeline_offsets` as this writer last read or wrote it.
    stored: Option<i64>,
    /// The next offset to take (stored, or the partition's start when none is).
    next: i64,
    /// Set after a seek: records are skipped until the one at `next` comes.
    seeking: bool,
    /// When the seek was made (a seek that never brings `next` is made again).
    since: Instant,
}

/// How long a writer waits for the record it sought before reading the table and the
/// partition's start again (retention may have deleted it meanwhile).
const SEEK_PATIENCE: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("group", &self.group)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// A writer: one member of the writers' consumer group.
pub struct Writer {
    consumer: Arc<StreamConsumer<Rebalances>>,
    generation: Arc<AtomicU64>,
    seen: u64,
    group: String,
    topic: String,
    sink: Sink,
    kafka: Kafka,
    url: String,
    db: Option<tokio_postgres::Client>,
    positions: HashMap<i32, Position>,
    decoder: BatchDecoder,
    max_readings: usize,
    exported: Vec<i32>,
}

impl Writer {
    /// Joins `group` on the backbone `topic` of `kafka` (one lane: see
    /// [`crate::config::Kafka::lanes`]), writing through `sink`.
    pub fn new(
        kafka: Kafka,
        sink: Sink,
        url: &str,
        max_readings: usize,
        (topic, group): (&str, &str),
    ) -> anyhow::Result<Self> {
        let cfg = kafka.config().clone();
        let ctx = Rebalances::of(group);
        let generation = ctx.0.clone();
        let consumer: StreamConsumer<Rebalances> = Kafka::consumer_config(&cfg, group)
            .create_with_context(ctx)
            .map_err(|e| anyhow::anyhow!("kafka: cannot create the writer's consumer: {e}"))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| anyhow::anyhow!("kafka: cannot subscribe to {topic}: {e}"))?;
        gauge!("plantlink_cloud_writer_paused").set(0.0);
        Ok(Self {
            consumer: Arc::new(consumer),
            generation,
            seen: 0,
            group: group.to_owned(),
            topic: topic.to_owned(),
            sink,
            kafka,
            url: url.to_owned(),
            db: None,
            positions: HashMap::new(),
            decoder: BatchDecoder::new(Limits::default()),
            max_readings: max_readings.max(1),
            exported: Vec::new(),
        })
    }

    /// Writes rounds until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        tracing::info!(group = %self.group, topic = %self.topic, "writer consuming the backbone");
        let mut last_lag = Instant::now();
        // Messages borrow the consumer, not the writer they are taken into.
        let consumer = self.consumer.clone();
        loop {
            let mut round = Round::default();
            let first = tokio::select! {
                m = consumer.recv() => Some(m),
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep(LAG_EVERY) => None,
            };
            if let Some(m) = first {
                self.take(m, &mut round).await;
                let deadline = tokio::time::Instant::now() + LINGER;
                while round.readings() < self.max_readings {
                    tokio::select! {
                        m = consumer.recv() => self.take(m, &mut round).await,
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            if !round.is_empty() {
                self.write(round).await;
            }
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = Instant::now();
                self.report_lag().await;
            }
        }
    }

    /// Takes one consumed message into `round`, or skips it.
    async fn take(
        &mut self,
        m: Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>,
        round: &mut Round,
    ) {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "backbone consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        };
        let generation = self.generation.load(Ordering::Acquire);
        if generation != self.seen {
            // Partitions moved: what this writer knew of the table may be stale.
            self.seen = generation;
            self.positions.clear();
        }
        let (p, off) = (m.partition(), m.offset());
        let pos = match self.positions.get(&p) {
            Some(pos) => *pos,
            None => self.load_until(p).await,
        };
        let next = round.next_of(p).unwrap_or(pos.next);
        if off < next {
            counter!("plantlink_cloud_backbone_records_skipped_total").increment(1);
            return;
        }
        if off > next {
            if !pos.seeking {
                self.seek(p, next);
                self.positions.insert(
                    p,
                    Position {
                        seeking: true,
                        since: Instant::now(),
                        ..pos
                    },
                );
            } else if pos.since.elapsed() > SEEK_PATIENCE && round.next_of(p).is_none() {
                tracing::warn!(
                    partition = p,
                    want = next,
                    got = off,
                    "the sought backbone record did not come; reading the table and the partition's start again"
                );
                self.load_until(p).await;
            }
            return;
        }
        if pos.seeking {
            self.positions.insert(
                p,
                Position {
                    seeking: false,
                    ..pos
                },
            );
        }
        let record = match decode(m.headers(), m.payload(), &mut self.decoder) {
            Ok(r) => Some(r),
            Err(why) => {
                counter!("plantlink_cloud_backbone_records_undecodable_total").increment(1);
                tracing::error!(partition = p, offset = off, %why, "an undecodable backbone record goes to the DLQ");
                let payload = m.payload().unwrap_or_default();
                let detail = format!("backbone record {}/{p}@{off}: {why}", self.topic);
                let letter = DeadLetter {
                    reason: "undecodable",
                    detail,
                    tenant: "",
                    gateway: "",
                    seq: None,
                    reading: None,
                    payload_hex: Some(crate::kafka::hex_prefix(payload)),
                    payload_bytes: Some(payload.len()),
                };
                self.kafka.send_dlq(&self.topic, &letter).await;
                None
            }
        };
        round.push(p, pos.stored, off, record);
    }

    /// [`Self::load`], again and again with a growing pause until it succeeds (the database
    /// or Kafka may be away; nothing of `p` can be taken meanwhile).
    async fn load_until(&mut self, p: i32) -> Position {
        let mut wait = Duration::from_millis(200);
        loop {
            match self.load(p).await {
                Ok(pos) => return pos,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, retry_in = ?wait, "cannot read this partition's offset from pipeline_offsets");
                    self.db = None;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Reads partition `p`'s stored offset, and seeks there.
    async fn load(&mut self, p: i32) -> anyhow::Result<Position> {
        if self.db.as_ref().is_none_or(|c| c.is_closed()) {
            self.db = Some(postgres::connect(&self.url).await?);
        }
        let db = self.db.as_ref().expect("connected above");
        let stored = postgres::committed_offset(db, &self.group, &self.topic, p).await?;
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let (low, _) = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))
        })
        .await??;
        let next = match stored {
            Some(s) if s < low => {
                tracing::error!(
                    partition = p,
                    stored = s,
                    earliest = low,
                    "records of this partition were deleted by Kafka's retention before the \
                     writers stored them; raise the backbone topic's retention.ms above the \
                     longest database outage"
                );
                counter!("plantlink_cloud_backbone_records_lost_total").increment((low - s) as u64);
                low
            }
            Some(s) => s,
            None => low,
        };
        let pos = Position {
            stored,
            next,
            seeking: true,
            since: Instant::now(),
        };
        self.positions.insert(p, pos);
        self.seek(p, next);
        Ok(pos)
    }

    /// Seeks partition `p` to `to`. If that fails, the position is forgotten, so the next
    /// record of `p` reads the table and seeks again.
    fn seek(&mut self, p: i32, to: i64) {
        if let Err(e) =
            self.consumer
                .seek(&self.topic, p, Offset::Offset(to), Duration::from_secs(5))
        {
            tracing::warn!(partition = p, error = %e, "backbone seek failed; trying again with the partition's next record");
            self.positions.remove(&p);
        }
    }

    /// After a round that did not commit (or committed only in part): every partition of it
    /// is read from the table's offset again, at once.
    async fn reread(&mut self, offsets: &[Advance]) {
        for a in offsets {
            self.positions.remove(&a.partition);
            self.load_until(a.partition).await;
        }
    }

    /// The last resort for a round PostgreSQL refused: its records one by one, each with its
    /// own offset, so that only a record the database refuses is kept in `refused_readings`
    /// (reason `storage_refused`) instead of its rows, and the partitions move on.
    async fn write_one_by_one(&mut self, round: &Round) -> crate::sink::Outcome2 {
        let mut stored: BTreeMap<i32, Option<i64>> =
            round.ranges.iter().map(|(p, (e, _))| (*p, *e)).collect();
        let mut conflicts = Vec::new();
        for (p, off, r) in &round.records {
            let advance = [Advance {
                group: self.group.clone(),
                topic: self.topic.clone(),
                partition: *p,
                expected: stored.get(p).copied().flatten(),
                next: off + 1,
            }];
            let why = r.refused.as_deref();
            let as_refused: Vec<(Reading, &str)> = r
                .readings
                .iter()
                .map(|x| (x.clone(), why.unwrap_or("storage_refused")))
                .collect();
            let kept = [RefusedPart {
                tenant: &r.tenant,
                gateway: &r.gateway,
                readings: &as_refused,
            }];
            let part = [Part {
                tenant: &r.tenant,
                gateway: &r.gateway,
                readings: &r.readings,
            }];
            let mut result = if why.is_some() {
                self.sink.write_round(&[], &kept, &advance).await
            } else {
                self.sink.write_round(&part, &[], &advance).await
            };
            if let Err(e) = &result {
                tracing::error!(partition = p, offset = off, tenant = %r.tenant, gateway = %r.gateway, readings = r.readings.len(), error = %e, "PostgreSQL refused a backbone record; its readings are kept in refused_readings (reason storage_refused)");
                counter!("plantlink_cloud_backbone_records_refused_total").increment(1);
                result = self.sink.write_round(&[], &kept, &advance).await;
            }
            match result? {
                Some(c) => conflicts.extend(c),
                None => return Ok(None),
            }
            stored.insert(*p, Some(off + 1));
        }
        // Undecodable records after the last decodable one of a partition: move past them.
        let rest: Vec<Advance> = round
            .ranges
            .iter()
            .filter(|(p, (_, next))| stored.get(p).copied().flatten() != Some(*next))
            .map(|(p, (_, next))| Advance {
                group: self.group.clone(),
                topic: self.topic.clone(),
                partition: *p,
                expected: stored.get(p).copied().flatten(),
                next: *next,
            })
            .collect();
        if !rest.is_empty() && self.sink.write_round(&[], &[], &rest).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(conflicts))
    }

    /// Writes `round` with its offsets, pausing the partitions while the database is slow.
    async fn write(&mut self, round: Round) {
        let offsets = round.advances(&self.group, &self.topic);
        let records: Vec<&Record> = round.records.iter().map(|(_, _, r)| r).collect();
        let parts: Vec<Part<'_>> = records
            .iter()
            .filter(|r| r.refused.is_none())
            .map(|r| Part {
                tenant: &r.tenant,
                gateway: &r.gateway,
                readings: &r.readings,
            })
            .collect();
        let refused_readings: Vec<Vec<(Reading, &str)>> = records
            .iter()
            .filter_map(|r| {
                let why = r.refused.as_deref()?;
                Some(r.readings.iter().map(|x| (x.clone(), why)).collect())
            })
            .collect();
        let refused: Vec<RefusedPart<'_>> = records
            .iter()
            .filter(|r| r.refused.is_some())
            .zip(&refused_readings)
            .map(|(r, readings)| RefusedPart {
                tenant: &r.tenant,
                gateway: &r.gateway,
                readings,
            })
            .collect();
        let sink = self.sink.clone();
        let write = sink.write_round(&parts, &refused, &offsets);
        tokio::pin!(write);
        let mut paused: Option<TopicPartitionList> = None;
        let result = loop {
            tokio::select! {
                r = &mut write => break r,
                _ = tokio::time::sleep(PAUSE_AFTER), if paused.is_none() => {
                    if let Ok(a) = self.consumer.assignment()
                        && self.consumer.pause(&a).is_ok()
                    {
                        tracing::warn!(partitions = a.count(), "the database is slow; the writer pauses its partitions until this round is written");
                        gauge!("plantlink_cloud_writer_paused").set(1.0);
                        paused = Some(a);
                    }
                }
            }
        };
        if let Some(a) = paused {
            let _ = self.consumer.resume(&a);
            gauge!("plantlink_cloud_writer_paused").set(0.0);
        }
        let result = match result {
            Err(e) => {
                // PostgreSQL refused the rows for good (what the receivers' checks let
                // through but the database will not hold): record by record, so that only
                // what it refuses is kept aside and the partitions move on.
                tracing::warn!(error = %e, records = round.records.len(), "PostgreSQL refused a backbone round; writing its records one by one");
                self.write_one_by_one(&round).await
            }
            ok => ok,
        };
        match result {
            Ok(Some(conflicts)) => {
                let mut tpl = TopicPartitionList::new();
                for a in &offsets {
                    self.positions.insert(
                        a.partition,
                        Position {
                            stored: Some(a.next),
                            next: a.next,
                            seeking: false,
                            since: Instant::now(),
                        },
                    );
                    let _ =
                        tpl.add_partition_offset(&self.topic, a.partition, Offset::Offset(a.next));
                }
                if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                    tracing::debug!(error = %e, "Kafka offset commit failed (the table has them)");
                }
                counter!("plantlink_cloud_backbone_records_written_total")
                    .increment(round.records() as u64);
                report_conflicts(&self.kafka, &conflicts).await;
            }
            Ok(None) => {
                tracing::info!(
                    "another writer moved one of these partitions meanwhile; reading their offsets again"
                );
                counter!("plantlink_cloud_backbone_rounds_fenced_total").increment(1);
                self.reread(&offsets).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "a backbone round was not written; reading its partitions again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.reread(&offsets).await;
            }
        }
    }

    /// Exports `plantlink_cloud_consumer_lag{group,topic,partition}` for the partitions this
    /// writer holds: the end offset minus the stored one.
    async fn report_lag(&mut self) {
        // Partitions that moved away since the last record are not this writer's to report.
        let generation = self.generation.load(Ordering::Acquire);
        if generation != self.seen {
            self.seen = generation;
            self.positions.clear();
        }
        let Ok(marks) = self.kafka.watermarks(&self.topic).await else {
            return;
        };
        let lags = marks.into_iter().filter_map(|(p, _, high)| {
            let pos = self.positions.get(&p)?;
            Some((p, (high - pos.stored.unwrap_or(pos.next)).max(0)))
        });
        let lags: Vec<(i32, i64)> = lags.collect();
        export_lag(&self.group, &self.topic, &lags, &mut self.exported);
    }
}

/// Exports `plantlink_cloud_consumer_lag{group,topic,partition}` for the partitions held
/// (`lags`), and 0 for those this member exported before and holds no longer, so that a
/// partition that moved shows only its new owner's lag.
fn export_lag(group: &str, topic: &str, lags: &[(i32, i64)], exported: &mut Vec<i32>) {
    let gauge = |p: i32| gauge!("plantlink_cloud_consumer_lag", "group" => group.to_owned(), "topic" => topic.to_owned(), "partition" => p.to_string());
    for p in exported.iter() {
        if !lags.iter().any(|(q, _)| q == p) {
            gauge(*p).set(0.0);
        }
    }
    for (p, lag) in lags {
        gauge(*p).set(*lag as f64);
    }
    *exported = lags.iter().map(|(p, _)| *p).collect();
}

/// Reports the conflicts a round found, per tenant and gateway, as the receiver does in the
/// single-node mode.
async fn report_conflicts(kafka: &Kafka, conflicts: &[postgres::Conflict]) {
    let mut by: BTreeMap<(&str, &str), Vec<postgres::Conflict>> = BTreeMap::new();
    for c in conflicts {
        by.entry((&c.tenant, &c.gateway))
            .or_default()
            .push(c.clone());
    }
    for ((tenant, gateway), cs) in by {
        crate::server::report_conflicts_to(Some(kafka), tenant, gateway, None, &cs).await;
    }
}

/// What one writer round takes: records of its partitions in offset order, and how far
/// each partition goes.
#[derive(Debug, Default)]
pub struct Round {
    /// (partition, offset, record) of the decodable records, in the order taken.
    records: Vec<(i32, i64, Record)>,
    /// Partition -> (the offset stored when the round began, the next offset after it).
    ranges: BTreeMap<i32, (Option<i64>, i64)>,
    readings: usize,
    taken: usize,
}

impl Round {
    /// Takes the record at `offset` of partition `p`, whose stored offset is `stored`; an
    /// undecodable one only moves the offset (it went to the DLQ).
    fn push(&mut self, p: i32, stored: Option<i64>, offset: i64, record: Option<Record>) {
        self.ranges.entry(p).or_insert((stored, offset)).1 = offset + 1;
        self.taken += 1;
        if let Some(r) = record {
            self.readings += r.readings.len();
            self.records.push((p, offset, r));
        }
    }

    /// The next offset of `p` after what the round holds, if it holds any of `p`.
    fn next_of(&self, p: i32) -> Option<i64> {
        self.ranges.get(&p).map(|r| r.1)
    }

    fn readings(&self) -> usize {
        self.readings
    }

    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Records taken, decodable or not.
    fn records(&self) -> usize {
        self.taken
    }

    /// The offsets to store with the round's rows.
    fn advances(&self, group: &str, topic: &str) -> Vec<Advance> {
        self.ranges
            .iter()
            .map(|(p, (expected, next))| Advance {
                group: group.to_owned(),
                topic: topic.to_owned(),
                partition: *p,
                expected: *expected,
                next: *next,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plantlink_model::Timestamp;

    #[test]
    fn a_device_always_lands_in_one_partition_and_tenants_spread() {
        assert_eq!(
            partition("acme", "pump-1", 12),
            partition("acme", "pump-1", 12)
        );
        assert!((0..12).contains(&partition("acme", "pump-1", 12)));
        assert_eq!(partition("acme", "pump-1", 1), 0);
        // The tenant takes part: the same device name spreads over partitions by tenant.
        let ps: std::collections::BTreeSet<i32> = (0..50)
            .map(|t| partition(&format!("t{t}"), "pump-1", 12))
            .collect();
        assert!(ps.len() > 6, "{ps:?}");
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(partition("ab", "c", 1 << 30), partition("a", "bc", 1 << 30));
    }

    #[test]
    fn records_regroup_by_partition_and_decode_back() {
        let rs: Vec<Reading> = (0..40)
            .map(|i| {
                Reading::new(
                    "",
                    format!("dev-{}", i % 8),
                    "temperature",
                    Timestamp(1_800_000_000_000_000 + i),
                    i as f64,
                )
            })
            .collect();
        let refused = vec![(rs[0].clone(), "too_old")];
        let recs = records("acme", &rs, &refused, 4);
        let origin = Origin {
            tenant: "acme",
            gateway: "gw-1",
            seq: 7,
            backfill: true,
        };
        let mut back = Vec::new();
        let mut dec = BatchDecoder::new(Limits::default());
        for (p, why, payload) in &recs {
            assert!((0..4).contains(p));
            let h = origin.headers(*why);
            let r = decode_owned(&h, payload, &mut dec).unwrap();
            assert_eq!(
                (&*r.tenant, &*r.gateway, r.seq, r.backfill),
                ("acme", "gw-1", 7, true)
            );
            assert_eq!(r.refused.as_deref(), *why);
            for x in &r.readings {
                assert_eq!(partition("acme", &x.device, 4), *p);
                assert_eq!(x.tenant, "acme");
            }
            if why.is_none() {
                back.extend(r.readings);
            }
        }
        back.sort_by_key(|r| r.ts.0);
        let mut want = rs.clone();
        for r in &mut want {
            r.tenant = "acme".into();
        }
        assert_eq!(back, want);
        // A few bytes a reading, not JSON's ~150.
        let bytes: usize = recs.iter().map(|r| r.2.len()).sum();
        assert!(bytes < 40 * 20, "{bytes} bytes for 40 readings");
    }

    /// [`decode`] over owned headers, as a consumer would see them.
    fn decode_owned(
        h: &OwnedHeaders,
        payload: &[u8],
        dec: &mut BatchDecoder,
    ) -> Result<Record, String> {
        decode(Some(h.as_borrowed()), Some(payload), dec)
    }
}
