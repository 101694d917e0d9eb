//! MQTT ingest against a real Mosquitto: payload shapes and firmware mappings end to end,
//! one flooding device limited without touching its neighbours, devices that share a name
//! told apart by a composed id, and a clean SIGTERM that leaves nothing unacknowledged at
//! the broker.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Broker, TempDir, all_readings, queued, start_agent, wait_for};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

fn config(dir: &TempDir, broker: &Broker, client_id: &str, limits: &str) -> std::path::PathBuf {
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[gateway]
id = "gw"
[store]
path = "{}"
[mqtt]
url = "{}"
client_id = "{client_id}"
subscriptions = ["plant/#", "fw/#"]
[[mqtt.topics]]
template = "plant/{{site}}/{{device}}/{{metric}}"
[[mqtt.topics]]
template = "plant/{{site}}/{{device}}"
[[mqtt.topics]]
template = "fw/{{device_type}}/{{firmware}}/{{device}}"
[limits]
{limits}
[[firmware]]
device_type = "th-100"
version = "1.x"
fields = {{ t = "temperature" }}
[[firmware]]
device_type = "th-100"
version = "2.x"
fields = {{ temp_c = "temperature" }}
"#,
            dir.path().join("queue.db").display(),
            broker.url()
        ),
    )
    .unwrap();
    cfg
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn create_session(port: u16, client_id: &str) {
    common::create_session(port, client_id, &["plant/#", "fw/#"]);
}

fn publish(port: u16, msgs: &[(&str, Vec<u8>)]) {
    common::publish(
        port,
        msgs.iter()
            .map(|(t, p)| (t.to_string(), p.clone()))
            .collect(),
    );
}

#[test]
fn shapes_mappings_and_a_flooding_device() {
    let broker = Broker::start();
    let dir = TempDir::new("ingest");
    let id = format!("ingest-{}", std::process::id());
    // 5 readings per second per device, bursts of 5: the flooder's 100 messages mostly drop.
    let cfg = config(&dir, &broker, &id, "per_device_per_sec = 5\nburst = 5");
    create_session(broker.port, &id);
    let _agent = start_agent(&cfg);

    let mut msgs: Vec<(&str, Vec<u8>)> = vec![
        ("plant/s1/press01/temperature", b"87.3".to_vec()),
        (
            "plant/s1/press02",
            br#"{"sensor_id": "press02", "measurement": "pressure", "value": 1013.2, "unit": "hPa", "ts": 1767225600}"#.to_vec(),
        ),
        ("plant/s1/th1", br#"{"ts": 1767225600500, "seq": 3, "temperature": 21.5, "humidity": 40.2}"#.to_vec()),
        ("fw/th-100/1.2/th-old", br#"{"t": 20.5}"#.to_vec()),
        ("fw/th-100/2.0/th-new", br#"{"temp_c": 22.5}"#.to_vec()),
        ("plant/s1/bad", b"{oops".to_vec()),
    ];
    let mut cbor = Vec::new();
    ciborium::ser::into_writer(&ciborium::Value::Float(5.25), &mut cbor).unwrap();
    msgs.push(("plant/s1/cb1/level", cbor));
    for i in 0..100 {
        msgs.push(("plant/s1/flooder/temperature", format!("{i}").into_bytes()));
    }
    publish(broker.port, &msgs);

    let db = dir.path().join("queue.db");
    // 7 good readings from the shapes, 5 from the flooder's burst.
    wait_for(
        "the readings and the flood's dead letter",
        Duration::from_secs(30),
        || {
            queued(&db) >= 12 && {
                let conn = rusqlite::Connection::open(&db).unwrap();
                let limited: i64 = conn
                    .query_row(
                        "SELECT coalesce(sum(rate_limited), 0) FROM devices",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                limited >= 90
            }
        },
    );
    let rows = all_readings(&db);
    let by = |d: &str, m: &str| {
        rows.iter()
            .filter(|r| r.0 == d && r.1 == m)
            .map(|r| r.3)
            .collect::<Vec<_>>()
    };
    assert_eq!(by("press01", "temperature"), vec![87.3]);
    assert_eq!(by("press02", "pressure"), vec![1013.2]);
    assert_eq!(by("th1", "temperature"), vec![21.5]);
    assert_eq!(by("th1", "humidity"), vec![40.2]);
    assert_eq!(by("th-old", "temperature"), vec![20.5]);
    assert_eq!(by("th-new", "temperature"), vec![22.5]);
    assert_eq!(by("cb1", "level"), vec![5.25]);
    // The flooder got its burst (and perhaps a token or two more); everyone else got all.
    let flood = by("flooder", "temperature").len();
    assert!((5..=10).contains(&flood), "flooder stored {flood}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (limited, others): (i64, i64) = conn
        .query_row(
            "SELECT sum(CASE WHEN name = 'flooder' THEN rate_limited END),
                    sum(CASE WHEN name <> 'flooder' THEN rate_limited END) FROM devices",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        limited as usize + flood,
        100,
        "every flooder reading is stored or counted"
    );
    assert_eq!(others, 0);
    let reason: String = conn
        .query_row("SELECT reason FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(reason, "malformed");
}

#[test]
fn sigterm_commits_and_acknowledges_everything() {
    let broker = Broker::start();
    let dir = TempDir::new("sigterm");
    let id = format!("sigterm-{}", std::process::id());
    let cfg = config(&dir, &broker, &id, "per_device_per_sec = 1e9\nburst = 1e9");
    create_session(broker.port, &id);
    let mut agent = start_agent(&cfg);
    let msgs: Vec<(&str, Vec<u8>)> = (0..2000)
        .map(|i| ("plant/s1/d1/temperature", format!("{i}").into_bytes()))
        .collect();
    publish(broker.port, &msgs);
    let db = dir.path().join("queue.db");
    wait_for("2000 readings", Duration::from_secs(60), || {
        queued(&db) == 2000
    });

    let pid = agent.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "SIGTERM exit: {status:?}");

    // Published after the agent left: it must be the very first thing the session gets,
    // because the broker redelivers unacknowledged messages before queued ones.
    publish(
        broker.port,
        &[("plant/s1/d1/temperature", b"sentinel".to_vec())],
    );
    let before_sentinel = rt().block_on(async {
        let mut o = MqttOptions::new(id.clone(), "127.0.0.1", broker.port);
        o.set_clean_session(false);
        let (_c, mut el) = AsyncClient::new(o, 10);
        let mut n = 0;
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                if &p.payload[..] == b"sentinel" {
                    break n;
                }
                n += 1;
            }
        }
    });
    assert_eq!(
        before_sentinel, 0,
        "messages left unacknowledged by the SIGTERM"
    );
    assert_eq!(queued(&db), 2000);
}

#[test]
fn survives_a_broker_restart_without_losing_what_it_held() {
    let mut broker = Broker::start();
    let dir = TempDir::new("restart");
    let id = format!("restart-{}", std::process::id());
    let cfg = config(&dir, &broker, &id, "per_device_per_sec = 1e9\nburst = 1e9");
    create_session(broker.port, &id);
    let db = dir.path().join("queue.db");
    let _agent = start_agent(&cfg);

    let batch = |from: u32| -> Vec<(&'static str, Vec<u8>)> {
        (from..from + 500)
            .map(|i| ("plant/s1/d1/temperature", format!("{i}").into_bytes()))
            .collect()
    };
    publish(broker.port, &batch(0));
    wait_for("the first 500", Duration::from_secs(30), || {
        queued(&db) == 500
    });

    // The broker goes away and comes back; messages published right after it returns are
    // held for the agent's session until the agent has reconnected by itself.
    broker.restart();
    publish(broker.port, &batch(500));
    wait_for(
        "all 1000 after the restart",
        Duration::from_secs(60),
        || queued(&db) >= 1000,
    );
    let mut values: Vec<u32> = all_readings(&db).iter().map(|r| r.3 as u32).collect();
    values.sort();
    assert_eq!(values, (0..1000).collect::<Vec<_>>());
}

#[test]
fn an_oversize_message_is_dead_lettered_without_stalling_and_retained_ones_skipped() {
    let broker = Broker::start();
    let dir = TempDir::new("oversize");
    let id = format!("oversize-{}", std::process::id());
    // Payloads over 1 MiB are refused; over 2 MiB the agent cannot even hold the packet.
    let cfg = config(
        &dir,
        &broker,
        &id,
        "per_device_per_sec = 1e9\nburst = 1e9\nmax_payload_bytes = 1048576",
    );
    // A retained value published before the agent subscribes: it arrives with RETAIN set.
    rt().block_on(async {
        let (c, mut el) =
            AsyncClient::new(MqttOptions::new("retainer", "127.0.0.1", broker.port), 10);
        c.publish(
            "plant/s1/old/temperature",
            rumqttc::QoS::AtLeastOnce,
            true,
            b"55.5".to_vec(),
        )
        .await
        .unwrap();
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                break;
            }
        }
    });
    let db = dir.path().join("queue.db");
    let _agent = start_agent(&cfg);
    // The agent subscribes on its own here (no pre-made session), so wait until it is in.
    wait_for("the agent's subscription", Duration::from_secs(30), || {
        publish(
            broker.port,
            &[("plant/s1/probe/temperature", b"0".to_vec())],
        );
        queued(&db) >= 1
    });
    let huge = vec![b'7'; 3 << 20];
    let big = vec![b'8'; 1_500_000];
    publish(
        broker.port,
        &[
            ("plant/s1/d1/temperature", b"1".to_vec()),
            ("plant/s1/d1/temperature", huge),
            ("plant/s1/d1/temperature", big),
            ("plant/s1/d1/temperature", b"2".to_vec()),
        ],
    );
    let start = std::time::Instant::now();
    while all_readings(&db).iter().filter(|r| r.0 == "d1").count() < 2 {
        if start.elapsed() > Duration::from_secs(30) {
            let conn = rusqlite::Connection::open(&db).unwrap();
            let dl: Vec<(String, String, i64)> = conn
                .prepare("SELECT reason, detail, size FROM dead_letters")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            panic!(
                "timed out: readings {:?}, dead letters {dl:?}",
                all_readings(&db)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let conn = rusqlite::Connection::open(&db).unwrap();
    let sizes: Vec<(String, i64)> = conn
        .prepare("SELECT reason, size FROM dead_letters ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert!(
        sizes.iter().all(|(reason, _)| reason == "oversize"),
        "{sizes:?}"
    );
    assert_eq!(sizes[1].1, 1_500_000);
    assert!(
        sizes[0].1 >= 3 << 20,
        "the skipped message's size is recorded: {sizes:?}"
    );
    // The retained value was acknowledged but not stored as a new reading.
    assert!(all_readings(&db).iter().all(|r| r.0 != "old"));
}

#[test]
fn records_of_confirmed_acks_are_forgotten() {
    let broker = Broker::start();
    let dir = TempDir::new("forget");
    let id = format!("forget-{}", std::process::id());
    let cfg = config(&dir, &broker, &id, "per_device_per_sec = 1e9\nburst = 1e9");
    create_session(broker.port, &id);
    let db = dir.path().join("queue.db");
    let _agent = start_agent(&cfg);
    let msgs: Vec<(&str, Vec<u8>)> = (0..1000)
        .map(|i| ("plant/s1/d1/temperature", format!("{i}").into_bytes()))
        .collect();
    publish(broker.port, &msgs);
    wait_for("1000 readings", Duration::from_secs(60), || {
        queued(&db) == 1000
    });
    // Every message left a record for recognising its redelivery. Once the broker answers a
    // PINGREQ sent after the PUBACKs, the writer forgets them in its next transaction.
    let records = || -> i64 {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row("SELECT count(*) FROM mqtt_msgs", [], |r| r.get(0))
            .unwrap()
    };
    let mut probe = 0;
    wait_for(
        "confirmed records to be forgotten",
        Duration::from_secs(30),
        || {
            probe += 1;
            publish(
                broker.port,
                &[(
                    "plant/s1/probe/temperature",
                    format!("{probe}").into_bytes(),
                )],
            );
            records() < 100
        },
    );
}

#[test]
fn devices_sharing_a_name_on_two_lines_stay_two_devices() {
    let broker = Broker::start();
    let dir = TempDir::new("lines");
    let id = format!("lines-{}", std::process::id());
    let db = dir.path().join("queue.db");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[gateway]
id = "gw"
[store]
path = "{}"
[mqtt]
url = "{}"
client_id = "{id}"
subscriptions = ["plant/#"]
[[mqtt.topics]]
template = "plant/{{site}}/{{line}}/{{device}}/{{metric}}"
device = "{{line}}-{{device}}"
[[mqtt.topics]]
template = "plant/{{site}}/{{line}}/{{device}}"
device = "{{line}}-{{device}}"
[limits]
per_device_per_sec = 1e9
burst = 1e9
"#,
            db.display(),
            broker.url()
        ),
    )
    .unwrap();
    common::create_session(broker.port, &id, &["plant/#"]);
    let _agent = start_agent(&cfg);

    // press01 on line l3 and press01 on line l4 stamp the same seconds with other values.
    let body = |ts: u64, v: f64| format!(r#"{{"ts": {ts}, "pressure": {v}}}"#).into_bytes();
    let mut msgs: Vec<(&str, Vec<u8>)> = Vec::new();
    for k in 0..3 {
        let ts = 1_767_225_600 + k;
        msgs.push(("plant/p1/l3/press01", body(ts, 10.0 + k as f64)));
        msgs.push(("plant/p1/l4/press01", body(ts, 20.0 + k as f64)));
    }
    // On l3's own topic (so in order after its first reading): a replay, which is dropped,
    // then a conflict (same identity, another value), which is kept for the cloud to report.
    msgs.push(("plant/p1/l3/press01", body(1_767_225_600, 10.0)));
    msgs.push(("plant/p1/l3/press01", body(1_767_225_600, 99.0)));
    publish(broker.port, &msgs);

    wait_for("the conflicting reading", Duration::from_secs(30), || {
        queued(&db) >= 7 && all_readings(&db).iter().any(|r| r.3 == 99.0)
    });
    let rows = all_readings(&db);
    let of = |d: &str| -> Vec<(i64, f64)> {
        rows.iter()
            .filter(|r| r.0 == d)
            .map(|r| {
                assert_eq!(r.1, "pressure");
                (r.2, r.3)
            })
            .collect()
    };
    let s = |k: i64| (1_767_225_600 + k) * 1_000_000;
    assert_eq!(
        of("l3-press01"),
        vec![(s(0), 10.0), (s(1), 11.0), (s(2), 12.0), (s(0), 99.0)]
    );
    assert_eq!(
        of("l4-press01"),
        vec![(s(0), 20.0), (s(1), 21.0), (s(2), 22.0)]
    );
    assert_eq!(rows.len(), 7, "no reading under the bare name: {rows:?}");

    // `queue stats --json` shows them as two devices.
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["queue", "stats", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["readings"], 7);
    assert_eq!(v["devices"], 2);
    let mut per: Vec<(String, u64)> = v["per_device"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_owned(),
                d["readings"].as_u64().unwrap(),
            )
        })
        .collect();
    per.sort();
    assert_eq!(
        per,
        vec![("l3-press01".into(), 4), ("l4-press01".into(), 3)]
    );
}
