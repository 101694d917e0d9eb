//! Delivery of alert transitions: to the Kafka alerts topic (keyed by device), then to the
//! `alerts` table, then (live ones) to the webhooks; and, for an alerting member of the
//! scale-out mode, its consumer offsets in `pipeline_offsets`.
//!
//! **Each transition has an id** ([`event_id`]), made of what it is: the rule, the state,
//! the lane, the window and the device. Whoever evaluates the same readings emits the same
//! id, so a transition emitted again (an alerting member died after delivering it but before
//! storing its offset, or a partition moved and its windows were rebuilt) is stored once:
//! `alerts` has a unique index on it. On Kafka it may appear twice; consumers drop the
//! second by its `event_id`.
//!
//! Kafka comes before the table: a transition the table holds is on Kafka too, so the table
//! can be read back to restore which alerts are open.
//!
//! **Offsets.** An alerting member sends a [`Delivery::Mark`] after the events of each
//! record it evaluated, through the same queue: when a mark comes out, every event before
//! it is delivered, so storing its offset can never skip one. Marks are written about once a
//! second, fenced like the writer's (an update applies only from the offset this member
//! read); a member whose fence fails learns it (the partition is marked stale) and rebuilds
//! that partition from the table. [`Delivery::Load`] reads where a partition stands after
//! everything queued before it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::engine::{AlertEvent, AlertState};
use crate::config::Alerting;
use crate::kafka::{Kafka, rfc3339};

/// The id of a transition: `{rule}:{state}:{lane}:{window start µs}[:{window end µs}]:{device}`
/// (absence rules have no window end: theirs is processing time). Unique across tenants,
/// since a rule belongs to one.
pub fn event_id(a: &AlertEvent) -> String {
    let state = match a.state {
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    };
    let lane = if a.backfill { "backfill" } else { "live" };
    match a.metric {
        Some(_) => format!(
            "{}:{state}:{lane}:{}:{}:{}",
            a.rule_id, a.window_start_us, a.window_end_us, a.device_id
        ),
        None => format!(
            "{}:{state}:{lane}:{}:{}",
            a.rule_id, a.window_start_us, a.device_id
        ),
    }
}

/// What the delivery task is given, in order.
#[derive(Debug)]
pub enum Delivery {
    /// A transition.
    Event(AlertEvent),
    /// The events of `partition`'s records below `next` are all queued before this.
    Mark {
        /// The backbone partition.
        partition: i32,
        /// The next offset to evaluate.
        next: i64,
        /// Where a rebuild of its windows would start.
        replay_from: i64,
    },
    /// Flush `partition`'s marks, then answer where it stands; a partition the group has
    /// never stored starts at `start`, stored at once (whoever takes it later starts there).
    Load {
        /// The backbone partition.
        partition: i32,
        /// The offset of the record the member has in hand.
        start: i64,
        /// The answer.
        reply: oneshot::Sender<Result<Stand, String>>,
    },
}

/// Where a partition stands for the alerting group, after every queued event is delivered.
#[derive(Debug, Clone, Default)]
pub struct Stand {
    /// The next offset to evaluate live (`None`: the group has none stored).
    pub committed: Option<i64>,
    /// Where the rebuild of its windows starts.
    pub replay_from: Option<i64>,
    /// Open live alerts (rule, tenant, device) of all devices; the caller keeps its own.
    pub open: Vec<(i64, String, String)>,
}

/// The alerting group's offsets, as the delivery task keeps them.
#[derive(Debug)]
pub struct Offsets {
    group: String,
    topic: String,
    /// What this member read or wrote last, per partition it loaded.
    expected: HashMap<i32, Option<i64>>,
    /// The newest mark per partition not yet written.
    pending: BTreeMap<i32, (i64, i64)>,
    /// Partitions whose fence failed: the member rebuilds them.
    stale: Arc<Mutex<HashSet<i32>>>,
    last_flush: tokio::time::Instant,
}

/// How often marks are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

impl Offsets {
    /// Offsets of `group` on `topic`; fence failures are reported into `stale`.
    pub fn new(group: &str, topic: &str, stale: Arc<Mutex<HashSet<i32>>>) -> Self {
        Self {
            group: group.to_owned(),
            topic: topic.to_owned(),
            expected: HashMap::new(),
            pending: BTreeMap::new(),
            stale,
            last_flush: tokio::time::Instant::now(),
        }
    }

    fn due(&self) -> Option<tokio::time::Instant> {
        (!self.pending.is_empty()).then_some(self.last_flush + FLUSH_EVERY)
    }

    /// Writes the pending marks; `Err` leaves them pending (the connection failed).
    async fn flush(&mut self, c: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
        self.last_flush = tokio::time::Instant::now();
        while let Some((&p, &(next, replay_from))) = self.pending.iter().next() {
            let Some(expected) = self.expected.get(&p).copied() else {
                self.pending.remove(&p);
                continue;
            };
            let moved = match expected {
                None => {
                    c.execute(
                        "INSERT INTO pipeline_offsets (consumer_group, topic, partition_id, committed_offset, replay_from)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        &[&self.group, &self.topic, &p, &next, &replay_from],
                    )
                    .await?
                }
                Some(e) => {
                    c.execute(
                        "UPDATE pipeline_offsets SET committed_offset = $4, replay_from = $5, updated_at = now()
                         WHERE consumer_group = $1 AND topic = $2 AND partition_id = $3
                           AND committed_offset = $6",
                        &[&self.group, &self.topic, &p, &next, &replay_from, &e],
                    )
                    .await?
                }
            };
            self.pending.remove(&p);
            if moved == 1 {
                self.expected.insert(p, Some(next));
            } else {
                tracing::info!(
                    partition = p,
                    "another alerting member moved this partition's offset; rebuilding it"
                );
                counter!("plantlink_cloud_alerting_fenced_total").increment(1);
                self.expected.remove(&p);
                self.stale
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(p);
            }
        }
        Ok(())
    }

    /// Reads where `p` stands (flushing its mark first) and fences later marks from there.
    async fn load(
        &mut self,
        c: &tokio_postgres::Client,
        p: i32,
        start: i64,
    ) -> Result<Stand, String> {
        self.flush(c).await.map_err(|e| e.to_string())?;
        c.execute(
            "INSERT INTO pipeline_offsets (consumer_group, topic, partition_id, committed_offset, replay_from)
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT DO NOTHING",
            &[&self.group, &self.topic, &p, &start],
        )
        .await
        .map_err(|e| e.to_string())?;
        let row = c
            .query_opt(
                "SELECT committed_offset, replay_from FROM pipeline_offsets
                 WHERE consumer_group = $1 AND topic = $2 AND partition_id = $3",
                &[&self.group, &self.topic, &p],
            )
            .await
            .map_err(|e| e.to_string())?;
        let open = c
            .query(
                "SELECT rule_id, tenant_id, device_id FROM alerts WHERE state = 'firing' AND NOT backfill",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let (committed, replay_from) = match row {
            Some(r) => (Some(r.get::<_, i64>(0)), r.get::<_, Option<i64>>(1)),
            None => (None, None),
        };
        self.expected.insert(p, committed);
        Ok(Stand {
            committed,
            replay_from,
            open,
        })
    }
}

/// Connects to `url` until it works.
async fn connected<'a>(
    db: &'a mut Option<tokio_postgres::Client>,
    url: &str,
) -> &'a tokio_postgres::Client {
    let mut wait = Duration::from_millis(100);
    loop {
        if db.as_ref().is_some_and(|c| !c.is_closed()) {
            return db.as_ref().expect("checked above");
        }
        match crate::postgres::connect(url).await {
            Ok(c) => *db = Some(c),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "alerting: PostgreSQL unavailable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The JSON of an alert event (Kafka, webhooks).
pub fn event_json(a: &AlertEvent) -> serde_json::Value {
    serde_json::json!({
        "event_id": event_id(a),
        "rule_id": a.rule_id,
        "tenant": a.tenant,
        "device_id": a.device_id,
        "metric": a.metric,
        "state": a.state,
        "severity": a.severity,
        "value": crate::kafka::json_number(a.value),
        "threshold": a.threshold,
        "window_start": rfc3339(a.window_start_us),
        "window_end": rfc3339(a.window_end_us),
        "backfill": a.backfill,
    })
}

/// Most events delivered together: what waits in the queue, up to this many, goes to Kafka
/// at once and is then stored, in order.
const EVENTS_AT_ONCE: usize = 256;

/// Delivers what comes in order: each event to Kafka, the table and the webhooks (retrying
/// Kafka and the table until they take it), and, with `offsets`, the marks and loads of an
/// alerting member. Events waiting together go to Kafka together, so ten alerts of one
/// window wait for one round trip to the brokers, not ten.
pub async fn deliver(
    mut queue: mpsc::Receiver<Delivery>,
    url: String,
    kafka: Option<Kafka>,
    hooks: Vec<mpsc::Sender<Arc<Vec<u8>>>>,
    mut offsets: Option<Offsets>,
) {
    let mut db: Option<tokio_postgres::Client> = None;
    loop {
        let due = offsets.as_ref().and_then(Offsets::due);
        let next = match due {
            Some(at) => match tokio::time::timeout_at(at, queue.recv()).await {
                Ok(d) => d,
                Err(_) => {
                    flush(&mut offsets, &mut db, &url).await;
                    continue;
                }
            },
            None => queue.recv().await,
        };
        match next {
            None => {
                flush(&mut offsets, &mut db, &url).await;
                return;
            }
            Some(Delivery::Event(a)) => {
                let (events, after) = waiting_with(a, &mut queue);
                several(&events, &mut db, &url, kafka.as_ref(), &hooks).await;
                if let Some(d) = after {
                    control(d, &mut offsets, &mut db, &url, kafka.as_ref(), &hooks).await;
                }
            }
            Some(d) => control(d, &mut offsets, &mut db, &url, kafka.as_ref(), &hooks).await,
        }
    }
}

/// `first` and the events queued right behind it, up to [`EVENTS_AT_ONCE`], without waiting;
/// and the mark or load that ended the run, if one did (it comes after them).
fn waiting_with(
    first: AlertEvent,
    queue: &mut mpsc::Receiver<Delivery>,
) -> (Vec<AlertEvent>, Option<Delivery>) {
    let mut events = vec![first];
    while events.len() < EVENTS_AT_ONCE {
        match queue.try_recv() {
            Ok(Delivery::Event(a)) => events.push(a),
            Ok(other) => return (events, Some(other)),
            Err(_) => break,
        }
    }
    (events, None)
}

/// A mark or a load (an event alone), after every event queued before it is delivered.
async fn control(
    d: Delivery,
    offsets: &mut Option<Offsets>,
    db: &mut Option<tokio_postgres::Client>,
    url: &str,
    kafka: Option<&Kafka>,
    hooks: &[mpsc::Sender<Arc<Vec<u8>>>],
) {
    match d {
        Delivery::Event(a) => several(&[a], db, url, kafka, hooks).await,
        Delivery::Mark {
            partition,
            next,
            replay_from,
        } => {
            if let Some(o) = offsets.as_mut()
                && o.expected.contains_key(&partition)
            {
                o.pending.insert(partition, (next, replay_from));
                if o.due().is_some_and(|at| at <= tokio::time::Instant::now()) {
                    flush(offsets, db, url).await;
                }
            }
        }
        Delivery::Load {
            partition,
            start,
            reply,
        } => {
            let answer = match offsets.as_mut() {
                Some(o) => {
                    let c = connected(db, url).await;
                    let r = o.load(c, partition, start).await;
                    if r.is_err() {
                        *db = None;
                    }
                    r
                }
                None => Err("not an alerting member".into()),
            };
            let _ = reply.send(answer);
        }
    }
}

/// Writes the pending marks, retrying until the database takes them.
async fn flush(offsets: &mut Option<Offsets>, db: &mut Option<tokio_postgres::Client>, url: &str) {
    let Some(o) = offsets else { return };
    let mut wait = Duration::from_millis(100);
    loop {
        let c = connected(db, url).await;
        match o.flush(c).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "alerting offsets not stored yet");
                *db = None;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Events in order: all of them to Kafka (enqueued together, then each delivery awaited;
/// librdkafka retries passing errors itself, in order, so a failure here is a lasting one),
/// then each to the table, then the live ones to the webhooks.
async fn several(
    events: &[AlertEvent],
    db: &mut Option<tokio_postgres::Client>,
    url: &str,
    kafka: Option<&Kafka>,
    hooks: &[mpsc::Sender<Arc<Vec<u8>>>],
) {
    let bytes: Vec<Arc<Vec<u8>>> = events
        .iter()
        .map(|a| Arc::new(serde_json::to_vec(&event_json(a)).unwrap_or_default()))
        .collect();
    if let Some(k) = kafka {
        // From the first that failed on, all are sent again in order, so a device's
        // transitions keep their order on Kafka (those already there appear twice; consumers
        // drop the second copy by `event_id`).
        let mut from = 0;
        while from < events.len() {
            let mut sent = Vec::with_capacity(events.len() - from);
            for (a, b) in events[from..].iter().zip(&bytes[from..]) {
                sent.push(k.send_alert(&a.device_id, b).await);
            }
            let mut failed = None;
            for (j, d) in sent.into_iter().enumerate() {
                if let Err(e) = d.wait().await
                    && failed.is_none()
                {
                    tracing::warn!(error = %e, "alert not on Kafka yet; retrying");
                    failed = Some(from + j);
                }
            }
            match failed {
                Some(i) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    from = i;
                }
                None => from = events.len(),
            }
        }
    }
    for a in events {
        let mut wait = Duration::from_millis(100);
        loop {
            let c = connected(db, url).await;
            match store(c, a).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "alert not stored yet");
                    *db = None;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    for (a, b) in events.iter().zip(&bytes) {
        if a.backfill {
            continue;
        }
        for h in hooks {
            if h.try_send(b.clone()).is_err() {
                counter!("plantlink_cloud_webhook_failures_total", "reason" => "queue_full")
                    .increment(1);
            }
        }
    }
}

/// Stores one transition; one already stored (by its id) changes nothing.
async fn store(c: &tokio_postgres::Client, a: &AlertEvent) -> Result<(), tokio_postgres::Error> {
    let ws = crate::postgres::system_time(a.window_start_us);
    let we = crate::postgres::system_time(a.window_end_us);
    let id = event_id(a);
    match a.state {
        AlertState::Firing => {
            c.execute(
                "INSERT INTO alerts (rule_id, tenant_id, device_id, state, severity, value, threshold,
                                     window_start, window_end, backfill, event_id)
                 VALUES ($1, $2, $3, 'firing', $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT DO NOTHING",
                &[&a.rule_id, &a.tenant, &a.device_id, &a.severity, &a.value, &a.threshold, &ws, &we, &a.backfill, &id],
            )
            .await?;
        }
        AlertState::Resolved => {
            // The newest open alert of this rule and device (backfill alerts close their own),
            // unless this resolution is stored already.
            c.execute(
                "UPDATE alerts SET state = 'resolved', resolved_value = $4, resolved_window_start = $5,
                        resolved_window_end = $6, resolved_at = now(), resolved_event_id = $8
                 WHERE alert_id = (SELECT alert_id FROM alerts
                                   WHERE tenant_id = $7 AND rule_id = $1 AND device_id = $2
                                     AND backfill = $3 AND state = 'firing'
                                   ORDER BY alert_id DESC LIMIT 1)
                   AND NOT EXISTS (SELECT 1 FROM alerts WHERE tenant_id = $7 AND resolved_event_id = $8)",
                &[&a.rule_id, &a.device_id, &a.backfill, &a.value, &ws, &we, &a.tenant, &id],
            )
            .await?;
        }
    }
    Ok(())
}

/// One worker and bounded queue per configured webhook.
pub fn webhooks(
    cfg: &Alerting,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Vec<mpsc::Sender<Arc<Vec<u8>>>> {
    cfg.webhooks
        .iter()
        .map(|w| {
            let (tx, rx) = mpsc::channel(cfg.webhook_queue);
            tasks.spawn(webhook(w.url.clone(), rx));
            tx
        })
        .collect()
}

async fn webhook(url: String, mut rx: mpsc::Receiver<Arc<Vec<u8>>>) {
    while let Some(body) = rx.recv().await {
        let mut wait = Duration::from_millis(200);
        for attempt in 1..=8 {
            match post(&url, &body).await {
                Ok(()) => break,
                Err(e) => {
                    counter!("plantlink_cloud_webhook_failures_total", "reason" => "delivery")
                        .increment(1);
                    tracing::warn!(%url, attempt, error = %e, "webhook delivery failed");
                    if attempt == 8 {
                        counter!("plantlink_cloud_webhook_failures_total", "reason" => "gave_up")
                            .increment(1);
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// `http://host[:port]/path` split into (host:port, host, path).
pub fn split_http_url(url: &str) -> Option<(String, String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return None;
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Some((addr, host.to_owned(), path.to_owned()))
}

/// One HTTP/1.1 POST of JSON; `Ok` on a 2xx answer.
async fn post(url: &str, body: &[u8]) -> Result<(), String> {
    let (addr, host, path) = split_http_url(url).ok_or("not an http:// URL")?;
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nUser-Agent: plantlink-cloud-ingest\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        let mut status = [0u8; 12];
        s.read_exact(&mut status).await.map_err(|e| e.to_string())?;
        let code = std::str::from_utf8(&status[9..12])
            .ok()
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or("not an HTTP answer")?;
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(format!("answered {code}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(window: i64, device: &str) -> AlertEvent {
        AlertEvent {
            rule_id: 7,
            tenant: "t".into(),
            device_id: device.into(),
            metric: Some("temperature".into()),
            state: AlertState::Firing,
            severity: "critical".into(),
            value: 80.0,
            threshold: 75.0,
            window_start_us: window,
            window_end_us: window + 1_000_000,
            backfill: false,
        }
    }

    fn devices(events: &[AlertEvent]) -> Vec<&str> {
        events.iter().map(|e| e.device_id.as_str()).collect()
    }

    #[test]
    fn events_waiting_together_go_as_one_group_up_to_the_mark_behind_them() {
        let (tx, mut rx) = mpsc::channel(16);
        for d in ["b", "c"] {
            tx.try_send(Delivery::Event(event(0, d))).unwrap();
        }
        tx.try_send(Delivery::Mark {
            partition: 3,
            next: 42,
            replay_from: 40,
        })
        .unwrap();
        tx.try_send(Delivery::Event(event(0, "d"))).unwrap();

        let (group, after) = waiting_with(event(0, "a"), &mut rx);
        assert_eq!(devices(&group), ["a", "b", "c"]);
        assert!(matches!(
            after,
            Some(Delivery::Mark {
                partition: 3,
                next: 42,
                replay_from: 40
            })
        ));
        // What came after the mark waits for the next round, in order.
        let Ok(Delivery::Event(d)) = rx.try_recv() else {
            panic!("the event after the mark is still queued")
        };
        let (group, after) = waiting_with(d, &mut rx);
        assert_eq!(devices(&group), ["d"]);
        assert!(after.is_none());
    }

    #[test]
    fn a_group_stops_at_its_limit_and_keeps_the_rest_in_order() {
        let (tx, mut rx) = mpsc::channel(EVENTS_AT_ONCE * 2);
        for i in 1..EVENTS_AT_ONCE as i64 + 10 {
            tx.try_send(Delivery::Event(event(i, "a"))).unwrap();
        }
        let (group, after) = waiting_with(event(0, "a"), &mut rx);
        assert_eq!(group.len(), EVENTS_AT_ONCE);
        assert!(after.is_none());
        let windows: Vec<i64> = group.iter().map(|e| e.window_start_us).collect();
        assert_eq!(windows, (0..EVENTS_AT_ONCE as i64).collect::<Vec<_>>());
        let Ok(Delivery::Event(next)) = rx.try_recv() else {
            panic!("the rest is still queued")
        };
        assert_eq!(next.window_start_us, EVENTS_AT_ONCE as i64);
    }
}
