//! The scale-out mode with the real binary, Tansu and PostgreSQL: one `--role receiver` and
//! two `--role writer` processes. A gateway streams batches of 20 devices; the receiver
//! acknowledges each once Kafka's backbone topic has it; the writers share the topic's six
//! partitions as a consumer group. Once both have written rounds, one is killed (SIGKILL)
//! while batches stream in;
//! the other takes its partitions from `pipeline_offsets`. Every reading the ledger sent is
//! in PostgreSQL once with its value, the surviving writer replayed nothing (no round was
//! committed twice), and the stored offsets reach every partition's end. The API's
//! `/v1/pipeline/lag` shows the group's lag above zero while the killed writer's partitions
//! wait to be handed over, and zero at the end.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloud_ingest::quic;
use common::Dir;
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Ack, Batch, Frame, Lane};
use rdkafka::consumer::{BaseConsumer, Consumer};

const BATCHES: u64 = 120;
const PER: i64 = 400;
const DEVICES: i64 = 20;
const TOKEN: &str = "acme-token-0123456789abcdef";

fn start(config: &std::path::Path, role: &str, log: &std::path::Path) -> common::Proc {
    common::Proc(
        Command::new(env!("CARGO_BIN_EXE_cloud-ingest"))
            .args(["run", "--role", role, "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

async fn until(what: &str, limit: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Batch `b` of the ledger: `PER` readings over `DEVICES` devices, values that name them.
fn batch(b: u64, start_us: i64) -> Vec<Reading> {
    (0..PER)
        .map(|i| {
            let n = b as i64 * PER + i;
            Reading::new(
                "claimed",
                format!("dev-{}", n % DEVICES),
                "flow",
                Timestamp(start_us + n * 1_000),
                n as f64,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_share_the_backbone_and_a_killed_one_loses_and_duplicates_nothing() {
    let d = Dir::new("roles");
    common::fleet(&d.0, "gw-r");
    let db = format!("plantlink_test_roles_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_addr = udp.local_addr().unwrap();
    drop(udp);
    let pid = std::process::id();
    let topic = format!("test.backbone.{pid}");
    let group = format!("test-writers-{pid}");
    let config = |metrics: Option<u16>| {
        let m = metrics
            .map(|p| format!("[metrics]\nbind = \"127.0.0.1:{p}\"\n"))
            .unwrap_or_default();
        format!(
            "[quic]\nbind = \"{quic_addr}\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\nflush_max_readings = 2000\n\
             [kafka]\nbrokers = \"{tansu}\"\nreadings_topic = \"test.readings.{pid}\"\n\
             dlq_topic = \"test.dlq.{pid}\"\nalerts_topic = \"test.alerts.{pid}\"\n\
             backbone_topic = \"{topic}\"\nbackbone_partitions = 6\nwriter_group = \"{group}\"\n\
             public_readings = false\n{m}"
        )
    };
    let (metrics_a, metrics_b) = (common::free_tcp_port(), common::free_tcp_port());
    for (name, m) in [
        ("receiver", None),
        ("writer-a", Some(metrics_a)),
        ("writer-b", Some(metrics_b)),
    ] {
        std::fs::write(d.0.join(format!("{name}.toml")), config(m)).unwrap();
    }
    // The receiver serves the API, with the groups' lag.
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let mut receiver_toml = config(None);
    receiver_toml.push_str(&format!(
        "[api]\nbind = \"{api}\"\n[api.tokens]\nacme = \"{TOKEN}\"\n"
    ));
    std::fs::write(d.0.join("receiver.toml"), receiver_toml).unwrap();
    // Lag per partition of the writers' group, as the API reports it (None before any offset).
    let (g2, t2) = (group.clone(), topic.clone());
    let lag = move || -> Option<Vec<(i64, Option<i64>, i64)>> {
        let (st, body) = common::http_json(api, "GET", "/v1/pipeline/lag", TOKEN, None);
        assert_eq!(st, 200, "{body}");
        let parts = body["consumer_groups"][&g2][&t2].as_object()?;
        Some(
            parts
                .values()
                .map(|p| {
                    (
                        p["end"].as_i64().unwrap(),
                        p["committed"].as_i64(),
                        p["lag"].as_i64().unwrap(),
                    )
                })
                .collect(),
        )
    };
    let log = |n: &str| d.0.join(format!("{n}.log"));
    let _receiver = start(&d.0.join("receiver.toml"), "receiver", &log("receiver"));
    let mut writer_a = Some(start(
        &d.0.join("writer-a.toml"),
        "writer",
        &log("writer-a"),
    ));
    let _writer_b = start(&d.0.join("writer-b.toml"), "writer", &log("writer-b"));

    let ep = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-r")));
    let start_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - 3_600_000_000;
    let began = Instant::now();
    while !matches!(
        common::attempt(&ep, quic_addr, "gw-r").await,
        Ok(Frame::Welcome(_))
    ) {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the receiver did not come up; see {}",
            log("receiver").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = common::connect(&ep, quic_addr, "gw-r").await;
    // The gateway streams on its own while the test watches the writers.
    let sender = tokio::spawn(async move {
        let mut sent = 0i64;
        for b in 0..BATCHES {
            let readings = batch(b, start_us);
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            let frame = Frame::Batch(Batch {
                seq: b + 1,
                lane: Lane::Live,
                readings: readings.len() as u32,
                payload: BatchEncoder::default().encode(&readings),
            });
            quic::write_frame(&mut s, &frame).await.unwrap();
            let answer = quic::read_frame(&mut r, 1 << 16).await.unwrap();
            assert_eq!(answer, Frame::Ack(Ack { seq: b + 1 }), "batch {b}");
            sent += readings.len() as i64;
        }
        conn.close(0u32.into(), b"done");
        sent
    });
    // Both writers hold partitions and have written rounds of them...
    let written = |port: u16| {
        common::scrape(format!("127.0.0.1:{port}").parse().unwrap()).map_or(0.0, |t| {
            common::metric_total(&t, "plantlink_cloud_backbone_records_written_total")
        })
    };
    until(
        "both writers writing",
        Duration::from_secs(60),
        async || written(metrics_a) > 0.0 && written(metrics_b) > 0.0,
    )
    .await;
    // ...then writer A dies while the backbone holds more than is written.
    let rows: i64 = pgc
        .query_one("SELECT count(*) FROM raw_metrics", &[])
        .await
        .unwrap()
        .get(0);
    drop(writer_a.take());
    // The lag the API shows rises above zero while writer A's partitions wait for the group
    // to hand them over (its session timeout), and falls back to zero.
    let mut most = 0;
    let start_watch = Instant::now();
    while !sender.is_finished() || start_watch.elapsed() < Duration::from_secs(2) {
        if let Some(l) = tokio::task::block_in_place(&lag) {
            most = most.max(l.iter().map(|p| p.2).sum::<i64>());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = sender.await.unwrap();
    eprintln!("killed writer A with {rows} readings stored; {sent} sent");
    assert!(
        rows < sent,
        "writer A was killed with nothing left to write ({rows} of {sent} stored)"
    );

    // Everything lands, each reading once, with its value.
    until(
        "every reading in PostgreSQL",
        Duration::from_secs(90),
        async || {
            let n: i64 = pgc
                .query_one("SELECT count(*) FROM raw_metrics", &[])
                .await
                .unwrap()
                .get(0);
            n == sent
        },
    )
    .await;
    let row = pgc
        .query_one(
            "SELECT count(*), count(DISTINCT (device_id, ts)), sum(value),
                    count(*) FILTER (WHERE device_id <> 'dev-' || (value::bigint % $1))
             FROM raw_metrics WHERE tenant_id = 'acme'",
            &[&DEVICES],
        )
        .await
        .unwrap();
    let want_sum = (sent * (sent - 1) / 2) as f64;
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, f64>(2),
            row.get::<_, i64>(3)
        ),
        (sent, sent, want_sum, 0)
    );

    assert!(most > 0, "the API never showed the writers behind");
    let at_end = tokio::task::block_in_place(&lag).unwrap();
    assert_eq!(at_end.len(), 6, "{at_end:?}");
    assert!(
        at_end.iter().all(|(end, committed, lag)| *lag == 0
            && (*committed == Some(*end) || (*end == 0 && committed.is_none()))),
        "{at_end:?}"
    );

    // The stored offsets reach the end of every partition.
    let marks: BTreeMap<i32, i64> = {
        let (brokers, topic) = (tansu.to_string(), topic.clone());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            (0..6)
                .map(|p| {
                    let (_, hi) = c
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .unwrap();
                    (p, hi)
                })
                .collect()
        })
        .await
        .unwrap()
    };
    let stored: BTreeMap<i32, i64> = pgc
        .query(
            "SELECT partition_id, committed_offset FROM pipeline_offsets
             WHERE consumer_group = $1 AND topic = $2",
            &[&group, &topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ends: BTreeMap<i32, i64> = marks.into_iter().filter(|(_, hi)| *hi > 0).collect();
    assert_eq!(
        stored, ends,
        "pipeline_offsets against the partitions' ends"
    );

    // The survivor wrote every reading it was given once: no replay, so no round of the
    // killed writer was committed twice.
    let text = common::scrape(
        format!("127.0.0.1:{metrics_b}")
            .parse::<SocketAddr>()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        common::metric_total(&text, "plantlink_cloud_readings_replayed_total"),
        0.0,
        "{text}"
    );
    assert!(common::metric_total(&text, "plantlink_cloud_backbone_records_written_total") > 0.0);

    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
