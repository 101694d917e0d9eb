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
//! # Layout
//! - `mod.rs`: [`App`] (what the handlers share), the router, [`ApiError`].
//! - `tenant.rs`: the `Tenant` extractor: the bearer token, checked in constant time.
//! - `params.rs`: each endpoint's query parameters as a typed struct, and their rules.
//! - `health.rs`: `/healthz`, `/readyz`.
//! - `devices.rs`: `/v1/devices/{id}/metrics` and `/v1/devices/{id}/metrics/latest`.
//! - `aggregate.rs`: `/v1/tenants/{id}/metrics/aggregate`.
//! - `pipeline.rs`: `/v1/pipeline/lag`.
//! - `rules.rs`: `/v1/alert-rules` and `/v1/alert-rules/{id}`.
//! - `alerts.rs`: `/v1/alerts`.
//!
//! The handlers hold no SQL: what they run is in [`crate::postgres::queries`].

mod aggregate;
mod alerts;
mod devices;
mod health;
mod params;
mod pipeline;
mod rules;
mod tenant;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_postgres::Client;

use crate::alerting::service::Alerts;
use crate::kafka::Kafka;
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

/// An error answer.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// A failed query: logged, and answered with a 503 that says to retry.
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

    /// The router: [`ROUTES`], and a JSON 404 for anything else.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(health::healthz))
            .route("/readyz", get(health::readyz))
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
            .fallback(|| async {
                ApiError(
                    StatusCode::NOT_FOUND,
                    "no such endpoint; see deploy/openapi.yaml".into(),
                )
            })
            .with_state(self)
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
