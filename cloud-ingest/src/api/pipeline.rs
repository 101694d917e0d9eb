//! `/v1/pipeline/lag`: how far behind the pipeline is for the token's tenant: its gateways'
//! uplinks as this replica sees them, the Kafka producer's queue and the readings waiting for
//! PostgreSQL.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::App;
use super::tenant::Tenant;
use crate::kafka::Kafka;
use crate::sink::Sink;

pub(super) async fn lag(State(app): State<App>, Tenant(tenant): Tenant) -> Json<Value> {
    Json(json!({
        "tenant": tenant,
        "gateways": app.gateways.of_tenant(&tenant),
        "kafka": {
            "enabled": app.kafka.is_some(),
            "producer_queue": app.kafka.as_ref().map(Kafka::in_flight),
        },
        "postgres": {
            "pending_readings": app.sink.as_ref().map(Sink::pending),
        },
    }))
}
