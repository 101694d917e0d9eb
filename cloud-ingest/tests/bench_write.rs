//! Benchmarks of the storage layer (not run by default), each against its peer in the same
//! run, alternating, medians of 3 rounds:
//!
//! - **P5, PostgreSQL path**: 1,000,000 reference readings through the sink (two writers,
//!   merged flushes, staging COPY + idempotent insert + rollup bookkeeping) into an empty
//!   `raw_metrics`, against `psql \copy` of the same rows into the same (empty) table; then
//!   the same readings again (all replays, so the conflict check runs over every one) and
//!   again with 1% of the values changed (conflicts).
//! - **P8, rollup refresh**: `maintain::roll` over 1,000 devices x 4 metrics at 1 Hz for
//!   `PLANTLINK_BENCH_ROLLUP_SECONDS` (default 3600; the goal's full day is 86400 and needs
//!   about 40 GB of disk), against hand-written `INSERT ... SELECT date_trunc ... GROUP BY` over
//!   the same range into tables of the same shape.
//!
//! `cargo test --release -p cloud-ingest --test bench_write -- --ignored --nocapture --test-threads 1`
#![allow(clippy::unwrap_used)] // benchmarks may panic

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use cloud_ingest::config::{Postgres, Timescale};
use cloud_ingest::postgres::maintain::{self, Partitions};
use cloud_ingest::postgres::{self, Flavor};
use cloud_ingest::sink::{Batch, Sink};
use plantlink_model::Reading;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A fresh, migrated database; returns (admin, url, client).
async fn fresh(db: &str) -> (tokio_postgres::Client, String, tokio_postgres::Client) {
    common::database(db).await
}

async fn drop_db(admin: &tokio_postgres::Client, db: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Submits `readings` to `sink` as 10,000-reading batches and waits for every commit;
/// returns the seconds taken and the conflicts reported.
async fn through_sink(sink: &Sink, readings: &[Reading]) -> (f64, usize) {
    let (tenant, gateway): (Arc<str>, Arc<str>) = (Arc::from("acme"), Arc::from("gw-1"));
    let start = Instant::now();
    let mut waits = Vec::new();
    for chunk in readings.chunks(10_000) {
        let b = Batch {
            tenant: tenant.clone(),
            gateway: gateway.clone(),
            readings: chunk.to_vec(),
        };
        waits.push(sink.submit(b).await);
    }
    let mut conflicts = 0;
    for w in waits {
        conflicts += w.await.unwrap().unwrap().len();
    }
    (start.elapsed().as_secs_f64(), conflicts)
}

/// Seconds for three passes through the sink: the readings into an empty table, the same
/// again (every reading a replay: the conflict check runs over all of them), and again with
/// every 100th value changed (1% conflicts, the rest replays).
async fn ours(db: &str, readings: &[Reading]) -> [f64; 3] {
    let (admin, url, pgc) = fresh(db).await;
    let mut cfg = Postgres::with_url(&url);
    cfg.timescaledb = Timescale::Off;
    // Partitions exist before the clock starts, as they would in service.
    let days: BTreeSet<i64> = readings.iter().map(|r| maintain::day_of(r.ts.0)).collect();
    let mut c = postgres::connect(&url).await.unwrap();
    Partitions::default().ensure(&mut c, &days).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    let sink = Sink::start(cfg, Flavor::Plain, &mut tasks);
    let (fresh_secs, none) = through_sink(&sink, readings).await;
    assert_eq!(none, 0);
    let n: i64 = pgc
        .query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, readings.len() as i64);
    let (replay_secs, none) = through_sink(&sink, readings).await;
    assert_eq!(none, 0, "a replay is not a conflict");
    let changed: Vec<Reading> = readings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            if i % 100 == 0 {
                r.value = if r.value.is_finite() {
                    r.value + 1.0
                } else {
                    0.5
                };
            }
            r
        })
        .collect();
    let (conflict_secs, conflicts) = through_sink(&sink, &changed).await;
    assert_eq!(conflicts, readings.len().div_ceil(100));
    drop(sink);
    while tasks.join_next().await.is_some() {}
    drop((pgc, c));
    drop_db(&admin, db).await;
    [fresh_secs, replay_secs, conflict_secs]
}

async fn psql_copy(db: &str, csv: &std::path::Path, readings: &[Reading]) -> f64 {
    let (admin, url, pgc) = fresh(db).await;
    let days: BTreeSet<i64> = readings.iter().map(|r| maintain::day_of(r.ts.0)).collect();
    let mut c = postgres::connect(&url).await.unwrap();
    Partitions::default().ensure(&mut c, &days).await.unwrap();
    let start = Instant::now();
    let out = std::process::Command::new("psql")
        .arg(&url)
        .arg("-qc")
        .arg(format!(
            "\\copy raw_metrics (tenant_id, device_id, metric_name, value, tags, ts, seq, gateway_id) FROM '{}' WITH (FORMAT csv)",
            csv.display()
        ))
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n: i64 = pgc
        .query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, readings.len() as i64);
    drop((pgc, c));
    drop_db(&admin, db).await;
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn postgres_path_against_psql_copy() {
    let mut readings =
        firmware_sim::refdata::generate(&firmware_sim::refdata::RefSpec::reference(1));
    readings.truncate(1_000_000);
    let n = readings.len() as f64;
    let d = common::Dir::new("bench-write");
    std::fs::create_dir_all(&d.0).unwrap();
    let csv = d.0.join("rows.csv");
    common::write_csv(&csv, &readings);
    let pid = std::process::id();
    let (mut mine, mut peer, mut replay, mut conflict) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        peer.push(
            psql_copy(
                &format!("plantlink_bench_psql_{pid}_{round}"),
                &csv,
                &readings,
            )
            .await,
        );
        let [f, r, c] = ours(&format!("plantlink_bench_sink_{pid}_{round}"), &readings).await;
        mine.push(f);
        replay.push(r);
        conflict.push(c);
        println!(
            "round {round}: psql \\copy {:.2} s, sink {f:.2} s, all replays {r:.2} s, 1% conflicts {c:.2} s",
            peer[round]
        );
    }
    let (m, p) = (median(mine), median(peer));
    let (r, c) = (median(replay), median(conflict));
    println!(
        "PostgreSQL path: sink {:.0} readings/s ({m:.2} s), psql \\copy {:.0} readings/s ({p:.2} s); ratio {:.2}",
        n / m,
        n / p,
        p / m
    );
    println!(
        "replays through the conflict check: all replays {:.0} readings/s ({r:.2} s), 1% conflicts {:.0} readings/s ({c:.2} s)",
        n / r,
        n / c
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn rollup_refresh_against_group_by() {
    let seconds: i64 = std::env::var("PLANTLINK_BENCH_ROLLUP_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600);
    let db = format!("plantlink_bench_rollup_{}", std::process::id());
    let (admin, url, pgc) = fresh(&db).await;
    let mut c = postgres::connect(&url).await.unwrap();
    // Yesterday from midnight UTC, in time order (as a plant sends it).
    let today = maintain::day_of(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64,
    );
    let base = today - 1;
    let days: BTreeSet<i64> = (base..=base + (seconds - 1) / 86_400).collect();
    Partitions::default().ensure(&mut c, &days).await.unwrap();
    let t = Instant::now();
    c.batch_execute(&format!(
        "INSERT INTO raw_metrics (tenant_id, device_id, metric_name, value, ts, gateway_id)
         SELECT 'acme', 'dev-' || d, m, (d * 7 + s % 97)::float8 / 3,
                to_timestamp({base} * 86400) + s * interval '1 second', 'gw-1'
         FROM generate_series(0, {last}) s,
              generate_series(0, 999) d,
              unnest(array['temperature', 'pressure', 'flow', 'vibration']) m;
         CREATE TABLE peer_1h (LIKE downsampled_metrics_1h INCLUDING ALL);
         CREATE TABLE peer_1d (LIKE downsampled_metrics_1d INCLUDING ALL);
         ANALYZE raw_metrics;",
        base = base,
        last = seconds - 1
    ))
    .await
    .unwrap();
    let rows: i64 = pgc
        .query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "loaded {rows} rows (1000 devices x 4 metrics x {seconds} s) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (from, to) = (base * 86_400, base * 86_400 + seconds);
    let peer_sql = format!(
        "INSERT INTO peer_1h
         SELECT tenant_id, device_id, metric_name, date_trunc('hour', ts),
                min(value), max(value), avg(value), sum(value), count(*)
         FROM raw_metrics
         WHERE ts >= to_timestamp({from}) AND ts < to_timestamp({to})
         GROUP BY tenant_id, device_id, metric_name, date_trunc('hour', ts);
         INSERT INTO peer_1d
         SELECT tenant_id, device_id, metric_name, date_trunc('day', bucket),
                min(min_val), max(max_val), sum(sum_val) / sum(count), sum(sum_val), sum(count)
         FROM peer_1h GROUP BY tenant_id, device_id, metric_name, date_trunc('day', bucket);"
    );
    let (mut mine, mut peer) = (Vec::new(), Vec::new());
    for round in 0..3 {
        c.batch_execute("TRUNCATE peer_1h, peer_1d").await.unwrap();
        let t = Instant::now();
        c.batch_execute(&peer_sql).await.unwrap();
        peer.push(t.elapsed().as_secs_f64());

        c.batch_execute(
            "TRUNCATE downsampled_metrics_1h, downsampled_metrics_1d;
             INSERT INTO rollup_dirty (tenant_id, device_id, metric_name, bucket)
             SELECT DISTINCT tenant_id, device_id, metric_name, date_trunc('hour', ts)
             FROM raw_metrics ON CONFLICT DO NOTHING;",
        )
        .await
        .unwrap();
        let t = Instant::now();
        let keys = maintain::roll(&c).await.unwrap();
        mine.push(t.elapsed().as_secs_f64());
        println!(
            "round {round}: GROUP BY {:.2} s, roll {:.2} s ({keys} hourly buckets)",
            peer[round], mine[round]
        );
    }
    // Same answers.
    let diff: i64 = pgc
        .query_one(
            "SELECT count(*) FROM downsampled_metrics_1h h FULL JOIN peer_1h p USING (tenant_id, device_id, metric_name, bucket)
             WHERE h.count IS DISTINCT FROM p.count OR h.min_val IS DISTINCT FROM p.min_val
                OR h.max_val IS DISTINCT FROM p.max_val",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(diff, 0);
    let (m, p) = (median(mine), median(peer));
    println!(
        "rollup refresh over {rows} rows: roll {m:.2} s, hand-written GROUP BY {p:.2} s; ratio {:.2} (goal <= 1.2)",
        m / p
    );
    drop((pgc, c));
    drop_db(&admin, &db).await;
}
