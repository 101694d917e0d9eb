//! Benchmark (not run by default): the scale-out mode (`--role receiver`, `--role writer`,
//! `--role alerting`, Kafka's backbone between them) against the single process (all three
//! roles, Kafka for its public readings and alerts topics), in the same run, on the same
//! Tansu and PostgreSQL. For each it measures:
//! - throughput: 1,000,000 readings sent by a gateway over QUIC (four streams in flight),
//!   from the first batch sent to the last row in PostgreSQL;
//! - publish-to-row latency: 20,000 readings/s for 10 s, each 100-ms batch carrying a probe
//!   reading whose arrival in `raw_metrics` is polled (p50/p99);
//! - alert latency: 20 batches that each trip a rule; from the batch sent to its row in
//!   `alerts` (which comes after the Kafka alerts topic: delivery is Kafka first) (p50/p99);
//! - Kafka bytes per reading: the backbone topic (batch codec, per partition) and the public
//!   JSON readings topic.
//!
//! `cargo test --release -p cloud-ingest --test bench_roles -- --ignored --nocapture --test-threads 1`
//! (`PLANTLINK_BENCH_ONLY=roles` runs the scale-out mode alone, e.g. under a profiler;
//! `PLANTLINK_BENCH_WRITERS=2` runs two writers in it instead of one).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloud_ingest::quic;
use common::Dir;
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Ack, Batch, Frame, Lane};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

const TOKEN: &str = "acme-token-0123456789abcdef";
const TOTAL: i64 = 1_000_000;
const BATCH: i64 = 10_000;

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn spawn(config: &std::path::Path, role: Option<&str>, log: &std::path::Path) -> common::Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cloud-ingest"));
    c.arg("run");
    if let Some(r) = role {
        c.args(["--role", r]);
    }
    common::Proc(
        c.arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

async fn send(conn: &quinn::Connection, seq: u64, rs: &[Reading]) {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let frame = Frame::Batch(Batch {
        seq,
        lane: Lane::Live,
        readings: rs.len() as u32,
        payload: BatchEncoder::default().encode(rs),
    });
    quic::write_frame(&mut s, &frame).await.unwrap();
    let answer = quic::read_frame(&mut r, 1 << 16).await.unwrap();
    assert_eq!(answer, Frame::Ack(Ack { seq }));
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// (records, bytes of their keys, payloads and headers) of `topic`, reading at most `limit`
/// records.
fn topic_bytes(brokers: &str, topic: &str, limit: usize) -> (usize, usize) {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-bytes-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut total = 0i64;
    for p in md.topics()[0].partitions() {
        let (lo, hi) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        total += hi - lo;
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let want = (total as usize).min(limit);
    let (mut n, mut bytes) = (0usize, 0usize);
    let start = Instant::now();
    while n < want && start.elapsed() < Duration::from_secs(120) {
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        n += 1;
        bytes += m.payload_len() + m.key().map_or(0, <[u8]>::len);
        if let Some(h) = m.headers() {
            for i in 0..h.count() {
                let hd = h.get(i);
                bytes += hd.key.len() + hd.value.map_or(0, <[u8]>::len);
            }
        }
    }
    (n, bytes)
}

#[derive(Debug)]
struct Figures {
    readings_per_s: f64,
    row_p50_ms: f64,
    row_p99_ms: f64,
    alert_p50_ms: f64,
    alert_p99_ms: f64,
    kafka_bytes_per_reading: f64,
}

async fn measure(roles: bool, tansu: SocketAddr) -> Figures {
    let tag = if roles { "roles" } else { "single" };
    let d = Dir::new(&format!("bench-{tag}"));
    common::fleet(&d.0, "gw-bench");
    let db = format!("plantlink_bench_roles_{tag}_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_addr = udp.local_addr().unwrap();
    drop(udp);
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let pid = std::process::id();
    let topic = format!("bench.backbone.{tag}.{pid}");
    let readings_topic = format!("bench.readings.{tag}.{pid}");
    let config = |extra: &str| {
        format!(
            "[quic]\nbind = \"{quic_addr}\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\n\
             [alerting]\nrules_reload_ms = 300\n\
             [kafka]\nbrokers = \"{tansu}\"\nreadings_topic = \"{readings_topic}\"\n\
             dlq_topic = \"bench.dlq.{tag}.{pid}\"\nalerts_topic = \"bench.alerts.{tag}.{pid}\"\n\
             backbone_topic = \"{topic}\"\nbackbone_backfill_topic = \"{topic}.backfill\"\n\
             backbone_partitions = 6\nwriter_group = \"bench-w-{pid}\"\nalerting_group = \"bench-a-{pid}\"\n\
             public_readings = false\n{extra}"
        )
    };
    let with_api = format!("[api]\nbind = \"{api}\"\n[api.tokens]\nacme = \"{TOKEN}\"\n");
    std::fs::write(d.0.join("main.toml"), config(&with_api)).unwrap();
    std::fs::write(d.0.join("other.toml"), config("")).unwrap();
    let mut procs = Vec::new();
    if roles {
        // The consumers first, so their groups start at the beginning of the run.
        let writers: usize = std::env::var("PLANTLINK_BENCH_WRITERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(1);
        for w in 0..writers {
            procs.push(spawn(
                &d.0.join("other.toml"),
                Some("writer"),
                &d.0.join(format!("writer-{w}.log")),
            ));
        }
        procs.push(spawn(
            &d.0.join("other.toml"),
            Some("alerting"),
            &d.0.join("alerting.log"),
        ));
        procs.push(spawn(
            &d.0.join("main.toml"),
            Some("receiver"),
            &d.0.join("receiver.log"),
        ));
    } else {
        procs.push(spawn(&d.0.join("main.toml"), None, &d.0.join("single.log")));
    }
    let ep = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-bench")));
    let began = Instant::now();
    while !matches!(
        common::attempt(&ep, quic_addr, "gw-bench").await,
        Ok(Frame::Welcome(_))
    ) {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "{tag}: no receiver"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if roles {
        // The writer and alerting members hold their partitions.
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    let rule = serde_json::json!({"name": "hot", "metric": "heat", "aggregate": "avg", "op": ">",
        "threshold": 80.0, "window": {"kind": "tumbling", "seconds": 1}, "for_windows": 1,
        "severity": "critical"});
    let (st, body) = common::http_json(api, "POST", "/v1/alert-rules", TOKEN, Some(&rule));
    assert_eq!(st, 201, "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let conn = common::connect(&ep, quic_addr, "gw-bench").await;
    let t0 = now_us() - 3_000_000_000;

    // Throughput: four streams in flight.
    let start = Instant::now();
    let per_stream = TOTAL / BATCH / 4;
    let mut tasks = Vec::new();
    for s in 0..4i64 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..per_stream {
                let k = s * per_stream + b;
                let rs: Vec<Reading> = (0..BATCH)
                    .map(|i| {
                        let n = k * BATCH + i;
                        Reading::new(
                            "claimed",
                            format!("dev-{}", n % 200),
                            "flow",
                            Timestamp(t0 + n * 1_000),
                            (n % 997) as f64 / 3.0,
                        )
                    })
                    .collect();
                send(&conn, (k + 1) as u64, &rs).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let acked = start.elapsed();
    // Polled through the key (one device of 200, in every batch), so that watching costs the
    // database little; then the whole count, once that device is complete.
    for (sql, want) in [
        (
            "SELECT count(*) FROM raw_metrics WHERE tenant_id = 'acme' AND device_id = 'dev-0'",
            TOTAL / 200,
        ),
        ("SELECT count(*) FROM raw_metrics", TOTAL),
    ] {
        loop {
            let n: i64 = pgc.query_one(sql, &[]).await.unwrap().get(0);
            if n >= want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "{tag}: {n} of {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let stored = start.elapsed();
    let readings_per_s = TOTAL as f64 / stored.as_secs_f64();
    println!(
        "{tag}: 1,000,000 readings acknowledged in {acked:?}, stored in {stored:?}: {readings_per_s:.0} readings/s"
    );

    // Publish-to-row latency at 20,000 readings/s.
    let mut seq = (TOTAL / BATCH) as u64 + 1;
    let watcher_url = url.clone();
    let watcher = tokio::spawn(async move {
        let c = cloud_ingest::postgres::connect(&watcher_url).await.unwrap();
        let mut seen = Vec::new();
        let mut last = -1i64;
        while seen.len() < 100 {
            let row = c
                .query_one(
                    "SELECT coalesce(max(value), -1)::bigint FROM raw_metrics WHERE tenant_id = 'acme' AND device_id = 'probe' AND metric_name = 'flow'",
                    &[],
                )
                .await
                .unwrap();
            let v: i64 = row.get(0);
            for i in (last + 1)..=v {
                seen.push((i, Instant::now()));
            }
            last = last.max(v);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        seen
    });
    let mut sent_at = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..100i64 {
        tick.tick().await;
        let base = now_us() - 1_000_000;
        let mut rs: Vec<Reading> = (0..1_999)
            .map(|j| {
                Reading::new(
                    "claimed",
                    format!("live-{}", j % 200),
                    "flow",
                    Timestamp(base + i * 100_000 + j),
                    1.0,
                )
            })
            .collect();
        rs.push(Reading::new(
            "claimed",
            "probe",
            "flow",
            Timestamp(base + i * 100_000),
            i as f64,
        ));
        sent_at.push(Instant::now());
        let c = conn.clone();
        seq += 1;
        let s = seq;
        tokio::spawn(async move { send(&c, s, &rs).await });
    }
    let seen = watcher.await.unwrap();
    let rows: Vec<f64> = seen
        .iter()
        .map(|(i, at)| at.duration_since(sent_at[*i as usize]).as_secs_f64() * 1000.0)
        .collect();

    // Alert latency: each batch trips the rule for a device of its own.
    let mut alerts = Vec::new();
    for i in 0..20 {
        let device = format!("hot-{i}");
        let base = now_us() - 3_000_000;
        let rs: Vec<Reading> = (0..30)
            .map(|j| {
                Reading::new(
                    "claimed",
                    device.clone(),
                    "heat",
                    Timestamp(base + j * 100_000),
                    95.0,
                )
            })
            .collect();
        seq += 1;
        let at = Instant::now();
        send(&conn, seq, &rs).await;
        loop {
            let hit = pgc
                .query_opt("SELECT 1 FROM alerts WHERE device_id = $1", &[&device])
                .await
                .unwrap()
                .is_some();
            if hit {
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(60),
                "{tag}: no alert for {device}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        alerts.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    let readings_total = TOTAL + 100 * 2_000 + 20 * 30;
    let (b, t) = (
        tansu.to_string(),
        if roles {
            topic.clone()
        } else {
            readings_topic.clone()
        },
    );
    let (records, bytes) = tokio::task::spawn_blocking(move || {
        if roles {
            let (n1, b1) = topic_bytes(&b, &t, usize::MAX);
            (n1, b1 as f64 / readings_total as f64)
        } else {
            // One record per reading: a sample is enough.
            let (n1, b1) = topic_bytes(&b, &t, 20_000);
            (n1, b1 as f64 / n1.max(1) as f64)
        }
    })
    .await
    .unwrap();
    println!("{tag}: {records} Kafka records read for the bytes per reading");
    drop(conn);
    drop(procs);
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    Figures {
        readings_per_s,
        row_p50_ms: pct(rows.clone(), 0.5),
        row_p99_ms: pct(rows, 0.99),
        alert_p50_ms: pct(alerts.clone(), 0.5),
        alert_p99_ms: pct(alerts, 0.99),
        kafka_bytes_per_reading: bytes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn roles_against_the_single_process() {
    let (_tansu, tansu) = common::start_tansu(None);
    if std::env::var("PLANTLINK_BENCH_ONLY").as_deref() == Ok("roles") {
        println!("{:?}", measure(true, tansu).await);
        return;
    }
    let single = measure(false, tansu).await;
    let roles = measure(true, tansu).await;
    for (name, f) in [("single process", &single), ("roles apart", &roles)] {
        println!(
            "{name}: {:.0} readings/s QUIC -> PostgreSQL; publish -> row p50 {:.0} ms, p99 {:.0} ms; \
             publish -> alert p50 {:.0} ms, p99 {:.0} ms; Kafka {:.1} bytes/reading ({})",
            f.readings_per_s,
            f.row_p50_ms,
            f.row_p99_ms,
            f.alert_p50_ms,
            f.alert_p99_ms,
            f.kafka_bytes_per_reading,
            if std::ptr::eq(f, &roles) {
                "backbone, batch codec"
            } else {
                "public JSON readings topic"
            }
        );
    }
    println!(
        "roles / single: throughput {:.2}x",
        roles.readings_per_s / single.readings_per_s
    );
}
