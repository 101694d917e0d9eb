//! Revocation and connection ownership against the real `cloud-ingest run` binary and a real
//! PostgreSQL: a certificate revoked by serial with `cloud-ingest pki revoke` is refused
//! after SIGHUP and its open connection is closed, while the same gateway id with a new
//! certificate connects and is acked; a list that does not parse leaves the previous one in
//! force; a second connection of a gateway replaces the first.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloud_ingest::quic;
use common::{Dir, Proc, attempt, client, connect};
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Ack, Batch, Frame, Lane};

const BIN: &str = env!("CARGO_BIN_EXE_cloud-ingest");

/// A running `cloud-ingest run` with its revocation list in `dir/revoked.txt` (reloaded on
/// SIGHUP, and every `poll` seconds if it changed), its QUIC and metrics addresses.
struct Cloud {
    proc: Proc,
    quic: SocketAddr,
    metrics: SocketAddr,
}

impl Cloud {
    async fn start(dir: &Path, url: &str, poll: u64) -> Self {
        let port = common::free_tcp_port();
        let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
            .parse()
            .unwrap();
        let cfg = dir.join("cloud.toml");
        std::fs::write(
            &cfg,
            format!(
                "[quic]\nbind = \"127.0.0.1:{port}\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
                 client_ca = \"ca.pem\"\nrevocation_file = \"revoked.txt\"\nrevocation_poll_secs = {poll}\n\
                 [postgres]\nurl = \"{url}\"\n[metrics]\nbind = \"{metrics}\"\n"
            ),
        )
        .unwrap();
        let proc = Proc(
            Command::new(BIN)
                .args(["run", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let cloud = Self {
            proc,
            quic: format!("127.0.0.1:{port}").parse().unwrap(),
            metrics,
        };
        // The revocation gauge is set just before the accept loop starts.
        cloud
            .wait_metric("plantlink_cloud_revocation_entries", |_| true)
            .await;
        cloud
    }

    fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.proc.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP");
    }

    /// Waits (at most 20 s) until the series has a value that `ok` accepts.
    async fn wait_metric(&self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let start = Instant::now();
        loop {
            if let Some(v) = common::scrape(self.metrics).and_then(|t| value(&t, series))
                && ok(v)
            {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {series}; /metrics:\n{}",
                common::scrape(self.metrics).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The value of a series (`name` or `name{labels}`) in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}

/// Sends one batch of `n` readings of `device` on a new stream and returns the answer.
async fn send_batch(conn: &quinn::Connection, seq: u64, device: &str, n: i64) -> Frame {
    let base_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - 60_000_000;
    let readings: Vec<Reading> = (0..n)
        .map(|i| {
            Reading::new(
                "acme",
                device,
                "temperature",
                Timestamp(base_us + i),
                i as f64,
            )
        })
        .collect();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let batch = Frame::Batch(Batch {
        seq,
        lane: Lane::Live,
        readings: readings.len() as u32,
        payload: BatchEncoder::default().encode(&readings),
    });
    quic::write_frame(&mut send, &batch).await.unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        quic::read_frame(&mut recv, 1 << 16),
    )
    .await
    .expect("no answer to the batch within 20 s")
    .unwrap();
    let _ = send.finish();
    answer
}

/// Waits (at most 10 s) for the cloud to close `conn`; returns the code and reason.
async fn closed_by_cloud(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the cloud did not close the connection within 10 s")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("closed otherwise: {other}"),
    }
}

fn run_cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn drop_db(admin: &tokio_postgres::Client, db: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_revoked_serial_is_refused_after_sighup_and_the_gateway_id_reissued_connects() {
    let d = Dir::new("revoke-serial");
    common::fleet(&d.0, "gw-stolen");
    std::fs::write(d.0.join("revoked.txt"), "# revoked certificates\n").unwrap();
    let db = format!("plantlink_test_revoke_serial_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let cloud = Cloud::start(&d.0, &url, 0).await;
    let ca = d.0.join("ca.pem");

    // The (soon stolen) certificate connects and is acked.
    let old_ep = client(&ca, Some((&d.0, "gw-stolen")));
    let old = connect(&old_ep, cloud.quic, "gw-stolen").await;
    assert_eq!(
        send_batch(&old, 1, "pump-old", 5).await,
        Frame::Ack(Ack { seq: 1 })
    );

    // Revoke its serial with the CLI.
    let cert = d.0.join("gw-stolen.pem");
    let der = cloud_ingest::pki::read_certificate(&cert).unwrap();
    let id = cloud_ingest::pki::identity(&der).unwrap();
    let out = run_cli(&[
        "pki",
        "revoke",
        "--dir",
        d.0.to_str().unwrap(),
        "--serial",
        &id.serial.to_uppercase(),
    ]);
    assert!(
        out.contains(&format!("serial:{}", id.serial)) && out.contains("SIGHUP"),
        "{out}"
    );
    // Nothing changes until SIGHUP (polling is off in this config).
    assert_eq!(
        send_batch(&old, 2, "pump-old", 5).await,
        Frame::Ack(Ack { seq: 2 })
    );

    // SIGHUP: the open connection is closed with the revocation code and reason.
    cloud.hangup();
    let (code, reason) = closed_by_cloud(&old).await;
    assert_eq!(code, u64::from(quic::CLOSE_REVOKED), "{reason}");
    assert!(reason.contains("revoked (by serial)"), "{reason}");
    cloud
        .wait_metric("plantlink_cloud_connections_revoked_total", |v| v == 1.0)
        .await;
    // And the certificate cannot connect again.
    let again = attempt(&old_ep, cloud.quic, "gw-stolen").await;
    assert!(!matches!(again, Ok(Frame::Welcome(_))), "{again:?}");
    cloud
        .wait_metric(
            "plantlink_cloud_handshakes_revoked_total{by=\"serial\"}",
            |v| v >= 1.0,
        )
        .await;

    // The same gateway id, reissued: the old files moved aside, a new certificate issued.
    std::fs::rename(&cert, d.0.join("gw-stolen.pem.revoked")).unwrap();
    std::fs::rename(d.0.join("gw-stolen.key"), d.0.join("gw-stolen.key.revoked")).unwrap();
    run_cli(&[
        "pki",
        "gateway",
        "--dir",
        d.0.to_str().unwrap(),
        "--gateway-id",
        "gw-stolen",
        "--tenant",
        "acme",
    ]);
    let new_ep = client(&ca, Some((&d.0, "gw-stolen")));
    let new = connect(&new_ep, cloud.quic, "gw-stolen").await;
    assert_eq!(
        send_batch(&new, 3, "pump-new", 7).await,
        Frame::Ack(Ack { seq: 3 })
    );
    let stored: i64 = pgc
        .query_one(
            "SELECT count(*) FROM raw_metrics WHERE gateway_id = 'gw-stolen' AND device_id = 'pump-new'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 7);

    // A list that does not parse is not put in force: the error is counted, the stolen
    // certificate stays refused and the new one stays connected.
    let mut text = std::fs::read_to_string(d.0.join("revoked.txt")).unwrap();
    text.push_str("serial:not-hex\n");
    std::fs::write(d.0.join("revoked.txt"), text).unwrap();
    cloud.hangup();
    cloud
        .wait_metric(
            "plantlink_cloud_revocation_reloads_total{result=\"error\"}",
            |v| v == 1.0,
        )
        .await;
    let again = attempt(&old_ep, cloud.quic, "gw-stolen").await;
    assert!(!matches!(again, Ok(Frame::Welcome(_))), "{again:?}");
    assert_eq!(
        send_batch(&new, 4, "pump-new", 1).await,
        Frame::Ack(Ack { seq: 4 })
    );
    assert!(new.close_reason().is_none(), "{:?}", new.close_reason());

    new.close(0u32.into(), b"done");
    drop(cloud);
    drop(pgc);
    drop_db(&admin, &db).await;
}

#[tokio::test]
async fn a_second_connection_of_a_gateway_replaces_the_first() {
    let d = Dir::new("revoke-replace");
    common::fleet(&d.0, "gw-twice");
    std::fs::write(d.0.join("revoked.txt"), "").unwrap();
    let db = format!("plantlink_test_revoke_replace_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let cloud = Cloud::start(&d.0, &url, 0).await;
    let ca = d.0.join("ca.pem");

    let first_ep = client(&ca, Some((&d.0, "gw-twice")));
    let first = connect(&first_ep, cloud.quic, "gw-twice").await;
    assert_eq!(
        send_batch(&first, 1, "pump", 3).await,
        Frame::Ack(Ack { seq: 1 })
    );
    let second_ep = client(&ca, Some((&d.0, "gw-twice")));
    let second = connect(&second_ep, cloud.quic, "gw-twice").await;

    let (code, reason) = closed_by_cloud(&first).await;
    assert_eq!(code, u64::from(quic::CLOSE_REPLACED), "{reason}");
    assert_eq!(reason, quic::REPLACED_REASON);
    cloud
        .wait_metric("plantlink_cloud_connections_replaced_total", |v| v == 1.0)
        .await;
    // The newer connection carries on.
    assert_eq!(
        send_batch(&second, 2, "pump", 3).await,
        Frame::Ack(Ack { seq: 2 })
    );
    assert!(second.close_reason().is_none());
    cloud
        .wait_metric("plantlink_cloud_connections", |v| v == 1.0)
        .await;

    // The same gateway id in another tenant is another gateway: it replaces nothing.
    let beta_dir = d.0.join("beta");
    std::fs::create_dir_all(&beta_dir).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(d.0.join(f), beta_dir.join(f)).unwrap();
    }
    cloud_ingest::pki::gateway(&beta_dir, "gw-twice", "beta", 365).unwrap();
    let beta_ep = client(&ca, Some((&beta_dir, "gw-twice")));
    let beta = connect(&beta_ep, cloud.quic, "gw-twice").await;
    assert_eq!(
        send_batch(&beta, 1, "pump", 3).await,
        Frame::Ack(Ack { seq: 1 })
    );
    cloud
        .wait_metric("plantlink_cloud_connections", |v| v == 2.0)
        .await;
    assert_eq!(
        send_batch(&second, 3, "pump", 3).await,
        Frame::Ack(Ack { seq: 3 })
    );
    assert!(second.close_reason().is_none(), "acme's gw-twice stays up");
    beta.close(0u32.into(), b"done");

    second.close(0u32.into(), b"done");
    drop(cloud);
    drop(pgc);
    drop_db(&admin, &db).await;
}

#[tokio::test]
async fn a_changed_list_is_picked_up_without_sighup() {
    let d = Dir::new("revoke-poll");
    common::fleet(&d.0, "gw-polled");
    std::fs::write(d.0.join("revoked.txt"), "").unwrap();
    let db = format!("plantlink_test_revoke_poll_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let cloud = Cloud::start(&d.0, &url, 1).await;
    let ep = client(&d.0.join("ca.pem"), Some((&d.0, "gw-polled")));
    let conn = connect(&ep, cloud.quic, "gw-polled").await;

    // Revoked by its certificate file: serial and fingerprint are both written.
    let cert = d.0.join("gw-polled.pem");
    let out = run_cli(&[
        "pki",
        "revoke",
        "--dir",
        d.0.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--note",
        "lost in transit",
    ]);
    let id =
        cloud_ingest::pki::identity(&cloud_ingest::pki::read_certificate(&cert).unwrap()).unwrap();
    let list = std::fs::read_to_string(d.0.join("revoked.txt")).unwrap();
    for entry in [
        format!("serial:{}", id.serial),
        format!("sha256:{}", id.fingerprint),
    ] {
        assert!(
            out.contains(&entry) && list.contains(&entry),
            "{out}\n{list}"
        );
    }
    assert!(
        list.contains("lost in transit") && list.contains("gateway gw-polled"),
        "{list}"
    );
    let (code, reason) = closed_by_cloud(&conn).await;
    assert_eq!(code, u64::from(quic::CLOSE_REVOKED), "{reason}");
    cloud
        .wait_metric("plantlink_cloud_revocation_entries", |v| v == 2.0)
        .await;
    // Revoking it again writes nothing.
    let out = run_cli(&[
        "pki",
        "revoke",
        "--dir",
        d.0.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
    ]);
    assert!(out.contains("nothing written"), "{out}");

    drop(cloud);
    drop(pgc);
    drop_db(&admin, &db).await;
}
