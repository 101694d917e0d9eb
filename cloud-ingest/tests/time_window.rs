//! The event-time window (`[ingest]`), end to end over QUIC with a real PostgreSQL and a
//! Kafka-API broker (Tansu): one batch holds good readings, one reading stamped ten days
//! ahead and one older than the raw retention.
//!
//! - The batch is acknowledged; the good readings are in `raw_metrics` and on the readings
//!   topic, the two others in neither.
//! - Both are on the DLQ, with reasons `in_future` and `too_old`, and counted per tenant in
//!   `plantlink_cloud_readings_rejected_total{tenant,reason}`.
//! - The device's alert still fires on its correct readings afterwards.
//! - Plain PostgreSQL: partitions asked for 100,000 days are made only around today.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloud_ingest::config::Alerting;
use cloud_ingest::quic;
use cloud_ingest::server::Server;
use common::{Dir, client, connect};
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Ack, Batch, Frame, Lane};

const DAY_MS: i64 = 86_400_000;

/// Sends one batch on a new stream and waits for its answer.
async fn send(conn: &quinn::Connection, seq: u64, readings: &[Reading]) -> Frame {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let frame = Frame::Batch(Batch {
        seq,
        lane: Lane::Live,
        readings: readings.len() as u32,
        payload: BatchEncoder::default().encode(readings),
    });
    quic::write_frame(&mut s, &frame).await.unwrap();
    quic::read_frame(&mut r, 1 << 16).await.unwrap()
}

fn pump(ts_ms: i64, value: f64) -> Reading {
    Reading::new(
        "claimed",
        "pump-1",
        "temperature",
        Timestamp(ts_ms * 1000),
        value,
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The value of `name{tenant="acme",reason=...}` on `/metrics`.
fn rejected(text: &str, reason: &str) -> Option<u64> {
    text.lines()
        .find(|l| {
            l.starts_with("plantlink_cloud_readings_rejected_total{")
                && l.contains("tenant=\"acme\"")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_outside_the_window_go_to_the_dlq_and_the_batch_is_acked() {
    let d = Dir::new("window");
    common::fleet(&d.0, "gw-w");
    let pid = std::process::id();
    let db = format!("plantlink_test_window_{pid}");
    let (admin, url, pgc) = common::database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    cloud_ingest::telemetry::install(metrics).unwrap();
    let (readings_topic, dlq_topic) = (
        format!("test.tw.readings.{pid}"),
        format!("test.tw.dlq.{pid}"),
    );
    let config = {
        let mut c = common::cloud_config(&d.0, url, 16, 8 << 20);
        let mut k = cloud_ingest::config::Kafka::with_brokers(tansu.to_string());
        k.readings_topic = readings_topic.clone();
        k.dlq_topic = dlq_topic.clone();
        k.alerts_topic = format!("test.tw.alerts.{pid}");
        k.partitions = 1;
        c.kafka = Some(k);
        c.alerting = Alerting {
            tick_ms: 100,
            rules_reload_ms: 200,
            ..Alerting::default()
        };
        c
    };
    assert_eq!(config.postgres.retention.raw_days, 7);
    // pump-1 averaging over 50 for a 2 s window, there before the start.
    let rule = serde_json::json!({"name": "pump-1 hot", "metric": "temperature",
        "selector": {"device_id": "pump-1"}, "aggregate": "avg", "op": ">", "threshold": 50.0,
        "window": {"kind": "tumbling", "seconds": 2}, "for_windows": 1, "severity": "critical"});
    pgc.execute(
        "INSERT INTO alert_rules (tenant_id, name, metric_name, condition_expr, threshold,
                                  window_seconds, severity)
         VALUES ('acme', 'pump-1 hot', 'temperature', $1::text::jsonb, 50, 2, 'critical')",
        &[&rule.to_string()],
    )
    .await
    .unwrap();
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx));
    let ep = client(&d.0.join("ca.pem"), Some((&d.0, "gw-w")));
    let gw = connect(&ep, cloud_addr, "gw-w").await;

    // 1. Twenty cool readings of the last two seconds, one ten days ahead, one eight days
    // old (the raw retention is seven): acknowledged.
    let now = now_ms();
    let mut batch: Vec<Reading> = (0..20).map(|i| pump(now - 2_000 + i * 100, 20.0)).collect();
    let (ahead, old) = (now + 10 * DAY_MS, now - 8 * DAY_MS);
    batch.insert(7, pump(ahead, 99.0));
    batch.insert(13, pump(old, 98.0));
    assert_eq!(send(&gw, 1, &batch).await, Frame::Ack(Ack { seq: 1 }));

    // 2. The good ones are stored, the two others are not.
    let row = pgc
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE value >= 98) FROM raw_metrics",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (20, 0));
    // Kept in refused_readings before the ack (Kafka or not), as they arrived.
    let kept: Vec<(String, i64, f64, String)> = pgc
        .query(
            "SELECT reason, ts_us, value, gateway_id FROM refused_readings
             WHERE tenant_id = 'acme' AND device_id = 'pump-1' ORDER BY reason",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        kept,
        vec![
            (
                "in_future".to_owned(),
                ahead * 1000,
                99.0,
                "gw-w".to_owned()
            ),
            ("too_old".to_owned(), old * 1000, 98.0, "gw-w".to_owned())
        ]
    );

    // 3. On the DLQ, each with its reason and the reading.
    let dlq = {
        let (b, t) = (tansu.to_string(), dlq_topic.clone());
        tokio::task::spawn_blocking(move || common::consume_all(&b, &t, 2, Duration::from_secs(30)))
            .await
            .unwrap()
            .0
    };
    let mut got: Vec<(String, i64)> = dlq
        .iter()
        .map(|(key, seq, v, _)| {
            assert_eq!(key, "gw-w");
            assert_eq!(
                (v["tenant"].as_str(), v["gateway"].as_str()),
                (Some("acme"), Some("gw-w"))
            );
            assert_eq!(*seq, 1);
            assert_eq!(v["reading"]["device_id"], "pump-1", "{v}");
            (
                v["reason"].as_str().unwrap().to_owned(),
                v["reading"]["ts_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![("in_future".to_owned(), ahead), ("too_old".to_owned(), old)],
        "{dlq:?}"
    );

    // 4. Counted for the tenant.
    let text = common::scrape(metrics).unwrap();
    assert_eq!(rejected(&text, "in_future"), Some(1), "{text}");
    assert_eq!(rejected(&text, "too_old"), Some(1), "{text}");

    // 5. Hot readings of pump-1 over the last six seconds afterwards: the alert fires.
    let now = now_ms();
    let hot: Vec<Reading> = (0..60).map(|i| pump(now - 6_000 + i * 100, 90.0)).collect();
    assert_eq!(send(&gw, 2, &hot).await, Frame::Ack(Ack { seq: 2 }));
    let start = Instant::now();
    loop {
        let firing: i64 = pgc
            .query_one(
                "SELECT count(*) FROM alerts WHERE device_id = 'pump-1' AND state = 'firing'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if firing > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pump-1's alert did not fire"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 6. The readings topic has every good reading of both batches and neither refused one
    // (they would have been sent before the second batch; Kafka had each batch before its ack).
    let records = {
        let (b, t) = (tansu.to_string(), readings_topic.clone());
        tokio::task::spawn_blocking(move || {
            common::consume_all(&b, &t, 80, Duration::from_secs(30))
        })
        .await
        .unwrap()
        .0
    };
    assert_eq!(records.len(), 80);
    assert!(
        records
            .iter()
            .all(|(_, _, v, _)| v["value"].as_f64().is_some_and(|x| x < 98.0)),
        "a refused reading is on {readings_topic}"
    );

    gw.close(0u32.into(), b"done");
    let _ = stop_tx.send(true);
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Plain PostgreSQL: a set of 100,000 days (what one batch spread over them would ask for)
/// gets partitions only for the days around today; the rest are handed back, not created.
#[tokio::test]
async fn bounded_partitions_create_only_days_around_today() {
    use cloud_ingest::postgres::maintain::{Partitions, day_of};
    let db = format!("plantlink_test_window_parts_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let plain: bool = pgc
        .query_one(
            "SELECT relkind = 'p' FROM pg_class WHERE relname = 'raw_metrics'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if plain {
        let mut c = cloud_ingest::postgres::connect(&url).await.unwrap();
        let today = day_of(now_ms() * 1000);
        let days: std::collections::BTreeSet<i64> = (today - 50_000..today + 50_000).collect();
        let p = Partitions::bounded(8, 8);
        let outside = p.ensure(&mut c, &days).await.unwrap();
        assert_eq!(outside.len(), 100_000 - 17);
        assert!(outside.iter().all(|d| !(today - 8..=today + 8).contains(d)));
        let partitions: i64 = pgc
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'raw_metrics'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(partitions, 17);
    } else {
        eprintln!("raw_metrics is a hypertable here: partitions are TimescaleDB's; skipped");
    }
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
