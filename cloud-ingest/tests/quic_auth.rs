//! R9 at the handshake: over QUIC on loopback, only gateways with a valid, unrevoked
//! certificate from the fleet CA are admitted, and they are known by their certificate.
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use cloud_ingest::pki::revocation::RevocationList;
use cloud_ingest::{pki, quic};
use common::{Dir, attempt, client};
use plantlink_wire::frame::Frame;
use time::{Duration, OffsetDateTime};

#[tokio::test]
async fn only_valid_unrevoked_fleet_gateways_are_admitted() {
    let d = Dir::new("pki");
    let other = Dir::new("other");
    pki::init(&d.0, 3650).unwrap();
    pki::init(&other.0, 3650).unwrap();
    pki::server(&d.0, &["localhost".into()], &[], 365).unwrap();
    pki::gateway(&d.0, "gw-good", "acme", 365).unwrap();
    pki::gateway(&d.0, "gw-revoked", "acme", 365).unwrap();
    let now = OffsetDateTime::now_utc();
    pki::gateway_between(
        &d.0,
        "gw-expired",
        "acme",
        now - Duration::days(10),
        now - Duration::days(1),
    )
    .unwrap();
    pki::gateway(&other.0, "gw-stranger", "acme", 365).unwrap();

    let config = quic::server_config(
        &d.0.join("server.pem"),
        &d.0.join("server.key"),
        &d.0.join("ca.pem"),
        &quic::Revocations::fixed(RevocationList::parse("gateway:gw-revoked\n").unwrap()),
    )
    .unwrap();
    let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr().unwrap();
    let (admitted_tx, mut admitted) = tokio::sync::mpsc::unbounded_channel();
    let accept = tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let tx = admitted_tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                if let Ok((id, mut send, _recv)) = quic::admit(&conn, 1 << 20, 8).await {
                    let _ = tx.send(id);
                    let _ = send.finish();
                    conn.closed().await;
                }
            });
        }
    });
    let ca = d.0.join("ca.pem");

    // The good gateway is welcomed, known by its certificate.
    match attempt(&client(&ca, Some((&d.0, "gw-good"))), addr, "gw-good").await {
        Ok(Frame::Welcome(w)) => assert_eq!(
            (w.gateway_id.as_str(), w.tenant.as_str()),
            ("gw-good", "acme")
        ),
        other => panic!("good gateway: {other:?}"),
    }
    let id = admitted.recv().await.unwrap();
    assert_eq!(
        (id.gateway.as_str(), id.tenant.as_str()),
        ("gw-good", "acme")
    );

    // A good certificate with a Hello claiming another gateway gets an Error frame naming the fix.
    match attempt(&client(&ca, Some((&d.0, "gw-good"))), addr, "gw-other").await {
        Ok(Frame::Error(e)) => assert!(e.reason.contains("[gateway] id"), "{}", e.reason),
        other => panic!("mismatched hello: {other:?}"),
    }

    // Everyone else is refused: no Welcome, and nobody admitted.
    let other_ca = other.0.join("ca.pem");
    let refused = [
        ("no certificate", client(&ca, None)),
        ("another CA", client(&ca, Some((&other.0, "gw-stranger")))),
        ("revoked", client(&ca, Some((&d.0, "gw-revoked")))),
        ("expired", client(&ca, Some((&d.0, "gw-expired")))),
    ];
    for (what, ep) in &refused {
        let claimed = match *what {
            "another CA" => "gw-stranger",
            "revoked" => "gw-revoked",
            "expired" => "gw-expired",
            _ => "gw-none",
        };
        let r = attempt(ep, addr, claimed).await;
        assert!(!matches!(r, Ok(Frame::Welcome(_))), "{what}: {r:?}");
    }
    // The agent side checks the cloud too: a server from another CA is refused by the client.
    let r = attempt(
        &client(&other_ca, Some((&other.0, "gw-stranger"))),
        addr,
        "gw-stranger",
    )
    .await;
    assert!(r.is_err(), "server from another CA: {r:?}");

    assert!(
        admitted.try_recv().is_err(),
        "a refused gateway was admitted"
    );
    accept.abort();
}
