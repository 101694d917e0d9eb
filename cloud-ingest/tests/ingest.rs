//! `cloud-ingest run` on loopback with a real PostgreSQL: batches are acknowledged only after
//! they are stored, replays add nothing, and a bad batch gets an error without disturbing the
//! batches after it.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use cloud_ingest::quic;
use cloud_ingest::server::Server;
use common::{Dir, client, connect};
use plantlink_model::{Reading, Timestamp};
use plantlink_wire::BatchEncoder;
use plantlink_wire::frame::{Batch, ErrorCode, Frame, Lane};

fn batch(seq: u64, readings: &[Reading]) -> Frame {
    Frame::Batch(Batch {
        seq,
        lane: Lane::Live,
        readings: readings.len() as u32,
        payload: BatchEncoder::default().encode(readings),
    })
}

#[tokio::test]
async fn batches_are_stored_once_and_acked_after_commit() {
    let d = Dir::new("ingest");
    common::fleet(&d.0, "gw-1");
    let db = format!("plantlink_test_ingest_{}", std::process::id());
    let (admin, url, pgc) = common::database(&db).await;

    let config = common::cloud_config(&d.0, url, 8, 1 << 20);
    let server = Server::bind(config).unwrap();
    let addr = server.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(server.serve(stop_rx));

    let ep = client(&d.0.join("ca.pem"), Some((&d.0, "gw-1")));
    let conn = connect(&ep, addr, "gw-1").await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // An hour ago, inside the cloud's event-time window.
    let base_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        * 1_000_000
        - 3_600_000_000;
    // The batch claims another tenant: the certificate's tenant wins.
    let readings: Vec<Reading> = (0..2000)
        .map(|i| {
            Reading::new(
                "evil",
                format!("dev-{}", i % 20),
                "temperature",
                Timestamp(base_us + i * 1000),
                i as f64 / 10.0,
            )
        })
        .collect();
    let count = || async {
        pgc.query_one("SELECT count(*) FROM raw_metrics", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    quic::write_frame(&mut send, &batch(1, &readings))
        .await
        .unwrap();
    let ack = quic::read_frame(&mut recv, 1 << 16).await.unwrap();
    assert_eq!(ack, Frame::Ack(plantlink_wire::frame::Ack { seq: 1 }));
    // Acked means committed: the rows are there the moment the ack arrives.
    assert_eq!(count().await, 2000);

    // A replay (lost ack) and a garbage batch, then a good one: the garbage is refused with
    // its sequence number and the batches around it are unaffected.
    quic::write_frame(&mut send, &batch(2, &readings))
        .await
        .unwrap();
    assert_eq!(
        quic::read_frame(&mut recv, 1 << 16).await.unwrap(),
        Frame::Ack(plantlink_wire::frame::Ack { seq: 2 })
    );
    let garbage = Frame::Batch(Batch {
        seq: 3,
        lane: Lane::Backlog,
        readings: 5,
        payload: vec![1, 2, 3, 4, 5],
    });
    quic::write_frame(&mut send, &garbage).await.unwrap();
    match quic::read_frame(&mut recv, 1 << 16).await.unwrap() {
        Frame::Error(e) => assert_eq!(
            (e.code, e.seq),
            (ErrorCode::MALFORMED, Some(3)),
            "{}",
            e.reason
        ),
        other => panic!("{other:?}"),
    }
    let more: Vec<Reading> = (0..10)
        .map(|i| {
            Reading::new(
                "x",
                "dev-new",
                "pressure",
                Timestamp(base_us + 100_000_000 + i),
                1013.0,
            )
        })
        .collect();
    let mut lying = batch(4, &more);
    if let Frame::Batch(b) = &mut lying {
        b.readings = 11; // the header must match the payload
    }
    quic::write_frame(&mut send, &lying).await.unwrap();
    assert!(
        matches!(quic::read_frame(&mut recv, 1 << 16).await.unwrap(), Frame::Error(e) if e.seq == Some(4))
    );
    quic::write_frame(&mut send, &batch(5, &more))
        .await
        .unwrap();
    assert_eq!(
        quic::read_frame(&mut recv, 1 << 16).await.unwrap(),
        Frame::Ack(plantlink_wire::frame::Ack { seq: 5 })
    );

    assert_eq!(count().await, 2010);
    let tenants: i64 = pgc
        .query_one(
            "SELECT count(*) FROM raw_metrics WHERE tenant_id = 'acme' AND gateway_id = 'gw-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        tenants, 2010,
        "tenant and gateway come from the certificate"
    );

    conn.close(0u32.into(), b"done");
    let _ = stop_tx.send(true);
    serving.await.unwrap().unwrap();
    drop(pgc);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
