//! R9 at the handshake: over QUIC on loopback, only gateways with a valid, unrevoked
//! certificate from the fleet CA are admitted, and they are known by their certificate.
#![allow(clippy::unwrap_used)] // tests may panic

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud_ingest::{pki, quic};
use plantlink_wire::frame::{Frame, Hello};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("plantlink-quic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client presenting `dir/<id>.pem` (or no certificate) and trusting `ca`.
fn client(ca: &Path, identity: Option<(&Path, &str)>) -> quinn::Endpoint {
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
    tls.alpn_protocols = vec![plantlink_wire::frame::ALPN.to_vec()];
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    ep
}

/// Connects, says Hello as `claimed`, and returns the answer (or why there was none).
async fn attempt(ep: &quinn::Endpoint, server: SocketAddr, claimed: &str) -> Result<Frame, String> {
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
    quic::read_frame(&mut recv, 1 << 16).await
}

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
        &["gw-revoked".to_owned()],
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
