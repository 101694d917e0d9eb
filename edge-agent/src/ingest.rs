//! The writer: one thread that owns the queue, decodes what the sources received, and
//! group-commits it, acknowledging devices only after the commit.
//!
//! Sources send [`Message`]s over a bounded channel, so a slow disk pushes back on them
//! (MQTT stops reading, and the broker holds the rest). The writer takes everything waiting,
//! up to [`MAX_GROUP`] messages or the commit interval, and in one transaction: recognises
//! MQTT redeliveries, decodes, drops duplicates and rate-limited readings, stores readings
//! and dead letters, evicts if full, and commits. Then it completes every message: an MQTT
//! PUBACK or a CoAP response. A failed commit acknowledges nothing and is retried.

use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use tokio::sync::{mpsc, oneshot};

pub use crate::intake::{Command, Completion, Message, Outcome, Source, bytes_like, now_us};
use crate::payload::{Decoder, Format, Reason, Reject};
use crate::ratelimit::RateLimiter;
use crate::store::{Insert, Store, StoreError};

/// Most messages in one commit.
pub const MAX_GROUP: usize = 4096;

/// How often dead letters marked for replay are looked for.
const REPLAY_EVERY: Duration = Duration::from_secs(1);
/// Most dead letters replayed in one commit.
const REPLAY_GROUP: usize = 512;

/// How often devices and series without readings are looked for.
const STATE_PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long a device or series goes without readings before its row is pruned.
const STATE_IDLE: Duration = Duration::from_secs(600);

/// The uplink's (and the systemd watchdog's) line to the queue writer. Requests have an inbox
/// of their own, which the writer empties before every group of messages: with collection at
/// full rate the intake holds thousands of messages, and a request queued behind them would
/// make every batch the uplink reads or acknowledges wait for all of them, starving shipping.
#[derive(Debug, Clone)]
pub struct Requests {
    inbox: mpsc::UnboundedSender<UplinkRequest>,
    wake: mpsc::Sender<Command>,
}

impl Requests {
    /// A line to the writer that reads `inbox` and is woken through its intake `wake`.
    pub fn new(inbox: mpsc::UnboundedSender<UplinkRequest>, wake: mpsc::Sender<Command>) -> Self {
        Self { inbox, wake }
    }

    /// Sends `make(reply)` and waits for the writer's reply; `None` once the writer has stopped.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> UplinkRequest,
    ) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.inbox.send(make(reply)).ok()?;
        // Wakes a writer asleep on an empty intake. A full intake means it is awake, and it
        // looks at the inbox before its next group.
        let _ = self.wake.try_send(Command::Wake);
        answer.await.ok()
    }
}

/// The uplink's requests to the queue.
#[derive(Debug)]
pub enum UplinkRequest {
    /// How much is waiting in each lane.
    View(oneshot::Sender<QueueView>),
    /// What the uplink reports of the queue to the cloud (it reads the oldest reading).
    Figures(oneshot::Sender<QueueFigures>),
    /// Read up to `max` readings of `lane` and put them in flight.
    Read {
        /// The lane.
        lane: plantlink_wire::frame::Lane,
        /// Most readings.
        max: usize,
        /// The batch, if any, or the queue's error.
        reply: oneshot::Sender<Result<Option<crate::store::QueuedBatch>, String>>,
    },
    /// The cloud acknowledged this queue batch: delete its readings.
    Ack {
        /// The queue batch id.
        batch: u64,
        /// How many readings were deleted, or the queue's error.
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// The cloud refused this queue batch (or it was too large to send): split it, or
    /// quarantine it when it holds one reading.
    Refuse {
        /// The queue batch id.
        batch: u64,
        /// The refusal's label (`malformed`, `too_large`).
        reason: &'static str,
        /// What the cloud said.
        detail: String,
        /// What became of it, or the queue's error.
        reply: oneshot::Sender<Result<crate::store::Refused, String>>,
    },
    /// A connection (re)started: forget batches in flight; what is stored becomes backlog.
    Restart(oneshot::Sender<QueueView>),
    /// The cloud sent the tenant's schema set: store it, decode with it from the next
    /// message on, and say what was refused.
    Schemas {
        /// The set.
        set: plantlink_wire::frame::SchemaSet,
        /// What is in force now, or the queue's error (the set in force is unchanged).
        reply: oneshot::Sender<Result<plantlink_wire::frame::SchemasApplied, String>>,
    },
    /// The schema set in force.
    SchemasInForce(oneshot::Sender<plantlink_wire::frame::SchemasApplied>),
    /// The devices' types, firmware and schemas that changed since the last time (at most
    /// `limit`), of the devices the queue admits.
    Devices {
        /// Tell everything again (a new connection, or the periodic refresh).
        reset: bool,
        /// Most devices.
        limit: usize,
        /// The devices.
        reply: oneshot::Sender<Vec<plantlink_wire::frame::DeviceInfo>>,
    },
}

/// What an agent reports of its registry: the version and the refused entries.
pub fn applied(r: &crate::schemas::Registry) -> plantlink_wire::frame::SchemasApplied {
    plantlink_wire::frame::SchemasApplied {
        version: r.version,
        refused: r
            .entries
            .iter()
            .filter_map(|a| {
                a.compiled
                    .as_ref()
                    .err()
                    .map(|e| plantlink_wire::frame::SchemaRefusal {
                        id: a.entry.id,
                        revision: a.entry.revision,
                        reason: e.clone(),
                    })
            })
            .collect(),
    }
}

/// What waits in the queue, as the uplink sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueView {
    /// Live readings not yet sent (an upper bound when some were evicted).
    pub live_waiting: u64,
    /// Whether backlog readings wait.
    pub backlog_waiting: bool,
    /// Readings in the queue, sent or not.
    pub queued: u64,
}

/// The queue as the uplink reports it to the cloud.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueFigures {
    /// The lanes.
    pub view: QueueView,
    /// Bytes the queue holds.
    pub bytes: u64,
    /// How old the oldest queued reading is, in milliseconds against its timestamp;
    /// `None` when the queue is empty.
    pub oldest_age_ms: Option<u64>,
}

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Longest time to keep gathering messages before a commit.
    pub commit_interval: Duration,
    /// Which devices may send, and how many the queue tracks.
    pub devices: crate::config::Devices,
    /// Where messages for the plant broker go (Sparkplug B rebirth requests).
    pub publish: Option<mpsc::UnboundedSender<(String, Vec<u8>)>>,
}

/// Starts the writer thread. It runs until every sender of `rx` is dropped and all that
/// was received is committed and completed, then returns the store. `confirmed` carries
/// the MQTT message records whose PUBACK the broker is known to have processed.
pub fn spawn_writer(
    store: Store,
    decoder: Decoder,
    limiter: RateLimiter,
    rx: mpsc::Receiver<Command>,
    requests: mpsc::UnboundedReceiver<UplinkRequest>,
    confirmed: mpsc::UnboundedReceiver<Vec<i64>>,
    opts: WriterOptions,
) -> std::thread::JoinHandle<Store> {
    std::thread::Builder::new()
        .name("queue-writer".into())
        .spawn(move || Writer::new(store, decoder, limiter, opts, confirmed).run(rx, requests))
        .expect("spawning the writer thread")
}

struct Writer {
    store: Store,
    decoder: Decoder,
    limiter: RateLimiter,
    opts: WriterOptions,
    started: Instant,
    last_gauges: Option<Instant>,
    /// Each device's rate, for the status page (updated with the gauges).
    rates: crate::status::Rates,
    last_prune: Instant,
    last_state_prune: Instant,
    confirmed: mpsc::UnboundedReceiver<Vec<i64>>,
    /// When dead letters marked for replay were last looked for.
    last_replay: Instant,
    /// Messages for the plant broker from the group being committed, sent once it is.
    publish: Vec<(String, Vec<u8>)>,
    /// The dead letters the group being committed replays.
    replaying: Vec<i64>,
}

impl Writer {
    fn new(
        store: Store,
        decoder: Decoder,
        limiter: RateLimiter,
        opts: WriterOptions,
        confirmed: mpsc::UnboundedReceiver<Vec<i64>>,
    ) -> Self {
        Self {
            confirmed,
            store,
            decoder,
            limiter,
            opts,
            started: Instant::now(),
            last_gauges: None,
            rates: crate::status::Rates::default(),
            last_prune: Instant::now(),
            last_state_prune: Instant::now(),
            last_replay: Instant::now(),
            replaying: Vec::new(),
            publish: Vec::new(),
        }
    }

    fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut requests: mpsc::UnboundedReceiver<UplinkRequest>,
    ) -> Store {
        self.update_gauges(true);
        let mut group: Vec<Message> = Vec::with_capacity(MAX_GROUP);
        loop {
            // Requests first: they never wait behind intake (see `Requests`).
            while let Ok(r) = requests.try_recv() {
                self.serve_uplink(r);
            }
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            if let Command::Ingest(m) = first {
                group.push(m);
            }
            let deadline = Instant::now() + self.opts.commit_interval;
            'gather: while group.len() < MAX_GROUP && Instant::now() < deadline {
                while let Ok(r) = requests.try_recv() {
                    self.serve_uplink(r);
                }
                // Check the clock once per 64 messages, not per message.
                for _ in 0..64 {
                    match rx.try_recv() {
                        Ok(Command::Ingest(m)) => group.push(m),
                        Ok(Command::Wake) => {}
                        Err(_) => break 'gather,
                    }
                }
            }
            if self.last_replay.elapsed() >= REPLAY_EVERY {
                self.replay();
            }
            if group.is_empty() {
                // A wake-up (once a second when nothing arrives): rates and ages go on.
                self.update_gauges(false);
                continue;
            }
            let mut backoff = Duration::from_millis(100);
            // Sparkplug B messages change the host state as they are read: a failed commit
            // puts it back, so the retry reads them as the first attempt did.
            let sparkplug = group
                .iter()
                .any(|m| m.origin.starts_with("spBv1.0/"))
                .then(|| self.decoder.sparkplug_state())
                .flatten();
            let outcomes = loop {
                match self.commit_group(&group) {
                    Ok(o) => break o,
                    Err(e) => {
                        self.decoder.restore_sparkplug(sparkplug.clone());
                        counter!("plantlink_edge_commit_failures_total").increment(1);
                        tracing::error!(error = %e, messages = group.len(),
                            "commit failed; nothing was acknowledged; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            };
            for (m, outcome) in group.drain(..).zip(outcomes) {
                complete(m.done, outcome);
            }
            self.update_gauges(false);
        }
        self.update_gauges(true);
        self.store
    }

    fn view(&self) -> QueueView {
        QueueView {
            live_waiting: self.store.live_waiting(),
            backlog_waiting: self.store.has_backlog(),
            queued: self.store.len(),
        }
    }

    fn serve_uplink(&mut self, r: UplinkRequest) {
        match r {
            UplinkRequest::View(reply) => {
                let _ = reply.send(self.view());
            }
            UplinkRequest::Figures(reply) => {
                let oldest_age_ms = match self.store.oldest_ts() {
                    Ok(ts) => ts.map(|ts| ((now_us() - ts).max(0) / 1000) as u64),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the oldest queued reading for the queue report");
                        None
                    }
                };
                let _ = reply.send(QueueFigures {
                    view: self.view(),
                    bytes: self.store.bytes(),
                    oldest_age_ms,
                });
            }
            UplinkRequest::Read { lane, max, reply } => {
                let _ = reply.send(self.store.read_batch(lane, max).map_err(|e| e.to_string()));
            }
            UplinkRequest::Ack { batch, reply } => {
                let r = self.store.ack(batch).map_err(|e| e.to_string());
                self.update_gauges(false);
                let _ = reply.send(r);
            }
            UplinkRequest::Refuse {
                batch,
                reason,
                detail,
                reply,
            } => {
                let r = self
                    .store
                    .refuse(batch, reason, &detail, now_us())
                    .map_err(|e| e.to_string());
                if let Ok(crate::store::Refused::Quarantined(q)) = &r {
                    counter!("plantlink_edge_quarantined_total", "reason" => reason).increment(1);
                    tracing::warn!(device = %q.device, metric = %q.metric, ts_us = q.ts.0, reason, %detail,
                        "the cloud refused a reading on its own; it is in quarantine (edge-agent queue dead-letters)");
                }
                self.update_gauges(false);
                let _ = reply.send(r);
            }
            UplinkRequest::Restart(reply) => {
                self.store.restart_lanes();
                let _ = reply.send(self.view());
            }
            UplinkRequest::Schemas { set, reply } => {
                let _ = reply.send(self.apply_schemas(set));
            }
            UplinkRequest::SchemasInForce(reply) => {
                let _ = reply.send(applied(self.decoder.registry()));
            }
            UplinkRequest::Devices {
                reset,
                limit,
                reply,
            } => {
                // Devices the queue refuses (not allowed, past the device cap) are not told.
                let (store, devices) = (&self.store, &self.opts.devices);
                let admitted = |d: &str| {
                    devices.allowed(d) && (store.knows(d) || store.devices() < devices.max)
                };
                let _ = reply.send(self.decoder.device_report(reset, limit, admitted));
            }
        }
    }

    /// Decodes the dead letters marked for replay (`edge-agent queue replay-dead-letters`)
    /// again, with the schemas in force now, in one transaction with forgetting them: each
    /// becomes readings, or a dead letter again (with its new reason). MQTT ones only:
    /// a CoAP request's path context is not kept, nor a payload cut at 4 KiB.
    fn replay(&mut self) {
        self.last_replay = Instant::now();
        let pending = match self.store.replay_pending(REPLAY_GROUP) {
            Ok(p) if p.is_empty() => return,
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the dead letters to replay");
                return;
            }
        };
        let mut group = Vec::with_capacity(pending.len());
        let mut skipped = Vec::new();
        for d in pending {
            if d.source != Source::Mqtt.as_str() || d.size as usize > d.payload.len() {
                // Kept as dead letters; only the request goes.
                skipped.push(d.id);
                continue;
            }
            self.replaying.push(d.id);
            group.push(Message {
                source: Source::Mqtt,
                origin: d.origin,
                context: None,
                format: Format::Auto,
                payload: bytes_like::Payload::Owned(d.payload),
                received_us: d.received_us,
                redelivery: None,
                done: Completion::None,
            });
        }
        if let Err(e) = self.store.unmark_replay(&skipped) {
            tracing::warn!(error = %e, "could not forget replay requests");
        }
        let skipped = skipped.len();
        if group.is_empty() {
            self.replaying.clear();
            return;
        }
        self.decoder.set_replay(true);
        let result = self.commit_group(&group);
        self.decoder.set_replay(false);
        let replayed = std::mem::take(&mut self.replaying).len();
        match result {
            Ok(outcomes) => {
                let stored: usize = outcomes.iter().map(|o| o.stored).sum();
                let again = outcomes.iter().filter(|o| !o.rejects.is_empty()).count();
                counter!("plantlink_edge_dead_letters_replayed_total").increment(replayed as u64);
                tracing::info!(
                    replayed,
                    readings_stored = stored,
                    dead_letters_again = again,
                    not_replayable = skipped,
                    "replayed dead letters"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "replaying dead letters failed; they stay marked");
            }
        }
    }

    /// Stores a schema set from the cloud and decodes with it. An entry that does not
    /// compile is refused on its own; the others apply.
    fn apply_schemas(
        &mut self,
        set: plantlink_wire::frame::SchemaSet,
    ) -> Result<plantlink_wire::frame::SchemasApplied, String> {
        let (entries, mut refused) = crate::schemas::from_wire(set.schemas);
        let registry = crate::schemas::Registry::compile(set.version, entries);
        let kept: Vec<_> = registry.entries.iter().map(|a| a.entry.clone()).collect();
        if let Err(e) = self.store.save_schema_set(set.version, &kept) {
            // Decoding goes on with the set in force; the cloud is told why, and the uplink
            // stays up (the queue must still drain).
            tracing::error!(version = set.version, error = %e, "could not store the payload schema set; keeping the one in force");
            let mut report = applied(self.decoder.registry());
            report.refused.push(plantlink_wire::frame::SchemaRefusal {
                id: 0,
                revision: 0,
                reason: format!("set {} not stored on the gateway: {e}", set.version),
            });
            return Ok(report);
        }
        let mut report = applied(&registry);
        report.refused.append(&mut refused);
        for r in &report.refused {
            tracing::warn!(schema = r.id, revision = r.revision, reason = %r.reason,
                "refused a payload schema from the registry; other device types decode as before");
        }
        tracing::info!(
            version = set.version,
            schemas = registry.entries.len(),
            refused = report.refused.len(),
            "payload schema set applied"
        );
        gauge!("plantlink_edge_schema_set_version").set(set.version as f64);
        self.decoder.set_registry(registry);
        Ok(report)
    }

    /// One transaction for the group. On any error the transaction is rolled back and the
    /// rate limiter restored, so a retry starts from exactly the same state.
    fn commit_group(&mut self, group: &[Message]) -> Result<Vec<Outcome>, StoreError> {
        let limiter = self.limiter.clone();
        let result = self.try_commit_group(group);
        if result.is_err() {
            self.store.rollback();
            self.limiter = limiter;
            self.publish.clear();
        }
        result
    }

    fn try_commit_group(&mut self, group: &[Message]) -> Result<Vec<Outcome>, StoreError> {
        self.store.begin(now_us())?;
        // Records of messages whose PUBACK the broker confirmed. If this group fails they are
        // dropped from the channel and simply kept: a record too many is harmless.
        while let Ok(ids) = self.confirmed.try_recv() {
            self.store.mqtt_forget(&ids)?;
        }
        let mut outcomes = Vec::with_capacity(group.len());
        let (mut stored, mut dups, mut limited) = (0u64, 0u64, 0u64);
        let mut received = [0u64; 2];
        let mut dead: Vec<&'static str> = Vec::new();
        let mut redeliveries = 0u64;
        // One clock read per group: the rate limiter needs no finer resolution than a commit.
        let mono = self.started.elapsed().as_micros() as i64;
        let wall = now_us();
        let mut pruned = false;
        for m in group {
            let mut outcome = Outcome::default();
            if let Some((pkid, dup)) = m.redelivery {
                let h = message_hash(&m.origin, &m.payload);
                let known = if dup {
                    self.store.mqtt_committed(pkid, h)?
                } else {
                    None
                };
                if let Some(record) = known {
                    outcome.redelivery = true;
                    outcome.mqtt_record = Some(record);
                    redeliveries += 1;
                    outcomes.push(outcome);
                    continue;
                }
                outcome.mqtt_record = Some(self.store.mqtt_record(pkid, h)?);
            }
            let decoded = match &m.context {
                Some(ctx) => self
                    .decoder
                    .decode(ctx, m.format, &m.payload, m.received_us),
                None => self
                    .decoder
                    .decode_topic(&m.origin, m.format, &m.payload, m.received_us),
            };
            received[m.source as usize] += decoded.readings.len() as u64;
            let mut decoded = decoded;
            self.publish.extend(decoded.publish.take());
            for topic in decoded.replay.drain(..) {
                let n = self
                    .store
                    .mark_replay(&topic, &["unknown_alias", "seq_gap"])?;
                if n > 0 {
                    tracing::info!(%topic, dead_letters = n, "a Sparkplug B birth names what was refused before it; replaying");
                }
            }
            for t in decoded.skipped.drain(..) {
                counter!("plantlink_edge_sparkplug_metrics_skipped_total", "datatype" => t)
                    .increment(1);
            }
            let mut refused: Vec<(Reason, &str, usize)> = Vec::new();
            for r in &decoded.readings {
                if let Some(reason) = self.admit(&r.device, wall, &mut pruned)? {
                    match refused.iter_mut().find(|(x, _, _)| *x == reason) {
                        Some(e) => e.2 += 1,
                        None => refused.push((reason, &r.device, 1)),
                    }
                    continue;
                }
                // Replayed readings were received long ago: they neither spend nor meet the
                // device's rate budget.
                if self.replaying.is_empty() && !self.limiter.allow(&r.device, mono) {
                    self.store.count_rate_limited(&r.device)?;
                    limited += 1;
                    outcome.dropped += 1;
                    continue;
                }
                match self.store.insert(r)? {
                    Insert::Stored => {
                        stored += 1;
                        outcome.stored += 1;
                    }
                    Insert::Duplicate => {
                        dups += 1;
                        outcome.dropped += 1;
                    }
                    Insert::SeriesCap => {
                        match refused.iter_mut().find(|(x, _, _)| *x == Reason::SeriesCap) {
                            Some(e) => e.2 += 1,
                            None => refused.push((Reason::SeriesCap, &r.device, 1)),
                        }
                    }
                }
            }
            let refused: Vec<Reject> = refused
                .into_iter()
                .map(|(reason, device, n)| Reject {
                    reason,
                    detail: self.refusal(reason, device, n),
                })
                .collect();
            decoded.rejects.extend(refused);
            // One dead letter per message, however many fields were refused.
            if let Some(first) = decoded.rejects.first() {
                let mut detail: Vec<&str> = decoded
                    .rejects
                    .iter()
                    .take(5)
                    .map(|r| r.detail.as_str())
                    .collect();
                let more = decoded.rejects.len().saturating_sub(5);
                let tail = format!("and {more} more");
                if more > 0 {
                    detail.push(&tail);
                }
                self.store.dead_letter(
                    m.received_us,
                    m.source.as_str(),
                    &m.origin,
                    first.reason.as_str(),
                    &detail.join("; "),
                    &m.payload,
                    match m.format {
                        crate::payload::Format::TooLarge(n) => n,
                        _ => m.payload.len(),
                    },
                )?;
                dead.push(first.reason.as_str());
            }
            outcome.rejects = decoded.rejects;
            outcomes.push(outcome);
        }
        if !self.replaying.is_empty() {
            self.store.replayed(&self.replaying)?;
        }
        let evictions = self.store.commit()?;
        for p in self.publish.drain(..) {
            counter!("plantlink_edge_sparkplug_rebirths_requested_total").increment(1);
            tracing::info!(topic = %p.0, "asked a Sparkplug B node for a rebirth");
            if let Some(tx) = &self.opts.publish {
                let _ = tx.send(p);
            }
        }

        // Counted only once durable, so a retried group is not counted twice.
        for (i, src) in [Source::Mqtt, Source::Coap].iter().enumerate() {
            if received[i] > 0 {
                counter!("plantlink_edge_readings_received_total", "source" => src.as_str())
                    .increment(received[i]);
            }
        }
        counter!("plantlink_edge_readings_stored_total").increment(stored);
        counter!("plantlink_edge_duplicates_dropped_total").increment(dups);
        counter!("plantlink_edge_rate_limited_total").increment(limited);
        counter!("plantlink_edge_mqtt_redeliveries_total").increment(redeliveries);
        counter!("plantlink_edge_commits_total").increment(1);
        for reason in dead {
            counter!("plantlink_edge_dead_letters_total", "reason" => reason).increment(1);
        }
        for ev in evictions {
            counter!("plantlink_edge_evicted_total").increment(ev.readings);
            tracing::warn!(device = %ev.device, readings = ev.readings,
                capacity = self.store.capacity(),
                "queue full: evicted the device's oldest readings (store.max_bytes)");
        }
        if self.last_prune.elapsed() > Duration::from_secs(60)
            || self.limiter.len() > 2 * self.opts.devices.max
        {
            // Devices whose buckets are full again behave exactly like new ones: forget them;
            // and never keep more buckets than twice the devices the queue may track.
            self.limiter.prune(mono);
            self.limiter.bound(2 * self.opts.devices.max, mono);
            self.last_prune = Instant::now();
        }
        if self.last_state_prune.elapsed() > STATE_PRUNE_EVERY {
            // Devices and series without readings for a while: their rows go (in a
            // transaction of their own, so a failure here costs no readings).
            self.last_state_prune = Instant::now();
            let before = now_us() - STATE_IDLE.as_micros() as i64;
            let pruned = self
                .store
                .begin(now_us())
                .and_then(|()| self.store.prune_idle(before))
                .and_then(|p| self.store.commit().map(|_| p));
            match pruned {
                Ok((0, 0)) => {}
                Ok((devices, series)) => {
                    counter!("plantlink_edge_devices_pruned_total").increment(devices as u64);
                    tracing::debug!(devices, series, "pruned idle devices and series");
                }
                Err(e) => {
                    self.store.rollback();
                    tracing::warn!(error = %e, "pruning idle devices failed; trying again later");
                }
            }
        }
        Ok(outcomes)
    }

    /// Whether a reading of `device` may be stored: the allow list, then the device cap for
    /// a device the queue does not track yet (pruning idle ones once per group when at it).
    fn admit(
        &mut self,
        device: &str,
        wall: i64,
        pruned: &mut bool,
    ) -> Result<Option<Reason>, StoreError> {
        if !self.opts.devices.allowed(device) {
            return Ok(Some(Reason::NotAllowed));
        }
        if self.store.knows(device) || self.store.devices() < self.opts.devices.max {
            return Ok(None);
        }
        if !*pruned {
            *pruned = true;
            let (devices, _) = self.store.prune_idle(wall + 1)?;
            counter!("plantlink_edge_devices_pruned_total").increment(devices as u64);
        }
        Ok((self.store.devices() >= self.opts.devices.max).then_some(Reason::DeviceCap))
    }

    fn refusal(&self, reason: Reason, device: &str, n: usize) -> String {
        let what = match reason {
            Reason::NotAllowed => format!(
                "device {device:?} is not in [devices] allow = {:?}",
                self.opts.devices.allow
            ),
            Reason::SeriesCap => format!(
                "device {device:?} has [devices] max_series_per_device = {} series (metric and \
                 tag values) in the queue; a new metric name or tag value starts another: \
                 raise the cap, or find what invents names",
                self.opts.devices.max_series_per_device
            ),
            _ => format!(
                "device {device:?} is new while the queue tracks [devices] max = {} devices; \
                 raise it if the plant has that many, or find who sends invented ids",
                self.opts.devices.max
            ),
        };
        if n > 1 {
            format!("{what} ({n} readings)")
        } else {
            what
        }
    }

    fn update_gauges(&mut self, force: bool) {
        gauge!("plantlink_edge_queue_readings").set(self.store.len() as f64);
        gauge!("plantlink_edge_queue_bytes").set(self.store.bytes() as f64);
        // The oldest reading takes a query: at most once a second.
        if !force
            && self
                .last_gauges
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_gauges = Some(Instant::now());
        self.rates.update(self.store.device_counts());
        let age = match self.store.oldest_ts() {
            Ok(Some(ts)) => ((now_us() - ts) as f64 / 1e6).max(0.0),
            _ => 0.0,
        };
        gauge!("plantlink_edge_queue_oldest_age_seconds").set(age);
    }
}

/// Identifies an MQTT message's content, to recognise its redelivery.
fn message_hash(topic: &str, payload: &[u8]) -> i64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(topic.as_bytes());
    h.update(&[0xff]);
    h.update(payload);
    h.digest() as i64
}

fn complete(done: Completion, outcome: Outcome) {
    match done {
        Completion::Mqtt(ack) => ack.ack(outcome.mqtt_record),
        Completion::Coap(reply) => {
            let _ = reply.send(outcome);
        }
        Completion::None => {}
    }
}
