//! The query API (axum) on `[api] bind`, documented in `deploy/openapi.yaml`.
//!
//! Every `/v1` request carries `Authorization: Bearer <token>`; `[api.tokens]` maps each
//! tenant to its token, and a tenant sees only its own devices: another tenant's device is
//! answered exactly like a device that does not exist (404), so ids do not leak. Errors are
//! JSON `{"error": "..."}`; a bad parameter gets a 400 that names it and says what is expected.
//!
//! Long ranges are routed to the rollups: `resolution=auto` reads raw up to 2 days,
//! `downsampled_metrics_1h` up to 90 days and `downsampled_metrics_1d` beyond.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_postgres::Client;

use crate::alerting::rule::RuleBody;
use crate::alerting::service::Alerts;
use crate::kafka::{Kafka, json_number, rfc3339};
use crate::sink::Sink;
use crate::status::Gateways;

/// The routes the API serves, as written in `deploy/openapi.yaml`.
pub const ROUTES: [&str; 9] = [
    "/healthz",
    "/readyz",
    "/v1/devices/{id}/metrics",
    "/v1/devices/{id}/metrics/latest",
    "/v1/tenants/{id}/metrics/aggregate",
    "/v1/pipeline/lag",
    "/v1/alert-rules",
    "/v1/alert-rules/{id}",
    "/v1/alerts",
];

/// Most points one request returns; more sets `truncated`.
const MAX_LIMIT: i64 = 100_000;
const DAY_US: i64 = 86_400_000_000;

/// An error answer.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(param: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, format!("parameter {param}: {why}"))
}

fn storage(e: tokio_postgres::Error) -> ApiError {
    tracing::warn!(error = %e, "API query failed");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the database is unavailable; retry".into(),
    )
}

/// One PostgreSQL connection for queries (tokio-postgres pipelines concurrent ones),
/// reconnected when lost.
#[derive(Debug, Clone)]
struct Db {
    url: Arc<str>,
    client: Arc<tokio::sync::Mutex<Option<Arc<Client>>>>,
}

impl Db {
    async fn get(&self) -> Result<Arc<Client>, ApiError> {
        let mut c = self.client.lock().await;
        if let Some(client) = c.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = Arc::new(crate::postgres::connect(&self.url).await.map_err(storage)?);
        *c = Some(client.clone());
        Ok(client)
    }
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App {
    db: Db,
    /// token -> tenant
    tokens: Arc<Vec<(String, String)>>,
    gateways: Gateways,
    kafka: Option<Kafka>,
    sink: Option<Sink>,
    alerts: Option<Alerts>,
}

impl App {
    /// Rule changes made through the API reach this alerting service at once.
    pub fn with_alerts(mut self, alerts: Option<Alerts>) -> Self {
        self.alerts = alerts;
        self
    }

    /// An API over the database at `url`, for the tenants and tokens of `[api.tokens]`.
    pub fn new(
        url: &str,
        tokens: &BTreeMap<String, String>,
        gateways: Gateways,
        kafka: Option<Kafka>,
        sink: Option<Sink>,
    ) -> Self {
        Self {
            db: Db {
                url: Arc::from(url),
                client: Arc::default(),
            },
            tokens: Arc::new(
                tokens
                    .iter()
                    .map(|(tenant, token)| (token.clone(), tenant.clone()))
                    .collect(),
            ),
            gateways,
            kafka,
            sink,
            alerts: None,
        }
    }

    /// The router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/v1/devices/{id}/metrics", get(device_metrics))
            .route("/v1/devices/{id}/metrics/latest", get(latest))
            .route("/v1/tenants/{id}/metrics/aggregate", get(aggregate))
            .route("/v1/pipeline/lag", get(lag))
            .route("/v1/alert-rules", get(list_rules).post(create_rule))
            .route(
                "/v1/alert-rules/{id}",
                get(get_rule).put(update_rule).delete(delete_rule),
            )
            .route("/v1/alerts", get(list_alerts))
            .fallback(|| async {
                ApiError(
                    StatusCode::NOT_FOUND,
                    "no such endpoint; see deploy/openapi.yaml".into(),
                )
            })
            .with_state(self)
    }

    /// The tenant whose token the request carries.
    fn tenant(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let unauthorized = |m: &str| ApiError(StatusCode::UNAUTHORIZED, m.to_owned());
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?
            .to_str()
            .map_err(|_| unauthorized("unreadable Authorization header"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthorized("Authorization must be: Bearer <token>"))?
            .trim();
        // Compare against every token without stopping early.
        let mut found = None;
        for (t, tenant) in self.tokens.iter() {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(tenant.clone());
            }
        }
        found.ok_or_else(|| unauthorized("unknown token"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let check = async {
        let c = app.db.get().await?;
        c.simple_query("SELECT 1").await.map_err(storage)?;
        Ok::<_, ApiError>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => Ok(Json(json!({"status": "ready"}))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer within 2 s".into(),
        )),
    }
}

/// A time parameter: RFC 3339, or integer milliseconds since the epoch.
fn parse_time(param: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return ms
            .checked_mul(1000)
            .ok_or_else(|| bad(param, format!("{v} is out of range")));
    }
    let t = OffsetDateTime::parse(v, &Rfc3339).map_err(|_| {
        bad(
            param,
            format!(
                "{v:?} is not a time; give RFC 3339 (2026-11-21T08:00:00Z) or epoch milliseconds"
            ),
        )
    })?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).map_err(|_| bad(param, "out of range"))
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

use crate::postgres::system_time as to_system;

/// `limit`: a number from 1 to `max`, `default` when absent.
fn limit(q: &HashMap<String, String>, default: i64, max: i64) -> Result<i64, ApiError> {
    match q.get("limit") {
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| bad("limit", format!("{v:?} is not a number from 1 to {max}"))),
        None => Ok(default),
    }
}

fn from_system(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// The time range of a request: `from` and `to`, defaulting to the last hour.
fn range(q: &HashMap<String, String>) -> Result<(i64, i64), ApiError> {
    let to = match q.get("to") {
        Some(v) => parse_time("to", v)?,
        None => now_us(),
    };
    let from = match q.get("from") {
        Some(v) => parse_time("from", v)?,
        None => to - 3_600_000_000,
    };
    if from >= to {
        return Err(bad("from", "must be before to"));
    }
    Ok((from, to))
}

/// Which table answers a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    Raw,
    Hour,
    Day,
}

impl Resolution {
    fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Hour => "1h",
            Self::Day => "1d",
        }
    }
    fn table(self) -> &'static str {
        match self {
            Self::Raw => "raw_metrics",
            Self::Hour => "downsampled_metrics_1h",
            Self::Day => "downsampled_metrics_1d",
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Self::Raw | Self::Hour => "hour",
            Self::Day => "day",
        }
    }
}

/// `resolution`: raw, 1h, 1d, or auto (raw up to 2 days, 1h up to 90 days, 1d beyond).
fn resolution(q: &HashMap<String, String>, from: i64, to: i64) -> Result<Resolution, ApiError> {
    match q.get("resolution").map(String::as_str).unwrap_or("auto") {
        "raw" => Ok(Resolution::Raw),
        "1h" => Ok(Resolution::Hour),
        "1d" => Ok(Resolution::Day),
        "auto" => Ok(if to - from <= 2 * DAY_US {
            Resolution::Raw
        } else if to - from <= 90 * DAY_US {
            Resolution::Hour
        } else {
            Resolution::Day
        }),
        other => Err(bad(
            "resolution",
            format!("{other:?} is not one of raw, 1h, 1d, auto"),
        )),
    }
}

fn known_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(
            k,
            format!("unknown; expected one of {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// Whether `device` belongs to `tenant` (it has readings of the tenant, or a devices row).
async fn device_known(c: &Client, tenant: &str, device: &str) -> Result<bool, ApiError> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE device_id = $1 AND tenant_id = $2)
                 OR EXISTS (SELECT 1 FROM raw_metrics WHERE device_id = $1 AND tenant_id = $2)
                 OR EXISTS (SELECT 1 FROM downsampled_metrics_1d WHERE device_id = $1 AND tenant_id = $2)",
            &[&device, &tenant],
        )
        .await
        .map_err(storage)?;
    Ok(row.get(0))
}

fn not_found(device: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("device {device:?} not found for this tenant"),
    )
}

async fn device_metrics(
    State(app): State<App>,
    headers: HeaderMap,
    Path(device): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    known_params(&q, &["metric", "from", "to", "resolution", "limit"])?;
    let (from, to) = range(&q)?;
    let res = resolution(&q, from, to)?;
    let limit = limit(&q, 10_000, MAX_LIMIT)?;
    let metric = q.get("metric").filter(|m| !m.is_empty());
    let c = app.db.get().await?;
    let (from_t, to_t) = (to_system(from), to_system(to));
    let rows = if res == Resolution::Raw {
        c.query(
            "SELECT metric_name, ts, value, NULL::float8, NULL::float8, NULL::bigint
             FROM raw_metrics
             WHERE tenant_id = $1 AND device_id = $2 AND ($3::text IS NULL OR metric_name = $3)
               AND ts >= $4 AND ts < $5
             ORDER BY metric_name, ts LIMIT $6",
            &[&tenant, &device, &metric, &from_t, &to_t, &(limit + 1)],
        )
        .await
    } else {
        c.query(
            &format!(
                "SELECT metric_name, bucket, avg_val, min_val, max_val, count
                 FROM {}
                 WHERE tenant_id = $1 AND device_id = $2 AND ($3::text IS NULL OR metric_name = $3)
                   AND bucket >= date_trunc('{}', $4::timestamptz) AND bucket < $5
                 ORDER BY metric_name, bucket LIMIT $6",
                res.table(),
                res.unit()
            ),
            &[&tenant, &device, &metric, &from_t, &to_t, &(limit + 1)],
        )
        .await
    }
    .map_err(storage)?;
    if rows.is_empty() && !device_known(&c, &tenant, &device).await? {
        return Err(not_found(&device));
    }
    let truncated = rows.len() as i64 > limit;
    let mut series: Vec<(String, Vec<Value>)> = Vec::new();
    for r in rows.iter().take(limit as usize) {
        let m: String = r.get(0);
        let ts = rfc3339(from_system(r.get(1)));
        let point = if res == Resolution::Raw {
            json!({"ts": ts, "value": json_number(r.get(2))})
        } else {
            json!({"ts": ts, "avg": json_number(r.get(2)), "min": json_number(r.get::<_, Option<f64>>(3).unwrap_or(f64::NAN)),
                   "max": json_number(r.get::<_, Option<f64>>(4).unwrap_or(f64::NAN)), "count": r.get::<_, Option<i64>>(5)})
        };
        match series.last_mut() {
            Some((name, points)) if *name == m => points.push(point),
            _ => series.push((m, vec![point])),
        }
    }
    Ok(Json(json!({
        "device_id": device,
        "resolution": res.name(),
        "from": rfc3339(from),
        "to": rfc3339(to),
        "truncated": truncated,
        "series": series.into_iter().map(|(metric, points)| json!({"metric": metric, "points": points})).collect::<Vec<_>>(),
    })))
}

async fn latest(
    State(app): State<App>,
    headers: HeaderMap,
    Path(device): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    let c = app.db.get().await?;
    let rows = c
        .query(
            "SELECT DISTINCT ON (metric_name) metric_name, ts, value FROM raw_metrics
             WHERE tenant_id = $1 AND device_id = $2
             ORDER BY metric_name, ts DESC",
            &[&tenant, &device],
        )
        .await
        .map_err(storage)?;
    if rows.is_empty() {
        return Err(not_found(&device));
    }
    let metrics: serde_json::Map<String, Value> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                json!({"ts": rfc3339(from_system(r.get(1))), "value": json_number(r.get(2))}),
            )
        })
        .collect();
    Ok(Json(json!({"device_id": device, "metrics": metrics})))
}

async fn aggregate(
    State(app): State<App>,
    headers: HeaderMap,
    Path(tenant_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    if tenant != tenant_id {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("this token is not allowed to read tenant {tenant_id:?}"),
        ));
    }
    known_params(&q, &["metric", "from", "to", "agg", "resolution"])?;
    let metric = q
        .get("metric")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("metric", "required, e.g. metric=temperature"))?;
    let agg = q.get("agg").map(String::as_str).unwrap_or("avg");
    let (from, to) = range(&q)?;
    let res = resolution(&q, from, to)?;
    let expr = match (agg, res) {
        ("avg", Resolution::Raw) => "avg(value)",
        ("min", Resolution::Raw) => "min(value)",
        ("max", Resolution::Raw) => "max(value)",
        ("count", Resolution::Raw) => "count(*)::float8",
        ("avg", _) => "sum(sum_val) / nullif(sum(count), 0)",
        ("min", _) => "min(min_val)",
        ("max", _) => "max(max_val)",
        ("count", _) => "coalesce(sum(count), 0)::float8",
        (other, _) => {
            return Err(bad(
                "agg",
                format!("{other:?} is not one of avg, min, max, count"),
            ));
        }
    };
    let time_col = if res == Resolution::Raw {
        "ts"
    } else {
        "bucket"
    };
    let start = if res == Resolution::Raw {
        "$3".to_owned()
    } else {
        format!("date_trunc('{}', $3::timestamptz)", res.unit())
    };
    let c = app.db.get().await?;
    let row = c
        .query_one(
            &format!(
                "SELECT {expr}, count(DISTINCT device_id) FROM {}
                 WHERE tenant_id = $1 AND metric_name = $2 AND {time_col} >= {start} AND {time_col} < $4",
                res.table()
            ),
            &[&tenant, metric, &to_system(from), &to_system(to)],
        )
        .await
        .map_err(storage)?;
    let value: Option<f64> = row.get(0);
    Ok(Json(json!({
        "tenant": tenant,
        "metric": metric,
        "agg": agg,
        "resolution": res.name(),
        "from": rfc3339(from),
        "to": rfc3339(to),
        "value": value.map(json_number),
        "devices": row.get::<_, i64>(1),
    })))
}

async fn lag(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    Ok(Json(json!({
        "tenant": tenant,
        "gateways": app.gateways.of_tenant(&tenant),
        "kafka": {
            "enabled": app.kafka.is_some(),
            "producer_queue": app.kafka.as_ref().map(Kafka::in_flight),
        },
        "postgres": {
            "pending_readings": app.sink.as_ref().map(Sink::pending),
        },
    })))
}

/// A rule body from JSON; a 400 names the field that is wrong.
fn rule_body(bytes: &[u8], tenant: &str) -> Result<RuleBody, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let body: RuleBody = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." {
            "body".to_owned()
        } else {
            path
        };
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("field {field}: {}", e.into_inner()),
        )
    })?;
    body.to_rule(0, tenant)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(body)
}

fn rule_json(id: i64, mut body: RuleBody) -> Value {
    body.id = Some(id);
    serde_json::to_value(body).unwrap_or(Value::Null)
}

fn rule_not_found(id: i64) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("alert rule {id} not found for this tenant"),
    )
}

fn window_seconds(b: &RuleBody) -> Option<i32> {
    use crate::alerting::rule::Window;
    match (b.window, b.seconds) {
        (Some(Window::Tumbling { seconds } | Window::Sliding { seconds, .. }), _) => {
            i32::try_from(seconds).ok()
        }
        (None, Some(s)) => i32::try_from(s).ok(),
        (None, None) => None,
    }
}

impl App {
    fn rules_changed(&self) {
        if let Some(a) = &self.alerts {
            a.rules_changed();
        }
    }
}

async fn create_rule(
    State(app): State<App>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tenant = app.tenant(&headers)?;
    let mut rule = rule_body(&body, &tenant)?;
    rule.id = None;
    let c = app.db.get().await?;
    let json = serde_json::to_string(&rule).unwrap_or_default();
    let row = c
        .query_one(
            "INSERT INTO alert_rules (tenant_id, name, metric_name, condition_expr, threshold,
                                      window_seconds, severity, description)
             VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8) RETURNING rule_id",
            &[
                &tenant,
                &rule.name,
                &rule.metric,
                &json,
                &rule.threshold,
                &window_seconds(&rule),
                &rule.severity,
                &rule.description,
            ],
        )
        .await
        .map_err(storage)?;
    app.rules_changed();
    Ok((StatusCode::CREATED, Json(rule_json(row.get(0), rule))))
}

async fn list_rules(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    let c = app.db.get().await?;
    let rows = c
        .query(
            "SELECT rule_id, condition_expr::text FROM alert_rules WHERE tenant_id = $1 ORDER BY rule_id",
            &[&tenant],
        )
        .await
        .map_err(storage)?;
    let rules: Vec<Value> = rows
        .iter()
        .filter_map(|r| {
            let body: RuleBody = serde_json::from_str(r.get::<_, &str>(1)).ok()?;
            Some(rule_json(r.get(0), body))
        })
        .collect();
    Ok(Json(json!({ "rules": rules })))
}

async fn get_rule(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    let c = app.db.get().await?;
    let row = c
        .query_opt(
            "SELECT condition_expr::text FROM alert_rules WHERE rule_id = $1 AND tenant_id = $2",
            &[&id, &tenant],
        )
        .await
        .map_err(storage)?
        .ok_or_else(|| rule_not_found(id))?;
    let body: RuleBody = serde_json::from_str(row.get::<_, &str>(0)).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored rule {id}: {e}"),
        )
    })?;
    Ok(Json(rule_json(id, body)))
}

async fn update_rule(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    let mut rule = rule_body(&body, &tenant)?;
    rule.id = None;
    let c = app.db.get().await?;
    let json = serde_json::to_string(&rule).unwrap_or_default();
    let n = c
        .execute(
            "UPDATE alert_rules SET name = $3, metric_name = $4, condition_expr = $5::text::jsonb,
                    threshold = $6, window_seconds = $7, severity = $8, description = $9, updated_at = now()
             WHERE rule_id = $1 AND tenant_id = $2",
            &[&id, &tenant, &rule.name, &rule.metric, &json, &rule.threshold, &window_seconds(&rule), &rule.severity, &rule.description],
        )
        .await
        .map_err(storage)?;
    if n == 0 {
        return Err(rule_not_found(id));
    }
    close_alerts_of(&c, id).await?;
    app.rules_changed();
    Ok(Json(rule_json(id, rule)))
}

async fn delete_rule(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let tenant = app.tenant(&headers)?;
    let c = app.db.get().await?;
    let n = c
        .execute(
            "DELETE FROM alert_rules WHERE rule_id = $1 AND tenant_id = $2",
            &[&id, &tenant],
        )
        .await
        .map_err(storage)?;
    if n == 0 {
        return Err(rule_not_found(id));
    }
    close_alerts_of(&c, id).await?;
    app.rules_changed();
    Ok(StatusCode::NO_CONTENT)
}

/// A changed or deleted rule starts over: its open alerts are closed (resolved, with no
/// resolving window), so none stays open forever and a new firing is a new alert.
async fn close_alerts_of(c: &Client, rule_id: i64) -> Result<(), ApiError> {
    c.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at = now() WHERE rule_id = $1 AND state = 'firing'",
        &[&rule_id],
    )
    .await
    .map_err(storage)?;
    Ok(())
}

async fn list_alerts(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = app.tenant(&headers)?;
    known_params(&q, &["state", "from", "to", "limit", "backfill"])?;
    let state = match q.get("state").map(String::as_str) {
        None | Some("") => None,
        Some(s @ ("firing" | "resolved")) => Some(s.to_owned()),
        Some(other) => {
            return Err(bad(
                "state",
                format!("{other:?} is not one of firing, resolved"),
            ));
        }
    };
    let backfill = match q.get("backfill").map(String::as_str) {
        None | Some("") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => return Err(bad("backfill", format!("{other:?} is not true or false"))),
    };
    let to = match q.get("to") {
        Some(v) => parse_time("to", v)?,
        None => now_us() + DAY_US,
    };
    let from = match q.get("from") {
        Some(v) => parse_time("from", v)?,
        None => i64::MIN / 2,
    };
    let limit = limit(&q, 1_000, 10_000)?;
    let c = app.db.get().await?;
    let rows = c
        .query(
            "SELECT alert_id, rule_id, device_id, state, severity, value, threshold, window_start,
                    window_end, backfill, created_at, resolved_value, resolved_window_end, resolved_at
             FROM alerts
             WHERE tenant_id = $1 AND ($2::text IS NULL OR state = $2) AND ($3::bool IS NULL OR backfill = $3)
               AND window_end >= $4 AND window_end < $5
             ORDER BY window_end DESC, alert_id DESC LIMIT $6",
            &[&tenant, &state, &backfill, &to_system(from.max(-(1i64 << 50))), &to_system(to), &limit],
        )
        .await
        .map_err(storage)?;
    let t = |v: Option<SystemTime>| v.map(|t| rfc3339(from_system(t)));
    let alerts: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "alert_id": r.get::<_, i64>(0),
                "rule_id": r.get::<_, i64>(1),
                "device_id": r.get::<_, String>(2),
                "state": r.get::<_, String>(3),
                "severity": r.get::<_, String>(4),
                "value": r.get::<_, Option<f64>>(5).map(json_number),
                "threshold": r.get::<_, Option<f64>>(6),
                "window_start": t(r.get(7)),
                "window_end": t(r.get(8)),
                "backfill": r.get::<_, bool>(9),
                "created_at": t(r.get(10)),
                "resolved_value": r.get::<_, Option<f64>>(11).map(json_number),
                "resolved_window_end": t(r.get(12)),
                "resolved_at": t(r.get(13)),
            })
        })
        .collect();
    Ok(Json(json!({ "alerts": alerts })))
}
