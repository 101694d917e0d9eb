//! The Kafka sink against a real Kafka-API broker (Tansu, `PLANTLINK_TANSU`), with a real
//! Mosquitto, agent, PostgreSQL and QUIC on loopback.
//!
//! - Readings land on the readings topic keyed by device, with the identity in the headers,
//!   and a consumer reads each device's readings back in the order they were published.
//! - Kafka down (the broker cut off behind a TCP relay the test controls): PostgreSQL still
//!   takes the rows but no batch is acknowledged, so the agent keeps them; once Kafka is back
//!   everything is acknowledged and nothing is missing in PostgreSQL or in Kafka.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cloud_ingest::quic;
use cloud_ingest::server::Server;
use common::Dir;
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Ack, Batch, Frame, Lane};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::net::{TcpListener, TcpStream};

async fn rows(pgc: &tokio_postgres::Client) -> i64 {
    pgc.query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0)
}

fn queued(path: &Path) -> u64 {
    let c = edge_agent::store::open_read_only(path).unwrap();
    edge_agent::store::stats(&c).unwrap().readings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_reach_kafka_in_device_order_and_survive_a_kafka_outage() {
    let d = Dir::new("kafka");
    common::fleet(&d.0, "gw-k");
    let db = format!("plantlink_test_kafka_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;

    let up = Arc::new(AtomicBool::new(true));
    // The relay's address is what Tansu advertises, so every connection goes through it.
    let relay_port = common::free_tcp_port();
    let relay_addr: SocketAddr = format!("127.0.0.1:{relay_port}").parse().unwrap();
    let (_tansu, tansu_addr) = common::start_tansu(Some(relay_addr));
    switchable_relay(relay_addr, tansu_addr, up.clone()).await;
    let relay = relay_addr;
    let topic = format!("test.readings.{}", std::process::id());
    let mut cfg = common::cloud_config(&d.0, url, 16, 8 << 20);
    let mut k = cloud_ingest::config::Kafka::with_brokers(relay.to_string());
    k.readings_topic = topic.clone();
    k.dlq_topic = format!("test.dlq.{}", std::process::id());
    k.alerts_topic = format!("test.alerts.{}", std::process::id());
    k.partitions = 3;
    cfg.kafka = Some(k);
    let server = Server::bind(cfg).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx.clone()));

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("kafka-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    let config = common::Agent {
        gateway: "gw-k",
        mqtt: Some((broker.port, &client_id, "plant/{device}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 500\nbatch_linger_ms = 50",
    }
    .config(&d.0);
    let mut agent_stop = stop_rx.clone();
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = agent_stop.changed().await;
    }));

    // Messages from 10 devices, each with a per-device sequence number; one publisher, so
    // each device's messages reach the broker in sequence order.
    let mut o = MqttOptions::new(
        format!("kafka-pub-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    o.set_inflight(200);
    let (publisher, mut pel) = AsyncClient::new(o, 1000);
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    let base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let publish = |from: i64, to: i64| {
        let publisher = publisher.clone();
        async move {
            for i in from..to {
                let dev = i % 10;
                let body = format!(
                    r#"{{"ts": {}, "seq": {}, "temperature": {}.25}}"#,
                    base_ms + i,
                    i / 10,
                    i % 50
                );
                publisher
                    .publish(format!("plant/dev-{dev}"), QoS::AtLeastOnce, false, body)
                    .await
                    .unwrap();
            }
        }
    };

    // 1. Readings land in PostgreSQL and Kafka, keyed by device, in per-device order. Order
    // holds within a lane: readings stored before the uplink first connects travel as backlog
    // behind live ones (live first), so the test waits for the uplink with one warm-up message.
    publisher
        .publish(
            "plant/warmup",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"ts": {base_ms}, "seq": 0, "temperature": 1}}"#),
        )
        .await
        .unwrap();
    let start = Instant::now();
    while rows(&pgc).await < 1 || queued(&d.0.join("queue.db")) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the uplink did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pgc.batch_execute("DELETE FROM raw_metrics").await.unwrap();
    const FIRST: i64 = 3_000;
    publish(0, FIRST).await;
    let start = Instant::now();
    while rows(&pgc).await < FIRST || queued(&d.0.join("queue.db")) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} rows",
            rows(&pgc).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = {
        let (b, t) = (relay.to_string(), topic.clone());
        tokio::task::spawn_blocking(move || {
            common::consume_all(&b, &t, FIRST as usize + 1, Duration::from_secs(30))
        })
        .await
        .unwrap()
    };
    let (seen, partitions) = seen;
    // Created by cloud-ingest with the configured partition count.
    assert_eq!(partitions, 3, "partitions of {topic}");
    assert_eq!(seen.len(), FIRST as usize + 1, "records on {topic}");
    let mut last: HashMap<String, i64> = HashMap::new();
    for (key, seq, v, headers) in seen.iter().filter(|(k, ..)| k != "warmup") {
        assert_eq!(v["device_id"].as_str(), Some(key.as_str()));
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["gateway"], "gw-k");
        assert_eq!(v["metric"], "temperature");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert_eq!(headers.get("plantlink-device"), Some(key));
        assert_eq!(
            headers.get("plantlink-metric").map(String::as_str),
            Some("temperature")
        );
        assert_eq!(
            headers["plantlink-ts-us"].parse::<i64>().unwrap(),
            v["ts_ms"].as_i64().unwrap() * 1000
        );
        if let Some(prev) = last.insert(key.clone(), *seq) {
            assert!(*seq > prev, "{key}: seq {seq} after {prev}");
        }
    }
    assert_eq!(last.len(), 10);

    // 2. Kafka goes away. PostgreSQL keeps taking rows, but nothing is acknowledged: the
    // agent keeps every reading of this phase.
    up.store(false, Ordering::SeqCst);
    const SECOND: i64 = 2_000;
    publish(FIRST, FIRST + SECOND).await;
    let start = Instant::now();
    while rows(&pgc).await < FIRST + SECOND {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} rows",
            rows(&pgc).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = queued(&d.0.join("queue.db"));
    assert_eq!(
        held, SECOND as u64,
        "the agent should hold every reading sent while Kafka was down"
    );

    // 3. Kafka is back: everything is acknowledged, and nothing is missing anywhere.
    up.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while queued(&d.0.join("queue.db")) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "acks did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = (FIRST + SECOND) as usize;
    let seen = {
        let (b, t) = (relay.to_string(), topic.clone());
        tokio::task::spawn_blocking(move || {
            common::consume_all(&b, &t, total + 1, Duration::from_secs(60))
        })
        .await
        .unwrap()
    };
    let seen: common::Seen = seen.0.into_iter().filter(|(k, ..)| k != "warmup").collect();
    let mut ids: Vec<(String, i64)> = seen.iter().map(|(k, s, _, _)| (k.clone(), *s)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "distinct readings in Kafka");
    let row = pgc
        .query_one(
            "SELECT count(*), count(DISTINCT (device_id, seq)) FROM raw_metrics",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (total as i64, total as i64)
    );
    eprintln!(
        "Kafka holds {} records for {total} readings (replays after the outage: {})",
        seen.len(),
        seen.len() - total
    );

    // 4. What the cloud refuses goes to the dead-letter topic with the reason: a batch that
    // does not decode (its first byte claims codec version 9), and a reading no database can hold (the rest of its batch is stored).
    cloud_ingest::pki::gateway(&d.0, "gw-bad", "acme", 365).unwrap();
    let ep = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-bad")));
    let conn = common::connect(&ep, cloud_addr, "gw-bad").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let garbage = Frame::Batch(Batch {
        seq: 1,
        lane: Lane::Live,
        readings: 3,
        payload: vec![9, 9, 9],
    });
    quic::write_frame(&mut send, &garbage).await.unwrap();
    assert!(matches!(
        quic::read_frame(&mut recv, 1 << 16).await.unwrap(),
        Frame::Error(e) if e.seq == Some(1)
    ));
    let odd = vec![
        Reading::new("x", "dev-odd", "temperature", Timestamp(i64::MAX), 1.0),
        Reading::new(
            "x",
            "dev-odd",
            "temperature",
            Timestamp(base_ms * 1000),
            2.0,
        ),
    ];
    let good = Frame::Batch(Batch {
        seq: 2,
        lane: Lane::Live,
        readings: 2,
        payload: BatchEncoder::default().encode(&odd),
    });
    quic::write_frame(&mut send, &good).await.unwrap();
    assert_eq!(
        quic::read_frame(&mut recv, 1 << 16).await.unwrap(),
        Frame::Ack(Ack { seq: 2 })
    );
    let dlq = {
        let (b, t) = (
            relay.to_string(),
            format!("test.dlq.{}", std::process::id()),
        );
        tokio::task::spawn_blocking(move || common::consume_all(&b, &t, 2, Duration::from_secs(30)))
            .await
            .unwrap()
            .0
    };
    let reasons: Vec<&str> = dlq
        .iter()
        .map(|(_, _, v, _)| v["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{dlq:?}");
    assert!(
        reasons.contains(&"unsupported_version") && reasons.contains(&"timestamp_out_of_range"),
        "{reasons:?}"
    );
    for (key, _, v, _) in &dlq {
        assert_eq!(key, "gw-bad");
        assert_eq!(v["gateway"], "gw-bad");
        if v["reason"] == "unsupported_version" {
            assert_eq!(v["payload_hex"], "090909");
        } else {
            assert_eq!(v["reading"]["device_id"], "dev-odd");
        }
    }
    conn.close(0u32.into(), b"done");

    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A TCP relay on `at` (the address Tansu advertises) to `upstream`, that can be cut: while
/// `up` is false it closes what it carries and drops new connections, as a network partition
/// between cloud and Kafka would.
async fn switchable_relay(at: SocketAddr, upstream: SocketAddr, up: Arc<AtomicBool>) {
    let listener = TcpListener::bind(at).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            if !up.load(Ordering::SeqCst) {
                continue; // dropped: the connection closes
            }
            let up = up.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                    return;
                };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                let cut = async {
                    while up.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::select! {
                    _ = copy => {}
                    _ = cut => {}
                }
            });
        }
    });
}
