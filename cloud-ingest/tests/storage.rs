//! Storage against a real server, on both flavours (TimescaleDB on a private cluster, skipped
//! loudly where its files are not installed): readings written through the sink (merged
//! flushes, two writers) roll up into `downsampled_metrics_1h` and `_1d` exactly as a SQL
//! `GROUP BY` over raw says, also after late and replayed readings; `devices.last_seen_at`
//! follows the newest reading. On plain PostgreSQL, only the touched buckets are marked, and
//! retention drops old raw partitions and keeps the rollups (TimescaleDB's retention policy is
//! run in `tests/timescale.rs`).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::sync::Arc;

use cloud_ingest::config::{Postgres, Timescale};
use cloud_ingest::postgres::{self, Flavor, maintain};
use cloud_ingest::sink::{Batch, Sink};
use common::timescale::Backend;
use plantlink_model::{Reading, Timestamp};

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;

/// A small deterministic generator (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `n` random readings of 6 devices x 3 metrics, spread over `days` days from `start_us`.
fn random(rng: &mut Rng, n: usize, start_us: i64, days: i64) -> Vec<Reading> {
    (0..n)
        .map(|_| {
            let ts = start_us + rng.below((days * DAY_US) as u64) as i64;
            let value = (rng.below(2_000_001) as f64 - 1_000_000.0) / 1000.0;
            Reading::new(
                "ignored",
                format!("dev-{}", rng.below(6)),
                ["temperature", "pressure", "flow"][rng.below(3) as usize],
                Timestamp(ts),
                value,
            )
        })
        .collect()
}

async fn submit_all(sink: &Sink, readings: &[Reading], chunk: usize) {
    let mut waits = Vec::new();
    for c in readings.chunks(chunk) {
        let b = Batch {
            tenant: Arc::from("acme"),
            gateway: Arc::from("gw-s"),
            readings: c.to_vec(),
        };
        waits.push(sink.submit(b).await);
    }
    for w in waits {
        w.await.unwrap().unwrap();
    }
}

/// Rows where a rollup and the `GROUP BY` over raw disagree (or one side is missing).
async fn mismatches(pgc: &tokio_postgres::Client, table: &str, unit: &str) -> Vec<String> {
    let sql = format!(
        "WITH truth AS (
             SELECT tenant_id, device_id, metric_name, date_trunc('{unit}', ts) AS bucket,
                    min(value) AS min_val, max(value) AS max_val, avg(value) AS avg_val,
                    count(*) AS count
             FROM raw_metrics GROUP BY 1, 2, 3, 4)
         SELECT coalesce(t.device_id, r.device_id) || ' ' || coalesce(t.metric_name, r.metric_name)
                || ' ' || coalesce(t.bucket, r.bucket)::text
                || ' truth ' || coalesce(t.count::text, '-') || ' rollup ' || coalesce(r.count::text, '-')
         FROM truth t FULL JOIN {table} r
           ON t.tenant_id = r.tenant_id AND t.device_id = r.device_id
          AND t.metric_name = r.metric_name AND t.bucket = r.bucket
         WHERE t.device_id IS NULL OR r.device_id IS NULL
            OR t.min_val <> r.min_val OR t.max_val <> r.max_val OR t.count <> r.count
            OR abs(t.avg_val - r.avg_val) > 1e-9 * greatest(1, abs(t.avg_val))
            OR abs(r.sum_val / r.count - r.avg_val) > 1e-9 * greatest(1, abs(r.avg_val))
         LIMIT 10"
    );
    pgc.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn count(pgc: &tokio_postgres::Client, sql: &str) -> i64 {
    pgc.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_match_group_by_and_retention_keeps_them() {
    for b in Backend::all("storage") {
        eprintln!("storage on {}", b.name());
        rollups_and_retention_on(&b).await;
    }
}

/// The upkeep's rollup step; on plain PostgreSQL, how many hourly buckets it re-rolled.
async fn roll(b: &Backend, c: &tokio_postgres::Client) -> Option<u64> {
    match b {
        Backend::Plain => Some(maintain::roll(c).await.unwrap()),
        Backend::Timescale(_) => {
            b.roll(c, 36_500).await;
            None
        }
    }
}

async fn rollups_and_retention_on(b: &Backend) {
    let db = format!("plantlink_test_storage_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    let mut cfg = b.config(&url);
    cfg.flush_max_readings = 3_000;
    // The test rolls up itself; the upkeep task only runs its last round when the sink goes.
    cfg.rollup_interval_ms = 3_600_000;
    let roller = postgres::connect(&url).await.unwrap();
    let plain = matches!(b, Backend::Plain);

    // `timescaledb = "on"` names what is missing instead of falling back.
    let mut on = cfg.clone();
    on.timescaledb = Timescale::On;
    let available: bool = pgc
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if plain && !available {
        let err = postgres::migrate(&roller, &on)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("timescaledb") && err.contains("already exists as plain partitions"),
            "{err}"
        );
    }

    let mut tasks = tokio::task::JoinSet::new();
    let sink = Sink::start(cfg.clone(), b.flavor(), &mut tasks);

    // Three days of random readings, ending an hour ago.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let start = now_us - 3 * DAY_US - HOUR_US;
    let mut rng = Rng(42);
    let first = random(&mut rng, 20_000, start, 3);
    submit_all(&sink, &first, 1_000).await;
    let rolled = roll(b, &roller).await;
    assert!(rolled.is_none_or(|n| n > 0));
    let stored = count(&pgc, "SELECT count(*) FROM raw_metrics").await;
    assert!(stored > 19_000, "{stored}"); // random timestamps may collide
    assert_eq!(
        mismatches(&pgc, "downsampled_metrics_1h", "hour").await,
        Vec::<String>::new()
    );
    assert_eq!(
        mismatches(&pgc, "downsampled_metrics_1d", "day").await,
        Vec::<String>::new()
    );
    // Nothing left to roll: rolling again touches nothing.
    if plain {
        assert_eq!(roll(b, &roller).await, Some(0));
        assert_eq!(count(&pgc, "SELECT count(*) FROM rollup_dirty").await, 0);
    }

    // Many series in one hour (as live ingest makes), in two rounds: the second merges what
    // its readings add into the hourly buckets the first made.
    let hour = (now_us - 2 * HOUR_US) / HOUR_US * HOUR_US;
    let dense: Vec<Reading> = (0..300 * 20)
        .map(|i| {
            Reading::new(
                "x",
                format!("line-{}", i % 300),
                "speed",
                Timestamp(hour + (i / 300) as i64 * 60_000_000 + i as i64),
                (rng.below(1000) as f64) / 8.0,
            )
        })
        .collect();
    let (early, later) = dense.split_at(300 * 8);
    submit_all(&sink, early, 2_000).await;
    assert!(roll(b, &roller).await.is_none_or(|n| n == 300));
    submit_all(&sink, later, 2_000).await;
    assert!(roll(b, &roller).await.is_none_or(|n| n == 300));
    assert_eq!(
        mismatches(&pgc, "downsampled_metrics_1h", "hour").await,
        Vec::<String>::new()
    );
    if plain {
        // Buckets marked to recompute from raw (as an upgrade marks every hour), over wrong
        // figures: the one-scan path replaces them.
        pgc.batch_execute(
            "UPDATE downsampled_metrics_1h SET sum_val = 0, count = count + 1, max_val = -1
             WHERE metric_name = 'speed';
             INSERT INTO rollup_dirty (tenant_id, device_id, metric_name, bucket)
             SELECT tenant_id, device_id, metric_name, bucket FROM downsampled_metrics_1h
             WHERE metric_name = 'speed'",
        )
        .await
        .unwrap();
        assert!(
            !mismatches(&pgc, "downsampled_metrics_1h", "hour")
                .await
                .is_empty()
        );
        assert_eq!(roll(b, &roller).await, Some(300));
    }
    assert_eq!(
        mismatches(&pgc, "downsampled_metrics_1h", "hour").await,
        Vec::<String>::new()
    );
    assert_eq!(
        mismatches(&pgc, "downsampled_metrics_1d", "day").await,
        Vec::<String>::new()
    );

    // Late readings into old hours, and a replay of a slice of the first ones.
    let late = random(&mut rng, 2_000, start, 1);
    let mut again = late.clone();
    again.extend_from_slice(&first[5_000..8_000]);
    submit_all(&sink, &again, 700).await;
    if plain {
        let dirty = count(&pgc, "SELECT count(*) FROM rollup_dirty").await;
        assert!(dirty > 0);
        // Only the buckets the new readings touched were marked: the replay marks nothing.
        let touched = count(
            &pgc,
            "SELECT count(*) FROM (SELECT DISTINCT device_id, metric_name, date_trunc('hour', ts)
             FROM raw_metrics WHERE ts < (SELECT min(ts) FROM raw_metrics) + interval '1 day') s",
        )
        .await;
        assert!(
            dirty <= touched,
            "{dirty} dirty of {touched} buckets in the late day"
        );
        assert_eq!(roll(b, &roller).await, Some(dirty as u64));
    } else {
        roll(b, &roller).await;
    }
    assert_eq!(
        mismatches(&pgc, "downsampled_metrics_1h", "hour").await,
        Vec::<String>::new()
    );
    assert_eq!(
        mismatches(&pgc, "downsampled_metrics_1d", "day").await,
        Vec::<String>::new()
    );

    // devices.last_seen_at: written by the upkeep task (here, its last round when the sink
    // goes), with the newest reading time of each device.
    drop(sink);
    while tasks.join_next().await.is_some() {}
    let seen = count(
        &pgc,
        "SELECT count(*) FROM devices d WHERE tenant_id = 'acme' AND last_seen_at =
         (SELECT max(ts) FROM raw_metrics r WHERE r.device_id = d.device_id)",
    )
    .await;
    assert_eq!(seen, 6 + 300);

    if !plain {
        // TimescaleDB's retention is its policy job: tests/timescale.rs runs it.
        drop((pgc, roller));
        admin
            .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await
            .unwrap();
        return;
    }
    // Retention, as seen ten days from now: the raw partitions of these days go, the rollups
    // stay, and partitions for the days ahead are made.
    let hourly_before = count(&pgc, "SELECT count(*) FROM downsampled_metrics_1h").await;
    let daily_before = count(&pgc, "SELECT count(*) FROM downsampled_metrics_1d").await;
    let today = maintain::day_of(now_us);
    let up = maintain::partitions_at(&pgc, &cfg, today + 10)
        .await
        .unwrap();
    assert!(
        up.dropped
            .contains(&maintain::partition_name(maintain::day_of(start)).unwrap()),
        "{up:?}"
    );
    assert!(
        up.created
            .contains(&maintain::partition_name(today + 13).unwrap())
    );
    assert_eq!(count(&pgc, "SELECT count(*) FROM raw_metrics").await, 0);
    assert_eq!(
        count(&pgc, "SELECT count(*) FROM downsampled_metrics_1h").await,
        hourly_before
    );
    assert_eq!(
        count(&pgc, "SELECT count(*) FROM downsampled_metrics_1d").await,
        daily_before
    );
    // Rollups go when they pass their own retention: 800 days on, the hourly ones are gone
    // (730 days) and the daily ones stay (3650).
    maintain::partitions_at(&pgc, &cfg, today + 800)
        .await
        .unwrap();
    assert_eq!(
        count(&pgc, "SELECT count(*) FROM downsampled_metrics_1h").await,
        0
    );
    assert_eq!(
        count(&pgc, "SELECT count(*) FROM downsampled_metrics_1d").await,
        daily_before
    );

    drop((pgc, roller));
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// `timescaledb = "on"` on a server without the extension fails, naming it and the fix;
/// `"off"` and `"auto"` give plain partitions.
#[tokio::test]
async fn timescaledb_on_without_the_extension_fails_clearly() {
    let db = format!("plantlink_test_tsdb_{}", std::process::id());
    let admin = common::pg(&common::admin_dsn(), &db).await;
    let url = format!(
        "{} dbname={db}",
        common::admin_dsn().replace("dbname=postgres", "")
    );
    let c = postgres::connect(&url).await.unwrap();
    let available: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut cfg = Postgres::with_url(&url);
    if !available {
        cfg.timescaledb = Timescale::On;
        let err = postgres::migrate(&c, &cfg).await.unwrap_err().to_string();
        assert!(
            err.contains("postgres.timescaledb = \"on\"")
                && err.contains("pg_available_extensions"),
            "{err}"
        );
        // Nothing was created.
        let tables: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(tables, 0);
        cfg.timescaledb = Timescale::Auto;
        assert_eq!(postgres::migrate(&c, &cfg).await.unwrap(), Flavor::Plain);
    } else if !common::timescale::preloaded(&c).await {
        // Installed but not preloaded, as right after `apt install`: CREATE EXTENSION would
        // end the session. "on" says what to change; "auto" takes plain PostgreSQL.
        cfg.timescaledb = Timescale::On;
        let err = postgres::migrate(&c, &cfg).await.unwrap_err().to_string();
        assert!(
            err.contains("shared_preload_libraries") && err.contains("restart"),
            "{err}"
        );
        cfg.timescaledb = Timescale::Auto;
        assert_eq!(postgres::migrate(&c, &cfg).await.unwrap(), Flavor::Plain);
        assert!(!c.is_closed(), "the session survives");
    }
    drop(c);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
