//! Benchmarks of both storage flavours in the same run (not run by default): plain
//! PostgreSQL (the shared cluster) and TimescaleDB (a private cluster that preloads it; see
//! tests/common/timescale.rs). Per flavour and round, on a fresh database:
//!
//! - **P5**: 1,000,000 reference readings (moved to three days ago) through the sink, against
//!   `psql \copy` of the same rows into the same `raw_metrics` (partitioned table or
//!   hypertable) of another fresh database.
//! - **P8**: the flavour's rollup refresh of the whole written range, from scratch (plain:
//!   every hour marked and `maintain::roll`; TimescaleDB: `refresh_continuous_aggregate`
//!   forced over the range, as `refresh::refresh` calls it) against a hand-written `GROUP BY`
//!   (`date_trunc` / `time_bucket`) of the same rows into tables of the same shape.
//! - **P10**: bytes per reading of `raw_metrics` with its indexes; on TimescaleDB before and
//!   after compressing its chunks.
//!
//! `cargo test --release -p cloud-ingest --test bench_flavors -- --ignored --nocapture`
//! (`PLANTLINK_BENCH_ROUNDS`, default 3).
#![allow(clippy::unwrap_used)] // benchmarks may panic

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use cloud_ingest::postgres::maintain::{self, Partitions};
use cloud_ingest::postgres::{self, Flavor, refresh};
use cloud_ingest::sink::{Batch, Sink};
use common::timescale::Backend;
use plantlink_model::Reading;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A fresh, migrated database of `b`: (admin, url, client).
async fn fresh(b: &Backend, db: &str) -> (tokio_postgres::Client, String, tokio_postgres::Client) {
    let admin = common::pg(&b.admin_dsn(), db).await;
    let url = b.dsn(db);
    let client = postgres::connect(&url).await.unwrap();
    assert_eq!(
        postgres::migrate(&client, &b.config(&url)).await.unwrap(),
        b.flavor()
    );
    (admin, url, client)
}

async fn drop_db(admin: &tokio_postgres::Client, db: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}

async fn ensure_partitions(b: &Backend, url: &str, readings: &[Reading]) {
    if b.flavor() == Flavor::Plain {
        let days: BTreeSet<i64> = readings.iter().map(|r| maintain::day_of(r.ts.0)).collect();
        let mut c = postgres::connect(url).await.unwrap();
        Partitions::default().ensure(&mut c, &days).await.unwrap();
    }
}

/// Seconds to write `readings` through a sink, in 10,000-reading batches.
async fn through_sink(b: &Backend, url: &str, readings: &[Reading]) -> f64 {
    let mut cfg = b.config(url);
    cfg.rollup_interval_ms = 3_600_000; // the benchmark runs the rollups itself
    let mut tasks = tokio::task::JoinSet::new();
    let sink = Sink::start(cfg, b.flavor(), &mut tasks);
    let (tenant, gateway): (Arc<str>, Arc<str>) = (Arc::from("acme"), Arc::from("gw-1"));
    let start = Instant::now();
    let mut waits = Vec::new();
    for chunk in readings.chunks(10_000) {
        let batch = Batch {
            tenant: tenant.clone(),
            gateway: gateway.clone(),
            readings: chunk.to_vec(),
        };
        waits.push(sink.submit(batch).await);
    }
    for w in waits {
        assert!(w.await.unwrap().unwrap().is_empty());
    }
    let secs = start.elapsed().as_secs_f64();
    drop(sink);
    while tasks.join_next().await.is_some() {}
    secs
}

async fn psql_copy(b: &Backend, db: &str, csv: &std::path::Path, readings: &[Reading]) -> f64 {
    let (admin, url, pgc) = fresh(b, db).await;
    ensure_partitions(b, &url, readings).await;
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
    drop(pgc);
    drop_db(&admin, db).await;
    secs
}

/// Bytes of `raw_metrics` with its indexes (on TimescaleDB, of the hypertable's chunks).
async fn raw_bytes(c: &tokio_postgres::Client, flavor: Flavor) -> i64 {
    let sql = match flavor {
        Flavor::Plain => {
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8 FROM pg_inherits
             WHERE inhparent = 'raw_metrics'::regclass"
        }
        Flavor::Timescale => "SELECT hypertable_size('raw_metrics')::int8",
    };
    c.query_one(sql, &[]).await.unwrap().get(0)
}

struct Round {
    sink: f64,
    refresh: f64,
    group_by: f64,
    bytes: i64,
    compressed: Option<i64>,
}

/// One round of P5 (sink), P8 and P10 on a fresh database of `b`.
async fn round(b: &Backend, db: &str, readings: &[Reading]) -> Round {
    let (admin, url, c) = fresh(b, db).await;
    ensure_partitions(b, &url, readings).await;
    let sink = through_sink(b, &url, readings).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, readings.len() as i64);
    c.batch_execute("ANALYZE raw_metrics").await.unwrap();

    // P8. The sink rolled up what it wrote when it stopped; each flavour now refreshes the
    // whole written range again, from scratch, then the hand-written peer does the same.
    let (from, to): (std::time::SystemTime, std::time::SystemTime) = {
        let row = c
            .query_one(
                "SELECT date_trunc('day', min(ts)), date_trunc('day', max(ts)) + interval '1 day'
                 FROM raw_metrics",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let t = match b.flavor() {
        Flavor::Plain => {
            c.batch_execute(
                "TRUNCATE downsampled_metrics_1h, downsampled_metrics_1d;
                 INSERT INTO rollup_dirty (tenant_id, device_id, metric_name, bucket)
                 SELECT DISTINCT tenant_id, device_id, metric_name, date_trunc('hour', ts)
                 FROM raw_metrics ON CONFLICT DO NOTHING;",
            )
            .await
            .unwrap();
            let t = Instant::now();
            assert!(maintain::roll(&c).await.unwrap() > 0);
            t
        }
        Flavor::Timescale => {
            // As `refresh::refresh` does for a run of pending buckets, forced: nothing is
            // invalidated after the sink's own refresh.
            let t = Instant::now();
            for view in ["downsampled_metrics_1h", "downsampled_metrics_1d"] {
                let (from, to) = (postgres::micros(from), postgres::micros(to));
                refresh::refresh_range(&c, view, Some(from), Some(to), true)
                    .await
                    .unwrap();
            }
            t
        }
    };
    let refresh_secs = t.elapsed().as_secs_f64();
    let bucket = match b.flavor() {
        Flavor::Plain => "date_trunc('hour', ts)",
        Flavor::Timescale => "time_bucket(INTERVAL '1 hour', ts)",
    };
    let day = match b.flavor() {
        Flavor::Plain => "date_trunc('day', bucket)",
        Flavor::Timescale => "time_bucket(INTERVAL '1 day', bucket)",
    };
    c.batch_execute(
        "CREATE TABLE peer_1h (tenant_id text, device_id text, metric_name text,
             bucket timestamptz, min_val float8, max_val float8, avg_val float8, sum_val float8,
             count int8, PRIMARY KEY (tenant_id, device_id, metric_name, bucket));
         CREATE TABLE peer_1d (LIKE peer_1h INCLUDING ALL);",
    )
    .await
    .unwrap();
    let t = Instant::now();
    c.batch_execute(&format!(
        "INSERT INTO peer_1h
         SELECT tenant_id, device_id, metric_name, {bucket},
                min(value), max(value), avg(value), sum(value), count(*)
         FROM raw_metrics GROUP BY 1, 2, 3, 4;
         INSERT INTO peer_1d
         SELECT tenant_id, device_id, metric_name, {day},
                min(min_val), max(max_val), sum(sum_val) / sum(count), sum(sum_val), sum(count)
         FROM peer_1h GROUP BY 1, 2, 3, 4;"
    ))
    .await
    .unwrap();
    let group_by = t.elapsed().as_secs_f64();
    // Same answers.
    let diff: i64 = c
        .query_one(
            "SELECT count(*) FROM downsampled_metrics_1h h FULL JOIN peer_1h p
               USING (tenant_id, device_id, metric_name, bucket)
             WHERE h.count IS DISTINCT FROM p.count OR h.min_val IS DISTINCT FROM p.min_val
                OR h.max_val IS DISTINCT FROM p.max_val",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(diff, 0, "the rollup and the GROUP BY differ");

    // P10.
    let bytes = raw_bytes(&c, b.flavor()).await;
    let compressed = match b.flavor() {
        Flavor::Plain => None,
        Flavor::Timescale => {
            c.batch_execute("SELECT compress_chunk(ch) FROM show_chunks('raw_metrics') ch")
                .await
                .unwrap();
            let m: i64 = c
                .query_one("SELECT count(*) FROM raw_metrics", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(m, n, "compression keeps every reading");
            Some(raw_bytes(&c, b.flavor()).await)
        }
    };
    drop(c);
    drop_db(&admin, db).await;
    Round {
        sink,
        refresh: refresh_secs,
        group_by,
        bytes,
        compressed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn both_flavors_write_refresh_and_store() {
    let rounds: usize = std::env::var("PLANTLINK_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut readings =
        firmware_sim::refdata::generate(&firmware_sim::refdata::RefSpec::reference(1));
    readings.truncate(1_000_000);
    // Three days ago, so the day's chunk is complete and old enough to compress.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let shift =
        (now.div_euclid(86_400_000_000) - 3) * 86_400_000_000 + 36_000_000_000 - readings[0].ts.0;
    for r in &mut readings {
        r.ts.0 += shift;
    }
    let n = readings.len() as f64;
    let d = common::Dir::new("bench-flavors");
    std::fs::create_dir_all(&d.0).unwrap();
    let csv = d.0.join("rows.csv");
    common::write_csv(&csv, &readings);
    let pid = std::process::id();
    for b in Backend::all("bench-flavors") {
        let name = match b.flavor() {
            Flavor::Plain => "plain",
            Flavor::Timescale => "timescale",
        };
        let mut all = Vec::new();
        let mut peers = Vec::new();
        for i in 0..rounds {
            let peer = psql_copy(
                &b,
                &format!("plantlink_bench_{name}_copy_{pid}_{i}"),
                &csv,
                &readings,
            )
            .await;
            let r = round(
                &b,
                &format!("plantlink_bench_{name}_sink_{pid}_{i}"),
                &readings,
            )
            .await;
            println!(
                "{name} round {i}: sink {:.2} s, psql \\copy {peer:.2} s; refresh {:.2} s, GROUP BY {:.2} s; \
                 raw {:.1} bytes/reading{}",
                r.sink,
                r.refresh,
                r.group_by,
                r.bytes as f64 / n,
                r.compressed
                    .map(|c| format!(
                        ", compressed {:.1} ({:.1}x smaller)",
                        c as f64 / n,
                        r.bytes as f64 / c as f64
                    ))
                    .unwrap_or_default()
            );
            peers.push(peer);
            all.push(r);
        }
        let sink = median(all.iter().map(|r| r.sink).collect());
        let peer = median(peers);
        let refresh = median(all.iter().map(|r| r.refresh).collect());
        let group_by = median(all.iter().map(|r| r.group_by).collect());
        println!(
            "{name}: P5 sink {:.0} readings/s, psql \\copy {:.0} readings/s, ratio {:.2}; \
             P8 refresh {refresh:.2} s vs GROUP BY {group_by:.2} s, ratio {:.2}",
            n / sink,
            n / peer,
            peer / sink,
            refresh / group_by
        );
    }
}
