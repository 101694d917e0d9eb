//! The full path on one machine, shared by the test and the live-rate benchmark.

use std::time::{Duration, Instant};

use cloud_ingest::server::Server;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::Dir;

/// Publishes `n` messages (two readings each) from 50 devices to a private Mosquitto, with an
/// agent and cloud-ingest in this process, over a relay losing `loss` of the UDP packets if
/// given; checks that every reading lands in PostgreSQL exactly once, and returns the time
/// from the first publish until the last reading was in.
pub async fn full_path(n: i64, loss: Option<f64>, tag: &str) -> Duration {
    let d = Dir::new(tag);
    super::fleet(&d.0, "gw-full");
    let db = format!("plantlink_test_{tag}_{}", std::process::id());
    let (admin, url, pgc) = super::database(&db).await;

    let server = Server::bind(super::cloud_config(&d.0, url, 8, 8 << 20)).unwrap();
    let mut cloud_addr = server.local_addr().unwrap();
    if let Some(loss) = loss {
        cloud_addr = super::lossy_proxy(cloud_addr, loss).await.0;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx.clone()));

    let broker = super::Mosquitto::start(&d.0);
    let client_id = format!("{tag}-{}", std::process::id());
    let config = super::Agent {
        gateway: "gw-full",
        mqtt: Some((broker.port, &client_id, "plant/{site}/{device}")),
        cloud: cloud_addr.to_string(),
        store: "",
        uplink: "batch_max_readings = 5000\nbatch_linger_ms = 100",
    }
    .config(&d.0);

    super::create_session(broker.port, &client_id).await;

    let mut agent_stop = stop_rx.clone();
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = agent_stop.changed().await;
    }));

    // Publish: n messages from 50 devices, two metrics each, with time and sequence.
    let base_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let published = Instant::now();
    let mut o = MqttOptions::new("full-publisher", "127.0.0.1", broker.port);
    o.set_inflight(500);
    let (publisher, mut pel) = AsyncClient::new(o, 1000);
    tokio::spawn(async move {
        for i in 0..n {
            let body = format!(
                r#"{{"ts": {}, "seq": {i}, "temperature": {}.5, "pressure": 1013.{}}}"#,
                base_ms + (i / 50) * 10,
                i % 90,
                i % 10
            );
            publisher
                .publish(
                    format!("plant/s1/dev-{}", i % 50),
                    QoS::AtLeastOnce,
                    false,
                    body,
                )
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < n {
        if let Event::Incoming(Packet::PubAck(_)) = pel.poll().await.unwrap() {
            acked += 1;
        }
    }

    let want = 2 * n;
    let start = Instant::now();
    let count = loop {
        let c: i64 = pgc
            .query_one("SELECT count(*) FROM raw_metrics", &[])
            .await
            .unwrap()
            .get(0);
        if c >= want || start.elapsed() > Duration::from_secs(120) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = published.elapsed();
    assert_eq!(
        count,
        want,
        "readings in PostgreSQL after {:?}",
        start.elapsed()
    );
    let row = pgc
        .query_one("SELECT count(DISTINCT seq), min(seq), max(seq), count(*) FILTER (WHERE tenant_id <> 'acme') FROM raw_metrics", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, Option<i64>>(1),
            row.get::<_, Option<i64>>(2),
            row.get::<_, i64>(3)
        ),
        (n, Some(0), Some(n - 1), 0)
    );

    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    took
}
