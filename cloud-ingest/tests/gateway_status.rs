//! The gateway's status page (`/` on the agent's `[metrics] bind`), rendered by a real
//! headless Chromium against a real agent: Mosquitto in front, cloud-ingest over QUIC and
//! PostgreSQL behind.
//!
//! 1. Connected: a device floods over its rate limit, another sends a few readings, and one
//!    payload is not JSON. The page says "connected", lists the flooding device first by
//!    rate, and its figures are exactly those of `edge-agent queue stats --json`
//!    ([`store::stats`], which that command prints).
//! 2. Down: cloud-ingest stops. The page says "down" with the error that ended the session,
//!    and the readings published since (within the burst) wait in the queue, again with the same figures as
//!    `queue stats`, down to the oldest reading's microsecond.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloud_ingest::server::Server;
use common::{Dir, dom_attr, dom_text, dom_value};
use edge_agent::store;
use serde_json::json;

/// `/status.json`, parsed.
fn status(addr: SocketAddr) -> Option<serde_json::Value> {
    let text = common::http_get(addr, "/status.json", None)?;
    let body = &text[text.find("\r\n\r\n")? + 4..];
    serde_json::from_str(body).ok()
}

/// Waits until `ok` holds of `/status.json`.
async fn wait_status(
    addr: SocketAddr,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(s) = status(addr)
            && ok(&s)
        {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: {:#?}",
            status(addr)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `bodies` on `topic` and waits for every PUBACK.
async fn publish(port: u16, id: &str, topic: &str, bodies: Vec<String>) {
    let messages = bodies.into_iter().map(|b| (topic.to_owned(), b)).collect();
    common::publish_all(port, id, messages).await;
}

/// The page's DOM as Chromium built it, off the runtime's threads (Chromium takes seconds).
async fn browse(profile: &std::path::Path, url: &str) -> String {
    let (profile, url) = (profile.to_owned(), url.to_owned());
    tokio::task::spawn_blocking(move || common::browser_dom(&profile, &url, 1000))
        .await
        .unwrap()
}

async fn screenshot(
    profile: &std::path::Path,
    url: &str,
    name: &'static str,
) -> std::path::PathBuf {
    let (profile, url) = (profile.to_owned(), url.to_owned());
    tokio::task::spawn_blocking(move || common::browser_screenshot(&profile, &url, name, 900))
        .await
        .unwrap()
}

fn readings(device: &str, from_ms: i64, n: i64) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"sensor_id": "{device}", "measurement": "temperature", "value": {}.5, "ts": {}}}"#,
                20 + i % 7,
                from_ms + i
            )
        })
        .collect()
}

/// The page's figures against `queue stats`, read now (the agent is idle: nothing changes
/// between the two reads).
fn same_figures(dom: &str, queue: &std::path::Path) -> store::QueueStats {
    let s = store::stats(&store::open_read_only(queue).unwrap()).unwrap();
    let v = |id: &str| {
        dom_value(dom, id)
            .unwrap_or_else(|| panic!("no figure {id} on the page"))
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(v("queue-readings"), s.readings);
    assert_eq!(v("queue-bytes"), s.bytes);
    assert_eq!(v("queue-devices"), s.devices);
    assert_eq!(v("queue-evicted"), s.evicted);
    assert_eq!(v("queue-quarantined"), s.quarantined);
    assert_eq!(v("dead-letters"), s.dead_letters);
    assert_eq!(v("schema-version"), s.schema_set_version);
    assert_eq!(
        v("queue-rate-limited"),
        s.per_device.iter().map(|d| d.rate_limited).sum::<u64>()
    );
    assert_eq!(
        dom_attr(dom, "queue-oldest", "data-us").map(|t| t.parse::<i64>().unwrap()),
        s.oldest_ts
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_shows_the_uplink_and_the_queue_as_queue_stats_does() {
    let d = Dir::new("gateway-status");
    common::fleet(&d.0, "gw-status");
    let pid = std::process::id();
    let db = format!("plantlink_test_gateway_status_{pid}");
    let (admin, url, pgc) = common::database(&db).await;
    let cloud_addr: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let mut config = common::cloud_config(&d.0, url, 16, 8 << 20);
    config.quic.bind = cloud_addr;
    let server = Server::bind(config).unwrap();
    let (cloud_stop, cloud_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(cloud_rx));

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("gw-status-{pid}");
    let mut agent = common::Agent {
        gateway: "gw-status",
        mqtt: Some((broker.port, &client_id, "plant/{site}/{line}/{device}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 100\nbatch_linger_ms = 20",
    }
    .config(&d.0);
    let page: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    agent.metrics = Some(edge_agent::config::Metrics { bind: page });
    agent.limits.per_device_per_sec = 5.0;
    agent.limits.burst = 20.0;
    common::create_session(broker.port, &client_id).await;
    let (agent_stop, mut agent_rx) = tokio::sync::watch::channel(false);
    let agent_task = tokio::spawn(edge_agent::agent::run_until(agent, async move {
        let _ = agent_rx.changed().await;
    }));
    let queue = d.0.join("queue.db");
    let profile = d.0.join("chromium");
    let url = format!("http://{page}/");

    // 1. Connected.
    wait_status(page, "uplink connected", |s| {
        s["uplink"]["connected"] == true
    })
    .await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    publish(
        broker.port,
        &format!("pub-a-{pid}"),
        "plant/p1/l1/press01",
        readings("press01", now_ms, 10),
    )
    .await;
    publish(
        broker.port,
        &format!("pub-b-{pid}"),
        "plant/p1/l1/flood01",
        readings("flood01", now_ms, 300),
    )
    .await;
    publish(
        broker.port,
        &format!("pub-c-{pid}"),
        "plant/p1/l1/press01",
        vec!["not json at all".to_owned()],
    )
    .await;
    // The flooding device leads the rates while it floods (the writer measures about once
    // a second).
    let s = wait_status(page, "flood01 the busiest device", |s| {
        s["top_devices"][0]["device"] == "flood01"
    })
    .await;
    println!("busiest devices: {}", s["top_devices"]);
    // Then everything stored is shipped.
    let s = wait_status(page, "queue shipped", |s| {
        s["queue"]["readings"] == 0 && s["queue"]["dead_letters"] == 1
    })
    .await;
    assert!(s["uplink"]["last_ack_us"].is_i64(), "{s:#}");
    let dom = browse(&profile, &url).await;
    assert_eq!(
        dom_value(&dom, "uplink-state").as_deref(),
        Some("connected")
    );
    assert_eq!(dom_text(&dom, "gateway").as_deref(), Some("gw-status"));
    let stats = same_figures(&dom, &queue);
    let limited = stats
        .per_device
        .iter()
        .find(|d| d.device == "flood01")
        .unwrap();
    assert!(limited.rate_limited >= 200, "{limited:?}");
    let dead = store::dead_letters(&store::open_read_only(&queue).unwrap(), 5).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dom.contains(&format!("data-reason=\"{}\"", dead[0].reason)),
        "the dead letter's reason ({}) is listed",
        dead[0].reason
    );
    assert!(
        dom.contains(&format!("data-id=\"{}\"", dead[0].id)),
        "the newest dead letter is listed"
    );
    assert!(
        dom.contains("plant/p1/l1/press01"),
        "the newest dead letter's topic"
    );
    let stored: i64 = pgc
        .query_one(
            "SELECT count(*) FROM raw_metrics WHERE device_id IN ('press01', 'flood01')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored as u64,
        10 + 300 - limited.rate_limited,
        "what was not rate-limited reached PostgreSQL"
    );
    let shot = screenshot(&profile, &url, "gateway-status-connected").await;
    println!("screenshot: {}", shot.display());

    // 2. Down: the cloud stops; what arrives waits in the queue.
    let _ = cloud_stop.send(true);
    cloud.await.unwrap().unwrap();
    let s = wait_status(page, "uplink down with its error", |s| {
        s["uplink"]["connected"] == false && s["uplink"]["last_error"].is_string()
    })
    .await;
    println!("uplink error: {}", s["uplink"]["last_error"]);
    publish(
        broker.port,
        &format!("pub-d-{pid}"),
        "plant/p1/l1/press02",
        readings("press02", now_ms + 1000, 15),
    )
    .await;
    let s = wait_status(page, "15 readings waiting", |s| {
        s["queue"]["readings"] == 15
    })
    .await;
    // The JSON's queue is `queue stats --json`, field for field (but the file's size, which
    // any background write of the agent's may change).
    let fresh = store::stats(&store::open_read_only(&queue).unwrap()).unwrap();
    let mut theirs = serde_json::to_value(&fresh).unwrap();
    let mut ours = s["queue"].clone();
    theirs["file_bytes"] = json!(null);
    ours["file_bytes"] = json!(null);
    assert_eq!(ours, theirs);
    let dom = browse(&profile, &url).await;
    assert_eq!(dom_value(&dom, "uplink-state").as_deref(), Some("down"));
    let error = dom_text(&dom, "uplink-error").unwrap();
    assert!(!error.is_empty() && error != "none", "{error}");
    let stats = same_figures(&dom, &queue);
    assert_eq!(stats.readings, 15);
    assert_eq!(stats.oldest_ts, Some((now_ms + 1000) * 1000));
    let shot = screenshot(&profile, &url, "gateway-status-down").await;
    println!("screenshot: {}", shot.display());

    // Read-only: anything but GET and HEAD is refused, and unknown paths are 404.
    let post = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(page).unwrap();
        c.write_all(b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        let mut t = String::new();
        c.read_to_string(&mut t).unwrap();
        t
    };
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let missing = common::http_get(page, "/nothing", None).unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let metrics = common::scrape(page).unwrap();
    assert!(
        metrics.contains("plantlink_edge_queue_readings 15"),
        "{metrics}"
    );

    let _ = agent_stop.send(true);
    agent_task.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
