//! `/v1/tenants/{id}/metrics/aggregate`: one figure over all of a tenant's devices. The
//! token must be that tenant's (403 otherwise), and long ranges read the rollups.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::params::{AggregateParams, QueryMap, now_us};
use super::tenant::Tenant;
use super::{ApiError, App};
use crate::kafka::{json_number, rfc3339};
use crate::postgres::queries::{self, AggregateQuery};

pub(super) async fn get(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(tenant_id): Path<String>,
    Query(q): Query<QueryMap>,
) -> Result<Json<Value>, ApiError> {
    if tenant != tenant_id {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("this token is not allowed to read tenant {tenant_id:?}"),
        ));
    }
    let p = AggregateParams::parse(&q, now_us(), app.max_raw_us())?;
    let c = app.db.get().await?;
    let answer = queries::aggregate(
        &c,
        &AggregateQuery {
            tenant: &tenant,
            metric: &p.metric,
            agg: p.agg,
            rollup: p.resolution.rollup(),
            from_us: p.range.from_us,
            to_us: p.range.to_us,
        },
    )
    .await
    .map_err(|e| app.storage(e))?;
    Ok(Json(json!({
        "tenant": tenant,
        "metric": p.metric,
        "agg": p.agg.name(),
        "resolution": p.resolution.name(),
        "from": rfc3339(p.range.from_us),
        "to": rfc3339(p.range.to_us),
        "value": answer.value.map(json_number),
        "devices": answer.devices,
    })))
}
