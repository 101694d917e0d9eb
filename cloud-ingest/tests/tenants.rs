//! Two tenants in one database, end to end over QUIC with a real PostgreSQL and a Kafka-API
//! broker (Tansu): gateways of acme and beta send the same device, metric and timestamps
//! with different values.
//!
//! - Both tenants' readings are stored; each tenant's API shows only its own, in raw, 1h,
//!   1d, latest and aggregate; rollups are per tenant; an alert fires for the tenant whose
//!   values cross its rule and not for the other.
//! - Kafka records carry the tenant in their identity headers.
//! - A second acme gateway sending the same identities with other values is a conflict:
//!   counted per tenant in `/metrics`, on the DLQ with reason `conflict`, in the API's
//!   pipeline status for that gateway; the first values stay. Replays count nothing.
//!
//! Both tests run on both storage flavours (TimescaleDB on a private cluster, skipped loudly
//! where its files are not installed).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloud_ingest::config::{Alerting, Api};
use cloud_ingest::quic;
use cloud_ingest::server::Server;
use common::timescale::Backend;
use common::{Dir, client, connect, http_json};
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Ack, Batch, Frame, Lane};
use serde_json::{Value, json};

const ACME: &str = "acme-token-0123456789abcdef";
const BETA: &str = "beta-token-0123456789abcdef";
const N: i64 = 300;

/// `N` readings of pump-1, one every 100 ms ending now, with values around `base`.
fn pump(start_ms: i64, base: f64) -> Vec<Reading> {
    (0..N)
        .map(|i| {
            Reading::new(
                "claimed",
                "pump-1",
                "temperature",
                Timestamp((start_ms + i * 100) * 1000),
                base + (i % 5) as f64,
            )
        })
        .collect()
}

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

async fn until(what: &str, limit: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn get(api: SocketAddr, path: &str, token: &str) -> Value {
    let (st, body) = http_json(api, "GET", path, token, None);
    assert_eq!(st, 200, "{path}: {body}");
    body
}

/// Every value of every point of a device-series answer (`value` for raw, else `avg`).
fn values(body: &Value) -> Vec<f64> {
    body["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_f64().or(p["avg"].as_f64()).unwrap())
        .collect()
}

fn counts(body: &Value) -> i64 {
    body["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_i64().unwrap_or(1))
        .sum()
}

/// `tenant`'s `plantlink_cloud_readings_conflicting_total` in a scrape.
fn conflicting(text: &str, tenant: &str) -> Option<u64> {
    text.lines()
        .find(|l| {
            l.starts_with("plantlink_cloud_readings_conflicting_total")
                && l.contains(&format!("tenant=\"{tenant}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_one_device_name_and_a_conflicting_gateway() {
    // One exporter for the process: counters carry over from one flavour's run to the next.
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    cloud_ingest::telemetry::install(metrics).unwrap();
    for b in Backend::all("tenants") {
        eprintln!("two tenants on {}", b.name());
        two_tenants_on(&b, metrics).await;
    }
}

async fn two_tenants_on(b: &Backend, metrics: SocketAddr) {
    let d = Dir::new("tenants");
    common::fleet(&d.0, "gw-a");
    cloud_ingest::pki::gateway(&d.0, "gw-b", "beta", 365).unwrap();
    cloud_ingest::pki::gateway(&d.0, "gw-a2", "acme", 365).unwrap();
    let db = format!("plantlink_test_tenants_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let earlier = common::scrape(metrics)
        .and_then(|t| conflicting(&t, "acme"))
        .unwrap_or(0);
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let pid = std::process::id();
    let (readings_topic, dlq_topic) = (
        format!("test.tn.readings.{pid}"),
        format!("test.tn.dlq.{pid}"),
    );
    let config = {
        let mut c = common::cloud_config(&d.0, url.clone(), 16, 8 << 20);
        c.postgres = b.config(&url);
        let mut k = cloud_ingest::config::Kafka::with_brokers(tansu.to_string());
        k.readings_topic = readings_topic.clone();
        k.dlq_topic = dlq_topic.clone();
        k.alerts_topic = format!("test.tn.alerts.{pid}");
        k.partitions = 1;
        c.kafka = Some(k);
        c.api = Some(Api::new(
            api,
            [
                ("acme".to_owned(), ACME.to_owned()),
                ("beta".to_owned(), BETA.to_owned()),
            ]
            .into(),
        ));
        c.alerting = Alerting {
            tick_ms: 100,
            rules_reload_ms: 200,
            ..Alerting::default()
        };
        c.postgres.rollup_interval_ms = 200;
        c
    };
    // The same rule for both tenants: pump-1 averaging over 50 for 2 s. Stored before the
    // start, as the API stores them, so the engine has them before any gateway is admitted.
    let rule = json!({"name": "pump-1 hot", "metric": "temperature",
        "selector": {"device_id": "pump-1"}, "aggregate": "avg", "op": ">", "threshold": 50.0,
        "window": {"kind": "tumbling", "seconds": 2}, "for_windows": 1, "severity": "critical"});
    for tenant in ["acme", "beta"] {
        pgc.execute(
            "INSERT INTO alert_rules (tenant_id, name, metric_name, condition_expr, threshold,
                                      window_seconds, severity)
             VALUES ($1, 'pump-1 hot', 'temperature', $2::text::jsonb, 50, 2, 'critical')",
            &[&tenant, &rule.to_string()],
        )
        .await
        .unwrap();
    }
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx));
    until("the API", Duration::from_secs(30), async || {
        tokio::net::TcpStream::connect(api).await.is_ok()
    })
    .await;
    for token in [ACME, BETA] {
        let (st, body) = http_json(api, "GET", "/v1/alert-rules", token, None);
        assert_eq!(
            (st, body["rules"].as_array().map(Vec::len)),
            (200, Some(1)),
            "{body}"
        );
    }

    let ep = |gw: &str| client(&d.0.join("ca.pem"), Some((&d.0, gw)));
    let (ep_a, ep_b, ep_a2) = (ep("gw-a"), ep("gw-b"), ep("gw-a2"));
    let gw_a = connect(&ep_a, cloud_addr, "gw-a").await;
    let gw_b = connect(&ep_b, cloud_addr, "gw-b").await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let start_ms = now_ms - N * 100;
    let acme = pump(start_ms, 20.0);
    let beta = pump(start_ms, 90.0);
    assert_eq!(send(&gw_a, 1, &acme).await, Frame::Ack(Ack { seq: 1 }));
    assert_eq!(send(&gw_b, 1, &beta).await, Frame::Ack(Ack { seq: 1 }));

    // 1. Both stored, each under its own tenant.
    for (tenant, sum) in [
        ("acme", 20.0 * N as f64 + 600.0),
        ("beta", 90.0 * N as f64 + 600.0),
    ] {
        let row = pgc
            .query_one(
                "SELECT count(*), sum(value) FROM raw_metrics WHERE tenant_id = $1 AND device_id = 'pump-1'",
                &[&tenant],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, f64>(1)),
            (N, sum),
            "{tenant}"
        );
    }

    // 2. Each tenant's API shows its own: raw, 1h, 1d, latest, aggregate. Plain PostgreSQL
    // rolls up in the upkeep; TimescaleDB's real-time aggregates answer the current hour at
    // once (its marks wait in rollup_dirty until the hour is complete).
    let marks = match b {
        Backend::Plain => "(SELECT count(*) FROM rollup_dirty)",
        Backend::Timescale(_) => "0",
    };
    until("the rollups", Duration::from_secs(30), async || {
        let n: i64 = pgc
            .query_one(
                &format!(
                    "SELECT {marks}
                          + (2 - (SELECT count(DISTINCT tenant_id) FROM downsampled_metrics_1d))"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    let from = cloud_ingest::kafka::rfc3339(start_ms * 1000 - 86_400_000_000);
    for (token, lo, hi) in [(ACME, 20.0, 24.0), (BETA, 90.0, 94.0)] {
        for res in ["raw", "1h", "1d"] {
            let body = get(
                api,
                &format!(
                    "/v1/devices/pump-1/metrics?metric=temperature&from={from}&resolution={res}"
                ),
                token,
            );
            let v = values(&body);
            assert!(!v.is_empty(), "{res}: {body}");
            assert!(
                v.iter().all(|x| (lo..=hi).contains(x)),
                "{res}: {v:?} outside {lo}..{hi}"
            );
            assert_eq!(counts(&body), N, "{res}: {body}");
        }
        let latest = get(api, "/v1/devices/pump-1/metrics/latest", token);
        let last = latest["metrics"]["temperature"]["value"].as_f64().unwrap();
        assert_eq!(last, lo + ((N - 1) % 5) as f64, "{latest}");
        let tenant = if token == ACME { "acme" } else { "beta" };
        for res in ["raw", "1h", "1d"] {
            let body = get(
                api,
                &format!(
                    "/v1/tenants/{tenant}/metrics/aggregate?metric=temperature&agg=max&from={from}&resolution={res}"
                ),
                token,
            );
            assert_eq!(body["value"].as_f64(), Some(hi), "{res}: {body}");
            assert_eq!(body["devices"], 1, "{body}");
        }
    }

    // 3. Alerts per tenant: beta's pump-1 is hot, acme's is not.
    until("beta's alert", Duration::from_secs(30), async || {
        let (_, body) = http_json(api, "GET", "/v1/alerts", BETA, None);
        body["alerts"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let (_, body) = http_json(api, "GET", "/v1/alerts", BETA, None);
    assert!(
        body["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["device_id"] == "pump-1"),
        "{body}"
    );
    let (_, body) = http_json(api, "GET", "/v1/alerts", ACME, None);
    assert_eq!(
        body["alerts"].as_array().unwrap().len(),
        0,
        "acme's pump-1 is cool: {body}"
    );

    // 4. Kafka: the tenant header tells the two apart.
    let (seen, _) = {
        let (b, t) = (tansu.to_string(), readings_topic.clone());
        tokio::task::spawn_blocking(move || {
            common::consume_all(&b, &t, 2 * N as usize, Duration::from_secs(30))
        })
        .await
        .unwrap()
    };
    assert_eq!(seen.len(), 2 * N as usize);
    let identity = |h: &BTreeMap<String, String>, with_tenant: bool| {
        (
            with_tenant.then(|| h["plantlink-tenant"].clone()),
            h["plantlink-device"].clone(),
            h["plantlink-metric"].clone(),
            h["plantlink-ts-us"].clone(),
        )
    };
    let full: BTreeSet<_> = seen.iter().map(|s| identity(&s.3, true)).collect();
    let without: BTreeSet<_> = seen.iter().map(|s| identity(&s.3, false)).collect();
    assert_eq!(
        full.len(),
        2 * N as usize,
        "tenant + device + metric + ts is unique"
    );
    assert_eq!(
        without.len(),
        N as usize,
        "without the tenant they would collide"
    );
    for (_, _, v, h) in &seen {
        assert_eq!(v["tenant"].as_str(), Some(h["plantlink-tenant"].as_str()));
    }

    // 5. A second acme gateway with the same identities and other values: conflicts.
    let gw_a2 = connect(&ep_a2, cloud_addr, "gw-a2").await;
    let clash: Vec<Reading> = pump(start_ms, -5.0).into_iter().take(10).collect();
    assert_eq!(send(&gw_a2, 1, &clash).await, Frame::Ack(Ack { seq: 1 }));
    let text = common::scrape(metrics).unwrap();
    assert_eq!(conflicting(&text, "acme"), Some(earlier + 10), "{text}");
    assert_eq!(conflicting(&text, "beta"), None);
    let lag = get(api, "/v1/pipeline/lag", ACME);
    assert_eq!(
        lag["gateways"]["gw-a2"]["readings_conflicting"], 10,
        "{lag}"
    );
    assert_eq!(lag["gateways"]["gw-a"]["readings_conflicting"], 0, "{lag}");
    assert_eq!(lag["conflicts"]["gw-a2"]["readings"], 10, "{lag}");
    assert!(lag["conflicts"].get("gw-a").is_none(), "{lag}");
    let lag = get(api, "/v1/pipeline/lag", BETA);
    assert!(lag["gateways"].get("gw-a2").is_none(), "{lag}");
    assert_eq!(lag["conflicts"], json!({}), "{lag}");
    // The first values stay.
    let low: i64 = pgc
        .query_one("SELECT count(*) FROM raw_metrics WHERE value < 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(low, 0);
    let (dlq, _) = {
        let (b, t) = (tansu.to_string(), dlq_topic.clone());
        tokio::task::spawn_blocking(move || {
            common::consume_all(&b, &t, 10, Duration::from_secs(30))
        })
        .await
        .unwrap()
    };
    assert_eq!(dlq.len(), 10);
    for (key, _, v, _) in &dlq {
        assert_eq!(
            (key.as_str(), v["reason"].as_str()),
            ("gw-a2", Some("conflict")),
            "{v}"
        );
        assert_eq!(v["tenant"], "acme");
        let r = &v["reading"];
        assert_eq!(
            (r["device_id"].as_str(), r["metric"].as_str()),
            (Some("pump-1"), Some("temperature"))
        );
        assert!(
            r["value"].as_f64().unwrap() < 0.0 && r["stored_value"].as_f64().unwrap() >= 20.0,
            "{v}"
        );
    }

    // 6. Replays count nothing: the conflicting batch again, and acme's first batch again.
    assert_eq!(send(&gw_a2, 2, &clash).await, Frame::Ack(Ack { seq: 2 }));
    assert_eq!(send(&gw_a, 2, &acme).await, Frame::Ack(Ack { seq: 2 }));
    let text = common::scrape(metrics).unwrap();
    assert_eq!(conflicting(&text, "acme"), Some(earlier + 10), "{text}");
    let total: i64 = pgc
        .query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 2 * N);

    for c in [gw_a, gw_b, gw_a2] {
        c.close(0u32.into(), b"done");
    }
    let _ = stop_tx.send(true);
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// One plant, two lines, one device name: with `device = "{line}-{device}"` the two presses
/// stay two devices from the MQTT topic to PostgreSQL, every reading of each stored, none
/// taken for the other's (no conflict, no replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_composed_device_id_keeps_two_lines_apart_end_to_end() {
    for b in Backend::all("lines") {
        eprintln!("two lines on {}", b.name());
        two_lines_on(&b).await;
    }
}

async fn two_lines_on(b: &Backend) {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let d = Dir::new("lines");
    common::fleet(&d.0, "gw-l");
    let db = format!("plantlink_test_lines_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    let mut config = common::cloud_config(&d.0, url.clone(), 16, 8 << 20);
    config.postgres = b.config(&url);
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx.clone()));

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("lines-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    let mut config = common::Agent {
        gateway: "gw-l",
        mqtt: Some((broker.port, &client_id, "plant/{line}/{device}/{metric}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 100\nbatch_linger_ms = 20",
    }
    .config(&d.0);
    config.mqtt.as_mut().unwrap().topics[0].device = Some("{line}-{device}".into());
    let mut agent_stop = stop_rx.clone();
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = agent_stop.changed().await;
    }));

    let mut o = MqttOptions::new(
        format!("lines-pub-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    o.set_inflight(100);
    let (publisher, mut pel) = AsyncClient::new(o, 1000);
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    // Both presses stamp whole seconds: the same timestamps, different values.
    const EACH: i64 = 200;
    // An hour ago, inside the cloud's event-time window.
    let base_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 3_600;
    for i in 0..EACH {
        for (line, value) in [("l3", 20.0), ("l4", 40.0)] {
            let body = format!(
                r#"{{"ts": {}, "value": {}}}"#,
                base_s + i,
                value + (i % 3) as f64
            );
            publisher
                .publish(
                    format!("plant/{line}/press01/temperature"),
                    QoS::AtLeastOnce,
                    false,
                    body,
                )
                .await
                .unwrap();
        }
    }
    until(
        "both presses' readings",
        Duration::from_secs(60),
        async || {
            let n: i64 = pgc
                .query_one("SELECT count(*) FROM raw_metrics", &[])
                .await
                .unwrap()
                .get(0);
            n >= 2 * EACH
        },
    )
    .await;
    let rows: Vec<(String, i64, f64, String)> = pgc
        .query(
            "SELECT device_id, count(*), sum(value), min(tags->>'line') FROM raw_metrics
             GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let sum = |v: f64| (0..EACH).map(|i| v + (i % 3) as f64).sum::<f64>();
    assert_eq!(
        rows,
        vec![
            ("l3-press01".to_owned(), EACH, sum(20.0), "l3".to_owned()),
            ("l4-press01".to_owned(), EACH, sum(40.0), "l4".to_owned()),
        ]
    );
    let conflicts: i64 = pgc
        .query_one("SELECT count(*) FROM reading_conflicts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(conflicts, 0);

    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
