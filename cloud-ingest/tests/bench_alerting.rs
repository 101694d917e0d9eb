//! Alerting benchmarks (not run by default):
//!
//! - **Evaluation throughput**: the engine alone on one core, 100 rules over 1,000 devices x
//!   4 metrics at 1 Hz of event time (each reading updates the windows of 25 rules).
//! - **Alert latency**: the whole pipeline (Mosquitto, agent, QUIC, cloud-ingest with
//!   PostgreSQL and Kafka on a local Tansu) carrying `PLANTLINK_BENCH_ALERT_RATE` (default
//!   50,000) readings/s of background load for `PLANTLINK_BENCH_ALERT_SECS` (default 40)
//!   seconds that 100 rules evaluate, while one device
//!   crosses a threshold every other second. Latency is from the moment the reading that
//!   closes the window could first be published (window end plus the out-of-orderness
//!   bound) to the alert record's arrival on the Kafka alerts topic.
//!   With `PLANTLINK_BENCH_ALERT_LOAD=firmware-sim` the load is `firmware-sim run` instead
//!   (in process): 1,000 multi-json devices (five readings a message) at the rate's share,
//!   the first 10 of them hot in even seconds (`hot_cycle` 2 s), and the rule over every
//!   device's temperature.
//!
//! `cargo test --release -p cloud-ingest --test bench_alerting -- --ignored --nocapture --test-threads 1`
#![allow(clippy::unwrap_used)] // benchmarks may panic

mod common;

use std::time::{Duration, Instant};

use cloud_ingest::alerting::engine::{Engine, Input, Output, Settings};
use cloud_ingest::alerting::rule::{Aggregate, Condition, Op, Rule, Selector, Window};
use plantlink_model::{Reading, Timestamp};

const METRICS: [&str; 4] = ["temperature", "pressure", "flow", "vibration"];

fn rules() -> Vec<Rule> {
    (0..100)
        .map(|i| Rule {
            id: i,
            tenant: "acme".into(),
            selector: Selector::default(),
            condition: Condition::Threshold {
                metric: METRICS[(i % 4) as usize].into(),
                aggregate: [
                    Aggregate::Avg,
                    Aggregate::Max,
                    Aggregate::Min,
                    Aggregate::Rate,
                ][(i / 4 % 4) as usize],
                op: Op::Gt,
                threshold: 1e9,
                window: if i % 2 == 0 {
                    Window::Tumbling { seconds: 10 }
                } else {
                    Window::Sliding {
                        seconds: 30,
                        every: 10,
                    }
                },
                for_windows: 1,
            },
            severity: "warning".into(),
        })
        .collect()
}

#[test]
#[ignore = "a benchmark: run with --release -- --ignored"]
fn engine_throughput_on_one_core() {
    let mut e = Engine::new(Settings::default());
    e.set_rules(rules());
    let seconds = 120;
    let readings: Vec<Reading> = (0..seconds)
        .flat_map(|s| {
            (0..1000).flat_map(move |d| {
                METRICS.iter().map(move |m| {
                    Reading::new(
                        "acme",
                        format!("dev-{d}"),
                        *m,
                        Timestamp(s * 1_000_000 + d),
                        (d % 50) as f64,
                    )
                })
            })
        })
        .collect();
    let mut out = Vec::new();
    let start = Instant::now();
    for r in &readings {
        e.on_reading(
            Input {
                tenant: "acme",
                reading: r,
                backfill: false,
            },
            r.ts.0,
            &mut out,
        );
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(out.iter().all(|o| matches!(o, Output::Late { .. })));
    println!(
        "engine: {} readings x 25 matching rules each in {secs:.2} s = {:.0} readings/s on one core \
         ({} series, {} windows held at the end)",
        readings.len(),
        readings.len() as f64 / secs,
        e.series_count(),
        e.window_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --release -- --ignored"]
async fn alert_latency_under_load() {
    use cloud_ingest::config::Alerting;
    use cloud_ingest::server::Server;

    let rate: u64 = std::env::var("PLANTLINK_BENCH_ALERT_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let run_secs: u64 = std::env::var("PLANTLINK_BENCH_ALERT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let sim = std::env::var("PLANTLINK_BENCH_ALERT_LOAD").is_ok_and(|v| v == "firmware-sim");
    let run_name = format!("bench{}", std::process::id());
    // Whose freshness is sampled: the trigger, or the simulator's first (hot) device.
    let watched = if sim {
        format!("{run_name}-multi-json-00000")
    } else {
        "trigger".to_owned()
    };
    let d = common::Dir::new("bench-alert");
    common::fleet(&d.0, "gw-bench");
    let db = format!("plantlink_bench_alert_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let (_tansu, tansu) = common::start_tansu(None);
    let alerts_topic = format!("bench.alerts.{}", std::process::id());

    // 100 rules over the load (never true), and one over the trigger device, or over every
    // device of the simulator (cool ones run at 20-60 degrees plus a slow walk, hot ones
    // 60 more).
    let mut all = rules();
    all.push(Rule {
        id: 1000,
        tenant: "acme".into(),
        selector: Selector {
            device_id: (!sim).then(|| "trigger".into()),
            ..Selector::default()
        },
        condition: Condition::Threshold {
            metric: "temperature".into(),
            aggregate: Aggregate::Max,
            op: Op::Gt,
            threshold: if sim { 75.0 } else { 80.0 },
            window: Window::Tumbling { seconds: 1 },
            for_windows: 1,
        },
        severity: "critical".into(),
    });
    for r in &all {
        let Condition::Threshold {
            metric,
            aggregate,
            threshold,
            window,
            ..
        } = &r.condition
        else {
            unreachable!()
        };
        let body = serde_json::json!({
            "name": format!("rule {}", r.id), "metric": metric, "selector": r.selector,
            "aggregate": aggregate, "op": ">", "threshold": threshold, "window": window,
            "severity": r.severity,
        });
        pgc.execute(
            "INSERT INTO alert_rules (rule_id, tenant_id, name, condition_expr, severity) VALUES ($1, 'acme', $2, $3::text::jsonb, $4)",
            &[&r.id, &format!("rule {}", r.id), &body.to_string(), &r.severity],
        )
        .await
        .unwrap();
    }

    let mut cfg = common::cloud_config(&d.0, url.clone(), 32, 8 << 20);
    // `PLANTLINK_BENCH_WRITERS`: PostgreSQL writer connections (the default otherwise).
    if let Some(n) = std::env::var("PLANTLINK_BENCH_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.postgres.writers = n;
    }
    let mut k = cloud_ingest::config::Kafka::with_brokers(tansu.to_string());
    k.alerts_topic = alerts_topic.clone();
    k.partitions = 1;
    cfg.kafka = Some(k);
    cfg.alerting = Alerting {
        tick_ms: 100,
        ..Alerting::default()
    };
    let server = Server::bind(cfg).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx.clone()));

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("bench-alert-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    let config = common::Agent {
        gateway: "gw-bench",
        mqtt: Some((broker.port, &client_id, "plant/{device}")),
        cloud: cloud_addr.to_string(),
        store: "synchronous = \"normal\"",
        uplink: "batch_max_readings = 5000\nbatch_linger_ms = 50",
    }
    .config(&d.0);
    // The agent's queue depth every 5 s of the run: flat while shipping keeps up.
    let queue_path = config.store.path.clone();
    let sampler = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut depth = Vec::new();
        while start.elapsed() < Duration::from_secs(run_secs) {
            std::thread::sleep(Duration::from_secs(5));
            let n = edge_agent::store::open_read_only(&queue_path)
                .and_then(|c| edge_agent::store::stats(&c))
                .map_or(0, |s| s.readings);
            // The process's resident memory (the agent and the cloud are both in it).
            let rss_mib = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|t| {
                    let l = t.lines().find(|l| l.starts_with("VmRSS:"))?;
                    l.split_whitespace().nth(1)?.parse::<u64>().ok()
                })
                .map_or(0, |kib| kib / 1024);
            depth.push(format!("{}s:{n}:{rss_mib}", start.elapsed().as_secs()));
        }
        depth
    });
    let mut agent_stop = stop_rx.clone();
    let agent = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = agent_stop.changed().await;
    }));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };

    // Publish -> row: each second, the age of the trigger device's newest stored reading
    // (published every 50 ms with the time of publishing).
    let fresh_db = cloud_ingest::postgres::connect(&url).await.unwrap();
    let freshness = tokio::spawn(async move {
        let start = Instant::now();
        let mut ages = Vec::new();
        while start.elapsed() < Duration::from_secs(run_secs) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let row = fresh_db
                .query_one(
                    "SELECT extract(epoch FROM clock_timestamp() - max(ts))::float8 FROM raw_metrics
                     WHERE tenant_id = 'acme' AND device_id = $1
                       AND metric_name = 'temperature'",
                    &[&watched],
                )
                .await
                .unwrap();
            if let Some(age) = row.get::<_, Option<f64>>(0) {
                ages.push((start.elapsed().as_secs_f64(), age));
            }
        }
        ages
    });
    let run_start_us = now_ms() * 1000;

    let counted_until_us = (now_ms() + run_secs as i64 * 1000) * 1000;
    let load: tokio::task::JoinHandle<u64> = if sim {
        firmware_sim_load(broker.port, run_name, rate, run_secs)
    } else {
        own_load(broker.port, rate, run_secs)
    };
    // Alert records as they arrive on Kafka, with their arrival time.
    let consumer_topic = alerts_topic.clone();
    let brokers = tansu.to_string();
    let watcher = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        use rdkafka::{ClientConfig, Offset, TopicPartitionList};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "bench-alert")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&consumer_topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let end = Instant::now() + Duration::from_secs(run_secs + 10);
        let mut lat = Vec::new();
        while Instant::now() < end {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                continue;
            };
            let arrived = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as i64;
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let end_us = time::OffsetDateTime::parse(
                v["window_end"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
            .unix_timestamp_nanos() as i64
                / 1000;
            if end_us > counted_until_us {
                continue;
            }
            // The first reading past window end + 1 s (the bound) could be published then.
            let at = (end_us - run_start_us) as f64 / 1e6;
            lat.push((at, (arrived - (end_us + 1_000_000)) as f64 / 1e6));
        }
        lat
    });
    let sent = load.await.unwrap();
    let timed = watcher.await.unwrap();
    let depth = sampler.await.unwrap();
    report(
        rate,
        run_secs,
        sent,
        &depth,
        &timed,
        freshness.await.unwrap(),
    );
    let _ = stop_tx.send(true);
    agent.await.unwrap().unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// `firmware-sim run` as the load: 1,000 multi-json devices (five readings a message) at
/// `rate` readings/s for the run and 3 s more (windows ending in the run are counted, and a
/// window closes with the device's next reading past its end + 1 s), the first 10 hot in
/// even seconds. Returns the readings the broker acknowledged.
fn firmware_sim_load(
    port: u16,
    run: String,
    rate: u64,
    run_secs: u64,
) -> tokio::task::JoinHandle<u64> {
    let o = firmware_sim::run::Options {
        mqtt: Some(format!("mqtt://127.0.0.1:{port}")),
        coap: None,
        coap_con: false,
        devices: 1000,
        mix: vec![(firmware_sim::fleet::Kind::MultiJson, 1)],
        rate: rate as f64 / 5.0 / 1000.0,
        duration: (run_secs + 3) as f64,
        seed: 7,
        qos: 1,
        prefix: "plant".into(),
        run,
        ledger: None,
        duplicate_rate: 0.0,
        malformed_rate: 0.0,
        out_of_order_rate: 0.0,
        oversize_rate: 0.0,
        skewed_devices: 0.0,
        silent_devices: 0,
        hot_devices: 10,
        hot_cycle: 2.0,
        flood_devices: 0,
        reference: false,
        progress: false,
    };
    tokio::spawn(async move {
        let r = firmware_sim::run::run(o).await.unwrap();
        println!(
            "firmware-sim: {} messages acknowledged ({:.0}/s), publish -> PUBACK p50 {:.1} ms, p99 {:.1} ms",
            r.acked, r.rate_per_sec, r.latency_ms.p50, r.latency_ms.p99
        );
        r.acked * 5
    })
}

/// The bench's own load: 1,000 devices, each message two metrics, paced per 10 ms tick, and
/// the trigger device. Returns the load's readings.
fn own_load(port: u16, rate: u64, run_secs: u64) -> tokio::task::JoinHandle<u64> {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let broker_port = port;
    let mut o = MqttOptions::new("bench-alert-load", "127.0.0.1", broker_port);
    o.set_inflight(1000);
    let (load, mut lel) = AsyncClient::new(o, 10_000);
    tokio::spawn(async move { while lel.poll().await.is_ok() {} });
    let per_tick = (rate / 2 / 100).max(1);
    let loader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let end = Instant::now() + Duration::from_secs(run_secs);
        let mut i = 0u64;
        while Instant::now() < end {
            tick.tick().await;
            let ts = now_ms();
            for _ in 0..per_tick {
                let body = format!(
                    r#"{{"ts": {ts}, "temperature": {}, "pressure": 1013.{}}}"#,
                    i % 50,
                    i % 10
                );
                load.publish(
                    format!("plant/dev-{}", i % 1000),
                    QoS::AtLeastOnce,
                    false,
                    body,
                )
                .await
                .unwrap();
                i += 1;
            }
        }
        i
    });
    // The trigger: every 50 ms, hot in even seconds and cool in odd ones. It goes on 3 s
    // past the load, and only windows that end within the load's run are counted: a
    // window closes when the device's next reading past its end + 1 s comes, so the last
    // windows of a device that stops would wait for the idle flush instead.
    let mut o = MqttOptions::new("bench-alert-trigger", "127.0.0.1", broker_port);
    o.set_inflight(100);
    let (trig, mut tel) = AsyncClient::new(o, 100);
    tokio::spawn(async move { while tel.poll().await.is_ok() {} });
    let trigger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let end = Instant::now() + Duration::from_secs(run_secs + 3);
        while Instant::now() < end {
            tick.tick().await;
            let ts = now_ms();
            let v = if (ts / 1000) % 2 == 0 { 99.0 } else { 20.0 };
            trig.publish(
                "plant/trigger",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"ts": {ts}, "temperature": {v}}}"#),
            )
            .await
            .unwrap();
        }
    });
    tokio::spawn(async move {
        let sent = loader.await.unwrap();
        trigger.await.unwrap();
        sent * 2
    })
}

/// Prints the figures of a run, and its series for `cloud-ingest/bench/plot_p7.py`.
fn report(
    rate: u64,
    run_secs: u64,
    sent: u64,
    depth: &[String],
    timed: &[(f64, f64)],
    mut ages: Vec<(f64, f64)>,
) {
    println!(
        "agent queue depth (readings) and the process's RSS (MiB) over the run: {}",
        depth.join(" ")
    );
    // In the order the alerts came: slow ones at the start are the pipeline warming up.
    let order: Vec<String> = timed.iter().map(|(_, l)| format!("{l:.2}")).collect();
    println!("alert latencies in order (s): {}", order.join(" "));
    // For `cloud-ingest/bench/plot_p7.py`: "<series> <rate> t:value ...", t in seconds.
    let series = |name: &str, points: &mut dyn Iterator<Item = String>| {
        println!(
            "plot {name} {rate} {}",
            points.collect::<Vec<_>>().join(" ")
        );
    };
    // Samples are "<t>s:<readings>:<RSS MiB>".
    let sample = |d: &String| -> (String, String, String) {
        let mut p = d.split(':');
        let t = p
            .next()
            .unwrap_or_default()
            .trim_end_matches('s')
            .to_owned();
        (
            t,
            p.next().unwrap_or_default().to_owned(),
            p.next().unwrap_or_default().to_owned(),
        )
    };
    series(
        "queue",
        &mut depth.iter().map(|d| {
            let (t, n, _) = sample(d);
            format!("{t}:{n}")
        }),
    );
    series(
        "rss_mib",
        &mut depth.iter().map(|d| {
            let (t, _, m) = sample(d);
            format!("{t}:{m}")
        }),
    );
    series(
        "alert",
        &mut timed.iter().map(|(t, l)| format!("{t:.1}:{l:.3}")),
    );
    series(
        "row",
        &mut ages.iter().map(|(t, a)| format!("{t:.1}:{a:.3}")),
    );
    ages.sort_by(|a, b| a.1.total_cmp(&b.1));
    if !ages.is_empty() {
        let at = |p: f64| ages[((ages.len() - 1) as f64 * p).round() as usize].1;
        println!(
            "publish -> row (age of the watched device's newest stored reading, sampled each \
             second; includes the gap between its readings, 50 ms for the trigger, 1/rate for a \
             simulator device): {} samples, p50 {:.3} s, p99 {:.3} s, max {:.3} s",
            ages.len(),
            at(0.5),
            at(0.99),
            ages[ages.len() - 1].1
        );
    }
    let mut lat: Vec<f64> = timed.iter().map(|(_, l)| *l).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    println!(
        "alert latency at {} readings/s offered ({} sent in {run_secs} s), 101 rules: {} alerts, p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        rate,
        sent,
        lat.len(),
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1]
    );
}
