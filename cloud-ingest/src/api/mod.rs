//! The query API (axum) on `[api] bind`, documented in `deploy/openapi.yaml`.
//!
//! Every `/v1` request carries `Authorization: Bearer <token>`; `[api.tokens]` maps each
//! tenant to its token, and a tenant sees only its own devices: another tenant's device is
//! answered exactly like a device that does not exist (404), so ids do not leak. Errors are
//! JSON `{"error": "..."}`; a bad parameter gets a 400 that names it and says what is expected.
//!
//! Long ranges are routed to the rollups: `resolution=auto` reads raw up to 2 days,
//! `downsampled_metrics_1h` up to 90 days and `downsampled_metrics_1d` beyond.
//!
//! # Sharing the database between tenants ([`Limits`], `[api]`)
//! - Queries run on a pool of `pool_size` connections, each with a `statement_timeout` of
//!   `statement_timeout_ms`; a query cut off by it is a 503 that says to narrow the range or
//!   read a rollup. A request that finds no connection free within `pool_timeout_ms` (or
//!   the database down) is a 503 at once, never a hang.
//! - A tenant runs at most `max_concurrent_per_tenant` requests at once (fewer than
//!   `pool_size`, which the config checks, so one tenant alone cannot take every connection;
//!   tenants flooding together can, up to `pool_timeout_ms`: size the pool for the tenants
//!   that may be busy at once); one
//!   more waits up to `tenant_queue_ms` for a turn, then gets a 429 naming the limit.
//! - `resolution=raw` reads at most `max_raw_range_days`; a longer raw range is a 400 before
//!   any query (`auto` never asks for one). Raw series are also cut at `limit` points.
//! - `/healthz` and `/readyz` take no tenant's turn, and `/readyz` has a connection of its
//!   own, so a tenant's flood never delays them.
//!
//! # Layout
//! - `mod.rs`: [`App`] (what the handlers share), the router, [`ApiError`].
//! - `tenant.rs`: the `Tenant` extractor: the bearer token, checked in constant time.
//! - `params.rs`: each endpoint's query parameters as a typed struct, and their rules.
//! - `health.rs`: `/healthz`, `/readyz`.
//! - `devices.rs`: `/v1/devices`, `/v1/devices/{id}/metrics` and
//!   `/v1/devices/{id}/metrics/latest`.
//! - `console.rs`: the fleet console's static files at `/console` (no data: the page asks
//!   the API above with the token it is given).
//! - `aggregate.rs`: `/v1/tenants/{id}/metrics/aggregate`.
//! - `pipeline.rs`: `/v1/pipeline/lag`.
//! - `rules.rs`: `/v1/alert-rules` and `/v1/alert-rules/{id}`.
//! - `alerts.rs`: `/v1/alerts`.
//! - `schemas.rs`: `/v1/payload-schemas` and `/v1/payload-schemas/{id}`.
//!
//! The handlers hold no SQL: what they run is in [`crate::postgres::queries`].

mod aggregate;
mod alerts;
mod console;
mod devices;
mod health;
mod params;
mod pipeline;
mod rules;
mod schemas;
mod tenant;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    TimeoutType,
};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_postgres::error::SqlState;

use crate::alerting::service::Alerts;
use crate::kafka::Kafka;
use crate::sink::Sink;
use crate::status::Gateways;

/// The routes the API serves, as written in `deploy/openapi.yaml`.
pub const ROUTES: [&str; 12] = [
    "/healthz",
    "/readyz",
    "/v1/devices",
    "/v1/devices/{id}/metrics",
    "/v1/devices/{id}/metrics/latest",
    "/v1/tenants/{id}/metrics/aggregate",
    "/v1/pipeline/lag",
    "/v1/alert-rules",
    "/v1/alert-rules/{id}",
    "/v1/alerts",
    "/v1/payload-schemas",
    "/v1/payload-schemas/{id}",
];

/// The `application_name` of the API's connections, unless `postgres.url` gives one.
pub const APPLICATION_NAME: &str = "plantlink-api";

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// An error answer.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let busy = self.0 == StatusCode::TOO_MANY_REQUESTS;
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if busy {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A JSON request body; a 400 names the field that is wrong (`field window.seconds: ...`,
/// `field body: ...` when the whole body is).
fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
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
    })
}

fn unavailable(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, why.into())
}

/// What the API allows (`[api]`): how it shares the database between tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pooled connections for the tenants' queries.
    pub pool_size: usize,
    /// How long a request waits for a pooled connection, or to open one, before a 503.
    pub pool_timeout_ms: u64,
    /// The `statement_timeout` of every query connection.
    pub statement_timeout_ms: u64,
    /// Requests of one tenant served at once.
    pub max_concurrent_per_tenant: usize,
    /// How long a request over that waits for its turn before a 429.
    pub tenant_queue_ms: u64,
    /// The longest range `resolution=raw` reads, in days.
    pub max_raw_range_days: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            pool_size: 8,
            pool_timeout_ms: 2_000,
            statement_timeout_ms: 10_000,
            max_concurrent_per_tenant: 4,
            tenant_queue_ms: 1_000,
            max_raw_range_days: 7,
        }
    }
}

/// The API's PostgreSQL connections: a pool for the tenants' queries, each connection with
/// the statement timeout, and a pool of one for `/readyz`, so a probe never waits behind a
/// tenant's query. Both open connections on demand and replace lost ones.
#[derive(Clone)]
struct Db {
    queries: Pool,
    ready: Pool,
    limits: Limits,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("queries", &self.queries.status())
            .field("ready", &self.ready.status())
            .field("limits", &self.limits)
            .finish()
    }
}

/// A pool of `size` connections to `config`, each set up with `setup` when opened, that
/// waits at most `timeout` for a free connection and as long again to open one.
fn pool(config: &tokio_postgres::Config, size: usize, timeout: Duration, setup: String) -> Pool {
    let manager = Manager::from_config(
        config.clone(),
        tokio_postgres::NoTls,
        ManagerConfig {
            // One round trip before each use: a connection the server ended (a restart,
            // `pg_terminate_backend`) is replaced before a request sees it fail.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    let setup: Arc<str> = Arc::from(setup);
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .post_create(Hook::async_fn(move |client, _| {
            let setup = setup.clone();
            Box::pin(async move {
                client
                    .batch_execute(&setup)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .expect("a pool with a runtime and a size builds")
}

impl Db {
    fn new(url: &str, limits: Limits) -> Self {
        // The config check parsed the URL already; one that does not parse fails to connect.
        let mut config = url.parse::<tokio_postgres::Config>().unwrap_or_else(|e| {
            tracing::error!(error = %e, "postgres.url does not parse; the API cannot connect");
            tokio_postgres::Config::new()
        });
        // Names the API's sessions in pg_stat_activity, unless the URL names them.
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        let timeout = Duration::from_millis(limits.pool_timeout_ms);
        let setup = |ms: u128| format!("SET TIME ZONE 'UTC'; SET statement_timeout = {ms}");
        Self {
            queries: pool(
                &config,
                limits.pool_size,
                timeout,
                setup(u128::from(limits.statement_timeout_ms)),
            ),
            ready: pool(&config, 1, READY_TIMEOUT, setup(READY_TIMEOUT.as_millis())),
            limits,
        }
    }

    /// A connection for a tenant's query.
    async fn get(&self) -> Result<Object, ApiError> {
        self.queries.get().await.map_err(|e| self.pool_error(e))
    }

    /// The connection of `/readyz`.
    async fn ready(&self) -> Result<Object, ApiError> {
        self.ready.get().await.map_err(|e| self.pool_error(e))
    }

    fn pool_error(&self, e: PoolError) -> ApiError {
        let ms = self.limits.pool_timeout_ms;
        match e {
            PoolError::Timeout(TimeoutType::Wait) => unavailable(format!(
                "no database connection came free within {ms} ms (all {} of [api] pool_size are \
                 busy); retry",
                self.limits.pool_size
            )),
            PoolError::Timeout(_) => unavailable(format!(
                "the database did not accept a connection within {ms} ms ([api] pool_timeout_ms); \
                 retry"
            )),
            PoolError::Backend(e) | PoolError::PostCreateHook(HookError::Backend(e)) => {
                self.storage(e)
            }
            other => {
                tracing::warn!(error = %other, "API connection pool failed");
                unavailable("the database is unavailable; retry")
            }
        }
    }

    /// A failed query: logged, and answered with a 503 that says what to do: narrow the
    /// query when it ran into the statement timeout, retry otherwise.
    fn storage(&self, e: tokio_postgres::Error) -> ApiError {
        if e.code() == Some(&SqlState::QUERY_CANCELED) {
            tracing::info!(error = %e, "API query cancelled by the statement timeout");
            return unavailable(format!(
                "the query ran longer than the statement timeout of {} ms \
                 ([api] statement_timeout_ms) and was cancelled; narrow the range (from, to) or \
                 read a rollup (resolution=1h or 1d, or auto)",
                self.limits.statement_timeout_ms
            ));
        }
        tracing::warn!(error = %e, "API query failed");
        unavailable("the database is unavailable; retry")
    }
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App {
    db: Db,
    /// token -> tenant
    tokens: Arc<Vec<(String, String)>>,
    /// Each tenant's turns: `max_concurrent_per_tenant` permits.
    slots: Arc<BTreeMap<String, Arc<Semaphore>>>,
    gateways: Gateways,
    kafka: Option<Kafka>,
    sink: Option<Sink>,
    alerts: Option<Alerts>,
    url: Arc<str>,
    /// A receiver of the scale-out mode: ready when Kafka answers (it writes no database).
    ready_on_kafka: bool,
}

impl App {
    /// `/readyz` asks Kafka instead of the database: for a scale-out receiver, which keeps
    /// admitting gateways while PostgreSQL is away.
    pub fn ready_on_kafka(mut self, yes: bool) -> Self {
        self.ready_on_kafka = yes;
        self
    }

    /// Rule changes made through the API reach this alerting service at once.
    pub fn with_alerts(mut self, alerts: Option<Alerts>) -> Self {
        self.alerts = alerts;
        self
    }

    /// The limits of `[api]` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.db = Db::new(&self.url, limits);
        self.slots = Arc::new(slots(&self.tokens, limits));
        self
    }

    /// An API over the database at `url`, for the tenants and tokens of `[api.tokens]`,
    /// with the default [`Limits`]. Connections are opened when the first request needs one.
    pub fn new(
        url: &str,
        tokens: &BTreeMap<String, String>,
        gateways: Gateways,
        kafka: Option<Kafka>,
        sink: Option<Sink>,
    ) -> Self {
        let limits = Limits::default();
        let tokens: Vec<(String, String)> = tokens
            .iter()
            .map(|(tenant, token)| (token.clone(), tenant.clone()))
            .collect();
        Self {
            db: Db::new(url, limits),
            slots: Arc::new(slots(&tokens, limits)),
            tokens: Arc::new(tokens),
            gateways,
            kafka,
            sink,
            alerts: None,
            url: Arc::from(url),
            ready_on_kafka: false,
        }
    }

    /// A failed query, answered as [`Db::storage`] says.
    fn storage(&self, e: tokio_postgres::Error) -> ApiError {
        self.db.storage(e)
    }

    /// The longest range `resolution=raw` reads, in µs.
    fn max_raw_us(&self) -> i64 {
        i64::from(self.db.limits.max_raw_range_days) * params::DAY_US
    }

    /// The router: [`ROUTES`], and a JSON 404 for anything else. Every `/v1` request takes
    /// one of its tenant's turns ([`tenant_turn`]); `/healthz` and `/readyz` take none.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/devices", get(devices::list))
            .route("/v1/devices/{id}/metrics", get(devices::metrics))
            .route("/v1/devices/{id}/metrics/latest", get(devices::latest))
            .route("/v1/tenants/{id}/metrics/aggregate", get(aggregate::get))
            .route("/v1/pipeline/lag", get(pipeline::lag))
            .route("/v1/alert-rules", get(rules::list).post(rules::create))
            .route(
                "/v1/alert-rules/{id}",
                get(rules::get).put(rules::update).delete(rules::delete),
            )
            .route("/v1/alerts", get(alerts::list))
            .route(
                "/v1/payload-schemas",
                get(schemas::list).post(schemas::create),
            )
            .route(
                "/v1/payload-schemas/{id}",
                get(schemas::get)
                    .put(schemas::update)
                    .delete(schemas::delete),
            )
            .route_layer(middleware::from_fn_with_state(self.clone(), tenant_turn))
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz))
            .merge(console::router())
            .fallback(|| async {
                ApiError(
                    StatusCode::NOT_FOUND,
                    "no such endpoint; see deploy/openapi.yaml".into(),
                )
            })
            .with_state(self)
    }
}

/// One semaphore of `max_concurrent_per_tenant` permits per tenant of `tokens`.
fn slots(tokens: &[(String, String)], limits: Limits) -> BTreeMap<String, Arc<Semaphore>> {
    tokens
        .iter()
        .map(|(_, tenant)| {
            let permits = limits.max_concurrent_per_tenant.max(1);
            (tenant.clone(), Arc::new(Semaphore::new(permits)))
        })
        .collect()
}

/// Serves a `/v1` request in one of its tenant's `max_concurrent_per_tenant` turns: it waits
/// up to `tenant_queue_ms` for one, and is answered 429 after that, so a tenant's flood
/// queues behind its own requests only. A request without a known token takes no turn (its
/// handler answers 401 before any query). As a last resort, a request still running after
/// its pool wait and two statement timeouts (and 5 s more) is answered 503, so even a
/// connection that hangs without closing cannot hold a client forever.
async fn tenant_turn(State(app): State<App>, req: Request, next: Next) -> Response {
    let Some((tenant, slots)) = tenant::authenticate(&app.tokens, req.headers())
        .ok()
        .and_then(|t| app.slots.get(&t).cloned().map(|s| (t, s)))
    else {
        return next.run(req).await;
    };
    let l = app.db.limits;
    let queue = Duration::from_millis(l.tenant_queue_ms);
    let _turn = match tokio::time::timeout(queue, slots.acquire_owned()).await {
        Ok(Ok(turn)) => turn,
        _ => {
            return ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "tenant {tenant:?} already has {} requests running ([api] \
                     max_concurrent_per_tenant) and this one waited {} ms ([api] \
                     tenant_queue_ms) for its turn; retry later, or send fewer requests at once",
                    l.max_concurrent_per_tenant, l.tenant_queue_ms
                ),
            )
            .into_response();
        }
    };
    let deadline = Duration::from_millis(
        l.pool_timeout_ms
            .saturating_add(l.statement_timeout_ms.saturating_mul(2))
            .saturating_add(5_000),
    );
    match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::warn!(%tenant, "API request ran past its deadline");
            unavailable(format!(
                "the database did not answer within {} ms; retry",
                deadline.as_millis()
            ))
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// `GET path` without a token: the status line and the body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let status = raw[9..12].parse().unwrap();
        (status, raw[raw.find("\r\n\r\n").unwrap() + 4..].to_owned())
    }

    /// Every route of `ROUTES` (which a test holds to `deploy/openapi.yaml`) is served:
    /// none falls through to the "no such endpoint" answer.
    #[tokio::test]
    async fn the_router_serves_every_documented_route() {
        // Nothing listens on port 1: /readyz fails fast, and nothing else needs a database
        // before the token is checked.
        let tokens = BTreeMap::from([("acme".to_owned(), "t".to_owned())]);
        let app = App::new(
            "host=127.0.0.1 port=1 user=x connect_timeout=2",
            &tokens,
            Gateways::default(),
            None,
            None,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app.router()).await });

        let (st, body) = get(addr, "/v1/no-such-thing").await;
        assert_eq!(st, 404);
        assert!(body.contains("no such endpoint"), "{body}");
        for route in ROUTES {
            let (st, body) = get(addr, &route.replace("{id}", "1")).await;
            assert!(!body.contains("no such endpoint"), "{route}: {st} {body}");
            let want = match route {
                "/healthz" => 200,
                "/readyz" => 503,
                _ => 401,
            };
            assert_eq!(st, want, "{route}: {body}");
        }
        server.abort();
    }
}
