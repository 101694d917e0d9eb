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
