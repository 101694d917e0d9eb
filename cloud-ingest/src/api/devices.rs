//! The tenant's devices (`/v1/devices`), a device's series and its latest values:
//! `/v1/devices/{id}/metrics` and `/v1/devices/{id}/metrics/latest`.
//!
//! Both ask only for the token's tenant's rows. An empty series is a 404 unless the device is
//! the tenant's, so another tenant's device answers exactly like one that does not exist.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::params::{DeviceListParams, QueryMap, SeriesParams, now_us};
use super::tenant::Tenant;
use super::{ApiError, App};
use crate::kafka::{json_number, rfc3339};
use crate::postgres::queries::{self, SeriesQuery};

fn not_found(device: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("device {device:?} not found for this tenant"),
    )
}

pub(super) async fn list(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Query(q): Query<QueryMap>,
) -> Result<Json<Value>, ApiError> {
    let p = DeviceListParams::parse(&q)?;
    let c = app.db.get().await?;
    let rows = queries::devices(&c, &tenant, p.limit + 1)
        .await
        .map_err(|e| app.storage(e))?;
    let truncated = rows.len() as i64 > p.limit;
    let devices: Vec<Value> = rows
        .into_iter()
        .take(p.limit as usize)
        .map(|d| {
            json!({
                "device_id": d.device_id,
                "device_type": d.device_type,
                "firmware_version": d.firmware_version,
                "last_seen_at": d.last_seen_us.map(rfc3339),
                "readings_recent": d.readings_recent,
            })
        })
        .collect();
    Ok(Json(json!({"devices": devices, "truncated": truncated})))
}

pub(super) async fn metrics(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(device): Path<String>,
    Query(q): Query<QueryMap>,
) -> Result<Json<Value>, ApiError> {
    let p = SeriesParams::parse(&q, now_us(), app.max_raw_us())?;
    let c = app.db.get().await?;
    let query = SeriesQuery {
        tenant: &tenant,
        device: &device,
        metric: p.metric.as_deref(),
        from_us: p.range.from_us,
        to_us: p.range.to_us,
        // One more than asked for says whether there were more.
        limit: p.limit + 1,
    };
    let points: Vec<(String, Value)> = match p.resolution.rollup() {
        None => queries::raw_series(&c, &query)
            .await
            .map_err(|e| app.storage(e))?
            .into_iter()
            .map(|r| {
                let point = json!({"ts": rfc3339(r.ts_us), "value": json_number(r.value)});
                (r.metric, point)
            })
            .collect(),
        Some(rollup) => queries::rollup_series(&c, rollup, &query)
            .await
            .map_err(|e| app.storage(e))?
            .into_iter()
            .map(|r| {
                let point = json!({
                    "ts": rfc3339(r.bucket_us),
                    "avg": json_number(r.avg),
                    "min": json_number(r.min.unwrap_or(f64::NAN)),
                    "max": json_number(r.max.unwrap_or(f64::NAN)),
                    "count": r.count,
                });
                (r.metric, point)
            })
            .collect(),
    };
    if points.is_empty()
        && !queries::device_known(&c, &tenant, &device)
            .await
            .map_err(|e| app.storage(e))?
    {
        return Err(not_found(&device));
    }
    let truncated = points.len() as i64 > p.limit;
    let mut series: Vec<(String, Vec<Value>)> = Vec::new();
    for (m, point) in points.into_iter().take(p.limit as usize) {
        match series.last_mut() {
            Some((name, points)) if *name == m => points.push(point),
            _ => series.push((m, vec![point])),
        }
    }
    let series: Vec<Value> = series
        .into_iter()
        .map(|(metric, points)| json!({"metric": metric, "points": points}))
        .collect();
    Ok(Json(json!({
        "device_id": device,
        "resolution": p.resolution.name(),
        "from": rfc3339(p.range.from_us),
        "to": rfc3339(p.range.to_us),
        "truncated": truncated,
        "series": series,
    })))
}

pub(super) async fn latest(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(device): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = app.db.get().await?;
    let rows = queries::latest(&c, &tenant, &device)
        .await
        .map_err(|e| app.storage(e))?;
    if rows.is_empty() {
        return Err(not_found(&device));
    }
    let metrics: serde_json::Map<String, Value> = rows
        .into_iter()
        .map(|r| {
            let point = json!({"ts": rfc3339(r.ts_us), "value": json_number(r.value)});
            (r.metric, point)
        })
        .collect();
    Ok(Json(json!({"device_id": device, "metrics": metrics})))
}
