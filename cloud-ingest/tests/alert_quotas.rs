//! Per-tenant quotas in alerting, end to end over QUIC with a real PostgreSQL: tenant
//! `globex` floods with invented device ids under catch-all rules, over its rule, device
//! and series caps, and tenant `acme`'s alert still fires within its usual latency.
//!
//! - globex has 8 rules against a cap of 5: 3 are over the cap, in
//!   `plantlink_cloud_alert_rules_over_cap{tenant="globex"}`.
//! - globex's fakes fill its series and device caps; what is kept out is counted for globex
//!   (`..._series_dropped_total`, `..._devices_dropped_total`), never for acme.
//! - acme's latency (the send of the first reading that can close its window, to the alert
//!   row's `created_at` in PostgreSQL) is measured alone and with globex at its caps.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use cloud_ingest::config::Alerting;
use cloud_ingest::quic;
use cloud_ingest::server::Server;
use common::{Dir, client, connect};
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Batch, Frame, Lane};

/// Sends one batch on a new stream and waits for its answer.
async fn send(conn: &quinn::Connection, seq: u64, readings: &[Reading]) -> Option<Frame> {
    let (mut s, mut r) = conn.open_bi().await.ok()?;
    let frame = Frame::Batch(Batch {
        seq,
        lane: Lane::Live,
        readings: readings.len() as u32,
        payload: BatchEncoder::default().encode(readings),
    });
    quic::write_frame(&mut s, &frame).await.ok()?;
    quic::read_frame(&mut r, 1 << 16).await.ok()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The value of `name{...tenant="<tenant>"...}` on `/metrics`.
fn metric(text: &str, name: &str, tenant: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(&format!("tenant=\"{tenant}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until `ok` holds of `/metrics`.
async fn wait_metrics(addr: SocketAddr, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        if let Some(t) = common::scrape(addr)
            && ok(&t)
        {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: {:?}",
            common::scrape(addr)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const OUT_OF_ORDERNESS_MS: u64 = 1_000;

/// Sends acme's pump-1 readings at `value` every 100 ms (each batch on its own task, so a
/// slow ack does not delay the next) until an alert row of `state` newer than `after` is
/// there; returns its latency: from the send of the first reading whose event time is at
/// least the window's end plus the out-of-orderness (the first that can close the window)
/// to the row's `created_at`.
async fn until_alert(
    gw: &quinn::Connection,
    pgc: &tokio_postgres::Client,
    seq: &AtomicU64,
    value: f64,
    state: &str,
    after: i64,
) -> (i64, Duration) {
    let mut sent: Vec<(SystemTime, i64)> = Vec::new();
    let start = Instant::now();
    loop {
        let row = pgc
            .query_opt(
                "SELECT alert_id, created_at, window_end, resolved_at, resolved_window_end
                 FROM alerts WHERE tenant_id = 'acme' AND device_id = 'pump-1' AND alert_id > $1
                   AND state = $2
                 ORDER BY alert_id LIMIT 1",
                &[&after, &state],
            )
            .await
            .unwrap();
        if let Some(r) = row {
            let (at, end): (SystemTime, SystemTime) = if state == "firing" {
                (r.get(1), r.get(2))
            } else {
                (r.get(3), r.get(4))
            };
            let end_ms = end
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let closing = sent
                .iter()
                .find(|(_, ts)| *ts >= end_ms + OUT_OF_ORDERNESS_MS as i64)
                .unwrap_or_else(|| panic!("no reading closed the window ending {end_ms}"));
            return (r.get(0), at.duration_since(closing.0).unwrap_or_default());
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "acme's alert ({state}) did not come"
        );
        let ts = now_ms();
        sent.push((SystemTime::now(), ts));
        let gw = gw.clone();
        let seq = seq.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let r = Reading::new("acme", "pump-1", "temperature", Timestamp(ts * 1000), value);
            send(&gw, seq, &[r]).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rule(pgc: &tokio_postgres::Client, tenant: &str, selector: serde_json::Value, n: usize) {
    let rule = serde_json::json!({"name": format!("{tenant} hot {n}"), "metric": "temperature",
        "selector": selector, "aggregate": "avg", "op": ">", "threshold": 50.0,
        "window": {"kind": "tumbling", "seconds": 2}, "for_windows": 1, "severity": "critical"});
    pgc.execute(
        "INSERT INTO alert_rules (tenant_id, name, metric_name, condition_expr, threshold,
                                  window_seconds, severity)
         VALUES ($1, $2, 'temperature', $3::text::jsonb, 50, 2, 'critical')",
        &[&tenant, &format!("{tenant} hot {n}"), &rule.to_string()],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_at_its_caps_does_not_stop_another_tenants_alert() {
    let d = Dir::new("alert-quotas");
    common::fleet(&d.0, "gw-a");
    cloud_ingest::pki::gateway(&d.0, "gw-b", "globex", 365).unwrap();
    let pid = std::process::id();
    let db = format!("plantlink_test_alert_quotas_{pid}");
    let (admin, url, pgc) = common::database(&db).await;
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    cloud_ingest::telemetry::install(metrics).unwrap();
    let config = {
        let mut c = common::cloud_config(&d.0, url, 16, 8 << 20);
        c.alerting = Alerting {
            tick_ms: 100,
            rules_reload_ms: 200,
            out_of_orderness_ms: OUT_OF_ORDERNESS_MS,
            max_rules_per_tenant: 5,
            max_series_per_tenant: 200,
            max_devices_per_tenant: 300,
            feed_max_readings_per_tenant: 10_000,
            ..Alerting::default()
        };
        c
    };
    // acme: one rule for pump-1. globex: eight catch-all rules, three over its cap.
    rule(&pgc, "acme", serde_json::json!({"device_id": "pump-1"}), 0).await;
    for n in 0..8 {
        rule(&pgc, "globex", serde_json::json!({}), n).await;
    }
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx));
    let text = wait_metrics(metrics, "rules loaded", |t| {
        metric(t, "plantlink_cloud_alert_rules_over_cap", "globex") == Some(3.0)
    })
    .await;
    assert_eq!(
        metric(&text, "plantlink_cloud_alert_rules_over_cap", "acme"),
        Some(0.0)
    );

    let ep_a = client(&d.0.join("ca.pem"), Some((&d.0, "gw-a")));
    let gw_a = connect(&ep_a, cloud_addr, "gw-a").await;
    let seq = AtomicU64::new(1);

    // 1. acme alone: hot until firing, cool until resolved.
    let (first, alone) = until_alert(&gw_a, &pgc, &seq, 95.0, "firing", 0).await;
    let (_, alone_resolved) = until_alert(&gw_a, &pgc, &seq, 20.0, "resolved", first - 1).await;

    // 2. globex floods: batches of 1,000 readings of fresh device ids, hot, as fast as they
    // are acknowledged, on two streams at a time.
    let ep_b = client(&d.0.join("ca.pem"), Some((&d.0, "gw-b")));
    let gw_b = connect(&ep_b, cloud_addr, "gw-b").await;
    let flooding = Arc::new(AtomicBool::new(true));
    let sent_b = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for lane in 0..2u64 {
        let (gw_b, flooding, sent_b) = (gw_b.clone(), flooding.clone(), sent_b.clone());
        floods.push(tokio::spawn(async move {
            let mut seq = lane * 1_000_000;
            while flooding.load(Ordering::Relaxed) {
                let ts = now_ms() * 1000;
                let batch: Vec<Reading> = (0..1_000)
                    .map(|i| {
                        let n = sent_b.fetch_add(1, Ordering::Relaxed);
                        Reading::new(
                            "globex",
                            format!("fake-{n}"),
                            "temperature",
                            Timestamp(ts + i),
                            99.0,
                        )
                    })
                    .collect();
                seq += 1;
                assert!(
                    matches!(send(&gw_b, seq, &batch).await, Some(Frame::Ack(_))),
                    "globex's batch not acknowledged"
                );
            }
        }));
    }
    wait_metrics(metrics, "globex at its caps", |t| {
        metric(t, "plantlink_cloud_alert_tenant_series", "globex") == Some(200.0)
            && metric(t, "plantlink_cloud_alert_tenant_devices", "globex") == Some(300.0)
            && metric(t, "plantlink_cloud_alert_devices_dropped_total", "globex")
                .is_some_and(|n| n > 10_000.0)
    })
    .await;

    // 3. acme again, with globex at its caps and flooding.
    let (second, crowded) = until_alert(&gw_a, &pgc, &seq, 95.0, "firing", first).await;
    let (_, crowded_resolved) = until_alert(&gw_a, &pgc, &seq, 20.0, "resolved", second - 1).await;
    let text = common::scrape(metrics).unwrap();
    flooding.store(false, Ordering::Relaxed);
    for f in floods {
        f.await.unwrap();
    }
    let b_sent = sent_b.load(Ordering::Relaxed);
    let g = |name: &str, tenant: &str| metric(&text, name, tenant).unwrap_or(0.0);
    println!(
        "acme's alert latency (send of the closing reading -> alert row): alone {alone:?} firing, \
         {alone_resolved:?} resolved; with globex at its caps {crowded:?} firing, \
         {crowded_resolved:?} resolved. globex sent {b_sent} readings: series {}, devices {}, \
         series dropped {}, devices dropped {}, readings shed {}, rules over cap {}",
        g("plantlink_cloud_alert_tenant_series", "globex"),
        g("plantlink_cloud_alert_tenant_devices", "globex"),
        g("plantlink_cloud_alert_series_dropped_total", "globex"),
        g("plantlink_cloud_alert_devices_dropped_total", "globex"),
        g("plantlink_cloud_alert_readings_shed_total", "globex"),
        g("plantlink_cloud_alert_rules_over_cap", "globex"),
    );
    // Within the usual latency: the engine evaluates a window once the watermark passes it,
    // so the alert is as fast as a batch's trip; allow for a loaded CI machine.
    for l in [crowded, crowded_resolved] {
        assert!(
            l < Duration::from_secs(2),
            "acme's alert took {l:?} (alone {alone:?})"
        );
    }
    // What the caps kept out is globex's, never acme's.
    assert!(g("plantlink_cloud_alert_series_dropped_total", "globex") > 0.0);
    for name in [
        "plantlink_cloud_alert_series_dropped_total",
        "plantlink_cloud_alert_devices_dropped_total",
        "plantlink_cloud_alert_readings_shed_total",
    ] {
        assert_eq!(g(name, "acme"), 0.0, "{name}");
    }
    // globex's readings were all stored, whatever alerting made of them.
    let start = Instant::now();
    loop {
        let n: i64 = pgc
            .query_one(
                "SELECT count(*) FROM raw_metrics WHERE tenant_id = 'globex'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n as u64 == b_sent {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{n} of {b_sent}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    gw_a.close(0u32.into(), b"done");
    gw_b.close(0u32.into(), b"done");
    let _ = stop_tx.send(true);
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
