//! Rollups that are right at every moment on TimescaleDB, and one rule for data older than
//! the raw retention on both flavours.
//!
//! The continuous aggregates are real-time: what is newer than their materialization is
//! computed from raw at query time, so the newest readings show at once. What arrives for an
//! hour that is already materialized (late readings, a gateway's backlog after days of
//! outage) is only seen once that hour is refreshed, and TimescaleDB's refresh policy covers
//! a fixed window (and runs only if its scheduler does). So every write marks the hours it
//! touched in `rollup_dirty`, as on plain PostgreSQL, and [`refresh`] refreshes exactly
//! those:
//!
//! 1. **Take**: in one transaction, the marks of complete hours are moved to
//!    `rollup_pending` as (hour) and (day) ranges. Marks that a writer still holds locked
//!    are skipped (`SKIP LOCKED`) and taken next round, so no write's rows can be missed.
//! 2. **Refresh** the pending hours, then the pending days that are complete, each run of
//!    consecutive buckets in one `refresh_continuous_aggregate` call, and delete them from
//!    `rollup_pending`. A crash in between leaves them pending; refreshing is idempotent.
//!
//! Only complete buckets are refreshed: a refresh moves the aggregate's materialization
//! watermark to the end of the range, and what lies above the watermark is what real-time
//! aggregation computes from raw; refreshing the current hour would hide the readings that
//! arrive in it after the refresh.
//!
//! **Data older than the raw retention.** TimescaleDB documents that refreshing a bucket
//! whose raw chunks retention dropped empties it; on plain PostgreSQL re-rolling such an
//! hour would replace it with whatever few late rows arrived. So on both flavours a mark for
//! a bucket that starts before the first day the raw retention keeps is dropped without
//! touching the rollup, counted in `plantlink_cloud_rollup_marks_skipped_total` and logged:
//! the rollup keeps what it had.

use std::time::SystemTime;

use time::OffsetDateTime;
use tokio_postgres::{Client, Error};

const DAY_US: i64 = 86_400_000_000;
const HOUR_US: i64 = 3_600_000_000;

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// Hourly buckets refreshed.
    pub hours: u64,
    /// Daily buckets refreshed.
    pub days: u64,
    /// Marks dropped because their bucket is older than the raw retention.
    pub skipped: u64,
}

/// The first instant whose raw data the retention keeps: the start of the UTC day
/// `raw_days` before today (plain PostgreSQL drops whole days older than that; TimescaleDB
/// drops daily chunks whose end is older than `now - raw_days`).
pub fn raw_kept_from(now_us: i64, raw_days: u32) -> SystemTime {
    super::system_time((now_us.div_euclid(DAY_US) - i64::from(raw_days)) * DAY_US)
}

fn now_us() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// The start of the current UTC day, in µs.
pub fn today_start_us() -> i64 {
    now_us().div_euclid(DAY_US) * DAY_US
}

/// Drops the marks of buckets older than the raw retention; returns how many.
pub async fn skip_past_retention(client: &Client, raw_days: u32) -> Result<u64, Error> {
    let cutoff = raw_kept_from(now_us(), raw_days);
    let n = client
        .execute("DELETE FROM rollup_dirty WHERE bucket < $1", &[&cutoff])
        .await?;
    if n > 0 {
        metrics::counter!("plantlink_cloud_rollup_marks_skipped_total").increment(n);
        tracing::warn!(
            marks = n,
            "readings older than the raw retention were stored, but their rollups are left as \
             they were: the raw data they would be recomputed from is gone"
        );
    }
    Ok(n)
}

const TAKE: &str = "
WITH taken AS (
    DELETE FROM rollup_dirty d
    USING (SELECT tenant_id, device_id, metric_name, bucket FROM rollup_dirty
           WHERE bucket < date_trunc('hour', now())
           FOR UPDATE SKIP LOCKED) k
    WHERE d.tenant_id = k.tenant_id AND d.device_id = k.device_id
      AND d.metric_name = k.metric_name AND d.bucket = k.bucket
    RETURNING d.bucket
), hours AS (
    INSERT INTO rollup_pending (kind, bucket)
    SELECT DISTINCT 'hour', bucket FROM taken
    ON CONFLICT DO NOTHING
)
INSERT INTO rollup_pending (kind, bucket)
SELECT DISTINCT 'day', date_trunc('day', bucket) FROM taken
ON CONFLICT DO NOTHING";

/// Runs of consecutive buckets `step_us` apart, as [start, end) in µs.
pub fn runs(buckets: &[i64], step_us: i64) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &b in buckets {
        match out.last_mut() {
            Some((_, end)) if *end == b => *end = b + step_us,
            _ => out.push((b, b + step_us)),
        }
    }
    out
}

async fn pending(client: &Client, kind: &str, before: SystemTime) -> Result<Vec<i64>, Error> {
    Ok(client
        .query(
            "SELECT bucket FROM rollup_pending WHERE kind = $1 AND bucket < $2 ORDER BY bucket",
            &[&kind, &before],
        )
        .await?
        .iter()
        .map(|r| super::micros(r.get(0)))
        .collect())
}

async fn refresh_runs(
    client: &Client,
    view: &str,
    kind: &str,
    buckets: &[i64],
    step_us: i64,
) -> Result<u64, Error> {
    for (from, to) in runs(buckets, step_us) {
        refresh_range(client, view, Some(from), Some(to), false).await?;
        let (from, to) = (super::system_time(from), super::system_time(to));
        client
            .execute(
                "DELETE FROM rollup_pending WHERE kind = $1 AND bucket >= $2 AND bucket < $3",
                &[&kind, &from, &to],
            )
            .await?;
    }
    Ok(buckets.len() as u64)
}

/// Refreshes the continuous aggregate `view` over [from, to) in µs (`None`: unbounded on that
/// side), recomputing even what TimescaleDB holds as valid with `force`.
///
/// The refresh's INSERT is planned from an estimate of a few thousand rows for the window
/// (TimescaleDB 2.28 cannot estimate its `time_bucket` filter), so PostgreSQL sorts the raw
/// rows for a GroupAggregate: a million rows of an hour spilled 53 MB to disk and the sort
/// took 2.2 s of a 2.6 s refresh, where a HashAggregate needs under 1 MB and takes 0.6 s. So
/// sorting is disabled in the session for the call (a plan that needs order still gets it).
pub async fn refresh_range(
    client: &Client,
    view: &str,
    from: Option<i64>,
    to: Option<i64>,
    force: bool,
) -> Result<(), Error> {
    let bound = |us: Option<i64>| match us {
        Some(us) => format!("'{}'::timestamptz", crate::kafka::rfc3339(us)),
        None => "NULL".to_owned(),
    };
    // refresh_continuous_aggregate refuses to run inside a transaction block: one simple
    // query of one statement is its own. The literals are timestamps formatted here.
    // `force` exists since TimescaleDB 2.18; it is named only when wanted, so that earlier
    // releases (the compose file's 2.17) take the call.
    let call = format!(
        "CALL refresh_continuous_aggregate('{view}', {}, {}{})",
        bound(from),
        bound(to),
        if force { ", force => true" } else { "" },
    );
    client.batch_execute("SET enable_sort = off").await?;
    let done = client.batch_execute(&call).await;
    let reset = client.batch_execute("RESET enable_sort").await;
    done.and(reset)
}

/// One round on TimescaleDB: skip marks past the raw retention, take the marks of complete
/// hours, refresh the pending hours and the pending complete days.
pub async fn refresh(client: &Client, raw_days: u32) -> Result<Refreshed, Error> {
    let skipped = skip_past_retention(client, raw_days).await?;
    let now = now_us();
    let kept_from = raw_kept_from(now, raw_days);
    client
        .execute(
            "DELETE FROM rollup_pending WHERE bucket < $1",
            &[&kept_from],
        )
        .await?;
    client
        .batch_execute(&format!("BEGIN; {TAKE}; COMMIT"))
        .await?;
    let hour_start = super::system_time(now.div_euclid(HOUR_US) * HOUR_US);
    let day_start = super::system_time(now.div_euclid(DAY_US) * DAY_US);
    let hours = pending(client, "hour", hour_start).await?;
    let hours = refresh_runs(client, "downsampled_metrics_1h", "hour", &hours, HOUR_US).await?;
    let days = pending(client, "day", day_start).await?;
    let days = refresh_runs(client, "downsampled_metrics_1d", "day", &days, DAY_US).await?;
    Ok(Refreshed {
        hours,
        days,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_buckets_make_one_run() {
        let h = HOUR_US;
        assert_eq!(runs(&[], h), vec![]);
        assert_eq!(
            runs(&[0, h, 2 * h, 5 * h], h),
            vec![(0, 3 * h), (5 * h, 6 * h)]
        );
    }

    #[test]
    fn the_retention_keeps_whole_days() {
        let now = 20 * DAY_US + 5 * HOUR_US;
        assert_eq!(super::super::micros(raw_kept_from(now, 7)), 13 * DAY_US);
    }
}
