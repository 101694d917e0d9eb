//! A slow database holds the cloud's memory bounded, and both programs' `/metrics` tell the
//! story. The real cloud-ingest binary runs with a budget of 10,000 pending readings; an
//! agent holds a 300,000-reading backlog. While a transaction holds `raw_metrics` locked,
//! the cloud takes in no more than its budget plus one batch per stream (QUIC flow control
//! holds back the rest in the agent's queue), and nothing is acknowledged; once the lock
//! goes, everything lands exactly once and the counters on both sides add up.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Dir;

const TOKEN: &str = "acme-token-0123456789abcdef";

/// `GET /v1/pipeline/lag` as tenant acme: gateway gw-bp's entry.
fn lag(api: SocketAddr) -> serde_json::Value {
    let text = common::http_get(api, "/v1/pipeline/lag", Some(TOKEN)).unwrap();
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["gateways"]["gw-bp"].clone()
}

/// The value of a series (`name` or `name{labels}`) in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_table_holds_memory_bounded_and_metrics_add_up() {
    const BACKLOG: usize = 300_000;
    const BUDGET: usize = 10_000;
    const BATCH: usize = 5_000;
    let d = Dir::new("backpressure");
    common::fleet(&d.0, "gw-bp");
    let db = format!("plantlink_test_backpressure_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;

    // The backlog: readings of the reference dataset, moved to today.
    let mut readings =
        firmware_sim::refdata::generate(&firmware_sim::refdata::RefSpec::reference(7));
    readings.truncate(BACKLOG);
    let shift = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - readings[0].ts.0
        - 3_600_000_000;
    let shifted_at = Instant::now();
    let mut store = edge_agent::store::Store::open(edge_agent::store::Options {
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
    store.begin(1).unwrap();
    for r in &mut readings {
        r.ts.0 += shift;
        store.insert(r).unwrap();
    }
    store.commit().unwrap();
    drop(store);

    let cloud_port = common::free_tcp_port();
    let cloud_metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let cloud_cfg = d.0.join("cloud.toml");
    std::fs::write(
        &cloud_cfg,
        format!(
            "[quic]\nbind = \"127.0.0.1:{cloud_port}\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
             client_ca = \"ca.pem\"\n[postgres]\nurl = \"{url}\"\nmax_pending_readings = {BUDGET}\n\
             flush_max_readings = {BATCH}\n[metrics]\nbind = \"{cloud_metrics}\"\n\
             [api]\nbind = \"{api}\"\n[api.tokens]\nacme = \"{TOKEN}\"\n"
        ),
    )
    .unwrap();
    let cloud = common::Proc(
        Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args(["run", "--config"])
            .arg(&cloud_cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_for("the cloud's /metrics", Duration::from_secs(30), || {
        common::scrape(cloud_metrics).is_some()
    })
    .await;
    let before = common::scrape(cloud_metrics).unwrap();
    for series in [
        "plantlink_cloud_readings_received_total",
        "plantlink_cloud_readings_written_total{sink=\"postgres\"}",
        "plantlink_cloud_connections",
        "plantlink_cloud_pending_readings",
        "plantlink_cloud_batches_rejected_total{reason=\"malformed\"}",
    ] {
        assert_eq!(value(&before, series), Some(0.0), "{series} in\n{before}");
    }

    // The database turns slow: a transaction holds the table.
    let (mut locker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE raw_metrics IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let agent_metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let config = common::Agent {
        gateway: "gw-bp",
        mqtt: None,
        cloud: format!("127.0.0.1:{cloud_port}"),
        store: "",
        uplink: &format!(
            "batch_max_readings = {BATCH}\nmax_in_flight = 64\nbacklog_rate = 10000000\n\
             [metrics]\nbind = \"{agent_metrics}\""
        ),
    }
    .config(&d.0);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = stop_rx.changed().await;
    }));

    // The pipeline fills up to its budget and stops there.
    wait_for("the budget to fill", Duration::from_secs(60), || {
        common::scrape(cloud_metrics)
            .and_then(|t| value(&t, "plantlink_cloud_pending_readings"))
            .is_some_and(|p| p >= (BUDGET - BATCH) as f64)
    })
    .await;
    // However long the database stays slow, no more comes in. (Watching for something not
    // to happen takes a while by nature; two seconds is fifty times a batch's transfer.)
    let mut peak_rss = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let t = common::scrape(cloud_metrics).unwrap();
        let received = value(&t, "plantlink_cloud_readings_received_total").unwrap();
        let written = value(
            &t,
            "plantlink_cloud_readings_written_total{sink=\"postgres\"}",
        )
        .unwrap();
        assert_eq!(written, 0.0, "written while the table was locked");
        // The budget, plus at most one decoded batch waiting at each of the two streams.
        assert!(
            received <= (BUDGET + 2 * BATCH) as f64,
            "{received} readings taken in with a budget of {BUDGET}"
        );
        peak_rss = peak_rss.max(rss_kib(cloud.0.id()));
        let a = common::scrape(agent_metrics).unwrap();
        assert_eq!(value(&a, "plantlink_edge_readings_acked_total"), Some(0.0));
        assert_eq!(value(&a, "plantlink_edge_uplink_connected"), Some(1.0));
    }
    eprintln!("cloud-ingest peak RSS while blocked: {peak_rss} KiB");
    // 300,000 readings decoded would take well over 100 MiB; the budget keeps it small.
    // The API shows the stall: the gateway's own report of its queue, nothing acked.
    let start = Instant::now();
    let g = loop {
        let g = lag(api);
        if !g["queue"].is_null() {
            break g;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no queue report: {g}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(g["queue"]["queued_readings"], BACKLOG as u64, "{g}");
    // Both ends speak uplink revision 1.1: the report has the queue's bytes, as the agent's
    // gauge has them, and the age of the oldest reading, moved to an hour before the start.
    let a = common::scrape(agent_metrics).unwrap();
    assert_eq!(
        g["queue"]["queued_bytes"].as_f64(),
        value(&a, "plantlink_edge_queue_bytes"),
        "{g}"
    );
    let age = g["queue"]["oldest_age_seconds"].as_f64().unwrap();
    let most = 3600.0 + shifted_at.elapsed().as_secs_f64();
    assert!(
        (3600.0..=most).contains(&age),
        "oldest age {age} s, not in 3600..={most}: {g}"
    );
    assert_eq!(g["connections"], 1);
    assert_eq!(g["batches_acked"], 0);
    assert!(g["readings_in_flight"].as_u64().unwrap() > 0, "{g}");
    assert!(
        peak_rss < 56 * 1024,
        "cloud-ingest RSS {peak_rss} KiB while PostgreSQL was blocked"
    );

    // The database recovers: everything lands, once.
    lock.rollback().await.unwrap();
    let start = Instant::now();
    loop {
        let n: i64 = pgc
            .query_one("SELECT count(*) FROM raw_metrics", &[])
            .await
            .unwrap()
            .get(0);
        if n == BACKLOG as i64 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{n} rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(
        "the agent to see every ack",
        Duration::from_secs(30),
        || {
            common::scrape(agent_metrics)
                .and_then(|t| value(&t, "plantlink_edge_readings_acked_total"))
                .is_some_and(|v| v == BACKLOG as f64)
        },
    )
    .await;
    // The next queue report says it is empty.
    let start = Instant::now();
    while lag(api)["queue"]["queued_readings"] != 0 {
        assert!(start.elapsed() < Duration::from_secs(15), "{}", lag(api));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let g = lag(api);
    assert_eq!(
        g["queue"]["oldest_age_seconds"],
        serde_json::Value::Null,
        "{g}"
    );
    assert_eq!(g["readings_acked"], BACKLOG as u64, "{g}");
    assert_eq!(g["readings_in_flight"], 0, "{g}");
    let c = common::scrape(cloud_metrics).unwrap();
    let a = common::scrape(agent_metrics).unwrap();
    let n = BACKLOG as f64;
    assert_eq!(
        value(
            &c,
            "plantlink_cloud_readings_written_total{sink=\"postgres\"}"
        ),
        Some(n)
    );
    assert!(value(&c, "plantlink_cloud_readings_received_total").unwrap() >= n);
    assert_eq!(value(&c, "plantlink_cloud_connections"), Some(1.0));
    assert_eq!(value(&c, "plantlink_cloud_pending_readings"), Some(0.0));
    assert!(value(&a, "plantlink_edge_batches_acked_total").unwrap() >= n / BATCH as f64);
    assert!(value(&a, "plantlink_edge_uplink_bytes_sent_total").unwrap() > 0.0);
    assert_eq!(
        value(&a, "plantlink_edge_uplink_reconnects_total"),
        Some(0.0)
    );
    let distinct: i64 = pgc
        .query_one(
            "SELECT count(DISTINCT (device_id, metric_name, ts)) FROM raw_metrics",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, BACKLOG as i64);

    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    drop(cloud);
    drop((pgc, locker));
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
