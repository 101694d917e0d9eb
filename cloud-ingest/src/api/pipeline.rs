//! `/v1/pipeline/lag`: how far behind the pipeline is for the token's tenant: its gateways'
//! uplinks as this replica sees them, the Kafka producer's queue, the readings waiting for
//! PostgreSQL, and the conflicting readings kept per gateway (from the database, so across
//! restarts and replicas), and in the scale-out mode each consumer group's lag per topic and
//! partition: the partition's end offset minus the offset the group stored in
//! `pipeline_offsets` (with the rows it wrote).

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
    let groups = consumer_groups(&app, &c).await;
    Ok(Json(json!({
        "tenant": tenant,
        "consumer_groups": groups,
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

/// `{group: {topic: {partition: {end, committed, lag}}}}` for every group with offsets in
/// `pipeline_offsets`; a partition the group has not stored yet has `committed` null and
/// its whole content as lag. `{}` without Kafka or offsets; `{"error": ...}` when Kafka or
/// the table cannot be read (the rest of the answer stands).
async fn consumer_groups(app: &App, c: &tokio_postgres::Client) -> Value {
    let Some(k) = &app.kafka else {
        return json!({});
    };
    let stored = match queries::pipeline_offsets(c).await {
        Ok(s) => s,
        Err(e) => return json!({"error": format!("pipeline_offsets: {e}")}),
    };
    let mut by_topic: std::collections::BTreeMap<&str, Vec<(i32, i64, i64)>> = Default::default();
    let mut out = serde_json::Map::new();
    for (group, topic, _, _) in &stored {
        if !by_topic.contains_key(topic.as_str()) {
            match k.watermarks(topic).await {
                Ok(marks) => {
                    by_topic.insert(topic, marks);
                }
                Err(e) => return json!({"error": e.to_string()}),
            }
        }
        let topics = out
            .entry(group.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object");
        if topics.contains_key(topic) {
            continue;
        }
        let partitions: serde_json::Map<String, Value> = by_topic[topic.as_str()]
            .iter()
            .map(|(p, low, high)| {
                let committed = stored
                    .iter()
                    .find(|(g, t, sp, _)| g == group && t == topic && sp == p)
                    .map(|s| s.3);
                let lag = (high - committed.unwrap_or(*low)).max(0);
                (
                    p.to_string(),
                    json!({"end": high, "committed": committed, "lag": lag}),
                )
            })
            .collect();
        topics.insert(topic.clone(), Value::Object(partitions));
    }
    Value::Object(out)
}
