//! TimescaleDB for real, on a private cluster that preloads it (skipped loudly where the
//! extension is not installed):
//!
//! - the rollups answer the newest readings at once (real-time aggregates), and late
//!   readings and a four-day-old backfill once `refresh` has run, equal to a per-tenant
//!   `GROUP BY` over raw at every step;
//! - a reading for an hour whose raw chunk retention dropped leaves that rollup bucket as it
//!   was (a refresh would have emptied it), and the skip is counted;
//! - a failing policy job (every background job fails in the shared build, see
//!   ../shared/timescaledb/README.md) is visible in the sink's job state and in `/readyz`.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::time::{Duration, Instant};

use cloud_ingest::postgres::{self, Flavor, Part, STAGING, refresh};
use common::timescale::{Backend, Cluster};
use plantlink_model::{Reading, Timestamp};

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// `n` readings of two tenants' `pump-1` from `start_us`, `step_us` apart.
fn readings(start_us: i64, n: i64, step_us: i64, value: f64) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            Reading::new(
                "x",
                "pump-1",
                "temperature",
                Timestamp(start_us + i * step_us),
                value + (i % 7) as f64,
            )
        })
        .collect()
}

async fn write(c: &mut tokio_postgres::Client, rs: &[Reading]) {
    let parts = [
        Part {
            tenant: "acme",
            gateway: "gw-a",
            readings: rs,
        },
        Part {
            tenant: "beta",
            gateway: "gw-b",
            readings: rs,
        },
    ];
    postgres::write(c, Flavor::Timescale, &parts).await.unwrap();
}

async fn both(c: &tokio_postgres::Client) -> (i64, i64) {
    (
        common::rollup_mismatches(c, "downsampled_metrics_1h", "hour").await,
        common::rollup_mismatches(c, "downsampled_metrics_1d", "day").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_are_right_at_every_moment_backfill_included() {
    let Some(cluster) = Cluster::start("rollups") else {
        return;
    };
    let b = Backend::Timescale(cluster);
    let db = "plantlink_rollups";
    let _admin = common::pg(&b.admin_dsn(), db).await;
    let url = b.dsn(db);
    let mut c = postgres::connect(&url).await.unwrap();
    let cfg = b.config(&url);
    assert_eq!(
        postgres::migrate(&c, &cfg).await.unwrap(),
        Flavor::Timescale
    );
    c.batch_execute(STAGING).await.unwrap();
    let raw_days = cfg.retention.raw_days;
    let now = now_us();

    // The last six hours, up to now: answered at once, before any refresh.
    write(&mut c, &readings(now - 6 * HOUR_US, 360, 60_000_000, 20.0)).await;
    assert_eq!(
        both(&c).await,
        (0, 0),
        "real-time aggregates answer the newest data"
    );
    let r = refresh::refresh(&c, raw_days).await.unwrap();
    assert!(r.hours >= 6 && r.skipped == 0, "{r:?}");
    assert_eq!(both(&c).await, (0, 0));

    // Late readings for an hour that is materialized now: seen once refreshed.
    let late_hour = (now - 3 * HOUR_US).div_euclid(HOUR_US) * HOUR_US;
    write(&mut c, &readings(late_hour + 1_000, 10, 1_000, 500.0)).await;
    assert!(
        both(&c).await.0 > 0,
        "below the watermark a late reading needs its refresh"
    );
    refresh::refresh(&c, raw_days).await.unwrap();
    assert_eq!(both(&c).await, (0, 0));

    // A gateway back after four days: outside the refresh policy's 3-day window.
    write(&mut c, &readings(now - 4 * DAY_US, 120, 60_000_000, -5.0)).await;
    let r = refresh::refresh(&c, raw_days).await.unwrap();
    assert!(r.hours >= 2 && r.days >= 1, "{r:?}");
    assert_eq!(both(&c).await, (0, 0), "four-day-old backfill is rolled up");

    // New readings in the current hour after all that: still at once.
    write(&mut c, &readings(now + 1_000, 5, 1_000, 77.0)).await;
    assert_eq!(both(&c).await, (0, 0));

    // Retention drops a chunk; a reading for an hour in it must not empty that bucket.
    let old_hour = (now - 6 * DAY_US).div_euclid(HOUR_US) * HOUR_US;
    write(&mut c, &readings(old_hour, 30, 60_000_000, 1.0)).await;
    refresh::refresh(&c, 36_500).await.unwrap();
    let bucket_count = async |c: &tokio_postgres::Client| -> i64 {
        c.query_one(
            "SELECT coalesce(sum(count), 0)::bigint FROM downsampled_metrics_1h WHERE bucket = $1",
            &[&postgres::system_time(old_hour)],
        )
        .await
        .unwrap()
        .get(0)
    };
    assert_eq!(bucket_count(&c).await, 60);
    c.batch_execute(&format!(
        "SELECT drop_chunks('raw_metrics', older_than => '{}'::timestamptz)",
        cloud_ingest::kafka::rfc3339((now - 5 * DAY_US).div_euclid(DAY_US) * DAY_US)
    ))
    .await
    .unwrap();
    write(&mut c, &readings(old_hour + 30_000, 1, 1, 9.0)).await;
    let r = refresh::refresh(&c, 4).await.unwrap();
    assert!(r.skipped >= 1, "{r:?}");
    assert_eq!(bucket_count(&c).await, 60, "the rollup keeps what it had");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_policy_jobs_are_visible() {
    let Some(cluster) = Cluster::start_with_scheduler("jobs") else {
        return;
    };
    let b = Backend::Timescale(cluster);
    let db = "plantlink_jobs";
    let _admin = common::pg(&b.admin_dsn(), db).await;
    let url = b.dsn(db);
    let c = postgres::connect(&url).await.unwrap();
    let mut cfg = b.config(&url);
    cfg.rollup_interval_ms = 100;
    assert_eq!(
        postgres::migrate(&c, &cfg).await.unwrap(),
        Flavor::Timescale
    );
    let mut tasks = tokio::task::JoinSet::new();
    let sink = cloud_ingest::sink::Sink::start(cfg, Flavor::Timescale, &mut tasks);
    // The scheduler runs the new policies at once; in this build each run fails. A healthy
    // TimescaleDB never fails here: then there is nothing to show and the test says so.
    let start = Instant::now();
    let failing = loop {
        let jobs = postgres::jobs::read(&c).await.unwrap();
        if let Some(j) = jobs.into_iter().find(|j| j.failing()) {
            break Some(j);
        }
        if start.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let Some(failing) = failing else {
        eprintln!("no policy job failed within 60 s: this TimescaleDB's scheduler is healthy");
        return;
    };
    assert!(failing.job.starts_with("policy_"), "{failing:?}");
    assert!(failing.total_failures >= 1);
    assert!(
        failing.last_error.is_some(),
        "TimescaleDB's error text is kept: {failing:?}"
    );
    // The sink's upkeep picks it up for /readyz and the pipeline status.
    let start = Instant::now();
    while !sink.timescale_jobs().iter().any(|j| j.failing()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the upkeep never read the jobs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let app = cloud_ingest::api::App::new(
        &url,
        &Default::default(),
        Default::default(),
        None,
        Some(sink.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app.router()).await });
    let body = tokio::task::spawn_blocking(move || common::http_get(addr, "/readyz", None))
        .await
        .unwrap()
        .unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(body.contains("failing_timescaledb_jobs"), "{body}");
    server.abort();
    drop(sink);
    while tasks.join_next().await.is_some() {}
}

/// The id of the policy job `proc` (`policy_compression`, `policy_retention`) on `table`.
async fn job(c: &tokio_postgres::Client, proc: &str, table: &str) -> i32 {
    c.query_one(
        "SELECT job_id FROM timescaledb_information.jobs j
         LEFT JOIN timescaledb_information.continuous_aggregates ca
                ON ca.materialization_hypertable_name = j.hypertable_name
         WHERE j.proc_name = $1 AND coalesce(ca.view_name, j.hypertable_name) = $2",
        &[&proc, &table],
    )
    .await
    .unwrap()
    .get(0)
}

async fn int(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// The policies as `migrate` made them, run with `CALL run_job(...)` (this build's scheduler
/// cannot run them): compression compresses the chunks past `compress_after_days`; backfill,
/// replays and conflicting values written into those compressed chunks stay exactly once
/// (the first value kept); retention drops raw chunks past `raw_days` and keeps every rollup
/// row of them; the rollups' own retention policies keep what is younger than theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_compress_and_drop_raw_and_keep_the_rollups() {
    let Some(cluster) = Cluster::start("policies") else {
        return;
    };
    let b = Backend::Timescale(cluster);
    let (_admin, url, mut c) = b.database("plantlink_policies").await;
    c.batch_execute(STAGING).await.unwrap();
    let cfg = b.config(&url);
    let raw_days = i64::from(cfg.retention.raw_days);
    assert!(cfg.compress_after_days < cfg.retention.raw_days);
    let now = now_us();
    let today = now.div_euclid(DAY_US) * DAY_US;
    // Two old days past the raw retention, and one inside it but past compress_after_days.
    let gone = today - (raw_days + 3) * DAY_US;
    let kept = today - i64::from(cfg.compress_after_days + 2) * DAY_US;
    for start in [gone, gone + DAY_US, kept] {
        write(&mut c, &readings(start + HOUR_US, 120, 60_000_000, 10.0)).await;
    }
    // Rolled up while their raw rows exist (as when they arrived).
    refresh::refresh(&c, 36_500).await.unwrap();
    assert_eq!(both(&c).await, (0, 0));

    let compression = job(&c, "policy_compression", "raw_metrics").await;
    c.batch_execute(&format!("CALL run_job({compression})"))
        .await
        .unwrap();
    let compressed = int(
        &c,
        "SELECT count(*) FROM timescaledb_information.chunks
         WHERE hypertable_name = 'raw_metrics' AND is_compressed",
    )
    .await;
    assert_eq!(compressed, 3, "the three old days' chunks are compressed");

    // Into the compressed chunk of `kept`: 30 new readings (backfill), a replay of all of
    // them and of the original 120, and 10 of the original identities with other values.
    let backfill = readings(kept + 5 * HOUR_US, 30, 60_000_000, 50.0);
    let mut again = readings(kept + HOUR_US, 120, 60_000_000, 10.0);
    again.extend_from_slice(&backfill);
    let clash: Vec<Reading> = readings(kept + HOUR_US, 10, 60_000_000, 999.0);
    let parts = [Part {
        tenant: "acme",
        gateway: "gw-a",
        readings: &backfill,
    }];
    let w = postgres::write(&mut c, Flavor::Timescale, &parts)
        .await
        .unwrap();
    assert_eq!((w.inserted, w.replays, w.conflicts.len()), (30, 0, 0));
    for (rs, want) in [(&again, (0, 150, 0)), (&clash, (0, 0, 10))] {
        let parts = [Part {
            tenant: "acme",
            gateway: "gw-a",
            readings: rs,
        }];
        let w = postgres::write(&mut c, Flavor::Timescale, &parts)
            .await
            .unwrap();
        assert_eq!((w.inserted, w.replays, w.conflicts.len()), want);
    }
    let day = |d: i64| {
        format!(
            "SELECT count(*) FROM raw_metrics WHERE tenant_id = 'acme' AND ts >= '{}' AND ts < '{}'",
            cloud_ingest::kafka::rfc3339(d),
            cloud_ingest::kafka::rfc3339(d + DAY_US)
        )
    };
    assert_eq!(int(&c, &day(kept)).await, 150, "each reading once");
    assert_eq!(
        int(
            &c,
            "SELECT count(*) FROM raw_metrics WHERE tenant_id = 'acme' AND value >= 999"
        )
        .await,
        0,
        "the first values stay"
    );
    refresh::refresh(&c, 36_500).await.unwrap();
    assert_eq!(
        both(&c).await,
        (0, 0),
        "backfill into compressed chunks rolls up"
    );

    // Retention: the two days past raw_days go from raw, their rollups stay.
    let rollups = async |c: &tokio_postgres::Client, view: &str| -> (i64, i64) {
        let r = c
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(sum(count), 0)::bigint FROM {view} WHERE bucket < $1"
                ),
                &[&postgres::system_time(kept)],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let hourly = rollups(&c, "downsampled_metrics_1h").await;
    let daily = rollups(&c, "downsampled_metrics_1d").await;
    assert_eq!(hourly.1, 2 * 2 * 120, "two tenants, two days");
    assert_eq!(daily, (2 * 2, 2 * 2 * 120));
    let retention = job(&c, "policy_retention", "raw_metrics").await;
    c.batch_execute(&format!("CALL run_job({retention})"))
        .await
        .unwrap();
    assert_eq!(int(&c, &day(gone)).await, 0);
    assert_eq!(int(&c, &day(gone + DAY_US)).await, 0);
    assert_eq!(int(&c, &day(kept)).await, 150, "inside raw_days stays");
    assert_eq!(
        int(
            &c,
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'raw_metrics'"
        )
        .await,
        1
    );
    for view in ["downsampled_metrics_1h", "downsampled_metrics_1d"] {
        let retention = job(&c, "policy_retention", view).await;
        c.batch_execute(&format!("CALL run_job({retention})"))
            .await
            .unwrap();
    }
    assert_eq!(rollups(&c, "downsampled_metrics_1h").await, hourly);
    assert_eq!(rollups(&c, "downsampled_metrics_1d").await, daily);
}
