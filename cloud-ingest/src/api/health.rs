//! `/healthz` (the process answers) and `/readyz` (the database answers too, and any
//! TimescaleDB policy job whose last run failed is named; for a scale-out receiver, which
//! writes no database, Kafka answers); neither needs a token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, App, READY_TIMEOUT};
use crate::postgres::queries;

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(super) async fn readyz(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    if app.ready_on_kafka
        && let Some(k) = &app.kafka
    {
        let topic = k.config().backbone_topic.clone();
        return match tokio::time::timeout(READY_TIMEOUT, k.watermarks(&topic)).await {
            Ok(Ok(_)) => Ok(Json(json!({"status": "ready", "role": "receiver"}))),
            Ok(Err(e)) => Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("Kafka does not answer for {topic}: {e}"),
            )),
            Err(_) => Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("Kafka did not answer for {topic} within 2 s"),
            )),
        };
    }
    // Its own connection, so it never waits behind a tenant's query.
    let check = async {
        let c = app.db.ready().await?;
        queries::ping(&c).await.map_err(|e| app.storage(e))
    };
    match tokio::time::timeout(READY_TIMEOUT, check).await {
        Ok(Ok(())) => {
            // Ready as long as the database answers; failing TimescaleDB policy jobs are
            // named here (and in the pipeline status) without taking the replica out.
            let failing: Vec<Value> = app
                .sink
                .as_ref()
                .map(|s| s.timescale_jobs())
                .unwrap_or_default()
                .into_iter()
                .filter(|j| j.failing())
                .map(|j| json!({"job": j.job, "failures": j.total_failures, "error": j.last_error}))
                .collect();
            if failing.is_empty() {
                Ok(Json(json!({"status": "ready"})))
            } else {
                Ok(Json(
                    json!({"status": "ready", "failing_timescaledb_jobs": failing}),
                ))
            }
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer within 2 s".into(),
        )),
    }
}
