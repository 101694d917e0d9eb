//! Schema versions, and upgrading a database that an earlier release made, in place.
//!
//! `plantlink_schema` records each version applied. A database without it but with a
//! `raw_metrics` table is version 1, the first release, whose keys had no tenant: two
//! tenants' devices of the same name shared rows. `cloud-ingest migrate` ([`super::migrate`])
//! re-keys it in one transaction, under the migration lock, so two that start together
//! upgrade it once; `run` refuses such a database and names that command:
//!
//! - `raw_metrics`, `devices` and (plain) the rollups get keys that lead with `tenant_id`;
//!   the rows already there stay, since they were unique under the narrower key;
//! - plain PostgreSQL: `rollup_dirty` is rebuilt with the tenant and marks every hour that
//!   raw data still covers, so the next roll-up recomputes those buckets per tenant. Buckets
//!   older than the raw retention have nothing to be recomputed from and keep their values
//!   (under the tenant that version 1 gave them);
//! - TimescaleDB: compressed chunks are decompressed so the key can change, and compression
//!   comes back with the tenant in `segmentby` (the policy recompresses them). The continuous
//!   aggregates already grouped by tenant; every hour raw data covers is marked for a refresh,
//!   since version 1 never rolled up backfill older than its policy window;
//! - `devices` gets one row per (tenant, device) that raw data holds, with its newest time;
//! - the one-open-alert index leads with the tenant.
//!
//! Version 3 (TimescaleDB only) builds the daily continuous aggregate on the hourly one, so a
//! day's refresh no longer reads every raw reading again ([`v3_daily`]). The version 2 daily
//! aggregate is dropped and made anew on the hourly rollups, refreshed over every complete
//! day, and only then given its policies and version 3 recorded, when the hourly rollups
//! reproduce every daily row; where they do not (the hourly retention, 730 days by default,
//! dropped hours that the daily rollups still hold, or is within a month of it), the daily
//! aggregate keeps its version 2 definition, which answers alike, and a warning says so.
//! Plain PostgreSQL already rolled days up from hours: only the version changes there.
//! Version 2 replicas may keep running while `migrate` upgrades to version 3 (no table they
//! write changes), but one that restarts afterwards refuses the newer schema: finish the
//! rollout.
//!
//! A database of a newer version than this binary knows is refused, with the versions named.
//!
//! Replicas of the old release must be stopped first: their inserts name the old key in
//! `ON CONFLICT`, which the upgraded tables no longer have, so their writes would be refused
//! (and their gateways would keep the readings and resend them to the new release). On
//! TimescaleDB the upgrade decompresses every chunk in its transaction: it needs the disk for
//! the raw retention uncompressed; if it fails, it rolls back and nothing is changed.

use tokio_postgres::Client;

use super::schema::{self, Flavor};

/// The version of the schema in the database: 0 for an empty one.
pub async fn current(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('plantlink_schema') IS NOT NULL,
                    to_regclass('raw_metrics') IS NOT NULL",
            &[],
        )
        .await?;
    let (versioned, has_raw): (bool, bool) = (row.get(0), row.get(1));
    if versioned {
        let v: Option<i32> = client
            .query_one("SELECT max(version) FROM plantlink_schema", &[])
            .await?
            .get(0);
        if let Some(v) = v {
            return Ok(v);
        }
    }
    Ok(if has_raw { 1 } else { 0 })
}

/// Refuses a schema from the future, naming both versions and what to do.
pub fn check_known(found: i32) -> anyhow::Result<()> {
    if found > schema::VERSION {
        anyhow::bail!(
            "the database has Plantlink schema version {found}, newer than this cloud-ingest \
             ({}, schema version {}); a newer release migrated it. Run that release (or a \
             newer one) instead; nothing was changed",
            env!("CARGO_PKG_VERSION"),
            schema::VERSION
        );
    }
    Ok(())
}

/// Records that the schema is now at [`schema::VERSION`].
pub const RECORD: &str = "INSERT INTO plantlink_schema (version, applied_by) VALUES ($1, $2)
    ON CONFLICT (version) DO NOTHING";

/// SQL that replaces `table`'s primary key with one on `columns`.
fn rekey(table: &str, columns: &str) -> String {
    format!(
        "DO $$
DECLARE c text;
BEGIN
    SELECT conname INTO c FROM pg_constraint
    WHERE conrelid = '{table}'::regclass AND contype = 'p';
    IF c IS NOT NULL THEN
        EXECUTE format('ALTER TABLE {table} DROP CONSTRAINT %I', c);
    END IF;
END
$$;
ALTER TABLE {table} ADD PRIMARY KEY ({columns});
"
    )
}

/// What has to change in a version 1 database before the version 2 schema is laid over it.
pub fn v2_keys(flavor: Flavor) -> String {
    let mut s = String::new();
    if flavor == Flavor::Timescale {
        s.push_str(
            "SELECT decompress_chunk(c, if_compressed => TRUE) FROM show_chunks('raw_metrics') c;
SELECT remove_compression_policy('raw_metrics', if_exists => TRUE);
ALTER TABLE raw_metrics SET (timescaledb.compress = FALSE);
",
        );
    }
    s.push_str(&rekey(
        "raw_metrics",
        "tenant_id, device_id, metric_name, ts",
    ));
    s.push_str(&rekey("devices", "tenant_id, device_id"));
    s.push_str("DROP INDEX IF EXISTS devices_tenant;\nDROP INDEX IF EXISTS alerts_one_open;\n");
    if flavor == Flavor::Plain {
        for t in ["downsampled_metrics_1h", "downsampled_metrics_1d"] {
            s.push_str(&rekey(t, "tenant_id, device_id, metric_name, bucket"));
        }
        s.push_str("DROP TABLE IF EXISTS rollup_dirty;\n");
    }
    s
}

/// Data steps once the version 2 schema is in place: devices per tenant, and every hour raw
/// data covers marked for re-rolling (plain) or refreshing (TimescaleDB: version 1 never
/// rolled up backfill older than its 3-day policy window).
pub fn v2_data() -> String {
    let mut s = String::from(
        "INSERT INTO devices AS d (tenant_id, device_id, last_seen_at)
SELECT tenant_id, device_id, max(ts) FROM raw_metrics GROUP BY 1, 2
ON CONFLICT (tenant_id, device_id) DO UPDATE SET last_seen_at = EXCLUDED.last_seen_at;
",
    );
    s.push_str(
        "INSERT INTO rollup_dirty (tenant_id, device_id, metric_name, bucket)
SELECT DISTINCT tenant_id, device_id, metric_name, date_trunc('hour', ts) FROM raw_metrics
ON CONFLICT DO NOTHING;
",
    );
    s
}

/// What the version 3 upgrade does with a TimescaleDB database's daily aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daily {
    /// It already reads the hourly aggregate and is refreshed, or does not exist yet.
    Current,
    /// Make it anew on the hourly aggregate, then [`Daily::Refresh`].
    Rebuild,
    /// It reads the hourly aggregate but the version is not recorded yet (an upgrade that
    /// stopped after the rebuild): refresh every complete day, add its policies, record 3.
    Refresh,
    /// Keep the version 2 definition: this many daily rows hold days the hourly rollups do
    /// not reproduce (or will soon have dropped).
    Keep { rows: i64 },
}

/// Drops the version 2 daily aggregate, with its policies; [`super::schema::DAILY`] makes it
/// anew.
pub const DROP_DAILY: &str = "DROP MATERIALIZED VIEW downsampled_metrics_1d;\n";

/// Days the daily rollups must stay clear of the hourly retention for a rebuild: the hourly
/// retention may drop a chunk of hours (TimescaleDB's default chunk of a continuous aggregate
/// spans ten days) while the upgrade reads them.
const RETENTION_MARGIN_DAYS: u32 = 30;

/// Decides [`Daily`] for a TimescaleDB database of version 1 or 2, whose hourly rollups are
/// kept `hourly_days`. A rebuild must lose nothing: every daily row must come out of the
/// hourly rollups again (count, minimum, maximum, and the sum within rounding), and no daily
/// row may be so old that the hourly retention could drop its hours during the upgrade.
pub async fn v3_daily(client: &Client, hourly_days: u32) -> Result<Daily, tokio_postgres::Error> {
    let def: Option<String> = client
        .query_opt(
            "SELECT view_definition FROM timescaledb_information.continuous_aggregates
             WHERE view_name = 'downsampled_metrics_1d'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let Some(def) = def else {
        return Ok(Daily::Current);
    };
    if def.contains("downsampled_metrics_1h") {
        return Ok(Daily::Refresh);
    }
    let margin =
        i32::try_from(hourly_days.saturating_sub(RETENTION_MARGIN_DAYS)).unwrap_or(i32::MAX);
    let rows: i64 = client
        .query_one(
            "WITH h AS (
                 SELECT tenant_id, device_id, metric_name,
                        time_bucket(INTERVAL '1 day', bucket) AS bucket,
                        sum(count)::bigint AS count, min(min_val) AS min_val,
                        max(max_val) AS max_val, sum(sum_val) AS sum_val
                 FROM downsampled_metrics_1h GROUP BY 1, 2, 3, 4)
             SELECT count(*) FROM downsampled_metrics_1d d
             LEFT JOIN h USING (tenant_id, device_id, metric_name, bucket)
             WHERE h.count IS DISTINCT FROM d.count
                OR h.min_val IS DISTINCT FROM d.min_val
                OR h.max_val IS DISTINCT FROM d.max_val
                OR abs(h.sum_val - d.sum_val) > 1e-9 * greatest(1, abs(d.sum_val))
                OR d.bucket < now() - make_interval(days => $1)",
            &[&margin],
        )
        .await?
        .get(0);
    Ok(if rows == 0 {
        Daily::Rebuild
    } else {
        Daily::Keep { rows }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_schema_is_refused_by_name() {
        assert!(check_known(0).is_ok());
        assert!(check_known(1).is_ok());
        assert!(check_known(schema::VERSION).is_ok());
        let e = check_known(schema::VERSION + 1).unwrap_err().to_string();
        assert!(
            e.contains(&format!("schema version {}", schema::VERSION + 1)),
            "{e}"
        );
        assert!(e.contains("newer"), "{e}");
    }

    #[test]
    fn the_upgrade_rekeys_what_each_flavour_has() {
        let plain = v2_keys(Flavor::Plain);
        assert!(plain.contains(
            "ALTER TABLE raw_metrics ADD PRIMARY KEY (tenant_id, device_id, metric_name, ts)"
        ));
        assert!(plain.contains("ALTER TABLE downsampled_metrics_1d ADD PRIMARY KEY (tenant_id,"));
        assert!(plain.contains("DROP TABLE IF EXISTS rollup_dirty"));
        assert!(!plain.contains("decompress_chunk"));
        let ts = v2_keys(Flavor::Timescale);
        assert!(ts.contains("decompress_chunk"));
        // Continuous aggregates are views: no key to change, nothing to drop.
        assert!(!ts.contains("downsampled_metrics_1h"));
        assert!(!ts.contains("rollup_dirty"));
        // Both flavours re-roll (plain) or refresh (TimescaleDB) every hour raw data covers.
        assert!(v2_data().contains("INSERT INTO rollup_dirty"));
    }
}
