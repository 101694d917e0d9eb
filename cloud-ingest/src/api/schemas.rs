//! The payload schema registry: `/v1/payload-schemas` (list, create) and
//! `/v1/payload-schemas/{id}` (read, replace, delete), each the token's tenant's only.
//!
//! A definition is checked before it is stored, as gateways will compile it
//! ([`plantlink_schema::compile`]); a bad one is a 400 naming the field
//! (`definition.message`, `definition.metrics.temp_c`, ...). Every change bumps the tenant's
//! set version, and connected gateways are sent the new set within seconds
//! ([`crate::registry`]). The list also shows what each gateway has in force and what it
//! refused.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_postgres::error::SqlState;

use super::tenant::Tenant;
use super::{ApiError, App};
use crate::kafka::rfc3339;
use crate::postgres::registry::{self, SchemaRow};

/// A schema in a request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    device_type: String,
    firmware_version: String,
    format: String,
    definition: Value,
}

fn bad(field: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, format!("field {field}: {why}"))
}

/// Parses and checks a body; the definition is compiled as a gateway would.
fn body(bytes: &[u8]) -> Result<Body, ApiError> {
    let b: Body = super::json_body(bytes)?;
    for (field, v) in [
        ("device_type", &b.device_type),
        ("firmware_version", &b.firmware_version),
    ] {
        if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
            return Err(bad(
                field,
                format!("{v:?} must be 1 to 128 printable characters"),
            ));
        }
    }
    let format = plantlink_schema::Format::parse(&b.format).ok_or_else(|| {
        bad(
            "format",
            format!("{:?} is not json, cbor or protobuf", b.format),
        )
    })?;
    plantlink_schema::compile(format, &b.definition).map_err(|e| bad(&e.field, e.message))?;
    Ok(b)
}

fn schema_json(r: SchemaRow) -> Value {
    json!({
        "id": r.id,
        "revision": r.revision,
        "device_type": r.device_type,
        "firmware_version": r.firmware_version,
        "format": r.format,
        "definition": serde_json::from_str::<Value>(&r.definition).unwrap_or(Value::Null),
        "updated_at": rfc3339(r.updated_us),
    })
}

fn not_found(id: i64) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("payload schema {id} not found for this tenant"),
    )
}

fn conflict(b: &Body) -> ApiError {
    ApiError(
        StatusCode::CONFLICT,
        format!(
            "a schema for device type {:?} firmware {:?} exists already; change it with PUT /v1/payload-schemas/{{id}} (GET /v1/payload-schemas lists the ids)",
            b.device_type, b.firmware_version
        ),
    )
}

impl App {
    fn schema_error(&self, e: tokio_postgres::Error, b: &Body) -> ApiError {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            return conflict(b);
        }
        self.storage(e)
    }
}

pub(super) async fn create(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let b = body(&bytes)?;
    let definition = b.definition.to_string();
    let mut c = app.db.get().await?;
    let tx = c.transaction().await.map_err(|e| app.storage(e))?;
    let (id, version) = registry::insert(
        &*tx,
        &tenant,
        &b.device_type,
        &b.firmware_version,
        &b.format,
        &definition,
    )
    .await
    .map_err(|e| app.schema_error(e, &b))?;
    let row = registry::get(&*tx, &tenant, id)
        .await
        .map_err(|e| app.storage(e))?
        .ok_or_else(|| not_found(id))?;
    tx.commit().await.map_err(|e| app.schema_error(e, &b))?;
    let mut v = schema_json(row);
    v["set_version"] = json!(version);
    Ok((StatusCode::CREATED, Json(v)))
}

pub(super) async fn list(
    State(app): State<App>,
    Tenant(tenant): Tenant,
) -> Result<Json<Value>, ApiError> {
    let c = app.db.get().await?;
    let version = registry::version(&**c, &tenant)
        .await
        .map_err(|e| app.storage(e))?;
    let counts = registry::device_counts(&**c, &tenant)
        .await
        .map_err(|e| app.storage(e))?;
    let schemas: Vec<Value> = registry::list(&**c, &tenant)
        .await
        .map_err(|e| app.storage(e))?
        .into_iter()
        .map(|r| {
            let n = counts.get(&r.id).copied().unwrap_or(0);
            let mut v = schema_json(r);
            v["device_count"] = json!(n);
            v
        })
        .collect();
    let gateways: Vec<Value> = registry::gateways(&**c, &tenant)
        .await
        .map_err(|e| app.storage(e))?
        .into_iter()
        .map(|g| {
            json!({
                "gateway_id": g.gateway,
                "version": g.version,
                "current": g.version == version,
                "refused": serde_json::from_str::<Value>(&g.refused).unwrap_or(Value::Null),
                "reported_at": rfc3339(g.reported_us),
            })
        })
        .collect();
    Ok(Json(
        json!({ "version": version, "schemas": schemas, "gateways": gateways }),
    ))
}

pub(super) async fn get(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let c = app.db.get().await?;
    let row = registry::get(&**c, &tenant, id)
        .await
        .map_err(|e| app.storage(e))?
        .ok_or_else(|| not_found(id))?;
    let devices = registry::schema_devices(&**c, &tenant, id, DEVICES_SHOWN + 1)
        .await
        .map_err(|e| app.storage(e))?;
    let mut v = schema_json(row);
    v["devices_truncated"] = json!(devices.len() as i64 > DEVICES_SHOWN);
    v["devices"] = json!(&devices[..devices.len().min(DEVICES_SHOWN as usize)]);
    Ok(Json(v))
}

/// The most device ids `GET /v1/payload-schemas/{id}` lists.
const DEVICES_SHOWN: i64 = 1000;

pub(super) async fn update(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<i64>,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    let b = body(&bytes)?;
    let definition = b.definition.to_string();
    let mut c = app.db.get().await?;
    let tx = c.transaction().await.map_err(|e| app.storage(e))?;
    let (_, version) = registry::update(
        &*tx,
        &tenant,
        id,
        &b.device_type,
        &b.firmware_version,
        &b.format,
        &definition,
    )
    .await
    .map_err(|e| app.schema_error(e, &b))?
    .ok_or_else(|| not_found(id))?;
    let row = registry::get(&*tx, &tenant, id)
        .await
        .map_err(|e| app.storage(e))?
        .ok_or_else(|| not_found(id))?;
    tx.commit().await.map_err(|e| app.schema_error(e, &b))?;
    let mut v = schema_json(row);
    v["set_version"] = json!(version);
    Ok(Json(v))
}

pub(super) async fn delete(
    State(app): State<App>,
    Tenant(tenant): Tenant,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let mut c = app.db.get().await?;
    let tx = c.transaction().await.map_err(|e| app.storage(e))?;
    registry::delete(&*tx, &tenant, id)
        .await
        .map_err(|e| app.storage(e))?
        .ok_or_else(|| not_found(id))?;
    tx.commit().await.map_err(|e| app.storage(e))?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(b: &str) -> String {
        let e = body(b.as_bytes()).unwrap_err();
        assert_eq!(e.0, StatusCode::BAD_REQUEST);
        e.1
    }

    #[test]
    fn a_bad_body_names_the_field() {
        let r = refused(
            r#"{"device_type": "t", "firmware_version": "1", "format": "xml", "definition": {}}"#,
        );
        assert!(r.starts_with("field format: "), "{r}");
        let r = refused(
            r#"{"device_type": "", "firmware_version": "1", "format": "json", "definition": {}}"#,
        );
        assert!(r.starts_with("field device_type: "), "{r}");
        let r = refused(
            r#"{"device_type": "t", "firmware_version": "1", "format": "protobuf", "definition": {"descriptor_set": "", "message": "m"}}"#,
        );
        assert!(r.starts_with("field definition.descriptor_set: "), "{r}");
        let r = refused(
            r#"{"device_type": "t", "firmware_version": "1", "format": "json", "definition": {"fields": {"a": 1}}}"#,
        );
        assert!(r.starts_with("field definition"), "{r}");
        let r = refused(r#"{"device_type": "t", "firmware_version": "1", "format": "json"}"#);
        assert!(r.contains("definition"), "{r}");
    }
}
