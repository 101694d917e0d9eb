use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

use super::*;

struct Dir(PathBuf);
impl Dir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "plantlink-pki-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn der(path: &Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).unwrap()
}

fn roots(ca: &Path) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    r.add(der(ca)).unwrap();
    Arc::new(r)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[test]
fn issued_certificates_verify_against_the_fleet_ca_only() {
    let d = Dir::new();
    let other = Dir::new();
    init(&d.0, 3650).unwrap();
    init(&other.0, 3650).unwrap();
    let srv = server(
        &d.0,
        &["ingest.plant.example".into()],
        &["127.0.0.1".parse().unwrap()],
        365,
    )
    .unwrap();
    let gw = gateway(&d.0, "gw-plant1-01", "acme", 365).unwrap();
    let stranger = gateway(&other.0, "gw-plant1-01", "acme", 365).unwrap();

    let clients =
        WebPkiClientVerifier::builder_with_provider(roots(&d.0.join("ca.pem")), provider())
            .build()
            .unwrap();
    let now = UnixTime::now();
    clients.verify_client_cert(&der(&gw), &[], now).unwrap();
    assert!(
        clients
            .verify_client_cert(&der(&stranger), &[], now)
            .is_err(),
        "another CA's gateway"
    );
    // A server certificate is not a client certificate.
    assert!(clients.verify_client_cert(&der(&srv), &[], now).is_err());

    let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(&d.0.join("ca.pem")),
        provider(),
    )
    .build()
    .unwrap();
    for name in ["ingest.plant.example", "127.0.0.1"] {
        servers
            .verify_server_cert(
                &der(&srv),
                &[],
                &ServerName::try_from(name).unwrap(),
                &[],
                now,
            )
            .unwrap();
    }
    assert!(
        servers
            .verify_server_cert(
                &der(&srv),
                &[],
                &ServerName::try_from("evil.example").unwrap(),
                &[],
                now
            )
            .is_err()
    );

    let id = identity(der(&gw).as_ref()).unwrap();
    assert_eq!(
        (id.tenant.as_str(), id.gateway.as_str()),
        ("acme", "gw-plant1-01")
    );
    // The serial and fingerprint are those of this certificate, as openssl would print them.
    let gw_der = der(&gw);
    let (_, x509) = x509_parser::parse_x509_certificate(gw_der.as_ref()).unwrap();
    let openssl_serial = x509.raw_serial_as_string().replace(':', "");
    assert_eq!(id.serial, openssl_serial.trim_start_matches('0'));
    assert_eq!(id.fingerprint.len(), 64);
    assert_eq!(
        serial_and_fingerprint(der(&gw).as_ref()).unwrap(),
        (id.serial.clone(), id.fingerprint.clone())
    );
    assert_eq!(read_certificate(&gw).unwrap(), der(&gw).to_vec());
    // A new certificate for the same gateway id is another certificate.
    let id2 = identity(der(&stranger).as_ref()).unwrap();
    assert_eq!(id2.gateway, id.gateway);
    assert_ne!(id.serial, id2.serial);
    assert_ne!(id.fingerprint, id2.fingerprint);
    assert!(identity(der(&srv).as_ref()).is_err());
}

#[test]
fn an_expired_gateway_certificate_is_refused() {
    let d = Dir::new();
    init(&d.0, 3650).unwrap();
    let gw = gateway(&d.0, "gw-old", "acme", 30).unwrap();
    let clients =
        WebPkiClientVerifier::builder_with_provider(roots(&d.0.join("ca.pem")), provider())
            .build()
            .unwrap();
    let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        (OffsetDateTime::now_utc() + Duration::days(31)).unix_timestamp() as u64,
    ));
    assert!(clients.verify_client_cert(&der(&gw), &[], later).is_err());
}

#[test]
fn keys_are_private_and_nothing_is_overwritten() {
    let d = Dir::new();
    init(&d.0, 3650).unwrap();
    gateway(&d.0, "gw-1", "acme", 365).unwrap();
    #[cfg(unix)]
    for key in ["ca.key", "gw-1.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.0.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    assert!(matches!(init(&d.0, 3650), Err(PkiError::Exists(_))));
    assert!(matches!(
        gateway(&d.0, "gw-1", "acme", 365),
        Err(PkiError::Exists(_))
    ));
    let err = gateway(&d.0, "../x", "acme", 365).unwrap_err().to_string();
    assert!(err.contains("\"../x\""), "{err}");
    let err = gateway(&Dir::new().0, "gw-2", "acme", 365)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pki init"), "{err}");
}
