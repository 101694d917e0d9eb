//! PostgreSQL and TimescaleDB: the schema, the idempotent batch writer, and upkeep.
//!
//! A flush (one or more gateways' batches) is written in one transaction: binary COPY into
//! a temporary staging table, then `INSERT ... SELECT ... ORDER BY key ON CONFLICT DO
//! NOTHING` into `raw_metrics`, keyed by the reading identity (tenant, device, metric, ts).
//! A replayed batch (after a lost ack, a reconnect or a crash) therefore adds nothing, and a
//! batch is acknowledged to the gateway only after the commit. Rows go in key order, so two
//! writers inserting overlapping replays take their locks in the same order and cannot
//! deadlock each other.
//!
//! When some staged rows were not inserted, one more statement in the same transaction
//! tells replays (same value and tags: dropped) from conflicts (other value or tags): those
//! go to `reading_conflicts` and back to the caller, which counts, logs and dead-letters
//! them. The first value stored stays. A flush with nothing already stored pays nothing.
//!
//! The same statement records the (tenant, device, metric, hour) buckets that the new rows
//! touched in `rollup_dirty`, with their min, max, sum and count, in the same transaction, so
//! a crash cannot lose the news that a rollup is stale: on plain PostgreSQL
//! [`maintain::roll`] merges exactly those into the hourly buckets, and on
//! TimescaleDB [`refresh::refresh`] refreshes the continuous aggregates over exactly those
//! hours and days. Both leave alone buckets older than the raw retention ([`refresh`]).
//!
//! Schema versions and in-place upgrades are in [`upgrade`].

pub mod jobs;
pub mod maintain;
pub mod queries;
pub mod refresh;
pub mod registry;
pub mod schema;
pub mod upgrade;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use plantlink_model::Reading;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error};

pub use schema::Flavor;

use crate::config::{Postgres, Timescale};

/// Connects, with the session in UTC so that date arithmetic is on UTC days.
pub async fn connect(url: &str) -> Result<Client, Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    client.batch_execute("SET TIME ZONE 'UTC'").await?;
    Ok(client)
}

/// Advisory-lock key that serialises schema changes between replicas.
const MIGRATE_LOCK: i64 = 0x706c_616e_746c_6e6b; // "plantlnk"

/// Creates or completes the schema and returns its flavour; safe to run again, and from
/// several replicas at once. `[postgres] timescaledb` chooses the flavour of a new
/// database; an existing `raw_metrics` keeps its own.
pub async fn migrate(client: &Client, cfg: &Postgres) -> anyhow::Result<Flavor> {
    migrate_with(client, cfg, true).await
}

/// [`migrate`] as `run` does it: a new database is created, a current one completed, but one
/// that an earlier release made is refused with the command that upgrades it. An upgrade can
/// take long (version 2 rewrites keys over all raw data; version 3 re-aggregates the daily
/// rollups on TimescaleDB); it belongs to a `cloud-ingest migrate` run, not to a replica's
/// start, whose probes would kill it half way.
pub async fn migrate_for_run(client: &Client, cfg: &Postgres) -> anyhow::Result<Flavor> {
    migrate_with(client, cfg, false).await
}

async fn migrate_with(client: &Client, cfg: &Postgres, upgrade: bool) -> anyhow::Result<Flavor> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    let result = migrate_locked(client, cfg, upgrade).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await?;
    result
}

async fn migrate_locked(
    client: &Client,
    cfg: &Postgres,
    may_upgrade: bool,
) -> anyhow::Result<Flavor> {
    let version = upgrade::current(client).await?;
    upgrade::check_known(version)?;
    if version > 0 && version < schema::VERSION && !may_upgrade {
        anyhow::bail!(
            "the database has Plantlink schema version {version}, older than this cloud-ingest's \
             ({}); stop every cloud-ingest of the earlier release, run `cloud-ingest migrate \
             --config <this config>` once (it upgrades in place, in one transaction), then start \
             the new replicas; gateways keep their readings meanwhile",
            schema::VERSION
        );
    }
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                    current_setting('shared_preload_libraries') ~ '(^|[ ,])\"?timescaledb\"?($|[ ,])'",
            &[],
        )
        .await?;
    let (installed, preloaded): (bool, bool) = (row.get(0), row.get(1));
    // Installed but not preloaded (the state right after `apt install`): CREATE EXTENSION
    // would end the session, so the extension counts as not available, and says why.
    let available = installed && preloaded;
    let not_preloaded = "the timescaledb extension is installed but this server does not \
        preload it; add timescaledb to shared_preload_libraries in postgresql.conf and restart \
        PostgreSQL";
    let existing = existing_flavor(client).await?;
    if installed && !preloaded && cfg.timescaledb == Timescale::Auto && existing.is_none() {
        tracing::warn!(
            "{not_preloaded}; using plain PostgreSQL for this new database (timescaledb = \"auto\")"
        );
    }
    let flavor = match (existing, cfg.timescaledb) {
        (Some(Flavor::Plain), Timescale::On) => anyhow::bail!(
            "postgres.timescaledb = \"on\", but raw_metrics already exists as plain partitions; \
             set timescaledb = \"off\" (or \"auto\") to keep it, or migrate into a new database"
        ),
        (Some(f), _) => f,
        (None, Timescale::Off) => Flavor::Plain,
        (None, Timescale::Auto) if available => Flavor::Timescale,
        (None, Timescale::Auto) => Flavor::Plain,
        (None, Timescale::On) if available => Flavor::Timescale,
        (None, Timescale::On) if installed => {
            anyhow::bail!(
                "postgres.timescaledb = \"on\", but {not_preloaded}; or set timescaledb = \"auto\""
            )
        }
        (None, Timescale::On) => anyhow::bail!(
            "postgres.timescaledb = \"on\", but this server does not offer the timescaledb \
             extension (not in pg_available_extensions); install it, or set timescaledb = \"auto\""
        ),
    };
    // One transaction: an upgrade that fails half way leaves the old schema as it was.
    let mut sql = String::from("BEGIN;\n");
    if version == 1 {
        tracing::info!(
            from = 1,
            to = schema::VERSION,
            ?flavor,
            "upgrading the schema in place"
        );
        sql.push_str(&upgrade::v2_keys(flavor));
    }
    // Version 3's daily aggregate is rebuilt after this transaction, and the version is
    // recorded only once that is done and refreshed: until then the database says 2, and a
    // `migrate` that was stopped half way takes up where it stopped.
    let daily = if flavor == Flavor::Timescale && (1..3).contains(&version) {
        upgrade::v3_daily(client, cfg.retention.hourly_days).await?
    } else {
        upgrade::Daily::Current
    };
    if let upgrade::Daily::Keep { rows } = daily {
        tracing::warn!(
            rows,
            "downsampled_metrics_1d keeps its earlier definition (from raw_metrics): {rows} of \
             its rows hold days the hourly rollups do not reproduce (or soon will not: the \
             hourly retention is near), which rebuilding it from them would lose. It answers \
             alike; its refreshes read raw readings again (slower)"
        );
    }
    let daily_step = matches!(daily, upgrade::Daily::Rebuild | upgrade::Daily::Refresh);
    let recorded = if daily_step { 2 } else { schema::VERSION };
    sql.push_str(schema::COMMON);
    match flavor {
        Flavor::Plain => sql.push_str(&schema::plain()),
        Flavor::Timescale => {
            sql.push_str(&schema::timescale(&cfg.retention, cfg.compress_after_days))
        }
    }
    if version == 1 {
        sql.push_str(&upgrade::v2_data());
    }
    let applied = async {
        client.batch_execute(&sql).await?;
        client
            .execute(
                upgrade::RECORD,
                &[
                    &recorded,
                    &concat!("cloud-ingest ", env!("CARGO_PKG_VERSION")),
                ],
            )
            .await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = applied {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(anyhow::Error::new(e).context(format!(
            "creating or upgrading the schema (found version {version}, this release writes \
             version {}); nothing was changed",
            schema::VERSION
        )));
    }
    if daily_step {
        v3_daily_step(client, cfg, daily).await.context(
            "rebuilding the daily continuous aggregate on the hourly one (schema version 3); \
             the database stays at version 2 and `cloud-ingest migrate` takes up where this \
             stopped",
        )?;
    }
    if flavor == Flavor::Plain {
        maintain::partitions(client, cfg).await?;
        if version == 1 {
            // Rollups recomputed per tenant now, so they are right when `migrate` returns.
            let hours = maintain::roll(client).await?;
            tracing::info!(hourly_buckets = hours, "rollups recomputed per tenant");
        }
    }
    Ok(flavor)
}

/// Version 3 on TimescaleDB: the daily aggregate made anew on the hourly one (for
/// [`upgrade::Daily::Rebuild`]; without its policies, which would move its watermark past the
/// days not yet materialized), every complete day refreshed from the hourly rollups (today
/// stays real-time: refreshing it would hide what arrives later today until tomorrow), then
/// the policies, and the version recorded.
async fn v3_daily_step(
    client: &Client,
    cfg: &Postgres,
    daily: upgrade::Daily,
) -> anyhow::Result<()> {
    if daily == upgrade::Daily::Rebuild {
        tracing::info!("rebuilding the daily continuous aggregate on the hourly one");
        client
            .batch_execute(&format!(
                "BEGIN; {}{}COMMIT;",
                upgrade::DROP_DAILY,
                schema::DAILY
            ))
            .await?;
    }
    let today = refresh::today_start_us();
    refresh::refresh_range(client, "downsampled_metrics_1d", None, Some(today), false).await?;
    client
        .batch_execute(&format!(
            "BEGIN;\n{}",
            schema::timescale(&cfg.retention, cfg.compress_after_days)
        ))
        .await?;
    client
        .execute(
            upgrade::RECORD,
            &[
                &schema::VERSION,
                &concat!("cloud-ingest ", env!("CARGO_PKG_VERSION")),
            ],
        )
        .await?;
    client.batch_execute("COMMIT").await?;
    tracing::info!("the daily continuous aggregate reads the hourly one (schema version 3)");
    Ok(())
}

/// The flavour of an existing `raw_metrics`, or `None` when there is none yet.
pub async fn existing_flavor(client: &Client) -> anyhow::Result<Option<Flavor>> {
    let row = client
        .query_opt(
            "SELECT c.relkind::text FROM pg_class c
             WHERE c.oid = to_regclass('raw_metrics')",
            &[],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let kind: String = row.get(0);
    if kind == "p" {
        return Ok(Some(Flavor::Plain));
    }
    let hyper: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
            &[],
        )
        .await?
        .get(0);
    if hyper {
        let is: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                 WHERE hypertable_name = 'raw_metrics')",
                &[],
            )
            .await?
            .get(0);
        if is {
            return Ok(Some(Flavor::Timescale));
        }
    }
    anyhow::bail!(
        "raw_metrics exists but is neither partitioned nor a hypertable (an earlier Plantlink \
         made it); rename it with ALTER TABLE raw_metrics RENAME TO raw_metrics_old, run \
         `cloud-ingest migrate` again, then copy the rows across with INSERT INTO raw_metrics \
         SELECT * FROM raw_metrics_old ON CONFLICT DO NOTHING"
    )
}

/// The staging table, one per connection; rows vanish at each commit.
pub const STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS staging_readings (
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

/// A µs timestamp as a `SystemTime` (for timestamptz parameters).
pub fn system_time(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

/// Rows go in key order, ties in the order received (`ctid` follows the COPY), so within a
/// flush the first of two readings with one identity is the one stored.
/// Counted from `RETURNING`: the count decides whether the conflict check runs. On both
/// flavours the touched (tenant, device, metric, hour) buckets go to `rollup_dirty`, with
/// the min, max, sum and count of the rows inserted now added to what is waiting there, so
/// the plain flavour's roll-up merges them without reading the hour's raw rows again. A
/// bucket marked for recomputing (count NULL) stays so: NULL plus a number is NULL.
const INSERT: &str = "
WITH ins AS (
    INSERT INTO raw_metrics (tenant_id, device_id, metric_name, value, tags, ts, seq, gateway_id)
    SELECT tenant_id, device_id, metric_name, value, tags::jsonb, ts, seq, gateway_id
    FROM staging_readings
    ORDER BY tenant_id, device_id, metric_name, ts, ctid
    ON CONFLICT (tenant_id, device_id, metric_name, ts) DO NOTHING
    RETURNING tenant_id, device_id, metric_name, ts, value
), dirty AS (
    INSERT INTO rollup_dirty AS d
        (tenant_id, device_id, metric_name, bucket, min_val, max_val, sum_val, count)
    SELECT tenant_id, device_id, metric_name, date_trunc('hour', ts),
           min(value), max(value), sum(value), count(*)
    FROM ins
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    -- The update also locks an existing key until this transaction commits, so a roll-up
    -- running now skips it (SKIP LOCKED) instead of taking it without these rows.
    ON CONFLICT (tenant_id, device_id, metric_name, bucket) DO UPDATE SET
        min_val = least(d.min_val, EXCLUDED.min_val),
        max_val = greatest(d.max_val, EXCLUDED.max_val),
        sum_val = d.sum_val + EXCLUDED.sum_val,
        count = d.count + EXCLUDED.count
)
SELECT count(*) FROM ins";

/// Run only when some staged rows were not inserted: those whose identity is stored with
/// another value or other tags are conflicts. Each is kept once in `reading_conflicts` (a
/// replay of a conflicting batch adds nothing) and returned to be reported. The join sees
/// this transaction's own inserts, so two readings of one identity in one flush are caught
/// too.
const CONFLICTS: &str = "
INSERT INTO reading_conflicts
    (tenant_id, device_id, metric_name, ts, value, tags, stored_value, stored_tags, gateway_id, seq)
SELECT s.tenant_id, s.device_id, s.metric_name, s.ts, s.value, coalesce(s.tags::jsonb, '{}'::jsonb),
       r.value, r.tags, s.gateway_id, s.seq
FROM staging_readings s
JOIN raw_metrics r ON r.tenant_id = s.tenant_id AND r.device_id = s.device_id
                  AND r.metric_name = s.metric_name AND r.ts = s.ts
WHERE r.value IS DISTINCT FROM s.value OR r.tags IS DISTINCT FROM s.tags::jsonb
ON CONFLICT DO NOTHING
RETURNING tenant_id, gateway_id, device_id, metric_name, ts, value, stored_value";

/// A reading whose identity was already stored with another value or other tags. The stored
/// value stays; this one is kept in `reading_conflicts` and reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The tenant.
    pub tenant: String,
    /// The gateway that sent the conflicting reading.
    pub gateway: String,
    /// The device.
    pub device: String,
    /// The metric.
    pub metric: String,
    /// The reading's time, µs since the epoch.
    pub ts_us: i64,
    /// The value that arrived (and was not stored).
    pub value: f64,
    /// The value stored first, which stays.
    pub stored: f64,
}

/// What one write did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Written {
    /// Readings stored now.
    pub inserted: u64,
    /// Readings not stored because their identity was stored with the same content.
    pub replays: u64,
    /// Readings not stored because their identity was stored with other content.
    pub conflicts: Vec<Conflict>,
}

/// A gateway's readings, with the identity its certificate proved.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    /// The tenant, from the certificate.
    pub tenant: &'a str,
    /// The gateway, from the certificate.
    pub gateway: &'a str,
    /// The readings.
    pub readings: &'a [Reading],
}

/// Writes several gateways' readings in one transaction. The staging table must exist on
/// `client` ([`STAGING`]); on plain PostgreSQL the partitions for the readings' days must
/// exist too ([`maintain::Partitions::ensure`]).
pub async fn write(
    client: &mut Client,
    _flavor: Flavor,
    parts: &[Part<'_>],
) -> Result<Written, Error> {
    let tx = client.transaction().await?;
    let written = write_in(&tx, parts).await?;
    tx.commit().await?;
    Ok(written)
}

/// One partition's consumed range of a Kafka topic, to be recorded in `pipeline_offsets` with
/// the rows it holds: from `expected` (the offset stored now; `None` when none is) to `next`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The committed offset this writer read from the table, if there was one.
    pub expected: Option<i64>,
    /// The next offset to read once these rows are committed.
    pub next: i64,
}

/// Readings left out of their batch, to keep in `refused_readings` with the rows.
#[derive(Debug, Clone, Copy)]
pub struct RefusedPart<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The gateway.
    pub gateway: &'a str,
    /// Each reading with its reason.
    pub readings: &'a [(Reading, &'a str)],
}

/// [`write`] with `refused` kept and `offsets` advanced in the same transaction: the rows and
/// the consumer's position commit together or not at all. Each advance applies only if the
/// stored offset is still `expected`; if any is not (another member of the group wrote that
/// partition meanwhile), nothing is committed and the answer is `None`.
pub async fn write_advancing(
    client: &mut Client,
    parts: &[Part<'_>],
    refused: &[RefusedPart<'_>],
    offsets: &[Advance],
) -> Result<Option<Written>, Error> {
    let tx = client.transaction().await?;
    let written = write_in(&tx, parts).await?;
    for r in refused.iter().filter(|r| !r.readings.is_empty()) {
        maintain::keep_refused(&tx, r.tenant, r.gateway, r.readings).await?;
    }
    for a in offsets {
        let moved = match a.expected {
            None => {
                tx.execute(
                    "INSERT INTO pipeline_offsets (consumer_group, topic, partition_id, committed_offset)
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[&a.group, &a.topic, &a.partition, &a.next],
                )
                .await?
            }
            Some(expected) => {
                tx.execute(
                    "UPDATE pipeline_offsets SET committed_offset = $4, updated_at = now()
                     WHERE consumer_group = $1 AND topic = $2 AND partition_id = $3
                       AND committed_offset = $5",
                    &[&a.group, &a.topic, &a.partition, &a.next, &expected],
                )
                .await?
            }
        };
        if moved != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
    }
    tx.commit().await?;
    Ok(Some(written))
}

/// The committed offset of `group` on `topic`'s `partition`, if one is stored.
pub async fn committed_offset(
    client: &Client,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, Error> {
    Ok(client
        .query_opt(
            "SELECT committed_offset FROM pipeline_offsets
             WHERE consumer_group = $1 AND topic = $2 AND partition_id = $3",
            &[&group, &topic, &partition],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The staging, insert and conflict steps of a write, inside `tx`.
async fn write_in(
    tx: &tokio_postgres::Transaction<'_>,
    parts: &[Part<'_>],
) -> Result<Written, Error> {
    let sink = tx
        .copy_in("COPY staging_readings FROM STDIN (FORMAT binary)")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &COLUMNS);
    let mut writer = std::pin::pin!(writer);
    let mut staged = 0u64;
    for p in parts {
        for r in p.readings {
            let tags =
                (!r.tags.is_empty()).then(|| serde_json::to_string(&r.tags).unwrap_or_default());
            let ts = system_time(r.ts.0);
            // Sequence numbers above i64::MAX keep their bits (documented on the column).
            let seq = r.seq.map(|s| s as i64);
            let row: [&(dyn ToSql + Sync); 8] = [
                &p.tenant, &r.device, &r.metric, &r.value, &tags, &ts, &seq, &p.gateway,
            ];
            writer.as_mut().write(&row).await?;
            staged += 1;
        }
    }
    writer.finish().await?;
    let inserted = tx.query_one(INSERT, &[]).await?.get::<_, i64>(0) as u64;
    let mut conflicts = Vec::new();
    if inserted < staged {
        for row in tx.query(CONFLICTS, &[]).await? {
            let ts: SystemTime = row.get(4);
            conflicts.push(Conflict {
                tenant: row.get(0),
                gateway: row.get(1),
                device: row.get(2),
                metric: row.get(3),
                ts_us: micros(ts),
                value: row.get(5),
                stored: row.get(6),
            });
        }
    }
    Ok(Written {
        inserted,
        replays: (staged - inserted).saturating_sub(conflicts.len() as u64),
        conflicts,
    })
}

/// µs since the epoch of a `SystemTime`.
pub fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// Whether a failed write may succeed if tried again (connection lost, server restarting,
/// deadlock, out of resources), as opposed to data the database will always refuse.
pub fn transient(e: &Error) -> bool {
    let Some(code) = e.code() else {
        return true; // I/O, closed connection, timeouts
    };
    let c = code.code();
    // 08 connection, 40 rollback (deadlock, serialisation), 53 resources, 55 lock not
    // available, 57 operator intervention (shutdown), 58 system error; 23514 is a row with
    // no partition, after upkeep dropped or has not yet made one: re-ensured and retried.
    ["08", "40", "53", "55", "57", "58"]
        .iter()
        .any(|p| c.starts_with(p))
        || c == "23514"
}
