//! Poison never blocks a lane (issue 14), end to end with a real Mosquitto, the edge agent's
//! SQLite queue, QUIC with mutual TLS, cloud-ingest and PostgreSQL:
//!
//! - A queue left by an older agent holds a reading with 42 tags, over the wire's 32, among
//!   good ones. The cloud refuses every batch holding it; the agent splits until it has the
//!   reading alone, quarantines it, and delivers the rest, without reconnecting.
//! - The plant-shape message with 40 extra text fields, and one with a 2 KB text field, are
//!   dead-lettered at the edge; the 20 good readings published after them land within
//!   seconds, with at most one reconnect.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloud_ingest::server::Server;
use common::Dir;
use edge_agent::store::{self, Options, Store};
use plantlink_model::{Reading, Timestamp};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A counter's value (summed over its labels) in a Prometheus scrape.
fn counter(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|l| label.is_none_or(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn raw_count(pgc: &tokio_postgres::Client) -> i64 {
    pgc.query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits (bounded) until `raw_metrics` holds `want` rows; returns how long it took.
async fn await_rows(pgc: &tokio_postgres::Client, want: i64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let n = raw_count(pgc).await;
        if n >= want {
            assert_eq!(n, want, "more rows than readings");
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{n} of {want} readings in PostgreSQL after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_isolated_and_good_readings_keep_flowing() {
    let d = Dir::new("poison");
    common::fleet(&d.0, "gw-poison");
    let db = format!("plantlink_test_poison_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    // One recorder for the process: the agent's and the cloud's metrics side by side.
    cloud_ingest::telemetry::install(metrics).unwrap();

    let server = Server::bind(common::cloud_config(&d.0, url, 8, 8 << 20)).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx.clone()));

    // What an agent before this release stored: 30 good readings and, in their middle, one
    // with 42 tags, which the cloud's decoder refuses.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    {
        let mut q = Store::open(Options {
            path: d.0.join("queue.db"),
            max_bytes: 1 << 30,
            synchronous: edge_agent::config::Synchronous::Normal,
            dedupe_window_us: 600_000_000,
            dead_letters_keep: 100,
            tenant: "acme".into(),
            max_series_per_device: 1000,
            live_buffer: edge_agent::store::LIVE_BUFFER,
        })
        .unwrap();
        q.begin(1).unwrap();
        for i in 0..30 {
            let mut r = Reading::new(
                "acme",
                "press01",
                "temperature",
                Timestamp((now_ms - 60_000 + i * 1000) * 1000),
                60.0 + i as f64,
            );
            if i == 17 {
                for t in 0..42 {
                    r.tags.insert(format!("note{t}"), "x".into());
                }
            }
            q.insert(&r).unwrap();
        }
        q.commit().unwrap();
    }

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("poison-{}", std::process::id());
    let config = common::Agent {
        gateway: "gw-poison",
        mqtt: Some((broker.port, &client_id, "plant/{site}/{line}/{device}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 100\nbatch_linger_ms = 50",
    }
    .config(&d.0);
    common::create_session(broker.port, &client_id).await;
    let mut agent_stop = stop_rx.clone();
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = agent_stop.changed().await;
    }));

    // The 29 good readings of the old queue land; the poison is quarantined on its own.
    let took = await_rows(&pgc, 29, Duration::from_secs(30)).await;
    eprintln!("old queue delivered in {took:?}");
    let quarantined = {
        let start = Instant::now();
        loop {
            let conn = store::open_read_only(&d.0.join("queue.db")).unwrap();
            let q = store::quarantined(&conn, 10).unwrap();
            if !q.is_empty() || start.elapsed() > Duration::from_secs(10) {
                break q;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].value, Some(77.0));
    assert_eq!(quarantined[0].reason, "too_large");
    assert!(
        quarantined[0].detail.contains("tags"),
        "the cloud's words are kept: {}",
        quarantined[0].detail
    );
    let stored_poison: i64 = pgc
        .query_one("SELECT count(*) FROM raw_metrics WHERE value = 77", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored_poison, 0);

    // Now live: the two poison messages, then 20 good readings.
    let mut o = MqttOptions::new(format!("pub-{client_id}"), "127.0.0.1", broker.port);
    o.set_inflight(100);
    let (publisher, mut pel) = AsyncClient::new(o, 100);
    let extra: Vec<String> = (0..40)
        .map(|i| format!("\"note{i}\": \"text {i}\""))
        .collect();
    let forty = format!(
        r#"{{"sensor_id": "press01", "measurement": "temperature", "value": 80.5, "unit": "C", "ts": {now_ms}, {}}}"#,
        extra.join(", ")
    );
    let long = format!(
        r#"{{"sensor_id": "press01", "measurement": "temperature", "value": 81.5, "ts": {}, "comment": "{}"}}"#,
        now_ms + 1,
        "z".repeat(2048)
    );
    let published = Instant::now();
    for body in [forty, long] {
        publisher
            .publish("plant/p1/l3/press01", QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    }
    for i in 0..20 {
        let body = format!(
            r#"{{"sensor_id": "press02", "measurement": "temperature", "value": {}.25, "ts": {}}}"#,
            40 + i,
            now_ms + 10 + i
        );
        publisher
            .publish("plant/p1/l3/press02", QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 22 {
        if let Event::Incoming(Packet::PubAck(_)) = pel.poll().await.unwrap() {
            acked += 1;
        }
    }
    let took = await_rows(&pgc, 29 + 20, Duration::from_secs(30)).await;
    eprintln!(
        "20 good readings after the poison landed {:?} after publishing",
        published.elapsed()
    );
    assert!(took < Duration::from_secs(30));
    let press02: i64 = pgc
        .query_one(
            "SELECT count(*) FROM raw_metrics WHERE device_id = 'press02'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(press02, 20);

    // Both poison messages are dead letters at the edge, with their reasons.
    let letters = {
        let start = Instant::now();
        loop {
            let conn = store::open_read_only(&d.0.join("queue.db")).unwrap();
            let l = store::dead_letters(&conn, 10).unwrap();
            if l.len() >= 2 || start.elapsed() > Duration::from_secs(10) {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    reasons.sort();
    assert_eq!(reasons, ["too_long", "too_many_tags"], "{letters:?}");

    let text = common::scrape(metrics).unwrap();
    let reconnects = counter(&text, "plantlink_edge_uplink_reconnects_total", None);
    assert!(
        reconnects <= 1.0,
        "{reconnects} reconnects: a refused batch must not cost the connection"
    );
    assert_eq!(
        counter(&text, "plantlink_edge_quarantined_total", Some("too_large")),
        1.0
    );
    assert!(counter(&text, "plantlink_edge_batches_refused_total", None) >= 1.0);
    assert_eq!(
        counter(
            &text,
            "plantlink_edge_dead_letters_total",
            Some("too_many_tags")
        ),
        1.0
    );
    assert_eq!(
        counter(&text, "plantlink_edge_dead_letters_total", Some("too_long")),
        1.0
    );

    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
