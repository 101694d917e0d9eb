//! R2 across the uplink: the edge agent is killed with SIGKILL three times while it ships
//! live readings (from its in-memory live lane) to cloud-ingest and PostgreSQL, and
//! Mosquitto keeps delivering QoS 1 messages. Whatever it had committed and not yet shipped,
//! or shipped and not yet seen acknowledged, goes out from the backlog after each restart:
//! in the end PostgreSQL holds every published reading exactly once, and the queue is empty.
//!
//! The agent runs in a child process (this test binary again, running [`agent_child`]), so
//! the kill is a real SIGKILL of a real process: SQLite, the MQTT session and the QUIC
//! connection all die with it. `PLANTLINK_AGENT_CRASH_MESSAGES` scales it (default 20000).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const CHILD_ENV: &str = "PLANTLINK_AGENT_CHILD_CONFIG";

/// Not a test of its own: the agent, run in the child process the test below kills.
#[test]
#[ignore = "run by agent_sigkills_lose_nothing_shipped_live, in a child process"]
fn agent_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let config = edge_agent::config::Config::load(std::path::Path::new(&path)).unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(edge_agent::agent::run_until(config, std::future::pending()))
        .unwrap();
}

fn start_agent(config: &std::path::Path) -> common::Proc {
    common::Proc(
        Command::new(std::env::current_exe().unwrap())
            .args(["agent_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

async fn count(pgc: &tokio_postgres::Client, sql: &str) -> i64 {
    pgc.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until `sql` counts at least `want`, polling the database.
async fn until(pgc: &tokio_postgres::Client, sql: &str, want: i64, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let n = count(pgc, sql).await;
        if n >= want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {n} of {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkills_lose_nothing_shipped_live() {
    let n: i64 = std::env::var("PLANTLINK_AGENT_CRASH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let d = common::Dir::new("agent-crash");
    common::fleet(&d.0, "gw-k");
    let db = format!("plantlink_test_agent_crash_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let server =
        cloud_ingest::server::Server::bind(common::cloud_config(&d.0, url, 32, 8 << 20)).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx));

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("agent-crash-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    // Small, frequent batches: at any moment some are committed and not shipped, some in
    // flight, some acknowledged and not yet deleted.
    common::Agent {
        gateway: "gw-k",
        mqtt: Some((broker.port, &client_id, "plant/{device}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 500\nbatch_linger_ms = 20",
    }
    .config(&d.0);
    let config = d.0.join("agent.toml");
    let mut agent = start_agent(&config);

    // About 4,000 messages/s, two readings each, each with its own seq.
    let (pubc, mut pel) = AsyncClient::new(
        MqttOptions::new("agent-crash-publisher", "127.0.0.1", broker.port),
        1000,
    );
    let acked = Arc::new(AtomicI64::new(0));
    {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Ok(ev) = pel.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = ev {
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    let base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for i in 0..n {
            if i % 40 == 0 {
                tick.tick().await;
            }
            let body = format!(
                r#"{{"ts": {}, "seq": {i}, "temperature": {i}, "flow": 2.5}}"#,
                base_ms + i
            );
            pubc.publish(
                format!("plant/dev-{}", i % 20),
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap();
        }
        pubc
    });

    // Three kills while readings flow: each once PostgreSQL holds another quarter.
    let total = n * 2;
    for k in 1..=3 {
        until(
            &pgc,
            "SELECT count(*) FROM raw_metrics",
            total * k / 4,
            120,
            "readings stored before a kill",
        )
        .await;
        agent.0.kill().unwrap();
        agent.0.wait().unwrap();
        let held = edge_agent::store::open_read_only(&d.0.join("queue.db"))
            .and_then(|c| edge_agent::store::stats(&c))
            .map_or(0, |s| s.readings);
        eprintln!("kill {k}: the queue held {held} readings not yet acknowledged");
        agent = start_agent(&config);
    }

    let _client = publisher.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the broker acknowledged {} of {n} messages",
            acked.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until(
        &pgc,
        "SELECT count(*) FROM raw_metrics",
        total,
        120,
        "readings stored after the kills",
    )
    .await;
    // Exactly once: every seq with both metrics and its own value, nothing else.
    assert_eq!(count(&pgc, "SELECT count(*) FROM raw_metrics").await, total);
    assert_eq!(
        count(
            &pgc,
            "SELECT count(DISTINCT seq) FROM raw_metrics WHERE metric_name = 'temperature'
               AND value = seq"
        )
        .await,
        n
    );
    assert_eq!(
        count(
            &pgc,
            "SELECT count(DISTINCT seq) FROM raw_metrics WHERE metric_name = 'flow'"
        )
        .await,
        n
    );
    assert_eq!(
        count(&pgc, "SELECT count(*) FROM reading_conflicts").await,
        0
    );
    // And the agent's queue empties: everything it holds was acknowledged.
    let queue = d.0.join("queue.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = edge_agent::store::open_read_only(&queue)
            .and_then(|c| edge_agent::store::stats(&c))
            .map_or(u64::MAX, |s| s.readings);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} readings left in the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    drop(agent);
    let _ = stop_tx.send(true);
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
