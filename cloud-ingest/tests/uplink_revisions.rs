//! Uplink revisions are negotiated by ALPN. A gateway of the first release offers only
//! `plantlink/1`: the cloud settles on it, and its `Status` reports show in
//! `/v1/pipeline/lag` without bytes or the oldest reading's age. A gateway that offers
//! `plantlink/1.1` first gets 1.1, and its `QueueReport` shows both.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloud_ingest::config::Api;
use cloud_ingest::quic;
use cloud_ingest::server::Server;
use common::Dir;
use plantlink_wire::frame::{self, Frame, Hello, QueueReport, Status};
use serde_json::Value;

const TOKEN: &str = "acme-revisions-token";

/// Connects, says Hello as `gateway`, and returns the negotiated ALPN id and the first
/// stream, open, after Welcome.
async fn session(
    ep: &quinn::Endpoint,
    server: SocketAddr,
    gateway: &str,
) -> (Vec<u8>, quinn::Connection, quinn::SendStream) {
    let conn = ep.connect(server, "localhost").unwrap().await.unwrap();
    let protocol = conn
        .handshake_data()
        .unwrap()
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .unwrap()
        .protocol
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Frame::Hello(Hello {
        gateway_id: gateway.into(),
        agent: "test".into(),
        codec_version: 1,
    });
    quic::write_frame(&mut send, &hello).await.unwrap();
    match quic::read_frame(&mut recv, 1 << 16).await.unwrap() {
        Frame::Welcome(_) => {}
        other => panic!("not welcomed: {other:?}"),
    }
    // The cloud reads the first stream on; what it answers there is not looked at here.
    tokio::spawn(async move { while quic::read_frame(&mut recv, 1 << 16).await.is_ok() {} });
    (protocol, conn, send)
}

/// The gateway's queue as `/v1/pipeline/lag` shows it, once it has one with `readings`.
async fn reported(api: SocketAddr, gateway: &str, readings: u64) -> Value {
    let start = Instant::now();
    loop {
        let (_, lag) = common::http_json(api, "GET", "/v1/pipeline/lag", TOKEN, None);
        let q = &lag["gateways"][gateway]["queue"];
        if q["queued_readings"] == readings {
            return q.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no report of {readings} readings from {gateway}: {lag}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_revision_both_ends_know_is_the_sessions() {
    let d = Dir::new("revisions");
    common::fleet(&d.0, "gw-old");
    cloud_ingest::pki::gateway(&d.0, "gw-new", "acme", 365).unwrap();
    let db = format!("plantlink_test_revisions_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;
    let api: SocketAddr = format!("127.0.0.1:{}", common::free_tcp_port())
        .parse()
        .unwrap();
    let mut config = common::cloud_config(&d.0, url, 16, 8 << 20);
    config.api = Some(Api::new(
        api,
        [("acme".to_owned(), TOKEN.to_owned())].into(),
    ));
    let server = Server::bind(config).unwrap();
    let cloud_addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cloud = tokio::spawn(server.serve(stop_rx));
    common::api_up(api).await;
    let ca = d.0.join("ca.pem");
    let status = Status {
        queued_readings: 7,
        live_waiting: 2,
        backlog: true,
        in_flight: 1,
    };

    // The first release's agent.
    let old = common::client(&ca, Some((&d.0, "gw-old")));
    let (protocol, _old_conn, mut control) = session(&old, cloud_addr, "gw-old").await;
    assert_eq!(protocol, frame::ALPN);
    quic::write_frame(&mut control, &Frame::Status(status))
        .await
        .unwrap();
    let q = reported(api, "gw-old", 7).await;
    assert_eq!(
        (&q["live_waiting"], &q["backlog"], &q["in_flight"]),
        (&Value::from(2), &Value::Bool(true), &Value::from(1)),
        "{q}"
    );
    assert_eq!(
        (&q["queued_bytes"], &q["oldest_age_seconds"]),
        (&Value::Null, &Value::Null),
        "{q}"
    );

    // This build's agent offers both, the newest first.
    let new = common::client_offering(&ca, Some((&d.0, "gw-new")), &frame::ALPNS);
    let (protocol, _new_conn, mut control) = session(&new, cloud_addr, "gw-new").await;
    assert_eq!(protocol, frame::ALPN_1_1);
    let report = QueueReport {
        status: Status {
            queued_readings: 9,
            ..status
        },
        queued_bytes: 1_152,
        oldest_age_ms: Some(42_500),
    };
    quic::write_frame(&mut control, &Frame::QueueReport(report))
        .await
        .unwrap();
    let q = reported(api, "gw-new", 9).await;
    assert_eq!(
        (&q["queued_bytes"], q["oldest_age_seconds"].as_f64()),
        (&Value::from(1_152), Some(42.5)),
        "{q}"
    );
    // An empty queue has no oldest reading.
    let empty = QueueReport {
        status: Status {
            queued_readings: 0,
            live_waiting: 0,
            backlog: false,
            in_flight: 0,
        },
        queued_bytes: 0,
        oldest_age_ms: None,
    };
    quic::write_frame(&mut control, &Frame::QueueReport(empty))
        .await
        .unwrap();
    let q = reported(api, "gw-new", 0).await;
    assert_eq!(q["oldest_age_seconds"], Value::Null, "{q}");

    let _ = stop_tx.send(true);
    cloud.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
