//! Sparkplug B end to end: a real Sparkplug edge node (pysparkplug, driven by
//! `fixtures/sparkplug_node.py`) with two devices publishes on Mosquitto; the agent reads
//! it as a host application and ships to cloud-ingest and PostgreSQL, with alerting on.
//!
//! - Readings land under the BIRTH names, though DATA carries only aliases.
//! - After an agent restart (alias tables gone), alias-only DATA is dead-lettered
//!   `unknown_alias`, not guessed at; the agent asks the node for a rebirth (NCMD), the node
//!   answers, and the refused DATA is replayed with the names the births gave, as is what
//!   follows.
//! - The node dies (its will, NDEATH, published by the broker): `online` = 0 for the node
//!   and both devices, and an absence rule fires on it at once.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cloud_ingest::config::{Alerting, Api};
use cloud_ingest::server::Server;
use common::{Dir, http_json};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;

const TOKEN: &str = "acme-token-0123456789abcdef";

/// The Python edge node: its stdin, and its stdout lines as they come.
struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Node {
    fn start(port: u16) -> Self {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sparkplug_node.py"
        );
        let mut child = Command::new("python3")
            .args([script, "127.0.0.1", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut n = Self {
            child,
            stdin,
            lines,
        };
        n.expect("born", 20);
        n
    }

    /// Waits for the line `want` (other lines are passed over).
    fn expect(&mut self, want: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == want => return,
                Ok(l) if l.starts_with("error") => panic!("edge node: {l}"),
                Ok(_) => {}
                Err(_) => panic!(
                    "the edge node did not say {want:?} within {secs} s (is pysparkplug installed? tests/lib/services.sh installs it)"
                ),
            }
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.expect("ok", 10);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn count(pgc: &tokio_postgres::Client, sql: &str) -> i64 {
    pgc.query_one(sql, &[]).await.unwrap().get(0)
}

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

struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_agent(d: &std::path::Path, port: u16, client_id: &str, cloud: SocketAddr) -> Running {
    start_agent_for(d, port, client_id, cloud, "plant")
}

/// An agent reading the Sparkplug B `group` (`+`: every group).
fn start_agent_for(
    d: &std::path::Path,
    port: u16,
    client_id: &str,
    cloud: SocketAddr,
    group: &str,
) -> Running {
    let uplink = format!(
        "batch_max_readings = 200\nbatch_linger_ms = 20\n[mqtt.sparkplug]\ngroups = [\"{group}\"]"
    );
    let config = common::Agent {
        gateway: "gw-spb",
        mqtt: Some((port, client_id, "plant/{device}")),
        cloud: cloud.to_string(),
        store: "",
        uplink: &uplink,
    }
    .config(d);
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(edge_agent::agent::run_until(config, async move {
        let _ = rx.changed().await;
    }));
    Running { stop, task }
}

/// Publishes a JSON reading on `plant/<device>` and waits for it: the agent is subscribed
/// and shipping.
async fn warm(p: &AsyncClient, pgc: &tokio_postgres::Client, device: &str) {
    p.publish(
        format!("plant/{device}"),
        QoS::AtLeastOnce,
        false,
        r#"{"x": 1}"#,
    )
    .await
    .unwrap();
    until_count(
        pgc,
        &format!("SELECT count(*) FROM raw_metrics WHERE device_id = '{device}'"),
        1,
        30,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparkplug_node_lands_with_birth_names_rebirths_and_dies() {
    let d = Dir::new("sparkplug");
    common::fleet(&d.0, "gw-spb");
    let db = format!("plantlink_test_sparkplug_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let mut config = common::cloud_config(&d.0, url.clone(), 16, 8 << 20);
    config.api = Some(Api::new(
        api,
        [("acme".to_owned(), TOKEN.to_owned())].into(),
    ));
    config.alerting = Alerting {
        tick_ms: 100,
        rules_reload_ms: 200,
        ..Alerting::default()
    };
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (cloud_stop, cloud_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(cloud_rx));
    common::api_up(api).await;
    // An hour of silence, or the press's death certificate.
    let rule = json!({"name": "press gone", "kind": "absence", "selector": {"device_id": "plant/line1/press"},
                      "seconds": 3600, "severity": "critical"});
    let (st, body) = http_json(api, "POST", "/v1/alert-rules", TOKEN, Some(&rule));
    assert_eq!(st, 201, "{body}");

    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("sparkplug-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    let agent = start_agent(&d.0, broker.port, &client_id, cloud_addr);
    let (p, mut pel) = AsyncClient::new(
        MqttOptions::new(
            format!("spb-pub-{}", std::process::id()),
            "127.0.0.1",
            broker.port,
        ),
        100,
    );
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    warm(&p, &pgc, "warm-1").await;

    // Born, then alias-only DATA: stored under the BIRTH names, with their datatypes.
    let mut node = Node::start(broker.port);
    let press = "SELECT count(*) FROM raw_metrics WHERE device_id = 'plant/line1/press' AND metric_name = 'temperature'";
    until_count(&pgc, press, 1, 30).await; // the DBIRTH's value
    node.send("data 21.5");
    until_count(&pgc, press, 2, 30).await;
    let got = |device: &'static str, metric: &'static str| {
        let pgc = &pgc;
        async move {
            pgc.query(
                "SELECT value FROM raw_metrics WHERE device_id = $1 AND metric_name = $2 ORDER BY ts",
                &[&device, &metric],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, f64>(0))
            .collect::<Vec<f64>>()
        }
    };
    assert_eq!(got("plant/line1/press", "temperature").await, [20.0, 21.5]);
    assert_eq!(got("plant/line1/press", "offset").await, [-5.0, -7.0]);
    assert_eq!(got("plant/line1/press", "pressure").await, [1.5, 2.5]);
    until_count(&pgc, "SELECT count(*) FROM raw_metrics WHERE device_id = 'plant/line1/oven' AND metric_name = 'temperature'", 2, 30).await;
    assert_eq!(got("plant/line1/oven", "temperature").await, [180.0, 121.5]);
    until_count(&pgc, "SELECT count(*) FROM raw_metrics WHERE device_id = 'plant/line1' AND metric_name = 'uptime'", 2, 30).await;
    assert_eq!(
        count(
            &pgc,
            "SELECT count(*) FROM raw_metrics WHERE metric_name = 'state'"
        )
        .await,
        0,
        "strings are skipped"
    );
    assert_eq!(got("plant/line1/press", "online").await, [1.0]);

    // The agent restarts: the node's aliases are unknown until it is born again.
    agent.stop.send(true).unwrap();
    agent.task.await.unwrap().unwrap();
    let agent = start_agent(&d.0, broker.port, &client_id, cloud_addr);
    warm(&p, &pgc, "warm-2").await;
    writeln!(node.stdin, "data 30").unwrap();
    node.stdin.flush().unwrap();
    node.expect("rebirth", 30);
    // The rebirth's DBIRTH: online again (its metrics keep their sample times, so they are
    // duplicates of what is stored).
    until_count(&pgc, "SELECT count(*) FROM raw_metrics WHERE device_id = 'plant/line1/press' AND metric_name = 'online'", 2, 30).await;
    node.send("data 31");
    // The rebirth request says data 30 was refused (dead-lettered `unknown_alias`), not
    // guessed at; once the births named its aliases it was replayed: decoded, and no
    // longer a dead letter.
    until_count(&pgc, press, 4, 30).await;
    assert_eq!(
        got("plant/line1/press", "temperature").await,
        [20.0, 21.5, 30.0, 31.0]
    );
    assert_eq!(
        got("plant/line1/oven", "temperature").await,
        [180.0, 121.5, 130.0, 131.0]
    );
    let start = Instant::now();
    loop {
        let conn = edge_agent::store::open_read_only(&d.0.join("queue.db")).unwrap();
        let letters = edge_agent::store::dead_letters(&conn, 100).unwrap();
        if !letters.iter().any(|l| l.origin.starts_with("spBv1.0/")) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{letters:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The node dies: the broker publishes its will. Offline readings, and the absence rule
    // fires at once rather than after its hour.
    drop(node);
    until_count(&pgc, "SELECT count(*) FROM raw_metrics WHERE metric_name = 'online' AND value = 0 AND tags->>'event' = 'death'", 3, 30).await;
    let start = Instant::now();
    loop {
        let firing = count(&pgc, "SELECT count(*) FROM alerts WHERE device_id = 'plant/line1/press' AND state = 'firing'").await;
        if firing == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the absence rule did not fire on the death"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "absence alert {:?} after the death reached PostgreSQL",
        start.elapsed()
    );

    agent.stop.send(true).unwrap();
    agent.task.await.unwrap().unwrap();
    cloud_stop.send(true).unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// firmware-sim's Sparkplug B nodes through the whole path, with the agent restarted
/// mid-run: every node is asked for a rebirth and answers, the DATA refused meanwhile is
/// replayed, and `verify` finds every reading the ledger holds exactly once: births, alias-only
/// data, d2's DDEATH and DBIRTH, and the silent node's NDEATH (node and devices offline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_sim_nodes_rebirth_on_request_and_verify() {
    use firmware_sim::fleet::parse_mix;
    use firmware_sim::run::{Options, run};
    let d = Dir::new("spbsim");
    common::fleet(&d.0, "gw-spb");
    let db = format!("plantlink_test_spbsim_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let server = Server::bind(common::cloud_config(&d.0, url.clone(), 16, 8 << 20)).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (cloud_stop, cloud_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(cloud_rx));
    let broker = common::Mosquitto::start(&d.0);
    let client_id = format!("spbsim-{}", std::process::id());
    common::create_session(broker.port, &client_id).await;
    let agent = start_agent_for(&d.0, broker.port, &client_id, cloud_addr, "+");
    let (p, mut pel) = AsyncClient::new(
        MqttOptions::new(
            format!("spbsim-pub-{}", std::process::id()),
            "127.0.0.1",
            broker.port,
        ),
        100,
    );
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    warm(&p, &pgc, "warm-s1").await;

    let name = format!("spbsim{}", std::process::id());
    let ledger = d.0.join("ledger.db");
    let sim = tokio::spawn(run(Options {
        mqtt: Some(format!("mqtt://127.0.0.1:{}", broker.port)),
        coap: None,
        coap_con: true,
        devices: 6,
        mix: parse_mix("spb-node=1").unwrap(),
        rate: 5.0,
        duration: 8.0,
        seed: 5,
        qos: 1,
        prefix: "plant".into(),
        run: name.clone(),
        ledger: Some(ledger.clone()),
        duplicate_rate: 0.0,
        malformed_rate: 0.0,
        out_of_order_rate: 0.0,
        oversize_rate: 0.0,
        skewed_devices: 0.0,
        silent_devices: 1,
        hot_devices: 0,
        hot_cycle: 0.0,
        flood_devices: 0,
        reference: false,
        progress: false,
    }));
    // Data is flowing: every node's devices are born and stored.
    let born = format!(
        "SELECT count(DISTINCT device_id) FROM raw_metrics WHERE device_id LIKE '{name}-spb/%/d_' AND metric_name = 'cycles'"
    );
    until_count(&pgc, &born, 12, 30).await;
    // The agent restarts: its alias tables are gone.
    agent.stop.send(true).unwrap();
    agent.task.await.unwrap().unwrap();
    let agent = start_agent_for(&d.0, broker.port, &client_id, cloud_addr, "+");
    let report = sim.await.unwrap().unwrap();
    assert_eq!(report.acked, report.sent, "{report:?}");
    assert!(report.sparkplug_rebirths >= 1, "{report:?}");

    // Everything the broker acknowledged lands once; the refused DATA was replayed.
    let start = Instant::now();
    let v = loop {
        let v = firmware_sim::verify::verify(&ledger, Some(&name), &url, None, None)
            .await
            .unwrap();
        if v.found == v.expected || start.elapsed() > Duration::from_secs(60) {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        v.expected > 500 && v.found == v.expected && v.ok(true) && v.unexpected == 0,
        "{v:?}"
    );
    eprintln!(
        "{} readings of 6 Sparkplug nodes verified; {} rebirths",
        v.expected, report.sparkplug_rebirths
    );
    // The deaths: d2 of each node that lived on (DDEATH, device time), and the silent node
    // with its two devices (NDEATH, receive time).
    let deaths = |sql: &str| {
        format!(
            "SELECT count(*) FROM raw_metrics WHERE device_id LIKE '{name}-spb/%' AND metric_name = 'online'
             AND value = 0 AND tags->>'event' = 'death' AND {sql}"
        )
    };
    assert_eq!(count(&pgc, &deaths("device_id LIKE '%/d2'")).await, 6);
    assert_eq!(count(&pgc, &deaths("device_id NOT LIKE '%/d_'")).await, 1);
    let conn = edge_agent::store::open_read_only(&d.0.join("queue.db")).unwrap();
    let letters = edge_agent::store::dead_letters(&conn, 100).unwrap();
    assert!(letters.is_empty(), "{letters:?}");

    agent.stop.send(true).unwrap();
    agent.task.await.unwrap().unwrap();
    cloud_stop.send(true).unwrap();
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}
