//! The alerting role of the scale-out mode (`cloud-ingest run --role alerting`): a consumer
//! group on the backbone topic that evaluates the rules of the partitions it holds.
//!
//! **One engine per partition.** A device's readings are in one partition, in order, so
//! each partition's windows are a state of their own. When a partition comes to a member
//! (at start, or from a member that left or died), the member rebuilds that state:
//! 1. it reads, after everything it has queued for delivery, the group's stored offset of
//!    the partition (`pipeline_offsets.committed_offset`: every transition of the records
//!    below it is delivered), its rebuild point (`replay_from`) and the open alerts of the
//!    partition's devices from `alerts`;
//! 2. it replays the records from the rebuild point up to the stored offset without
//!    emitting anything: the windows, streaks and alert states are as they were;
//! 3. from the stored offset on, it emits.
//!
//! The rebuild point trails the newest record by the longest rule's reach (window length
//! times `for_windows` plus one, plus the lateness; at least [`MIN_REACH`]), measured in
//! event time: the newest live reading's time seen on the partition. (Backfill records do
//! not move that clock; a backfill window older than the reach is rebuilt only in part.) A group with nothing stored starts where its consumer
//! does: at the earliest record the backbone retains (`auto.offset.reset=earliest`, as for
//! the writers), so a new alerting group evaluates what Kafka still holds.
//!
//! **Never lost, never twice.** Offsets are stored only after the events of the records
//! below them are delivered ([`crate::alerting::deliver`]), so a member killed at any point
//! leaves its successor to emit again what might not have been delivered. What is emitted
//! again has the same [`crate::alerting::deliver::event_id`]: `alerts` stores it once, and
//! consumers of the Kafka alerts topic can drop the second copy by its id.
//!
//! Live and backfill readings keep their lanes (the backbone's `plantlink-backfill`
//! header), as in the single-node mode. Absence rules count silence on processing time,
//! from when the member took the partition. Per-tenant caps apply per partition.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use plantlink_wire::{BatchDecoder, Limits};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Rebalances, decode, partition};
use crate::alerting::deliver::{Delivery, Offsets, Stand, deliver, webhooks};
use crate::alerting::engine::{Engine, Input, Output, Settings};
use crate::alerting::rule::{Condition, Rule};
use crate::alerting::service::{load_rules, settings};
use crate::config::Alerting;
use crate::kafka::Kafka;

/// The shortest rebuild reach, whatever the rules.
pub const MIN_REACH: Duration = Duration::from_secs(60);

/// How far back a rebuild must start for `rules`: the longest window times its
/// `for_windows` plus one, plus the lateness and the out-of-orderness bound.
pub fn reach_ms(rules: &[Rule], s: &Settings) -> i64 {
    let longest = rules
        .iter()
        .filter_map(|r| match r.condition {
            Condition::Threshold {
                window,
                for_windows,
                ..
            } => Some(window.span_step_us().0 * (i64::from(for_windows) + 1)),
            Condition::Absence { .. } => None,
        })
        .max()
        .unwrap_or(0);
    ((longest + s.allowed_lateness_us + s.out_of_orderness_us) / 1000)
        .max(MIN_REACH.as_millis() as i64)
}

/// One partition's engine and where it stands.
struct Part {
    engine: Engine,
    /// Records from here on are emitted; below, they only rebuild the state.
    emit_from: i64,
    /// The next offset to evaluate.
    next: i64,
    /// Set after a seek, until the record at `next` comes.
    seeking: bool,
    since: Instant,
    /// Where a rebuild would start now.
    replay_from: i64,
    /// (event time ms, offset), about one a second, to move `replay_from` on.
    samples: VecDeque<(i64, i64)>,
    /// The newest live event time seen, ms.
    clock_ms: i64,
}

impl Part {
    /// Notes the record at `offset` at event time `ts_ms`, and moves the rebuild
    /// point to the newest sample at least `reach_ms` older.
    fn sample(&mut self, ts_ms: i64, offset: i64, reach_ms: i64) {
        if self.samples.back().is_none_or(|b| ts_ms >= b.0 + 1000) {
            self.samples.push_back((ts_ms, offset));
        }
        let cut = ts_ms - reach_ms;
        while self.samples.len() >= 2 && self.samples[1].0 <= cut {
            self.samples.pop_front();
        }
        if let Some(&(ts, off)) = self.samples.front()
            && ts <= cut
        {
            self.replay_from = self.replay_from.max(off);
        }
    }
}

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerter")
            .field("group", &self.group)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// A member of the alerting consumer group.
pub struct Alerter {
    consumer: Arc<StreamConsumer<Rebalances>>,
    generation: Arc<AtomicU64>,
    seen: u64,
    group: String,
    topic: String,
    partitions: i32,
    url: String,
    db: Option<tokio_postgres::Client>,
    cfg: Alerting,
    settings: Settings,
    rules: Vec<Rule>,
    reach_ms: i64,
    parts: HashMap<i32, Part>,
    decoder: BatchDecoder,
    queue: mpsc::Sender<Delivery>,
    stale: Arc<Mutex<HashSet<i32>>>,
    kafka: Kafka,
    out: Vec<Output>,
    exported: Vec<i32>,
}

impl Alerter {
    /// Joins the alerting group on the backbone of `kafka` (whose topics are checked, so the
    /// partition count is known) and starts its delivery task on `tasks`.
    pub fn new(
        kafka: Kafka,
        cfg: Alerting,
        url: &str,
        tasks: &mut tokio::task::JoinSet<()>,
        (topic, group): (&str, &str),
    ) -> anyhow::Result<Self> {
        let k = kafka.config().clone();
        let ctx = Rebalances::of(group);
        let generation = ctx.0.clone();
        let consumer: StreamConsumer<Rebalances> = Kafka::consumer_config(&k, group)
            .create_with_context(ctx)
            .map_err(|e| anyhow::anyhow!("kafka: cannot create the alerting consumer: {e}"))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| anyhow::anyhow!("kafka: cannot subscribe to {topic}: {e}"))?;
        let stale = Arc::new(Mutex::new(HashSet::new()));
        let (queue, rx) = mpsc::channel(cfg.queue);
        let offsets = Offsets::new(group, topic, stale.clone());
        let hooks = webhooks(&cfg, tasks);
        tasks.spawn(deliver(
            rx,
            url.to_owned(),
            Some(kafka.clone()),
            hooks,
            Some(offsets),
        ));
        let settings = settings(&cfg);
        Ok(Self {
            consumer: Arc::new(consumer),
            generation,
            seen: 0,
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions: kafka.backbone_partitions(),
            url: url.to_owned(),
            db: None,
            cfg,
            settings,
            rules: Vec::new(),
            reach_ms: reach_ms(&[], &settings),
            parts: HashMap::new(),
            decoder: BatchDecoder::new(Limits::default()),
            queue,
            stale,
            kafka,
            out: Vec::new(),
            exported: Vec::new(),
        })
    }

    /// Evaluates until `shutdown` turns true; the delivery task then delivers what is queued
    /// and stores the offsets.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        while !self.reload_rules().await {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
        tracing::info!(group = %self.group, topic = %self.topic, rules = self.rules.len(), "alerting consuming the backbone");
        let consumer = self.consumer.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.tick_ms));
        let mut poll = tokio::time::interval(Duration::from_millis(self.cfg.rules_reload_ms));
        let mut lag = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                m = consumer.recv() => self.take(m).await,
                _ = tick.tick() => self.tick().await,
                _ = poll.tick() => { self.reload_rules().await; }
                _ = lag.tick() => self.report_lag().await,
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Reads the rules again and gives them to every engine; `false` if they could not be
    /// read.
    async fn reload_rules(&mut self) -> bool {
        if self.db.as_ref().is_none_or(|c| c.is_closed()) {
            match crate::postgres::connect(&self.url).await {
                Ok(c) => self.db = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "alerting: PostgreSQL unavailable; retrying");
                    return false;
                }
            }
        }
        let Some(c) = &self.db else { return false };
        match load_rules(c).await {
            Ok(rules) => {
                gauge!("plantlink_cloud_alert_rules_loaded").set(rules.len() as f64);
                if rules != self.rules {
                    self.reach_ms = reach_ms(&rules, &self.settings);
                    for p in self.parts.values_mut() {
                        p.engine.set_rules(rules.clone());
                    }
                    self.rules = rules;
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "alerting: cannot read the rules");
                self.db = None;
                false
            }
        }
    }

    /// Processing time passes for every engine; only partitions past their rebuild emit.
    /// After a rebalance, drops every engine: a partition still held is rebuilt from the
    /// table and Kafka when its next record comes, and one that went elsewhere neither ticks
    /// (its absence rules would fire for devices now reporting to another member) nor
    /// reports lag here.
    fn forget_if_moved(&mut self) {
        let generation = self.generation.load(Ordering::Acquire);
        if generation != self.seen {
            self.seen = generation;
            self.parts.clear();
        }
    }

    async fn tick(&mut self) {
        self.forget_if_moved();
        let now = now_us();
        let mut events = Vec::new();
        for p in self.parts.values_mut() {
            p.engine.on_tick(now, &mut self.out);
            if p.next >= p.emit_from {
                events.append(&mut self.out);
            } else {
                self.out.clear();
            }
        }
        for o in events {
            self.emit(o).await;
        }
    }

    async fn emit(&self, o: Output) {
        match o {
            Output::Alert(a) => {
                let state = match a.state {
                    crate::alerting::engine::AlertState::Firing => "firing",
                    crate::alerting::engine::AlertState::Resolved => "resolved",
                };
                counter!("plantlink_cloud_alerts_total", "severity" => a.severity.clone(), "state" => state)
                    .increment(1);
                let _ = self.queue.send(Delivery::Event(a)).await;
            }
            Output::Late { .. } => counter!("plantlink_cloud_late_readings_total").increment(1),
        }
    }

    /// Evaluates one consumed record, or skips it.
    async fn take(&mut self, m: Result<BorrowedMessage<'_>, rdkafka::error::KafkaError>) {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "backbone consumer error (alerting)");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        };
        self.forget_if_moved();
        let (p, off) = (m.partition(), m.offset());
        if self
            .stale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p)
        {
            self.parts.remove(&p);
        }
        if !self.parts.contains_key(&p) {
            self.load_until(p, off).await;
        }
        let reach = self.reach_ms;
        let Some(part) = self.parts.get_mut(&p) else {
            return;
        };
        if off < part.next {
            return;
        }
        if off > part.next {
            if !part.seeking {
                part.seeking = true;
                part.since = Instant::now();
                let to = part.next;
                self.seek(p, to);
            } else if part.since.elapsed() > super::SEEK_PATIENCE {
                tracing::warn!(
                    partition = p,
                    want = part.next,
                    got = off,
                    "the sought backbone record did not come; rebuilding this partition again"
                );
                self.parts.remove(&p);
            }
            return;
        }
        part.seeking = false;
        part.next = off + 1;
        let emit = off >= part.emit_from;
        let decoded = decode(m.headers(), m.payload(), &mut self.decoder);
        if let Ok(r) = &decoded
            && !r.backfill
            && let Some(newest) = r.readings.iter().map(|x| x.ts.0).max()
        {
            part.clock_ms = part.clock_ms.max(newest / 1000);
        }
        part.sample(part.clock_ms, off, reach);
        match decoded {
            // Refused readings are not evaluated, as in the single-node mode.
            Ok(r) if r.refused.is_none() => {
                let now = now_us();
                for reading in &r.readings {
                    part.engine.on_reading(
                        Input {
                            tenant: &r.tenant,
                            reading,
                            backfill: r.backfill,
                        },
                        now,
                        &mut self.out,
                    );
                }
                if emit
                    && !r.backfill
                    && let Some(newest) = r.readings.iter().map(|x| x.ts.0).max()
                {
                    gauge!("plantlink_cloud_alert_eval_lag_seconds")
                        .set((now - newest) as f64 / 1e6);
                }
            }
            Ok(_) => {}
            Err(why) => {
                // The writers keep it on the DLQ; alerting has nothing to evaluate.
                tracing::debug!(partition = p, offset = off, %why, "undecodable backbone record skipped by alerting");
            }
        }
        let replay_from = part.replay_from;
        if !emit {
            counter!("plantlink_cloud_alerting_records_replayed_total").increment(1);
            self.out.clear();
            return;
        }
        let events: Vec<Output> = self.out.drain(..).collect();
        for o in events {
            self.emit(o).await;
        }
        let _ = self
            .queue
            .send(Delivery::Mark {
                partition: p,
                next: off + 1,
                replay_from,
            })
            .await;
    }

    /// [`Self::load`] until it succeeds, with a growing pause.
    async fn load_until(&mut self, p: i32, first: i64) {
        let mut wait = Duration::from_millis(200);
        loop {
            match self.load(p, first).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, retry_in = ?wait, "alerting cannot rebuild this partition yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Builds partition `p`'s engine: its open alerts, then a replay from its rebuild point.
    /// `first` is the offset of the record that came: where a group with nothing stored
    /// starts.
    async fn load(&mut self, p: i32, first: i64) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Delivery::Load {
                partition: p,
                start: first,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the delivery task stopped"))?;
        let stand: Stand = answer
            .await
            .map_err(|_| anyhow::anyhow!("the delivery task stopped"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let (low, high) = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, p, Duration::from_secs(5))
        })
        .await??;
        let emit_from = match stand.committed {
            Some(s) if s < low => {
                tracing::error!(
                    partition = p,
                    stored = s,
                    earliest = low,
                    "records of this partition were deleted by Kafka's retention before alerting \
                     evaluated them; raise the backbone topic's retention.ms"
                );
                low
            }
            Some(s) if s > high => {
                tracing::error!(
                    partition = p,
                    stored = s,
                    end = high,
                    "the stored alerting offset is past this partition's end (was the topic \
                     recreated?); evaluating from the end"
                );
                high
            }
            Some(s) => s,
            // Never: the load stores `first` when nothing is.
            None => first.clamp(low, high),
        };
        let replay_from = stand.replay_from.unwrap_or(emit_from).clamp(low, emit_from);
        let mut engine = Engine::new(self.settings);
        engine.set_rules(self.rules.clone());
        let mut restored = 0;
        // Open alerts are live ones: the backlog lane's engines have none to restore.
        let live = self.topic == self.kafka.config().backbone_topic;
        for (rule, tenant, device) in stand.open.iter().filter(|_| live) {
            if partition(tenant, device, self.partitions) == p {
                engine.restore_open(*rule, tenant, device);
                restored += 1;
            }
        }
        tracing::info!(
            partition = p,
            replay_from,
            emit_from,
            open_alerts = restored,
            "alerting rebuilds this partition"
        );
        self.parts.insert(
            p,
            Part {
                engine,
                emit_from,
                next: replay_from,
                seeking: true,
                since: Instant::now(),
                replay_from,
                samples: VecDeque::new(),
                clock_ms: i64::MIN / 2,
            },
        );
        self.seek(p, replay_from);
        Ok(())
    }

    /// Seeks `p` to `to`; if that fails, the partition is rebuilt at its next record.
    fn seek(&mut self, p: i32, to: i64) {
        if let Err(e) =
            self.consumer
                .seek(&self.topic, p, Offset::Offset(to), Duration::from_secs(5))
        {
            tracing::warn!(partition = p, error = %e, "backbone seek failed (alerting); rebuilding at the next record");
            self.parts.remove(&p);
        }
    }

    /// Exports `plantlink_cloud_consumer_lag` for the partitions held (end offset minus the
    /// next one to evaluate), and commits those offsets to Kafka for lag tools.
    async fn report_lag(&mut self) {
        self.forget_if_moved();
        let Ok(marks) = self.kafka.watermarks(&self.topic).await else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        let mut lags = Vec::new();
        for (p, _, high) in marks {
            if let Some(part) = self.parts.get(&p) {
                lags.push((p, (high - part.next.max(part.emit_from)).max(0)));
                if part.next >= part.emit_from {
                    let _ = tpl.add_partition_offset(&self.topic, p, Offset::Offset(part.next));
                }
            }
        }
        super::export_lag(&self.group, &self.topic, &lags, &mut self.exported);
        if tpl.count() > 0 {
            let _ = self.consumer.commit(&tpl, CommitMode::Async);
        }
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part() -> Part {
        Part {
            engine: Engine::new(Settings::default()),
            emit_from: 0,
            next: 0,
            seeking: false,
            since: Instant::now(),
            replay_from: 0,
            samples: VecDeque::new(),
            clock_ms: 0,
        }
    }

    #[test]
    fn the_rebuild_point_trails_the_newest_record_by_the_reach() {
        let mut p = part();
        // One record every 100 ms for 5 minutes, offsets 0..3000.
        for i in 0..3000i64 {
            p.sample(1_000_000 + i * 100, i, 60_000);
        }
        // The newest is at 1,299,900 ms: the rebuild starts at the newest sample at least
        // 60 s older, never later.
        let newest = 1_000_000 + 2999 * 100;
        let at = 1_000_000 + p.replay_from * 100;
        assert!(at <= newest - 60_000, "{at}");
        assert!(at > newest - 62_000, "{at}");
        // A sample a second: bounded.
        assert!(p.samples.len() <= 62, "{}", p.samples.len());
    }

    #[test]
    fn the_reach_covers_the_longest_rule() {
        let s = Settings {
            allowed_lateness_us: 30_000_000,
            out_of_orderness_us: 1_000_000,
            ..Settings::default()
        };
        assert_eq!(reach_ms(&[], &s), 60_000);
        let rule = Rule {
            id: 1,
            tenant: "t".into(),
            selector: Default::default(),
            condition: Condition::Threshold {
                metric: "temp".into(),
                aggregate: crate::alerting::rule::Aggregate::Avg,
                op: crate::alerting::rule::Op::Gt,
                threshold: 1.0,
                window: crate::alerting::rule::Window::Tumbling { seconds: 60 },
                for_windows: 3,
            },
            severity: "warning".into(),
        };
        assert_eq!(reach_ms(&[rule], &s), 240_000 + 31_000);
    }
}
