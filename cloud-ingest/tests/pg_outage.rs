//! PostgreSQL going away mid-stream delays acks and loses nothing. While batches stream
//! into the sink, the test's database refuses new connections and every session of it is
//! killed (what a server restart looks like from here, without touching the shared server);
//! no batch is acknowledged while it is away, none is refused, and once it is back every
//! reading is stored exactly once. On both storage flavours (TimescaleDB on a private
//! cluster, skipped loudly where its files are not installed).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cloud_ingest::sink::{Batch, Sink};
use common::timescale::Backend;
use plantlink_model::{Reading, Timestamp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_delays_acks_and_loses_nothing() {
    for b in Backend::all("pg-outage") {
        eprintln!("a database outage on {}", b.name());
        an_outage_on(&b).await;
    }
}

async fn an_outage_on(b: &Backend) {
    const BATCHES: usize = 120;
    const PER: usize = 1_000;
    let db = format!("plantlink_test_pgout_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    drop(pgc);
    let mut cfg = b.config(&url);
    cfg.max_pending_readings = 20_000;
    cfg.flush_max_readings = 5_000;
    cfg.rollup_interval_ms = 200;
    let mut tasks = tokio::task::JoinSet::new();
    let sink = Sink::start(cfg, b.flavor(), &mut tasks);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let acked = Arc::new(AtomicUsize::new(0));
    let (waits_tx, mut waits_rx) = tokio::sync::mpsc::unbounded_channel();
    let counter = {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Some(w) = waits_rx.recv().await {
                let w: tokio::sync::oneshot::Receiver<cloud_ingest::sink::Outcome> = w;
                w.await.unwrap().unwrap(); // never refused
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let producer = {
        let sink = sink.clone();
        tokio::spawn(async move {
            for b in 0..BATCHES {
                let readings: Vec<Reading> = (0..PER)
                    .map(|i| {
                        let n = (b * PER + i) as i64;
                        Reading::new(
                            "x",
                            format!("dev-{}", n % 25),
                            "temperature",
                            Timestamp(now - 3_600_000_000 + n * 1000),
                            n as f64,
                        )
                    })
                    .collect();
                let w = sink
                    .submit(Batch {
                        tenant: Arc::from("acme"),
                        gateway: Arc::from("gw-1"),
                        readings,
                    })
                    .await;
                waits_tx.send(w).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Some batches in, then the database goes away.
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < 20 {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}';"
        ))
        .await
        .unwrap();
    // Acks already on their way may land; after that, none while it is away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        acked.load(Ordering::SeqCst),
        during,
        "acked while the database was away"
    );
    assert!(during < BATCHES);
    admin
        .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();

    producer.await.unwrap();
    drop(sink);
    counter.await.unwrap();
    assert_eq!(acked.load(Ordering::SeqCst), BATCHES);
    while tasks.join_next().await.is_some() {}

    let pgc = cloud_ingest::postgres::connect(&url).await.unwrap();
    let row = pgc
        .query_one(
            "SELECT count(*), count(DISTINCT (device_id, metric_name, ts)) FROM raw_metrics",
            &[],
        )
        .await
        .unwrap();
    let total = (BATCHES * PER) as i64;
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (total, total));
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
