//! PostgreSQL: the schema, and the idempotent batch writer.
//!
//! A batch is written in one transaction: binary COPY into a temporary staging table, then
//! `INSERT ... SELECT ... ON CONFLICT DO NOTHING` into `raw_metrics`, keyed by the reading
//! identity (device, metric, ts). A replayed batch (after a lost ack, a reconnect or a crash)
//! therefore adds nothing, and a batch is acknowledged to the gateway only after the commit.
//!
//! This is the first cut of the schema (issue 4); issue 5 adds range partitions or a
//! TimescaleDB hypertable, the rollups and the rest of the tables.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plantlink_model::Reading;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error};

/// The schema; every statement is idempotent.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw_metrics (
    tenant_id   text             NOT NULL,
    device_id   text             NOT NULL,
    metric_name text             NOT NULL,
    value       double precision NOT NULL,
    tags        jsonb,
    ts          timestamptz      NOT NULL,
    seq         bigint,
    gateway_id  text             NOT NULL,
    PRIMARY KEY (device_id, metric_name, ts)
);
";

/// Creates or completes the schema.
pub async fn migrate(client: &Client) -> Result<(), Error> {
    client.batch_execute(SCHEMA).await
}

const STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS staging_readings (
    tenant_id text, device_id text, metric_name text, value float8, tags text, ts timestamptz,
    seq int8, gateway_id text) ON COMMIT DELETE ROWS";

const COLUMNS: [Type; 8] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::FLOAT8,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::TEXT,
];

fn system_time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

/// Writes one gateway's batch; returns how many readings were new. `tenant` and `gateway`
/// come from the gateway's verified certificate, never from the batch.
pub async fn write_batch(
    client: &mut Client,
    tenant: &str,
    gateway: &str,
    readings: &[Reading],
) -> Result<u64, Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(STAGING).await?;
    let sink = tx
        .copy_in("COPY staging_readings FROM STDIN (FORMAT binary)")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &COLUMNS);
    let mut writer = std::pin::pin!(writer);
    for r in readings {
        let tags = (!r.tags.is_empty()).then(|| serde_json::to_string(&r.tags).unwrap_or_default());
        let ts = system_time(r.ts.0);
        // Sequence numbers above i64::MAX keep their bits (documented on the column).
        let seq = r.seq.map(|s| s as i64);
        let row: [&(dyn ToSql + Sync); 8] = [
            &tenant, &r.device, &r.metric, &r.value, &tags, &ts, &seq, &gateway,
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    let inserted = tx
        .execute(
            "INSERT INTO raw_metrics (tenant_id, device_id, metric_name, value, tags, ts, seq, gateway_id)
             SELECT tenant_id, device_id, metric_name, value, tags::jsonb, ts, seq, gateway_id
             FROM staging_readings
             ON CONFLICT (device_id, metric_name, ts) DO NOTHING",
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(inserted)
}
