//! R3/R4 across the uplink: cloud-ingest (the real binary) is killed with SIGKILL three times
//! mid-stream and then stays down for `PLANTLINK_OUTAGE_SECS` (default 30) while devices keep
//! publishing. Readings published after it returns reach PostgreSQL while the backlog is
//! still draining (live first), and in the end every reading is there exactly once.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::Dir;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_cloud(config: &std::path::Path) -> common::Proc {
    common::Proc(
        Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

async fn rows(pgc: &tokio_postgres::Client, filter: &str) -> i64 {
    pgc.query_one(
        &format!("SELECT count(*) FROM raw_metrics WHERE {filter}"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_and_an_outage_lose_nothing_and_live_goes_first() {
    let outage: u64 = std::env::var("PLANTLINK_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let d = Dir::new("outage");
    common::fleet(&d.0, "gw-o");
    let db = format!("plantlink_test_outage_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;

    let cloud_port = free_port();
    let cloud_cfg = d.0.join("cloud.toml");
    std::fs::write(&cloud_cfg, format!(
        "[quic]\nbind = \"127.0.0.1:{cloud_port}\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n[postgres]\nurl = \"{url}\"\n"
    )).unwrap();
    let mut cloud = start_cloud(&cloud_cfg);

    let broker = common::Mosquitto::start(&d.0);
    let mport = broker.port;
    let client_id = format!("outage-{}", std::process::id());
    common::create_session(mport, &client_id).await;
    let config = common::Agent {
        gateway: "gw-o",
        mqtt: Some((mport, &client_id, "plant/{phase}/{device}")),
        cloud: format!("127.0.0.1:{cloud_port}"),
        store: "",
        uplink: "batch_max_readings = 1000\nbatch_linger_ms = 100\nbacklog_rate = 4000",
    }
    .config(&d.0);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = stop_rx.changed().await;
    }));

    // Devices publish steadily (about 1,000 messages/s, two readings each) throughout; the
    // phase in the topic marks what was published after the cloud came back.
    let phase = Arc::new(AtomicI64::new(0));
    let published = Arc::new(AtomicI64::new(0));
    let (pubc, mut pel) = AsyncClient::new(
        MqttOptions::new("outage-publisher", "127.0.0.1", mport),
        1000,
    );
    // What counts as published is what the broker acknowledged.
    let acked = Arc::new(AtomicI64::new(0));
    // Current timestamps: readings older than the raw retention (7 days) would be dropped
    // with their partition when the restarted cloud-ingest does its upkeep.
    let base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let publisher = {
        let (phase, published) = (phase.clone(), published.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0i64;
            loop {
                tick.tick().await;
                let p = phase.load(Ordering::SeqCst);
                if p == 2 {
                    break;
                }
                for _ in 0..10 {
                    let name = if p == 1 { "after" } else { "before" };
                    let body = format!(
                        r#"{{"ts": {}, "seq": {i}, "temperature": 1.5, "flow": 2.5}}"#,
                        base_ms + i
                    );
                    pubc.publish(
                        format!("plant/{name}/dev-{}", i % 20),
                        QoS::AtLeastOnce,
                        false,
                        body,
                    )
                    .await
                    .unwrap();
                    i += 1;
                }
                published.store(i, Ordering::SeqCst);
            }
            pubc // kept alive until everything queued has been acknowledged
        })
    };
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

    // Three SIGKILLs at different points, each followed by a restart.
    for wait_ms in [700u64, 1300, 900] {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        cloud.0.kill().unwrap();
        cloud.0.wait().unwrap();
        cloud = start_cloud(&cloud_cfg);
    }
    // The outage.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.0.kill().unwrap();
    cloud.0.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(outage)).await;
    let backlog_published = published.load(Ordering::SeqCst) * 2;
    phase.store(1, Ordering::SeqCst);
    cloud = start_cloud(&cloud_cfg);

    // Live first: the first "after" readings arrive while "before" readings are still missing.
    let start = Instant::now();
    loop {
        if rows(&pgc, "tags->>'phase' = 'after'").await > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no live reading arrived after the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_stored = rows(&pgc, "tags->>'phase' = 'before'").await;
    assert!(
        before_stored < backlog_published,
        "live readings should arrive before the backlog is drained: {before_stored} of {backlog_published} backlog readings were already in"
    );

    // Then everything, exactly once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    phase.store(2, Ordering::SeqCst);
    let _client = publisher.await.unwrap();
    let sent = published.load(Ordering::SeqCst);
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < sent {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the broker did not acknowledge everything"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = sent * 2;
    let start = Instant::now();
    loop {
        let n = rows(&pgc, "true").await;
        if n >= total {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let missing: Vec<i64> = pgc
                .query(&format!("SELECT s::bigint FROM generate_series(0, {}) s WHERE s NOT IN (SELECT seq FROM raw_metrics) LIMIT 20", sent - 1), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let q = queue_count(&d.0.join("queue.db"));
            panic!(
                "{n} of {total} readings after {:?}; missing seqs {missing:?}; agent queue (count, min id, max id) {q}",
                start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = pgc
        .query_one(
            "SELECT count(*), count(DISTINCT (seq, metric_name)) FROM raw_metrics",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (total, total));

    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    drop(cloud);
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

fn queue_count(db: &std::path::Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3; c=sqlite3.connect('file:{}?mode=ro', uri=True); print(c.execute('select sum(last - first + 1), min(first), max(last) from chunks').fetchone())",
            db.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
