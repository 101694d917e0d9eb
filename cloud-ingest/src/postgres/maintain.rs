//! Upkeep on plain PostgreSQL: daily partitions of `raw_metrics` (created ahead, created on
//! demand for late or early readings within a bound around today, dropped past retention), rollups re-rolled from the
//! buckets that new readings touched (per tenant), and rollup retention. On TimescaleDB its
//! policies do all of this and these functions are not called, except [`last_seen`] and
//! [`expire_conflicts`], which both flavours use.

use std::collections::BTreeSet;
use std::sync::Mutex;

use time::{Date, OffsetDateTime};
use tokio_postgres::{Client, Error};

use crate::config::Postgres;

const DAY_US: i64 = 86_400_000_000;
/// Serialises partition creation and dropping between writers and replicas.
const PARTITION_LOCK: i64 = 0x706c_7061_7274_6e73; // "plpartns"
/// Serialises the roll-ups' daily steps between replicas, until each commits: a day rebuilt
/// from its hours then reads them after another replica's merge into them has committed
/// (no lost update), and the daily rows are only ever locked by the holder (no deadlock).
const DAILY_LOCK: i64 = 0x706c_6461_696c_7931; // "pldaily1"

/// The UTC day number (days since 1970-01-01) of a µs timestamp.
pub fn day_of(ts_us: i64) -> i64 {
    ts_us.div_euclid(DAY_US)
}

fn date_of(day: i64) -> Option<Date> {
    // 2440588 is the Julian day number of 1970-01-01.
    let jd = i32::try_from(day.checked_add(2_440_588)?).ok()?;
    Date::from_julian_day(jd).ok()
}

/// The partition holding `day`, e.g. `raw_metrics_p20261121`; `None` outside years 1-9999.
pub fn partition_name(day: i64) -> Option<String> {
    let d = date_of(day)?;
    (1..=9999).contains(&d.year()).then(|| {
        format!(
            "raw_metrics_p{:04}{:02}{:02}",
            d.year(),
            u8::from(d.month()),
            d.day()
        )
    })
}

fn day_of_name(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("raw_metrics_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i32 = digits[..4].parse().ok()?;
    let m: u8 = digits[4..6].parse().ok()?;
    let d: u8 = digits[6..].parse().ok()?;
    let date = Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()?;
    Some(i64::from(date.to_julian_day()) - 2_440_588)
}

/// Whether a µs timestamp can be stored (it falls in a year from 1 to 9999).
pub fn storable(ts_us: i64) -> bool {
    partition_name(day_of(ts_us)).is_some()
}

fn literal(day: i64) -> String {
    let d = date_of(day).unwrap_or(Date::MIN);
    format!(
        "{:04}-{:02}-{:02} 00:00:00+00",
        d.year(),
        u8::from(d.month()),
        d.day()
    )
}

/// The days that have a partition, as far as this process knows, and the days it may create.
#[derive(Debug, Default)]
pub struct Partitions {
    known: Mutex<BTreeSet<i64>>,
    /// Days before and after today that [`Partitions::ensure`] creates; `None`: any day.
    bound: Option<(i64, i64)>,
}

impl Partitions {
    /// Creates partitions only from `past_days` before today to `future_days` after it (UTC
    /// days, counted when [`Partitions::ensure`] runs): a batch spread over many days cannot
    /// ask for a partition per day. cloud-ingest refuses readings outside its event-time
    /// window before they reach the sink, so this is a second line.
    pub fn bounded(past_days: u32, future_days: u32) -> Self {
        Self {
            known: Mutex::default(),
            bound: Some((i64::from(past_days), i64::from(future_days))),
        }
    }

    /// The days [`Partitions::ensure`] creates when today is `today` (a UTC day number).
    pub fn allowed(&self, today: i64) -> std::ops::RangeInclusive<i64> {
        match self.bound {
            Some((past, future)) => today - past..=today + future,
            None => i64::MIN..=i64::MAX,
        }
    }

    fn missing(&self, days: &BTreeSet<i64>) -> Vec<i64> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        days.iter()
            .filter(|d| !known.contains(d))
            .copied()
            .collect()
    }

    /// Makes sure every day in `days` has a partition, creating the missing ones within the
    /// bound; returns the days outside it, for which nothing was done (the caller must not
    /// write their readings: they would find no partition).
    pub async fn ensure(
        &self,
        client: &mut Client,
        days: &BTreeSet<i64>,
    ) -> Result<Vec<i64>, Error> {
        let allowed = self.allowed(today());
        let (missing, outside): (Vec<i64>, Vec<i64>) = self
            .missing(days)
            .into_iter()
            .partition(|d| allowed.contains(d));
        if missing.is_empty() {
            return Ok(outside);
        }
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await?;
        for day in &missing {
            if let Some(name) = partition_name(*day) {
                tx.batch_execute(&create(&name, *day)).await?;
            }
        }
        tx.commit().await?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(missing);
        Ok(outside)
    }

    /// Forgets what it knows, after a write found a partition missing.
    pub fn forget(&self) {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

fn create(name: &str, day: i64) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF raw_metrics \
         FOR VALUES FROM ('{}') TO ('{}')",
        literal(day),
        literal(day + 1)
    )
}

fn today() -> i64 {
    day_of(OffsetDateTime::now_utc().unix_timestamp() * 1_000_000)
}

/// What one round of upkeep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upkeep {
    /// Partitions created ahead.
    pub created: Vec<String>,
    /// Partitions dropped past retention.
    pub dropped: Vec<String>,
    /// Rollup rows deleted past retention.
    pub rollups_deleted: u64,
}

/// Creates the partitions from yesterday to `partitions_ahead_days` ahead, drops the ones
/// wholly older than the raw retention, and deletes rollup rows past theirs.
pub async fn partitions(client: &Client, cfg: &Postgres) -> Result<Upkeep, Error> {
    partitions_at(client, cfg, today()).await
}

/// [`partitions`] as if today were `today` (a UTC day number); for tests.
pub async fn partitions_at(client: &Client, cfg: &Postgres, today: i64) -> Result<Upkeep, Error> {
    let mut up = Upkeep::default();
    client
        .execute("SELECT pg_advisory_lock($1)", &[&PARTITION_LOCK])
        .await?;
    let result = async {
        let existing: BTreeSet<i64> = client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'raw_metrics'::regclass",
                &[],
            )
            .await?
            .iter()
            .filter_map(|r| day_of_name(r.get::<_, &str>(0)))
            .collect();
        for day in today - 1..=today + i64::from(cfg.partitions_ahead_days) {
            if let Some(name) = partition_name(day).filter(|_| !existing.contains(&day)) {
                client.batch_execute(&create(&name, day)).await?;
                up.created.push(name);
            }
        }
        // A partition goes when its whole day is older than the retention.
        let keep_from = today - i64::from(cfg.retention.raw_days);
        for day in existing.range(..keep_from) {
            if let Some(name) = partition_name(*day) {
                client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                    .await?;
                up.dropped.push(name);
            }
        }
        let now_us = today * DAY_US;
        for (table, days) in [
            ("downsampled_metrics_1h", cfg.retention.hourly_days),
            ("downsampled_metrics_1d", cfg.retention.daily_days),
        ] {
            let cutoff = super::system_time(now_us - i64::from(days) * DAY_US);
            up.rollups_deleted += client
                .execute(
                    &format!("DELETE FROM {table} WHERE bucket < $1"),
                    &[&cutoff],
                )
                .await?;
        }
        Ok::<_, Error>(())
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&PARTITION_LOCK])
        .await?;
    result.map(|()| up)
}

/// Keys taken from `rollup_dirty` per transaction.
const ROLL_CHUNK: i64 = 20_000;

const ROLL_KEYS: &str = "CREATE TEMP TABLE IF NOT EXISTS roll_keys (
    tenant_id text, device_id text, metric_name text, bucket timestamptz,
    min_val float8, max_val float8, sum_val float8, count int8) ON COMMIT DELETE ROWS";

/// Takes up to [`ROLL_CHUNK`] dirty keys, oldest hour first (so a chunk covers a narrow
/// time range), and reports how many, and of those to recompute from raw (count NULL) how
/// many and which hours they span.
const TAKE: &str = "
WITH taken AS (
    DELETE FROM rollup_dirty d
    USING (SELECT tenant_id, device_id, metric_name, bucket FROM rollup_dirty
           ORDER BY bucket, tenant_id, device_id, metric_name
           LIMIT $1 FOR UPDATE SKIP LOCKED) k
    WHERE d.tenant_id = k.tenant_id AND d.device_id = k.device_id
      AND d.metric_name = k.metric_name AND d.bucket = k.bucket
    RETURNING d.tenant_id, d.device_id, d.metric_name, d.bucket,
              d.min_val, d.max_val, d.sum_val, d.count
), kept AS (
    INSERT INTO roll_keys SELECT * FROM taken RETURNING bucket, count
)
SELECT count(*), count(*) FILTER (WHERE count IS NULL),
       min(bucket) FILTER (WHERE count IS NULL),
       max(bucket) FILTER (WHERE count IS NULL) + INTERVAL '1 hour',
       count(DISTINCT bucket) FILTER (WHERE count IS NULL)
FROM kept";

/// Adds what the new readings of each delta key add up to (min, max, sum and count are
/// exact to merge) to its hourly bucket, without reading raw: live ingest's cost is one
/// upsert per (device, metric) and hour, however many readings the hour already holds.
const HOURLY_MERGE: &str = "
INSERT INTO downsampled_metrics_1h AS h
    (tenant_id, device_id, metric_name, bucket, min_val, max_val, avg_val, sum_val, count)
SELECT tenant_id, device_id, metric_name, bucket, min_val, max_val, sum_val / count, sum_val,
       count
FROM roll_keys
WHERE count IS NOT NULL
ORDER BY 1, 2, 3, 4
ON CONFLICT (tenant_id, device_id, metric_name, bucket) DO UPDATE SET
    min_val = least(h.min_val, EXCLUDED.min_val),
    max_val = greatest(h.max_val, EXCLUDED.max_val),
    avg_val = (h.sum_val + EXCLUDED.sum_val) / (h.count + EXCLUDED.count),
    sum_val = h.sum_val + EXCLUDED.sum_val,
    count = h.count + EXCLUDED.count";

/// Hourly buckets recomputed from raw (keys marked by an upgrade), for keys that are few per
/// hour: index lookups per key within the chunk's time bounds ($1, $2).
const HOURLY_SPARSE: &str = "
INSERT INTO downsampled_metrics_1h AS h
    (tenant_id, device_id, metric_name, bucket, min_val, max_val, avg_val, sum_val, count)
SELECT r.tenant_id, r.device_id, r.metric_name, date_trunc('hour', r.ts),
       min(r.value), max(r.value), avg(r.value), sum(r.value), count(*)
FROM raw_metrics r
WHERE r.ts >= $1 AND r.ts < $2
  AND (r.tenant_id, r.device_id, r.metric_name, date_trunc('hour', r.ts)) IN
      (SELECT tenant_id, device_id, metric_name, bucket FROM roll_keys WHERE count IS NULL)
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
ON CONFLICT (tenant_id, device_id, metric_name, bucket) DO UPDATE SET
    min_val = EXCLUDED.min_val, max_val = EXCLUDED.max_val,
    avg_val = EXCLUDED.avg_val, sum_val = EXCLUDED.sum_val, count = EXCLUDED.count";

/// The same when most series of the hours are to be recomputed (after an upgrade): one scan
/// of the time range grouped like a hand-written `GROUP BY`, keeping the groups marked.
const HOURLY_DENSE: &str = "
INSERT INTO downsampled_metrics_1h AS h
    (tenant_id, device_id, metric_name, bucket, min_val, max_val, avg_val, sum_val, count)
SELECT a.* FROM (
    SELECT tenant_id, device_id, metric_name, date_trunc('hour', ts) AS bucket,
           min(value), max(value), avg(value), sum(value), count(*)
    FROM raw_metrics
    WHERE ts >= $1 AND ts < $2
    GROUP BY 1, 2, 3, 4) a
WHERE (a.tenant_id, a.device_id, a.metric_name, a.bucket) IN
      (SELECT tenant_id, device_id, metric_name, bucket FROM roll_keys WHERE count IS NULL)
ORDER BY 1, 2, 3, 4
ON CONFLICT (tenant_id, device_id, metric_name, bucket) DO UPDATE SET
    min_val = EXCLUDED.min_val, max_val = EXCLUDED.max_val,
    avg_val = EXCLUDED.avg_val, sum_val = EXCLUDED.sum_val, count = EXCLUDED.count";

/// Dirty keys per dirty hour from which one scan of the range beats lookups per key.
const DENSE_KEYS_PER_HOUR: i64 = 256;

/// Daily buckets of the (device, metric) days whose hours were all merged: what the new
/// readings added, merged like the hourly ones (exact), one upsert per day touched rather
/// than a read of the day's hourly buckets. The roll-up holds the taken keys locked until it
/// commits, and writers that touch them wait, so its transaction is kept short.
const DAILY_MERGE: &str = "
INSERT INTO downsampled_metrics_1d AS d
    (tenant_id, device_id, metric_name, bucket, min_val, max_val, avg_val, sum_val, count)
SELECT tenant_id, device_id, metric_name, date_trunc('day', bucket),
       min(min_val), max(max_val), sum(sum_val) / sum(count), sum(sum_val), sum(count)::bigint
FROM roll_keys
GROUP BY 1, 2, 3, 4
HAVING bool_and(count IS NOT NULL)
ORDER BY 1, 2, 3, 4
ON CONFLICT (tenant_id, device_id, metric_name, bucket) DO UPDATE SET
    min_val = least(d.min_val, EXCLUDED.min_val),
    max_val = greatest(d.max_val, EXCLUDED.max_val),
    avg_val = (d.sum_val + EXCLUDED.sum_val) / (d.count + EXCLUDED.count),
    sum_val = d.sum_val + EXCLUDED.sum_val,
    count = d.count + EXCLUDED.count";

/// Daily buckets of the days with an hour recomputed from raw, from their hourly buckets
/// (exact: `sum_val` and `count` add up).
const DAILY: &str = "
INSERT INTO downsampled_metrics_1d AS d
    (tenant_id, device_id, metric_name, bucket, min_val, max_val, avg_val, sum_val, count)
SELECT h.tenant_id, h.device_id, h.metric_name, k.day,
       min(h.min_val), max(h.max_val), sum(h.sum_val) / sum(h.count), sum(h.sum_val),
       sum(h.count)::bigint
FROM (SELECT tenant_id, device_id, metric_name, date_trunc('day', bucket) AS day
      FROM roll_keys GROUP BY 1, 2, 3, 4 HAVING bool_or(count IS NULL)) k
JOIN downsampled_metrics_1h h ON h.tenant_id = k.tenant_id AND h.device_id = k.device_id
                             AND h.metric_name = k.metric_name
                             AND h.bucket >= k.day AND h.bucket < k.day + INTERVAL '1 day'
GROUP BY h.tenant_id, h.device_id, h.metric_name, k.day
ORDER BY h.tenant_id, h.device_id, h.metric_name, k.day
ON CONFLICT (tenant_id, device_id, metric_name, bucket) DO UPDATE SET
    min_val = EXCLUDED.min_val, max_val = EXCLUDED.max_val,
    avg_val = EXCLUDED.avg_val, sum_val = EXCLUDED.sum_val, count = EXCLUDED.count";

/// Rolls up every bucket that new readings touched until none is left: hourly and daily by
/// merging what the readings added (or, for buckets marked to recompute, hourly from raw and
/// daily from hourly); returns how many hourly buckets it rolled. Each key is taken and merged in one
/// transaction, so it counts once however often this runs, and several replicas can run it
/// at once (each takes different keys).
pub async fn roll(client: &Client) -> Result<u64, Error> {
    client.batch_execute(ROLL_KEYS).await?;
    let mut total = 0;
    loop {
        client.batch_execute("BEGIN").await?;
        let n = match roll_chunk(client).await {
            Ok(n) => n,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        total += n as u64;
        if n < ROLL_CHUNK {
            return Ok(total);
        }
    }
}

/// One chunk of [`roll`], inside its transaction; commits it.
async fn roll_chunk(client: &Client) -> Result<i64, Error> {
    let row = client.query_one(TAKE, &[&ROLL_CHUNK]).await?;
    let n: i64 = row.get(0);
    let recompute: i64 = row.get(1);
    if recompute > 0 {
        let (from, to): (std::time::SystemTime, std::time::SystemTime) = (row.get(2), row.get(3));
        let hours: i64 = row.get(4);
        client.batch_execute("ANALYZE roll_keys").await?;
        let hourly = if recompute >= DENSE_KEYS_PER_HOUR * hours {
            HOURLY_DENSE
        } else {
            HOURLY_SPARSE
        };
        client.execute(hourly, &[&from, &to]).await?;
    }
    if n > recompute {
        client.execute(HOURLY_MERGE, &[]).await?;
    }
    if n > 0 {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&DAILY_LOCK])
            .await?;
    }
    if n > recompute {
        client.execute(DAILY_MERGE, &[]).await?;
    }
    if recompute > 0 {
        client.execute(DAILY, &[]).await?;
    }
    client.batch_execute("COMMIT").await?;
    Ok(n)
}

/// Records the newest reading time of each (tenant, device), in one statement.
pub async fn last_seen(client: &Client, seen: &[(String, String, i64)]) -> Result<(), Error> {
    if seen.is_empty() {
        return Ok(());
    }
    // One row per (tenant, device), newest time first.
    let mut sorted: Vec<&(String, String, i64)> = seen.iter().collect();
    sorted.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)).then(b.2.cmp(&a.2)));
    sorted.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    let tenants: Vec<&str> = sorted.iter().map(|s| s.0.as_str()).collect();
    let devices: Vec<&str> = sorted.iter().map(|s| s.1.as_str()).collect();
    let times: Vec<std::time::SystemTime> =
        sorted.iter().map(|s| super::system_time(s.2)).collect();
    client
        .execute(
            "INSERT INTO devices AS d (tenant_id, device_id, last_seen_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
             ON CONFLICT (tenant_id, device_id) DO UPDATE
             SET last_seen_at = GREATEST(d.last_seen_at, EXCLUDED.last_seen_at)",
            &[&tenants, &devices, &times],
        )
        .await?;
    Ok(())
}

/// Deletes kept conflicts older than the raw retention (the readings they contradict are
/// gone by then); returns how many.
pub async fn expire_conflicts(client: &Client, raw_days: u32) -> Result<u64, Error> {
    let cutoff = super::system_time(
        OffsetDateTime::now_utc().unix_timestamp() * 1_000_000 - i64::from(raw_days) * DAY_US,
    );
    let conflicts = client
        .execute("DELETE FROM reading_conflicts WHERE ts < $1", &[&cutoff])
        .await?;
    let refused = client
        .execute(
            "DELETE FROM refused_readings WHERE refused_at < $1",
            &[&cutoff],
        )
        .await?;
    Ok(conflicts + refused)
}

/// Keeps readings that were left out of their batch in `refused_readings`, with the reason
/// of each; text with NUL characters (which PostgreSQL cannot hold) is kept escaped.
pub async fn keep_refused(
    client: &impl tokio_postgres::GenericClient,
    tenant: &str,
    gateway: &str,
    refused: &[(plantlink_model::Reading, &str)],
) -> Result<u64, Error> {
    let clean = |s: &str| s.replace('\0', "\\0");
    let mut device = Vec::with_capacity(refused.len());
    let mut metric = Vec::with_capacity(refused.len());
    let mut ts = Vec::with_capacity(refused.len());
    let mut value = Vec::with_capacity(refused.len());
    let mut tags: Vec<Option<String>> = Vec::with_capacity(refused.len());
    let mut seq: Vec<Option<i64>> = Vec::with_capacity(refused.len());
    let mut reason = Vec::with_capacity(refused.len());
    for (r, why) in refused {
        device.push(clean(&r.device));
        metric.push(clean(&r.metric));
        ts.push(r.ts.0);
        value.push(r.value);
        tags.push(
            (!r.tags.is_empty())
                .then(|| clean(&serde_json::to_string(&r.tags).unwrap_or_default())),
        );
        seq.push(r.seq.map(|s| s as i64));
        reason.push(*why);
    }
    client
        .execute(
            "INSERT INTO refused_readings
                 (tenant_id, gateway_id, device_id, metric_name, ts_us, value, tags, seq, reason)
             SELECT $1, $2, * FROM unnest($3::text[], $4::text[], $5::int8[], $6::float8[],
                                          $7::text[], $8::int8[], $9::text[])",
            &[
                &clean(tenant),
                &clean(gateway),
                &device,
                &metric,
                &ts,
                &value,
                &tags,
                &seq,
                &reason,
            ],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        let day = day_of(1_795_000_000_000_000); // 2026-11-18
        let name = partition_name(day).unwrap();
        assert_eq!(name, "raw_metrics_p20261118");
        assert_eq!(day_of_name(&name), Some(day));
        assert_eq!(literal(day), "2026-11-18 00:00:00+00");
        assert_eq!(day_of(-1), -1);
        assert_eq!(partition_name(-1).unwrap(), "raw_metrics_p19691231");
        assert!(!storable(i64::MAX));
        assert!(!storable(i64::MIN));
        assert!(storable(0));
        assert_eq!(day_of_name("raw_metrics_p2026111"), None);
        assert_eq!(day_of_name("raw_metrics_default"), None);
    }

    #[test]
    fn a_bounded_set_allows_only_days_around_today() {
        let p = Partitions::bounded(8, 8);
        assert_eq!(p.allowed(20_000), 19_992..=20_008);
        assert!(!p.allowed(20_000).contains(&(20_000 - 100_000)));
        assert_eq!(Partitions::default().allowed(0), i64::MIN..=i64::MAX);
    }
}
