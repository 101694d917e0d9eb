//! P6 benchmark (not run by default): the Kafka sink against a plain rdkafka producer with the
//! same settings, in the same run, alternating, medians of 3 rounds.
//!
//! Both send the same 500,000 reference readings to a fresh 6-partition topic on a local Tansu
//! broker (memory storage), one record per reading keyed by device with the three identity
//! headers, and stop the clock when every delivery report is in. Ours goes through
//! `Kafka::send_readings` (JSON built per reading, one `DeliveryFuture` each, awaited per
//! 10,000-reading batch as the server does); the peer is a `ThreadedProducer` with a counting
//! delivery callback, sending payloads serialised before its clock starts. Producer settings:
//! Plantlink's defaults for both (idempotent, `acks=all`, lz4, `linger.ms=20`).
//!
//! `cargo test --release -p cloud-ingest --test bench_kafka -- --ignored --nocapture`
//! (needs `PLANTLINK_TANSU`, as set by `tests/run.sh`, or `tansu` on the PATH).
#![allow(clippy::unwrap_used)] // benchmarks may panic

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cloud_ingest::config;
use cloud_ingest::kafka::{self, Kafka};
use plantlink_model::Reading;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;

const READINGS: usize = 500_000;
const BUDGET: usize = 200_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sink_config(brokers: &str, topic: &str) -> config::Kafka {
    let mut cfg = config::Kafka::with_brokers(brokers);
    cfg.readings_topic = topic.into();
    cfg.alerts_topic = format!("{topic}.alerts");
    cfg.dlq_topic = format!("{topic}.dlq");
    cfg
}

async fn ours(brokers: &str, topic: &str, readings: &[Reading]) -> f64 {
    let k = Kafka::new(&sink_config(brokers, topic), BUDGET).unwrap();
    k.ensure_topics().await.unwrap();
    // Connected, producer id assigned, partitions known: before the clock, as in service.
    k.send_readings("acme", "gw-1", &readings[..1])
        .await
        .wait()
        .await
        .unwrap();
    let start = Instant::now();
    let mut waits = Vec::new();
    for chunk in readings.chunks(10_000) {
        waits.push(k.send_readings("acme", "gw-1", chunk).await);
    }
    for w in waits {
        w.wait().await.unwrap();
    }
    start.elapsed().as_secs_f64()
}

#[derive(Default)]
struct Counted {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Counted {}

impl ProducerContext for Counted {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// One prepared record: key, JSON payload, timestamp header.
type Prepared = (String, Vec<u8>, String, String);

fn peer(brokers: &str, topic: &str, records: &[Prepared]) -> f64 {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in kafka::PRODUCER_DEFAULTS {
        c.set(k, v);
    }
    c.set(
        "queue.buffering.max.messages",
        (BUDGET * 2).clamp(100_000, 10_000_000).to_string(),
    );
    let p: ThreadedProducer<Counted> = c.create_with_context(Counted::default()).unwrap();
    let send = |(key, payload, metric, ts): &Prepared| {
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "plantlink-device",
                value: Some(key.as_str()),
            })
            .insert(Header {
                key: "plantlink-metric",
                value: Some(metric.as_str()),
            })
            .insert(Header {
                key: "plantlink-ts-us",
                value: Some(ts.as_str()),
            });
        let mut rec = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(payload.as_slice())
            .headers(headers);
        loop {
            match p.send(rec) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("peer send: {e}"),
            }
        }
    };
    send(&records[0]);
    p.flush(Timeout::Never).unwrap();
    let start = Instant::now();
    for r in records {
        send(r);
    }
    p.flush(Timeout::Never).unwrap();
    let secs = start.elapsed().as_secs_f64();
    let ctx = p.context();
    assert_eq!(ctx.failed.load(Ordering::Relaxed), 0);
    assert_eq!(ctx.ok.load(Ordering::Relaxed), records.len() as u64 + 1);
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn kafka_sink_against_a_plain_rdkafka_producer() {
    let (_tansu, addr) = common::start_tansu(None);
    let brokers = addr.to_string();
    let mut readings =
        firmware_sim::refdata::generate(&firmware_sim::refdata::RefSpec::reference(1));
    readings.truncate(READINGS);
    let prepared: Vec<Prepared> = readings
        .iter()
        .map(|r| {
            (
                r.device.to_string(),
                kafka::record_json("acme", "gw-1", r),
                r.metric.to_string(),
                r.ts.0.to_string(),
            )
        })
        .collect();
    let bytes: usize = prepared.iter().map(|p| p.1.len()).sum();
    println!(
        "{} readings, JSON payloads {:.1} B on average",
        readings.len(),
        bytes as f64 / readings.len() as f64
    );
    let (mut o, mut q) = (Vec::new(), Vec::new());
    for round in 0..3 {
        // The peer's topic: created as the sink creates its own.
        let topic = format!("bench.peer.{round}");
        Kafka::new(&sink_config(&brokers, &topic), BUDGET)
            .unwrap()
            .ensure_topics()
            .await
            .unwrap();
        let (b, t, recs) = (brokers.clone(), topic.clone(), prepared.clone());
        let s = tokio::task::spawn_blocking(move || peer(&b, &t, &recs))
            .await
            .unwrap();
        println!(
            "round {round}: plain producer {s:.2} s ({:.0}/s)",
            READINGS as f64 / s
        );
        q.push(s);
        let s = ours(&brokers, &format!("bench.ours.{round}"), &readings).await;
        println!(
            "round {round}: Plantlink sink {s:.2} s ({:.0}/s)",
            READINGS as f64 / s
        );
        o.push(s);
    }
    let (o, q) = (median(o), median(q));
    println!(
        "median: sink {:.0}/s, plain producer {:.0}/s, ratio {:.2} (goal >= 0.8)",
        READINGS as f64 / o,
        READINGS as f64 / q,
        q / o
    );
}
