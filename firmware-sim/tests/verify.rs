//! The verifier catches what it exists to catch, each fault planted on purpose against a real
//! PostgreSQL (a database of the test's own) and a real Kafka-API broker (Tansu): a deleted
//! row, a duplicated row, and a missing Kafka record. And `run` fills the ledger with what a
//! real Mosquitto acknowledged.
#![allow(clippy::unwrap_used)] // tests may panic

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use firmware_sim::ledger::Ledger;
use firmware_sim::verify::verify;

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("plantlink-fsim-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn admin_dsn() -> String {
    std::env::var("PLANTLINK_PG_ADMIN")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=postgres".into())
}

async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

fn ts(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us as u64)
}

#[tokio::test]
async fn planted_faults_are_caught() {
    let d = Dir::new("verify");
    let ledger = d.0.join("ledger.db");
    let run = "vtest";
    let base = 1_795_000_000_000_000i64;
    let mut l = Ledger::create(&ledger, run, "test", base).unwrap();
    for i in 0..100 {
        l.record(
            &format!("{run}-multi-json-{:05}", i % 10),
            &[("temperature", Some(base + i * 1000), 1.5)],
            None,
        )
        .unwrap();
    }
    l.record(
        &format!("{run}-bare-00001"),
        &[("temperature", None, 2.0)],
        None,
    )
    .unwrap();
    l.record(
        &format!("{run}-bare-00001"),
        &[("temperature", None, 2.5)],
        None,
    )
    .unwrap();
    l.record(&format!("{run}-cbor-00002"), &[], Some("malformed"))
        .unwrap();
    drop(l);

    let db = format!("plantlink_test_fsim_{}", std::process::id());
    let admin = connect(&admin_dsn()).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = format!("{} dbname={db}", admin_dsn().replace("dbname=postgres", ""));
    let pg = connect(&url).await;
    pg.batch_execute(
        "CREATE TABLE raw_metrics (tenant_id text NOT NULL, device_id text NOT NULL, metric_name text NOT NULL,
         value double precision NOT NULL, tags jsonb, ts timestamptz NOT NULL, seq bigint, gateway_id text NOT NULL,
         PRIMARY KEY (tenant_id, device_id, metric_name, ts))",
    )
    .await
    .unwrap();
    for i in 0..100i64 {
        pg.execute(
            "INSERT INTO raw_metrics VALUES ('demo', $1, 'temperature', 1.5, NULL, $2, NULL, 'gw')",
            &[
                &format!("{run}-multi-json-{:05}", i % 10),
                &ts(base + i * 1000),
            ],
        )
        .await
        .unwrap();
    }
    for k in 0..2i64 {
        pg.execute(
            "INSERT INTO raw_metrics VALUES ('demo', $1, 'temperature', 2.0, NULL, $2, NULL, 'gw')",
            &[&format!("{run}-bare-00001"), &ts(base + 7 + k)],
        )
        .await
        .unwrap();
    }
    // Someone else's run in the same table is not this run's business.
    pg.execute(
        "INSERT INTO raw_metrics VALUES ('demo', 'other-multi-json-00001', 'temperature', 1, NULL, now(), NULL, 'gw')",
        &[],
    )
    .await
    .unwrap();

    let r = verify(&ledger, None, &url, None, None).await.unwrap();
    assert_eq!(
        (r.expected, r.found, r.lost, r.duplicated, r.unexpected),
        (102, 102, 0, 0, 0),
        "{r:?}"
    );
    assert!(r.ok(false));
    assert_eq!(r.expected_rejections.get("malformed"), Some(&1));

    // Another tenant in the same database with devices of the same names (and one more):
    // with --tenant they are not this run's business.
    pg.execute(
        "INSERT INTO raw_metrics SELECT 'globex', device_id, metric_name, value, tags, ts, seq, 'gw-g'
         FROM raw_metrics WHERE tenant_id = 'demo'
         UNION ALL SELECT 'globex', $1, 'temperature', 1, NULL, now(), NULL, 'gw-g'",
        &[&format!("{run}-bare-00099")],
    )
    .await
    .unwrap();
    let r = verify(&ledger, None, &url, None, Some("demo"))
        .await
        .unwrap();
    assert_eq!(
        (r.expected, r.found, r.lost, r.duplicated, r.unexpected),
        (102, 102, 0, 0, 0),
        "{r:?}"
    );
    let e = verify(&ledger, None, &url, None, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--tenant") && e.contains("2 tenants"), "{e}");
    pg.execute("DELETE FROM raw_metrics WHERE tenant_id = 'globex'", &[])
        .await
        .unwrap();

    // A flooding device's readings may be dropped by the agent's rate limit: missing ones
    // are expected refusals, not loss.
    Ledger::create(&ledger, run, "test", base)
        .unwrap()
        .best_effort(&format!("{run}-multi-json-00009"))
        .unwrap();
    pg.execute(
        "DELETE FROM raw_metrics WHERE device_id = $1 AND ts = $2",
        &[&format!("{run}-multi-json-00009"), &ts(base + 9 * 1000)],
    )
    .await
    .unwrap();
    let r = verify(&ledger, Some(run), &url, None, None).await.unwrap();
    assert_eq!(r.lost, 0, "{r:?}");
    assert_eq!(r.expected_rejections.get("rate_limited"), Some(&1));

    // A deleted row.
    pg.execute(
        "DELETE FROM raw_metrics WHERE device_id = $1 AND ts = $2",
        &[&format!("{run}-multi-json-00003"), &ts(base + 3 * 1000)],
    )
    .await
    .unwrap();
    let r = verify(&ledger, Some(run), &url, None, None).await.unwrap();
    assert_eq!((r.lost, r.duplicated), (1, 0), "{r:?}");
    assert!(!r.ok(false));
    assert!(
        r.examples
            .iter()
            .any(|e| e.contains("lost") && e.contains("multi-json-00003")),
        "{:?}",
        r.examples
    );
    assert_eq!(
        r.devices.get(&format!("{run}-multi-json-00003")),
        Some(&(1, 0, 0))
    );

    // A duplicated row (a store without the identity key would allow it).
    pg.batch_execute("ALTER TABLE raw_metrics DROP CONSTRAINT raw_metrics_pkey")
        .await
        .unwrap();
    pg.execute(
        "INSERT INTO raw_metrics SELECT * FROM raw_metrics WHERE device_id = $1 AND ts = $2",
        &[&format!("{run}-multi-json-00004"), &ts(base + 4 * 1000)],
    )
    .await
    .unwrap();
    let r = verify(&ledger, Some(run), &url, None, None).await.unwrap();
    assert_eq!((r.lost, r.duplicated), (1, 1), "{r:?}");
    assert!(
        r.examples.iter().any(|e| e.contains("stored 2 times")),
        "{:?}",
        r.examples
    );

    // A missing Kafka record: every expected reading but one is on the topic.
    if let Some(tansu) = tansu() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new(tansu)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(20));
        }
        let brokers = format!("127.0.0.1:{port}");
        let topic = "verify.readings";
        {
            use rdkafka::ClientConfig;
            use rdkafka::message::{Header, OwnedHeaders};
            use rdkafka::producer::{FutureProducer, FutureRecord};
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            for i in 0..100i64 {
                if i == 42 {
                    continue; // the missing one
                }
                let dev = format!("{run}-multi-json-{:05}", i % 10);
                let t = (base + i * 1000).to_string();
                let h = OwnedHeaders::new()
                    .insert(Header {
                        key: "plantlink-device",
                        value: Some(dev.as_str()),
                    })
                    .insert(Header {
                        key: "plantlink-metric",
                        value: Some("temperature"),
                    })
                    .insert(Header {
                        key: "plantlink-ts-us",
                        value: Some(t.as_str()),
                    });
                p.send(
                    FutureRecord::to(topic).key(&dev).payload("{}").headers(h),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            }
        }
        let r = verify(&ledger, Some(run), &url, Some((&brokers, topic)), None)
            .await
            .unwrap();
        let k = r.kafka.clone().unwrap();
        assert_eq!((k.records, k.lost, k.duplicated), (99, 1, 0), "{r:?}");
        assert!(
            r.examples
                .iter()
                .any(|e| e.contains("not on Kafka") && e.contains("multi-json-00002")),
            "{:?}",
            r.examples
        );
        let _ = child.kill();
        let _ = child.wait();
    } else {
        eprintln!("PLANTLINK_TANSU not set: the Kafka half of this test needs tests/run.sh");
        assert!(std::env::var("CI").is_err(), "CI must run the Kafka half");
    }

    drop(pg);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

fn tansu() -> Option<PathBuf> {
    std::env::var("PLANTLINK_TANSU").ok().map(PathBuf::from)
}

/// `run` against the local Mosquitto (its own topic prefix): every message is acknowledged
/// at QoS 1 and 2, the planted faults are counted, and the ledger holds the readings and
/// the planted refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_fills_the_ledger_with_what_the_broker_acknowledged() {
    use firmware_sim::fleet::{Kind, parse_mix};
    use firmware_sim::run::{Options, run};
    for qos in [1u8, 2] {
        let d = Dir::new(&format!("run{qos}"));
        let ledger = d.0.join("ledger.db");
        let name = format!("fsimtest{}q{qos}", std::process::id());
        let report = run(Options {
            mqtt: Some("mqtt://127.0.0.1:1883".into()),
            coap: None,
            coap_con: true,
            devices: 30,
            mix: parse_mix("multi-json=2,bare=1,th100-v1=1").unwrap(),
            rate: 10.0,
            duration: 1.5,
            seed: 7,
            qos,
            prefix: format!("fsimtest/{}", std::process::id()),
            run: name.clone(),
            ledger: Some(ledger.clone()),
            duplicate_rate: 0.05,
            malformed_rate: 0.05,
            out_of_order_rate: 0.05,
            oversize_rate: 0.01,
            skewed_devices: 0.1,
            silent_devices: 3,
            hot_devices: 2,
            hot_cycle: 0.0,
            flood_devices: 1,
            reference: false,
            progress: false,
        })
        .await
        .unwrap();
        assert!(report.sent >= 400, "{report:?}");
        assert_eq!(report.acked, report.sent, "{report:?}");
        assert!(report.latency_ms.p50 > 0.0 && report.latency_ms.max >= report.latency_ms.p99);
        let planted = |k: &str| report.errors.get(k).copied().unwrap_or(0);
        assert!(
            planted("planted_malformed") > 0 && planted("planted_duplicate") > 0,
            "{report:?}"
        );
        let e = Ledger::expected(&ledger, &name).unwrap();
        let rejected: i64 = e.rejected.iter().map(|r| r.1).sum();
        assert_eq!(
            rejected as u64,
            planted("planted_malformed") + planted("planted_oversize")
        );
        let stamped: i64 = e.stamped.iter().map(|s| s.2).sum();
        // Duplicates are one identity in the ledger; every other reading is there.
        assert!(e.timed.len() as u64 + stamped as u64 <= report.readings);
        assert!(e.timed.iter().all(|t| t.0.starts_with(&name)));
        assert!(e.timed.iter().any(|t| t.0.contains(Kind::Th100V1.name())));
        assert_eq!(Ledger::runs(&ledger).unwrap(), vec![name]);
    }
}

/// `run --coap` against a real agent's CoAP endpoint: confirmable requests are acknowledged
/// after the agent stored them, planted malformed ones are refused as expected, and the
/// agent's queue holds exactly the readings the ledger expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_over_coap_is_acknowledged_and_stored() {
    use firmware_sim::fleet::parse_mix;
    use firmware_sim::run::{Options, run};
    let d = Dir::new("coap");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg_path = d.0.join("agent.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[gateway]\nid = \"gw\"\ntenant = \"t\"\n[store]\npath = \"{}\"\n[coap]\nbind = \"127.0.0.1:{port}\"\n\
             [limits]\nper_device_per_sec = 1e9\nburst = 1e9\n",
            d.0.join("queue.db").display()
        ),
    )
    .unwrap();
    let config = edge_agent::config::Config::load(&cfg_path).unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = stop_rx.changed().await;
    }));
    let ledger = d.0.join("ledger.db");
    let name = format!("fsimcoap{}", std::process::id());
    let report = run(Options {
        mqtt: None,
        coap: Some(format!("coap://127.0.0.1:{port}")),
        coap_con: true,
        devices: 20,
        mix: parse_mix("multi-json=1,cbor=1,bare=1,plant-json=1").unwrap(),
        rate: 10.0,
        duration: 1.0,
        seed: 3,
        qos: 1,
        prefix: "plant".into(),
        run: name.clone(),
        ledger: Some(ledger.clone()),
        duplicate_rate: 0.0,
        malformed_rate: 0.05,
        out_of_order_rate: 0.0,
        oversize_rate: 0.0,
        skewed_devices: 0.0,
        silent_devices: 0,
        hot_devices: 0,
        hot_cycle: 0.0,
        flood_devices: 0,
        reference: false,
        progress: false,
    })
    .await
    .unwrap();
    assert!(report.sent >= 150, "{report:?}");
    assert_eq!(report.acked, report.sent, "{report:?}");
    let e = Ledger::expected(&ledger, &name).unwrap();
    let want = e.timed.len() as u64 + e.stamped.iter().map(|s| s.2 as u64).sum::<u64>();
    // Every acknowledged reading is in the agent's queue (it answers after the commit).
    let q = edge_agent::store::open_read_only(&d.0.join("queue.db")).unwrap();
    assert_eq!(edge_agent::store::stats(&q).unwrap().readings, want);
    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
}

/// `run --hot-cycle`: the hot device is 60 degrees hot in the first half of every cycle of
/// the clock and cool in the second, as its published readings show; a device not hot never
/// jumps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_devices_alternate_with_the_clock_on_a_hot_cycle() {
    use firmware_sim::fleet::parse_mix;
    use firmware_sim::run::{Options, run};
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let prefix = format!("fsimhot/{}", std::process::id());
    let name = format!("fsimhot{}", std::process::id());
    let mut o = MqttOptions::new(format!("{name}-sub"), "127.0.0.1", 1883);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut el) = AsyncClient::new(o, 100);
    sub.subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    // Subscribed before the run starts: wait for the SUBACK.
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    let report = run(Options {
        mqtt: Some("mqtt://127.0.0.1:1883".into()),
        coap: None,
        coap_con: true,
        devices: 2,
        mix: parse_mix("multi-json=1").unwrap(),
        rate: 20.0,
        duration: 2.5,
        seed: 11,
        qos: 1,
        prefix: prefix.clone(),
        run: name.clone(),
        ledger: None,
        duplicate_rate: 0.0,
        malformed_rate: 0.0,
        out_of_order_rate: 0.0,
        oversize_rate: 0.0,
        skewed_devices: 0.0,
        silent_devices: 0,
        hot_devices: 1,
        hot_cycle: 1.0,
        flood_devices: 0,
        reference: false,
        progress: false,
    })
    .await
    .unwrap();
    assert_eq!(report.acked, report.sent, "{report:?}");
    // (ts ms, temperature) per device, as published.
    let mut seen: std::collections::BTreeMap<String, Vec<(i64, f64)>> = Default::default();
    let mut got = 0;
    while got < report.acked {
        let ev = tokio::time::timeout(Duration::from_secs(10), el.poll())
            .await
            .expect("the run's messages reach the subscriber")
            .unwrap();
        if let Event::Incoming(Packet::Publish(p)) = ev {
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            let device = p.topic.rsplit('/').next().unwrap().to_owned();
            seen.entry(device).or_default().push((
                v["ts"].as_i64().unwrap(),
                v["temperature"].as_f64().unwrap(),
            ));
            got += 1;
        }
    }
    let hot = &seen[&format!("{name}-multi-json-00000")];
    let cool = &seen[&format!("{name}-multi-json-00001")];
    let phase = |ts: i64| ts.rem_euclid(1000) < 500;
    let (first, second): (Vec<f64>, Vec<f64>) = {
        let f = hot.iter().filter(|r| phase(r.0)).map(|r| r.1).collect();
        let s = hot.iter().filter(|r| !phase(r.0)).map(|r| r.1).collect();
        (f, s)
    };
    assert!(first.len() >= 10 && second.len() >= 10, "{hot:?}");
    let min_hot = first.iter().copied().fold(f64::INFINITY, f64::min);
    let max_cool = second.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // 60 degrees apart, less a random walk of 0.05 a step over some 50 steps.
    assert!(min_hot - max_cool > 50.0, "hot {first:?}, cool {second:?}");
    let (lo, hi) = cool
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), r| {
            (l.min(r.1), h.max(r.1))
        });
    assert!(hi - lo < 10.0, "a device not hot jumped: {cool:?}");
}
