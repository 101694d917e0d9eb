//! The statements the query API runs, beside the schema they read.
//!
//! Each function takes a connection and typed arguments and returns typed rows. Times go in
//! and come out as microseconds since the epoch, as elsewhere in Plantlink. Every statement
//! over a table leads its `WHERE` with `tenant_id`: a request can reach only the rows of the
//! tenant its token names, and every key and index of those tables leads with it too. Both
//! flavours expose the same columns, so nothing here asks which one is underneath.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, Error, Row};

use super::system_time;
use crate::alerting::engine::AlertState;

/// The table of one rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollup {
    /// `downsampled_metrics_1h`.
    Hour,
    /// `downsampled_metrics_1d`.
    Day,
}

impl Rollup {
    fn table(self) -> &'static str {
        match self {
            Self::Hour => "downsampled_metrics_1h",
            Self::Day => "downsampled_metrics_1d",
        }
    }

    /// The bucket width as `date_trunc` names it: a range that starts inside a bucket
    /// includes that whole bucket.
    fn unit(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
}

/// A fleet aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    /// The mean of the readings (on rollups, `sum_val / count`, so it is exact).
    Avg,
    /// The least reading.
    Min,
    /// The greatest reading.
    Max,
    /// How many readings.
    Count,
}

impl Agg {
    /// All of them, in the order the API lists them.
    pub const ALL: [Self; 4] = [Self::Avg, Self::Min, Self::Max, Self::Count];

    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avg => "avg",
            Self::Min => "min",
            Self::Max => "max",
            Self::Count => "count",
        }
    }

    /// The SQL expression over raw readings (`None`) or a rollup's columns.
    fn expr(self, rollup: Option<Rollup>) -> &'static str {
        match (self, rollup) {
            (Self::Avg, None) => "avg(value)",
            (Self::Min, None) => "min(value)",
            (Self::Max, None) => "max(value)",
            (Self::Count, None) => "count(*)::float8",
            (Self::Avg, Some(_)) => "sum(sum_val) / nullif(sum(count), 0)",
            (Self::Min, Some(_)) => "min(min_val)",
            (Self::Max, Some(_)) => "max(max_val)",
            (Self::Count, Some(_)) => "coalesce(sum(count), 0)::float8",
        }
    }
}

fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// Conflicting readings kept per gateway of `tenant`: (gateway, readings, newest arrival
/// in µs). They outlive restarts and count what every replica saw.
pub async fn conflicts_by_gateway(
    c: &Client,
    tenant: &str,
) -> Result<Vec<(String, i64, i64)>, Error> {
    Ok(c.query(
        "SELECT gateway_id, count(*), max(received_at) FROM reading_conflicts
             WHERE tenant_id = $1 GROUP BY gateway_id ORDER BY gateway_id",
        &[&tenant],
    )
    .await?
    .iter()
    .map(|r| {
        let at: SystemTime = r.get(2);
        (r.get(0), r.get(1), super::micros(at))
    })
    .collect())
}

/// Whether the database answers at all.
/// Every stored consumer offset: (group, topic, partition, committed offset).
pub async fn pipeline_offsets(c: &Client) -> Result<Vec<(String, String, i32, i64)>, Error> {
    Ok(c.query(
        "SELECT consumer_group, topic, partition_id, committed_offset FROM pipeline_offsets
             ORDER BY 1, 2, 3",
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect())
}

pub async fn ping(c: &Client) -> Result<(), Error> {
    c.simple_query("SELECT 1").await.map(drop)
}

/// Whether `device` belongs to `tenant`: it has a devices row, raw readings or daily rollups
/// of that tenant.
pub async fn device_known(c: &Client, tenant: &str, device: &str) -> Result<bool, Error> {
    c.query_one(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = $2)
             OR EXISTS (SELECT 1 FROM raw_metrics WHERE tenant_id = $1 AND device_id = $2)
             OR EXISTS (SELECT 1 FROM downsampled_metrics_1d WHERE tenant_id = $1 AND device_id = $2)",
        &[&tenant, &device],
    )
    .await?
    .try_get(0)
}

/// One device of a tenant, for `GET /v1/devices`.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    /// The device id.
    pub device_id: String,
    /// What its gateway reported of it.
    pub device_type: Option<String>,
    /// Its firmware, as reported.
    pub firmware_version: Option<String>,
    /// Its newest reading's time (µs).
    pub last_seen_us: Option<i64>,
    /// Readings of this clock hour and the one before, from the hourly rollup.
    pub readings_recent: i64,
}

/// The tenant's devices by id, `limit` at most, with their readings of this clock hour and
/// the one before. Those come from the hourly rollup (a few rows per device, where raw
/// readings would be a scan of the day's partition): on plain PostgreSQL it trails by
/// `rollup_interval_ms`, on TimescaleDB it is real time.
pub async fn devices(c: &Client, tenant: &str, limit: i64) -> Result<Vec<DeviceRow>, Error> {
    let rows = c
        .query(
            "WITH page AS (
                 SELECT device_id, device_type, firmware_version, last_seen_at FROM devices
                 WHERE tenant_id = $1 ORDER BY device_id LIMIT $2),
             recent AS (
                 SELECT device_id, sum(count)::bigint AS n FROM downsampled_metrics_1h
                 WHERE tenant_id = $1 AND device_id IN (SELECT device_id FROM page)
                   AND bucket >= date_trunc('hour', now()) - interval '1 hour'
                 GROUP BY device_id)
             SELECT p.device_id, p.device_type, p.firmware_version, p.last_seen_at,
                    coalesce(r.n, 0)
             FROM page p LEFT JOIN recent r USING (device_id)
             ORDER BY p.device_id",
            &[&tenant, &limit],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(DeviceRow {
                device_id: r.try_get(0)?,
                device_type: r.try_get(1)?,
                firmware_version: r.try_get(2)?,
                last_seen_us: r.try_get::<_, Option<SystemTime>>(3)?.map(micros),
                readings_recent: r.try_get(4)?,
            })
        })
        .collect()
}

/// Which series of a device, over which time, and how many rows at most.
#[derive(Debug, Clone, Copy)]
pub struct SeriesQuery<'a> {
    /// The token's tenant.
    pub tenant: &'a str,
    /// The device.
    pub device: &'a str,
    /// One metric, or all of the device's when `None`.
    pub metric: Option<&'a str>,
    /// From this time (µs), inclusive.
    pub from_us: i64,
    /// To this time (µs), exclusive.
    pub to_us: i64,
    /// Rows at most.
    pub limit: i64,
}

/// One raw reading of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPoint {
    /// Its metric.
    pub metric: String,
    /// When (µs).
    pub ts_us: i64,
    /// Its value.
    pub value: f64,
}

/// A `(metric_name, ts, value)` row.
fn raw_point(r: &Row) -> Result<RawPoint, Error> {
    Ok(RawPoint {
        metric: r.try_get(0)?,
        ts_us: micros(r.try_get(1)?),
        value: r.try_get(2)?,
    })
}

/// Raw readings in `(metric, ts)` order.
pub async fn raw_series(c: &Client, q: &SeriesQuery<'_>) -> Result<Vec<RawPoint>, Error> {
    let rows = c
        .query(
            "SELECT metric_name, ts, value
             FROM raw_metrics
             WHERE tenant_id = $1 AND device_id = $2 AND ($3::text IS NULL OR metric_name = $3)
               AND ts >= $4 AND ts < $5
             ORDER BY metric_name, ts LIMIT $6",
            &[
                &q.tenant,
                &q.device,
                &q.metric,
                &system_time(q.from_us),
                &system_time(q.to_us),
                &q.limit,
            ],
        )
        .await?;
    rows.iter().map(raw_point).collect()
}

/// One bucket of a rollup series.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupPoint {
    /// Its metric.
    pub metric: String,
    /// The bucket's start (µs).
    pub bucket_us: i64,
    /// The mean.
    pub avg: f64,
    /// The least reading.
    pub min: Option<f64>,
    /// The greatest reading.
    pub max: Option<f64>,
    /// How many readings.
    pub count: Option<i64>,
}

/// Rollup buckets in `(metric, bucket)` order, from the bucket that holds `from_us`.
pub async fn rollup_series(
    c: &Client,
    rollup: Rollup,
    q: &SeriesQuery<'_>,
) -> Result<Vec<RollupPoint>, Error> {
    let rows = c
        .query(
            &format!(
                "SELECT metric_name, bucket, avg_val, min_val, max_val, count
                 FROM {}
                 WHERE tenant_id = $1 AND device_id = $2 AND ($3::text IS NULL OR metric_name = $3)
                   AND bucket >= date_trunc('{}', $4::timestamptz) AND bucket < $5
                 ORDER BY metric_name, bucket LIMIT $6",
                rollup.table(),
                rollup.unit()
            ),
            &[
                &q.tenant,
                &q.device,
                &q.metric,
                &system_time(q.from_us),
                &system_time(q.to_us),
                &q.limit,
            ],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(RollupPoint {
                metric: r.try_get(0)?,
                bucket_us: micros(r.try_get(1)?),
                avg: r.try_get(2)?,
                min: r.try_get(3)?,
                max: r.try_get(4)?,
                count: r.try_get(5)?,
            })
        })
        .collect()
}

/// The newest raw reading of each of a device's metrics, in metric order.
pub async fn latest(c: &Client, tenant: &str, device: &str) -> Result<Vec<RawPoint>, Error> {
    let rows = c
        .query(
            "SELECT DISTINCT ON (metric_name) metric_name, ts, value FROM raw_metrics
             WHERE tenant_id = $1 AND device_id = $2
             ORDER BY metric_name, ts DESC",
            &[&tenant, &device],
        )
        .await?;
    rows.iter().map(raw_point).collect()
}

/// A fleet aggregate's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    /// `None` when no reading is in range (and `agg` is not a count).
    pub value: Option<f64>,
    /// How many devices contributed.
    pub devices: i64,
}

/// A fleet aggregate to compute.
#[derive(Debug, Clone, Copy)]
pub struct AggregateQuery<'a> {
    /// The token's tenant.
    pub tenant: &'a str,
    /// The metric.
    pub metric: &'a str,
    /// What to compute.
    pub agg: Agg,
    /// Raw readings (`None`) or a rollup, whose buckets count from the one that holds
    /// `from_us`.
    pub rollup: Option<Rollup>,
    /// From this time (µs), inclusive.
    pub from_us: i64,
    /// To this time (µs), exclusive.
    pub to_us: i64,
}

/// `q.agg` of `q.metric` over all of the tenant's devices.
pub async fn aggregate(c: &Client, q: &AggregateQuery<'_>) -> Result<Aggregate, Error> {
    let (table, time_col, start) = match q.rollup {
        None => ("raw_metrics", "ts", "$3".to_owned()),
        Some(r) => (
            r.table(),
            "bucket",
            format!("date_trunc('{}', $3::timestamptz)", r.unit()),
        ),
    };
    let row = c
        .query_one(
            &format!(
                "SELECT {}, count(DISTINCT device_id) FROM {table}
                 WHERE tenant_id = $1 AND metric_name = $2 AND {time_col} >= {start} AND {time_col} < $4",
                q.agg.expr(q.rollup)
            ),
            &[
                &q.tenant,
                &q.metric,
                &system_time(q.from_us),
                &system_time(q.to_us),
            ],
        )
        .await?;
    Ok(Aggregate {
        value: row.try_get(0)?,
        devices: row.try_get(1)?,
    })
}

/// A rule's columns: its JSON body, and what is kept beside it for people and indexes.
#[derive(Debug, Clone, Copy)]
pub struct RuleRow<'a> {
    /// A name for people.
    pub name: &'a str,
    /// The metric of a threshold rule.
    pub metric: Option<&'a str>,
    /// The whole rule as JSON (`condition_expr`).
    pub body_json: &'a str,
    /// The threshold of a threshold rule.
    pub threshold: Option<f64>,
    /// The window or silence, in seconds.
    pub window_seconds: Option<i32>,
    /// Its severity.
    pub severity: &'a str,
    /// For people.
    pub description: Option<&'a str>,
}

/// Stores a new rule of `tenant` and returns its id.
pub async fn insert_rule(c: &Client, tenant: &str, r: &RuleRow<'_>) -> Result<i64, Error> {
    c.query_one(
        "INSERT INTO alert_rules (tenant_id, name, metric_name, condition_expr, threshold,
                                  window_seconds, severity, description)
         VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8) RETURNING rule_id",
        &[
            &tenant,
            &r.name,
            &r.metric,
            &r.body_json,
            &r.threshold,
            &r.window_seconds,
            &r.severity,
            &r.description,
        ],
    )
    .await?
    .try_get(0)
}

/// The tenant's rules as `(id, JSON body)`, in id order.
pub async fn rules(c: &Client, tenant: &str) -> Result<Vec<(i64, String)>, Error> {
    let rows = c
        .query(
            "SELECT rule_id, condition_expr::text FROM alert_rules WHERE tenant_id = $1 ORDER BY rule_id",
            &[&tenant],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// One rule's JSON body, if the tenant has a rule `id`.
pub async fn rule(c: &Client, tenant: &str, id: i64) -> Result<Option<String>, Error> {
    c.query_opt(
        "SELECT condition_expr::text FROM alert_rules WHERE tenant_id = $1 AND rule_id = $2",
        &[&tenant, &id],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()
}

/// Replaces the tenant's rule `id`; false if it has none.
pub async fn update_rule(
    c: &Client,
    tenant: &str,
    id: i64,
    r: &RuleRow<'_>,
) -> Result<bool, Error> {
    let n = c
        .execute(
            "UPDATE alert_rules SET name = $3, metric_name = $4, condition_expr = $5::text::jsonb,
                    threshold = $6, window_seconds = $7, severity = $8, description = $9, updated_at = now()
             WHERE tenant_id = $1 AND rule_id = $2",
            &[
                &tenant,
                &id,
                &r.name,
                &r.metric,
                &r.body_json,
                &r.threshold,
                &r.window_seconds,
                &r.severity,
                &r.description,
            ],
        )
        .await?;
    Ok(n > 0)
}

/// Deletes the tenant's rule `id`; false if it has none.
pub async fn delete_rule(c: &Client, tenant: &str, id: i64) -> Result<bool, Error> {
    let n = c
        .execute(
            "DELETE FROM alert_rules WHERE tenant_id = $1 AND rule_id = $2",
            &[&tenant, &id],
        )
        .await?;
    Ok(n > 0)
}

/// Resolves the open alerts of the tenant's rule `rule_id`, with no resolving window.
pub async fn close_alerts_of(c: &Client, tenant: &str, rule_id: i64) -> Result<(), Error> {
    c.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at = now()
         WHERE tenant_id = $1 AND rule_id = $2 AND state = 'firing'",
        &[&tenant, &rule_id],
    )
    .await?;
    Ok(())
}

/// Which of a tenant's alerts, newest window first.
#[derive(Debug, Clone, Copy)]
pub struct AlertQuery<'a> {
    /// The token's tenant.
    pub tenant: &'a str,
    /// Only firing or only resolved ones; both when `None`.
    pub state: Option<AlertState>,
    /// Only backfill or only live ones; both when `None`.
    pub backfill: Option<bool>,
    /// Window ends from this time (µs), inclusive.
    pub from_us: i64,
    /// Window ends to this time (µs), exclusive.
    pub to_us: i64,
    /// Rows at most.
    pub limit: i64,
}

/// One alert as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    /// Its id.
    pub alert_id: i64,
    /// The rule that raised it.
    pub rule_id: i64,
    /// The device.
    pub device_id: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// The rule's severity.
    pub severity: String,
    /// The value that fired it.
    pub value: Option<f64>,
    /// The rule's threshold then.
    pub threshold: Option<f64>,
    /// The firing window's start (µs).
    pub window_start_us: Option<i64>,
    /// The firing window's end (µs).
    pub window_end_us: Option<i64>,
    /// Raised while replaying a backlog.
    pub backfill: bool,
    /// When it was stored (µs).
    pub created_at_us: Option<i64>,
    /// The value that resolved it.
    pub resolved_value: Option<f64>,
    /// The resolving window's end (µs).
    pub resolved_window_end_us: Option<i64>,
    /// When it was resolved (µs).
    pub resolved_at_us: Option<i64>,
}

/// The alerts `q` asks for, by window end, newest first.
pub async fn alerts(c: &Client, q: &AlertQuery<'_>) -> Result<Vec<AlertRow>, Error> {
    let state = q.state.map(|s| match s {
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    });
    let rows = c
        .query(
            "SELECT alert_id, rule_id, device_id, state, severity, value, threshold, window_start,
                    window_end, backfill, created_at, resolved_value, resolved_window_end, resolved_at
             FROM alerts
             WHERE tenant_id = $1 AND ($2::text IS NULL OR state = $2) AND ($3::bool IS NULL OR backfill = $3)
               AND window_end >= $4 AND window_end < $5
             ORDER BY window_end DESC, alert_id DESC LIMIT $6",
            &[
                &q.tenant,
                &state,
                &q.backfill,
                &system_time(q.from_us),
                &system_time(q.to_us),
                &q.limit,
            ],
        )
        .await?;
    let t = |v: Option<SystemTime>| v.map(micros);
    rows.iter()
        .map(|r| {
            Ok(AlertRow {
                alert_id: r.try_get(0)?,
                rule_id: r.try_get(1)?,
                device_id: r.try_get(2)?,
                state: r.try_get(3)?,
                severity: r.try_get(4)?,
                value: r.try_get(5)?,
                threshold: r.try_get(6)?,
                window_start_us: t(r.try_get(7)?),
                window_end_us: t(r.try_get(8)?),
                backfill: r.try_get(9)?,
                created_at_us: t(r.try_get(10)?),
                resolved_value: r.try_get(11)?,
                resolved_window_end_us: t(r.try_get(12)?),
                resolved_at_us: t(r.try_get(13)?),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_where_clause_leads_with_the_tenant() {
        let src = include_str!("queries.rs");
        let code = &src[..src.find("#[cfg(test)]").unwrap()];
        let wheres: Vec<&str> = code.split("WHERE ").skip(1).collect();
        assert!(wheres.len() >= 13, "found {} WHERE clauses", wheres.len());
        for w in wheres {
            assert!(w.starts_with("tenant_id = $1 "), "WHERE {}", &w[..40]);
        }
    }

    #[test]
    fn rollup_aggregates_read_only_rollup_columns() {
        for agg in Agg::ALL {
            assert!(agg.expr(None).contains("value") || agg == Agg::Count);
            for r in [Rollup::Hour, Rollup::Day] {
                assert!(!agg.expr(Some(r)).contains("value"), "{agg:?} on {r:?}");
            }
        }
    }

    #[test]
    fn micros_round_trips_before_and_after_the_epoch() {
        for us in [-86_400_000_001, -1, 0, 1, 1_764_000_000_123_456] {
            assert_eq!(micros(system_time(us)), us);
        }
    }
}
