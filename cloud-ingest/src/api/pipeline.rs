//! `/v1/pipeline/lag`: how far behind the pipeline is for the token's tenant: its gateways'
//! uplinks as this replica sees them, the Kafka producer's queue, the readings waiting for
//! PostgreSQL, and the conflicting readings kept per gateway (from the database, so across
//! restarts and replicas).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::tenant::Tenant;
use super::{ApiError, App};
use crate::kafka::{Kafka, rfc3339};
use crate::postgres::queries;
use crate::sink::Sink;

pub(super) async fn lag(
    State(app): State<App>,
    Tenant(tenant): Tenant,
) -> Result<Json<Value>, ApiError> {
    let c = app.db.get().await?;
    let conflicts: serde_json::Map<String, Value> = queries::conflicts_by_gateway(&c, &tenant)
        .await
        .map_err(|e| app.storage(e))?
        .into_iter()
        .map(|(gw, n, at)| (gw, json!({"readings": n, "last_at": rfc3339(at)})))
        .collect();
    Ok(Json(json!({
        "tenant": tenant,
        "gateways": app.gateways.of_tenant(&tenant),
        "conflicts": conflicts,
        "kafka": {
            "enabled": app.kafka.is_some(),
            "producer_queue": app.kafka.as_ref().map(Kafka::in_flight),
        },
        "postgres": {
            "pending_readings": app.sink.as_ref().map(Sink::pending),
            "flavor": app.sink.as_ref().map(|s| format!("{:?}", s.flavor()).to_lowercase()),
            "timescaledb_jobs": app.sink.as_ref().map(Sink::timescale_jobs),
        },
    })))
}
