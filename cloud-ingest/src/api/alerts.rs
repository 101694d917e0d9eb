//! `/v1/alerts`: the token's tenant's alerts, newest window first, filtered by state,
//! backfill and window end.

use axum::Json;
use axum::extract::{Query, State};
use serde_json::{Value, json};

use super::params::{AlertParams, QueryMap, now_us};
use super::tenant::Tenant;
use super::{ApiError, App};
use crate::kafka::{json_number, rfc3339};
use crate::postgres::queries::{self, AlertQuery};

pub(super) async fn list(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Query(q): Query<QueryMap>,
) -> Result<Json<Value>, ApiError> {
    let p = AlertParams::parse(&q, now_us())?;
    let c = app.db.get().await?;
    let query = AlertQuery {
        tenant: &tenant,
        state: p.state,
        backfill: p.backfill,
        from_us: p.from_us,
        to_us: p.to_us,
        limit: p.limit,
    };
    let rows = queries::alerts(&c, &query)
        .await
        .map_err(|e| app.storage(e))?;
    let t = |us: Option<i64>| us.map(rfc3339);
    let alerts: Vec<Value> = rows
        .into_iter()
        .map(|a| {
            json!({
                "alert_id": a.alert_id,
                "rule_id": a.rule_id,
                "device_id": a.device_id,
                "state": a.state,
                "severity": a.severity,
                "value": a.value.map(json_number),
                "threshold": a.threshold,
                "window_start": t(a.window_start_us),
                "window_end": t(a.window_end_us),
                "backfill": a.backfill,
                "created_at": t(a.created_at_us),
                "resolved_value": a.resolved_value.map(json_number),
                "resolved_window_end": t(a.resolved_window_end_us),
                "resolved_at": t(a.resolved_at_us),
            })
        })
        .collect();
    Ok(Json(json!({ "alerts": alerts })))
}
