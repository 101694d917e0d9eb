//! R2 at the agent: 100,000 QoS 1 messages through a real Mosquitto while the agent is
//! killed with SIGKILL at least three times at random points. Afterwards the queue holds
//! every published reading exactly once.
//!
//! `PLANTLINK_CRASH_MESSAGES` scales the run (default 100000); `PLANTLINK_SEED` replays one.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Broker, TempDir, queued, start_agent, wait_for};

const DEVICES: u64 = 100;
const KILLS: usize = 3;
const T0_MS: u64 = 1_767_225_600_000;

/// The test's messages: 9 in 10 are multi-metric JSON with ts and seq (two readings), the
/// rest bare numbers stamped by the agent on receipt, each with a value unique in the run.
fn messages(n: u64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let d = i % DEVICES;
            let k = i / DEVICES;
            if i % 10 == 9 {
                (
                    format!("plant/s1/l1/dev-{d}/flow"),
                    format!("{i}").into_bytes(),
                )
            } else {
                let body = format!(
                    r#"{{"ts": {}, "seq": {k}, "temperature": {}.5, "pressure": 1013.{}}}"#,
                    T0_MS + k * 10,
                    k % 90,
                    k % 10
                );
                (format!("plant/s1/l1/dev-{d}"), body.into_bytes())
            }
        })
        .collect()
}

/// Publishes in the background; the handle returns once the broker acknowledged all.
fn publish(port: u16, msgs: Vec<(String, Vec<u8>)>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || common::publish(port, msgs))
}

#[test]
fn every_reading_exactly_once_through_sigkills() {
    let n: u64 = std::env::var("PLANTLINK_CRASH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("PLANTLINK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("mqtt_crash: {n} messages, seed {seed} (PLANTLINK_SEED={seed} replays it)");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    let broker = Broker::start();
    let dir = TempDir::new("crash");
    let db = dir.path().join("queue.db");
    let cfg = dir.path().join("agent.toml");
    let client_id = format!("plantlink-crash-{}", std::process::id());
    std::fs::write(
        &cfg,
        format!(
            r#"
[gateway]
id = "gw-crash"
[store]
path = "{}"
[mqtt]
url = "{}"
client_id = "{client_id}"
subscriptions = ["plant/#"]
[[mqtt.topics]]
template = "plant/{{site}}/{{line}}/{{device}}/{{metric}}"
[[mqtt.topics]]
template = "plant/{{site}}/{{line}}/{{device}}"
[limits]
per_device_per_sec = 1e9
burst = 1e9
"#,
            db.display(),
            broker.url()
        ),
    )
    .unwrap();
    common::create_session(broker.port, &client_id, &["plant/#"]);

    let msgs = messages(n);
    let expected: u64 = msgs
        .iter()
        .map(|(t, _)| if t.ends_with("/flow") { 1 } else { 2 })
        .sum();
    let publisher = publish(broker.port, msgs);

    let mut agent = start_agent(&cfg);
    for i in 0..KILLS {
        // A random point within the i-th slice of the run.
        let slice = expected / (KILLS as u64 + 1);
        let at = slice * i as u64 + next() % slice.max(1) + 1;
        wait_for(
            &format!("{at} queued readings before kill {}", i + 1),
            Duration::from_secs(180),
            || queued(&db) >= at,
        );
        agent.0.kill().unwrap(); // SIGKILL
        agent.0.wait().unwrap();
        eprintln!(
            "killed the agent at {} queued readings (target {at})",
            queued(&db)
        );
        agent = start_agent(&cfg);
    }
    publisher.join().expect("publisher");
    wait_for("every reading queued", Duration::from_secs(300), || {
        queued(&db) >= expected
    });
    drop(agent);

    let rows = common::all_readings(&db);
    let mut seen: HashMap<(String, String, i64), u32> = HashMap::new();
    let mut flows: HashMap<u64, u32> = HashMap::new();
    for (device, metric, ts, value, seq) in &rows {
        if metric == "flow" {
            *flows.entry(*value as u64).or_default() += 1;
        } else {
            assert!(seq.is_some(), "{device} {metric} lost its seq");
            *seen
                .entry((device.clone(), metric.clone(), *ts))
                .or_default() += 1;
        }
    }
    let dup_multi = seen.values().filter(|&&c| c > 1).count();
    let dup_flow = flows.values().filter(|&&c| c > 1).count();
    if dup_multi + dup_flow > 0 {
        let ex: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
        let fx: Vec<_> = flows.iter().filter(|(_, c)| **c > 1).take(5).collect();
        panic!(
            "readings stored more than once: {dup_multi} timestamped, e.g. {ex:?}; {dup_flow} receive-stamped, e.g. {fx:?}"
        );
    }
    for i in 0..n {
        let d = i % DEVICES;
        if i % 10 == 9 {
            assert_eq!(flows.get(&i), Some(&1), "bare reading {i} missing");
        } else {
            let ts = ((T0_MS + (i / DEVICES) * 10) * 1000) as i64;
            for m in ["temperature", "pressure"] {
                assert_eq!(
                    seen.get(&(format!("dev-{d}"), m.to_owned(), ts)),
                    Some(&1),
                    "dev-{d} {m} {ts} missing"
                );
            }
        }
    }
    assert_eq!(rows.len() as u64, expected);
}

/// Diagnostic: publishes 20,000 numbered messages with this file's publisher to the broker
/// on `PLANTLINK_PROBE_PORT`, for an outside subscriber to count repeats.
#[test]
#[ignore]
fn publisher_probe() {
    let port: u16 = std::env::var("PLANTLINK_PROBE_PORT")
        .unwrap()
        .parse()
        .unwrap();
    let msgs = (0..20_000)
        .map(|i| ("x/y".to_string(), format!("{i}").into_bytes()))
        .collect();
    publish(port, msgs).join().unwrap();
}
