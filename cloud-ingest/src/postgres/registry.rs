//! The payload schema registry's queries: `payload_schemas`, `payload_schema_sets` and
//! `gateway_schemas`. Every change bumps the tenant's set version in the same transaction,
//! so a gateway that acknowledged a version has every change up to it.

use plantlink_wire::frame::{SchemaEntry, SchemaSet};
use tokio_postgres::{Error, GenericClient, Row};

/// A stored schema.
#[derive(Debug, Clone)]
pub struct SchemaRow {
    /// Its id.
    pub id: i64,
    /// Its revision.
    pub revision: i32,
    /// The device type.
    pub device_type: String,
    /// The firmware pattern.
    pub firmware_version: String,
    /// `json`, `cbor` or `protobuf`.
    pub format: String,
    /// The definition, JSON text.
    pub definition: String,
    /// When it last changed, µs since the epoch.
    pub updated_us: i64,
}

/// What a gateway last reported of its schema set.
#[derive(Debug, Clone)]
pub struct GatewayRow {
    /// The gateway.
    pub gateway: String,
    /// The set version in force there.
    pub version: i64,
    /// The schemas it refused, JSON text.
    pub refused: String,
    /// When it reported, µs since the epoch.
    pub reported_us: i64,
}

const COLUMNS: &str = "schema_id, revision, device_type, firmware_version, format, \
    schema_definition::text, (extract(epoch FROM updated_at) * 1000000)::bigint";

fn row(r: &Row) -> Result<SchemaRow, Error> {
    Ok(SchemaRow {
        id: r.try_get(0)?,
        revision: r.try_get(1)?,
        device_type: r.try_get(2)?,
        firmware_version: r.try_get(3)?,
        format: r.try_get(4)?,
        definition: r.try_get(5)?,
        updated_us: r.try_get(6)?,
    })
}

/// The tenant's schemas, in id order.
pub async fn list(c: &impl GenericClient, tenant: &str) -> Result<Vec<SchemaRow>, Error> {
    c.query(
        &format!("SELECT {COLUMNS} FROM payload_schemas WHERE tenant_id = $1 ORDER BY schema_id"),
        &[&tenant],
    )
    .await?
    .iter()
    .map(row)
    .collect()
}

/// One of the tenant's schemas.
pub async fn get(
    c: &impl GenericClient,
    tenant: &str,
    id: i64,
) -> Result<Option<SchemaRow>, Error> {
    c.query_opt(
        &format!("SELECT {COLUMNS} FROM payload_schemas WHERE tenant_id = $1 AND schema_id = $2"),
        &[&tenant, &id],
    )
    .await?
    .as_ref()
    .map(row)
    .transpose()
}

/// The tenant's set version after a change (call inside the change's transaction).
async fn bump(c: &impl GenericClient, tenant: &str) -> Result<i64, Error> {
    c.query_one(
        "INSERT INTO payload_schema_sets (tenant_id, version) VALUES ($1, 1)
         ON CONFLICT (tenant_id) DO UPDATE
           SET version = payload_schema_sets.version + 1, changed_at = now()
         RETURNING version",
        &[&tenant],
    )
    .await?
    .try_get(0)
}

/// Adds a schema; returns its id and the new set version. A second schema for the same
/// device type and firmware pattern is a unique violation.
pub async fn insert(
    c: &impl GenericClient,
    tenant: &str,
    device_type: &str,
    firmware_version: &str,
    format: &str,
    definition: &str,
) -> Result<(i64, i64), Error> {
    let id: i64 = c
        .query_one(
            "INSERT INTO payload_schemas (tenant_id, device_type, firmware_version, format, schema_definition)
             VALUES ($1, $2, $3, $4, $5::text::jsonb) RETURNING schema_id",
            &[&tenant, &device_type, &firmware_version, &format, &definition],
        )
        .await?
        .try_get(0)?;
    Ok((id, bump(c, tenant).await?))
}

/// Replaces a schema; returns its new revision and the set version, or `None` if the
/// tenant has no such schema.
pub async fn update(
    c: &impl GenericClient,
    tenant: &str,
    id: i64,
    device_type: &str,
    firmware_version: &str,
    format: &str,
    definition: &str,
) -> Result<Option<(i32, i64)>, Error> {
    let Some(r) = c
        .query_opt(
            "UPDATE payload_schemas SET device_type = $3, firmware_version = $4, format = $5,
                    schema_definition = $6::text::jsonb, revision = revision + 1, updated_at = now()
             WHERE tenant_id = $1 AND schema_id = $2 RETURNING revision",
            &[
                &tenant,
                &id,
                &device_type,
                &firmware_version,
                &format,
                &definition,
            ],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some((r.try_get(0)?, bump(c, tenant).await?)))
}

/// Deletes a schema (devices that used it keep no reference); returns the set version, or
/// `None` if the tenant has no such schema.
pub async fn delete(c: &impl GenericClient, tenant: &str, id: i64) -> Result<Option<i64>, Error> {
    // Devices that used it are left with none by the key (ON DELETE SET NULL).
    let n = c
        .execute(
            "DELETE FROM payload_schemas WHERE tenant_id = $1 AND schema_id = $2",
            &[&tenant, &id],
        )
        .await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(bump(c, tenant).await?))
}

/// The tenant's set version (0 before any schema).
pub async fn version(c: &impl GenericClient, tenant: &str) -> Result<i64, Error> {
    Ok(c.query_opt(
        "SELECT version FROM payload_schema_sets WHERE tenant_id = $1",
        &[&tenant],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()?
    .unwrap_or(0))
}

/// Every tenant's set version.
pub async fn versions(c: &impl GenericClient) -> Result<Vec<(String, i64)>, Error> {
    c.query("SELECT tenant_id, version FROM payload_schema_sets", &[])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// The tenant's whole set, as gateways are sent it: read in one snapshot, so the version
/// matches the schemas.
pub async fn set(c: &mut tokio_postgres::Client, tenant: &str) -> Result<SchemaSet, Error> {
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let version = version(&tx, tenant).await?;
    let schemas = list(&tx, tenant)
        .await?
        .into_iter()
        .map(|r| SchemaEntry {
            id: r.id,
            revision: r.revision,
            device_type: r.device_type,
            firmware_version: r.firmware_version,
            format: r.format,
            definition: r.definition,
        })
        .collect();
    tx.commit().await?;
    Ok(SchemaSet {
        version: u64::try_from(version).unwrap_or(0),
        schemas,
    })
}

/// Records what a gateway said of its set.
pub async fn reported(
    c: &impl GenericClient,
    tenant: &str,
    gateway: &str,
    version: i64,
    refused_json: &str,
) -> Result<(), Error> {
    c.execute(
        "INSERT INTO gateway_schemas (tenant_id, gateway_id, version, refused, reported_at)
         VALUES ($1, $2, $3, $4::text::jsonb, now())
         ON CONFLICT (tenant_id, gateway_id) DO UPDATE
           SET version = excluded.version, refused = excluded.refused, reported_at = now()",
        &[&tenant, &gateway, &version, &refused_json],
    )
    .await?;
    Ok(())
}

/// What each of the tenant's gateways last reported, by gateway id.
pub async fn gateways(c: &impl GenericClient, tenant: &str) -> Result<Vec<GatewayRow>, Error> {
    c.query(
        "SELECT gateway_id, version, refused::text, (extract(epoch FROM reported_at) * 1000000)::bigint
         FROM gateway_schemas WHERE tenant_id = $1 ORDER BY gateway_id",
        &[&tenant],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(GatewayRow {
            gateway: r.try_get(0)?,
            version: r.try_get(1)?,
            refused: r.try_get(2)?,
            reported_us: r.try_get(3)?,
        })
    })
    .collect()
}

/// Keeps what a gateway reported of its devices: type, firmware and the schema that reads
/// them (only a schema of the tenant's own; another id is kept as none).
pub async fn devices(
    c: &impl GenericClient,
    tenant: &str,
    gateway: &str,
    devices: &[plantlink_wire::frame::DeviceInfo],
) -> Result<u64, Error> {
    let ids: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
    let types: Vec<&str> = devices.iter().map(|d| d.device_type.as_str()).collect();
    let firmware: Vec<&str> = devices
        .iter()
        .map(|d| d.firmware_version.as_str())
        .collect();
    let schemas: Vec<Option<i64>> = devices.iter().map(|d| d.schema_id).collect();
    c.execute(
        "INSERT INTO devices AS d (tenant_id, device_id, device_type, firmware_version,
                                   payload_schema_id, reported_by, reported_at)
         SELECT DISTINCT ON (u.device COLLATE \"C\") $1::text, u.device, u.device_type, u.firmware, s.schema_id, $2::text, now()
         FROM unnest($3::text[], $4::text[], $5::text[], $6::int8[])
              AS u(device, device_type, firmware, schema_id)
         LEFT JOIN payload_schemas s ON s.schema_id = u.schema_id AND s.tenant_id = $1
         -- Byte order, as last_seen locks the same rows: two writers never wait on each
         -- other in opposite orders.
         ORDER BY u.device COLLATE \"C\"
         ON CONFLICT (tenant_id, device_id) DO UPDATE
         SET device_type = EXCLUDED.device_type, firmware_version = EXCLUDED.firmware_version,
             payload_schema_id = EXCLUDED.payload_schema_id, reported_by = EXCLUDED.reported_by,
             reported_at = EXCLUDED.reported_at",
        &[&tenant, &gateway, &ids, &types, &firmware, &schemas],
    )
    .await
}

/// How many of the tenant's devices each schema reads, by schema id.
pub async fn device_counts(
    c: &impl GenericClient,
    tenant: &str,
) -> Result<std::collections::HashMap<i64, i64>, Error> {
    c.query(
        "SELECT payload_schema_id, count(*) FROM devices
         WHERE tenant_id = $1 AND payload_schema_id IS NOT NULL GROUP BY 1",
        &[&tenant],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

/// The devices a schema reads, in id order (at most `limit`).
pub async fn schema_devices(
    c: &impl GenericClient,
    tenant: &str,
    id: i64,
    limit: i64,
) -> Result<Vec<String>, Error> {
    c.query(
        "SELECT device_id FROM devices WHERE tenant_id = $1 AND payload_schema_id = $2
         ORDER BY device_id LIMIT $3",
        &[&tenant, &id, &limit],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0))
    .collect()
}
