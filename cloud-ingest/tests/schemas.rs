//! The payload schema registry end to end, with real Mosquitto, agent, PostgreSQL, QUIC and
//! `protoc` (the .proto compiled and the messages encoded as a user's tooling does):
//!
//! - bad definitions are refused with a 400 naming the field;
//! - a protobuf schema registered through the API reaches a running gateway within 10 s;
//!   protobuf messages that were dead-lettered `no_schema` before stay dead letters, and
//!   those published after land in PostgreSQL as readings, exactly once;
//! - a schema the gateway cannot apply (put in the table behind the API's back, as a newer
//!   cloud might send one) is refused by the gateway with its reason, shown per gateway,
//!   while the other device types go on decoding;
//! - a gateway offline while a schema changes decodes with the set it stored, then picks
//!   up the new one when it reconnects.
//!
//! On both storage flavours (TimescaleDB on a private cluster, skipped loudly where its files
//! are not installed).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cloud_ingest::config::Api;
use cloud_ingest::server::Server;
use common::{Dir, http_json};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};

const TOKEN: &str = "acme-token-0123456789abcdef";

const PROTO: &str = r#"syntax = "proto3";
package plant.v1;
import "google/protobuf/timestamp.proto";
message Env { double pressure = 1; }
message Reading {
  string serial = 1;
  google.protobuf.Timestamp at = 2;
  double temp_c = 3;
  optional float rh = 4;
  Env env = 5;
  uint32 seq = 6;
}
"#;

/// Compiles [`PROTO`] with protoc: the descriptor set, base64.
fn descriptor_set(dir: &Path) -> String {
    std::fs::write(dir.join("reading.proto"), PROTO).unwrap();
    let out = Command::new("protoc")
        .current_dir(dir)
        .args([
            "--include_imports",
            "--descriptor_set_out=reading.pb",
            "reading.proto",
        ])
        .output()
        .expect("protoc (apt install protobuf-compiler; tests/lib/services.sh does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join("reading.pb")).unwrap())
}

/// One Reading, encoded by `protoc --encode` from text format.
fn encode(dir: &Path, text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("protoc")
        .current_dir(dir)
        .args(["--encode=plant.v1.Reading", "reading.proto"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn reading(dir: &Path, serial: &str, ms: i64, temp: f64, seq: u32) -> Vec<u8> {
    encode(
        dir,
        &format!(
            "serial: \"{serial}\" at {{ seconds: {} nanos: {} }} temp_c: {temp} rh: 40.5 env {{ pressure: 1013.25 }} seq: {seq}",
            ms / 1000,
            (ms % 1000) * 1_000_000
        ),
    )
}

fn schema(descriptor: &str, temp_metric: &str) -> Value {
    json!({
        "device_type": "th-300",
        "firmware_version": "3.x",
        "format": "protobuf",
        "definition": {
            "descriptor_set": descriptor,
            "message": "plant.v1.Reading",
            "metrics": {"temp_c": temp_metric, "rh": "humidity", "env.pressure": "pressure"},
            "timestamp": "at",
            "sequence": "seq",
            "device": "serial"
        }
    })
}

async fn count(pgc: &tokio_postgres::Client, sql: &str) -> i64 {
    pgc.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until `sql` counts `want`, for at most `secs`.
async fn until_count(pgc: &tokio_postgres::Client, sql: &str, want: i64, secs: u64) {
    let start = Instant::now();
    loop {
        let n = count(pgc, sql).await;
        if n == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{sql}: {n}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The gateway's row of `GET /v1/payload-schemas` once its version is `version`; how long
/// that took.
async fn until_gateway_has(api: SocketAddr, version: i64, secs: u64) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let (st, list) = http_json(api, "GET", "/v1/payload-schemas", TOKEN, None);
        assert_eq!(st, 200, "{list}");
        if let Some(g) = list["gateways"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["gateway_id"] == "gw-sc"))
            && g["version"] == version
        {
            return (g.clone(), start.elapsed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "the gateway did not report version {version}: {list}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

fn start_agent(d: &Path, port: u16, client_id: &str, cloud: String) -> Running {
    let config = common::Agent {
        gateway: "gw-sc",
        mqtt: Some((port, client_id, "plant/{device_type}/{firmware}/{device}")),
        cloud,
        store: "",
        uplink: "batch_max_readings = 200\nbatch_linger_ms = 20",
    }
    .config(d);
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = rx.changed().await;
    }));
    Running { stop, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_reach_gateways_and_decode_protobuf() {
    for b in common::timescale::Backend::all("schemas") {
        eprintln!("schemas on {}", b.name());
        schemas_on(&b).await;
    }
}

async fn schemas_on(b: &common::timescale::Backend) {
    let d = Dir::new("schemas");
    common::fleet(&d.0, "gw-sc");
    let descriptor = descriptor_set(&d.0);
    let db = format!("plantlink_test_schemas_{}", std::process::id());
    let (admin, url, pgc) = b.database(&db).await;
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let mut config = common::cloud_config(&d.0, url.clone(), 16, 8 << 20);
    config.postgres = b.config(&url);
    config.api = Some(Api::new(
        api,
        [("acme".to_owned(), TOKEN.to_owned())].into(),
    ));
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (cloud_stop, cloud_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(cloud_rx));
    common::api_up(api).await;

    // Bad definitions: a 400 naming the field, nothing stored.
    let mut bad = schema(&descriptor, "temperature");
    bad["definition"]["message"] = json!("plant.v1.Nope");
    let (st, body) = http_json(api, "POST", "/v1/payload-schemas", TOKEN, Some(&bad));
    assert_eq!(st, 400, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(
        e.starts_with("field definition.message: ") && e.contains("plant.v1.Reading"),
        "{e}"
    );
    let mut bad = schema(&descriptor, "temperature");
    bad["definition"]["metrics"]["temp_f"] = json!("t");
    let (st, body) = http_json(api, "POST", "/v1/payload-schemas", TOKEN, Some(&bad));
    assert_eq!(st, 400);
    let e = body["error"].as_str().unwrap();
    assert!(
        e.starts_with("field definition.metrics.temp_f: ") && e.contains("temp_c"),
        "{e}"
    );
    let mut bad = schema(&descriptor, "temperature");
    bad["definition"]["descriptor_set"] = json!("bm90IGEgZGVzY3JpcHRvcg==");
    let (st, body) = http_json(api, "POST", "/v1/payload-schemas", TOKEN, Some(&bad));
    assert_eq!(st, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("field definition.descriptor_set: "),
        "{body}"
    );
    let (_, list) = http_json(api, "GET", "/v1/payload-schemas", TOKEN, None);
    assert_eq!(
        (
            list["version"].as_i64(),
            list["schemas"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );

    // The agent connects and reports that it has no set yet.
    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("schemas-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    let agent = start_agent(&d.0, broker.port, &client_id, cloud_addr.to_string());
    until_gateway_has(api, 0, 30).await;

    let mut o = MqttOptions::new(
        format!("schemas-pub-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    o.set_inflight(100);
    let (publisher, mut pel) = AsyncClient::new(o, 1000);
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let send = |topic: String, payload: Vec<u8>| {
        let p = publisher.clone();
        async move {
            p.publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap()
        }
    };

    // Before the schema: protobuf from th-300 is a `no_schema` dead letter; JSON from
    // another device type decodes as always.
    for i in 0..3 {
        send(
            "plant/th-300/3.1/th-a".into(),
            reading(&d.0, "th-a", now_ms - 10_000 + i, 20.0, i as u32),
        )
        .await;
    }
    send(
        "plant/th-100/1.0/json-1".into(),
        br#"{"temperature": 21.5}"#.to_vec(),
    )
    .await;
    until_count(
        &pgc,
        "SELECT count(*) FROM raw_metrics WHERE device_id = 'json-1'",
        1,
        30,
    )
    .await;
    assert_eq!(
        count(
            &pgc,
            "SELECT count(*) FROM raw_metrics WHERE device_id = 'th-a'"
        )
        .await,
        0
    );
    {
        let conn = edge_agent::store::open_read_only(&d.0.join("queue.db")).unwrap();
        let letters = edge_agent::store::dead_letters(&conn, 10).unwrap();
        let no_schema: Vec<_> = letters.iter().filter(|l| l.reason == "no_schema").collect();
        assert_eq!(no_schema.len(), 3, "{letters:?}");
        assert!(
            no_schema[0].detail.contains("th-300")
                && no_schema[0].detail.contains("/v1/payload-schemas"),
            "{}",
            no_schema[0].detail
        );
    }

    // Registered through the API: the running gateway has it within 10 s.
    let (st, created) = http_json(
        api,
        "POST",
        "/v1/payload-schemas",
        TOKEN,
        Some(&schema(&descriptor, "temperature")),
    );
    assert_eq!(st, 201, "{created}");
    let (id, v1) = (
        created["id"].as_i64().unwrap(),
        created["set_version"].as_i64().unwrap(),
    );
    assert_eq!((created["revision"].as_i64(), v1), (Some(1), 1));
    let (dup, _) = http_json(
        api,
        "POST",
        "/v1/payload-schemas",
        TOKEN,
        Some(&schema(&descriptor, "t")),
    );
    assert_eq!(dup, 409);
    let (g, took) = until_gateway_has(api, v1, 10).await;
    assert_eq!(g["refused"], json!([]), "{g}");
    assert_eq!(g["current"], true);
    eprintln!("schema set {v1} reached the gateway {took:?} after the POST");

    // Protobuf readings now land, exactly once, with the names, times and devices mapped.
    for i in 0..20 {
        let serial = format!("th-{}", i % 4);
        send(
            format!("plant/th-300/3.2/{serial}"),
            reading(&d.0, &serial, now_ms + i * 10, 20.0 + i as f64, i as u32),
        )
        .await;
    }
    until_count(&pgc, "SELECT count(*) FROM raw_metrics WHERE device_id LIKE 'th-_' AND metric_name = 'temperature'", 20, 30).await;
    until_count(
        &pgc,
        "SELECT count(*) FROM raw_metrics WHERE device_id LIKE 'th-_'",
        60,
        30,
    )
    .await;
    assert_eq!(
        count(&pgc, "SELECT count(DISTINCT (device_id, metric_name, ts)) FROM raw_metrics WHERE device_id LIKE 'th-_'").await,
        60
    );
    let row = pgc
        .query_one(
            "SELECT value, (extract(epoch FROM ts) * 1000)::bigint, seq FROM raw_metrics
             WHERE device_id = 'th-3' AND metric_name = 'temperature' ORDER BY ts DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, f64>(0),
            row.get::<_, i64>(1),
            row.get::<_, Option<i64>>(2)
        ),
        (39.0, now_ms + 190, Some(19))
    );
    assert_eq!(
        count(
            &pgc,
            "SELECT count(*) FROM raw_metrics WHERE metric_name = 'pressure' AND value = 1013.25"
        )
        .await,
        20
    );

    // The gateway reported its devices: type and firmware, and which schema reads them;
    // JSON's has none, and so has th-a, refused before the schema came and not read since.
    let devices_sql = format!(
        "SELECT count(*) FROM devices WHERE tenant_id = 'acme' AND device_type = 'th-300'
         AND payload_schema_id = {id} AND reported_by = 'gw-sc' AND firmware_version = '3.2'"
    );
    until_count(&pgc, &devices_sql, 4, 15).await;
    until_count(
        &pgc,
        "SELECT count(*) FROM devices WHERE tenant_id = 'acme' AND payload_schema_id IS NULL
         AND ((device_id, device_type, firmware_version) = ('json-1', 'th-100', '1.0')
           OR (device_id, device_type, firmware_version) = ('th-a', 'th-300', '3.1'))",
        2,
        15,
    )
    .await;
    let (_, list) = http_json(api, "GET", "/v1/payload-schemas", TOKEN, None);
    assert_eq!(list["schemas"][0]["device_count"], 4, "{list}");
    // Another tenant's gateway naming this schema id gets no link to it.
    let other = [plantlink_wire::frame::DeviceInfo {
        device: "th-0".into(),
        device_type: "th-300".into(),
        firmware_version: "3.2".into(),
        schema_id: Some(id),
    }];
    cloud_ingest::postgres::registry::devices(&pgc, "globex", "gw-g", &other)
        .await
        .unwrap();
    assert_eq!(
        count(
            &pgc,
            "SELECT count(*) FROM devices WHERE tenant_id = 'globex' AND payload_schema_id IS NULL"
        )
        .await,
        1
    );

    // The messages refused as `no_schema` before, replayed on demand (what `edge-agent
    // queue replay-dead-letters --reason no_schema` does) while the agent runs: they land
    // too, once, and are no longer dead letters.
    let queue = d.0.join("queue.db");
    assert_eq!(
        edge_agent::store::mark_for_replay(&queue, "no_schema").unwrap(),
        (3, 0)
    );
    until_count(
        &pgc,
        "SELECT count(*) FROM raw_metrics WHERE device_id = 'th-a'",
        9,
        30,
    )
    .await;
    let start = Instant::now();
    loop {
        let conn = edge_agent::store::open_read_only(&queue).unwrap();
        let letters = edge_agent::store::dead_letters(&conn, 100).unwrap();
        if !letters.iter().any(|l| l.reason == "no_schema") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{letters:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        edge_agent::store::mark_for_replay(&queue, "no_schema").unwrap(),
        (0, 0)
    );
    // Read at last, th-a is reported with the schema; the schema lists its five devices.
    until_count(
        &pgc,
        &format!(
            "SELECT count(*) FROM devices WHERE device_id = 'th-a' AND payload_schema_id = {id}"
        ),
        1,
        15,
    )
    .await;
    let (_, one) = http_json(
        api,
        "GET",
        &format!("/v1/payload-schemas/{id}"),
        TOKEN,
        None,
    );
    assert_eq!(
        one["devices"],
        json!(["th-0", "th-1", "th-2", "th-3", "th-a"]),
        "{one}"
    );

    // A schema the gateway cannot apply, put behind the API's back: refused by the gateway
    // with its reason, shown per gateway; th-300 and JSON go on decoding.
    pgc.batch_execute(
        "INSERT INTO payload_schemas (tenant_id, device_type, firmware_version, format, schema_definition)
         VALUES ('acme', 'vib-9', '1.x', 'protobuf', '{\"descriptor_set\": \"AAAA\", \"message\": \"x.Y\"}');
         UPDATE payload_schema_sets SET version = version + 1 WHERE tenant_id = 'acme';",
    )
    .await
    .unwrap();
    let (g, _) = until_gateway_has(api, v1 + 1, 10).await;
    let refused = g["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{g}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("definition.descriptor_set: "),
        "{g}"
    );
    // check-config says which set is in force, and what of it was refused.
    let toml = d.0.join("agent.toml");
    let text = edge_agent::check::summary(&toml, &edge_agent::config::Config::load(&toml).unwrap());
    assert!(
        text.contains(&format!(
            "registry set version {}: 2 schema(s), 1 refused",
            v1 + 1
        )) && text.contains("refused vib-9 1.x"),
        "{text}"
    );
    send(
        "plant/th-300/3.2/th-9".into(),
        reading(&d.0, "th-9", now_ms + 500, 50.0, 1),
    )
    .await;
    send(
        "plant/th-100/1.0/json-1".into(),
        br#"{"temperature": 22.5}"#.to_vec(),
    )
    .await;
    until_count(
        &pgc,
        "SELECT count(*) FROM raw_metrics WHERE device_id = 'th-9'",
        3,
        30,
    )
    .await;
    until_count(
        &pgc,
        "SELECT count(*) FROM raw_metrics WHERE device_id = 'json-1'",
        2,
        30,
    )
    .await;

    // Offline while the schema changes: the agent restarts with no way to the cloud and
    // decodes with the set it stored; reconnected, it takes the new one.
    agent.stop().await;
    let (st, changed) = http_json(
        api,
        "PUT",
        &format!("/v1/payload-schemas/{id}"),
        TOKEN,
        Some(&schema(&descriptor, "temperature_c")),
    );
    assert_eq!(st, 200, "{changed}");
    assert_eq!(changed["revision"].as_i64(), Some(2));
    let v3 = changed["set_version"].as_i64().unwrap();
    let dead = format!("127.0.0.1:{}", common::free_tcp_port());
    let offline = start_agent(&d.0, broker.port, &client_id, dead);
    for i in 0..5 {
        send(
            "plant/th-300/3.2/th-off".into(),
            reading(&d.0, "th-off", now_ms + 1_000 + i, 30.0, i as u32),
        )
        .await;
    }
    // Stored in the queue under the old names (the cloud is unreachable).
    let start = Instant::now();
    loop {
        let conn = edge_agent::store::open_read_only(&queue).unwrap();
        let n = edge_agent::store::queued_readings(&conn)
            .map(|q| {
                q.iter()
                    .filter(|r| r.device == "th-off" && r.metric == "temperature")
                    .count()
            })
            .unwrap_or(0);
        if n == 5 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "offline readings not queued: {n}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    offline.stop().await;
    let agent = start_agent(&d.0, broker.port, &client_id, cloud_addr.to_string());
    until_gateway_has(api, v3, 10).await;
    until_count(&pgc, "SELECT count(*) FROM raw_metrics WHERE device_id = 'th-off' AND metric_name = 'temperature'", 5, 30).await;
    send(
        "plant/th-300/3.2/th-new".into(),
        reading(&d.0, "th-new", now_ms + 2_000, 31.0, 1),
    )
    .await;
    until_count(&pgc, "SELECT count(*) FROM raw_metrics WHERE device_id = 'th-new' AND metric_name = 'temperature_c'", 1, 30).await;

    // Deleted: the set shrinks, and the gateway follows.
    let (st, _) = http_json(
        api,
        "DELETE",
        &format!("/v1/payload-schemas/{id}"),
        TOKEN,
        None,
    );
    assert_eq!(st, 204);
    let (st, _) = http_json(
        api,
        "GET",
        &format!("/v1/payload-schemas/{id}"),
        TOKEN,
        None,
    );
    assert_eq!(st, 404);
    until_gateway_has(api, v3 + 1, 10).await;
    agent.stop().await;
    cloud_stop.send(true).unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}
