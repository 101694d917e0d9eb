//! Benchmark (not run by default): a 1,000,000-reading reference backlog drained from the
//! agent's queue over QUIC into PostgreSQL on loopback, with the UDP payload bytes counted by
//! a relay in the path. Run it in release mode:
//!
//! `cargo test --release -p cloud-ingest --test bench_uplink -- --ignored --nocapture --test-threads 1`
//!
//! `PLANTLINK_BENCH_BATCH` sets the agent's `batch_max_readings` for the drain (default
//! 50000). The live-rate benchmark publishes `PLANTLINK_BENCH_LIVE_MESSAGES` (default
//! 200000) MQTT messages of two readings each through the whole path.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::time::{Duration, Instant};

use cloud_ingest::server::Server;
use common::Dir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn backlog_drain_and_bytes_per_reading() {
    drain("bench", None).await;
}

/// P5/P6 together: the same drain with the Kafka sink on (a local Tansu broker), so every
/// batch is acknowledged only when PostgreSQL and Kafka both have it; then the PostgreSQL-only
/// drain again in the same run, for the ratio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn sustained_write_into_postgres_and_kafka() {
    let (_tansu, tansu) = common::start_tansu(None);
    let with = drain("bench-kafka", Some(tansu.to_string())).await;
    let without = drain("bench-pg", None).await;
    println!(
        "sustained write: PostgreSQL + Kafka {:.0} readings/s, PostgreSQL alone {:.0} readings/s (ratio {:.2})",
        with,
        without,
        with / without
    );
}

/// Drains a 1,000,000-reading backlog; returns readings/s until the agent's queue is empty.
async fn drain(tag: &str, kafka: Option<String>) -> f64 {
    let d = Dir::new(tag);
    common::fleet(&d.0, "gw-b");
    let db = format!("plantlink_{}_{}", tag.replace('-', "_"), std::process::id());
    let (admin, url, pgc) = common::database(&db).await;

    // The reference dataset (seed 1, 1.2 M readings) trimmed to 1,000,000, queued as a backlog.
    let mut readings =
        firmware_sim::refdata::generate(&firmware_sim::refdata::RefSpec::reference(1));
    readings.truncate(1_000_000);
    // Moved to the last hour: the cloud refuses readings older than the raw retention.
    let shift = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - readings[0].ts.0
        - 3_600_000_000;
    for r in &mut readings {
        r.ts.0 += shift;
    }
    let n = readings.len() as i64;
    let t = Instant::now();
    let opts = edge_agent::store::Options {
        path: d.0.join("queue.db"),
        max_bytes: 1 << 30,
        synchronous: edge_agent::config::Synchronous::Normal,
        dedupe_window_us: 600_000_000,
        dead_letters_keep: 100,
        tenant: "acme".into(),
        max_series_per_device: 1000,
        live_buffer: edge_agent::store::LIVE_BUFFER,
    };
    let mut store = edge_agent::store::Store::open(opts).unwrap();
    for chunk in readings.chunks(100_000) {
        store.begin(1).unwrap();
        for r in chunk {
            store.insert(r).unwrap();
        }
        store.commit().unwrap();
    }
    drop(store);
    eprintln!("queued {n} readings in {:.1} s", t.elapsed().as_secs_f64());

    let mut cfg = common::cloud_config(&d.0, url, 16, 8 << 20);
    cfg.kafka = kafka.map(|b| {
        let mut k = cloud_ingest::config::Kafka::with_brokers(b);
        k.partitions = 6;
        k
    });
    let with_kafka = cfg.kafka.is_some();
    let server = Server::bind(cfg).unwrap();
    let (relay, bytes) = common::lossy_proxy(server.local_addr().unwrap(), 0.0).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx.clone()));

    let batch: usize = std::env::var("PLANTLINK_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let config = common::Agent {
        gateway: "gw-b",
        mqtt: None,
        cloud: relay.to_string(),
        store: "",
        uplink: &format!(
            "batch_max_readings = {batch}\nmax_in_flight = 16\nbacklog_rate = 10000000"
        ),
    }
    .config(&d.0);
    let mut agent_stop = stop_rx.clone();
    let start = Instant::now();
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = agent_stop.changed().await;
    }));
    let queue = d.0.join("queue.db");
    loop {
        let c: i64 = pgc
            .query_one("SELECT count(*) FROM raw_metrics", &[])
            .await
            .unwrap()
            .get(0);
        // Done means acknowledged, in both phases: every row is in PostgreSQL and the agent's
        // queue is empty (with Kafka on, a batch is acknowledged once Kafka has it too). The
        // queue is looked at only once the rows are in, so the polling costs both the same.
        let acked = || {
            let q = edge_agent::store::open_read_only(&queue).unwrap();
            edge_agent::store::stats(&q).unwrap().readings == 0
        };
        if c >= n && acked() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{c} of {n} after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let wire = bytes.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "backlog drain ({batch}-reading batches{}): {n} readings in {secs:.2} s \
         ({:.0} readings/s); agent->cloud UDP payload {wire} bytes = {:.3} B/reading",
        if with_kafka {
            ", PostgreSQL + Kafka"
        } else {
            ", PostgreSQL"
        },
        n as f64 / secs,
        wire as f64 / n as f64
    );
    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    n as f64 / secs
}

/// Live rate: MQTT messages published as fast as Mosquitto takes them, through the agent's
/// queue and the live lane into PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn live_rate() {
    let n: i64 = std::env::var("PLANTLINK_BENCH_LIVE_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let took = common::full_path::full_path(n, None, "live").await;
    println!(
        "live rate: {n} MQTT messages ({} readings) from first publish to the last row in \
         PostgreSQL in {:.2} s = {:.0} readings/s",
        2 * n,
        took.as_secs_f64(),
        (2 * n) as f64 / took.as_secs_f64()
    );
}
