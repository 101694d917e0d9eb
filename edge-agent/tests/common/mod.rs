//! Helpers for tests that run the real agent against a real Mosquitto: free ports, private
//! brokers, temporary folders, and waiting for conditions instead of sleeping.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private temporary folder, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "plantlink-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private Mosquitto on a free port, tuned as the deploy docs advise, with persistence
/// so that it can be restarted without losing its sessions.
pub struct Broker {
    pub port: u16,
    proc: Proc,
    dir: TempDir,
}

impl Broker {
    pub fn start() -> Self {
        let dir = TempDir::new("mosquitto");
        let port = free_tcp_port();
        let conf = dir.path().join("mosquitto.conf");
        let text = [
            format!("listener {port} 127.0.0.1"),
            "allow_anonymous true".into(),
            "persistence true".into(),
            format!("persistence_location {}/", dir.path().display()),
            "autosave_interval 0".into(),
            // As root, Mosquitto would switch to its own user and fail to write here.
            "user root".into(),
            "max_inflight_messages 1000".into(),
            "max_queued_messages 1000000".into(),
            "log_dest stderr".into(),
            "log_type error".into(),
        ]
        .join("\n");
        std::fs::write(&conf, text + "\n").unwrap();
        let proc = Self::spawn(&conf, port);
        Self { port, proc, dir }
    }

    fn spawn(conf: &Path, port: u16) -> Proc {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (tests/run.sh installs it)");
        let proc = Proc(child);
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        proc
    }

    /// Stops the broker with SIGTERM (it saves its sessions and queues) and starts it again
    /// on the same port.
    pub fn restart(&mut self) {
        let pid = self.proc.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.proc.0.wait().unwrap();
        self.proc = Self::spawn(&self.dir.path().join("mosquitto.conf"), self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

fn mosquitto_bin() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

/// Runs the built agent with a config file.
pub fn start_agent(config: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("PLANTLINK_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start edge-agent"),
    )
}

/// Counts readings in a queue file (0 if it does not exist yet).
pub fn queued(db: &Path) -> u64 {
    if !db.exists() {
        return 0;
    }
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    edge_agent::store::stats(&conn)
        .map(|s| s.readings)
        .unwrap_or(0)
}

/// Every queued reading as (device, metric, ts, value, seq).
pub fn all_readings(db: &Path) -> Vec<(String, String, i64, f64, Option<i64>)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    edge_agent::store::queued_readings(&conn)
        .unwrap()
        .into_iter()
        .map(|r| (r.device, r.metric, r.ts, r.value, r.seq.map(|s| s as i64)))
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects as `client_id` with a persistent session and subscribes to `filters`, so the
/// broker keeps everything for the agent from now on, whether or not it is running.
pub fn create_session(port: u16, client_id: &str, filters: &[&str]) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    runtime().block_on(async {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(false);
        let (c, mut el) = AsyncClient::new(o, 10);
        for f in filters {
            c.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        }
        let mut acks = 0;
        while acks < filters.len() {
            if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
                acks += 1;
            }
        }
        c.disconnect().await.unwrap();
        while el.poll().await.is_ok() {}
    });
}

/// Publishes every (topic, payload) at QoS 1 and returns once the broker acknowledged all.
pub fn publish(port: u16, msgs: Vec<(String, Vec<u8>)>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    runtime().block_on(async move {
        let mut o = MqttOptions::new(
            format!("test-pub-{}", std::process::id()),
            "127.0.0.1",
            port,
        );
        o.set_inflight(500).set_max_packet_size(8 << 20, 8 << 20);
        let (c, mut el) = AsyncClient::new(o, 1000);
        let n = msgs.len();
        tokio::spawn(async move {
            for (t, p) in msgs {
                c.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
            }
        });
        let mut acked = 0;
        while acked < n {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                acked += 1;
            }
        }
    });
}
