//! Alerting end to end with real Mosquitto, agent, PostgreSQL, QUIC and a Kafka-API broker
//! (Tansu), and a webhook receiver in the test:
//!
//! - a rule made through the API fires when a device publishes over its threshold, and is
//!   resolved when it comes back under: the alert is in `alerts`, both transitions are on the
//!   Kafka alerts topic, and the webhook gets both;
//! - a gateway that replays a 10-minute backlog which crossed a threshold (cloud-ingest was
//!   down) produces alerts recorded as backfill, and the webhook gets nothing for them.
//!
//! On both storage flavours (TimescaleDB on a private cluster, skipped loudly where its files
//! are not installed).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloud_ingest::config::{Alerting, Api, Webhook};
use cloud_ingest::server::Server;
use common::Dir;
use common::timescale::Backend;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const TOKEN: &str = "acme-token-0123456789abcdef";

/// A webhook receiver: every POSTed body, answered 200.
async fn webhook_receiver() -> (SocketAddr, mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        let body: Value =
                            serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        let _ = tx.send(body);
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// An HTTP request to the API: (status, JSON).
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn rule(device: &str) -> Value {
    json!({"name": format!("{device} overheating"), "metric": "temperature",
           "selector": {"device_id": device}, "aggregate": "avg", "op": ">", "threshold": 80.0,
           "window": {"kind": "tumbling", "seconds": 2}, "for_windows": 1, "severity": "critical"})
}

/// (state, backfill) of the alerts of `device`, oldest first.
async fn alert_rows(pgc: &tokio_postgres::Client, device: &str) -> Vec<(String, bool)> {
    pgc.query(
        "SELECT state, backfill FROM alerts WHERE device_id = $1 ORDER BY alert_id",
        &[&device],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_resolve_and_replays_are_backfill() {
    for b in Backend::all("alerting") {
        eprintln!("alerting on {}", b.name());
        alerts_on(&b).await;
    }
}

async fn alerts_on(b: &Backend) {
    let d = Dir::new("alerting");
    common::fleet(&d.0, "gw-al");
    let db = format!("plantlink_test_alerting_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let (hook, mut hooks) = webhook_receiver().await;
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let alerts_topic = format!("test.alerts.{}", std::process::id());

    let config = {
        let mut c = common::cloud_config(&d.0, url.clone(), 16, 8 << 20);
        c.postgres = b.config(&url);
        let mut k = cloud_ingest::config::Kafka::with_brokers(tansu.to_string());
        k.readings_topic = format!("test.readings.{}", std::process::id());
        k.dlq_topic = format!("test.dlq.{}", std::process::id());
        k.alerts_topic = alerts_topic.clone();
        k.partitions = 1;
        c.kafka = Some(k);
        c.api = Some(Api::new(
            api,
            [("acme".to_owned(), TOKEN.to_owned())].into(),
        ));
        c.alerting = Alerting {
            tick_ms: 100,
            rules_reload_ms: 200,
            webhooks: vec![Webhook {
                url: format!("http://{hook}/plantlink"),
            }],
            ..Alerting::default()
        };
        c
    };
    let server = Server::bind(config.clone()).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx));
    common::api_up(api).await;

    // Rules through the API; a bad one is refused naming the field.
    let (st, created) = http(api, "POST", "/v1/alert-rules", Some(&rule("press01"))).await;
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["threshold"], 80.0);
    assert_eq!(
        http(api, "POST", "/v1/alert-rules", Some(&rule("press02")))
            .await
            .0,
        201
    );
    let mut bad = rule("x");
    bad["threshold"] = json!("hot");
    let (st, body) = http(api, "POST", "/v1/alert-rules", Some(&bad)).await;
    assert_eq!(st, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("field threshold"),
        "{body}"
    );
    let mut bad = rule("x");
    bad["window"] = json!({"kind": "sliding", "seconds": 5});
    let (st, body) = http(api, "POST", "/v1/alert-rules", Some(&bad)).await;
    assert_eq!(st, 400);
    assert!(body["error"].as_str().unwrap().contains("window"), "{body}");
    let (st, list) = http(api, "GET", "/v1/alert-rules", None).await;
    assert_eq!((st, list["rules"].as_array().unwrap().len()), (200, 2));
    let (st, one) = http(api, "GET", &format!("/v1/alert-rules/{id}"), None).await;
    assert_eq!(
        (st, one["name"].as_str()),
        (200, Some("press01 overheating"))
    );

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("alerting-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    let config_agent = common::Agent {
        gateway: "gw-al",
        mqtt: Some((broker.port, &client_id, "plant/{device}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 200\nbatch_linger_ms = 20",
    }
    .config(&d.0);
    let (agent_stop_tx, mut agent_stop) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(edge_agent::agent::run_until(config_agent, async move {
        let _ = agent_stop.changed().await;
    }));
    let mut o = MqttOptions::new(
        format!("alerting-pub-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    o.set_inflight(100);
    let (publisher, mut pel) = AsyncClient::new(o, 1000);
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let publish =
        |device: &'static str, from_ms: i64, n: i64, step_ms: i64, value: fn(i64) -> f64| {
            let publisher = publisher.clone();
            async move {
                for i in 0..n {
                    let body = format!(
                        r#"{{"ts": {}, "temperature": {}}}"#,
                        from_ms + i * step_ms,
                        value(i)
                    );
                    publisher
                        .publish(format!("plant/{device}"), QoS::AtLeastOnce, false, body)
                        .await
                        .unwrap();
                }
            }
        };

    // Readings stored before the uplink first connects travel as backlog (backfill): wait
    // for it with one warm-up reading, so that what follows is live.
    publish("warmup", now_ms, 1, 1, |_| 1.0).await;
    let start = Instant::now();
    loop {
        let n: i64 = pgc
            .query_one(
                "SELECT count(*) FROM raw_metrics WHERE device_id = 'warmup'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the uplink did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. Live: hot until the alert is in the table, then cool until it is resolved. Event
    // time runs 200 ms per reading, so each round of 10 readings covers a 2 s window.
    let mut t = now_ms;
    let start = Instant::now();
    while alert_rows(&pgc, "press01").await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "no alert fired");
        publish("press01", t, 10, 200, |_| 95.0).await;
        t += 2_000;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    while alert_rows(&pgc, "press01").await != [("resolved".to_owned(), false)] {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{:?}",
            alert_rows(&pgc, "press01").await
        );
        publish("press01", t, 10, 200, |_| 20.0).await;
        t += 2_000;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The webhook got both transitions, in order.
    let firing = tokio::time::timeout(Duration::from_secs(10), hooks.recv())
        .await
        .unwrap()
        .unwrap();
    let resolved = tokio::time::timeout(Duration::from_secs(10), hooks.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (firing["state"].as_str(), resolved["state"].as_str()),
        (Some("firing"), Some("resolved"))
    );
    for e in [&firing, &resolved] {
        assert_eq!(e["rule_id"], id);
        assert_eq!(e["device_id"], "press01");
        assert_eq!(e["severity"], "critical");
        assert_eq!(e["threshold"], 80.0);
        assert_eq!(e["backfill"], false);
        assert!(e["window_start"].is_string() && e["window_end"].is_string());
    }
    assert!(firing["value"].as_f64().unwrap() > 80.0);
    assert!(resolved["value"].as_f64().unwrap() <= 80.0);
    let (st, listed) = http(api, "GET", "/v1/alerts?state=resolved", None).await;
    assert_eq!(st, 200);
    assert_eq!(listed["alerts"][0]["device_id"], "press01");
    assert_eq!(http(api, "GET", "/v1/alerts?state=open", None).await.0, 400);

    // 2. Replay: cloud-ingest goes down; a 10-minute backlog of press02 that crossed the
    // threshold (minutes 3 to 5) piles up at the gateway; cloud-ingest comes back on the same
    // address and the backlog is replayed.
    let _ = stop_tx.send(true);
    cloud.await.unwrap().unwrap();
    let backlog_from = now_ms - 15 * 60_000;
    publish("press02", backlog_from, 600, 1_000, |i| {
        if (180..300).contains(&i) { 99.0 } else { 30.0 }
    })
    .await;
    let queue = d.0.join("queue.db");
    let start = Instant::now();
    loop {
        let q = edge_agent::store::open_read_only(&queue).unwrap();
        if edge_agent::store::stats(&q).unwrap().readings >= 600 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "backlog not queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut again = config.clone();
    again.quic.bind = cloud_addr;
    let server = Server::bind(again).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx));
    let start = Instant::now();
    while alert_rows(&pgc, "press02").await != [("resolved".to_owned(), true)] {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{:?}",
            alert_rows(&pgc, "press02").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // On Kafka: press01's live pair and press02's backfill pair, keyed by device.
    let (events, _) = {
        let (b, t) = (tansu.to_string(), alerts_topic.clone());
        tokio::task::spawn_blocking(move || common::consume_all(&b, &t, 4, Duration::from_secs(30)))
            .await
            .unwrap()
    };
    let got: Vec<(String, String, bool)> = events
        .iter()
        .map(|(k, _, v, _)| {
            (
                k.clone(),
                v["state"].as_str().unwrap().to_owned(),
                v["backfill"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("press01".into(), "firing".into(), false),
            ("press01".into(), "resolved".into(), false),
            ("press02".into(), "firing".into(), true),
            ("press02".into(), "resolved".into(), true),
        ]
    );
    // The webhook got nothing for the backfill (its events were delivered to Kafka after
    // the table, and webhooks come after Kafka: by now they would have been queued).
    assert!(
        hooks.try_recv().is_err(),
        "the webhook got a backfill alert"
    );
    let (_, listed) = http(api, "GET", "/v1/alerts?backfill=true", None).await;
    assert_eq!(listed["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(listed["alerts"][0]["device_id"], "press02");

    let _ = agent_stop_tx.send(true);
    agent.await.unwrap().unwrap();
    let _ = stop_tx.send(true);
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
