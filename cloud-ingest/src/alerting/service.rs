//! The alerting service: drives the [`Engine`] with the readings cloud-ingest accepts and
//! with the clock, keeps its rules in step with `alert_rules`, and delivers each transition
//! once: to the `alerts` table, to the Kafka alerts topic (keyed by device), and, unless it
//! comes from a backfill, to the configured webhooks.
//!
//! `alerts` has one row per alert: inserted `firing`, updated to `resolved` (a partial
//! unique index keeps one open live alert per rule and device). Webhooks get an HTTP POST of
//! the event JSON through a bounded queue, retried with backoff; what cannot be queued or
//! delivered is counted in `plantlink_cloud_webhook_failures_total`.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::{counter, gauge};
use plantlink_model::Reading;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use super::engine::{AlertEvent, AlertState, Engine, Input, Output, Settings};
use super::rule::{Rule, RuleBody};
use crate::config::Alerting;
use crate::kafka::{Kafka, rfc3339};

/// Readings of one batch for the engine.
#[derive(Debug)]
pub struct Feed {
    /// Tenant, from the certificate.
    pub tenant: Arc<str>,
    /// The readings.
    pub readings: Vec<Reading>,
    /// From the gateway's backlog lane.
    pub backfill: bool,
}

/// The handle the rest of the service talks to; cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    feed: mpsc::Sender<Feed>,
    tenants: Arc<RwLock<HashSet<String>>>,
    reload: Arc<Notify>,
    loaded: Arc<Notify>,
}

impl Alerts {
    /// Whether `tenant` has any rule (readings of other tenants are not sent).
    pub fn watches(&self, tenant: &str) -> bool {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(tenant)
    }

    /// Hands a batch's readings to the engine; waits when it is behind (bounded queue).
    pub async fn feed(&self, f: Feed) {
        let _ = self.feed.send(f).await;
    }

    /// Waits (up to `limit`) until the rules have been read once, so that the first batches
    /// after a start are evaluated.
    pub async fn ready(&self, limit: Duration) {
        if !self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return;
        }
        let _ = tokio::time::timeout(limit, self.loaded.notified()).await;
    }

    /// Re-reads the rules now (after the API changed them).
    pub fn rules_changed(&self) {
        self.reload.notify_one();
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Reads every rule from `alert_rules`; rules that no longer pass the checks are skipped
/// with a warning.
pub async fn load_rules(c: &tokio_postgres::Client) -> Result<Vec<Rule>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT rule_id, tenant_id, condition_expr::text FROM alert_rules ORDER BY rule_id",
            &[],
        )
        .await?;
    let mut rules = Vec::with_capacity(rows.len());
    for r in rows {
        let (id, tenant, json): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
        match serde_json::from_str::<RuleBody>(&json)
            .map_err(|e| e.to_string())
            .and_then(|b| b.to_rule(id, &tenant).map_err(|e| e.to_string()))
        {
            Ok(rule) => rules.push(rule),
            Err(e) => tracing::warn!(rule_id = id, error = %e, "alert rule skipped"),
        }
    }
    Ok(rules)
}

/// Starts the service on `tasks`; it ends when every [`Alerts`] handle is dropped.
pub fn start(
    cfg: Alerting,
    url: String,
    kafka: Option<Kafka>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Alerts {
    let (feed_tx, feed_rx) = mpsc::channel(cfg.queue);
    let tenants = Arc::new(RwLock::new(HashSet::new()));
    let reload = Arc::new(Notify::new());
    let loaded = Arc::new(Notify::new());
    let (events_tx, events_rx) = mpsc::channel::<AlertEvent>(cfg.queue);
    let hooks = webhooks(&cfg, tasks);
    tasks.spawn(deliver(events_rx, url.clone(), kafka, hooks));
    tasks.spawn(run(
        cfg,
        url,
        feed_rx,
        tenants.clone(),
        reload.clone(),
        loaded.clone(),
        events_tx,
    ));
    Alerts {
        feed: feed_tx,
        tenants,
        reload,
        loaded,
    }
}

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    match crate::postgres::connect(url).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "alerting: PostgreSQL unavailable; retrying");
            None
        }
    }
}

async fn run(
    cfg: Alerting,
    url: String,
    mut feed: mpsc::Receiver<Feed>,
    tenants: Arc<RwLock<HashSet<String>>>,
    reload: Arc<Notify>,
    loaded: Arc<Notify>,
    events: mpsc::Sender<AlertEvent>,
) {
    let mut engine = Engine::new(Settings {
        out_of_orderness_us: cfg.out_of_orderness_ms as i64 * 1000,
        allowed_lateness_us: cfg.allowed_lateness_ms as i64 * 1000,
        idle_grace_us: cfg.idle_grace_ms as i64 * 1000,
        max_series: cfg.max_series,
    });
    let mut db: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.tick_ms));
    let mut poll = tokio::time::interval(Duration::from_millis(cfg.rules_reload_ms));
    let mut restored = false;
    let mut out = Vec::new();
    loop {
        let mut load = false;
        tokio::select! {
            f = feed.recv() => {
                let Some(f) = f else { break };
                let now = now_us();
                let mut newest = i64::MIN;
                for r in &f.readings {
                    engine.on_reading(Input { tenant: &f.tenant, reading: r, backfill: f.backfill }, now, &mut out);
                    newest = newest.max(r.ts.0);
                }
                if !f.backfill && newest > i64::MIN {
                    gauge!("plantlink_cloud_alert_eval_lag_seconds").set((now - newest) as f64 / 1e6);
                }
            }
            _ = tick.tick() => engine.on_tick(now_us(), &mut out),
            _ = poll.tick() => load = true,
            _ = reload.notified() => load = true,
        }
        if load {
            if db.as_ref().is_none_or(|c| c.is_closed()) {
                db = connect(&url).await;
            }
            if let Some(c) = &db {
                match load_rules(c).await {
                    Ok(rules) => {
                        let watched: HashSet<String> =
                            rules.iter().map(|r| r.tenant.clone()).collect();
                        *tenants.write().unwrap_or_else(|p| p.into_inner()) = watched;
                        engine.set_rules(rules);
                        if !restored {
                            restored = restore_open(c, &mut engine).await;
                            loaded.notify_one();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "alerting: cannot read the rules");
                        db = None;
                    }
                }
            }
        }
        gauge!("plantlink_cloud_alert_series").set(engine.series_count() as f64);
        for o in out.drain(..) {
            match o {
                Output::Alert(a) => {
                    let state = match a.state {
                        AlertState::Firing => "firing",
                        AlertState::Resolved => "resolved",
                    };
                    counter!("plantlink_cloud_alerts_total", "severity" => a.severity.clone(), "state" => state)
                        .increment(1);
                    if events.send(a).await.is_err() {
                        return;
                    }
                }
                Output::Late { .. } => counter!("plantlink_cloud_late_readings_total").increment(1),
            }
        }
    }
}

/// Marks the live alerts the table holds open as firing in the engine, so a restart neither
/// fires them again nor forgets to resolve them.
async fn restore_open(c: &tokio_postgres::Client, engine: &mut Engine) -> bool {
    match c
        .query(
            "SELECT rule_id, tenant_id, device_id FROM alerts WHERE state = 'firing' AND NOT backfill",
            &[],
        )
        .await
    {
        Ok(rows) => {
            for r in rows {
                engine.restore_open(r.get(0), r.get::<_, &str>(1), r.get::<_, &str>(2));
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "alerting: cannot read open alerts");
            false
        }
    }
}

/// The JSON of an alert event (Kafka, webhooks).
pub fn event_json(a: &AlertEvent) -> serde_json::Value {
    serde_json::json!({
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

/// Writes each event to the table, Kafka and the webhooks, in order, retrying the table and
/// Kafka until they take it.
async fn deliver(
    mut events: mpsc::Receiver<AlertEvent>,
    url: String,
    kafka: Option<Kafka>,
    hooks: Vec<mpsc::Sender<Arc<Vec<u8>>>>,
) {
    let mut db: Option<tokio_postgres::Client> = None;
    while let Some(a) = events.recv().await {
        let json = event_json(&a);
        let bytes = Arc::new(serde_json::to_vec(&json).unwrap_or_default());
        let mut wait = Duration::from_millis(100);
        loop {
            if db.as_ref().is_none_or(|c| c.is_closed()) {
                db = connect(&url).await;
            }
            let stored = match &db {
                Some(c) => store(c, &a).await.map_err(|e| e.to_string()),
                None => Err("no connection".into()),
            };
            match stored {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "alert not stored yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Some(k) = &kafka {
            while let Err(e) = k.send_alert(&a.device_id, &bytes).await.wait().await {
                tracing::warn!(error = %e, "alert not on Kafka yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if !a.backfill {
            for h in &hooks {
                if h.try_send(bytes.clone()).is_err() {
                    counter!("plantlink_cloud_webhook_failures_total", "reason" => "queue_full")
                        .increment(1);
                }
            }
        }
    }
}

async fn store(c: &tokio_postgres::Client, a: &AlertEvent) -> Result<(), tokio_postgres::Error> {
    let ws = crate::postgres::system_time(a.window_start_us);
    let we = crate::postgres::system_time(a.window_end_us);
    match a.state {
        AlertState::Firing => {
            c.execute(
                "INSERT INTO alerts (rule_id, tenant_id, device_id, state, severity, value, threshold,
                                     window_start, window_end, backfill)
                 VALUES ($1, $2, $3, 'firing', $4, $5, $6, $7, $8, $9)
                 ON CONFLICT DO NOTHING",
                &[&a.rule_id, &a.tenant, &a.device_id, &a.severity, &a.value, &a.threshold, &ws, &we, &a.backfill],
            )
            .await?;
        }
        AlertState::Resolved => {
            // The newest open alert of this rule and device (backfill alerts close their own).
            c.execute(
                "UPDATE alerts SET state = 'resolved', resolved_value = $4, resolved_window_start = $5,
                        resolved_window_end = $6, resolved_at = now()
                 WHERE alert_id = (SELECT alert_id FROM alerts
                                   WHERE tenant_id = $7 AND rule_id = $1 AND device_id = $2
                                     AND backfill = $3 AND state = 'firing'
                                   ORDER BY alert_id DESC LIMIT 1)",
                &[&a.rule_id, &a.device_id, &a.backfill, &a.value, &ws, &we, &a.tenant],
            )
            .await?;
        }
    }
    Ok(())
}

/// One worker and bounded queue per configured webhook.
fn webhooks(
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

    #[test]
    fn webhook_urls_split() {
        assert_eq!(
            split_http_url("http://hooks.local:9000/alerts?x=1"),
            Some((
                "hooks.local:9000".into(),
                "hooks.local".into(),
                "/alerts?x=1".into()
            ))
        );
        assert_eq!(
            split_http_url("http://hooks.local"),
            Some(("hooks.local:80".into(), "hooks.local".into(), "/".into()))
        );
        assert_eq!(split_http_url("https://hooks.local/x"), None);
        assert_eq!(split_http_url("http:///x"), None);
    }
}
