//! The alerting service: drives the [`Engine`] with the readings cloud-ingest accepts and
//! with the clock, keeps its rules in step with `alert_rules`, and delivers each transition
//! once: to the `alerts` table, to the Kafka alerts topic (keyed by device), and, unless it
//! comes from a backfill, to the configured webhooks.
//!
//! `alerts` has one row per alert: inserted `firing`, updated to `resolved` (a partial
//! unique index keeps one open live alert per rule and device). Webhooks get an HTTP POST of
//! the event JSON through a bounded queue, retried with backoff; what cannot be queued or
//! delivered is counted in `plantlink_cloud_webhook_failures_total`.
//!
//! **Ingest never waits on alerting.** [`Alerts::feed`] does not block: batches wait for the
//! engine in one queue per tenant, bounded in readings (`feed_max_readings_per_tenant`, and
//! `feed_max_readings` over all tenants; a batch is always taken into an empty queue), and
//! the engine takes one batch of each waiting tenant in turn, so a tenant with a deep backlog
//! delays another tenant's batch by at most one batch of its own. When a tenant's queue (or
//! the whole) is full, the batch's readings are not evaluated: they are still stored (storage
//! is the promise; alerting is best-effort under overload), counted in
//! `plantlink_cloud_alert_readings_shed_total{tenant}`, and a warning names the tenant and
//! the bound (at most one per tenant every 30 s, with the count since the last one).
//!
//! **Per-tenant caps** ([`Engine`]): rules beyond `max_rules_per_tenant` (the highest ids) are
//! not evaluated; the API still stores them. Readings that would start a device or series
//! over `max_devices_per_tenant` / `max_series_per_tenant` are not evaluated for it. Each is
//! counted per tenant (`plantlink_cloud_alert_rules_over_cap{tenant}`,
//! `plantlink_cloud_alert_devices_dropped_total{tenant}`,
//! `plantlink_cloud_alert_series_dropped_total{tenant}`), warned about (rate-limited, naming
//! the tenant and the cap) and shown in [`Alerts::status`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use plantlink_model::Reading;
use tokio::sync::{Notify, mpsc};

use super::engine::{AlertState, Engine, Input, Output, Quota, Settings};
use super::rule::{Rule, RuleBody};
use crate::config::Alerting;
use crate::kafka::Kafka;

use super::deliver::{Delivery, deliver, webhooks};
pub use super::deliver::{event_id, event_json, split_http_url};

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

/// At most one warning per tenant and kind this often.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Rate-limits warnings by key: `due` says whether to log now, with what was held back.
#[derive(Debug, Default)]
struct Warnings(HashMap<(String, &'static str), (Instant, u64)>);

impl Warnings {
    /// Notes `n` more of `kind` for `tenant`; `Some(total since the last warning)` when a
    /// warning is due.
    fn due(&mut self, tenant: &str, kind: &'static str, n: u64) -> Option<u64> {
        let now = Instant::now();
        match self.0.get_mut(&(tenant.to_owned(), kind)) {
            Some((last, held)) if now.duration_since(*last) < WARN_EVERY => {
                *held += n;
                None
            }
            Some((last, held)) => {
                let total = *held + n;
                (*last, *held) = (now, 0);
                Some(total)
            }
            None => {
                self.0.insert((tenant.to_owned(), kind), (now, 0));
                Some(n)
            }
        }
    }
}

/// Batches waiting for the engine: a queue per tenant, served in turn.
#[derive(Debug, Default)]
struct Queues {
    /// Batches and their readings, by tenant (only tenants with batches).
    by_tenant: HashMap<Arc<str>, (VecDeque<Feed>, usize)>,
    /// Tenants with batches, in the order they are served.
    turn: VecDeque<Arc<str>>,
    /// Readings waiting, all tenants.
    total: usize,
    /// Readings shed since start, by tenant.
    shed: HashMap<Arc<str>, u64>,
    warnings: Warnings,
}

#[derive(Debug)]
struct Backlog {
    q: Mutex<Queues>,
    ready: Notify,
    max_total: usize,
    max_per_tenant: usize,
}

impl Backlog {
    fn new(max_total: usize, max_per_tenant: usize) -> Self {
        Self {
            q: Mutex::default(),
            ready: Notify::new(),
            max_total,
            max_per_tenant,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `f`, or sheds it (counted and warned) when its tenant's queue or the whole is
    /// full. An empty queue always takes a batch.
    fn push(&self, f: Feed) -> bool {
        let n = f.readings.len();
        if n == 0 {
            return true;
        }
        let mut q = self.lock();
        let queued = q.by_tenant.get(&f.tenant).map_or(0, |t| t.1);
        let full = if queued > 0 && queued + n > self.max_per_tenant {
            Some(("feed_max_readings_per_tenant", self.max_per_tenant))
        } else if q.total > 0 && q.total + n > self.max_total {
            Some(("feed_max_readings", self.max_total))
        } else {
            None
        };
        if let Some((bound, value)) = full {
            *q.shed.entry(f.tenant.clone()).or_default() += n as u64;
            counter!("plantlink_cloud_alert_readings_shed_total", "tenant" => f.tenant.to_string())
                .increment(n as u64);
            if let Some(shed) = q.warnings.due(&f.tenant, bound, n as u64) {
                tracing::warn!(
                    tenant = %f.tenant, bound, limit = value, tenant_queued = queued,
                    queued = q.total, shed,
                    "alerting: backlog full; readings shed from alerting (they are stored)"
                );
            }
            return false;
        }
        q.total += n;
        match q.by_tenant.get_mut(&f.tenant) {
            Some(t) => {
                t.1 += n;
                t.0.push_back(f);
            }
            None => {
                q.turn.push_back(f.tenant.clone());
                q.by_tenant
                    .insert(f.tenant.clone(), (VecDeque::from([f]), n));
            }
        }
        drop(q);
        self.ready.notify_one();
        true
    }

    /// The next batch: the next tenant's oldest.
    fn pop(&self) -> Option<Feed> {
        let mut q = self.lock();
        let tenant = q.turn.pop_front()?;
        let (f, empty) = {
            let t = q.by_tenant.get_mut(&tenant)?;
            let f = t.0.pop_front()?;
            t.1 -= f.readings.len();
            (f, t.0.is_empty())
        };
        q.total -= f.readings.len();
        if empty {
            q.by_tenant.remove(&tenant);
        } else {
            q.turn.push_back(tenant);
        }
        Some(f)
    }

    /// Waits for the next batch.
    async fn next(&self) -> Feed {
        loop {
            if let Some(f) = self.pop() {
                return f;
            }
            self.ready.notified().await;
        }
    }

    /// Readings waiting and shed since start, by tenant.
    fn counts(&self) -> HashMap<String, (usize, u64)> {
        let q = self.lock();
        let mut m: HashMap<String, (usize, u64)> = HashMap::new();
        for (t, (_, n)) in &q.by_tenant {
            m.entry(t.to_string()).or_default().0 = *n;
        }
        for (t, n) in &q.shed {
            m.entry(t.to_string()).or_default().1 = *n;
        }
        m
    }
}

/// One tenant in the alerting engine, for [`Alerts::status`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantStatus {
    /// What it holds and what its caps kept out.
    #[serde(flatten)]
    pub quota: Quota,
    /// Readings waiting for the engine.
    pub readings_queued: usize,
    /// Readings not evaluated since start because its backlog was full.
    pub readings_shed: u64,
}

/// The handle the rest of the service talks to; cheap to clone.
#[derive(Debug, Clone)]
pub struct Alerts {
    backlog: Arc<Backlog>,
    /// Closed (the service ends) when every handle is gone.
    _alive: mpsc::Sender<()>,
    tenants: Arc<RwLock<HashSet<String>>>,
    status: Arc<RwLock<BTreeMap<String, Quota>>>,
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

    /// Hands a batch's readings to the engine. Never waits: when the tenant's backlog (or
    /// the whole) is full, the readings are shed from alerting, counted in
    /// `plantlink_cloud_alert_readings_shed_total{tenant}` and warned about (see the module
    /// docs). Async only so that callers need not change.
    pub async fn feed(&self, f: Feed) {
        self.backlog.push(f);
    }

    /// Each tenant's state in the engine (as of the last tick) and its backlog.
    pub fn status(&self) -> BTreeMap<String, TenantStatus> {
        let mut m: BTreeMap<String, TenantStatus> = self
            .status
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(t, q)| {
                (
                    t.clone(),
                    TenantStatus {
                        quota: q.clone(),
                        ..TenantStatus::default()
                    },
                )
            })
            .collect();
        for (t, (queued, shed)) in self.backlog.counts() {
            let s = m.entry(t).or_default();
            (s.readings_queued, s.readings_shed) = (queued, shed);
        }
        m
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

/// Describes the alerting metrics of a tenant (the others are in [`crate::telemetry`]).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "plantlink_cloud_alert_readings_shed_total",
        Unit::Count,
        "Readings not evaluated for alerts because their tenant's alerting backlog \
         (feed_max_readings_per_tenant) or the whole (feed_max_readings) was full, by tenant \
         (they are stored)."
    );
    describe_counter!(
        "plantlink_cloud_alert_series_dropped_total",
        Unit::Count,
        "(reading, rule) pairs not evaluated because their tenant was at \
         alerting.max_series_per_tenant and the series was new, by tenant."
    );
    describe_counter!(
        "plantlink_cloud_alert_devices_dropped_total",
        Unit::Count,
        "Readings not evaluated because their tenant was at alerting.max_devices_per_tenant \
         and the device was new, by tenant."
    );
    describe_gauge!(
        "plantlink_cloud_alert_rules_over_cap",
        Unit::Count,
        "Rules not evaluated because their tenant has more than alerting.max_rules_per_tenant \
         (the highest ids), by tenant."
    );
    describe_gauge!(
        "plantlink_cloud_alert_tenant_series",
        Unit::Count,
        "(rule, device) series the alerting engine tracks, by tenant."
    );
    describe_gauge!(
        "plantlink_cloud_alert_tenant_devices",
        Unit::Count,
        "Devices the alerting engine tracks, by tenant."
    );
}

/// Starts the service on `tasks`; it ends when every [`Alerts`] handle is dropped.
pub fn start(
    cfg: Alerting,
    url: String,
    kafka: Option<Kafka>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Alerts {
    describe();
    if let Some(n) = cfg.max_series {
        tracing::warn!(
            max_series = n,
            "alerting.max_series is no longer used: caps are per tenant \
             (max_series_per_tenant, max_devices_per_tenant, max_rules_per_tenant)"
        );
    }
    let backlog = Arc::new(Backlog::new(
        cfg.feed_max_readings,
        cfg.feed_max_readings_per_tenant,
    ));
    let (alive_tx, alive_rx) = mpsc::channel(1);
    let tenants = Arc::new(RwLock::new(HashSet::new()));
    let status = Arc::new(RwLock::new(BTreeMap::new()));
    let reload = Arc::new(Notify::new());
    let loaded = Arc::new(Notify::new());
    let (events_tx, events_rx) = mpsc::channel::<Delivery>(cfg.queue);
    let hooks = webhooks(&cfg, tasks);
    tasks.spawn(deliver(events_rx, url.clone(), kafka, hooks, None));
    tasks.spawn(run(
        cfg,
        url,
        Inputs {
            backlog: backlog.clone(),
            alive: alive_rx,
        },
        Shared {
            tenants: tenants.clone(),
            status: status.clone(),
            reload: reload.clone(),
            loaded: loaded.clone(),
        },
        events_tx,
    ));
    Alerts {
        backlog,
        _alive: alive_tx,
        tenants,
        status,
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

/// What the engine is fed from.
#[derive(Debug)]
struct Inputs {
    backlog: Arc<Backlog>,
    /// Ends (`None`) when every [`Alerts`] handle is gone.
    alive: mpsc::Receiver<()>,
}

/// What the engine's task shares with the handles.
#[derive(Debug)]
struct Shared {
    tenants: Arc<RwLock<HashSet<String>>>,
    status: Arc<RwLock<BTreeMap<String, Quota>>>,
    reload: Arc<Notify>,
    loaded: Arc<Notify>,
}

/// Evaluates one batch.
fn evaluate_feed(engine: &mut Engine, f: &Feed, out: &mut Vec<Output>) {
    let now = now_us();
    let mut newest = i64::MIN;
    for r in &f.readings {
        engine.on_reading(
            Input {
                tenant: &f.tenant,
                reading: r,
                backfill: f.backfill,
            },
            now,
            out,
        );
        newest = newest.max(r.ts.0);
    }
    if !f.backfill && newest > i64::MIN {
        gauge!("plantlink_cloud_alert_eval_lag_seconds").set((now - newest) as f64 / 1e6);
    }
}

/// Exports each tenant's quota: counters of what its caps kept out (by the increase since
/// the last export), gauges, rate-limited warnings, and the status of [`Alerts::status`].
fn export_quotas(
    engine: &Engine,
    s: &Settings,
    exported: &mut HashMap<String, Quota>,
    warnings: &mut Warnings,
    status: &RwLock<BTreeMap<String, Quota>>,
) {
    for (tenant, q) in engine.quotas() {
        let before = exported.get(tenant).cloned().unwrap_or_default();
        if *q == before {
            continue;
        }
        let label = || tenant.to_owned();
        let series = q.series_dropped.saturating_sub(before.series_dropped);
        let devices = q.devices_dropped.saturating_sub(before.devices_dropped);
        counter!("plantlink_cloud_alert_series_dropped_total", "tenant" => label())
            .increment(series);
        counter!("plantlink_cloud_alert_devices_dropped_total", "tenant" => label())
            .increment(devices);
        gauge!("plantlink_cloud_alert_rules_over_cap", "tenant" => label())
            .set(q.rules_over_cap as f64);
        gauge!("plantlink_cloud_alert_tenant_series", "tenant" => label()).set(q.series as f64);
        gauge!("plantlink_cloud_alert_tenant_devices", "tenant" => label()).set(q.devices as f64);
        if series > 0
            && let Some(n) = warnings.due(tenant, "max_series_per_tenant", series)
        {
            tracing::warn!(
                tenant,
                cap = "max_series_per_tenant",
                limit = s.max_series_per_tenant,
                not_evaluated = n,
                "alerting: tenant at its series cap; readings for new (rule, device) series are not evaluated"
            );
        }
        if devices > 0
            && let Some(n) = warnings.due(tenant, "max_devices_per_tenant", devices)
        {
            tracing::warn!(
                tenant,
                cap = "max_devices_per_tenant",
                limit = s.max_devices_per_tenant,
                not_evaluated = n,
                "alerting: tenant at its device cap; readings of new devices are not evaluated"
            );
        }
        let rules_due =
            q.rules_over_cap > 0 && warnings.due(tenant, "max_rules_per_tenant", 0).is_some();
        if rules_due || (q.rules_over_cap > 0 && q.rules_over_cap != before.rules_over_cap) {
            tracing::warn!(
                tenant,
                cap = "max_rules_per_tenant",
                limit = s.max_rules_per_tenant,
                over_cap = q.rules_over_cap,
                "alerting: tenant has more rules than its cap; the rules with the highest ids are not evaluated"
            );
        }
        exported.insert(tenant.to_owned(), q.clone());
    }
    *status.write().unwrap_or_else(|p| p.into_inner()) = engine
        .quotas()
        .map(|(t, q)| (t.to_owned(), q.clone()))
        .collect();
}

/// The engine's settings from `[alerting]`.
pub fn settings(cfg: &Alerting) -> Settings {
    Settings {
        out_of_orderness_us: cfg.out_of_orderness_ms as i64 * 1000,
        allowed_lateness_us: cfg.allowed_lateness_ms as i64 * 1000,
        idle_grace_us: cfg.idle_grace_ms as i64 * 1000,
        max_series_per_tenant: cfg.max_series_per_tenant,
        max_devices_per_tenant: cfg.max_devices_per_tenant,
        max_rules_per_tenant: cfg.max_rules_per_tenant,
    }
}

async fn run(
    cfg: Alerting,
    url: String,
    mut inputs: Inputs,
    shared: Shared,
    events: mpsc::Sender<Delivery>,
) {
    let settings = settings(&cfg);
    let mut engine = Engine::new(settings);
    let mut db: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.tick_ms));
    let mut poll = tokio::time::interval(Duration::from_millis(cfg.rules_reload_ms));
    let mut restored = false;
    let mut out = Vec::new();
    let mut exported = HashMap::new();
    let mut warnings = Warnings::default();
    let mut done = false;
    loop {
        let mut load = false;
        tokio::select! {
            f = inputs.backlog.next() => evaluate_feed(&mut engine, &f, &mut out),
            _ = tick.tick() => {
                engine.on_tick(now_us(), &mut out);
                export_quotas(&engine, &settings, &mut exported, &mut warnings, &shared.status);
            }
            _ = poll.tick() => load = true,
            _ = shared.reload.notified() => load = true,
            None = inputs.alive.recv() => {
                // Every handle is gone: what was queued is still evaluated.
                while let Some(f) = inputs.backlog.pop() {
                    evaluate_feed(&mut engine, &f, &mut out);
                }
                done = true;
            }
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
                        *shared.tenants.write().unwrap_or_else(|p| p.into_inner()) = watched;
                        engine.set_rules(rules);
                        export_quotas(
                            &engine,
                            &settings,
                            &mut exported,
                            &mut warnings,
                            &shared.status,
                        );
                        if !restored {
                            restored = restore_open(c, &mut engine).await;
                            shared.loaded.notify_one();
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
                    if events.send(Delivery::Event(a)).await.is_err() {
                        return;
                    }
                }
                Output::Late { .. } => counter!("plantlink_cloud_late_readings_total").increment(1),
            }
        }
        if done {
            break;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(tenant: &str, n: usize) -> Feed {
        Feed {
            tenant: tenant.into(),
            readings: (0..n)
                .map(|i| Reading::new(tenant, "d", "m", plantlink_model::Timestamp(i as i64), 1.0))
                .collect(),
            backfill: false,
        }
    }

    #[test]
    fn a_full_tenant_backlog_sheds_its_own_batches_and_tenants_are_served_in_turn() {
        let b = Backlog::new(100, 30);
        // B fills its 30 readings; its next batch is shed, A's is taken.
        assert!(b.push(batch("b", 20)));
        assert!(b.push(batch("b", 10)));
        assert!(!b.push(batch("b", 1)));
        assert!(b.push(batch("a", 5)));
        // An empty queue takes any batch (bounded by the batch itself).
        assert!(b.push(batch("c", 50)));
        assert!(!b.push(batch("d", 20)), "the whole is at 85 of 100");
        let counts = b.counts();
        assert_eq!(counts["b"], (30, 1));
        assert_eq!(counts["a"], (5, 0));
        assert_eq!(counts["d"], (0, 20));
        // In turn: B's first, A's, C's, then B's second, though B queued both first.
        let order: Vec<(String, usize)> = std::iter::from_fn(|| b.pop())
            .map(|f| (f.tenant.to_string(), f.readings.len()))
            .collect();
        assert_eq!(
            order,
            vec![
                ("b".into(), 20),
                ("a".into(), 5),
                ("c".into(), 50),
                ("b".into(), 10)
            ]
        );
        assert_eq!(b.lock().total, 0);
        assert!(b.push(batch("b", 30)));
    }

    #[test]
    fn warnings_are_rate_limited_and_count_what_was_held_back() {
        let mut w = Warnings::default();
        assert_eq!(w.due("b", "x", 3), Some(3));
        assert_eq!(w.due("b", "x", 4), None);
        assert_eq!(w.due("a", "x", 1), Some(1), "per tenant");
        assert_eq!(w.due("b", "y", 1), Some(1), "per kind");
        w.0.get_mut(&("b".to_owned(), "x")).unwrap().0 -= WARN_EVERY;
        assert_eq!(w.due("b", "x", 1), Some(5));
    }

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
