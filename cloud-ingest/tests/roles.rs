//! The scale-out mode with the real binary, Tansu and PostgreSQL.
//!
//! The whole cast: two `--role receiver`, two `--role writer` and two `--role alerting`
//! processes, and three gateways streaming a ledger of batches over 20 devices (two to one
//! receiver, one to the other); a receiver acknowledges each batch once Kafka's backbone
//! has it. Once both writers have written rounds, one is killed (SIGKILL) while batches
//! stream in; the other takes its partitions from `pipeline_offsets`. Later a kiln's rule
//! fires, the alerting member that fired is killed, and the survivor resolves it. Every
//! reading the ledger sent is in PostgreSQL once with its value, the surviving writer
//! replayed nothing, the stored offsets reach every partition's end, the API's
//! `/v1/pipeline/lag` showed the lag above zero while the killed writer's partitions waited
//! and zero at the end, and the kiln has one alert, fired and resolved once.
//!
//! The other tests here look closer at one part each: alerting's rebuild of a window cut by
//! a kill, one tenant's backlog against another's live alerts, and a writer on a locked
//! table.
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
async fn a_writer_and_an_alerting_member_die_and_nothing_is_lost_or_repeated() {
    let d = Dir::new("roles");
    common::fleet(&d.0, "gw-r");
    for g in ["gw-r2", "gw-r3"] {
        cloud_ingest::pki::gateway(&d.0, g, "acme", 30).unwrap();
    }
    let db = format!("plantlink_test_roles_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_addr = udp.local_addr().unwrap();
    drop(udp);
    let pid = std::process::id();
    let topic = format!("test.backbone.{pid}");
    let group = format!("test-writers-{pid}");
    let agroup = format!("test-alerting-w-{pid}");
    let config = |metrics: Option<u16>| {
        let m = metrics
            .map(|p| format!("[metrics]\nbind = \"127.0.0.1:{p}\"\n"))
            .unwrap_or_default();
        format!(
            "[quic]\nbind = \"{quic_addr}\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\nflush_max_readings = 2000\n\
             [alerting]\nrules_reload_ms = 300\ntick_ms = 100\n\
             [kafka]\nbrokers = \"{tansu}\"\nreadings_topic = \"test.readings.{pid}\"\n\
             dlq_topic = \"test.dlq.{pid}\"\nalerts_topic = \"test.alerts.{pid}\"\n\
             backbone_topic = \"{topic}\"\nbackbone_backfill_topic = \"{topic}.backfill\"\n\
             backbone_partitions = 6\nwriter_group = \"{group}\"\nalerting_group = \"{agroup}\"\n\
             public_readings = false\n{m}"
        )
    };
    let (metrics_a, metrics_b) = (common::free_tcp_port(), common::free_tcp_port());
    let alerting_ports = [common::free_tcp_port(), common::free_tcp_port()];
    for (name, m) in [
        ("receiver", None),
        ("writer-a", Some(metrics_a)),
        ("writer-b", Some(metrics_b)),
        ("alerting-0", Some(alerting_ports[0])),
        ("alerting-1", Some(alerting_ports[1])),
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
    // A second receiver on a port of its own: gateways reach either.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_b = udp.local_addr().unwrap();
    drop(udp);
    std::fs::write(
        d.0.join("receiver-b.toml"),
        config(None).replace(&quic_addr.to_string(), &quic_b.to_string()),
    )
    .unwrap();
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
    let _receiver_b = start(&d.0.join("receiver-b.toml"), "receiver", &log("receiver-b"));
    let mut writer_a = Some(start(
        &d.0.join("writer-a.toml"),
        "writer",
        &log("writer-a"),
    ));
    let _writer_b = start(&d.0.join("writer-b.toml"), "writer", &log("writer-b"));
    let mut members: Vec<Option<common::Proc>> = (0..2)
        .map(|i| {
            Some(start(
                &d.0.join(format!("alerting-{i}.toml")),
                "alerting",
                &log(&format!("alerting-{i}")),
            ))
        })
        .collect();
    let scrape_port = |port: u16| common::scrape(format!("127.0.0.1:{port}").parse().unwrap());
    let held = |port: u16| {
        let want = format!("plantlink_cloud_consumer_partitions{{group=\"{agroup}\"}} ");
        scrape_port(port).map_or(-1.0, |t| {
            t.lines()
                .find_map(|l| l.strip_prefix(&want)?.parse().ok())
                .unwrap_or(0.0)
        })
    };
    until(
        "the alerting members sharing the partitions",
        Duration::from_secs(60),
        async || alerting_ports.iter().all(|p| held(*p) == 3.0),
    )
    .await;

    let start_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - 3_600_000_000;
    // A kiln watched by a rule: it overheats before an alerting member is killed and cools
    // after.
    let kiln_rule = serde_json::json!({"name": "kiln", "metric": "heat",
        "selector": {"device_id": "kiln"}, "aggregate": "avg", "op": ">", "threshold": 80.0,
        "window": {"kind": "tumbling", "seconds": 1}, "for_windows": 1, "severity": "critical"});
    // Three gateways, two on receiver A and one on receiver B.
    let mut conns = Vec::new();
    for (g, addr) in [("gw-r", quic_addr), ("gw-r2", quic_b), ("gw-r3", quic_addr)] {
        let ep = common::client(&d.0.join("ca.pem"), Some((&d.0, g)));
        let began = Instant::now();
        while !matches!(common::attempt(&ep, addr, g).await, Ok(Frame::Welcome(_))) {
            assert!(
                began.elapsed() < Duration::from_secs(30),
                "the receiver at {addr} did not come up; see {}",
                d.0.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        conns.push((common::connect(&ep, addr, g).await, ep));
    }
    let (st, body) = common::http_json(api, "POST", "/v1/alert-rules", TOKEN, Some(&kiln_rule));
    assert_eq!(st, 201, "{body}");
    until(
        "the alerting members reading the rule",
        Duration::from_secs(30),
        async || {
            alerting_ports.iter().all(|p| {
                scrape_port(*p).is_some_and(|t| {
                    common::metric_total(&t, "plantlink_cloud_alert_rules_loaded") == 1.0
                })
            })
        },
    )
    .await;
    let (resume_tx, resume_rx) = tokio::sync::oneshot::channel::<()>();
    let mut resume_tx = Some(resume_tx);
    let kiln_us = start_us + 100_000_000;
    // The gateways stream on their own while the test watches the writers: batch b from
    // gateway b % 3, the ledger's readings in order.
    let sender = tokio::spawn(async move {
        let mut sent = 0i64;
        let mut seqs = [0u64; 3];
        let mut resume = Some(resume_rx);
        for b in 0..BATCHES {
            let ledger = batch(b, start_us);
            let g = (b % 3) as usize;
            seqs[g] += 1;
            send_batch(&conns[g].0, seqs[g], Lane::Live, &ledger).await;
            sent += ledger.len() as i64;
            if b == BATCHES / 2 {
                // The kiln overheats, and the gateways wait for the test to kill the
                // alerting member that fires.
                seqs[2] += 1;
                let hot = readings("kiln", "heat", kiln_us, 30, 100_000, 95.0);
                send_batch(&conns[2].0, seqs[2], Lane::Live, &hot).await;
                resume.take().unwrap().await.unwrap();
                seqs[2] += 1;
                let cool = readings("kiln", "heat", kiln_us + 3_000_000, 30, 100_000, 20.0);
                send_batch(&conns[2].0, seqs[2], Lane::Live, &cool).await;
            }
        }
        for (c, _) in &conns {
            c.close(0u32.into(), b"done");
        }
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
    let mut survivor = None;
    while !sender.is_finished() || start_watch.elapsed() < Duration::from_secs(2) {
        if let Some(l) = tokio::task::block_in_place(&lag) {
            most = most.max(l.iter().map(|p| p.2).sum::<i64>());
        }
        // Later, once the kiln's alert fires, the alerting member that fired dies.
        if resume_tx.is_some()
            && pgc
                .query_opt("SELECT 1 FROM alerts WHERE device_id = 'kiln'", &[])
                .await
                .unwrap()
                .is_some()
        {
            let fired: Vec<usize> = (0..2)
                .filter(|i| {
                    scrape_port(alerting_ports[*i]).is_some_and(|t| {
                        t.lines().any(|l| {
                            l.starts_with("plantlink_cloud_alerts_total")
                                && l.contains("state=\"firing\"")
                                && !l.ends_with(" 0")
                        })
                    })
                })
                .collect();
            assert_eq!(fired.len(), 1, "one alerting member fired");
            drop(members[fired[0]].take());
            survivor = Some(1 - fired[0]);
            resume_tx.take().unwrap().send(()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let survivor = survivor.expect("the kiln's alert never fired");
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
                .query_one(
                    "SELECT count(*) FROM raw_metrics WHERE device_id LIKE 'dev-%'",
                    &[],
                )
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
             FROM raw_metrics WHERE tenant_id = 'acme' AND device_id LIKE 'dev-%'",
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
    // The kiln's alert: fired before the alerting member died, resolved by the survivor once.
    until(
        "the kiln's alert resolved",
        Duration::from_secs(60),
        async || {
            pgc.query_opt(
                "SELECT 1 FROM alerts WHERE device_id = 'kiln' AND state = 'resolved'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
        },
    )
    .await;
    let kiln: i64 = pgc
        .query_one("SELECT count(*) FROM alerts WHERE device_id = 'kiln'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kiln, 1, "one alert for the kiln, fired and resolved once");
    assert_eq!(held(alerting_ports[survivor]), 6.0);
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
    // What the dashboard shows of the scale-out mode, a writer exports.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/plantlink-pipeline.json"
    ))
    .unwrap();
    for name in [
        "plantlink_cloud_consumer_lag",
        "plantlink_cloud_consumer_partitions",
        "plantlink_cloud_writer_paused",
    ] {
        assert!(
            dashboard.contains(name),
            "the dashboard does not show {name}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && !l.starts_with('#')),
            "a writer does not export {name}"
        );
    }

    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Readings of `device` with `value`, one every `every_us` from `from_us`.
fn readings(
    device: &str,
    metric: &str,
    from_us: i64,
    n: i64,
    every_us: i64,
    value: f64,
) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            Reading::new(
                "claimed",
                device,
                metric,
                Timestamp(from_us + i * every_us),
                value,
            )
        })
        .collect()
}

/// Two `--role alerting` members share the backbone's six partitions. A device's rule fires
/// on the member that holds it; that member is killed (SIGKILL), the other takes its
/// partitions, rebuilds their windows from Kafka and the tables, and resolves the alert:
/// one firing and one resolution in `alerts`, one id each on the Kafka alerts topic. A
/// second rule whose window holds readings from before and after the kill fires only
/// because the window moved with its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerting_members_move_windows_with_partitions_and_repeat_no_transition() {
    let d = Dir::new("roles-alerting");
    common::fleet(&d.0, "gw-al");
    let db = format!("plantlink_test_roles_al_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_addr = udp.local_addr().unwrap();
    drop(udp);
    let pid = std::process::id();
    let topic = format!("test.backbone.al.{pid}");
    let alerts_topic = format!("test.alerts.al.{pid}");
    let group = format!("test-alerting-{pid}");
    let config = |extra: &str| {
        format!(
            "[quic]\nbind = \"{quic_addr}\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\n\
             [alerting]\nrules_reload_ms = 300\ntick_ms = 100\n\
             [kafka]\nbrokers = \"{tansu}\"\nreadings_topic = \"test.readings.al.{pid}\"\n\
             dlq_topic = \"test.dlq.al.{pid}\"\nalerts_topic = \"{alerts_topic}\"\n\
             backbone_topic = \"{topic}\"\nbackbone_backfill_topic = \"{topic}.backfill\"\n\
             backbone_partitions = 6\nalerting_group = \"{group}\"\n\
             public_readings = false\n{extra}"
        )
    };
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    std::fs::write(
        d.0.join("receiver.toml"),
        config(&format!(
            "[api]\nbind = \"{api}\"\n[api.tokens]\nacme = \"{TOKEN}\"\n"
        )),
    )
    .unwrap();
    let ports = [common::free_tcp_port(), common::free_tcp_port()];
    for (i, p) in ports.iter().enumerate() {
        std::fs::write(
            d.0.join(format!("alerting-{i}.toml")),
            config(&format!("[metrics]\nbind = \"127.0.0.1:{p}\"\n")),
        )
        .unwrap();
    }
    let log = |n: &str| d.0.join(format!("{n}.log"));
    let mut members: Vec<Option<common::Proc>> = (0..2)
        .map(|i| {
            Some(start(
                &d.0.join(format!("alerting-{i}.toml")),
                "alerting",
                &log(&format!("alerting-{i}")),
            ))
        })
        .collect();
    let metric = |port: u16, name: &str| {
        common::scrape(format!("127.0.0.1:{port}").parse().unwrap())
            .map_or(-1.0, |t| common::metric_total(&t, name))
    };
    // Partitions of the live lane's group a member holds.
    let held = |port: u16| {
        let want = format!("plantlink_cloud_consumer_partitions{{group=\"{group}\"}} ");
        common::scrape(format!("127.0.0.1:{port}").parse().unwrap()).map_or(-1.0, |t| {
            t.lines()
                .find_map(|l| l.strip_prefix(&want)?.parse().ok())
                .unwrap_or(0.0)
        })
    };
    // Both members hold three partitions each before anything is sent.
    until(
        "the members sharing the partitions",
        Duration::from_secs(60),
        async || ports.iter().all(|p| held(*p) == 3.0),
    )
    .await;
    let _receiver = start(&d.0.join("receiver.toml"), "receiver", &log("receiver"));
    let ep = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-al")));
    let began = Instant::now();
    while !matches!(
        common::attempt(&ep, quic_addr, "gw-al").await,
        Ok(Frame::Welcome(_))
    ) {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the receiver did not come up; see {}",
            log("receiver").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A receiver is ready when Kafka answers: it writes no database.
    until("the receiver ready", Duration::from_secs(30), async || {
        let (st, body) = common::http_json(api, "GET", "/readyz", TOKEN, None);
        st == 200 && body["role"] == "receiver"
    })
    .await;
    // Two devices in one partition: `hot` trips an average over 2-s windows; `win` a count
    // over one 60-s window that the kill cuts in two.
    let hot = "hot-1";
    let win = (0..)
        .map(|i| format!("win-{i}"))
        .find(|w| {
            cloud_ingest::backbone::partition("acme", w, 6)
                == cloud_ingest::backbone::partition("acme", hot, 6)
        })
        .unwrap();
    let rules = [
        serde_json::json!({"name": "hot", "metric": "temperature",
            "selector": {"device_id": hot}, "aggregate": "avg", "op": ">", "threshold": 80.0,
            "window": {"kind": "tumbling", "seconds": 2}, "for_windows": 1, "severity": "critical"}),
        serde_json::json!({"name": "busy", "metric": "strokes",
            "selector": {"device_id": win}, "aggregate": "count", "op": ">", "threshold": 15.0,
            "window": {"kind": "tumbling", "seconds": 60}, "for_windows": 1, "severity": "warning"}),
    ];
    let mut ids = Vec::new();
    for r in &rules {
        let (st, body) = common::http_json(api, "POST", "/v1/alert-rules", TOKEN, Some(r));
        assert_eq!(st, 201, "{body}");
        ids.push(body["id"].as_i64().unwrap());
    }
    until(
        "the members reading the rules",
        Duration::from_secs(30),
        async || {
            ports
                .iter()
                .all(|p| metric(*p, "plantlink_cloud_alert_rules_loaded") == 2.0)
        },
    )
    .await;
    let conn = common::connect(&ep, quic_addr, "gw-al").await;
    let mut seq = 0u64;
    let mut send = async |rs: Vec<Reading>| {
        seq += 1;
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        let frame = Frame::Batch(Batch {
            seq,
            lane: Lane::Live,
            readings: rs.len() as u32,
            payload: BatchEncoder::default().encode(&rs),
        });
        quic::write_frame(&mut s, &frame).await.unwrap();
        let answer = quic::read_frame(&mut r, 1 << 16).await.unwrap();
        assert_eq!(answer, Frame::Ack(Ack { seq }), "batch {seq}");
    };
    // Event time: a minute boundary an hour ago; one second of it per batch.
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let t0 = (now_us - 3_600_000_000) / 60_000_000 * 60_000_000;
    let second = |b: i64, device: &str, metric: &str, n: i64, value: f64| {
        readings(device, metric, t0 + b * 1_000_000, n, 1_000_000 / n, value)
    };
    for b in 0..6 {
        let mut rs = second(b, hot, "temperature", 4, 90.0);
        rs.extend(second(b, &win, "strokes", 2, 1.0));
        send(rs).await;
    }
    let rows = async |device: &str| -> Vec<(String, Option<String>, Option<String>)> {
        pgc.query(
            "SELECT state, event_id, resolved_event_id FROM alerts WHERE device_id = $1 ORDER BY alert_id",
            &[&device],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    };
    until(
        "the hot device's alert firing",
        Duration::from_secs(30),
        async || !rows(hot).await.is_empty(),
    )
    .await;
    // The member that fired holds the partition: it dies.
    let fired: Vec<usize> = (0..2)
        .filter(|i| {
            common::scrape(format!("127.0.0.1:{}", ports[*i]).parse().unwrap()).is_some_and(|t| {
                t.lines().any(|l| {
                    l.starts_with("plantlink_cloud_alerts_total")
                        && l.contains("state=\"firing\"")
                        && !l.ends_with(" 0")
                })
            })
        })
        .collect();
    assert_eq!(fired.len(), 1, "one member fired");
    let (killed, survivor) = (fired[0], 1 - fired[0]);
    // It has stored its progress (its offsets follow the deliveries within a second): the
    // survivor must rebuild the windows from Kafka rather than evaluate again.
    let part = cloud_ingest::backbone::partition("acme", hot, 6);
    until(
        "the member storing its offset",
        Duration::from_secs(30),
        async || {
            pgc.query_opt(
                "SELECT committed_offset FROM pipeline_offsets
             WHERE consumer_group = $1 AND partition_id = $2",
                &[&group, &part],
            )
            .await
            .unwrap()
            .is_some_and(|r| r.get::<_, i64>(0) == 6)
        },
    )
    .await;
    drop(members[killed].take());
    eprintln!("killed alerting member {killed}; {survivor} goes on");
    // The hot device stays hot for three more seconds, then cools; `win` goes on counting
    // in the same 60-s window; then event time passes the window's end.
    for b in 6..12 {
        let temp = if b < 9 { 90.0 } else { 20.0 };
        let mut rs = second(b, hot, "temperature", 4, temp);
        rs.extend(second(b, &win, "strokes", 2, 1.0));
        send(rs).await;
    }
    let mut rs = second(62, hot, "temperature", 4, 20.0);
    rs.extend(second(62, &win, "strokes", 1, 1.0));
    send(rs).await;
    conn.close(0u32.into(), b"done");
    until(
        "the survivor holding all six partitions",
        Duration::from_secs(60),
        async || held(ports[survivor]) == 6.0,
    )
    .await;
    until(
        "the hot alert resolved and the window rule fired",
        Duration::from_secs(60),
        async || {
            rows(hot).await.first().is_some_and(|r| r.0 == "resolved")
                && !rows(&win).await.is_empty()
        },
    )
    .await;
    // One alert each: the hot one fired once and resolved once; the window one fired with the
    // readings of both members' time (12 before the kill, 12 after: 24 > 15, where 12 alone
    // would not have fired).
    let hot_rows = rows(hot).await;
    assert_eq!(hot_rows.len(), 1, "{hot_rows:?}");
    assert!(
        hot_rows[0].1.is_some() && hot_rows[0].2.is_some(),
        "{hot_rows:?}"
    );
    let win_rows = rows(&win).await;
    assert_eq!(win_rows.len(), 1, "{win_rows:?}");
    assert_eq!(win_rows[0].0, "firing");
    let value: f64 = pgc
        .query_one("SELECT value FROM alerts WHERE device_id = $1", &[&win])
        .await
        .unwrap()
        .get(0);
    assert_eq!(value, 24.0);
    assert_eq!(
        metric(
            ports[survivor],
            "plantlink_cloud_alerting_records_replayed_total"
        ),
        6.0,
        "the survivor rebuilds from the six records before the stored offset"
    );
    // On Kafka: one id per transition (a transition delivered again after the kill would
    // carry the same id).
    let total: i64 = {
        let (b, t) = (tansu.to_string(), alerts_topic.clone());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &b)
                .create()
                .unwrap();
            let md = c.fetch_metadata(Some(&t), Duration::from_secs(10)).unwrap();
            md.topics()[0]
                .partitions()
                .iter()
                .map(|p| {
                    c.fetch_watermarks(&t, p.id(), Duration::from_secs(10))
                        .unwrap()
                        .1
                })
                .sum()
        })
        .await
        .unwrap()
    };
    let (events, _) = {
        let (b, t) = (tansu.to_string(), alerts_topic.clone());
        tokio::task::spawn_blocking(move || {
            common::consume_all(&b, &t, total as usize, Duration::from_secs(30))
        })
        .await
        .unwrap()
    };
    let mut by_id: BTreeMap<String, (String, String, usize)> = BTreeMap::new();
    for (_, _, v, _) in &events {
        let e = by_id
            .entry(v["event_id"].as_str().unwrap().to_owned())
            .or_insert_with(|| {
                (
                    v["device_id"].as_str().unwrap().to_owned(),
                    v["state"].as_str().unwrap().to_owned(),
                    0,
                )
            });
        e.2 += 1;
    }
    let kinds: Vec<(String, String)> = by_id
        .values()
        .map(|(d, s, _)| (d.clone(), s.clone()))
        .collect();
    let mut want = vec![
        (hot.to_owned(), "firing".to_owned()),
        (hot.to_owned(), "resolved".to_owned()),
        (win.clone(), "firing".to_owned()),
    ];
    want.sort();
    let mut got = kinds.clone();
    got.sort();
    assert_eq!(got, want, "{by_id:?}");
    eprintln!(
        "alert events on Kafka: {} for {} ids",
        events.len(),
        by_id.len()
    );
    // The group's offsets are in pipeline_offsets, at every partition's end.
    until(
        "the alerting offsets at the ends",
        Duration::from_secs(30),
        async || {
            let (st, body) = common::http_json(api, "GET", "/v1/pipeline/lag", TOKEN, None);
            assert_eq!(st, 200, "{body}");
            body["consumer_groups"][&group][&topic]
                .as_object()
                .is_some_and(|parts| parts.len() == 6 && parts.values().all(|p| p["lag"] == 0))
        },
    )
    .await;
    drop(members);
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Sends one batch on `lane` and waits for its ack.
async fn send_batch(conn: &quinn::Connection, seq: u64, lane: Lane, rs: &[Reading]) {
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let frame = Frame::Batch(Batch {
        seq,
        lane,
        readings: rs.len() as u32,
        payload: BatchEncoder::default().encode(rs),
    });
    quic::write_frame(&mut s, &frame).await.unwrap();
    let answer = quic::read_frame(&mut r, 1 << 16).await.unwrap();
    assert_eq!(answer, Frame::Ack(Ack { seq }), "batch {seq}");
}

/// Tenant fairness on the backbone: tenant acme's gateway replays a backlog of a million
/// readings (its backlog lane) while the alerting member is stopped; when it resumes, tenant
/// beta's live reading trips its rule while acme's backlog is still being evaluated. The
/// backlog lane has its own topic and consumers, so it never waits in front of live data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_backlog_does_not_delay_another_tenants_live_alerts() {
    let d = Dir::new("roles-fair");
    common::fleet(&d.0, "gw-a");
    cloud_ingest::pki::gateway(&d.0, "gw-b", "beta", 30).unwrap();
    let db = format!("plantlink_test_roles_fair_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_addr = udp.local_addr().unwrap();
    drop(udp);
    let pid = std::process::id();
    let topic = format!("test.backbone.fair.{pid}");
    let group = format!("test-alerting-fair-{pid}");
    let backfill_group = format!("{group}.backfill");
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let metrics = common::free_tcp_port();
    let config = |extra: &str| {
        format!(
            "[quic]\nbind = \"{quic_addr}\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\nmax_pending_readings = 200000\n\
             [alerting]\nrules_reload_ms = 300\ntick_ms = 100\n\
             [kafka]\nbrokers = \"{tansu}\"\nreadings_topic = \"test.readings.fair.{pid}\"\n\
             dlq_topic = \"test.dlq.fair.{pid}\"\nalerts_topic = \"test.alerts.fair.{pid}\"\n\
             backbone_topic = \"{topic}\"\nbackbone_backfill_topic = \"{topic}.backfill\"\n\
             backbone_partitions = 6\nalerting_group = \"{group}\"\npublic_readings = false\n{extra}"
        )
    };
    std::fs::write(
        d.0.join("receiver.toml"),
        config(&format!(
            "[api]\nbind = \"{api}\"\n[api.tokens]\nacme = \"{TOKEN}\"\nbeta = \"beta-token-0123456789abcdef\"\n"
        )),
    )
    .unwrap();
    std::fs::write(
        d.0.join("alerting.toml"),
        config(&format!("[metrics]\nbind = \"127.0.0.1:{metrics}\"\n")),
    )
    .unwrap();
    let log = |n: &str| d.0.join(format!("{n}.log"));
    let member = start(&d.0.join("alerting.toml"), "alerting", &log("alerting"));
    let held = |g: &str| {
        let want = format!("plantlink_cloud_consumer_partitions{{group=\"{g}\"}} ");
        common::scrape(format!("127.0.0.1:{metrics}").parse().unwrap()).map_or(-1.0, |t| {
            t.lines()
                .find_map(|l| l.strip_prefix(&want)?.parse().ok())
                .unwrap_or(0.0)
        })
    };
    until(
        "the member on both lanes",
        Duration::from_secs(60),
        async || held(&group) == 6.0 && held(&backfill_group) == 6.0,
    )
    .await;
    let _receiver = start(&d.0.join("receiver.toml"), "receiver", &log("receiver"));
    let ep_a = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-a")));
    let ep_b = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-b")));
    let began = Instant::now();
    while !matches!(
        common::attempt(&ep_a, quic_addr, "gw-a").await,
        Ok(Frame::Welcome(_))
    ) {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the receiver did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // acme evaluates a rule on every device of its backlog; beta watches one machine.
    for (token, rule) in [
        (
            TOKEN,
            serde_json::json!({"name": "flood", "metric": "flow",
            "aggregate": "avg", "op": ">", "threshold": 1e9,
            "window": {"kind": "tumbling", "seconds": 10}, "for_windows": 1, "severity": "info"}),
        ),
        (
            "beta-token-0123456789abcdef",
            serde_json::json!({"name": "hot", "metric": "temperature",
            "selector": {"device_id": "b-press"}, "aggregate": "avg", "op": ">", "threshold": 80.0,
            "window": {"kind": "tumbling", "seconds": 1}, "for_windows": 1, "severity": "critical"}),
        ),
    ] {
        let (st, body) = common::http_json(api, "POST", "/v1/alert-rules", token, Some(&rule));
        assert_eq!(st, 201, "{body}");
    }
    until(
        "the member reading the rules",
        Duration::from_secs(30),
        async || {
            common::scrape(format!("127.0.0.1:{metrics}").parse().unwrap()).is_some_and(|t| {
                common::metric_total(&t, "plantlink_cloud_alert_rules_loaded") == 2.0
            })
        },
    )
    .await;
    let a = common::connect(&ep_a, quic_addr, "gw-a").await;
    let b = common::connect(&ep_b, quic_addr, "gw-b").await;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    // One batch on each lane first, so both lanes' partitions have a stored start.
    send_batch(&a, 1, Lane::Backlog, &batch(0, now_us - 7_200_000_000)).await;
    send_batch(
        &b,
        1,
        Lane::Live,
        &readings(
            "b-press",
            "temperature",
            now_us - 60_000_000,
            10,
            100_000,
            20.0,
        ),
    )
    .await;
    until("both lanes stored", Duration::from_secs(30), async || {
        let n: i64 = pgc
            .query_one("SELECT count(*) FROM pipeline_offsets", &[])
            .await
            .unwrap()
            .get(0);
        n >= 2
    })
    .await;
    // The member stops; acme's gateway replays its backlog meanwhile.
    let pid_of = member.0.id() as i32;
    assert_eq!(signal(pid_of, "STOP"), 0);
    const BACKLOG: u64 = 100;
    const EACH: i64 = 10_000;
    for b_ in 1..=BACKLOG {
        let rs: Vec<Reading> = (0..EACH)
            .map(|i| {
                let n = b_ as i64 * EACH + i;
                Reading::new(
                    "claimed",
                    format!("a-{}", n % 500),
                    "flow",
                    Timestamp(now_us - 7_200_000_000 + n * 1_000),
                    n as f64,
                )
            })
            .collect();
        send_batch(&a, b_ + 1, Lane::Backlog, &rs).await;
    }
    // beta's machine overheats: two seconds of live readings.
    let sent = Instant::now();
    send_batch(
        &b,
        2,
        Lane::Live,
        &readings(
            "b-press",
            "temperature",
            now_us - 3_000_000,
            30,
            100_000,
            95.0,
        ),
    )
    .await;
    assert_eq!(signal(pid_of, "CONT"), 0);
    until("beta's alert", Duration::from_secs(120), async || {
        pgc.query_opt("SELECT 1 FROM alerts WHERE tenant_id = 'beta'", &[])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let latency = sent.elapsed();
    // At that moment acme's backlog is still being evaluated.
    let (st, body) = common::http_json(api, "GET", "/v1/pipeline/lag", TOKEN, None);
    assert_eq!(st, 200, "{body}");
    let behind: i64 = body["consumer_groups"][&backfill_group][format!("{topic}.backfill")]
        .as_object()
        .map(|parts| parts.values().map(|p| p["lag"].as_i64().unwrap()).sum())
        .unwrap_or(0);
    eprintln!(
        "beta's alert {latency:?} after its reading, with {behind} backlog records of acme not yet evaluated"
    );
    assert!(
        behind > 0,
        "acme's backlog was evaluated before beta's live alert"
    );
    // And the backlog is evaluated in full afterwards.
    until(
        "acme's backlog evaluated",
        Duration::from_secs(180),
        async || {
            let (_, body) = common::http_json(api, "GET", "/v1/pipeline/lag", TOKEN, None);
            body["consumer_groups"][&backfill_group][format!("{topic}.backfill")]
                .as_object()
                .is_some_and(|parts| parts.values().all(|p| p["lag"] == 0))
        },
    )
    .await;
    drop(member);
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Sends `SIG<sig>` to `pid` with kill(1) (the crate forbids unsafe code).
fn signal(pid: i32, sig: &str) -> i32 {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// A slow database under a scale-out writer: `raw_metrics` is locked while a gateway sends
/// 400,000 readings. The receiver acknowledges them all (Kafka holds them); the writer pauses
/// its partitions, its memory stays bounded (one round and a 2 MiB prefetch, not the
/// backlog), nothing is written meanwhile, and once the lock goes every reading lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_on_a_slow_database_pauses_with_bounded_memory_and_loses_nothing() {
    const BATCHES: u64 = 40;
    const EACH: i64 = 10_000;
    let d = Dir::new("roles-slow");
    common::fleet(&d.0, "gw-s");
    let db = format!("plantlink_test_roles_slow_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic_addr = udp.local_addr().unwrap();
    drop(udp);
    let pid = std::process::id();
    let topic = format!("test.backbone.slow.{pid}");
    let group = format!("test-writers-slow-{pid}");
    let metrics = common::free_tcp_port();
    let config = |extra: &str| {
        format!(
            "[quic]\nbind = \"{quic_addr}\"\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [postgres]\nurl = \"{url}\"\nflush_max_readings = 20000\n\
             [kafka]\nbrokers = \"{tansu}\"\nreadings_topic = \"test.readings.slow.{pid}\"\n\
             dlq_topic = \"test.dlq.slow.{pid}\"\nalerts_topic = \"test.alerts.slow.{pid}\"\n\
             backbone_topic = \"{topic}\"\nbackbone_backfill_topic = \"{topic}.backfill\"\n\
             backbone_partitions = 6\nwriter_group = \"{group}\"\npublic_readings = false\n{extra}"
        )
    };
    std::fs::write(d.0.join("receiver.toml"), config("")).unwrap();
    std::fs::write(
        d.0.join("writer.toml"),
        config(&format!(
            "[metrics]\nbind = \"127.0.0.1:{metrics}\"\n[kafka.consumer]\n\"queued.max.messages.kbytes\" = \"2048\"\n"
        )),
    )
    .unwrap();
    let log = |n: &str| d.0.join(format!("{n}.log"));
    let writer = start(&d.0.join("writer.toml"), "writer", &log("writer"));
    let scrape = || common::scrape(format!("127.0.0.1:{metrics}").parse().unwrap());
    until(
        "the writer holding the partitions",
        Duration::from_secs(60),
        async || {
            scrape().is_some_and(|t| {
                t.lines().any(|l| {
                    l.starts_with(&format!(
                        "plantlink_cloud_consumer_partitions{{group=\"{group}\"}} 6"
                    ))
                })
            })
        },
    )
    .await;
    let _receiver = start(&d.0.join("receiver.toml"), "receiver", &log("receiver"));
    let ep = common::client(&d.0.join("ca.pem"), Some((&d.0, "gw-s")));
    let began = Instant::now();
    while !matches!(
        common::attempt(&ep, quic_addr, "gw-s").await,
        Ok(Frame::Welcome(_))
    ) {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the receiver did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_kib = rss_kib(writer.0.id());
    // The database turns slow: a transaction holds the table.
    let (mut locker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE raw_metrics IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let conn = common::connect(&ep, quic_addr, "gw-s").await;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let mut peak_kib = idle_kib;
    for b in 0..BATCHES {
        // Values that do not compress away: the backbone holds megabytes.
        let rs: Vec<Reading> = (0..EACH)
            .map(|i| {
                let n = b as i64 * EACH + i;
                let v = (n.wrapping_mul(0x9e37_79b9) % 1_000_003) as f64 / 7.0;
                Reading::new(
                    "claimed",
                    format!("m-{}", n % 300),
                    "flow",
                    Timestamp(now_us - 3_600_000_000 + n * 1_000),
                    v,
                )
            })
            .collect();
        send_batch(&conn, b + 1, Lane::Live, &rs).await;
        peak_kib = peak_kib.max(rss_kib(writer.0.id()));
    }
    eprintln!(
        "the receiver acknowledged {} readings while the table was locked",
        BATCHES as i64 * EACH
    );
    until("the writer paused", Duration::from_secs(30), async || {
        scrape().is_some_and(|t| common::metric_total(&t, "plantlink_cloud_writer_paused") == 1.0)
    })
    .await;
    // The writer stays paused and bounded while the lock holds.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        peak_kib = peak_kib.max(rss_kib(writer.0.id()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let in_kafka: i64 = {
        let (b, t) = (tansu.to_string(), topic.clone());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &b)
                .create()
                .unwrap();
            (0..6)
                .map(|p| {
                    c.fetch_watermarks(&t, p, Duration::from_secs(10))
                        .unwrap()
                        .1
                })
                .sum()
        })
        .await
        .unwrap()
    };
    let rows_locked: i64 = pgc
        .query_one(
            "SELECT count(*) FROM pipeline_offsets WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "writer RSS idle {} KiB, peak {} KiB while {in_kafka} backbone records waited",
        idle_kib, peak_kib
    );
    assert_eq!(
        rows_locked, 0,
        "the writer stored offsets through a locked table"
    );
    assert!(
        peak_kib < idle_kib + 64 * 1024,
        "the writer grew from {idle_kib} to {peak_kib} KiB while the database was locked"
    );
    // The lock goes: every reading lands once.
    lock.rollback().await.unwrap();
    let sent = BATCHES as i64 * EACH;
    until(
        "every reading in PostgreSQL",
        Duration::from_secs(120),
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
    let distinct: i64 = pgc
        .query_one(
            "SELECT count(DISTINCT (device_id, ts)) FROM raw_metrics",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, sent);
    until("the writer resumed", Duration::from_secs(30), async || {
        scrape().is_some_and(|t| common::metric_total(&t, "plantlink_cloud_writer_paused") == 0.0)
    })
    .await;
    drop(writer);
    drop(locker);
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
